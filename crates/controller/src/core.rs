//! The controller's logic, independent of HTTP: versioned policy, the tag
//! overlay, agents, tokens and change records, all on a [`Store`].
//!
//! Every change is validated completely first (the policy loads without
//! errors and compiles), and only then written as one store transaction that
//! is conditional on the current-policy pointer being what was read: the new
//! version, the moved pointer and the [`ChangeRecord`] land together or not at
//! all. A lost race (another controller on the same etcd changed the pointer
//! meanwhile) is retried from a fresh read, so concurrent applies serialize
//! into consecutive versions.
//!
//! Store layout (all values JSON):
//! - `policy/current` → [`CurrentRecord`] (version, tag overlay, revision)
//! - `policy/versions/<version, 20 digits>` → [`VersionRecord`]
//! - `agents/<host>` → [`AgentRecord`]
//! - `health/<host>` → [`palisade_api::health::HostHealth`] (see [`crate::health`])
//! - `changes/<time ns, 20 digits>-<random>` → [`ChangeRecord`]
//! - `tokens/<sha256 of the secret>` → [`TokenRecord`]
//! - `token-names/<name>` → the name, claimed in the transaction that
//!   creates the token, so two tokens can never share a name
//! - `trail/<trail id>/last` → the key of the last change record committed
//!   by the controller that keeps that audit trail (see below)
//! - `trail/<trail id>/head` → that trail's last signed head
//!   ([`HeadDocument`]), published by the trail itself
//! - `audit-heads/<host>` → [`AuditHeadInfo`]: the audit key an agent
//!   pinned at registration (trust on first use), its newest signed head,
//!   and the heads refused as a rollback or a fork (evidence, bounded)
//!
//! With a [`Trail`], no change takes effect unless its record reaches the
//! trail. A change's record is checked against the trail's record limit
//! before anything is written ([`MAX_CHANGE_RECORD_BYTES`]); it is committed
//! with the change and with the `trail/<id>/last` pointer; then it is
//! appended to the trail. The two writes cannot be one, so the store is the
//! truth and the trail is brought up to it: a crash or a failed append
//! between them leaves that one change missing, and it is appended from the
//! store (once: the trail is searched for it first) at the next start, by
//! the next change (which waits for it, and is refused while the trail
//! cannot be written), or by the server's periodic retry. A controller's
//! changes go through one gate, so at most that one change is ever pending.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use palisade_audit::record::{ChangeRecord, Record};
use palisade_audit::{Query, RecordKind};
use palisade_policy::compile::{CompiledChain, Compiler};
use palisade_policy::load::{Loaded, Loader};
use palisade_policy::source::SourceError;
use palisade_policy::{Model, Severity};

use crate::auth::{self, TokenRecord};
use crate::store::{self, Compare, Store, StoreError};
use crate::trail::{Trail, trail_head_key, trail_last_key};
use palisade_api::bundle::{apply_overlay, overlay_grew, retag_changed};
use palisade_api::delta::{Edit, FilesDelta};
use palisade_api::roles::{Revocation, Role};
use palisade_api::validate::*;
use palisade_api::*;

pub(crate) const CURRENT: &str = "policy/current";
const VERSIONS: &str = "policy/versions/";
/// How many version records a controller keeps in memory: the current one,
/// those agents still hold (a new version is sent as edits of theirs), and
/// one being applied.
const RECENT_VERSIONS: usize = 4;
const AGENTS: &str = "agents/";
const CHANGES: &str = "changes/";
const TOKENS: &str = "tokens/";
const TOKEN_NAMES: &str = "token-names/";
const AUDIT_HEADS: &str = "audit-heads/";
/// How often a change is retried after losing the compare-and-swap race.
const CAS_RETRIES: usize = 16;
/// The store-wide lock a change holds from reading the current policy to
/// committing the next: controllers sharing an etcd then compile one change
/// at a time instead of racing and compiling again after a lost race.
pub const COMPILE_LOCK: &str = "compile";
/// How long a crashed controller's compile lock outlives it.
const COMPILE_LOCK_TTL: std::time::Duration = std::time::Duration::from_secs(15);
/// How long a change waits for the compile lock before going ahead
/// without it (a holder stalled); the compare-and-swap still decides.
const COMPILE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The compile lock, held until dropped.
struct CompileLock<'a> {
    store: &'a dyn Store,
    lease: Option<u64>,
}

impl Drop for CompileLock<'_> {
    fn drop(&mut self) {
        if let Some(lease) = self.lease
            && let Err(e) = self.store.unlock(COMPILE_LOCK, lease)
        {
            // The lease runs out on its own: others wait at most the TTL.
            eprintln!("palisade controller: letting go of the compile lock: {e}");
        }
    }
}

/// A controller operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The policy does not load or does not compile; the rendered diagnostics.
    #[error("policy is invalid")]
    InvalidPolicy(String),
    /// The request is malformed in a way the JSON schema does not catch.
    #[error("{0}")]
    BadRequest(String),
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The change kept losing to concurrent changes.
    #[error("too many concurrent changes, try again")]
    Conflict,
    /// The request is over a size limit.
    #[error("{0}")]
    TooLarge(String),
    /// The request is well formed but cannot be done (422).
    #[error("{0}")]
    Unprocessable(String),
    /// The name is taken (409).
    #[error("{0}")]
    NameTaken(String),
    /// An audit key or head disagrees with what is held for the host (409):
    /// another key than the pinned one, a rollback or a fork. Recorded.
    #[error("{0}")]
    AuditConflict(String),
    /// This controller cannot serve the request (it keeps no audit log).
    #[error("{0}")]
    Unavailable(String),
    /// Another operation on the same thing is under way (409): a VM's
    /// migration while one is pending or running.
    #[error("{0}")]
    InProgress(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The audit log failed.
    #[error("audit log: {0}")]
    Audit(#[from] palisade_audit::AuditError),
}

impl From<RequestError> for CoreError {
    fn from(e: RequestError) -> CoreError {
        match e.kind {
            RequestErrorKind::Malformed => CoreError::BadRequest(e.message),
            RequestErrorKind::TooLarge => CoreError::TooLarge(e.message),
            RequestErrorKind::Unprocessable => CoreError::Unprocessable(e.message),
        }
    }
}

/// Now, as Unix nanoseconds.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn version_key(v: u64) -> String {
    format!("{VERSIONS}{v:020}")
}

fn change_key(t: u64) -> String {
    let r: [u8; 4] = rand::random();
    format!("{CHANGES}{t:020}-{}", auth::hex(&r))
}

fn audit_head_key(host: &str) -> String {
    format!("{AUDIT_HEADS}{host}")
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs (string keys, no floats) cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// Load `files`; errors become [`CoreError::InvalidPolicy`]. Returns the model and rendered warnings.
pub fn validate(files: &Files) -> Result<(Model, String), CoreError> {
    validate_by(|src| palisade_policy::load(src), files)
}

/// [`validate()`] with `loader`, which reuses what it built from the VMs of
/// the files it loaded before.
pub fn validate_with(loader: &mut Loader, files: &Files) -> Result<(Model, String), CoreError> {
    validate_by(|src| loader.load(src), files)
}

fn validate_by(
    load: impl FnOnce(&palisade_policy::MemorySource) -> Result<Loaded, SourceError>,
    files: &Files,
) -> Result<(Model, String), CoreError> {
    check_files(files)?;
    let src = files
        .iter()
        .fold(palisade_policy::MemorySource::new(), |s, (n, t)| s.with(n, t.clone()));
    let loaded = load(&src).map_err(|e| CoreError::BadRequest(e.to_string()))?;
    if loaded.has_errors() {
        return Err(CoreError::InvalidPolicy(loaded.render()));
    }
    let warnings = if loaded.diagnostics.iter().any(|d| d.severity == Severity::Warning) {
        loaded.render()
    } else {
        String::new()
    };
    Ok((loaded.model, warnings))
}

/// The overlay restricted to VMs that `model` has, applied to it.
fn overlay_onto(model: &mut Model, tags: &TagOverlay) -> TagOverlay {
    let mut kept = TagOverlay::new();
    for (vm, o) in tags {
        if let Some(v) = model.inventory.vms.iter_mut().find(|v| &v.name == vm) {
            apply_overlay(&mut v.tags, o);
            kept.insert(vm.clone(), o.clone());
        }
    }
    kept
}

/// Place the VMs of `locations` (the location overlay: where live
/// migrations moved them) in `model`; the entries kept, those of VMs the
/// model still has whose files do not already put them there.
fn locations_onto(model: &mut Model, locations: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut kept = BTreeMap::new();
    for (vm, host) in locations {
        if let Some(v) = model.inventory.vms.iter_mut().find(|v| &v.name == vm)
            && v.host.as_deref() != Some(host.as_str())
        {
            v.host = Some(host.clone());
            kept.insert(vm.clone(), host.clone());
        }
    }
    kept
}

fn compile(model: Model) -> Result<Compiler, CoreError> {
    Compiler::new(model).map_err(|e| CoreError::InvalidPolicy(e.to_string()))
}

/// The chains of a compiler by (vNIC, direction), without the version stamp
/// (which every new version changes and which changes no verdict).
fn chain_map(c: &Compiler) -> BTreeMap<(String, String), CompiledChain> {
    c.chains()
        .map(|ch| {
            let mut ch = ch.clone();
            for e in &mut ch.entries {
                e.provenance.policy_version = 0;
            }
            ch.default.1.policy_version = 0;
            ((ch.vnic.clone(), ch.direction.to_string()), ch)
        })
        .collect()
}

fn chain_changes(old: Option<&Compiler>, new: &Compiler) -> Vec<ChainChange> {
    let old = old.map(chain_map).unwrap_or_default();
    let new = chain_map(new);
    let keys: BTreeSet<_> = old.keys().chain(new.keys()).cloned().collect();
    let mut out = Vec::new();
    for k in keys {
        let change = match (old.get(&k), new.get(&k)) {
            (None, Some(_)) => "added",
            (Some(_), None) => "removed",
            (Some(a), Some(b)) if a != b => "changed",
            _ => continue,
        };
        out.push(ChainChange {
            vnic: k.0,
            direction: k.1,
            change: change.into(),
        });
    }
    out
}

/// How long a diff of two file sets may take: past it, the diff is coarser
/// (whole runs of lines replaced) but still correct. A policy of every line
/// changed would otherwise take quadratic time, and any reader may ask.
const DIFF_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// A unified diff of two file sets.
pub fn diff_files(old: &Files, new: &Files) -> String {
    let names: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let mut out = String::new();
    for n in names {
        let a = old.get(n).map_or("", String::as_str);
        let b = new.get(n).map_or("", String::as_str);
        if a == b {
            continue;
        }
        let d = similar::TextDiff::configure().timeout(DIFF_TIMEOUT).diff_lines(a, b);
        let text = d
            .unified_diff()
            .header(&format!("a/{n}"), &format!("b/{n}"))
            .to_string();
        out.push_str(&text);
    }
    out
}

/// The diff a change record keeps of a new version: the unified diff, or
/// when that is over [`MAX_CHANGE_DIFF`] its first part, then a line per
/// file that changed with its lines added and removed and the SHA-256 of
/// its new text (the files themselves are in the store, under the version).
pub fn change_diff(old: &Files, new: &Files) -> String {
    let full = diff_files(old, new);
    if full.len() <= MAX_CHANGE_DIFF {
        return full;
    }
    let names: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let mut summary = String::new();
    for n in names {
        let (a, b) = (old.get(n), new.get(n));
        if a == b {
            continue;
        }
        let lines = |t: Option<&String>| t.map_or(0, |t| t.lines().count());
        let digest = b.map_or_else(
            || "removed".to_string(),
            |t| {
                format!(
                    "sha256 {}",
                    auth::hex(&<sha2::Sha256 as sha2::Digest>::digest(t.as_bytes()))
                )
            },
        );
        summary.push_str(&format!(
            "# {}: {} lines before, {} after, {digest}\n",
            Quoted(n),
            lines(a),
            lines(b)
        ));
    }
    let head = format!(
        "# diff of {} bytes cut to its first part; every changed file:\n",
        full.len()
    );
    let room = MAX_CHANGE_DIFF.saturating_sub(head.len() + summary.len());
    let mut cut = room.min(full.len());
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    // End on a whole line.
    let cut = full[..cut].rfind('\n').map_or(0, |i| i + 1);
    format!("{head}{summary}{}", &full[..cut])
}

/// Wait until the current-policy pointer in `store` may have changed after
/// store revision `after` (from [`Controller::current_since`]), for at most
/// about `timeout`; `Ok(false)` when it did not. Only on a store that can
/// watch: see [`Store::wait_for_write`]. A function of the store alone, so a
/// wait left running when its controller stops holds nothing else of it.
pub fn wait_for_policy_change(store: &dyn Store, after: u64, timeout: std::time::Duration) -> Result<bool, CoreError> {
    Ok(store.wait_for_write(CURRENT, after, timeout)?)
}

/// The controller on a store.
#[derive(Clone)]
pub struct Controller {
    store: Arc<dyn Store>,
    trail: Option<Arc<Trail>>,
    /// The effective policy of one revision, compiled, with that revision's
    /// pointer: a tag change then recompiles only what the retagged VM
    /// affects (`Compiler::retag`) instead of reading, validating and
    /// compiling the whole datacenter. A revision names one content in the
    /// store (with etcd, for every controller): an entry for the current
    /// revision is used as it is, one for an earlier revision of the same
    /// version is caught up by retagging what changed since, anything else
    /// is a miss.
    compiled: Arc<std::sync::Mutex<Option<(CurrentRecord, Compiler)>>>,
    /// How tag changes came by their compiled policy.
    compiles: Arc<std::sync::Mutex<CompileCounts>>,
    /// The versions read or written last (see [`Controller::version_shared`]).
    versions: Arc<std::sync::Mutex<std::collections::VecDeque<Arc<VersionRecord>>>>,
    /// Loads policy files, reusing what it built from the VMs of the last
    /// files it loaded: a new version that changes a few of 50,000 VMs
    /// parses only those.
    loader: Arc<std::sync::Mutex<Loader>>,
    /// Every change of this controller passes here, from the check that
    /// the trail holds the last one to the append of its own record.
    gate: Arc<std::sync::Mutex<TrailGate>>,
    /// The alerts agents pushed, per host, in memory ([`crate::alerts`] says why).
    alerts: Arc<std::sync::Mutex<crate::alerts::AlertStore>>,
}

/// Where the trail stands against the store, as a controller's changes see it.
#[derive(Debug, Default)]
struct TrailGate {
    /// The trail is known to hold this controller's last committed change
    /// (unknown at start: checked against the store first).
    synced: bool,
}

/// The fault-injection hook of the crash tests: with
/// `PALISADE_FAULT_KILL_AFTER_COMMIT=N` in its environment, the process
/// kills itself (SIGKILL) right after its Nth change commits, before the
/// change's record reaches the trail. Otherwise nothing happens: the
/// variable is read once.
fn fault_after_commit() {
    static KILL_AFTER: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    static COMMITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let Some(n) = *KILL_AFTER.get_or_init(|| {
        std::env::var("PALISADE_FAULT_KILL_AFTER_COMMIT")
            .ok()
            .and_then(|v| v.parse().ok())
    }) else {
        return;
    };
    if COMMITS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == n {
        // SAFETY: getpid and kill take no pointers; this ends the process.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").finish_non_exhaustive()
    }
}

impl Controller {
    /// Take the compile lock ([`COMPILE_LOCK`]). Past [`COMPILE_LOCK_WAIT`]
    /// the change goes ahead without it: a stalled holder must not stop
    /// every change, and the store's compare-and-swap keeps changes
    /// consistent either way.
    fn compile_lock(&self) -> Result<CompileLock<'_>, CoreError> {
        let lease = self.store.lock(COMPILE_LOCK, COMPILE_LOCK_TTL, COMPILE_LOCK_WAIT)?;
        if lease.is_none() {
            eprintln!(
                "palisade controller: the compile lock is still held after {COMPILE_LOCK_WAIT:?}; going ahead without it"
            );
        }
        Ok(CompileLock {
            store: &*self.store,
            lease,
        })
    }

    /// The model for one attempt at a change of `files`: the first attempt
    /// takes the one loaded already; one after a lost race loads it again
    /// (cheap with the loader) rather than every attempt copying 50,000 VMs.
    fn attempt_model(&self, first: &mut Option<Model>, files: &Files) -> Result<Model, CoreError> {
        match first.take() {
            Some(m) => Ok(m),
            None => Ok(self.load(files)?.0),
        }
    }

    /// Load and validate `files` with the controller's [`Loader`].
    fn load(&self, files: &Files) -> Result<(Model, String), CoreError> {
        // A panic while loading leaves at worst a loader that remembers
        // less: its state is replaced whole at the end of each load.
        let mut loader = self.loader.lock().unwrap_or_else(|p| p.into_inner());
        validate_with(&mut loader, files)
    }

    /// A controller on `store`.
    pub fn new(store: Arc<dyn Store>) -> Controller {
        Controller {
            store,
            trail: None,
            compiled: Arc::default(),
            compiles: Arc::default(),
            loader: Arc::default(),
            versions: Arc::default(),
            gate: Arc::default(),
            alerts: Arc::default(),
        }
    }

    /// The same controller, also keeping its change records (and the flows
    /// pushed to it) in `trail`.
    pub fn with_trail(mut self, trail: Arc<Trail>) -> Controller {
        self.trail = Some(trail);
        self
    }

    /// Its audit trail, if it keeps one.
    pub fn trail(&self) -> Option<&Arc<Trail>> {
        self.trail.as_ref()
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, TrailGate> {
        // One flag, set whole: a panic elsewhere cannot leave it half-written.
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commit `change` with `puts` if every compare holds, and copy its
    /// record to the trail (see the module's documentation): refused with
    /// [`CoreError::TooLarge`] when the record is over
    /// [`MAX_CHANGE_RECORD_BYTES`], with [`CoreError::Audit`] while the
    /// trail lacks an earlier change and cannot be given it. `Ok(false)`:
    /// a compare failed, nothing was written.
    pub(crate) fn commit_change(
        &self,
        compares: &[Compare],
        mut puts: Vec<(String, Vec<u8>)>,
        change: &ChangeRecord,
    ) -> Result<bool, CoreError> {
        let encoded = json(&Record::Change(change.clone()));
        if encoded.len() > MAX_CHANGE_RECORD_BYTES {
            return Err(CoreError::TooLarge(format!(
                "the record of this change ({} {}) would be {} bytes; the limit is {MAX_CHANGE_RECORD_BYTES}",
                change.action,
                Quoted(&change.resource),
                encoded.len()
            )));
        }
        let key = change_key(change.time_ns);
        puts.push((key.clone(), json(change)));
        let Some(trail) = &self.trail else {
            return Ok(self.store.txn(compares, &puts)?);
        };
        let mut gate = self.gate();
        self.sync_trail_locked(trail, &mut gate)?;
        puts.push((trail_last_key(trail), key.into_bytes()));
        if !self.store.txn(compares, &puts)? {
            return Ok(false);
        }
        fault_after_commit();
        gate.synced = trail.record_change(change);
        Ok(true)
    }

    /// Bring the trail up to the store: append this controller's last
    /// committed change if the trail does not hold it. Returns how many
    /// records were appended (0 or 1). The server runs it at start and
    /// while [`Controller::trail_pending`].
    pub fn sync_trail(&self) -> Result<usize, CoreError> {
        let Some(trail) = &self.trail else {
            return Ok(0);
        };
        let mut gate = self.gate();
        self.sync_trail_locked(trail, &mut gate)
    }

    /// Whether this controller's last change may be missing from its trail.
    pub fn trail_pending(&self) -> bool {
        self.trail.is_some() && !self.gate().synced
    }

    /// Whether the trail lacks this controller's last committed change
    /// (a look only: nothing is appended).
    fn last_change_missing(&self, trail: &Trail) -> bool {
        let Ok(Some(key)) = self.store.get(&trail_last_key(trail)) else {
            return false;
        };
        let Ok(Some(change)) = String::from_utf8(key)
            .ok()
            .map_or(Ok(None), |k| store::get_json::<ChangeRecord>(&*self.store, &k))
        else {
            return true;
        };
        !trail.holds_change(&change).unwrap_or(false)
    }

    fn sync_trail_locked(&self, trail: &Trail, gate: &mut TrailGate) -> Result<usize, CoreError> {
        if gate.synced {
            return Ok(0);
        }
        let Some(key) = self.store.get(&trail_last_key(trail))? else {
            gate.synced = true;
            return Ok(0);
        };
        let key = String::from_utf8(key).map_err(|e| StoreError::Corrupt {
            key: trail_last_key(trail),
            message: e.to_string(),
        })?;
        let change: ChangeRecord = store::get_json(&*self.store, &key)?.ok_or_else(|| StoreError::Corrupt {
            key: trail_last_key(trail),
            message: format!("names change record {key}, which is not stored"),
        })?;
        let appended = trail.ensure_change(&change).map_err(|e| {
            CoreError::Unavailable(format!(
                "the audit log is failing ({e}): {} {} by {} is committed but not yet in it, \
                 and no change is accepted until it is",
                change.action,
                Quoted(&change.resource),
                Quoted(&change.actor)
            ))
        })?;
        if appended {
            eprintln!(
                "palisade controller: audit log: appended {} {} by {} (committed, missing from the log)",
                change.action,
                Quoted(&change.resource),
                Quoted(&change.actor)
            );
        }
        gate.synced = true;
        Ok(usize::from(appended))
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    // ---- tokens ----

    /// Create a token on behalf of `actor` (`local` from the command line);
    /// returns the secret (shown once, stored only hashed). Recorded as a change.
    /// Names are unique, revoked tokens' included: a change record names
    /// its actor by token name ([`CoreError::NameTaken`] otherwise).
    pub fn create_token(&self, actor: &str, name: &str, role: Role) -> Result<String, CoreError> {
        check_token_name(name)?;
        // Tokens made before names were claimed have no claim: look at them all too.
        let taken = self
            .store
            .list_prefix(TOKENS)?
            .iter()
            .map(|(k, b)| store::decode::<TokenRecord>(k, b))
            .collect::<Result<Vec<_>, _>>()?
            .iter()
            .any(|r| r.name == name);
        if taken {
            return Err(CoreError::NameTaken(format!("a token named \"{name}\" exists already")));
        }
        let secret = auth::new_secret();
        let t = now_ns();
        let rec = TokenRecord {
            name: name.to_string(),
            role,
            created_ns: t,
            revoked: None,
        };
        let change = ChangeRecord {
            time_ns: t,
            actor: actor.to_string(),
            action: "token.create".into(),
            resource: format!("token/{name}"),
            diff: format!("role {}", role.name()),
            policy_version: None,
        };
        let name_key = format!("{TOKEN_NAMES}{name}");
        // The claim decides between two creations of one name at once.
        let unclaimed = [Compare {
            key: name_key.clone(),
            value: None,
        }];
        let puts = vec![
            (auth::token_key(&secret), json(&rec)),
            (name_key, name.as_bytes().to_vec()),
        ];
        if !self.commit_change(&unclaimed, puts, &change)? {
            return Err(CoreError::NameTaken(format!("a token named \"{name}\" exists already")));
        }
        Ok(secret)
    }

    /// The token a secret belongs to.
    pub fn authenticate(&self, secret: &str) -> Result<Option<TokenRecord>, CoreError> {
        Ok(store::get_json(&*self.store, &auth::token_key(secret))?)
    }

    /// Every token, revoked ones included, oldest first.
    pub fn tokens(&self) -> Result<Vec<TokenInfo>, CoreError> {
        let mut all = self
            .store
            .list_prefix(TOKENS)?
            .iter()
            .map(|(k, b)| {
                let rec: TokenRecord = store::decode(k, b)?;
                Ok(TokenInfo {
                    id: k.trim_start_matches(TOKENS).chars().take(12).collect(),
                    name: rec.name,
                    role: rec.role,
                    created_ns: rec.created_ns,
                    revoked: rec.revoked,
                })
            })
            .collect::<Result<Vec<_>, CoreError>>()?;
        all.sort_by(|a, b| (a.created_ns, &a.id).cmp(&(b.created_ns, &b.id)));
        Ok(all)
    }

    /// Revoke every live token named `name` (or the one whose id is
    /// `name`) on behalf of `actor`; returns them. Refused when it would
    /// leave no live admin token (nobody could manage tokens any more).
    /// Recorded as a change, in the same transaction.
    pub fn revoke_token(&self, actor: &str, name: &str) -> Result<Vec<TokenInfo>, CoreError> {
        for _ in 0..CAS_RETRIES {
            let all = self.store.list_prefix(TOKENS)?;
            let mut records = Vec::new();
            for (k, b) in &all {
                records.push((k, b, store::decode::<TokenRecord>(k, b)?));
            }
            let is_target = |k: &str, r: &TokenRecord| {
                r.revoked.is_none()
                    && (r.name == name || k.trim_start_matches(TOKENS).starts_with(name) && name.len() >= 12)
            };
            let targets: Vec<_> = records.iter().filter(|(k, _, r)| is_target(k, r)).collect();
            if targets.is_empty() {
                return Err(CoreError::NotFound(format!("no live token named \"{name}\"")));
            }
            let admins_left = records
                .iter()
                .filter(|(k, _, r)| r.revoked.is_none() && r.role == Role::Admin && !is_target(k, r))
                .count();
            if admins_left == 0 && targets.iter().any(|(_, _, r)| r.role == Role::Admin) {
                return Err(CoreError::BadRequest(format!(
                    "revoking \"{name}\" would leave no admin token; create another admin token first"
                )));
            }
            let t = now_ns();
            let revocation = Revocation {
                time_ns: t,
                by: actor.to_string(),
            };
            let mut puts = Vec::new();
            // Every live admin token the guard counted is compared: if
            // another revocation takes one meanwhile, this one retries
            // and counts again, so two admins revoking each other at once
            // cannot both succeed.
            let mut compares: Vec<Compare> = records
                .iter()
                .filter(|(k, _, r)| r.revoked.is_none() && r.role == Role::Admin && !is_target(k, r))
                .map(|(k, b, _)| Compare {
                    key: k.to_string(),
                    value: Some(b.to_vec()),
                })
                .collect();
            let mut out = Vec::new();
            for (k, b, r) in &targets {
                let mut r = r.clone();
                r.revoked = Some(revocation.clone());
                compares.push(store::Compare {
                    key: k.to_string(),
                    value: Some(b.to_vec()),
                });
                puts.push((k.to_string(), json(&r)));
                out.push(TokenInfo {
                    id: k.trim_start_matches(TOKENS).chars().take(12).collect(),
                    name: r.name,
                    role: r.role,
                    created_ns: r.created_ns,
                    revoked: r.revoked,
                });
            }
            let change = ChangeRecord {
                time_ns: t,
                actor: actor.to_string(),
                action: "token.revoke".into(),
                resource: format!("token/{name}"),
                diff: format!("{} token(s) revoked", out.len()),
                policy_version: None,
            };
            if self.commit_change(&compares, puts, &change)? {
                return Ok(out);
            }
        }
        Err(CoreError::Conflict)
    }

    /// Whether any token exists.
    pub fn has_tokens(&self) -> Result<bool, CoreError> {
        Ok(!self.store.list_prefix(TOKENS)?.is_empty())
    }

    // ---- reading ----

    /// The current-policy pointer (default: nothing applied yet) and its raw bytes for a compare.
    pub(crate) fn current_raw(&self) -> Result<(CurrentRecord, Option<Vec<u8>>), CoreError> {
        let raw = self.store.get(CURRENT)?;
        let cur = match &raw {
            Some(b) => store::decode(CURRENT, b)?,
            None => CurrentRecord::default(),
        };
        Ok((cur, raw))
    }

    /// The current-policy pointer.
    pub fn current(&self) -> Result<CurrentRecord, CoreError> {
        Ok(self.current_raw()?.0)
    }

    /// The current-policy pointer and a store revision at or before the
    /// read: a change of the pointer after that revision is one
    /// [`wait_for_policy_change`] reports.
    pub fn current_since(&self) -> Result<(CurrentRecord, u64), CoreError> {
        let at = self.store.revision()?;
        Ok((self.current()?, at))
    }

    /// One version.
    pub fn version(&self, v: u64) -> Result<VersionRecord, CoreError> {
        self.version_shared(v).map(Arc::unwrap_or_clone)
    }

    /// One version, from the few this controller read or wrote last when
    /// it is one of them. A version, once written, never changes (a new
    /// policy or a rollback is a new version, and none is deleted), so a
    /// copy stays true whichever controller wrote it; at 50,000 VMs each is
    /// 10 MB that an etcd store would otherwise send for every change.
    fn version_shared(&self, v: u64) -> Result<Arc<VersionRecord>, CoreError> {
        if let Some(rec) = self.recent_versions().iter().find(|r| r.version == v) {
            return Ok(rec.clone());
        }
        let rec: VersionRecord = store::get_json(&*self.store, &version_key(v))?
            .ok_or_else(|| CoreError::NotFound(format!("no version {v}")))?;
        let rec = Arc::new(rec);
        self.remember_version(rec.clone());
        Ok(rec)
    }

    fn recent_versions(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Arc<VersionRecord>>> {
        // The list is only ever pushed and popped whole: a panic elsewhere
        // while it was held cannot have left it half-changed.
        self.versions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember_version(&self, rec: Arc<VersionRecord>) {
        let mut recent = self.recent_versions();
        if recent.iter().any(|r| r.version == rec.version) {
            return;
        }
        if recent.len() == RECENT_VERSIONS {
            recent.pop_front();
        }
        recent.push_back(rec);
    }

    /// Every version, oldest first.
    pub fn versions(&self) -> Result<Vec<VersionSummary>, CoreError> {
        self.store
            .list_prefix(VERSIONS)?
            .iter()
            .map(|(k, b)| Ok(VersionSummary::from(&store::decode::<VersionRecord>(k, b)?)))
            .collect()
    }

    /// The current effective policy.
    pub fn bundle(&self) -> Result<PolicyBundle, CoreError> {
        self.bundle_for(None)
    }

    /// The current effective policy for a reader that already has the files
    /// of version `have`: when that is still the current version, the bundle
    /// leaves them out (and the version is not even read from the store).
    pub fn bundle_for(&self, have: Option<u64>) -> Result<PolicyBundle, CoreError> {
        let cur = self.current()?;
        let same_files = cur.version != 0 && have == Some(cur.version);
        let files = if cur.version == 0 || same_files {
            Files::new()
        } else {
            self.version_shared(cur.version)?.files.clone()
        };
        Ok(PolicyBundle {
            revision: cur.revision,
            version: cur.version,
            files,
            tags: cur.tags,
            locations: cur.locations,
            same_files,
            delta: None,
        })
    }

    /// The current effective policy for a reader that holds the files of
    /// version `have`, another than the current one: the current files as
    /// edits of those ([`FilesDelta`]). `None` when that is no better than
    /// the whole bundle: `have` is unknown (never applied, or not a version
    /// here), or the edits come to half the files' size or more.
    pub fn delta_bundle(&self, have: u64) -> Result<Option<PolicyBundle>, CoreError> {
        let cur = self.current()?;
        if cur.version == 0 || have == 0 || have == cur.version {
            return Ok(None);
        }
        let held = match self.version_shared(have) {
            Ok(v) => v,
            Err(CoreError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let files = &self.version_shared(cur.version)?.files;
        let delta = FilesDelta::between(have, &held.files, files);
        let whole: usize = files.iter().map(|(n, t)| n.len() + t.len()).sum();
        let edits: usize = delta
            .changed
            .values()
            .flatten()
            .map(|e| match e {
                Edit::Insert(t) => t.len() + 16,
                Edit::Copy(_) | Edit::Skip(_) => 16,
            })
            .sum();
        if edits * 2 >= whole {
            return Ok(None);
        }
        Ok(Some(PolicyBundle {
            revision: cur.revision,
            version: cur.version,
            files: Files::new(),
            tags: cur.tags,
            locations: cur.locations,
            same_files: false,
            delta: Some(delta),
        }))
    }

    /// The current effective model (files + overlay); `None` before the first apply.
    pub(crate) fn effective(&self, cur: &CurrentRecord) -> Result<Option<(Model, Files)>, CoreError> {
        if cur.version == 0 {
            return Ok(None);
        }
        let files = self.version_shared(cur.version)?.files.clone();
        let (mut model, _) = self.load(&files)?;
        overlay_onto(&mut model, &cur.tags);
        locations_onto(&mut model, &cur.locations);
        Ok(Some((model, files)))
    }

    /// VMs of the current policy with their effective tags.
    pub fn vms(&self) -> Result<Vec<VmInfo>, CoreError> {
        let cur = self.current()?;
        let Some((model, _)) = self.effective(&cur)? else {
            return Ok(Vec::new());
        };
        Ok(model
            .inventory
            .vms
            .iter()
            .map(|v| VmInfo {
                name: v.name.clone(),
                uuid: v.uuid.clone(),
                cluster: v.cluster.clone(),
                host: v.host.clone(),
                tags: v.tags.clone(),
                vnics: v.vnics.iter().map(|n| n.name.clone()).collect(),
            })
            .collect())
    }

    /// Hosts: those the inventory names and those whose agent registered.
    pub fn hosts(&self) -> Result<Vec<HostInfo>, CoreError> {
        let mut hosts: BTreeMap<String, HostInfo> = BTreeMap::new();
        let blank = |name: &str| HostInfo {
            name: name.to_string(),
            cluster: None,
            vms: Vec::new(),
            agent: None,
            health: None,
        };
        let cur = self.current()?;
        if let Some((model, _)) = self.effective(&cur)? {
            for c in &model.inventory.clusters {
                for h in &c.hosts {
                    hosts.entry(h.clone()).or_insert_with(|| blank(h)).cluster = Some(c.name.clone());
                }
            }
            for vm in &model.inventory.vms {
                if let Some(h) = &vm.host {
                    hosts
                        .entry(h.clone())
                        .or_insert_with(|| blank(h))
                        .vms
                        .push(vm.name.clone());
                }
            }
        }
        for a in self.agents()? {
            let h = a.host.clone();
            hosts.entry(h.clone()).or_insert_with(|| blank(&h)).agent = Some(a);
        }
        for (h, health) in self.host_health()? {
            hosts.entry(h.clone()).or_insert_with(|| blank(&h)).health = Some(health);
        }
        Ok(hosts.into_values().collect())
    }

    /// Registered agents.
    pub fn agents(&self) -> Result<Vec<AgentRecord>, CoreError> {
        self.store
            .list_prefix(AGENTS)?
            .iter()
            .map(|(k, b)| Ok(store::decode(k, b)?))
            .collect()
    }

    /// Change records, oldest first.
    pub fn changes(&self) -> Result<Vec<ChangeRecord>, CoreError> {
        self.store
            .list_prefix(CHANGES)?
            .iter()
            .map(|(k, b)| Ok(store::decode(k, b)?))
            .collect()
    }

    // ---- changing ----

    /// Move the current pointer from `raw` to `next`, writing `extra` and a change record with it.
    fn commit(
        &self,
        raw: Option<Vec<u8>>,
        next: &CurrentRecord,
        extra: Vec<(String, Vec<u8>)>,
        change: &ChangeRecord,
    ) -> Result<bool, CoreError> {
        let mut compares = vec![Compare {
            key: CURRENT.into(),
            value: raw,
        }];
        let mut puts = extra;
        for (k, _) in &puts {
            // New versions are never overwritten, even by a controller with a stale view.
            compares.push(Compare {
                key: k.clone(),
                value: None,
            });
        }
        puts.push((CURRENT.into(), json(next)));
        self.commit_change(&compares, puts, change)
    }

    /// Validate `req` and, unless `dry_run`, make it the current policy as a new version.
    pub fn apply(&self, actor: &str, req: &ApplyRequest, dry_run: bool) -> Result<ApplyResponse, CoreError> {
        req.check()?;
        let (model, warnings) = self.load(&req.files)?;
        let _lock = if dry_run { None } else { Some(self.compile_lock()?) };
        let mut first = Some(model);
        for _ in 0..CAS_RETRIES {
            let (cur, raw) = self.current_raw()?;
            let mut model = self.attempt_model(&mut first, &req.files)?;
            let tags = overlay_onto(&mut model, &cur.tags);
            let locations = locations_onto(&mut model, &cur.locations);
            let compiled = compile(model)?;
            let next = CurrentRecord {
                revision: cur.revision + 1,
                version: cur.version + 1,
                tags,
                locations,
            };
            let resp = ApplyResponse {
                version: next.version,
                revision: next.revision,
                dry_run,
                warnings: warnings.clone(),
            };
            if dry_run {
                return Ok(resp);
            }
            let old = match cur.version {
                0 => None,
                v => Some(self.version_shared(v)?),
            };
            let no_files = Files::new();
            let old = old.as_ref().map_or(&no_files, |v| &v.files);
            let t = now_ns();
            let rec = VersionRecord {
                version: next.version,
                author: actor.to_string(),
                time_ns: t,
                message: req.message.clone(),
                files: req.files.clone(),
                rollback_of: None,
            };
            let change = ChangeRecord {
                time_ns: t,
                actor: actor.to_string(),
                action: "policy.apply".into(),
                resource: "policy".into(),
                diff: change_diff(old, &req.files),
                policy_version: Some(next.version),
            };
            if self.commit(raw, &next, vec![(version_key(next.version), json(&rec))], &change)? {
                self.remember_version(Arc::new(rec));
                self.keep_compiled(next.clone(), compiled);
                return Ok(resp);
            }
        }
        Err(CoreError::Conflict)
    }

    /// What applying `files` would change, against the current policy.
    pub fn diff(&self, files: &Files) -> Result<DiffResponse, CoreError> {
        let (mut model, _) = self.load(files)?;
        let cur = self.current()?;
        let old = self.effective(&cur)?;
        overlay_onto(&mut model, &cur.tags);
        let new = compile(model)?;
        let (old_c, old_files) = match old {
            Some((m, f)) => (Some(compile(m)?), f),
            None => (None, Files::new()),
        };
        Ok(DiffResponse {
            base_version: cur.version,
            diff: diff_files(&old_files, files),
            chains: chain_changes(old_c.as_ref(), &new),
        })
    }

    /// Make version `v`'s files current again, as a new version.
    pub fn rollback(&self, actor: &str, v: u64) -> Result<ApplyResponse, CoreError> {
        let target = self.version(v)?;
        let (model, warnings) = self.load(&target.files)?;
        let _lock = self.compile_lock()?;
        let mut first = Some(model);
        for _ in 0..CAS_RETRIES {
            let (cur, raw) = self.current_raw()?;
            let mut model = self.attempt_model(&mut first, &target.files)?;
            let tags = overlay_onto(&mut model, &cur.tags);
            let locations = locations_onto(&mut model, &cur.locations);
            let compiled = compile(model)?;
            let next = CurrentRecord {
                revision: cur.revision + 1,
                version: cur.version + 1,
                tags,
                locations,
            };
            let old = self.version_shared(cur.version)?;
            let t = now_ns();
            let rec = VersionRecord {
                version: next.version,
                author: actor.to_string(),
                time_ns: t,
                message: format!("rollback to version {v}"),
                files: target.files.clone(),
                rollback_of: Some(v),
            };
            let change = ChangeRecord {
                time_ns: t,
                actor: actor.to_string(),
                action: "policy.rollback".into(),
                resource: "policy".into(),
                diff: change_diff(&old.files, &target.files),
                policy_version: Some(next.version),
            };
            if self.commit(raw, &next, vec![(version_key(next.version), json(&rec))], &change)? {
                self.remember_version(Arc::new(rec));
                self.keep_compiled(next.clone(), compiled);
                return Ok(ApplyResponse {
                    version: next.version,
                    revision: next.revision,
                    dry_run: false,
                    warnings,
                });
            }
        }
        Err(CoreError::Conflict)
    }

    /// Set and remove tags of VM `vm` in the overlay: a new effective revision.
    pub fn tag(&self, actor: &str, vm: &str, req: &TagRequest) -> Result<TagResponse, CoreError> {
        req.check()?;
        let _lock = self.compile_lock()?;
        for _ in 0..CAS_RETRIES {
            let (cur, raw) = self.current_raw()?;
            let mut compiler = match self.compiled_at(&cur)? {
                Some(c) => c,
                None => return Err(CoreError::NotFound("no policy applied yet, so no VM to tag".into())),
            };
            let Some(before) = compiler.model().inventory.vm(vm).map(|v| v.tags.clone()) else {
                self.keep_compiled(cur, compiler);
                return Err(CoreError::NotFound(format!("VM \"{vm}\" is not in the current policy")));
            };
            let mut next = cur.clone();
            let o = next.tags.entry(vm.to_string()).or_default();
            for (k, v) in &req.set {
                o.insert(k.clone(), Some(v.clone()));
            }
            for k in &req.remove {
                o.insert(k.clone(), None);
            }
            if o.len() > MAX_OVERLAY_TAGS_PER_VM {
                return Err(CoreError::Unprocessable(format!(
                    "VM {} would have {} tags set or removed through the API; the limit is \
                     {MAX_OVERLAY_TAGS_PER_VM} (change its tags in the policy files instead)",
                    Quoted(vm),
                    o.len()
                )));
            }
            let mut after = before.clone();
            apply_overlay(&mut after, o);
            let overlay_bytes = json(&next.tags).len();
            if overlay_bytes > MAX_OVERLAY_BYTES {
                return Err(CoreError::TooLarge(format!(
                    "the tag overlay would come to {overlay_bytes} bytes; the limit is {MAX_OVERLAY_BYTES}"
                )));
            }
            let changes = compiler
                .retag(vm, after.clone())
                .map_err(|e| CoreError::InvalidPolicy(e.to_string()))?;
            next.revision = cur.revision + 1;
            // Only the keys this request touches: the record of one tag
            // change stays small whatever else the VM carries.
            let touched = |tags: &BTreeMap<String, String>| -> BTreeMap<String, String> {
                req.set
                    .keys()
                    .chain(&req.remove)
                    .filter_map(|k| tags.get(k).map(|v| (k.clone(), v.clone())))
                    .collect()
            };
            let change = ChangeRecord {
                time_ns: now_ns(),
                actor: actor.to_string(),
                action: "vm.tag".into(),
                resource: format!("vm/{vm}"),
                diff: format!("tags {:?} -> {:?}", touched(&before), touched(&after)),
                policy_version: None,
            };
            let chains = changes.changed.to_vec();
            if self.commit(raw, &next, Vec::new(), &change)? {
                // The compiler now holds the new revision's effective policy.
                let revision = next.revision;
                self.keep_compiled(next, compiler);
                return Ok(TagResponse {
                    vm: vm.to_string(),
                    tags: after,
                    revision,
                    chains,
                });
            }
            // Another change won the race: undo this one, so the next try
            // catches up from `cur` by retagging what that change did.
            if compiler.retag(vm, before).is_ok() {
                self.keep_compiled(cur, compiler);
            }
        }
        Err(CoreError::Conflict)
    }

    /// The effective policy of `cur`, compiled, from what is kept when it
    /// can be (see `compiled`); `None` before any policy.
    fn compiled_at(&self, cur: &CurrentRecord) -> Result<Option<Compiler>, CoreError> {
        let kept = self.compiled.lock().ok().and_then(|mut c| c.take());
        let count = |f: fn(&mut CompileCounts)| {
            if let Ok(mut c) = self.compiles.lock() {
                f(&mut c);
            }
        };
        if let Some((at, mut c)) = kept {
            if at.revision == cur.revision {
                count(|c| c.kept += 1);
                return Ok(Some(c));
            }
            let earlier_same_version =
                at.version == cur.version && at.revision < cur.revision && overlay_grew(&at.tags, &cur.tags);
            // Part-way on an error: compiled whole below.
            if earlier_same_version && retag_changed(&mut c, &at.tags, &cur.tags).is_ok() {
                count(|c| c.caught_up += 1);
                return Ok(Some(c));
            }
        }
        let Some((model, _)) = self.effective(cur)? else {
            return Ok(None);
        };
        count(|c| c.whole += 1);
        compile(model).map(Some)
    }

    /// Load and compile the current policy ahead of the first change: a
    /// controller just started (or just failed over to) then answers its
    /// first tag change from the kept compiled policy, and parses only the
    /// VMs a new version changes, instead of spending a second or more at
    /// 50,000 VMs on the change itself. Nothing to do before the first apply.
    pub fn warm(&self) -> Result<(), CoreError> {
        let cur = self.current()?;
        if let Some(c) = self.compiled_at(&cur)? {
            self.keep_compiled(cur, c);
        }
        Ok(())
    }

    /// Keep `compiler`, the effective policy of `at`, for the next tag change.
    fn keep_compiled(&self, at: CurrentRecord, compiler: Compiler) {
        let replaced = match self.compiled.lock() {
            Ok(mut c) => c.replace((at, compiler)),
            Err(_) => None,
        };
        // Freeing a compiled policy of 50,000 VMs takes about 100 ms, more
        // than compiling it: done on a thread of its own, the answer to the
        // change does not wait for it. A tag change retags the kept policy
        // in place and replaces nothing; a new version, one thread. (A
        // thread that cannot start drops its closure, and the policy with
        // it, right here: slower, not wrong.)
        if let Some(old) = replaced {
            let _ = std::thread::Builder::new()
                .name("palisade-free".into())
                .spawn(move || drop(old));
        }
    }

    /// Record an agent's registration. An audit public key is pinned the
    /// first time a host gives one (trust on first use); another key later
    /// is refused ([`CoreError::AuditConflict`]) and kept in the host's
    /// refused keys, and nothing else of the registration is stored.
    pub fn register(&self, host: &str, req: &RegisterRequest) -> Result<AgentRecord, CoreError> {
        check_host(host)?;
        req.check()?;
        if let Some(k) = &req.audit_public_key {
            self.pin_audit_key(host, k)?;
        }
        let key = format!("{AGENTS}{host}");
        let t = now_ns();
        let mut rec: AgentRecord = store::get_json(&*self.store, &key)?.unwrap_or_else(|| AgentRecord {
            host: host.to_string(),
            registered_ns: t,
            ..AgentRecord::default()
        });
        rec.last_seen_ns = t;
        rec.agent_version = req.agent_version.clone();
        self.store.put(&key, &json(&rec))?;
        Ok(rec)
    }

    /// Record an agent's report.
    pub fn report(&self, host: &str, req: &ReportRequest) -> Result<AgentRecord, CoreError> {
        check_host(host)?;
        req.check()?;
        let key = format!("{AGENTS}{host}");
        let t = now_ns();
        let mut rec: AgentRecord = store::get_json(&*self.store, &key)?
            .ok_or_else(|| CoreError::NotFound(format!("agent \"{host}\" has not registered")))?;
        rec.last_seen_ns = t;
        rec.installed_revision = req.installed_revision;
        rec.counters = req.counters.clone();
        self.store.put(&key, &json(&rec))?;
        Ok(rec)
    }

    // ---- audit heads ----

    /// The audit key, head and refused heads held for agent `host`.
    pub fn audit_head(&self, host: &str) -> Result<AuditHeadInfo, CoreError> {
        check_host(host)?;
        store::get_json(&*self.store, &audit_head_key(host))?
            .ok_or_else(|| CoreError::NotFound(format!("agent {} has no pinned audit key", Quoted(host))))
    }

    /// Write `next` for `host` if the stored bytes are still `raw`.
    fn put_audit_info(&self, host: &str, raw: Option<Vec<u8>>, next: &AuditHeadInfo) -> Result<bool, CoreError> {
        let key = audit_head_key(host);
        Ok(self.store.txn(
            &[Compare {
                key: key.clone(),
                value: raw,
            }],
            &[(key, json(next))],
        )?)
    }

    /// Pin `key_hex` for `host` unless a key is pinned; refuse another.
    fn pin_audit_key(&self, host: &str, key_hex: &str) -> Result<(), CoreError> {
        for _ in 0..CAS_RETRIES {
            let key = audit_head_key(host);
            let raw = self.store.get(&key)?;
            let mut info = match &raw {
                Some(b) => store::decode::<AuditHeadInfo>(&key, b)?,
                None => {
                    let info = AuditHeadInfo {
                        public_key: key_hex.to_ascii_lowercase(),
                        pinned_ns: now_ns(),
                        ..AuditHeadInfo::default()
                    };
                    if self.put_audit_info(host, raw, &info)? {
                        return Ok(());
                    }
                    continue;
                }
            };
            if info.public_key.eq_ignore_ascii_case(key_hex) {
                return Ok(());
            }
            let offered = key_hex.to_ascii_lowercase();
            if info.refused_keys.len() < MAX_HEAD_CONFLICTS
                && !info.refused_keys.iter().any(|r| r.public_key == offered)
            {
                info.refused_keys.push(RefusedKey {
                    public_key: offered.clone(),
                    time_ns: now_ns(),
                });
            }
            if !self.put_audit_info(host, raw, &info)? {
                continue;
            }
            eprintln!(
                "palisade controller: agent {} offered audit key {offered}, not its pinned {}: refused",
                Quoted(host),
                info.public_key
            );
            return Err(CoreError::AuditConflict(format!(
                "agent {} has the audit key {} pinned, not {offered}: refused (an admin replaces a host's key with PUT /v1/agents/{{host}}/audit-key)",
                Quoted(host),
                info.public_key
            )));
        }
        Err(CoreError::Conflict)
    }

    /// Accept agent `host`'s newest signed head: signed by its pinned key
    /// (422 otherwise), and ahead of the head held. A head with a lower seq
    /// (a rollback) or the same seq and another hash (a fork) is refused
    /// with [`CoreError::AuditConflict`] and kept as evidence (the first
    /// [`MAX_HEAD_CONFLICTS`]; all are counted). The same head again is
    /// accepted and changes nothing.
    pub fn put_audit_head(&self, host: &str, doc: &HeadDocument) -> Result<AuditHeadInfo, CoreError> {
        check_host(host)?;
        let head = doc.to_head()?;
        for _ in 0..CAS_RETRIES {
            let key = audit_head_key(host);
            let raw = self.store.get(&key)?;
            let Some(bytes) = &raw else {
                return Err(CoreError::NotFound(format!(
                    "agent {} has no pinned audit key: register with audit_public_key first",
                    Quoted(host)
                )));
            };
            let mut info: AuditHeadInfo = store::decode(&key, bytes)?;
            if !info.public_key.eq_ignore_ascii_case(&doc.public_key) {
                return Err(CoreError::AuditConflict(format!(
                    "the head is signed by {}, not by agent {}'s pinned audit key {}: refused",
                    Quoted(&doc.public_key),
                    Quoted(host),
                    info.public_key
                )));
            }
            if !head.verify() {
                return Err(CoreError::Unprocessable(format!(
                    "the head's signature (seq {}) does not verify with agent {}'s pinned audit key",
                    head.seq,
                    Quoted(host)
                )));
            }
            let held = info.head.as_ref().map(HeadDocument::to_head).transpose()?;
            let conflict = match held {
                None => None,
                Some(h) if head.seq > h.seq => None,
                Some(h) if head.seq == h.seq && head.hash == h.hash => return Ok(info),
                Some(h) if head.seq == h.seq => Some((
                    HeadConflictKind::Fork,
                    format!(
                        "a fork: seq {} was published before with hash {}, now with {}",
                        h.seq,
                        info.head.as_ref().map_or("", |d| d.hash.as_str()),
                        doc.hash
                    ),
                )),
                Some(h) => Some((
                    HeadConflictKind::Rollback,
                    format!("a rollback: seq {} is behind the head held, seq {}", head.seq, h.seq),
                )),
            };
            let Some((kind, reason)) = conflict else {
                info.head = Some(HeadDocument::of(&head));
                if self.put_audit_info(host, raw, &info)? {
                    return Ok(info);
                }
                continue;
            };
            info.conflicts_seen = info.conflicts_seen.saturating_add(1);
            if info.conflicts.len() < MAX_HEAD_CONFLICTS {
                info.conflicts.push(HeadConflict {
                    head: HeadDocument::of(&head),
                    received_ns: now_ns(),
                    kind,
                    reason: reason.clone(),
                });
            }
            if !self.put_audit_info(host, raw, &info)? {
                continue;
            }
            eprintln!(
                "palisade controller: agent {}: audit head refused: {reason}",
                Quoted(host)
            );
            return Err(CoreError::AuditConflict(format!(
                "agent {}: audit head refused and kept as evidence: {reason}",
                Quoted(host)
            )));
        }
        Err(CoreError::Conflict)
    }

    /// Replace agent `host`'s pinned audit key on behalf of `actor` (an
    /// admin: a reinstalled host, a new trail). The head and refused heads
    /// held for the old key go with it; the change record names them.
    pub fn replace_audit_key(
        &self,
        actor: &str,
        host: &str,
        req: &AuditKeyRequest,
    ) -> Result<AuditHeadInfo, CoreError> {
        check_host(host)?;
        req.check()?;
        for _ in 0..CAS_RETRIES {
            let key = audit_head_key(host);
            let raw = self.store.get(&key)?;
            let old: Option<AuditHeadInfo> = raw.as_deref().map(|b| store::decode(&key, b)).transpose()?;
            let next = AuditHeadInfo {
                public_key: req.public_key.to_ascii_lowercase(),
                pinned_ns: now_ns(),
                ..AuditHeadInfo::default()
            };
            let diff = match &old {
                None => format!("pinned {} (no key before)", next.public_key),
                Some(o) => {
                    let mut d = format!("{} -> {}", o.public_key, next.public_key);
                    if let Some(h) = &o.head {
                        d.push_str(&format!("; dropped head seq {} hash {}", h.seq, h.hash));
                    }
                    for c in &o.conflicts {
                        d.push_str(&format!(
                            "; dropped refused head seq {} hash {} ({})",
                            c.head.seq, c.head.hash, c.reason
                        ));
                    }
                    if o.conflicts_seen > o.conflicts.len() as u64 {
                        d.push_str(&format!("; {} refused heads in all", o.conflicts_seen));
                    }
                    d
                }
            };
            let change = ChangeRecord {
                time_ns: next.pinned_ns,
                actor: actor.to_string(),
                action: "agent.audit-key".into(),
                resource: format!("agent/{host}"),
                diff,
                policy_version: None,
            };
            let compares = [Compare {
                key: key.clone(),
                value: raw,
            }];
            if self.commit_change(&compares, vec![(key, json(&next))], &change)? {
                return Ok(next);
            }
        }
        Err(CoreError::Conflict)
    }

    /// This controller's own trail: its key and last published head.
    pub fn own_audit_head(&self) -> Result<AuditHeadInfo, CoreError> {
        let trail = self.need_trail()?;
        let head: Option<HeadDocument> = store::get_json(&*self.store, &trail_head_key(trail.id()))?;
        Ok(AuditHeadInfo {
            public_key: palisade_api::validate::hex(&trail.public_key()),
            head,
            ..AuditHeadInfo::default()
        })
    }

    // ---- the trail ----

    fn need_trail(&self) -> Result<&Arc<Trail>, CoreError> {
        self.trail
            .as_ref()
            .ok_or_else(|| CoreError::Unavailable("this controller keeps no audit log".into()))
    }

    /// Append agent `host`'s flow records to the trail in one durable batch:
    /// all of them, or (when one is refused) none.
    pub fn push_flows(&self, host: &str, batch: FlowBatch) -> Result<FlowPushResponse, CoreError> {
        check_host(host)?;
        let n = batch.records.len();
        if n > MAX_FLOW_BATCH {
            return Err(CoreError::TooLarge(format!(
                "{n} flow records in one request; the limit is {MAX_FLOW_BATCH}"
            )));
        }
        if let Some((i, r)) = batch.records.iter().enumerate().find(|(_, r)| r.host != host) {
            return Err(CoreError::BadRequest(format!(
                "record {i} has host \"{}\", not \"{host}\"; nothing was appended",
                r.host
            )));
        }
        let trail = self.need_trail()?;
        let records: Vec<Record> = batch.records.into_iter().map(Record::Flow).collect();
        let last_seq = trail.append(&records, now_ns()).map_err(|e| match e {
            palisade_audit::AuditError::TooLarge(len) => CoreError::TooLarge(format!(
                "a flow record of {len} bytes is over the audit log's record limit"
            )),
            e => CoreError::Audit(e),
        })?;
        Ok(FlowPushResponse {
            appended: n as u64,
            last_seq,
        })
    }

    /// The trail's records matching `q`, in sequence order.
    pub fn flows(&self, q: &FlowQuery) -> Result<FlowList, CoreError> {
        let limit = q.limit.unwrap_or(DEFAULT_FLOW_LIMIT);
        if limit > MAX_FLOW_LIMIT {
            return Err(CoreError::BadRequest(format!(
                "limit={limit} is over the maximum of {MAX_FLOW_LIMIT}"
            )));
        }
        let query = Query {
            vm: q.vm.clone(),
            zone: q.zone.clone(),
            verdict: q.verdict,
            rule: q.rule.clone(),
            since_ns: q.since_ns,
            until_ns: q.until_ns,
            limit: Some(limit),
            kind: (!q.changes).then_some(RecordKind::Flow),
        };
        let records = self
            .need_trail()?
            .query(&query)?
            .into_iter()
            .map(|(seq, record)| SeqRecord { seq, record })
            .collect();
        Ok(FlowList { records })
    }

    // ---- alerts ----

    /// Keep agent `host`'s inline-inspection alerts (all of them, or none
    /// when one is not the host's).
    pub fn push_alerts(&self, host: &str, batch: AlertBatch) -> Result<AlertPushResponse, CoreError> {
        check_host(host)?;
        let mut store = self.alerts.lock().unwrap_or_else(|p| p.into_inner());
        store.push(host, batch.records).map_err(alert_error)
    }

    /// The alerts kept that match `q` (the newest `limit`, oldest first).
    /// A `host` filter is only compared (a name no host has matches nothing).
    pub fn alerts(&self, q: &AlertQuery) -> Result<AlertList, CoreError> {
        let store = self.alerts.lock().unwrap_or_else(|p| p.into_inner());
        store.query(q).map_err(alert_error)
    }

    /// How this controller is doing.
    pub fn status(&self) -> ControllerStatus {
        ControllerStatus {
            audit: self.trail.as_ref().map(|t| {
                let mut st = t.status();
                st.unaudited = u64::from(self.trail_pending() && self.last_change_missing(t));
                st
            }),
            compiles: self.compiles.lock().map(|c| *c).unwrap_or_default(),
            alerts: self.alerts.lock().map(|a| a.counts()).unwrap_or_default(),
        }
    }
}

fn alert_error(e: crate::alerts::AlertError) -> CoreError {
    match e {
        crate::alerts::AlertError::TooLarge(m) => CoreError::TooLarge(m),
        crate::alerts::AlertError::BadRequest(m) => CoreError::BadRequest(m),
    }
}
