//! A vNIC's inspected flows moving with its VM (live migration).
//!
//! Each worker's [`Inline`] holds the detection state of the flows steered
//! to it ([`palisade_inspect::FlowState`]: reassembly, application-layer
//! parsers, flowbits, thresholds, the flow's verdict). In the guest's pause
//! the source exports, per worker, the state of the inspected flows of the
//! vNIC's connections ([`Inline::export_vnic_flows`], one
//! [`palisade_inspect::persist`] record each) into one *inspection
//! section* ([`encode`]), a blob apart from the connection-state blob
//! (whose format and size per connection it leaves alone); the destination
//! verifies it whole ([`decode`]) and hands each flow to the worker its
//! connection is steered to (the conntrack split's steering), all or
//! nothing ([`import`]): a refused section changes nothing there, and the
//! migration aborts as for a refused connection blob, the source keeping
//! everything.
//!
//! Between agents with the agent-to-agent channel ([`crate::peer`]) the
//! section moves in two steps, as the connections do: a *pre-copy* of every
//! inspected flow while the guest runs ([`Inline::precopy_vnic_flows`]),
//! which the destination decodes and holds apart from its live table
//! ([`stage`]); then in the guest's pause a *delta*
//! ([`Inline::delta_vnic_flows`]): the flows whose state changed since
//! (each worker keeps a change generation per flow), the flows new since,
//! and the keys of the flows gone since. The destination applies the delta
//! over what it holds, all or nothing, and the flows join its live table
//! only when the vNIC's connections are committed ([`commit_staged`]): a
//! commit refused, or a session that ends without one, leaves none of them
//! behind ([`discard_staged`]). A delta one worker cannot tell apart (its
//! inspector was rebuilt since the pre-copy) goes whole instead, replacing
//! what the destination holds.
//!
//! A flow whose profile the destination's signatures lack is not imported
//! (counted): its next frame meets the destination exactly as any flow of
//! an unknown profile does (forwarded uninspected in an `open` zone,
//! dropped in a `closed` one). One whose held bytes the destination cannot
//! take is resumed mid-stream (counted), see [`palisade_inspect::persist`].
//!
//! Layout (big-endian), version 2 (version 1, still read, is a whole
//! section without the kind byte and the removed list):
//!
//! ```text
//! magic "PLSINS" | version u16 | kind u8 (0 whole, 1 pre-copy, 2 delta)
//! | name_len u16 | name | count u32
//! | count × (protocol u8 | lo: family u8 (4|6), address, port u16 | hi: same
//!            | idle_ns u64 | record_len u32 | record)
//! | removed u32 (0 but in a delta) | removed × (protocol u8 | lo | hi)
//! | crc32 u32 (over everything before it)
//! ```
//!
//! A key appears at most once in a section (flows and removed together).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use palisade_datapath::Engine;
use palisade_datapath::port::PortId;
use palisade_inspect::persist::{self, PersistError};

use super::{Inline, Key, Tracked};

const MAGIC: &[u8; 6] = b"PLSINS";
/// The section format version this build writes (it reads 1 and 2).
pub const VERSION: u16 = 2;
/// The version without kinds (a whole section), still read.
const VERSION_WHOLE_ONLY: u16 = 1;
/// Most flows a section may claim (bounds what an untrusted count allocates).
pub const MAX_FLOWS: u32 = 1 << 20;

/// Why an inspection section was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SectionError {
    /// The section ends inside a field.
    #[error("inspection section truncated: {field} at offset {offset}")]
    Truncated {
        /// The field.
        field: &'static str,
        /// Where it starts.
        offset: usize,
    },
    /// Not an inspection section.
    #[error("not a Palisade inspection section (bad magic)")]
    BadMagic,
    /// A version this build does not read.
    #[error("inspection section version {0} is not one this build reads (it reads version {VERSION})")]
    UnknownVersion(u16),
    /// Corrupted in transit.
    #[error("inspection section checksum mismatch: expected {expected:#010x}, computed {computed:#010x}")]
    Checksum {
        /// The checksum it carries.
        expected: u32,
        /// The checksum of its contents.
        computed: u32,
    },
    /// Made for another vNIC.
    #[error("inspection section of vNIC {found:?} sent for {expected:?}")]
    ForeignVnic {
        /// The vNIC it was sent for.
        expected: String,
        /// The vNIC it names.
        found: String,
    },
    /// A field with a value it cannot have.
    #[error("inspection section: {field} at offset {offset} is invalid ({value})")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Where it is.
        offset: usize,
        /// Its value.
        value: u64,
    },
    /// Bytes between the last flow and the checksum.
    #[error("inspection section: {0} bytes after its last flow")]
    Trailing(usize),
    /// A flow named twice (in its flows, or in its flows and removed keys).
    #[error("inspection section: the flow at offset {offset} is named twice")]
    Duplicate {
        /// Where its second mention starts.
        offset: usize,
    },
    /// A delta for a vNIC whose pre-copy is not held here.
    #[error("inspection delta of vNIC {0:?} without a staged pre-copy")]
    NoStagedCopy(String),
    /// A delta removing a flow its pre-copy did not hold.
    #[error("inspection delta: removed flow {index} names a flow the pre-copy did not hold")]
    UnknownFlow {
        /// Its position among the delta's removed keys.
        index: usize,
    },
    /// A section of a kind the operation does not take (a pre-copy or delta
    /// given to a whole import).
    #[error("inspection section: a {found} where a {expected} was expected")]
    WrongKind {
        /// The kind taken.
        expected: &'static str,
        /// The section's kind.
        found: &'static str,
    },
    /// A flow's record was refused.
    #[error("inspection section: flow {index} (record at offset {offset}): {error}")]
    Record {
        /// Its position in the section.
        index: usize,
        /// Where its record starts.
        offset: usize,
        /// Why.
        error: PersistError,
    },
}

/// One inspected flow of a section.
#[derive(Debug, Clone)]
pub struct CarriedFlow {
    key: Key,
    idle_ns: u64,
    record: Vec<u8>,
    /// Its position and its record's offset in the section it came from.
    at: (usize, usize),
}

impl CarriedFlow {
    /// The flow's two addresses, by which it is steered to a worker.
    pub fn addresses(&self) -> (IpAddr, IpAddr) {
        (self.key.lo.0, self.key.hi.0)
    }

    /// Bytes of its record.
    pub fn record_len(&self) -> usize {
        self.record.len()
    }

    /// Its record ([`palisade_inspect::persist`]).
    pub fn record(&self) -> &[u8] {
        &self.record
    }

    /// How long it had been idle when it was exported (ns).
    pub fn idle_ns(&self) -> u64 {
        self.idle_ns
    }
}

/// What a section holds: every flow (whole, pre-copy) or the changes since a pre-copy (delta).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionKind {
    /// Every inspected flow, taken up at once (or replacing a staged pre-copy).
    Whole,
    /// Every inspected flow, held by the destination until the commit.
    Precopy,
    /// The flows changed or new since the pre-copy, and the keys of those gone.
    Delta,
}

impl SectionKind {
    fn code(self) -> u8 {
        match self {
            SectionKind::Whole => 0,
            SectionKind::Precopy => 1,
            SectionKind::Delta => 2,
        }
    }

    fn name(self) -> &'static str {
        match self {
            SectionKind::Whole => "whole section",
            SectionKind::Precopy => "pre-copy",
            SectionKind::Delta => "delta",
        }
    }
}

/// A flow gone since a pre-copy (its key, in a delta).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoneFlow {
    key: Key,
}

/// A verified section.
#[derive(Debug, Clone)]
pub struct Section {
    /// What it holds.
    pub kind: SectionKind,
    /// Its flows.
    pub flows: Vec<CarriedFlow>,
    /// The flows gone since the pre-copy (a delta's).
    pub removed: Vec<GoneFlow>,
}

/// What one worker's pre-copy held: what its delta is taken against.
#[derive(Debug, Clone)]
pub struct PrecopyMark {
    /// The inspector it was taken on.
    inline: u64,
    /// Its change generation then.
    generation: u64,
    /// The flows it carried.
    keys: HashSet<Key>,
}

/// What an import did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Imported {
    /// Flows taken up with their state.
    pub flows: usize,
    /// Of them, flows resumed mid-stream (state the destination could not take).
    pub midstream: usize,
    /// Flows not imported: their profile is unknown here.
    pub unknown_profile: usize,
    /// Flows not imported: the worker they are steered to inspects nothing.
    pub uninspected: usize,
}

/// The vNIC's addresses (canonical: IPv4 not mapped). A flow is the
/// vNIC's when one of its ends is: its connection may be gone from the
/// table (a flow inspection dropped has none: its verdict must move too).
fn vnic_addresses(engine: &Engine, port: PortId) -> Vec<IpAddr> {
    engine
        .vnic(port)
        .map(|v| v.ips.iter().map(IpAddr::to_canonical).collect())
        .unwrap_or_default()
}

fn is_vnics(key: &Key, addresses: &[IpAddr]) -> bool {
    addresses.contains(&key.lo.0.to_canonical()) || addresses.contains(&key.hi.0.to_canonical())
}

impl Inline {
    /// Append the state of this worker's inspected flows of the vNIC on
    /// `port` of `engine` (this worker's) at engine time `now`: the flows
    /// one of whose ends is the vNIC's address. Returns how many.
    pub fn export_vnic_flows(&mut self, engine: &Engine, port: PortId, now: u64, out: &mut Vec<CarriedFlow>) -> usize {
        let addresses = vnic_addresses(engine, port);
        if addresses.is_empty() || self.flows.is_empty() {
            return 0;
        }
        let t = Duration::from_nanos(now);
        let mut n = 0;
        for (key, tracked) in &self.flows {
            if !is_vnics(key, &addresses) {
                continue;
            }
            out.push(self.carried(key, tracked, t, out.len()));
            n += 1;
        }
        self.counters.flows_migrated_out += n as u64;
        n
    }

    fn carried(&self, key: &Key, tracked: &Tracked, t: Duration, index: usize) -> CarriedFlow {
        let mut record = Vec::new();
        self.inspector.export_flow(&tracked.state, t, &mut record);
        CarriedFlow {
            key: *key,
            idle_ns: t.saturating_sub(tracked.last).as_nanos().min(u128::from(u64::MAX)) as u64,
            record,
            at: (index, 0),
        }
    }

    /// A live migration's pre-copy of this worker's flows of the vNIC on
    /// `port` (as [`Inline::export_vnic_flows`]), and the mark its delta is
    /// taken against.
    pub fn precopy_vnic_flows(
        &mut self,
        engine: &Engine,
        port: PortId,
        now: u64,
        out: &mut Vec<CarriedFlow>,
    ) -> PrecopyMark {
        let before = out.len();
        self.export_vnic_flows(engine, port, now, out);
        PrecopyMark {
            inline: self.id,
            generation: self.generation,
            keys: out[before..].iter().map(|f| f.key).collect(),
        }
    }

    /// The delta since `mark` of this worker's flows of the vNIC on `port`:
    /// the flows changed since it or not in it go to `out`, the keys of
    /// those it held that are gone to `gone`. `None` (nothing appended)
    /// when `mark` is not this inspector's: the caller sends the flows whole.
    pub fn delta_vnic_flows(
        &mut self,
        engine: &Engine,
        port: PortId,
        now: u64,
        mark: &PrecopyMark,
        out: &mut Vec<CarriedFlow>,
        gone: &mut Vec<GoneFlow>,
    ) -> Option<usize> {
        if mark.inline != self.id {
            return None;
        }
        let addresses = vnic_addresses(engine, port);
        let t = Duration::from_nanos(now);
        let mut n = 0;
        for (key, tracked) in &self.flows {
            if !is_vnics(key, &addresses) || (tracked.changed <= mark.generation && mark.keys.contains(key)) {
                continue;
            }
            out.push(self.carried(key, tracked, t, out.len()));
            n += 1;
        }
        for key in &mark.keys {
            if !self.flows.contains_key(key) {
                gone.push(GoneFlow { key: *key });
            }
        }
        self.counters.flows_migrated_out += n as u64;
        Some(n)
    }

    /// Forget the inspected flows of the vNIC on `port` (its VM moved
    /// away), giving back their stream memory. Returns how many.
    pub fn forget_vnic_flows(&mut self, engine: &Engine, port: PortId) -> usize {
        let addresses = vnic_addresses(engine, port);
        let keys: Vec<Key> = self.flows.keys().filter(|k| is_vnics(k, &addresses)).copied().collect();
        for k in &keys {
            if let Some(t) = self.flows.remove(k) {
                self.inspector.discard_flow(t.state);
            }
        }
        keys.len()
    }

    /// Flows held for `vnic`'s commit (staged by a pre-copy or a delta);
    /// `None` when nothing is held for it.
    pub fn staged_flows(&self, vnic: &str) -> Option<usize> {
        self.staged.get(vnic).map(HashMap::len)
    }

    /// Flows held for every vNIC's commit.
    pub fn staged_total(&self) -> usize {
        self.staged.values().map(HashMap::len).sum()
    }

    /// Decode `flows` under this worker's signatures, charging their held
    /// bytes; on a refused record, everything decoded is given back.
    fn stage(&mut self, flows: Vec<CarriedFlow>, now: u64) -> Result<Staged, SectionError> {
        // The names of this inspector's rules, built once: it keeps its
        // rules for its life (a policy change builds another), and with
        // tens of thousands of signatures building them would weigh on a
        // delta applied in the guest's pause.
        let importer = self
            .importer
            .get_or_insert_with(|| Arc::new(self.inspector.flow_importer()))
            .clone();
        let t = Duration::from_nanos(now);
        let mut staged = Staged::default();
        for f in flows {
            let imported = match self.inspector.import_flow(&importer, &f.record, t) {
                Ok(i) => i,
                Err(error) => {
                    self.unstage(staged);
                    return Err(SectionError::Record {
                        index: f.at.0,
                        offset: f.at.1,
                        error,
                    });
                }
            };
            // The profile by name, as frames find it (`frame`).
            let known = self
                .setup
                .signatures
                .profile(&imported.profile_name)
                .filter(|&id| Some(id) == imported.profile);
            if known.is_none() {
                staged.unknown_profile += 1;
                staged.skipped.push(f.key);
                self.inspector.discard_flow(imported.flow);
                continue;
            }
            staged.midstream += usize::from(imported.resumed_midstream);
            staged.flows.push((
                f.key,
                Tracked {
                    state: imported.flow,
                    last: t.saturating_sub(Duration::from_nanos(f.idle_ns)),
                    profile: imported.profile_name.into(),
                    changed: 0,
                },
            ));
        }
        Ok(staged)
    }

    fn unstage(&mut self, staged: Staged) {
        for (_, t) in staged.flows {
            self.inspector.discard_flow(t.state);
        }
    }

    /// Put staged flows in the table (replacing a flow of the same key).
    fn adopt(&mut self, staged: Staged, now: u64) {
        self.counters.migrated_midstream += staged.midstream as u64;
        self.counters.migrated_unknown_profile += staged.unknown_profile as u64;
        self.adopt_flows(staged.flows.into_iter(), now);
    }

    fn adopt_flows(&mut self, flows: impl ExactSizeIterator<Item = (Key, Tracked)>, now: u64) {
        // One growth of the table, not one per doubling.
        self.flows
            .reserve(flows.len().min(self.setup.max_flows.saturating_sub(self.flows.len())));
        for (key, mut tracked) in flows {
            if !self.flows.contains_key(&key) && self.flows.len() >= self.setup.max_flows {
                self.make_room(Duration::from_nanos(now));
            }
            // Changed here: a delta taken later on this host carries it.
            self.generation += 1;
            tracked.changed = self.generation;
            if let Some(old) = self.flows.insert(key, tracked) {
                self.inspector.discard_flow(old.state);
            }
            self.counters.flows_migrated_in += 1;
        }
    }

    /// Hold decoded flows for `vnic`'s commit: over what is held for it
    /// (a delta: `gone` removed, `staged` replacing by key), or instead
    /// of it (a whole section or a pre-copy).
    fn hold(&mut self, vnic: &str, staged: Staged, gone: &[Key], over: bool) {
        self.counters.migrated_midstream += staged.midstream as u64;
        self.counters.migrated_unknown_profile += staged.unknown_profile as u64;
        let mut held = self.staged.remove(vnic).unwrap_or_default();
        if !over {
            for (_, t) in held.drain() {
                self.inspector.discard_flow(t.state);
            }
        }
        for key in gone.iter().chain(&staged.skipped) {
            if let Some(t) = held.remove(key) {
                self.inspector.discard_flow(t.state);
            }
        }
        for (key, t) in staged.flows {
            if let Some(old) = held.insert(key, t) {
                self.inspector.discard_flow(old.state);
            }
        }
        self.staged.insert(vnic.to_string(), held);
    }

    /// Forget what is held for `vnic`; returns how many flows.
    fn drop_held(&mut self, vnic: &str) -> usize {
        let Some(held) = self.staged.remove(vnic) else {
            return 0;
        };
        let n = held.len();
        for (_, t) in held {
            self.inspector.discard_flow(t.state);
        }
        n
    }
}

/// Flows decoded for one worker, not yet in its table.
#[derive(Default)]
struct Staged {
    flows: Vec<(Key, Tracked)>,
    midstream: usize,
    unknown_profile: usize,
    /// Keys of flows not taken (their profile unknown here).
    skipped: Vec<Key>,
}

fn put_end(out: &mut Vec<u8>, (ip, port): (IpAddr, u16)) {
    match ip {
        IpAddr::V4(a) => {
            out.push(4);
            out.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            out.push(6);
            out.extend_from_slice(&a.octets());
        }
    }
    out.extend_from_slice(&port.to_be_bytes());
}

/// The whole section of `vnic`'s flows.
pub fn encode(vnic: &str, flows: &[CarriedFlow]) -> Vec<u8> {
    encode_section(vnic, SectionKind::Whole, flows, &[])
}

/// A section of `kind` of `vnic`'s flows (`removed`: a delta's gone flows).
pub fn encode_section(vnic: &str, kind: SectionKind, flows: &[CarriedFlow], removed: &[GoneFlow]) -> Vec<u8> {
    let name = &vnic.as_bytes()[..vnic.len().min(usize::from(u16::MAX))];
    let mut b = Vec::with_capacity(
        23 + name.len() + flows.iter().map(|f| 56 + f.record.len()).sum::<usize>() + removed.len() * 41,
    );
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_be_bytes());
    b.push(kind.code());
    b.extend_from_slice(&(name.len() as u16).to_be_bytes());
    b.extend_from_slice(name);
    b.extend_from_slice(&(flows.len() as u32).to_be_bytes());
    for f in flows {
        b.push(f.key.protocol);
        put_end(&mut b, f.key.lo);
        put_end(&mut b, f.key.hi);
        b.extend_from_slice(&f.idle_ns.to_be_bytes());
        b.extend_from_slice(&(f.record.len() as u32).to_be_bytes());
        b.extend_from_slice(&f.record);
    }
    let removed: &[GoneFlow] = if kind == SectionKind::Delta { removed } else { &[] };
    b.extend_from_slice(&(removed.len() as u32).to_be_bytes());
    for g in removed {
        b.push(g.key.protocol);
        put_end(&mut b, g.key.lo);
        put_end(&mut b, g.key.hi);
    }
    let crc = palisade_datapath::state::crc32(&b);
    b.extend_from_slice(&crc.to_be_bytes());
    b
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], SectionError> {
        if n > self.buf.len() - self.at {
            return Err(SectionError::Truncated { field, offset: self.at });
        }
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn uint(&mut self, n: usize, field: &'static str) -> Result<u64, SectionError> {
        Ok(self.take(n, field)?.iter().fold(0, |v, &b| v << 8 | u64::from(b)))
    }

    fn end(&mut self, field: &'static str) -> Result<(IpAddr, u16), SectionError> {
        let at = self.at;
        let ip = match self.uint(1, field)? {
            4 => {
                let b = self.take(4, field)?;
                IpAddr::from([b[0], b[1], b[2], b[3]])
            }
            6 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(self.take(16, field)?);
                IpAddr::from(a)
            }
            v => {
                return Err(SectionError::Invalid {
                    field,
                    offset: at,
                    value: v,
                });
            }
        };
        Ok((ip, self.uint(2, field)? as u16))
    }

    /// A flow's key: protocol and both ends, in order.
    fn key(&mut self) -> Result<Key, SectionError> {
        let at = self.at;
        let protocol = self.uint(1, "flow protocol")? as u8;
        let lo = self.end("flow end")?;
        let hi = self.end("flow end")?;
        if lo > hi {
            return Err(SectionError::Invalid {
                field: "flow ends (out of order)",
                offset: at,
                value: 0,
            });
        }
        Ok(Key { protocol, lo, hi })
    }

    /// A count of at most [`MAX_FLOWS`].
    fn count(&mut self, field: &'static str) -> Result<u64, SectionError> {
        let at = self.at;
        let count = self.uint(4, field)?;
        if count > u64::from(MAX_FLOWS) {
            return Err(SectionError::Invalid {
                field,
                offset: at,
                value: count,
            });
        }
        Ok(count)
    }
}

/// Verify a section sent for `vnic` (magic, version, checksum, name,
/// every length, each key named once) and return it; its records are
/// verified as they are imported.
pub fn decode(blob: &[u8], vnic: &str) -> Result<Section, SectionError> {
    let mut r = Reader { buf: blob, at: 0 };
    if r.take(6, "magic")? != MAGIC {
        return Err(SectionError::BadMagic);
    }
    let version = r.uint(2, "version")? as u16;
    if version != VERSION && version != VERSION_WHOLE_ONLY {
        return Err(SectionError::UnknownVersion(version));
    }
    if blob.len() < 6 + 2 + 2 + 4 + 4 {
        return Err(SectionError::Truncated {
            field: "header",
            offset: blob.len(),
        });
    }
    let body = blob.len() - 4;
    let expected = u32::from_be_bytes([blob[body], blob[body + 1], blob[body + 2], blob[body + 3]]);
    let computed = palisade_datapath::state::crc32(&blob[..body]);
    if expected != computed {
        return Err(SectionError::Checksum { expected, computed });
    }
    let mut r = Reader {
        buf: &blob[..body],
        at: r.at,
    };
    let kind = if version == VERSION_WHOLE_ONLY {
        SectionKind::Whole
    } else {
        let at = r.at;
        match r.uint(1, "kind")? {
            0 => SectionKind::Whole,
            1 => SectionKind::Precopy,
            2 => SectionKind::Delta,
            v => {
                return Err(SectionError::Invalid {
                    field: "kind",
                    offset: at,
                    value: v,
                });
            }
        }
    };
    let name_len = r.uint(2, "name length")? as usize;
    let name = r.take(name_len, "name")?;
    if name != vnic.as_bytes() {
        return Err(SectionError::ForeignVnic {
            expected: vnic.to_string(),
            found: String::from_utf8_lossy(name).into_owned(),
        });
    }
    let count = r.count("flow count")?;
    let mut flows = Vec::new();
    let mut seen = HashSet::new();
    for index in 0..count as usize {
        let at = r.at;
        let key = r.key()?;
        if !seen.insert(key) {
            return Err(SectionError::Duplicate { offset: at });
        }
        let idle_ns = r.uint(8, "flow idle time")?;
        let len_at = r.at;
        let len = r.uint(4, "record length")? as usize;
        if len > persist::MAX_RECORD {
            return Err(SectionError::Invalid {
                field: "record length",
                offset: len_at,
                value: len as u64,
            });
        }
        let offset = r.at;
        let record = r.take(len, "record")?.to_vec();
        flows.push(CarriedFlow {
            key,
            idle_ns,
            record,
            at: (index, offset),
        });
    }
    let mut removed = Vec::new();
    if version != VERSION_WHOLE_ONLY {
        let at = r.at;
        let gone = r.count("removed count")?;
        if gone > 0 && kind != SectionKind::Delta {
            return Err(SectionError::Invalid {
                field: "removed count (only a delta removes)",
                offset: at,
                value: gone,
            });
        }
        for _ in 0..gone {
            let at = r.at;
            let key = r.key()?;
            if !seen.insert(key) {
                return Err(SectionError::Duplicate { offset: at });
            }
            removed.push(GoneFlow { key });
        }
    }
    if r.at != body {
        return Err(SectionError::Trailing(body - r.at));
    }
    Ok(Section { kind, flows, removed })
}

/// The worker `key`'s flow is steered to, of `workers`.
fn worker_of(key: &Key, workers: u32) -> usize {
    palisade_io::steer::addresses_worker(key.lo.0, key.hi.0, workers) as usize
}

/// Count a refused section (on the first worker that inspects).
fn refused(inlines: &mut [Option<&mut Inline>]) {
    if let Some(i) = inlines.iter_mut().find_map(|x| x.as_deref_mut()) {
        i.counters.migration_sections_refused += 1;
    }
}

/// Decode `flows` on each worker they are steered to, all or nothing.
fn decode_shares(
    inlines: &mut [Option<&mut Inline>],
    flows: Vec<CarriedFlow>,
    now: u64,
    done: &mut Imported,
) -> Result<Vec<Staged>, SectionError> {
    let workers = u32::try_from(inlines.len()).unwrap_or(u32::MAX).max(1);
    let mut shares: Vec<Vec<CarriedFlow>> = vec![Vec::new(); workers as usize];
    for f in flows {
        shares[worker_of(&f.key, workers)].push(f);
    }
    let mut staged = Vec::with_capacity(shares.len());
    for (i, share) in shares.into_iter().enumerate() {
        let Some(inline) = inlines.get_mut(i).and_then(|x| x.as_deref_mut()) else {
            done.uninspected += share.len();
            staged.push(Staged::default());
            continue;
        };
        match inline.stage(share, now) {
            Ok(s) => staged.push(s),
            Err(e) => {
                for (j, s) in staged.into_iter().enumerate() {
                    if let Some(inline) = inlines.get_mut(j).and_then(|x| x.as_deref_mut()) {
                        inline.unstage(s);
                    }
                }
                return Err(e);
            }
        }
    }
    for s in &staged {
        done.flows += s.flows.len();
        done.midstream += s.midstream;
        done.unknown_profile += s.unknown_profile;
    }
    Ok(staged)
}

/// Import the whole section `blob` sent for `vnic` into the workers'
/// inspectors (`inlines` in worker order, `None` for a worker without
/// one), each flow to the worker its connection is steered to, at engine
/// time `now`, into their live tables at once (the control socket's
/// migration, in the guest's pause). All or nothing: a refused section or
/// record changes nothing.
pub fn import(
    inlines: &mut [Option<&mut Inline>],
    vnic: &str,
    blob: &[u8],
    now: u64,
) -> Result<Imported, SectionError> {
    let result = (|| {
        let section = decode(blob, vnic)?;
        if section.kind != SectionKind::Whole {
            return Err(SectionError::WrongKind {
                expected: SectionKind::Whole.name(),
                found: section.kind.name(),
            });
        }
        let mut done = Imported::default();
        let staged = decode_shares(inlines, section.flows, now, &mut done)?;
        for (i, s) in staged.into_iter().enumerate() {
            if let Some(inline) = inlines.get_mut(i).and_then(|x| x.as_deref_mut()) {
                inline.adopt(s, now);
            }
        }
        Ok(done)
    })();
    if result.is_err() {
        refused(inlines);
    }
    result
}

/// Hold the section `blob` sent for `vnic` for its commit
/// ([`commit_staged`]), not in the live tables: a whole section or a
/// pre-copy instead of what is held, a delta over it (the flows it
/// carries replacing theirs, those it removes gone). All or nothing: a
/// refused section (a record refused, a delta without a held pre-copy or
/// removing a flow it did not hold) changes nothing. Returns what the
/// section's flows did.
pub fn stage(inlines: &mut [Option<&mut Inline>], vnic: &str, blob: &[u8], now: u64) -> Result<Imported, SectionError> {
    let result = stage_section(inlines, vnic, blob, now);
    if result.is_err() {
        refused(inlines);
    }
    result
}

fn stage_section(
    inlines: &mut [Option<&mut Inline>],
    vnic: &str,
    blob: &[u8],
    now: u64,
) -> Result<Imported, SectionError> {
    let section = decode(blob, vnic)?;
    let workers = u32::try_from(inlines.len()).unwrap_or(u32::MAX).max(1);
    let over = section.kind == SectionKind::Delta;
    let mut gone: Vec<Vec<Key>> = vec![Vec::new(); workers as usize];
    // A host where no worker inspects counts the flows and holds nothing.
    if over && inlines.iter().any(Option::is_some) {
        // Every inspecting worker holds the pre-copy's part (empty or not).
        if inlines.iter().flatten().any(|i| !i.staged.contains_key(vnic)) {
            return Err(SectionError::NoStagedCopy(vnic.to_string()));
        }
        for (index, g) in section.removed.iter().enumerate() {
            let w = worker_of(&g.key, workers);
            let held = inlines
                .get(w)
                .and_then(|x| x.as_deref())
                .is_some_and(|i| i.staged.get(vnic).is_some_and(|h| h.contains_key(&g.key)));
            if !held {
                return Err(SectionError::UnknownFlow { index });
            }
            gone[w].push(g.key);
        }
    }
    let mut done = Imported::default();
    let staged = decode_shares(inlines, section.flows, now, &mut done)?;
    for (i, (s, g)) in staged.into_iter().zip(&gone).enumerate() {
        if let Some(inline) = inlines.get_mut(i).and_then(|x| x.as_deref_mut()) {
            inline.hold(vnic, s, g, over);
        }
    }
    Ok(done)
}

/// Move the flows held for `vnic` into the workers' live tables (its
/// connections were committed here); returns how many.
pub fn commit_staged(inlines: &mut [Option<&mut Inline>], vnic: &str, now: u64) -> usize {
    let mut n = 0;
    for inline in inlines.iter_mut().flatten() {
        if let Some(held) = inline.staged.remove(vnic) {
            n += held.len();
            inline.adopt_flows(held.into_iter(), now);
        }
    }
    n
}

/// Forget the flows held for `vnic` (its migration was refused or
/// cancelled), giving back their stream memory; returns how many.
pub fn discard_staged(inlines: &mut [Option<&mut Inline>], vnic: &str) -> usize {
    inlines.iter_mut().flatten().map(|i| i.drop_held(vnic)).sum()
}
