//! A tiny authoritative DNS responder for the lab's `.lab` names.
//!
//! It answers A queries for `<vm>.lab` (and `<vnic>.lab`) from the inventory,
//! over UDP, so guests can resolve each other with busybox `nslookup` and the
//! demo can show DNS flows through the firewall. Queries are untrusted input:
//! every read is bounds-checked, anything malformed is dropped without an
//! answer, and nothing here panics.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};

use palisade_policy::model::Inventory;

/// The zone the responder is authoritative for.
pub const DOMAIN: &str = "lab";

/// Header length (RFC 1035 §4.1.1).
const HEADER_LEN: usize = 12;
const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_REFUSED: u8 = 5;
const TTL: u32 = 60;

/// Name → IPv4 address table, names lowercase and without the trailing dot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Records {
    map: BTreeMap<String, Ipv4Addr>,
}

impl Records {
    /// An empty table.
    pub fn new() -> Records {
        Records::default()
    }

    /// Add `name` (with or without `.lab`).
    pub fn insert(&mut self, name: &str, ip: Ipv4Addr) {
        let mut n = name.trim_end_matches('.').to_ascii_lowercase();
        if !n.ends_with(&format!(".{DOMAIN}")) {
            n = format!("{n}.{DOMAIN}");
        }
        self.map.insert(n, ip);
    }

    /// The address of `name` (fully qualified, any case, trailing dot optional).
    pub fn get(&self, name: &str) -> Option<Ipv4Addr> {
        self.map.get(&name.trim_end_matches('.').to_ascii_lowercase()).copied()
    }

    /// `<vm>.lab` for each VM (its first IPv4 address) and `<vnic>.lab` for each vNIC.
    pub fn from_inventory(inv: &Inventory) -> Records {
        let mut r = Records::new();
        for vm in &inv.vms {
            for (i, nic) in vm.vnics.iter().enumerate() {
                let Some(v4) = nic.ips.iter().find_map(|ip| match ip {
                    std::net::IpAddr::V4(a) => Some(*a),
                    std::net::IpAddr::V6(_) => None,
                }) else {
                    continue;
                };
                if i == 0 || r.get(&format!("{}.{DOMAIN}", vm.name)).is_none() {
                    r.insert(&vm.name, v4);
                }
                r.insert(&nic.name, v4);
            }
        }
        r
    }

    /// The zone-file text: one `NAME IPV4` line per record.
    pub fn to_zone_file(&self) -> String {
        self.map.iter().map(|(n, ip)| format!("{n} {ip}\n")).collect()
    }

    /// Parse a zone file: `NAME IPV4` per line; `#` comments and blank lines ignored.
    pub fn parse_zone_file(text: &str) -> Result<Records, String> {
        let mut r = Records::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut it = line.split_whitespace();
            let (Some(name), Some(ip), None) = (it.next(), it.next(), it.next()) else {
                return Err(format!("line {}: expected `NAME IPV4`", i + 1));
            };
            let ip: Ipv4Addr = ip
                .parse()
                .map_err(|_| format!("line {}: bad IPv4 address {ip:?}", i + 1))?;
            r.insert(name, ip);
        }
        Ok(r)
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A parsed question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// Query id.
    pub id: u16,
    /// Whether recursion was desired (echoed back).
    pub rd: bool,
    /// The name, lowercase, dot-separated, no trailing dot.
    pub name: String,
    /// QTYPE.
    pub qtype: u16,
    /// QCLASS.
    pub qclass: u16,
    /// Where the question section ends (the answer copies it).
    pub end: usize,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at + 2)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

/// Parse a standard query with exactly one question; `None` for anything else
/// (responses, other opcodes, compression pointers, truncated data).
pub fn parse_query(b: &[u8]) -> Option<Question> {
    if b.len() < HEADER_LEN {
        return None;
    }
    let id = be16(b, 0)?;
    let flags = be16(b, 2)?;
    let qr = flags & 0x8000 != 0;
    let opcode = (flags >> 11) & 0xf;
    if qr || opcode != 0 || be16(b, 4)? != 1 || be16(b, 6)? != 0 || be16(b, 8)? != 0 {
        return None;
    }
    let mut at = HEADER_LEN;
    let mut labels: Vec<String> = Vec::new();
    let mut total = 0usize;
    loop {
        let len = *b.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        // 0xC0 = compression pointer, 0x40/0x80 = reserved label types: none
        // belongs in a question we answer.
        if len & 0xc0 != 0 {
            return None;
        }
        let label = b.get(at..at + len)?;
        at += len;
        total += len + 1;
        if total > 255 {
            return None;
        }
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
    }
    let qtype = be16(b, at)?;
    let qclass = be16(b, at + 2)?;
    Some(Question {
        id,
        rd: flags & 0x0100 != 0,
        name: labels.join("."),
        qtype,
        qclass,
        end: at + 4,
    })
}

/// The response to query `b`, or `None` to stay silent (malformed input).
pub fn respond(records: &Records, b: &[u8]) -> Option<Vec<u8>> {
    let q = parse_query(b)?;
    let in_zone = q.name == DOMAIN || q.name.ends_with(&format!(".{DOMAIN}"));
    let addr = records.get(&q.name);
    let (rcode, answer) = if !in_zone {
        (RCODE_REFUSED, None)
    } else if let Some(ip) = addr {
        // Known name: an A record for A (or ANY) in class IN, else no data.
        let wants = (q.qtype == TYPE_A || q.qtype == 255) && (q.qclass == CLASS_IN || q.qclass == 255);
        (0, wants.then_some(ip))
    } else {
        (RCODE_NXDOMAIN, None)
    };
    let mut out = Vec::with_capacity(q.end + 16);
    out.extend_from_slice(&q.id.to_be_bytes());
    // QR, AA (authoritative for .lab), RD copied.
    let mut flags: u16 = 0x8000 | u16::from(rcode);
    if in_zone {
        flags |= 0x0400;
    }
    if q.rd {
        flags |= 0x0100;
    }
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&u16::from(answer.is_some()).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    // The question as received (parse_query checked it lies within `b`).
    out.extend_from_slice(b.get(HEADER_LEN..q.end)?);
    if let Some(ip) = answer {
        out.extend_from_slice(&[0xc0, HEADER_LEN as u8]);
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&TTL.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
    }
    Some(out)
}

/// Answer queries on `sock` until `stop` is set (checked whenever a read
/// times out, so give the socket a read timeout) or a socket error other than
/// an interrupted or timed-out read.
pub fn serve(sock: &UdpSocket, records: &Records, stop: Option<&AtomicBool>) -> std::io::Result<()> {
    let mut buf = [0u8; 1500];
    loop {
        if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            return Ok(());
        }
        let (n, peer) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e),
        };
        if let Some(resp) = respond(records, &buf[..n]) {
            // A lost answer is the client's retry to make.
            let _ = sock.send_to(&resp, peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&id.to_be_bytes());
        b.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for l in name.split('.') {
            b.push(l.len() as u8);
            b.extend_from_slice(l.as_bytes());
        }
        b.push(0);
        b.extend_from_slice(&qtype.to_be_bytes());
        b.extend_from_slice(&1u16.to_be_bytes());
        b
    }

    fn records() -> Records {
        let mut r = Records::new();
        r.insert("web-1", Ipv4Addr::new(10, 0, 1, 11));
        r.insert("db-1.lab.", Ipv4Addr::new(10, 0, 3, 31));
        r
    }

    /// (what, query, expected rcode, expected answer); `None` rcode: no response.
    type Case = (&'static str, Vec<u8>, Option<u8>, Option<Ipv4Addr>);

    #[test]
    fn table() {
        let r = records();
        let cases: Vec<Case> = vec![
            (
                "known A",
                query(7, "web-1.lab", TYPE_A),
                Some(0),
                Some(Ipv4Addr::new(10, 0, 1, 11)),
            ),
            (
                "case-insensitive",
                query(8, "WEB-1.Lab", TYPE_A),
                Some(0),
                Some(Ipv4Addr::new(10, 0, 1, 11)),
            ),
            (
                "trailing-dot insert",
                query(9, "db-1.lab", TYPE_A),
                Some(0),
                Some(Ipv4Addr::new(10, 0, 3, 31)),
            ),
            ("known AAAA: no data", query(10, "web-1.lab", 28), Some(0), None),
            (
                "unknown in zone",
                query(11, "nope.lab", TYPE_A),
                Some(RCODE_NXDOMAIN),
                None,
            ),
            (
                "outside zone",
                query(12, "example.com", TYPE_A),
                Some(RCODE_REFUSED),
                None,
            ),
            ("empty", vec![], None, None),
            ("short header", vec![0; 11], None, None),
            (
                "truncated name",
                query(13, "web-1.lab", TYPE_A)[..16].to_vec(),
                None,
                None,
            ),
            (
                "missing qtype",
                query(14, "web-1.lab", TYPE_A)[..23].to_vec(),
                None,
                None,
            ),
            (
                "label past end",
                {
                    let mut q = query(15, "web-1.lab", TYPE_A);
                    q[12] = 60;
                    q
                },
                None,
                None,
            ),
            (
                "compression pointer",
                {
                    let mut q = query(16, "web-1.lab", TYPE_A);
                    q[12] = 0xc0;
                    q
                },
                None,
                None,
            ),
            (
                "response, not query",
                {
                    let mut q = query(17, "web-1.lab", TYPE_A);
                    q[2] |= 0x80;
                    q
                },
                None,
                None,
            ),
            (
                "two questions",
                {
                    let mut q = query(18, "web-1.lab", TYPE_A);
                    q[5] = 2;
                    q
                },
                None,
                None,
            ),
            (
                "opcode 2",
                {
                    let mut q = query(19, "web-1.lab", TYPE_A);
                    q[2] |= 0x10;
                    q
                },
                None,
                None,
            ),
        ];
        for (what, q, rcode, answer) in cases {
            let resp = respond(&r, &q);
            match rcode {
                None => assert!(resp.is_none(), "{what}: expected silence"),
                Some(rc) => {
                    let resp = resp.unwrap_or_else(|| panic!("{what}: no response"));
                    assert_eq!(&resp[..2], &q[..2], "{what}: id");
                    assert_eq!(resp[2] & 0x80, 0x80, "{what}: QR");
                    assert_eq!(resp[3] & 0x0f, rc, "{what}: rcode");
                    let ancount = u16::from_be_bytes([resp[6], resp[7]]);
                    match answer {
                        Some(ip) => {
                            assert_eq!(ancount, 1, "{what}");
                            assert_eq!(&resp[resp.len() - 4..], &ip.octets(), "{what}");
                            assert_eq!(resp.len(), q.len() + 16, "{what}");
                        }
                        None => assert_eq!(ancount, 0, "{what}"),
                    }
                }
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let r = records();
        let mut x: u32 = 0x1234_5678;
        for len in 0..300 {
            let mut b = query(1, "web-1.lab", TYPE_A);
            b.resize(len, 0);
            for byte in b.iter_mut().skip(2) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                if x % 4 == 0 {
                    *byte = x as u8;
                }
            }
            let _ = respond(&r, &b);
        }
    }

    #[test]
    fn zone_file_round_trip() {
        let r = records();
        let text = r.to_zone_file();
        assert_eq!(Records::parse_zone_file(&text).unwrap(), r);
        assert!(Records::parse_zone_file("a.lab not-an-ip").is_err());
        assert!(Records::parse_zone_file("a.lab 1.2.3.4 extra").is_err());
        assert_eq!(Records::parse_zone_file("# c\n\n x 1.2.3.4 # y\n").unwrap().len(), 1);
    }
}
