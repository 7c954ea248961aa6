//! The compact encoding of one vNIC's connections on a live migration's
//! agent-to-agent channel: a pre-copy (every connection) or a delta
//! (connections created or changed since, and the keys of those removed).
//!
//! Not the crash-snapshot format ([`crate::state`], fixed-size records a
//! journal can patch in place): this one is written once, read once, and
//! made small, because its bytes are on the wire inside the guest's pause.
//! What makes it small:
//!
//! - addresses and segments go once into tables at the front; a key names
//!   them by index (a vNIC's connections share its own address and a few
//!   peers'), an IPv4 address takes 4 bytes there;
//! - numbers are LEB128 varints; times are milliseconds (an age, and the
//!   idle time from which the importer computes the remaining timeout);
//! - TCP sequence fields go relative to the side's `end`, so a window or an
//!   acknowledgment costs what its size needs.
//!
//! Layout (multi-byte fixed fields big-endian):
//!
//! ```text
//! magic "PLSDMX" | version u8 (1) | flags u8 (bit 0: full)
//! | policy_version varint | name_len varint | name (UTF-8)
//! | n_addrs varint | n_addrs × (4 bytes IPv4 | 0x06 then 16 bytes)   (see below)
//! | n_segments varint | n_segments × segment u32
//! | count varint | count × record | n_removed varint | n_removed × key
//! | crc32 u32 (over everything before it)
//! address: tag u8 (4: 4 bytes follow, IPv4-mapped; 6: 16 bytes follow)
//! key:     head u8 (protocol class: 0 TCP, 1 UDP, 2 ICMP, 3 ICMPv6, 4 other,
//!          then a protocol byte) | segment index varint | src index varint
//!          | dst index varint | src_port u16 | dst_port u16
//!          | (ICMP, ICMPv6) icmp_type u8 | icmp_code u8
//! record:  key | sf u8 (state code bits 0-3; 4 strict, 5 trusted, 6 revalidate)
//!          | age_ms varint | idle_ms varint | packets varint | bytes varint
//!          | (TCP) 2 × (end u32 | max_win varint)
//!          | 2 × (zigzag(limit − end − other side's max_win) varint
//!          |      | zigzag(max_ack − other side's end) varint)
//!          | wscale u8 (initiator << 4 | responder) | 2 × flags u8
//!          | last: code u8 (index_code; bit 5: a wscale follows;
//!          |       bit 6: end and ack are zero, not written)
//!          |       | (not bit 6) zigzag(end − its side's end) varint
//!          |       | (not bit 6) zigzag(ack − other side's end) varint | win varint
//!          |       | (bit 5) wscale u8 | flags u8
//! ```
//!
//! The decoder takes hostile input: every count is bounded by the bytes
//! left, every index by its table, the checksum is checked before anything
//! is read, and a blob is taken whole or refused with a [`StateError`].

use palisade_wire::flow::{FlowKey, Segment};
use palisade_wire::ip::IpProtocol;

use crate::conn_state::ConnState;
use crate::state::{ConnRecord, MAX_RECORDS, StateError, crc32};
use crate::tcptrack::TcpTrack;

const MAGIC: &[u8; 6] = b"PLSDMX";
/// The transfer format version this build writes and reads.
pub const VERSION: u8 = 1;
const FLAG_FULL: u8 = 1;
const NS_PER_MS: u64 = 1_000_000;
/// The bit of a record's last-segment code saying a window scale follows.
const LAST_WSCALE_BIT: u8 = 5;
/// The bit of a record's last-segment code saying its end and
/// acknowledgment are zero (not written).
const LAST_ZERO_BIT: u8 = 6;
/// The fewest bytes a key takes (head, three indices, two ports).
const MIN_KEY: usize = 1 + 3 + 4;
/// The fewest bytes a record takes (a key, `sf`, four one-byte varints).
const MIN_RECORD: usize = MIN_KEY + 1 + 4;

/// One vNIC's connections in transit: a pre-copy (`full`) or a delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// The vNIC they belong to.
    pub vnic: String,
    /// The exporter's policy version (a record's verdict was reached under
    /// it unless [`ConnRecord::revalidate`] says otherwise).
    pub policy_version: u64,
    /// Every connection is here: the receiver replaces what it holds.
    pub full: bool,
    /// Connections (times relative to the exporter's clock at the export).
    pub conns: Vec<ConnRecord>,
    /// Keys (initiator direction) of connections removed since the pre-copy.
    pub removed: Vec<FlowKey>,
}

/// Addresses and segments, each once, in order of first use.
#[derive(Default)]
struct Tables {
    addrs: Vec<[u8; 16]>,
    addr_index: std::collections::HashMap<[u8; 16], u32>,
    segments: Vec<u32>,
    segment_index: std::collections::HashMap<u32, u32>,
}

impl Tables {
    fn addr(&mut self, a: [u8; 16]) -> u32 {
        let next = self.addrs.len() as u32;
        *self.addr_index.entry(a).or_insert_with(|| {
            self.addrs.push(a);
            next
        })
    }
    fn segment(&mut self, s: u32) -> u32 {
        let next = self.segments.len() as u32;
        *self.segment_index.entry(s).or_insert_with(|| {
            self.segments.push(s);
            next
        })
    }
}

fn put_varint(b: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        b.push((v as u8) | 0x80);
        v >>= 7;
    }
    b.push(v as u8);
}

fn zigzag(d: u32) -> u64 {
    let d = d as i32;
    u64::from(((d << 1) ^ (d >> 31)) as u32)
}

fn unzigzag(v: u32) -> u32 {
    ((v >> 1) as i32 ^ -((v & 1) as i32)) as u32
}

const V4_MAPPED: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

fn class(p: IpProtocol) -> u8 {
    match p {
        IpProtocol::TCP => 0,
        IpProtocol::UDP => 1,
        IpProtocol::ICMP => 2,
        IpProtocol::ICMPV6 => 3,
        _ => 4,
    }
}

fn put_key(b: &mut Vec<u8>, t: &mut Tables, k: &FlowKey) {
    let c = class(k.protocol);
    b.push(c);
    if c == 4 {
        b.push(k.protocol.0);
    }
    put_varint(b, u64::from(t.segment(k.segment.raw())));
    put_varint(b, u64::from(t.addr(k.src)));
    put_varint(b, u64::from(t.addr(k.dst)));
    b.extend_from_slice(&k.src_port.to_be_bytes());
    b.extend_from_slice(&k.dst_port.to_be_bytes());
    if matches!(c, 2 | 3) {
        b.extend_from_slice(&[k.icmp_type, k.icmp_code]);
    }
}

fn put_record(b: &mut Vec<u8>, t: &mut Tables, r: &ConnRecord) {
    put_key(b, t, &r.key);
    b.push(r.state.code() | u8::from(r.strict) << 4 | u8::from(r.trusted) << 5 | u8::from(r.revalidate) << 6);
    for v in [r.age / NS_PER_MS, r.idle / NS_PER_MS, r.packets, r.bytes] {
        put_varint(b, v);
    }
    if r.key.protocol != IpProtocol::TCP {
        return;
    }
    let p = &r.tcp.peers;
    for side in p {
        b.extend_from_slice(&side.end.to_be_bytes());
        put_varint(b, u64::from(side.max_win));
    }
    for (i, side) in p.iter().enumerate() {
        // A side may send up to what the other acknowledged plus the
        // other's window: its limit is usually its end plus the other's
        // largest window, 0 then; its acknowledgments reach the other's end.
        let other = &p[1 - i];
        put_varint(b, zigzag(side.limit.wrapping_sub(side.end).wrapping_sub(other.max_win)));
        put_varint(b, zigzag(side.max_ack.wrapping_sub(other.end)));
    }
    b.push(p[0].wscale.min(15) << 4 | p[1].wscale.min(15));
    b.extend_from_slice(&[p[0].flags, p[1].flags]);
    let last = &r.tcp.last;
    let d = usize::from(last.dir & 1);
    let wscale = last.wscale.min(14);
    // A last segment whose numbers were not kept (both zero) says so.
    let unnumbered = last.end == 0 && last.ack == 0;
    b.push(
        (last.index_code() & 0x1f) | u8::from(wscale != 0) << LAST_WSCALE_BIT | u8::from(unnumbered) << LAST_ZERO_BIT,
    );
    if !unnumbered {
        put_varint(b, zigzag(last.end.wrapping_sub(p[d].end)));
        put_varint(b, zigzag(last.ack.wrapping_sub(p[1 - d].end)));
    }
    put_varint(b, u64::from(last.win));
    if wscale != 0 {
        b.push(wscale);
    }
    b.push(last.flags);
}

/// Encode `t`.
pub fn encode(t: &Transfer) -> Vec<u8> {
    let mut tables = Tables::default();
    let mut body = Vec::with_capacity(t.conns.len() * 48 + t.removed.len() * 12);
    put_varint(&mut body, t.conns.len() as u64);
    for r in &t.conns {
        put_record(&mut body, &mut tables, r);
    }
    put_varint(&mut body, t.removed.len() as u64);
    for k in &t.removed {
        put_key(&mut body, &mut tables, k);
    }
    let name = &t.vnic.as_bytes()[..t.vnic.len().min(u16::MAX as usize)];
    let mut b = Vec::with_capacity(body.len() + 64 + tables.addrs.len() * 17 + name.len());
    b.extend_from_slice(MAGIC);
    b.push(VERSION);
    b.push(if t.full { FLAG_FULL } else { 0 });
    put_varint(&mut b, t.policy_version);
    put_varint(&mut b, name.len() as u64);
    b.extend_from_slice(name);
    put_varint(&mut b, tables.addrs.len() as u64);
    for a in &tables.addrs {
        if a[..12] == V4_MAPPED {
            b.push(4);
            b.extend_from_slice(&a[12..]);
        } else {
            b.push(6);
            b.extend_from_slice(a);
        }
    }
    put_varint(&mut b, tables.segments.len() as u64);
    for s in &tables.segments {
        b.extend_from_slice(&s.to_be_bytes());
    }
    b.extend_from_slice(&body);
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
    fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, StateError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, StateError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn varint(&mut self) -> Result<u64, StateError> {
        let mut v = 0u64;
        for i in 0..10 {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            if i == 9 && bits > 1 {
                return Err(StateError::Malformed("varint overflows 64 bits"));
            }
            v |= bits << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(StateError::Malformed("varint longer than 10 bytes"))
    }
    fn varint32(&mut self, what: &'static str) -> Result<u32, StateError> {
        u32::try_from(self.varint()?).map_err(|_| StateError::Malformed(what))
    }
    /// A count of items of at least `min` bytes each, bounded by what is left.
    fn count(&mut self, min: usize) -> Result<usize, StateError> {
        let n = self.varint()?;
        if n > u64::from(MAX_RECORDS) || n as usize > self.0.len() / min.max(1) {
            return Err(StateError::Malformed("a count exceeds what the blob can hold"));
        }
        Ok(n as usize)
    }
}

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

struct Decoded {
    addrs: Vec<[u8; 16]>,
    segments: Vec<Segment>,
}

impl Decoded {
    fn key(&self, r: &mut Reader<'_>) -> Result<FlowKey, StateError> {
        let c = r.u8()?;
        let protocol = match c {
            0 => IpProtocol::TCP,
            1 => IpProtocol::UDP,
            2 => IpProtocol::ICMP,
            3 => IpProtocol::ICMPV6,
            4 => match IpProtocol(r.u8()?) {
                IpProtocol::TCP | IpProtocol::UDP | IpProtocol::ICMP | IpProtocol::ICMPV6 => {
                    return Err(StateError::Malformed("a key's protocol byte repeats its class"));
                }
                p => p,
            },
            _ => return Err(StateError::Malformed("bad protocol class")),
        };
        let seg = r.varint()?;
        let segment = *usize::try_from(seg)
            .ok()
            .and_then(|i| self.segments.get(i))
            .ok_or(StateError::Malformed("segment index out of its table"))?;
        let mut addr = || -> Result<[u8; 16], StateError> {
            let i = r.varint()?;
            usize::try_from(i)
                .ok()
                .and_then(|i| self.addrs.get(i))
                .copied()
                .ok_or(StateError::Malformed("address index out of its table"))
        };
        let (src, dst) = (addr()?, addr()?);
        let (src_port, dst_port) = (r.u16()?, r.u16()?);
        let (icmp_type, icmp_code) = if matches!(c, 2 | 3) { (r.u8()?, r.u8()?) } else { (0, 0) };
        Ok(FlowKey {
            segment,
            src,
            dst,
            src_port,
            dst_port,
            protocol,
            icmp_type,
            icmp_code,
        })
    }

    fn record(&self, r: &mut Reader<'_>) -> Result<ConnRecord, StateError> {
        let key = self.key(r)?;
        let sf = r.u8()?;
        if sf & 0x80 != 0 {
            return Err(StateError::Malformed("unknown record flag"));
        }
        let state = ConnState::from_code(sf & 0x0f).ok_or(StateError::Malformed("bad connection state"))?;
        let ms = |v: u64| {
            v.checked_mul(NS_PER_MS)
                .ok_or(StateError::Malformed("time out of range"))
        };
        let (age, idle) = (ms(r.varint()?)?, ms(r.varint()?)?);
        let (packets, bytes) = (r.varint()?, r.varint()?);
        let mut tcp = TcpTrack::default();
        if key.protocol == IpProtocol::TCP {
            for side in &mut tcp.peers {
                side.end = r.u32()?;
                side.max_win = r.varint32("TCP window out of range")?;
            }
            let ends = [tcp.peers[0].end, tcp.peers[1].end];
            let wins = [tcp.peers[0].max_win, tcp.peers[1].max_win];
            for (i, side) in tcp.peers.iter_mut().enumerate() {
                let limit = unzigzag(r.varint32("TCP window out of range")?);
                side.limit = side.end.wrapping_add(wins[1 - i]).wrapping_add(limit);
                side.max_ack = ends[1 - i].wrapping_add(unzigzag(r.varint32("TCP acknowledgment out of range")?));
            }
            let ws = r.u8()?;
            tcp.peers[0].wscale = (ws >> 4).min(14);
            tcp.peers[1].wscale = (ws & 0x0f).min(14);
            tcp.peers[0].flags = r.u8()?;
            tcp.peers[1].flags = r.u8()?;
            let last = &mut tcp.last;
            let code = r.u8()?;
            if code & !(0x1f | 1 << LAST_WSCALE_BIT | 1 << LAST_ZERO_BIT) != 0 {
                return Err(StateError::Malformed("bad last-segment code"));
            }
            last.set_index_code(code & 0x1f);
            let d = usize::from(last.dir);
            if code & 1 << LAST_ZERO_BIT == 0 {
                last.end = ends[d].wrapping_add(unzigzag(r.varint32("TCP sequence out of range")?));
                last.ack = ends[1 - d].wrapping_add(unzigzag(r.varint32("TCP sequence out of range")?));
                if last.end == 0 && last.ack == 0 {
                    return Err(StateError::Malformed("a zero last segment written in full"));
                }
            }
            last.win = u16::try_from(r.varint()?).map_err(|_| StateError::Malformed("TCP window out of range"))?;
            if code & 1 << LAST_WSCALE_BIT != 0 {
                last.wscale = r.u8()?;
                if !(1..=14).contains(&last.wscale) {
                    return Err(StateError::Malformed("bad window scale"));
                }
            }
            last.flags = r.u8()?;
        }
        Ok(ConnRecord {
            key,
            state,
            strict: sf & 0x10 != 0,
            trusted: sf & 0x20 != 0,
            revalidate: sf & 0x40 != 0,
            age,
            idle,
            packets,
            bytes,
            tcp,
        })
    }
}

/// Decode and verify a transfer blob: all of it, or an error naming what is wrong.
pub fn decode(blob: &[u8]) -> Result<Transfer, StateError> {
    if blob.len() < MAGIC.len() + 2 + 4 {
        return Err(StateError::Truncated);
    }
    if &blob[..MAGIC.len()] != MAGIC {
        return Err(StateError::BadMagic);
    }
    if blob[6] != VERSION {
        return Err(StateError::UnsupportedVersion(u16::from(blob[6])));
    }
    let (body, tail) = blob.split_at(blob.len() - 4);
    let expected = u32::from_be_bytes([tail[0], tail[1], tail[2], tail[3]]);
    let computed = crc32(body);
    if expected != computed {
        return Err(StateError::BadChecksum { expected, computed });
    }
    let flags = body[7];
    if flags & !FLAG_FULL != 0 {
        return Err(StateError::Malformed("unknown transfer flag"));
    }
    let mut r = Reader(&body[8..]);
    let policy_version = r.varint()?;
    let name_len = r.varint()?;
    if name_len > u64::from(u16::MAX) {
        return Err(StateError::Malformed("vNIC name too long"));
    }
    let vnic = std::str::from_utf8(r.take(name_len as usize)?)
        .map_err(|_| StateError::Malformed("vNIC name is not UTF-8"))?
        .to_string();
    let n_addrs = r.count(5)?;
    let mut addrs = Vec::with_capacity(n_addrs);
    for _ in 0..n_addrs {
        let a = match r.u8()? {
            4 => {
                let mut a = [0u8; 16];
                a[..12].copy_from_slice(&V4_MAPPED);
                a[12..].copy_from_slice(r.take(4)?);
                a
            }
            6 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(r.take(16)?);
                if a[..12] == V4_MAPPED {
                    return Err(StateError::Malformed("an IPv4 address written as IPv6"));
                }
                a
            }
            _ => return Err(StateError::Malformed("bad address tag")),
        };
        addrs.push(a);
    }
    let n_segments = r.count(4)?;
    let mut segments = Vec::with_capacity(n_segments);
    for _ in 0..n_segments {
        segments.push(segment_from_raw(r.u32()?).ok_or(StateError::Malformed("bad segment"))?);
    }
    let d = Decoded { addrs, segments };
    let count = r.count(MIN_RECORD)?;
    let mut conns = Vec::with_capacity(count);
    for _ in 0..count {
        conns.push(d.record(&mut r)?);
    }
    let n_removed = r.count(MIN_KEY)?;
    let mut removed = Vec::with_capacity(n_removed);
    for _ in 0..n_removed {
        removed.push(d.key(&mut r)?);
    }
    if !r.0.is_empty() {
        return Err(StateError::Malformed("bytes after the last removed key"));
    }
    Ok(Transfer {
        vnic,
        policy_version,
        full: flags & FLAG_FULL != 0,
        conns,
        removed,
    })
}

/// `t` as the decoder returns it: times cut to whole milliseconds and
/// window scales to what a TCP option allows (for tests comparing a
/// transfer that went through the encoding with the one that went in).
pub fn as_decoded(t: &Transfer) -> Transfer {
    let mut t = t.clone();
    for c in &mut t.conns {
        c.age -= c.age % NS_PER_MS;
        c.idle -= c.idle % NS_PER_MS;
        if c.key.protocol != IpProtocol::TCP {
            c.tcp = TcpTrack::default();
        }
        for p in &mut c.tcp.peers {
            p.wscale = p.wscale.min(14);
        }
        c.tcp.last.wscale = c.tcp.last.wscale.min(14);
        let code = c.tcp.last.index_code();
        c.tcp.last.set_index_code(code);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcptrack::{TcpIndex, TcpLast, TcpPeer};

    fn key(sport: u16, protocol: IpProtocol) -> FlowKey {
        let mut k = FlowKey {
            segment: Segment::vlan(100),
            src: [0; 16],
            dst: [0; 16],
            src_port: sport,
            dst_port: 443,
            protocol,
            icmp_type: 0,
            icmp_code: 0,
        };
        k.src[..12].copy_from_slice(&V4_MAPPED);
        k.src[12..].copy_from_slice(&[10, 0, 0, 10]);
        k.dst[..12].copy_from_slice(&V4_MAPPED);
        k.dst[12..].copy_from_slice(&[10, 0, 0, 11]);
        k
    }

    fn tcp_record(sport: u16) -> ConnRecord {
        let peer = |end: u32, ack: u32| TcpPeer {
            end,
            limit: end.wrapping_add(64_240),
            max_win: 64_240,
            max_ack: ack,
            wscale: 7,
            flags: 0x0c,
        };
        ConnRecord {
            key: key(sport, IpProtocol::TCP),
            state: ConnState::Established,
            strict: true,
            trusted: false,
            revalidate: false,
            age: 3_600_000 * NS_PER_MS + 17,
            idle: 250 * NS_PER_MS,
            packets: 1_234,
            bytes: 987_654,
            tcp: TcpTrack {
                peers: [peer(4_000_000_000, 12_345), peer(12_345, 4_000_000_000)],
                last: TcpLast {
                    index: TcpIndex::Ack,
                    dir: 1,
                    ack: 4_000_000_000,
                    end: 12_345,
                    win: 501,
                    wscale: 0,
                    flags: 0x30,
                },
            },
        }
    }

    fn sample(n: u16) -> Transfer {
        let mut conns: Vec<ConnRecord> = (0..n).map(|i| tcp_record(40_000 + i)).collect();
        let mut udp = tcp_record(53);
        udp.key = key(5353, IpProtocol::UDP);
        udp.tcp = TcpTrack::default();
        conns.push(udp);
        let mut v6 = tcp_record(1);
        v6.key.src = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a];
        v6.key.protocol = IpProtocol::ICMPV6;
        v6.key.icmp_type = 128;
        v6.revalidate = true;
        conns.push(v6);
        let mut gre = tcp_record(0);
        gre.key.protocol = IpProtocol(47);
        conns.push(gre);
        Transfer {
            vnic: "web-1.0".into(),
            policy_version: 7,
            full: true,
            conns,
            removed: vec![key(39_999, IpProtocol::TCP)],
        }
    }

    #[test]
    fn round_trips_and_is_compact() {
        let t = sample(1000);
        let b = encode(&t);
        assert_eq!(decode(&b).unwrap(), as_decoded(&t));
        // An established TCP connection of a vNIC with one peer: well under
        // the fixed-size record's 126 bytes.
        let per_conn = b.len() / t.conns.len();
        assert!(per_conn <= 48, "{per_conn} bytes per connection");
    }

    /// The established stream the migration benchmark copies (its fields
    /// as an agent exported them), with 251 peers: what a connection costs.
    #[test]
    fn the_benchmarks_connection_takes_at_most_48_bytes() {
        let mut r = tcp_record(1);
        (r.age, r.idle, r.packets, r.bytes) = (32_685 * NS_PER_MS, 80 * NS_PER_MS, 516, 52_951);
        r.tcp.peers[0] = TcpPeer {
            end: 3_113_559_183,
            limit: 3_113_559_183u32.wrapping_add(65_536),
            max_win: 64_296,
            max_ack: 3_276_557_873,
            wscale: 5,
            flags: 0x23,
        };
        r.tcp.peers[1] = TcpPeer {
            end: 3_276_558_273,
            limit: 3_276_558_273u32.wrapping_add(63_696),
            max_win: 65_536,
            max_ack: 3_113_559_183,
            wscale: 10,
            flags: 0x33,
        };
        r.tcp.last = TcpLast::default();
        r.tcp.last.set_index_code(0x13);
        let conns: Vec<ConnRecord> = (0..1000u16)
            .map(|i| {
                let mut c = r.clone();
                c.key.src_port = 1024 + i;
                c.key.dst[15] = (i % 251) as u8 + 2;
                c
            })
            .collect();
        let t = Transfer {
            vnic: "vm1.0".into(),
            policy_version: 1,
            full: true,
            conns,
            removed: Vec::new(),
        };
        let b = encode(&t);
        assert_eq!(decode(&b).unwrap(), as_decoded(&t));
        assert!(b.len() <= 48 * 1000, "{} bytes per connection", b.len() as f64 / 1000.0);
    }

    #[test]
    fn hostile_blobs_are_refused_with_a_reason() {
        let b = encode(&sample(3));
        // Every truncation, and every single-bit flip, is refused.
        for n in 0..b.len() {
            assert!(decode(&b[..n]).is_err(), "truncated to {n}");
        }
        for i in 0..b.len() {
            let mut x = b.clone();
            x[i] ^= 0x10;
            assert!(decode(&x).is_err(), "flip at {i}");
        }
        let mut junk = b.clone();
        junk.truncate(junk.len() - 4);
        junk.push(0);
        let crc = crc32(&junk);
        junk.extend_from_slice(&crc.to_be_bytes());
        assert_eq!(
            decode(&junk),
            Err(StateError::Malformed("bytes after the last removed key"))
        );
        assert_eq!(decode(b"PLSDCT\x00\x02nope"), Err(StateError::BadMagic));
        // A count claiming more than the bytes can hold allocates nothing.
        let mut huge = Vec::new();
        huge.extend_from_slice(MAGIC);
        huge.extend_from_slice(&[VERSION, 0, 0, 0, 0, 0]);
        put_varint(&mut huge, 1 << 19);
        let crc = crc32(&huge);
        huge.extend_from_slice(&crc.to_be_bytes());
        assert_eq!(
            decode(&huge),
            Err(StateError::Malformed("a count exceeds what the blob can hold"))
        );
    }

    #[test]
    fn varints_and_zigzag_cover_their_range() {
        for v in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(Reader(&b).varint(), Ok(v));
        }
        assert!(Reader(&[0xff; 10]).varint().is_err());
        assert!(Reader(&[0xff; 11]).varint().is_err());
        for d in [0u32, 1, u32::MAX, 0x8000_0000, 0x7fff_ffff, 12345] {
            assert_eq!(unzigzag(zigzag(d) as u32), d);
        }
    }
}
