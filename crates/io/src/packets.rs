//! Minimal packet builders for the steering tests (unit and kernel tests
//! share them). Headers carry what the steering hash reads; checksums are
//! left zero. Not part of the stable API.

use std::net::Ipv6Addr;

/// An IPv4 packet (20-byte header) with protocol `proto`, flags and fragment
/// offset `frag`, and `payload`.
pub fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, frag: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 0, 0x12, 0x34];
    p.extend_from_slice(&frag.to_be_bytes());
    p.extend_from_slice(&[64, proto, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(payload);
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p
}

/// An IPv6 packet with next header `next` and `payload`.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// A TCP or UDP header's worth of bytes with these ports.
pub fn ports(sport: u16, dport: u16) -> Vec<u8> {
    let mut p = sport.to_be_bytes().to_vec();
    p.extend_from_slice(&dport.to_be_bytes());
    p.resize(20, 0);
    p
}

/// An ICMP(v6) message of `icmp_type` quoting `quoted`.
pub fn icmp(icmp_type: u8, quoted: &[u8]) -> Vec<u8> {
    let mut p = vec![icmp_type, 0, 0, 0, 0, 0, 0, 0];
    p.extend_from_slice(quoted);
    p
}

/// An Ethernet frame.
pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, packet: &[u8]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(packet);
    f
}

/// `frame` with a VLAN tag (`tpid`, `tci`) inserted after its addresses.
pub fn tagged(tpid: u16, tci: u16, frame: &[u8]) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&tpid.to_be_bytes());
    f.extend_from_slice(&tci.to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}
