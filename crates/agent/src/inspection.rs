//! Inline inspection: the signature engine on the frames the policy selects.
//!
//! The datapath engine resolves each allowed flow's inspection profile once,
//! when it classifies the flow (both ends' deciding rules, else the traffic
//! class's default), keeps it with the connection and hands it with every
//! forwarded frame ([`palisade_datapath::Processed::inspection`]). A frame
//! without one costs nothing here: the worker does not call in. A frame with
//! one is inspected by its worker's [`Inline`] before its outputs are
//! staged: flows are steered to one worker, so each worker's inspector holds
//! the detection state of its own flows and no lock is taken. The verdict:
//! - `pass`/`alert`: the frame goes on (an alert is recorded);
//! - `drop`: the frame is not sent, and the engine turns the flow's cached
//!   verdict into a drop ([`palisade_datapath::Engine::inspection_drop`],
//!   counted as [`palisade_datapath::DropReason::Inspection`]), so every
//!   later packet of the flow is dropped on the fast path;
//! - `reject`: as `drop`, and the sender gets a TCP reset (or ICMP
//!   unreachable), rendered as the engine renders a policy reject.
//!
//! A super-frame (TSO) is inspected whole: the reassembler takes its whole
//! payload as one segment.
//!
//! Signatures come from the `[inspect]` rules file; the policy's profiles
//! select from them ([`profile_spec`]). Both are compiled once per policy
//! ([`Signatures`]) and shared by the workers.
//!
//! Cost is bounded per port: a byte budget per second (`budget_bytes_per_s`),
//! past which a port in a zone whose `on_failure` is `open` forwards
//! uninspected (`bypassed`) and one whose zone is `closed` drops
//! (`budget_drops`); the same applies to a flow whose profile the loaded
//! signatures do not have (a policy installed while its rules failed to load).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use palisade_datapath::port::PortId;
use palisade_datapath::{Engine, EventSink, Processed};
use palisade_inspect::classification::Classifications;
use palisade_inspect::decode::{self, LinkType};
use palisade_inspect::packet::{Packet, Transport};
use palisade_inspect::rules::RuleContext;
use palisade_inspect::stream::MemoryBudget;
use palisade_inspect::{
    Alert, AlertAction, Config, Detector, Direction, FlowState, Inspector, LoadOptions, Mode, Outcome, ProfileId,
    ProfileSpec, RuleSet,
};
use palisade_policy::model::{Model, Profile};
use serde::Serialize;

pub mod carry;

use crate::config::InspectConfig;
use crate::records::{Clock, Identities};

/// Largest rules or classification file read (a bigger one is refused).
pub const MAX_RULES_FILE: u64 = 256 << 20;

/// Alerts the agent keeps for `/alerts` (the oldest go first).
pub const ALERT_RING: usize = 4096;

/// `alert`-only records a worker holds for the control thread before it
/// takes them (twice a second): more are shed, counted
/// (`alerts_discarded`) and reported by an "alerts not recorded" record.
/// Repeated hits of one signature on one flow are coalesced into one record
/// first, so only that many distinct (flow, signature) pairs per interval
/// are kept: an attacker raising alerts at line rate costs the trail at
/// most this many records per worker per interval.
pub const WORKER_ALERTS: usize = 4096;

/// `drop`/`reject` records a worker holds (a separate, larger bound: a
/// blocked flow is dropped on the fast path from then on, so each needs a
/// new flow; past it they are shed and counted like the others, so memory
/// stays bounded whatever the traffic).
pub const WORKER_BLOCKED_ALERTS: usize = 16_384;

/// Inspected flows a worker tracks by default.
const DEFAULT_MAX_FLOWS: usize = 65_536;

/// An inspected flow idle this long is forgotten (TCP; other protocols: a fifth of it).
const FLOW_IDLE: Duration = Duration::from_secs(600);

/// Why the signatures could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum InspectLoadError {
    /// A file could not be read, or is not a regular file of a sane size.
    #[error("cannot read {path}: {message}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The rules (or the classification) did not load.
    #[error("{path}: {message}")]
    Rules {
        /// The file.
        path: PathBuf,
        /// What is wrong (the first refused rule, with its position, and how many were refused).
        message: String,
    },
    /// A policy profile names no signature set the rules have.
    #[error("profile {profile}: {message}")]
    Profile {
        /// The policy's profile.
        profile: String,
        /// What is wrong.
        message: String,
    },
}

/// The signatures and the policy's profiles compiled: what every worker's
/// inspector shares.
pub struct Signatures {
    rules: Arc<RuleSet>,
    detectors: Arc<[Detector]>,
    /// Policy profile name → the inspector's profile.
    profiles: HashMap<String, ProfileId>,
    /// Rules refused (with `skip_invalid`).
    pub refused: usize,
    /// What they were compiled from, to tell whether a reload changes anything.
    source: Source,
}

/// What compiled signatures were made from: the files' identity (length and
/// modification time) and the policy's profiles.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Source {
    files: Vec<(PathBuf, u64, Option<std::time::SystemTime>)>,
    profiles: Vec<(String, Vec<String>)>,
    skip_invalid: bool,
}

impl Source {
    fn of(config: &InspectConfig, model: &Model) -> Source {
        let files = std::iter::once(&config.rules)
            .chain(config.classification.as_ref())
            .chain(config.threshold.as_ref())
            .map(|p| {
                let m = std::fs::metadata(p).ok();
                (
                    p.clone(),
                    m.as_ref().map_or(0, |m| m.len()),
                    m.and_then(|m| m.modified().ok()),
                )
            })
            .collect();
        Source {
            files,
            profiles: profiles_of(model),
            skip_invalid: config.skip_invalid,
        }
    }
}

fn profiles_of(model: &Model) -> Vec<(String, Vec<String>)> {
    model
        .policy
        .profiles
        .iter()
        .map(|p| (p.name.clone(), p.signatures.clone()))
        .collect()
}

impl core::fmt::Debug for Signatures {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Signatures")
            .field("rules", &self.rules.len())
            .field("profiles", &self.profiles)
            .field("refused", &self.refused)
            .finish()
    }
}

fn read_bounded(path: &Path) -> Result<String, InspectLoadError> {
    let err = |message: String| InspectLoadError::Read {
        path: path.to_path_buf(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    if meta.len() > MAX_RULES_FILE {
        return Err(err(format!(
            "{} bytes, more than the {MAX_RULES_FILE} allowed",
            meta.len()
        )));
    }
    std::fs::read_to_string(path).map_err(|e| err(e.to_string()))
}

impl Signatures {
    /// Read the `[inspect]` files and compile the profiles of `model`'s policy.
    pub fn load(config: &InspectConfig, model: &Model) -> Result<Signatures, InspectLoadError> {
        // Taken before reading: a file changed while it is read is read again next time.
        let source = Source::of(config, model);
        let rules = read_bounded(&config.rules)?;
        let classification = match &config.classification {
            Some(p) => Some((p.clone(), read_bounded(p)?)),
            None => None,
        };
        let classes = match &classification {
            Some((path, text)) => Classifications::parse(text).map_err(|e| InspectLoadError::Rules {
                path: path.clone(),
                message: e.to_string(),
            })?,
            None => Classifications::default(),
        };
        let thresholds = match &config.threshold {
            Some(p) => Some((p.clone(), read_bounded(p)?)),
            None => None,
        };
        let mut sigs = Self::compile_with(
            &rules,
            &config.rules,
            classes,
            config.skip_invalid,
            model,
            thresholds.as_ref().map(|(p, t)| (p.as_path(), t.as_str())),
        )?;
        sigs.source = source;
        Ok(sigs)
    }

    /// Whether loading `config` for `model` would compile the same
    /// signatures and profiles (the files unchanged, the profiles too).
    pub fn unchanged(&self, config: &InspectConfig, model: &Model) -> bool {
        !self.source.files.is_empty() && self.source == Source::of(config, model)
    }

    /// Compile rules text (`path` names it in errors) under `classes` for `model`'s profiles.
    pub fn compile(
        rules: &str,
        path: &Path,
        classes: Classifications,
        skip_invalid: bool,
        model: &Model,
    ) -> Result<Signatures, InspectLoadError> {
        Self::compile_with(rules, path, classes, skip_invalid, model, None)
    }

    /// As [`Signatures::compile`], applying a `threshold.config`'s text
    /// (with the path that names it in errors).
    pub fn compile_with(
        rules: &str,
        path: &Path,
        classes: Classifications,
        skip_invalid: bool,
        model: &Model,
        thresholds: Option<(&Path, &str)>,
    ) -> Result<Signatures, InspectLoadError> {
        let ctx = RuleContext {
            classifications: classes.clone(),
            ..RuleContext::default()
        };
        let mut set = RuleSet::parse(rules, &ctx, LoadOptions { skip_invalid }).map_err(|e| {
            let message = match &e {
                palisade_inspect::LoadError::Refused(errors) => format!(
                    "{} rule(s) refused (set skip_invalid to load the others); first: {}",
                    errors.len(),
                    errors.first().map(ToString::to_string).unwrap_or_default()
                ),
                other => other.to_string(),
            };
            InspectLoadError::Rules {
                path: path.to_path_buf(),
                message,
            }
        })?;
        if let Some((tpath, text)) = thresholds {
            let cfg =
                palisade_inspect::rules::threshold_config::ThresholdConfig::parse(text, &ctx.vars).map_err(|e| {
                    InspectLoadError::Rules {
                        path: tpath.to_path_buf(),
                        message: e.to_string(),
                    }
                })?;
            for line in set.apply_threshold_config(&cfg) {
                eprintln!(
                    "palisade agent: {}: line {line}: names no loaded signature; it changes nothing",
                    tpath.display()
                );
            }
        }
        let refused = set.refused().len();
        let mut specs = Vec::new();
        let mut profiles = HashMap::new();
        for p in model.policy.profiles.iter().filter(|p| !p.signatures.is_empty()) {
            let spec = profile_spec(p, &classes).map_err(|message| InspectLoadError::Profile {
                profile: p.name.clone(),
                message,
            })?;
            profiles.insert(p.name.clone(), ProfileId(specs.len() as u16));
            specs.push(spec);
        }
        let detectors = Inspector::compile(&set, specs).map_err(|e| InspectLoadError::Rules {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(Signatures {
            rules: Arc::new(set),
            detectors,
            profiles,
            refused,
            source: Source {
                profiles: profiles_of(model),
                ..Source::default()
            },
        })
    }

    /// Signatures loaded.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether no signature loaded.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The profile of policy profile `name`.
    pub fn profile(&self, name: &str) -> Option<ProfileId> {
        self.profiles.get(name).copied()
    }
}

/// The signature selection of a policy profile. Each entry of its
/// `signatures` list selects: `all` every signature; `critical` priority 1;
/// `standard` priorities 1 and 2; `priority:N` priorities 1 to N; `sid:N`
/// that signature; any other word the signatures of that classtype (which
/// must exist). A profile selects the union of its entries.
pub fn profile_spec(p: &Profile, classes: &Classifications) -> Result<ProfileSpec, String> {
    let mut spec = ProfileSpec {
        name: p.name.clone(),
        all: false,
        max_priority: None,
        classtypes: Vec::new(),
        sids: Vec::new(),
    };
    let widen = |spec: &mut ProfileSpec, n: u8| spec.max_priority = Some(spec.max_priority.map_or(n, |m| m.max(n)));
    for s in &p.signatures {
        match s.as_str() {
            "all" => spec.all = true,
            "critical" => widen(&mut spec, 1),
            "standard" => widen(&mut spec, 2),
            other => {
                if let Some(n) = other.strip_prefix("priority:") {
                    let n: u8 = n
                        .parse()
                        .ok()
                        .filter(|n| (1..=255).contains(n))
                        .ok_or_else(|| format!("`{other}`: a priority is 1 to 255"))?;
                    widen(&mut spec, n);
                } else if let Some(n) = other.strip_prefix("sid:") {
                    let sid: u32 = n.parse().map_err(|_| format!("`{other}`: a sid is a number"))?;
                    spec.sids.push(sid);
                } else if classes.get(other).is_some() {
                    spec.classtypes.push(other.to_string());
                } else {
                    return Err(format!(
                        "`{other}` is not all, critical, standard, priority:N, sid:N or a known classtype"
                    ));
                }
            }
        }
    }
    Ok(spec)
}

/// What inline inspection decided for a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InlineVerdict {
    /// Send it.
    Forward,
    /// Do not send it (the flow is dropped, or the budget is spent in a closed zone).
    Drop,
    /// Do not send it; send the reject reply to its sender.
    Reject,
}

/// Inline inspection's counters (one worker's, or the sum).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct InlineCounters {
    /// Frames inspected.
    pub packets: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Alerts raised.
    pub alerts: u64,
    /// Flows dropped by a `drop` signature.
    pub drops: u64,
    /// Flows rejected by a `reject` signature.
    pub rejects: u64,
    /// Frames forwarded uninspected: budget spent, zone `open`.
    pub bypassed: u64,
    /// Frames dropped uninspected: budget spent, zone `closed`.
    pub budget_drops: u64,
    /// Frames of a flow whose profile the loaded signatures lack.
    pub unknown_profile: u64,
    /// Frames the inspector could not decode (forwarded: the engine parsed them).
    pub undecodable: u64,
    /// Inspected flows forgotten to make room.
    pub flows_evicted: u64,
    /// Alert records over what the control thread had taken, not kept.
    pub alerts_discarded: u64,
    /// Of them, `drop`/`reject` alerts.
    pub blocked_discarded: u64,
    /// Repeated `alert`-only hits folded into an earlier record's `count`.
    pub alerts_coalesced: u64,
    /// Inspected flows taken over from another host with their state (live migration: [`carry`]).
    pub flows_migrated_in: u64,
    /// Of them, flows whose reassembly or parser state could not be taken and resumed mid-stream.
    pub migrated_midstream: u64,
    /// Migrated flows not taken over: their profile is unknown here (their frames are handled as any such flow's).
    pub migrated_unknown_profile: u64,
    /// Inspected flows' records sent to another host (live migration: pre-copy, delta or whole).
    pub flows_migrated_out: u64,
    /// Inspection sections from another host refused (nothing of them taken up).
    pub migration_sections_refused: u64,
}

impl InlineCounters {
    /// Add `o`'s counts.
    pub fn merge(&mut self, o: &InlineCounters) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.alerts += o.alerts;
        self.drops += o.drops;
        self.rejects += o.rejects;
        self.bypassed += o.bypassed;
        self.budget_drops += o.budget_drops;
        self.unknown_profile += o.unknown_profile;
        self.undecodable += o.undecodable;
        self.flows_evicted += o.flows_evicted;
        self.alerts_discarded += o.alerts_discarded;
        self.blocked_discarded += o.blocked_discarded;
        self.alerts_coalesced += o.alerts_coalesced;
        self.flows_migrated_in += o.flows_migrated_in;
        self.migrated_midstream += o.migrated_midstream;
        self.migrated_unknown_profile += o.migrated_unknown_profile;
        self.flows_migrated_out += o.flows_migrated_out;
        self.migration_sections_refused += o.migration_sections_refused;
    }
}

/// One alert, with both ends' identity: what `/alerts` serves, the audit
/// trail keeps and the controller gets (the audit crate's record, in EVE's
/// field names).
pub use palisade_audit::record::{AlertInfo, AlertRecord};

/// The alert records a worker raised since the control thread last took
/// them, and what it shed meanwhile.
#[derive(Debug, Default)]
pub struct TakenAlerts {
    /// The records, in the order raised (a coalesced one at its first hit).
    pub records: Vec<AlertRecord>,
    /// Alerts shed by the bound ([`WORKER_ALERTS`], [`WORKER_BLOCKED_ALERTS`]).
    pub shed: u64,
    /// Of them, `drop`/`reject` alerts.
    pub shed_blocked: u64,
    /// When the first was shed (Unix ns).
    pub shed_since_ns: Option<u64>,
}

impl TakenAlerts {
    /// What the audit trail keeps of them, made at `now_ns` (Unix) on
    /// `host`: first, when any were shed, one "alerts not recorded" record
    /// with their count; then each record.
    pub fn audit_records(&self, host: &str, now_ns: u64) -> Vec<palisade_audit::record::Record> {
        use palisade_audit::record::{AlertsNotRecorded, Record};
        let gap = (self.shed > 0).then(|| {
            Record::AlertsNotRecorded(AlertsNotRecorded {
                time_ns: now_ns,
                host: host.to_string(),
                count: self.shed,
                blocked: self.shed_blocked,
                since_ns: self.shed_since_ns.unwrap_or(now_ns),
            })
        });
        gap.into_iter()
            .chain(self.records.iter().cloned().map(Record::Alert))
            .collect()
    }

    /// Add `o`'s records and shed counts.
    pub fn merge(&mut self, o: TakenAlerts) {
        self.records.extend(o.records);
        self.shed += o.shed;
        self.shed_blocked += o.shed_blocked;
        self.shed_since_ns = match (self.shed_since_ns, o.shed_since_ns) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

/// A flow's key in the inspector's table: both directions alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    protocol: u8,
    lo: (IpAddr, u16),
    hi: (IpAddr, u16),
}

impl Key {
    fn of(p: &Packet<'_>) -> Key {
        let (sp, dp) = match p.transport {
            Transport::Icmp { echo_id: Some(id), .. } => (id, id),
            _ => p.ports(),
        };
        let (a, b) = ((p.src, sp), (p.dst, dp));
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        Key {
            protocol: p.protocol,
            lo,
            hi,
        }
    }
}

struct Tracked {
    state: FlowState,
    last: Duration,
    profile: Arc<str>,
    /// The worker's change generation when the flow's state last changed
    /// (a frame inspected, a migration's state taken up): a live
    /// migration's delta carries the flows changed since its pre-copy.
    changed: u64,
}

/// Identities of [`Inline`]s, so a pre-copy's mark taken on one is never
/// read against another's generations (a policy change that rebuilt it).
static INLINE_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A port's inspection budget: a token bucket of bytes, a second's worth deep.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: u64,
    at: u64,
}

impl Bucket {
    fn take(&mut self, rate: u64, now: u64, len: u64) -> bool {
        let elapsed = now.saturating_sub(self.at);
        self.at = now;
        let refill = (u128::from(rate) * u128::from(elapsed) / 1_000_000_000).min(u128::from(rate)) as u64;
        self.tokens = self.tokens.saturating_add(refill).min(rate);
        if self.tokens >= len {
            self.tokens -= len;
            true
        } else {
            false
        }
    }
}

/// What an [`Inline`] is built with.
#[derive(Clone)]
pub struct InlineSetup {
    /// The compiled signatures.
    pub signatures: Arc<Signatures>,
    /// Bytes per second per port (`None`: no limit).
    pub budget_bytes_per_s: Option<u64>,
    /// Stream memory a worker's flows may hold together.
    pub stream_memory: usize,
    /// Flows a worker tracks at most.
    pub max_flows: usize,
    /// By port id: whether the port's zone fails closed.
    pub fail_closed: Arc<[bool]>,
    /// The host's name (in alert records).
    pub host: Arc<str>,
    /// Engine time → Unix time.
    pub clock: Clock,
}

impl InlineSetup {
    /// The setup of `config`'s `[inspect]` with `signatures`.
    pub fn new(
        config: &InspectConfig,
        signatures: Arc<Signatures>,
        fail_closed: Arc<[bool]>,
        host: &str,
        clock: Clock,
    ) -> Self {
        InlineSetup {
            signatures,
            budget_bytes_per_s: config.budget_bytes_per_s,
            stream_memory: config.stream_memory_mib.map_or(64 << 20, |m| (m as usize) << 20),
            max_flows: config.max_flows.unwrap_or(DEFAULT_MAX_FLOWS),
            fail_closed,
            host: host.into(),
            clock,
        }
    }
}

/// One worker's inline inspection.
pub struct Inline {
    setup: InlineSetup,
    inspector: Inspector,
    flows: HashMap<Key, Tracked>,
    buckets: Vec<Bucket>,
    alerts: Vec<Alert>,
    counters: InlineCounters,
    pending: TakenAlerts,
    /// Blocked records in `pending`.
    pending_blocked: usize,
    /// `alert`-only records in `pending` by (flow, sid, direction): where a repeat is coalesced.
    coalesce: HashMap<(Key, u32, bool), usize>,
    /// The bounds on `pending`: `alert`-only records, `drop`/`reject` records.
    bounds: (usize, usize),
    /// This inspector's identity ([`INLINE_IDS`]).
    id: u64,
    /// Change generation, advanced by every change to a flow's state.
    generation: u64,
    /// Per vNIC arriving by live migration, the flows taken up from its
    /// pre-copy (and delta), not in `flows` until its commit ([`carry`]).
    staged: HashMap<String, HashMap<Key, Tracked>>,
    /// The names of this inspector's rules for migrated records, once built ([`carry`]).
    importer: Option<Arc<palisade_inspect::persist::FlowImporter>>,
}

impl core::fmt::Debug for Inline {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Inline")
            .field("flows", &self.flows.len())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Inline {
    /// A worker's inspector over `setup`'s signatures, in IPS mode (stream
    /// data inspected as it arrives; connections taken up mid-stream, as
    /// after a restart or a policy change).
    pub fn new(setup: InlineSetup) -> Inline {
        let config = Config {
            mode: Mode::Ips,
            inline_stream: true,
            midstream: true,
            stream_memory: setup.stream_memory,
            ..Config::default()
        };
        let sigs = &setup.signatures;
        let budget = MemoryBudget::new(setup.stream_memory);
        let inspector = Inspector::shared(sigs.rules.clone(), sigs.detectors.clone(), config, budget);
        Inline {
            setup,
            inspector,
            flows: HashMap::default(),
            buckets: Vec::new(),
            alerts: Vec::new(),
            counters: InlineCounters::default(),
            pending: TakenAlerts::default(),
            pending_blocked: 0,
            coalesce: HashMap::new(),
            bounds: (WORKER_ALERTS, WORKER_BLOCKED_ALERTS),
            id: INLINE_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            generation: 0,
            staged: HashMap::new(),
            importer: None,
        }
    }

    /// The same, holding at most `alerts` `alert`-only and `blocked`
    /// `drop`/`reject` records between takes (default [`WORKER_ALERTS`],
    /// [`WORKER_BLOCKED_ALERTS`]).
    pub fn with_alert_bounds(mut self, alerts: usize, blocked: usize) -> Inline {
        self.bounds = (alerts, blocked);
        self
    }

    /// Whether `setup` is this inspector's but for the ports' failure modes
    /// (same signatures): then [`Inline::update`] keeps the flows' detection state.
    pub fn same_signatures(&self, setup: &InlineSetup) -> bool {
        Arc::ptr_eq(&self.setup.signatures, &setup.signatures)
    }

    /// Take `setup`'s port failure modes and budget (same signatures).
    pub fn update(&mut self, setup: &InlineSetup) {
        self.setup.fail_closed = setup.fail_closed.clone();
        self.setup.budget_bytes_per_s = setup.budget_bytes_per_s;
    }

    /// Counters so far.
    pub fn counters(&self) -> InlineCounters {
        self.counters
    }

    /// The signature engine's own counters.
    pub fn engine_counters(&self) -> palisade_inspect::Counters {
        self.inspector.counters()
    }

    /// Flows tracked.
    pub fn flows(&self) -> usize {
        self.flows.len()
    }

    /// Take the alert records raised since the last call, with what was shed meanwhile.
    pub fn take_records(&mut self) -> TakenAlerts {
        self.coalesce.clear();
        self.pending_blocked = 0;
        std::mem::take(&mut self.pending)
    }

    /// Forget flows idle past their timeout (TCP ten minutes, others two).
    pub fn expire(&mut self, now: u64) {
        let now = Duration::from_nanos(now);
        let inspector = &mut self.inspector;
        self.flows.retain(|k, t| {
            let idle = if k.protocol == 6 { FLOW_IDLE } else { FLOW_IDLE / 5 };
            let keep = now.saturating_sub(t.last) < idle;
            if !keep {
                // Its held stream bytes go back to the worker's budget.
                inspector.release_flow_memory(&mut t.state);
            }
            keep
        });
    }

    /// Stream bytes this worker's flows hold (charged to its budget).
    pub fn stream_memory_in_use(&self) -> usize {
        self.inspector.stream_memory_in_use()
    }

    /// Inspect a forwarded frame (`p`, with an inspection profile) that
    /// arrived on `port` at engine time `now`. A drop or reject is applied
    /// to the engine's flow here; the caller sends the frame only on
    /// [`InlineVerdict::Forward`], and the reply ([`Processed::reject_reply`])
    /// on [`InlineVerdict::Reject`].
    pub fn frame(
        &mut self,
        engine: &mut Engine,
        p: &Processed<'_>,
        port: PortId,
        now: u64,
        identities: &Identities,
        sink: &mut dyn EventSink,
    ) -> InlineVerdict {
        let Some(id) = p.inspection() else {
            return InlineVerdict::Forward;
        };
        let closed = self
            .setup
            .fail_closed
            .get(usize::from(port.0))
            .copied()
            .unwrap_or(false);
        let inner = p.inner_frame();
        // The profile by name: the engine numbers them, the signatures name them.
        let profile = engine
            .inspection_profile_name(id)
            .and_then(|n| Some((self.setup.signatures.profile(n)?, n)));
        let Some((profile, name)) = profile else {
            self.counters.unknown_profile += 1;
            return self.uninspected(engine, port, closed);
        };
        if let Some(rate) = self.setup.budget_bytes_per_s {
            let i = usize::from(port.0);
            if self.buckets.len() <= i {
                // A port starts with a full second's worth.
                self.buckets.resize(i + 1, Bucket { tokens: rate, at: now });
            }
            if !self.buckets[i].take(rate, now, inner.len() as u64) {
                return self.uninspected(engine, port, closed);
            }
        }
        let decoded = decode::decode(LinkType::ETHERNET, inner, false);
        let Some(pkt) = decoded.packets.first() else {
            self.counters.undecodable += 1;
            return InlineVerdict::Forward;
        };
        self.counters.packets += 1;
        self.counters.bytes += inner.len() as u64;
        let t = Duration::from_nanos(now);
        let key = Key::of(pkt);
        if !self.flows.contains_key(&key) && self.flows.len() >= self.setup.max_flows {
            self.make_room(t);
        }
        self.generation += 1;
        let generation = self.generation;
        let tracked = self.flows.entry(key).or_insert_with(|| Tracked {
            state: FlowState::new(profile, pkt),
            last: t,
            profile: name.into(),
            changed: generation,
        });
        if tracked.state.profile() != profile || *tracked.profile != *name {
            // The policy changed the flow's profile: detection starts over under the new one.
            let old = std::mem::replace(
                tracked,
                Tracked {
                    state: FlowState::new(profile, pkt),
                    last: t,
                    profile: name.into(),
                    changed: generation,
                },
            );
            self.inspector.discard_flow(old.state);
        }
        tracked.last = t;
        tracked.changed = generation;
        self.alerts.clear();
        let outcome = self.inspector.inspect(&mut tracked.state, pkt, t, &mut self.alerts);
        let verdict = match outcome {
            Outcome::Pass | Outcome::Alert => InlineVerdict::Forward,
            Outcome::Drop(_) => InlineVerdict::Drop,
            Outcome::Reject(_) => InlineVerdict::Reject,
        };
        // Records need the flow's ends; the state is borrowed from the table.
        let (client, server) = (tracked.state.client(), tracked.state.server());
        let profile_name = tracked.profile.clone();
        if !self.alerts.is_empty() {
            let flow = FlowOf {
                key,
                client,
                server,
                profile: &profile_name,
            };
            self.record_alerts(engine, inner, pkt, flow, now, identities);
        }
        if verdict != InlineVerdict::Forward {
            if verdict == InlineVerdict::Drop {
                self.counters.drops += 1;
            } else {
                self.counters.rejects += 1;
            }
            self.block(engine, inner, port, now, sink);
        }
        verdict
    }

    /// A frame not inspected (budget spent, or its profile unknown): bypassed
    /// in an open zone, dropped in a closed one.
    fn uninspected(&mut self, engine: &mut Engine, port: PortId, closed: bool) -> InlineVerdict {
        if !closed {
            self.counters.bypassed += 1;
            return InlineVerdict::Forward;
        }
        self.counters.budget_drops += 1;
        // Only this frame: the flow itself did nothing wrong (TCP sends it again).
        engine.inspection_discard(port, 1);
        InlineVerdict::Drop
    }

    /// Turn the flow of `inner` into a drop in the engine.
    fn block(&mut self, engine: &mut Engine, inner: &[u8], port: PortId, now: u64, sink: &mut dyn EventSink) {
        if let Ok(Some(info)) = palisade_wire::flow::extract(inner) {
            engine.inspection_drop(&info.key, now, port, 1, sink);
        }
    }

    /// Forget the least recently seen flow (a scan: only when the table is full).
    fn make_room(&mut self, now: Duration) {
        self.expire(now.as_nanos() as u64);
        if self.flows.len() < self.setup.max_flows {
            return;
        }
        if let Some(oldest) = self.flows.iter().min_by_key(|(_, t)| t.last).map(|(k, _)| *k) {
            if let Some(t) = self.flows.remove(&oldest) {
                self.inspector.discard_flow(t.state);
            }
            self.counters.flows_evicted += 1;
        }
    }

    fn record_alerts(
        &mut self,
        engine: &Engine,
        inner: &[u8],
        pkt: &Packet<'_>,
        flow: FlowOf<'_>,
        now: u64,
        identities: &Identities,
    ) {
        let time_ns = self.setup.clock.unix(now);
        // The connection's id and deciding rules, looked up once per frame with alerts.
        let mut conn: Option<(u64, Vec<palisade_audit::record::Decision>)> = None;
        for i in 0..self.alerts.len() {
            let a = self.alerts[i];
            self.counters.alerts += 1;
            let blocked = a.action == AlertAction::Blocked;
            let sig = self.inspector.rules().get(a.sig);
            let sid = sig.rule.sid;
            let to_server = a.direction == Direction::ToServer;
            if !blocked && let Some(&at) = self.coalesce.get(&(flow.key, sid, to_server)) {
                let r = &mut self.pending.records[at];
                r.count += 1;
                r.last_ns = time_ns;
                self.counters.alerts_coalesced += 1;
                continue;
            }
            let full = if blocked {
                self.pending_blocked >= self.bounds.1
            } else {
                self.pending.records.len() - self.pending_blocked >= self.bounds.0
            };
            if full {
                self.counters.alerts_discarded += 1;
                self.pending.shed += 1;
                self.pending.shed_since_ns.get_or_insert(time_ns);
                if blocked {
                    self.counters.blocked_discarded += 1;
                    self.pending.shed_blocked += 1;
                }
                continue;
            }
            let (flow_id, decided_by) = conn.get_or_insert_with(|| connection_of(engine, inner)).clone();
            let ((src_ip, src_port), (dest_ip, dest_port)) = if to_server {
                (flow.client, flow.server)
            } else {
                (flow.server, flow.client)
            };
            let rule = &sig.rule;
            let record = AlertRecord {
                timestamp: palisade_audit::time::format_rfc3339(time_ns),
                time_ns,
                host: self.setup.host.to_string(),
                flow_id,
                proto: proto_name(pkt.protocol),
                src_ip,
                src_port,
                dest_ip,
                dest_port,
                alert: AlertInfo {
                    action: if blocked { "blocked" } else { "allowed" }.into(),
                    rule_action: rule.action.as_str().into(),
                    signature_id: sid,
                    rev: rule.rev,
                    signature: rule.msg.clone(),
                    category: self.inspector.rules().category(a.sig).map(str::to_string),
                    severity: sig.priority,
                },
                profile: flow.profile.to_string(),
                decided_by,
                src: identities.of(src_ip).cloned(),
                dest: identities.of(dest_ip).cloned(),
                count: 1,
                last_ns: time_ns,
            };
            if blocked {
                self.pending_blocked += 1;
            } else {
                self.coalesce
                    .insert((flow.key, sid, to_server), self.pending.records.len());
            }
            self.pending.records.push(record);
        }
    }
}

/// The inspected flow an alert is about.
#[derive(Clone, Copy)]
struct FlowOf<'a> {
    key: Key,
    client: (IpAddr, u16),
    server: (IpAddr, u16),
    profile: &'a str,
}

/// The engine's connection of frame `inner`: its flow id (as its flow
/// records have it) and the rules that allowed it; `(0, [])` when the
/// engine no longer tracks it.
fn connection_of(engine: &Engine, inner: &[u8]) -> (u64, Vec<palisade_audit::record::Decision>) {
    let Ok(Some(info)) = palisade_wire::flow::extract(inner) else {
        return (0, Vec::new());
    };
    let mut key = info.key;
    key.segment = palisade_datapath::ROUTING_DOMAIN;
    let conns = engine.conntrack();
    match conns.find(&key).and_then(|slot| conns.get(slot)) {
        Some(c) => (
            crate::records::flow_id_of(&c.key, c.created),
            crate::records::decisions(engine, &c.rules, c.policy_version),
        ),
        None => (0, Vec::new()),
    }
}

fn proto_name(p: u8) -> String {
    match p {
        6 => "TCP".into(),
        17 => "UDP".into(),
        1 => "ICMP".into(),
        58 => "IPv6-ICMP".into(),
        n => n.to_string(),
    }
}

/// The agent's recent alerts, bounded: what `/alerts` serves.
#[derive(Debug, Default)]
pub struct AlertRing {
    ring: VecDeque<AlertRecord>,
    /// Alerts pushed out of the ring by newer ones.
    pub overwritten: u64,
}

impl AlertRing {
    /// Keep `rec`, forgetting the oldest beyond [`ALERT_RING`].
    pub fn push(&mut self, rec: AlertRecord) {
        if self.ring.len() == ALERT_RING {
            self.ring.pop_front();
            self.overwritten += 1;
        }
        self.ring.push_back(rec);
    }

    /// The alerts kept, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &AlertRecord> {
        self.ring.iter()
    }

    /// How many are kept.
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }
}
