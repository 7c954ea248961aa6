//! Export and import of one vNIC's connection state (live migration).
//!
//! The blob is versioned and checksummed so that a truncated, corrupted or
//! foreign blob is refused with an error naming the problem, never half
//! imported. Layout (big-endian), version 2:
//!
//! ```text
//! magic "PLSDCT" | version u16 | policy_version u64 | name_len u16 | name
//! | count u32 | count × record | crc32 u32 (over everything before it)
//! record: segment u32 | src [16] | dst [16] | src_port u16 | dst_port u16
//!         | protocol u8 | icmp_type u8 | icmp_code u8
//!         | state u8 | flags u8 (strict, trusted, revalidate)
//!         | age u64 | idle u64 | packets u64 | bytes u64
//!         | 2 × (end u32 | limit u32 | max_win u32 | max_ack u32 | wscale u8 | flags u8)
//!         | last: index_dir u8 | ack u32 | end u32 | win u16 | wscale u8 | flags u8
//! ```
//!
//! Version 1 (written before keys held the ICMP type and TCP tracking
//! followed Linux's) is still read: its records have no ICMP fields (an
//! ICMP key with equal ports is an echo request's, any other keeps its type
//! and code in the destination port), per side `end | limit | max_win |
//! wscale u8 | seen u8 | fin u8`, and no last segment. Its TCP connections
//! come back with window failures passing (as a connection picked up
//! mid-stream), since what version 2 tracks beyond them is unknown.
//!
//! Times travel as ages relative to the exporter's clock, so the two hosts'
//! clocks need not agree.

use palisade_wire::flow::{FlowKey, Segment};
use palisade_wire::ip::IpProtocol;

use crate::conntrack::{Conn, ConnState, TcpTrack};
use crate::tcptrack::{last_flags, peer_flags};

const MAGIC: &[u8; 6] = b"PLSDCT";
/// The blob format version this build writes (it also reads version 1).
pub const VERSION: u16 = 2;
/// The length of one connection's record in a version-2 blob.
pub const RECORD_LEN: usize = 4 + 16 + 16 + 2 + 2 + 3 + 1 + 1 + 8 * 4 + 2 * (4 * 4 + 2) + (1 + 4 * 2 + 2 + 1 + 1);
const RECORD_LEN_V1: usize = 4 + 16 + 16 + 2 + 2 + 1 + 1 + 1 + 8 * 4 + 2 * (4 * 3 + 3);
/// Most records a blob may claim (bounds the allocation an untrusted count can cause).
pub const MAX_RECORDS: u32 = 1 << 20;

/// Why a blob was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// Shorter than its header or its declared contents.
    #[error("state blob truncated")]
    Truncated,
    /// Shorter than the records its header declares.
    #[error("state blob truncated: {len} bytes, its header declares {declared}")]
    Cut {
        /// Its length.
        len: usize,
        /// The length its header declares.
        declared: usize,
    },
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
    pub tcp: TcpTrack,
    /// The exporter had not confirmed its verdict under its current policy
    /// (a policy change came after it): the importer re-decides it on its
    /// next packet, whatever policy version the blob names.
    pub revalidate: bool,
}

impl ConnRecord {
    /// The record of `c` at `now` (the exporter's clock), `revalidate` as given.
    pub fn of(c: &Conn, now: u64, revalidate: bool) -> ConnRecord {
        ConnRecord {
            key: c.key,
            state: c.state,
            strict: c.strict,
            trusted: c.trusted,
            age: now.saturating_sub(c.created),
            idle: now.saturating_sub(c.last_seen),
            packets: c.packets,
            bytes: c.bytes,
            tcp: c.tcp,
            revalidate,
        }
    }
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

impl Snapshot {
    /// What [`relax_tcp_windows`] does to a blob, on state already decoded
    /// (an agent's restart decodes and checks each file once): every TCP
    /// connection's window failures pass until its windows are learned
    /// again. Returns how many connections were relaxed.
    pub fn relax_tcp_windows(&mut self) -> usize {
        let mut relaxed = 0;
        for c in &mut self.conns {
            if c.key.protocol == IpProtocol::TCP {
                for p in &mut c.tcp.peers {
                    p.flags |= peer_flags::BE_LIBERAL;
                }
                relaxed += 1;
            }
        }
        relaxed
    }
}

/// CRC-32 (IEEE 802.3, reflected; the zlib and Ethernet checksum). An
/// agent's restart checks a megabyte of state per 10,000 connections before
/// its first new flow, and a snapshot round writes as much: computed with the
/// carry-less multiply instructions where the CPU has them (`crc32fast`),
/// several times faster than a byte at a time from a table.
pub fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
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
        push_record(&mut b, c, now);
    }
    let crc = crc32(&b);
    b.extend_from_slice(&crc.to_be_bytes());
    b
}

/// Append one connection's record (version 2 layout, [`RECORD_LEN`] bytes)
/// to `b`, its times relative to `now`: the unit of a blob, and of the
/// agent's crash journal.
pub fn push_record(b: &mut Vec<u8>, c: &Conn, now: u64) {
    b.extend_from_slice(&c.key.segment.raw().to_be_bytes());
    b.extend_from_slice(&c.key.src);
    b.extend_from_slice(&c.key.dst);
    b.extend_from_slice(&c.key.src_port.to_be_bytes());
    b.extend_from_slice(&c.key.dst_port.to_be_bytes());
    b.push(c.key.protocol.0);
    b.push(c.key.icmp_type);
    b.push(c.key.icmp_code);
    b.push(c.state.code());
    // Bit 2: the verdict was not current at the export (epoch 0 is never
    // an engine's current one: it starts at 1).
    b.push(u8::from(c.strict) | u8::from(c.trusted) << 1 | u8::from(c.epoch == 0) << 2);
    for v in [
        now.saturating_sub(c.created),
        now.saturating_sub(c.last_seen),
        c.packets,
        c.bytes,
    ] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    for p in &c.tcp.peers {
        for v in [p.end, p.limit, p.max_win, p.max_ack] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.extend_from_slice(&[p.wscale, p.flags]);
    }
    let last = &c.tcp.last;
    b.push(last.index_code());
    for v in [last.ack, last.end] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.extend_from_slice(&last.win.to_be_bytes());
    b.extend_from_slice(&[last.wscale, last.flags]);
}

/// Offsets of a version-2 record's two per-side flag bytes (see the layout
/// above: the key, state, flags and counters take 77 bytes, then each side's
/// `end | limit | max_win | max_ack | wscale` precede its flags).
const PEER_FLAGS_AT: [usize; 2] = [77 + 16 + 1, 77 + 18 + 16 + 1];
/// Offset of a record's protocol byte.
const PROTOCOL_AT: usize = 4 + 16 + 16 + 2 + 2;

/// Let window failures of every TCP connection in `blob` pass, as for a
/// connection picked up mid-stream, and re-seal the blob. Returns how many
/// connections were relaxed.
///
/// For state that kept moving after it was written: a periodic snapshot
/// taken before a crash holds windows up to one interval old, and a stream
/// that went on meanwhile would fail a strict window check on its next
/// segment. Linux's `be_liberal` flag does the same for a connection
/// whose start it did not see; the windows are learned again from the
/// traffic. The blob is verified first (a corrupt one is refused, never
/// patched); a version-1 blob's connections are relaxed already, so it is
/// left as it is.
pub fn relax_tcp_windows(blob: &mut [u8]) -> Result<usize, StateError> {
    let snapshot = decode(blob)?;
    let version = u16::from_be_bytes([blob[6], blob[7]]);
    if version != VERSION {
        return Ok(0);
    }
    let name_len = usize::from(u16::from_be_bytes([blob[16], blob[17]]));
    let records = 16 + 2 + name_len + 4;
    let mut relaxed = 0;
    for i in 0..snapshot.conns.len() {
        let at = records + i * RECORD_LEN;
        if blob[at + PROTOCOL_AT] == IpProtocol::TCP.0 {
            for flags in PEER_FLAGS_AT {
                blob[at + flags] |= peer_flags::BE_LIBERAL;
            }
            relaxed += 1;
        }
    }
    let body = blob.len() - 4;
    let crc = crc32(&blob[..body]);
    blob[body..].copy_from_slice(&crc.to_be_bytes());
    Ok(relaxed)
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
    if version != VERSION && version != 1 {
        return Err(StateError::UnsupportedVersion(version));
    }
    let record_len = if version == 1 { RECORD_LEN_V1 } else { RECORD_LEN };
    if blob.len() < MAGIC.len() + 2 + 8 + 2 + 4 + 4 {
        return Err(StateError::Truncated);
    }
    // A blob shorter than its header declares was cut (a file truncated, a
    // transfer cut short): said as such, before the checksum it also fails.
    let name_len = usize::from(u16::from_be_bytes([blob[16], blob[17]]));
    if let Some(c) = blob.get(18 + name_len..22 + name_len) {
        let count = u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize;
        let declared = 22 + name_len + count.min(MAX_RECORDS as usize) * record_len + 4;
        if blob.len() < declared && count <= MAX_RECORDS as usize {
            return Err(StateError::Cut {
                len: blob.len(),
                declared,
            });
        }
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
    if count > MAX_RECORDS || r.0.len() != count as usize * record_len {
        return Err(StateError::Malformed("record count disagrees with the blob length"));
    }
    let mut conns = Vec::with_capacity(count as usize);
    for _ in 0..count {
        conns.push(read_record(&mut r, version)?);
    }
    Ok(Snapshot {
        vnic,
        policy_version,
        conns,
    })
}

/// Read one record of a blob of `version`.
fn read_record(r: &mut Reader<'_>, version: u16) -> Result<ConnRecord, StateError> {
    let segment = r.u32()?;
    let mut key = FlowKey {
        segment: segment_from_raw(segment).ok_or(StateError::Malformed("bad segment"))?,
        src: r.arr()?,
        dst: r.arr()?,
        src_port: r.u16()?,
        dst_port: r.u16()?,
        protocol: IpProtocol(r.u8()?),
        icmp_type: 0,
        icmp_code: 0,
    };
    if version == 1 {
        v1_icmp_fields(&mut key);
    } else {
        (key.icmp_type, key.icmp_code) = (r.u8()?, r.u8()?);
    }
    let state = ConnState::from_code(r.u8()?).ok_or(StateError::Malformed("bad connection state"))?;
    let flags = r.u8()?;
    let (age, idle, packets, bytes) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
    let mut tcp = TcpTrack::default();
    if version == 1 {
        for p in &mut tcp.peers {
            p.end = r.u32()?;
            p.limit = r.u32()?;
            p.max_win = r.u32()?;
            p.wscale = r.u8()?.min(14);
            let seen = r.u8()? != 0;
            let _fin = r.u8()?;
            if !seen {
                p.max_win = 0;
            }
            p.flags = peer_flags::BE_LIBERAL | peer_flags::SACK_PERM;
        }
        if !matches!(state, ConnState::SynSent | ConnState::New) {
            tcp.last.flags |= last_flags::SEEN_REPLY;
        }
        if matches!(state, ConnState::Established) {
            tcp.last.flags |= last_flags::ASSURED;
        }
    } else {
        for p in &mut tcp.peers {
            p.end = r.u32()?;
            p.limit = r.u32()?;
            p.max_win = r.u32()?;
            p.max_ack = r.u32()?;
            p.wscale = r.u8()?.min(14);
            p.flags = r.u8()?;
        }
        let last = &mut tcp.last;
        last.set_index_code(r.u8()?);
        last.ack = r.u32()?;
        last.end = r.u32()?;
        last.win = r.u16()?;
        last.wscale = r.u8()?.min(14);
        last.flags = r.u8()?;
    }
    Ok(ConnRecord {
        key,
        state,
        strict: flags & 1 != 0,
        trusted: flags & 2 != 0,
        revalidate: flags & 4 != 0,
        age,
        idle,
        packets,
        bytes,
        tcp,
    })
}

/// Decode one version-2 record ([`RECORD_LEN`] bytes, as [`push_record`]
/// writes it). Its fields are checked as in a blob; the caller checks its
/// integrity (a blob's checksum, a journal record's own).
pub fn decode_record(bytes: &[u8]) -> Result<ConnRecord, StateError> {
    if bytes.len() != RECORD_LEN {
        return Err(StateError::Truncated);
    }
    read_record(&mut Reader(bytes), VERSION)
}

/// The ICMP fields of a version-1 key, which had none: an echo request's
/// (the only echo that opened connections) when the ports are equal (both
/// the identifier), else the type and code its destination port held.
fn v1_icmp_fields(key: &mut FlowKey) {
    let request = match key.protocol {
        IpProtocol::ICMP => 8,
        IpProtocol::ICMPV6 => 128,
        _ => return,
    };
    (key.icmp_type, key.icmp_code) = if key.src_port == key.dst_port {
        (request, 0)
    } else {
        let [ty, code] = key.dst_port.to_be_bytes();
        (ty, code)
    };
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

    /// The checksum is the standard CRC-32: its check value, and a byte at
    /// a time from the reflected polynomial (as written before) on odd sizes.
    #[test]
    fn crc32_is_the_standard_one() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
        let bitwise = |data: &[u8]| {
            let mut crc = !0u32;
            for &b in data {
                crc ^= u32::from(b);
                for _ in 0..8 {
                    crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
                }
            }
            !crc
        };
        let data: Vec<u8> = (0..3000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for n in [1, 3, 15, 16, 17, 63, 64, 65, 1000, 3000] {
            assert_eq!(crc32(&data[..n]), bitwise(&data[..n]), "{n} bytes");
        }
    }

    fn conn() -> Conn {
        let key = FlowKey {
            segment: Segment::vlan(100),
            src: [1; 16],
            dst: [2; 16],
            src_port: 1,
            dst_port: 2,
            protocol: IpProtocol::TCP,
            icmp_type: 0,
            icmp_code: 0,
        };
        let mut c = Conn::new(key, 10);
        c.state = ConnState::Established;
        c.tcp.peers[0].end = 77;
        c.tcp.peers[1].max_win = 9;
        c.tcp.peers[1].flags = peer_flags::SACK_PERM | peer_flags::MAXACK_SET;
        c.tcp.last.set_index_code(0x13);
        c.tcp.last.end = 1234;
        c.tcp.last.flags = last_flags::SEEN_REPLY | last_flags::ASSURED;
        c.packets = 3;
        c
    }

    /// A version-1 blob as this engine's previous release wrote it: one
    /// TCP connection and one ICMP echo connection.
    #[test]
    fn version_1_blobs_are_still_read() {
        let mut body = Vec::new();
        body.extend_from_slice(b"PLSDCT");
        body.extend_from_slice(&1u16.to_be_bytes());
        body.extend_from_slice(&7u64.to_be_bytes());
        body.extend_from_slice(&3u16.to_be_bytes());
        body.extend_from_slice(b"a.0");
        body.extend_from_slice(&2u32.to_be_bytes());
        for (proto, ports, state) in [(6u8, [1u16, 2], 2u8), (1, [0x1234, 0x1234], 6)] {
            body.extend_from_slice(&Segment::UNTAGGED.raw().to_be_bytes());
            for last in [1, 2] {
                body.extend_from_slice(&core::net::Ipv4Addr::new(10, 0, 0, last).to_ipv6_mapped().octets());
            }
            body.extend_from_slice(&ports[0].to_be_bytes());
            body.extend_from_slice(&ports[1].to_be_bytes());
            body.extend_from_slice(&[proto, state, 1]);
            for v in [5u64, 1, 3, 300] {
                body.extend_from_slice(&v.to_be_bytes());
            }
            for seen in [1u8, 1] {
                for v in [100u32, 200, 300] {
                    body.extend_from_slice(&v.to_be_bytes());
                }
                body.extend_from_slice(&[2, seen, 0]);
            }
        }
        let crc = crc32(&body);
        body.extend_from_slice(&crc.to_be_bytes());
        let s = decode(&body).unwrap();
        let (tcp, echo) = (&s.conns[0], &s.conns[1]);
        assert_eq!(
            (tcp.key.protocol, tcp.state, tcp.strict),
            (IpProtocol::TCP, ConnState::Established, true)
        );
        assert_eq!((tcp.tcp.peers[0].end, tcp.tcp.peers[1].limit), (100, 200));
        assert!(tcp.tcp.peers.iter().all(|p| p.flags & peer_flags::BE_LIBERAL != 0));
        assert!(tcp.tcp.seen_reply());
        assert_eq!((echo.key.icmp_type, echo.key.icmp_code), (8, 0), "an echo request's");
        assert!(echo.key.is_echo_request());
    }

    #[test]
    fn relaxing_windows_marks_every_tcp_side_and_nothing_else() {
        let mut udp = conn();
        udp.key.protocol = IpProtocol::UDP;
        udp.tcp = TcpTrack::default();
        let mut blob = encode("host", 7, &[conn(), udp.clone()], 110);
        let before = decode(&blob).unwrap();
        assert!(
            before.conns[0]
                .tcp
                .peers
                .iter()
                .all(|p| p.flags & peer_flags::BE_LIBERAL == 0)
        );
        assert_eq!(relax_tcp_windows(&mut blob), Ok(1));
        let after = decode(&blob).expect("still sealed");
        let (tcp, other) = (&after.conns[0], &after.conns[1]);
        for (p, q) in tcp.tcp.peers.iter().zip(&before.conns[0].tcp.peers) {
            assert_eq!(p.flags, q.flags | peer_flags::BE_LIBERAL);
            assert_eq!(
                (p.end, p.limit, p.max_win, p.max_ack, p.wscale),
                (q.end, q.limit, q.max_win, q.max_ack, q.wscale)
            );
        }
        assert_eq!(tcp.tcp.last, before.conns[0].tcp.last);
        assert_eq!(other, &before.conns[1], "a UDP record is untouched");
        // A damaged blob is refused, not patched.
        let mut bad = blob.clone();
        bad[30] ^= 1;
        let copy = bad.clone();
        assert!(relax_tcp_windows(&mut bad).is_err());
        assert_eq!(bad, copy);
    }

    #[test]
    fn relaxing_decoded_state_is_relaxing_the_blob() {
        let mut udp = conn();
        udp.key.protocol = IpProtocol::UDP;
        let mut blob = encode("h", 3, &[conn(), udp], 110);
        let mut decoded = decode(&blob).unwrap();
        assert_eq!(relax_tcp_windows(&mut blob).unwrap(), 1);
        assert_eq!(decoded.relax_tcp_windows(), 1);
        assert_eq!(decoded, decode(&blob).unwrap());
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
