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
//! A flow whose profile the destination's signatures lack is not imported
//! (counted): its next frame meets the destination exactly as any flow of
//! an unknown profile does (forwarded uninspected in an `open` zone,
//! dropped in a `closed` one). One whose held bytes the destination cannot
//! take is resumed mid-stream (counted), see [`palisade_inspect::persist`].
//!
//! Layout (big-endian), version 1:
//!
//! ```text
//! magic "PLSINS" | version u16 | name_len u16 | name | count u32
//! | count × (protocol u8 | lo: family u8 (4|6), address, port u16 | hi: same
//!            | idle_ns u64 | record_len u32 | record)
//! | crc32 u32 (over everything before it)
//! ```

use std::net::IpAddr;
use std::time::Duration;

use palisade_datapath::Engine;
use palisade_datapath::port::PortId;
use palisade_inspect::persist::{self, PersistError};

use super::{Inline, Key, Tracked};

const MAGIC: &[u8; 6] = b"PLSINS";
/// The section format version this build writes and reads.
pub const VERSION: u16 = 1;
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
    pub fn export_vnic_flows(&self, engine: &Engine, port: PortId, now: u64, out: &mut Vec<CarriedFlow>) -> usize {
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
            let mut record = Vec::new();
            self.inspector.export_flow(&tracked.state, t, &mut record);
            out.push(CarriedFlow {
                key: *key,
                idle_ns: t.saturating_sub(tracked.last).as_nanos().min(u128::from(u64::MAX)) as u64,
                record,
                at: (out.len(), 0),
            });
            n += 1;
        }
        n
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

    /// Decode `flows` under this worker's signatures, charging their held
    /// bytes; on a refused record, everything decoded is given back.
    fn stage(&mut self, flows: Vec<CarriedFlow>, now: u64) -> Result<Staged, SectionError> {
        let importer = self.inspector.flow_importer();
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
        for (key, tracked) in staged.flows {
            if !self.flows.contains_key(&key) && self.flows.len() >= self.setup.max_flows {
                self.make_room(Duration::from_nanos(now));
            }
            if let Some(old) = self.flows.insert(key, tracked) {
                self.inspector.discard_flow(old.state);
            }
            self.counters.flows_migrated_in += 1;
        }
    }
}

/// Flows decoded for one worker, not yet in its table.
#[derive(Default)]
struct Staged {
    flows: Vec<(Key, Tracked)>,
    midstream: usize,
    unknown_profile: usize,
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

/// The section of `vnic`'s flows.
pub fn encode(vnic: &str, flows: &[CarriedFlow]) -> Vec<u8> {
    let name = &vnic.as_bytes()[..vnic.len().min(usize::from(u16::MAX))];
    let mut b = Vec::with_capacity(18 + name.len() + flows.iter().map(|f| 56 + f.record.len()).sum::<usize>());
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_be_bytes());
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
}

/// Verify a section sent for `vnic` (magic, version, checksum, name,
/// every length) and return its flows; their records are verified as they
/// are imported.
pub fn decode(blob: &[u8], vnic: &str) -> Result<Vec<CarriedFlow>, SectionError> {
    let mut r = Reader { buf: blob, at: 0 };
    if r.take(6, "magic")? != MAGIC {
        return Err(SectionError::BadMagic);
    }
    let version = r.uint(2, "version")? as u16;
    if version != VERSION {
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
    let name_len = r.uint(2, "name length")? as usize;
    let name = r.take(name_len, "name")?;
    if name != vnic.as_bytes() {
        return Err(SectionError::ForeignVnic {
            expected: vnic.to_string(),
            found: String::from_utf8_lossy(name).into_owned(),
        });
    }
    let at = r.at;
    let count = r.uint(4, "flow count")?;
    if count > u64::from(MAX_FLOWS) {
        return Err(SectionError::Invalid {
            field: "flow count",
            offset: at,
            value: count,
        });
    }
    let mut flows = Vec::new();
    for index in 0..count as usize {
        let at = r.at;
        let protocol = r.uint(1, "flow protocol")? as u8;
        let lo = r.end("flow end")?;
        let hi = r.end("flow end")?;
        if lo > hi {
            return Err(SectionError::Invalid {
                field: "flow ends (out of order)",
                offset: at,
                value: 0,
            });
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
            key: Key { protocol, lo, hi },
            idle_ns,
            record,
            at: (index, offset),
        });
    }
    if r.at != body {
        return Err(SectionError::Trailing(body - r.at));
    }
    Ok(flows)
}

/// Import the section `blob` sent for `vnic` into the workers' inspectors
/// (`inlines` in worker order, `None` for a worker without one), each
/// flow to the worker its connection is steered to, at engine time `now`.
/// All or nothing: a refused section or record changes nothing.
pub fn import(
    inlines: &mut [Option<&mut Inline>],
    vnic: &str,
    blob: &[u8],
    now: u64,
) -> Result<Imported, SectionError> {
    let flows = decode(blob, vnic)?;
    let workers = u32::try_from(inlines.len()).unwrap_or(u32::MAX).max(1);
    let mut shares: Vec<Vec<CarriedFlow>> = vec![Vec::new(); workers as usize];
    for f in flows {
        let (a, b) = f.addresses();
        shares[palisade_io::steer::addresses_worker(a, b, workers) as usize].push(f);
    }
    let mut done = Imported::default();
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
    for (i, s) in staged.into_iter().enumerate() {
        if let Some(inline) = inlines.get_mut(i).and_then(|x| x.as_deref_mut()) {
            done.flows += s.flows.len();
            done.midstream += s.midstream;
            done.unknown_profile += s.unknown_profile;
            inline.adopt(s, now);
        }
    }
    Ok(done)
}
