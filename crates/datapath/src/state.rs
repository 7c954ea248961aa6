//! Export and import of one vNIC's connection state (live migration).
//!
//! The blob is versioned and checksummed so that a truncated, corrupted or
//! foreign blob is refused with an error naming the problem, never half
//! imported. Layout (big-endian):
//!
//! ```text
//! magic "PLSDCT" | version u16 | policy_version u64 | name_len u16 | name
//! | count u32 | count × record | crc32 u32 (over everything before it)
//! record: segment u32 | src [16] | dst [16] | src_port u16 | dst_port u16
//!         | protocol u8 | state u8 | flags u8 (strict, trusted)
//!         | age u64 | idle u64 | packets u64 | bytes u64
//!         | 2 × (end u32 | limit u32 | max_win u32 | wscale u8 | seen u8 | fin u8)
//! ```
//!
//! Times travel as ages relative to the exporter's clock, so the two hosts'
//! clocks need not agree.

use palisade_wire::flow::{FlowKey, Segment};
use palisade_wire::ip::IpProtocol;

use crate::conntrack::{Conn, ConnState, TcpPeer};

const MAGIC: &[u8; 6] = b"PLSDCT";
/// The blob format version this build writes and reads.
pub const VERSION: u16 = 1;
const RECORD_LEN: usize = 4 + 16 + 16 + 2 + 2 + 1 + 1 + 1 + 8 * 4 + 2 * (4 * 3 + 3);
/// Most records a blob may claim (bounds the allocation an untrusted count can cause).
pub const MAX_RECORDS: u32 = 1 << 20;

/// Why a blob was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// Shorter than its header or its declared contents.
    #[error("state blob truncated")]
    Truncated,
    /// Not a Palisade connection-state blob.
    #[error("not a Palisade connection-state blob (bad magic)")]
    BadMagic,
    /// Written by a format version this build does not read.
    #[error("unsupported state blob version {0} (this build reads {VERSION})")]
    UnsupportedVersion(u16),
    /// The checksum does not match: corrupted in transit or storage.
    #[error("state blob checksum mismatch: expected {expected:#010x}, computed {computed:#010x}")]
    BadChecksum {
        /// The checksum the blob carries.
        expected: u32,
        /// The checksum of its contents.
        computed: u32,
    },
    /// Bytes after the checksum or a malformed field.
    #[error("state blob malformed: {0}")]
    Malformed(&'static str),
    /// The blob belongs to another vNIC.
    #[error("state blob is for vNIC {found:?}, not {expected:?}")]
    ForeignVnic {
        /// The vNIC imported into.
        expected: String,
        /// The vNIC the blob was exported from.
        found: String,
    },
    /// The connection table has no room for the blob's connections (nothing was imported).
    #[error("no room for {needed} connections ({free} free)")]
    NoRoom {
        /// Connections in the blob.
        needed: usize,
        /// Free entries in the table.
        free: usize,
    },
    /// The port to import into is not a vNIC.
    #[error("unknown port")]
    UnknownPort,
}

/// One exported connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnRecord {
    /// Initiator-direction key.
    pub key: FlowKey,
    /// State.
    pub state: ConnState,
    /// Strict window checking.
    pub strict: bool,
    /// Allowed on another host's verdict.
    pub trusted: bool,
    /// Nanoseconds since creation.
    pub age: u64,
    /// Nanoseconds since its last packet.
    pub idle: u64,
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
    /// TCP tracking.
    pub tcp: [TcpPeer; 2],
}

/// A decoded blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The vNIC it was exported from.
    pub vnic: String,
    /// The policy version its verdicts were reached under.
    pub policy_version: u64,
    /// The connections.
    pub conns: Vec<ConnRecord>,
}

/// CRC-32 (IEEE 802.3, reflected), bitwise: blobs are small and rare.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// Encode `conns` of vNIC `vnic` at `now` (the exporter's clock).
pub fn encode(vnic: &str, policy_version: u64, conns: &[Conn], now: u64) -> Vec<u8> {
    let name = &vnic.as_bytes()[..vnic.len().min(u16::MAX as usize)];
    let mut b = Vec::with_capacity(32 + name.len() + conns.len() * RECORD_LEN);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_be_bytes());
    b.extend_from_slice(&policy_version.to_be_bytes());
    b.extend_from_slice(&(name.len() as u16).to_be_bytes());
    b.extend_from_slice(name);
    b.extend_from_slice(&(conns.len() as u32).to_be_bytes());
    for c in conns {
        b.extend_from_slice(&c.key.segment.raw().to_be_bytes());
        b.extend_from_slice(&c.key.src);
        b.extend_from_slice(&c.key.dst);
        b.extend_from_slice(&c.key.src_port.to_be_bytes());
        b.extend_from_slice(&c.key.dst_port.to_be_bytes());
        b.push(c.key.protocol.0);
        b.push(c.state.code());
        b.push(u8::from(c.strict) | u8::from(c.trusted) << 1);
        for v in [
            now.saturating_sub(c.created),
            now.saturating_sub(c.last_seen),
            c.packets,
            c.bytes,
        ] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        for p in &c.tcp {
            b.extend_from_slice(&p.end.to_be_bytes());
            b.extend_from_slice(&p.limit.to_be_bytes());
            b.extend_from_slice(&p.max_win.to_be_bytes());
            b.extend_from_slice(&[p.wscale, u8::from(p.seen), u8::from(p.fin)]);
        }
    }
    let crc = crc32(&b);
    b.extend_from_slice(&crc.to_be_bytes());
    b
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        if self.0.len() < n {
            return Err(StateError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        // `take(N)` returns exactly N bytes.
        self.take(N)?.try_into().map_err(|_| StateError::Truncated)
    }
    fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.arr::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, StateError> {
        Ok(u16::from_be_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_be_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, StateError> {
        Ok(u64::from_be_bytes(self.arr()?))
    }
}

/// Decode and verify a blob.
pub fn decode(blob: &[u8]) -> Result<Snapshot, StateError> {
    if blob.len() < MAGIC.len() + 2 {
        return Err(StateError::Truncated);
    }
    if &blob[..MAGIC.len()] != MAGIC {
        return Err(StateError::BadMagic);
    }
    let version = u16::from_be_bytes([blob[6], blob[7]]);
    if version != VERSION {
        return Err(StateError::UnsupportedVersion(version));
    }
    if blob.len() < MAGIC.len() + 2 + 8 + 2 + 4 + 4 {
        return Err(StateError::Truncated);
    }
    let (body, tail) = blob.split_at(blob.len() - 4);
    let expected = u32::from_be_bytes([tail[0], tail[1], tail[2], tail[3]]);
    let computed = crc32(body);
    if expected != computed {
        return Err(StateError::BadChecksum { expected, computed });
    }
    let mut r = Reader(&body[8..]);
    let policy_version = r.u64()?;
    let name_len = usize::from(r.u16()?);
    let vnic = std::str::from_utf8(r.take(name_len)?)
        .map_err(|_| StateError::Malformed("vNIC name is not UTF-8"))?
        .to_string();
    let count = r.u32()?;
    if count > MAX_RECORDS || r.0.len() != count as usize * RECORD_LEN {
        return Err(StateError::Malformed("record count disagrees with the blob length"));
    }
    let mut conns = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let segment = r.u32()?;
        let key = FlowKey {
            segment: segment_from_raw(segment).ok_or(StateError::Malformed("bad segment"))?,
            src: r.arr()?,
            dst: r.arr()?,
            src_port: r.u16()?,
            dst_port: r.u16()?,
            protocol: IpProtocol(r.u8()?),
        };
        let state = ConnState::from_code(r.u8()?).ok_or(StateError::Malformed("bad connection state"))?;
        let flags = r.u8()?;
        let (age, idle, packets, bytes) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
        let mut tcp = [TcpPeer::default(); 2];
        for p in &mut tcp {
            p.end = r.u32()?;
            p.limit = r.u32()?;
            p.max_win = r.u32()?;
            p.wscale = r.u8()?.min(14);
            p.seen = r.u8()? != 0;
            p.fin = r.u8()? != 0;
        }
        conns.push(ConnRecord {
            key,
            state,
            strict: flags & 1 != 0,
            trusted: flags & 2 != 0,
            age,
            idle,
            packets,
            bytes,
            tcp,
        });
    }
    Ok(Snapshot {
        vnic,
        policy_version,
        conns,
    })
}

/// Rebuild a segment from its packed value, refusing unknown kinds.
fn segment_from_raw(raw: u32) -> Option<Segment> {
    let v = raw & 0x0fff_ffff;
    let s = match raw >> 28 {
        0 if v == 0 => Segment::UNTAGGED,
        1 => Segment::vlan(v as u16),
        2 => Segment::qinq((v >> 12) as u16, (v & 0xfff) as u16),
        3 => Segment::vni(v),
        _ => return None,
    };
    (s.raw() == raw).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Conn {
        let key = FlowKey {
            segment: Segment::vlan(100),
            src: [1; 16],
            dst: [2; 16],
            src_port: 1,
            dst_port: 2,
            protocol: IpProtocol::TCP,
        };
        let mut c = Conn::new(key, 10);
        c.state = ConnState::Established;
        c.tcp[0].end = 77;
        c.tcp[1].seen = true;
        c.packets = 3;
        c
    }

    #[test]
    fn round_trip_and_every_corruption_refused() {
        let blob = encode("web-1.0", 7, &[conn()], 110);
        let s = decode(&blob).unwrap();
        assert_eq!((s.vnic.as_str(), s.policy_version, s.conns.len()), ("web-1.0", 7, 1));
        let r = &s.conns[0];
        assert_eq!(
            (r.key, r.state, r.idle, r.packets, r.tcp),
            (conn().key, ConnState::Established, 100, 3, conn().tcp)
        );
        for i in 0..blob.len() {
            let mut bad = blob.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_err(), "flip at {i} accepted");
        }
        for n in 0..blob.len() {
            assert!(decode(&blob[..n]).is_err(), "prefix {n} accepted");
        }
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }
}
