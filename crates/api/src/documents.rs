//! The JSON documents of the HTTP API, shared by the server and the client.
//!
//! They are also the stored form: a [`VersionRecord`] is what the store keeps
//! under `policy/versions/…`, the [`CurrentRecord`] is the compare-and-swapped
//! pointer every change goes through, so the two ends and the store can never
//! disagree on a field's meaning.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::bundle::PolicyBundle;
use crate::roles::{Revocation, Role};
pub use crate::sources::{Files, TagOverlay};
use crate::validate::{
    MAX_AGENT_VERSION_CHARS, MAX_COUNTER_NAME_CHARS, MAX_COUNTERS, MAX_MESSAGE_CHARS, MAX_TAGS_PER_REQUEST, Quoted,
    RequestError, check_files, check_hex, check_tag_key, check_tag_value, check_text, check_token_name, public_key,
};

/// One stored policy version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// The version number (1, 2, …).
    pub version: u64,
    /// Who made it (token name).
    pub author: String,
    /// When (Unix time, nanoseconds).
    pub time_ns: u64,
    /// The author's message.
    pub message: String,
    /// The files.
    pub files: Files,
    /// The version this one restored, for a rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<u64>,
}

/// A version without its files, for history listings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionSummary {
    /// The version number.
    pub version: u64,
    /// Who made it.
    pub author: String,
    /// When (Unix time, nanoseconds).
    pub time_ns: u64,
    /// The author's message.
    pub message: String,
    /// The version this one restored, for a rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<u64>,
}

impl From<&VersionRecord> for VersionSummary {
    fn from(v: &VersionRecord) -> VersionSummary {
        VersionSummary {
            version: v.version,
            author: v.author.clone(),
            time_ns: v.time_ns,
            message: v.message.clone(),
            rollback_of: v.rollback_of,
        }
    }
}

/// The current effective policy: which version, which tag overlay, and the
/// revision that any change of either bumps (agents watch the revision).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrentRecord {
    /// Effective-policy revision: +1 on every apply, rollback or tag change.
    pub revision: u64,
    /// The current version (0: none applied yet).
    pub version: u64,
    /// The tag overlay.
    #[serde(default)]
    pub tags: TagOverlay,
    /// Where VMs run now when that is not the host the files give: VM name
    /// → host, written by a completed or detected live migration (see
    /// [`crate::migration`]). The location overlay, like the tag overlay,
    /// survives new versions for the VMs they still have.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub locations: std::collections::BTreeMap<String, String>,
}

/// `POST /v1/policy` and `POST /v1/policy/diff`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyRequest {
    /// The files.
    pub files: Files,
    /// Why (kept in the version's metadata).
    #[serde(default)]
    pub message: String,
}

/// The answer to an apply (also a dry run).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResponse {
    /// The new version (for a dry run: the version it would get).
    pub version: u64,
    /// The new effective revision (for a dry run: the one it would get).
    pub revision: u64,
    /// Whether this was a dry run (nothing stored).
    pub dry_run: bool,
    /// Warnings of the loader, rendered.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub warnings: String,
}

/// One vNIC chain that a change modifies.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChainChange {
    /// The vNIC.
    pub vnic: String,
    /// `egress` or `ingress`.
    pub direction: String,
    /// `added`, `removed` or `changed`.
    pub change: String,
}

/// The answer to `POST /v1/policy/diff`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffResponse {
    /// The current version compared against.
    pub base_version: u64,
    /// Unified diff of the files (empty when identical).
    pub diff: String,
    /// The compiled chains that would change.
    pub chains: Vec<ChainChange>,
}

/// `GET /v1/policy`: the current effective policy.
pub type CurrentPolicy = PolicyBundle;

/// `PUT /v1/vms/{name}/tags`.
///
/// Decoding refuses what the document's schema refuses: neither field
/// given, a key removed twice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "TagRequestWire")]
pub struct TagRequest {
    /// Tags to set.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Tag keys to remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A [`TagRequest`] as it comes, telling a field left out from one given empty.
#[derive(Deserialize)]
struct TagRequestWire {
    #[serde(default, deserialize_with = "given")]
    set: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "given")]
    remove: Option<Vec<String>>,
}

/// A field that, when present, holds a `T` (not `null`): `None` only when left out.
fn given<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

impl TryFrom<TagRequestWire> for TagRequest {
    type Error = String;
    fn try_from(w: TagRequestWire) -> Result<TagRequest, String> {
        if w.set.is_none() && w.remove.is_none() {
            return Err("nothing to set or remove: give `set`, `remove` or both".into());
        }
        let remove = w.remove.unwrap_or_default();
        let mut seen = std::collections::BTreeSet::new();
        if let Some(k) = remove.iter().find(|k| !seen.insert(k.as_str())) {
            return Err(format!("`remove` names tag {} twice", Quoted(k)));
        }
        Ok(TagRequest {
            set: w.set.unwrap_or_default(),
            remove,
        })
    }
}

/// The answer to a tag change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagResponse {
    /// The VM.
    pub vm: String,
    /// Its effective tags now.
    pub tags: BTreeMap<String, String>,
    /// The new effective revision.
    pub revision: u64,
    /// The chains the retag changed.
    pub chains: Vec<String>,
}

/// One VM as `GET /v1/vms` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Name.
    pub name: String,
    /// UUID.
    pub uuid: String,
    /// Cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Effective tags (files + overlay).
    pub tags: BTreeMap<String, String>,
    /// vNIC names.
    pub vnics: Vec<String>,
}

/// One host as `GET /v1/hosts` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// Host name.
    pub name: String,
    /// Its cluster, when the inventory places it in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// VMs the inventory places on it.
    pub vms: Vec<String>,
    /// Its agent, when one registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentRecord>,
    /// Its datapath's health (state, reason, last report), once its agent reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<crate::health::HostHealth>,
}

/// An agent as the controller knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// Host name.
    pub host: String,
    /// First registration (Unix time, nanoseconds).
    pub registered_ns: u64,
    /// Last register or report (Unix time, nanoseconds).
    pub last_seen_ns: u64,
    /// The effective revision it last reported installed.
    pub installed_revision: u64,
    /// Its agent version string.
    #[serde(default)]
    pub agent_version: String,
    /// Its last reported counters.
    #[serde(default)]
    pub counters: BTreeMap<String, u64>,
}

/// `POST /v1/agents/{host}/register`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// The agent's software version.
    #[serde(default)]
    pub agent_version: String,
    /// The public key of the agent's audit trail (64 hex digits). The
    /// controller pins the first key a host registers (trust on first use)
    /// and refuses another one (409) until an admin replaces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_public_key: Option<String>,
}

/// `POST /v1/agents/{host}/report`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportRequest {
    /// The effective revision installed.
    pub installed_revision: u64,
    /// Counters (drops, flows, …).
    #[serde(default)]
    pub counters: BTreeMap<String, u64>,
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRequest {
    /// The token's name (the actor of its changes).
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// The answer to `POST /v1/tokens`: the only time the secret is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenResponse {
    /// The token's name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// The secret.
    pub token: String,
}

/// A token as `GET /v1/tokens` lists it: never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// A short prefix of the store key (a hash of the secret): tells tokens of one name apart.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// When it was created (Unix time, nanoseconds).
    pub created_ns: u64,
    /// When and by whom it was revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<Revocation>,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
    /// Rendered diagnostics (`file:line:col: …`), for an invalid policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnostics: Option<String>,
}

/// The most flow records one `POST /v1/agents/{host}/flows` may carry.
pub const MAX_FLOW_BATCH: usize = 10_000;
/// The default number of records `GET /v1/flows` returns.
pub const DEFAULT_FLOW_LIMIT: usize = 1000;
/// The most records `GET /v1/flows` returns.
pub const MAX_FLOW_LIMIT: usize = 100_000;

/// `POST /v1/agents/{host}/flows`: flow records of that host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowBatch {
    /// The records, each with `host` equal to the path's host (at most [`MAX_FLOW_BATCH`]).
    pub records: Vec<palisade_audit::record::FlowRecord>,
}

/// The answer to a flow push: how many records were appended, durably.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowPushResponse {
    /// Records appended.
    pub appended: u64,
    /// The sequence number of the last one in the controller's audit log.
    pub last_seq: u64,
}

/// `GET /v1/flows` filters; every filter given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowQuery {
    /// A VM at either end of a flow (or the VM a change concerns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// A zone at either end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<palisade_audit::record::Verdict>,
    /// A deciding rule id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Records at or after this time (Unix ns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ns: Option<u64>,
    /// Records before this time (Unix ns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ns: Option<u64>,
    /// At most this many (default [`DEFAULT_FLOW_LIMIT`], at most [`MAX_FLOW_LIMIT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Include change records (default: flows only).
    #[serde(default)]
    pub changes: bool,
}

/// One record of the trail with its sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqRecord {
    /// Its sequence number in the controller's audit log.
    pub seq: u64,
    /// The record.
    pub record: palisade_audit::record::Record,
}

/// The answer to `GET /v1/flows`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowList {
    /// The matching records in sequence order.
    pub records: Vec<SeqRecord>,
}

/// The most alerts one `POST /v1/agents/{host}/alerts` may carry.
pub const MAX_ALERT_BATCH: usize = 2_000;
/// The alerts the controller keeps per host (the oldest go first).
pub const ALERTS_PER_HOST: usize = 20_000;
/// The hosts whose alerts the controller keeps (a push from a new host
/// past it forgets the host pushed to least recently).
pub const MAX_ALERT_HOSTS: usize = 4_096;
/// The largest alert record accepted, encoded as JSON (413 above).
pub const MAX_ALERT_RECORD_BYTES: usize = 16 << 10;
/// The alerts the controller keeps, all hosts together, in encoded bytes:
/// past it the host holding the most loses its oldest.
pub const MAX_ALERT_BYTES: usize = 256 << 20;
/// The default number of alerts `GET /v1/alerts` returns.
pub const DEFAULT_ALERT_LIMIT: usize = 1000;
/// The most alerts `GET /v1/alerts` returns.
pub const MAX_ALERT_LIMIT: usize = 20_000;

/// `POST /v1/agents/{host}/alerts`: inline inspection's alerts of that host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertBatch {
    /// The alerts, each with `host` equal to the path's host (at most [`MAX_ALERT_BATCH`]).
    pub records: Vec<palisade_audit::record::AlertRecord>,
}

/// The answer to an alert push.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertPushResponse {
    /// Alerts taken.
    pub accepted: u64,
    /// Alerts the controller now keeps for the host.
    pub kept: u64,
    /// The host's alerts forgotten since the controller started to make
    /// room (each host keeps its newest [`ALERTS_PER_HOST`]).
    pub evicted: u64,
}

/// `GET /v1/alerts` filters; every filter given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertQuery {
    /// The host that raised it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// A VM at either end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// The signature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<u32>,
    /// `allowed` or `blocked`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Alerts at or after this time (Unix ns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ns: Option<u64>,
    /// Alerts before this time (Unix ns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ns: Option<u64>,
    /// At most this many, the newest (default [`DEFAULT_ALERT_LIMIT`], at most [`MAX_ALERT_LIMIT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// The answer to `GET /v1/alerts`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertList {
    /// The matching alerts, oldest first (of the newest `limit`).
    pub alerts: Vec<palisade_audit::record::AlertRecord>,
    /// Whether more matched than `limit` (the oldest were left out).
    pub truncated: bool,
}

/// What the controller did with the alerts agents pushed (in [`ControllerStatus`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertCounts {
    /// Alerts received since the controller started.
    pub received: u64,
    /// Alerts kept now, all hosts.
    pub kept: u64,
    /// Alerts forgotten to make room (per-host bound, or a host forgotten).
    pub evicted: u64,
    /// Hosts with alerts kept.
    pub hosts: u64,
    /// The encoded bytes of the alerts kept (at most [`MAX_ALERT_BYTES`]).
    #[serde(default)]
    pub bytes: u64,
}

/// `GET /v1/status`: how this controller is doing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerStatus {
    /// Its audit trail, when it keeps one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<TrailStatus>,
    /// How it compiled the effective policy for tag changes since it started.
    #[serde(default)]
    pub compiles: CompileCounts,
    /// The alerts agents pushed to it (kept in memory, per host).
    #[serde(default)]
    pub alerts: AlertCounts,
}

/// How a controller came by the compiled effective policy a tag change
/// starts from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompileCounts {
    /// Kept from the revision before (this controller made it).
    pub kept: u64,
    /// Brought up from an earlier revision of the same version by retagging
    /// the VMs whose tags changed since (made through other controllers).
    pub caught_up: u64,
    /// Compiled whole (after a new version, or at start).
    pub whole: u64,
}

/// A signed head of an audit trail: its latest signed checkpoint and the
/// key that signed it, binary fields in hex. The same document as the head
/// file a trail's writer keeps (`palisade audit verify --expect-head`), and
/// the body of `PUT /v1/agents/{host}/audit-head`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadDocument {
    /// The last record it covers.
    pub seq: u64,
    /// That record's chain hash (64 hex digits).
    pub hash: String,
    /// When it was signed (Unix time, nanoseconds).
    pub time_ns: u64,
    /// The checkpoint's ed25519 signature (128 hex digits).
    pub signature: String,
    /// The trail's public key (64 hex digits).
    pub public_key: String,
}

impl HeadDocument {
    /// The document of `head`.
    pub fn of(head: &palisade_audit::SignedHead) -> HeadDocument {
        HeadDocument {
            seq: head.seq,
            hash: crate::validate::hex(&head.hash),
            time_ns: head.time_ns,
            signature: crate::validate::hex(&head.signature),
            public_key: crate::validate::hex(&head.public_key),
        }
    }
}

/// A head a controller refused for a host: kept as evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadConflict {
    /// The head refused.
    pub head: HeadDocument,
    /// When it came (Unix time, nanoseconds).
    pub received_ns: u64,
    /// A rollback or a fork.
    pub kind: HeadConflictKind,
    /// Why: a lower seq than the head held (a rollback), or the same seq
    /// with another hash (a fork).
    pub reason: String,
}

/// Why a head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadConflictKind {
    /// Its seq is behind the head held: the trail was rolled back.
    Rollback,
    /// Its seq is the head held's, its hash another: two histories were signed.
    Fork,
}

/// A public key a controller refused for a host (another than the one pinned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedKey {
    /// The key offered (64 hex digits).
    pub public_key: String,
    /// When (Unix time, nanoseconds).
    pub time_ns: u64,
}

/// What a controller holds for one audit trail: `GET
/// /v1/agents/{host}/audit-head` (an agent's) and `GET /v1/audit/head`
/// (its own). Also the stored form of an agent's, under
/// `audit-heads/<host>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHeadInfo {
    /// The pinned public key (64 hex digits).
    pub public_key: String,
    /// When it was pinned (Unix time, nanoseconds).
    #[serde(default)]
    pub pinned_ns: u64,
    /// The newest head accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<HeadDocument>,
    /// Heads refused as a rollback or a fork, the first
    /// [`crate::validate::MAX_HEAD_CONFLICTS`] kept.
    #[serde(default)]
    pub conflicts: Vec<HeadConflict>,
    /// Conflicts seen in all, the ones not kept included.
    #[serde(default)]
    pub conflicts_seen: u64,
    /// Other keys offered for the host, the first
    /// [`crate::validate::MAX_HEAD_CONFLICTS`] kept.
    #[serde(default)]
    pub refused_keys: Vec<RefusedKey>,
}

/// `PUT /v1/agents/{host}/audit-key` (admin): replace the host's pinned key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditKeyRequest {
    /// The new public key (64 hex digits).
    pub public_key: String,
}

/// What a trail reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrailStatus {
    /// The log directory.
    pub dir: PathBuf,
    /// The last record's sequence number.
    pub last_seq: u64,
    /// Change records that could not be appended since the start (each
    /// counted once, however often it is tried again).
    pub append_failures: u64,
    /// Committed changes not in the trail yet (0 or 1: a controller accepts
    /// no change while its last one is missing from its trail).
    #[serde(default)]
    pub unaudited: u64,
    /// The last such failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The last record covered by a signed checkpoint.
    #[serde(default)]
    pub signed_seq: u64,
    /// The last head published (to the head file and the store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_seq: Option<u64>,
    /// Records after the last checkpoint (the unsigned window now).
    #[serde(default)]
    pub unsigned_records: u64,
    /// Head publications that failed since the start.
    #[serde(default)]
    pub publish_failures: u64,
}

// The checks each request document passes (the limits and the checks of
// single fields are `validate`'s).

impl ApplyRequest {
    /// Check the files ([`check_files`]) and the message.
    pub fn check(&self) -> Result<(), RequestError> {
        check_files(&self.files)?;
        check_text("message", &self.message, 0, MAX_MESSAGE_CHARS)
    }
}

impl TokenRequest {
    /// Check the name ([`check_token_name`]).
    pub fn check(&self) -> Result<(), RequestError> {
        check_token_name(&self.name)
    }
}

impl HeadDocument {
    /// The head it describes, each field checked ([`check_hex`],
    /// [`public_key`]); whether its signature verifies is the caller's
    /// question.
    pub fn to_head(&self) -> Result<palisade_audit::SignedHead, RequestError> {
        Ok(palisade_audit::SignedHead {
            seq: self.seq,
            hash: check_hex::<32>("hash", &self.hash)?,
            time_ns: self.time_ns,
            signature: check_hex::<64>("signature", &self.signature)?,
            public_key: public_key("public_key", &self.public_key)?,
        })
    }
}

impl ReportRequest {
    /// Check the counters: at most [`MAX_COUNTERS`], each name printable,
    /// 1 to [`MAX_COUNTER_NAME_CHARS`] characters.
    pub fn check(&self) -> Result<(), RequestError> {
        if self.counters.len() > MAX_COUNTERS {
            return Err(RequestError::too_large(format!(
                "{} counters; the limit is {MAX_COUNTERS}",
                self.counters.len()
            )));
        }
        for k in self.counters.keys() {
            check_text("counter name", k, 1, MAX_COUNTER_NAME_CHARS).map_err(RequestError::on_key)?;
        }
        Ok(())
    }
}

impl TagRequest {
    /// Check the keys and values: at most [`MAX_TAGS_PER_REQUEST`] set and
    /// as many removed, each key ([`check_tag_key`]) and value
    /// ([`check_tag_value`]) printable and within its length, no key both
    /// set and removed.
    pub fn check(&self) -> Result<(), RequestError> {
        if self.set.is_empty() && self.remove.is_empty() {
            return Err(RequestError::unprocessable("nothing to set or remove".into()));
        }
        for (what, n) in [("set", self.set.len()), ("removed", self.remove.len())] {
            if n > MAX_TAGS_PER_REQUEST {
                return Err(RequestError::too_large(format!(
                    "{n} tags {what} in one request; the limit is {MAX_TAGS_PER_REQUEST}"
                )));
            }
        }
        for k in &self.remove {
            check_tag_key(k)?;
        }
        for (k, v) in &self.set {
            check_tag_key(k).map_err(RequestError::on_key)?;
            check_tag_value(k, v)?;
        }
        if let Some(k) = self.remove.iter().find(|k| self.set.contains_key(*k)) {
            return Err(RequestError::unprocessable(format!(
                "tag {} is both set and removed",
                Quoted(k)
            )));
        }
        Ok(())
    }
}

impl RegisterRequest {
    /// Check the agent version string (printable, at most
    /// [`MAX_AGENT_VERSION_CHARS`]) and the audit public key, if given
    /// ([`public_key`]).
    pub fn check(&self) -> Result<(), RequestError> {
        check_text("agent_version", &self.agent_version, 0, MAX_AGENT_VERSION_CHARS)?;
        if let Some(k) = &self.audit_public_key {
            public_key("audit_public_key", k)?;
        }
        Ok(())
    }
}

impl AuditKeyRequest {
    /// Check the key ([`public_key`]).
    pub fn check(&self) -> Result<[u8; 32], RequestError> {
        public_key("public_key", &self.public_key)
    }
}
