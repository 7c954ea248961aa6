//! Rendering: the frames a decision sends, written into the caller's buffers.
//!
//! Free functions over a [`Processed`] (the engine's decision paired with
//! its frame) and one of its [`Output`]s or its [`Reply`]: a copy for a
//! local port (tagged with its VLAN when it leaves on a plain uplink), a
//! VXLAN-GBP packet for the uplink or just its UDP payload for the underlay
//! socket, and the TCP reset or ICMP "administratively prohibited" that
//! answers a rejected packet. They read the frame and the decision only,
//! never the engine.

use core::net::IpAddr;

use palisade_wire::ethernet::{self, EtherType, EthernetAddress};
use palisade_wire::ip::IpProtocol;
use palisade_wire::ipv4::{self, Ipv4Repr};
use palisade_wire::tcp::{self, TcpFlags};
use palisade_wire::virtio_net::Offload;
use palisade_wire::{icmpv4, icmpv6, ipv6, udp, vlan, vxlan};

use crate::decision::{Encap, Output, Processed, Reply};
use crate::port::UPLINK;

/// Errors rendering an output frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The buffer cannot hold the frame.
    #[error("output buffer too small: need {0} bytes")]
    BufferTooSmall(usize),
    /// The frame is too large to encapsulate in one IPv4 packet.
    #[error("frame of {0} bytes too large to encapsulate")]
    TooLarge(usize),
}

/// Outer headers of an encapsulated copy: Ethernet, IPv4, UDP, VXLAN.
const OUTER_LEN: usize = ethernet::HEADER_LEN + ipv4::HEADER_LEN + udp::HEADER_LEN + vxlan::HEADER_LEN;

/// Write `out` (one of `p`'s outputs) into `buf`, as it leaves its port: the
/// frame (tagged with its segment's VLAN on a plain uplink), or for a copy
/// to another host the whole VXLAN-GBP packet. Returns its length.
pub fn render(p: &Processed<'_>, out: &Output, buf: &mut [u8]) -> Result<usize, RenderError> {
    let l2 = p.layout;
    // A `Processed` carries the frame its offsets were taken from.
    let payload = p.frame.get(l2.payload()..).unwrap_or(&[]);
    let macs = p.frame.get(l2.eth()..l2.eth() + 12).unwrap_or(&[0; 12]);
    let tag = match (out.port, out.encap) {
        (UPLINK, None) => l2.segment.vlan_id(),
        _ => None,
    };
    let inner_len = ethernet::HEADER_LEN + tag.map_or(0, |_| vlan::HEADER_LEN) + payload.len();
    let outer_len = if out.encap.is_some() { OUTER_LEN } else { 0 };
    let total = outer_len + inner_len;
    if buf.len() < total {
        return Err(RenderError::BufferTooSmall(total));
    }
    let buf = &mut buf[..total];
    if let Some(e) = out.encap {
        let up = &p.underlay;
        let mut eth = ethernet::Frame::new_unchecked(&mut buf[..14]);
        eth.set_dst_addr(up.gateway_mac);
        eth.set_src_addr(up.local_mac);
        eth.set_ethertype(EtherType::IPV4);
        let udp_len = udp::HEADER_LEN + vxlan::HEADER_LEN + inner_len;
        if ipv4::HEADER_LEN + udp_len > usize::from(u16::MAX) {
            return Err(RenderError::TooLarge(inner_len));
        }
        let ip = Ipv4Repr {
            src_addr: up.local_ip,
            dst_addr: e.remote,
            protocol: IpProtocol::UDP,
            payload_len: udp_len,
            ttl: 64,
            dscp: 0,
            ecn: 0,
            ident: 0,
            dont_frag: true,
            more_frags: false,
            frag_offset: 0,
            options: &[],
        };
        ip.emit(&mut ipv4::Packet::new_unchecked(&mut buf[14..34]));
        let mut u = udp::Packet::new_unchecked(&mut buf[34..42]);
        u.set_src_port(e.source_port);
        u.set_dst_port(vxlan::VXLAN_PORT);
        u.set_len(udp_len as u16);
        // RFC 7348: a zero UDP checksum over IPv4 (the inner frame carries its own).
        u.set_checksum(0);
        emit_vxlan(&e, &mut buf[42..50]);
    }
    write_inner(&mut buf[outer_len..], macs, tag, l2.ethertype, payload);
    Ok(total)
}

/// The offload state of the frame [`render`] writes for `out`: the
/// frame's own ([`Processed::offload`]) with its checksum start and
/// repeated header length moved as rendering moved the payload (a VLAN
/// tag put in or taken out, a VXLAN header taken off or put on). `None`
/// when the copy cannot carry it: a super-frame inside a whole VXLAN
/// packet for a plain uplink (tunnel segmentation is not described by a
/// virtio-net header here); such a frame must be segmented before it is
/// processed. A plain frame gives [`Offload::NONE`].
pub fn render_offload(p: &Processed<'_>, out: &Output) -> Option<Offload> {
    if p.offload == Offload::NONE {
        return Some(Offload::NONE);
    }
    let l2 = p.layout;
    let tag = match (out.port, out.encap) {
        (UPLINK, None) => l2.segment.vlan_id(),
        _ => None,
    };
    if out.encap.is_some() && p.offload.is_gso() {
        return None;
    }
    let outer = if out.encap.is_some() { OUTER_LEN } else { 0 };
    let to = outer + ethernet::HEADER_LEN + tag.map_or(0, |_| vlan::HEADER_LEN);
    moved(&p.offload, l2.payload(), to)
}

/// The offload state of the frame in what [`render_overlay`] writes,
/// counted from the frame (after the VXLAN header), as the underlay
/// socket takes it with its prefix (`palisade_io`'s `send_super_frame`);
/// see [`render_offload`].
pub fn render_overlay_offload(p: &Processed<'_>) -> Option<Offload> {
    if p.offload == Offload::NONE {
        return Some(Offload::NONE);
    }
    moved(&p.offload, p.layout.payload(), ethernet::HEADER_LEN)
}

/// `offload` for the frame whose payload (the IP packet), at `from` in the
/// frame it came with, is rendered at `to`: the offsets past the L2
/// headers move with it. The engine refuses a partial checksum that starts
/// before `from`. `None` if an offset would not fit 16 bits.
fn moved(offload: &Offload, from: usize, to: usize) -> Option<Offload> {
    let shift = |v: u16| -> Option<u16> { u16::try_from(usize::from(v).checked_sub(from)? + to).ok() };
    let mut o = *offload;
    if let Some(c) = &mut o.csum {
        c.start = shift(c.start)?;
    }
    if let Some(g) = &mut o.gso {
        // A hint only (segmentation parses the headers); one inside the L2
        // headers says nothing useful and is left to the parse.
        g.header_len = shift(g.header_len).unwrap_or(0);
    }
    Some(o)
}

/// Write a copy of `p`'s frame for another host as the payload of a UDP
/// datagram for the underlay socket (the VXLAN-GBP header, then the frame);
/// it goes to `encap.remote`. Returns its length. Copies to local ports use
/// [`render`].
pub fn render_overlay(p: &Processed<'_>, encap: &Encap, buf: &mut [u8]) -> Result<usize, RenderError> {
    let l2 = p.layout;
    let payload = p.frame.get(l2.payload()..).unwrap_or(&[]);
    let macs = p.frame.get(l2.eth()..l2.eth() + 12).unwrap_or(&[0; 12]);
    let total = vxlan::HEADER_LEN + ethernet::HEADER_LEN + payload.len();
    if buf.len() < total {
        return Err(RenderError::BufferTooSmall(total));
    }
    emit_vxlan(encap, &mut buf[..vxlan::HEADER_LEN]);
    write_inner(&mut buf[vxlan::HEADER_LEN..total], macs, None, l2.ethertype, payload);
    Ok(total)
}

/// The frame [`render`] writes for `out` (a copy for a local port or a
/// plain uplink, not an encapsulated one) when it is byte for byte the
/// frame as it arrived, from its Ethernet header on: an untagged frame
/// leaving untagged. The caller may then send it from where it lies
/// instead of rendering a copy. `None`: rendering changes it (a VLAN tag
/// put in or taken out, outer headers), or `out` is encapsulated; use [`render`].
pub fn render_in_place<'a>(p: &Processed<'a>, out: &Output) -> Option<&'a [u8]> {
    if out.encap.is_some() || (out.port == UPLINK && p.layout.segment.vlan_id().is_some()) {
        return None;
    }
    untagged_frame(p)
}

/// The frame [`render_overlay`] writes after its VXLAN header, when it is
/// byte for byte the frame as it arrived (an untagged one); see
/// [`render_in_place`]. The VXLAN header itself: [`render_overlay_header`].
pub fn render_overlay_in_place<'a>(p: &Processed<'a>) -> Option<&'a [u8]> {
    untagged_frame(p)
}

/// Write the VXLAN-GBP header [`render_overlay`] puts before the frame of
/// a copy for `encap.remote`; returns its length.
pub fn render_overlay_header(encap: &Encap, buf: &mut [u8]) -> Result<usize, RenderError> {
    let Some(hdr) = buf.get_mut(..vxlan::HEADER_LEN) else {
        return Err(RenderError::BufferTooSmall(vxlan::HEADER_LEN));
    };
    emit_vxlan(encap, hdr);
    Ok(vxlan::HEADER_LEN)
}

/// `p`'s frame from its Ethernet header on, when what [`write_inner`] makes
/// of it without a tag is the same bytes: no tag between the addresses and
/// the ethertype, which is the one the engine read.
fn untagged_frame<'a>(p: &Processed<'a>) -> Option<&'a [u8]> {
    let l2 = p.layout;
    let frame = p.frame.get(l2.eth()..)?;
    let untagged =
        l2.payload() == l2.eth() + ethernet::HEADER_LEN && frame.get(12..14) == Some(&l2.ethertype.0.to_be_bytes()[..]);
    untagged.then_some(frame)
}

fn emit_vxlan(e: &Encap, buf: &mut [u8]) {
    let vx = vxlan::VxlanRepr {
        vni: e.vni,
        gbp: Some(vxlan::GbpRepr {
            dont_learn: false,
            policy_applied: e.policy_applied,
            group_id: e.group_id,
        }),
    };
    vx.emit(&mut vxlan::Packet::new_unchecked(buf));
}

/// Write the reply to a rejected frame: a TCP reset for TCP, otherwise ICMP
/// "administratively prohibited" (destination unreachable code 13, ICMPv6
/// code 1) quoting the start of the packet, as an Ethernet frame addressed
/// back to the sender, tagged as the frame arrived. The caller sends it out
/// the port the frame came in on. Returns its length.
pub fn render_reply(reply: &Reply<'_>, buf: &mut [u8]) -> Result<usize, RenderError> {
    let l2 = reply.layout;
    let spec = reply.spec;
    let inner = reply.frame.get(l2.eth()..).unwrap_or(&[]);
    // Back to the sender: its destination becomes the source.
    let (to, from) = match (inner.get(6..12), inner.get(..6)) {
        (Some(src), Some(dst)) => (EthernetAddress::from_bytes(src), EthernetAddress::from_bytes(dst)),
        _ => (EthernetAddress([0; 6]), EthernetAddress([0; 6])),
    };
    let l3 = inner.get(spec.l3_offset..).unwrap_or(&[]);
    let (src, dst) = (spec.key.src_addr(), spec.key.dst_addr());
    let v4 = matches!(src, IpAddr::V4(_));
    // Ethernet (+ tag when the frame came tagged), then the IP reply.
    let tagged = l2.payload().saturating_sub(l2.eth()) > ethernet::HEADER_LEN;
    let eth_len = ethernet::HEADER_LEN + if tagged { vlan::HEADER_LEN } else { 0 };
    let ip_hdr = if v4 { ipv4::HEADER_LEN } else { ipv6::HEADER_LEN };
    let mut l4 = [0u8; 8 + 40 + 8];
    let l4_len = match spec.tcp {
        Some(seg) => {
            let (seq, ack, flags) = if seg.flags.contains(TcpFlags::ACK) {
                (seg.ack, 0, TcpFlags::RST)
            } else {
                let extra = u32::from(seg.flags.contains(TcpFlags::SYN)) + u32::from(seg.flags.contains(TcpFlags::FIN));
                (
                    0,
                    seg.seq.wrapping_add(seg.len).wrapping_add(extra),
                    TcpFlags::RST | TcpFlags::ACK,
                )
            };
            let repr = tcp::TcpRepr {
                src_port: spec.key.dst_port,
                dst_port: spec.key.src_port,
                seq_number: seq,
                ack_number: ack,
                flags,
                window_len: 0,
                urgent_pointer: 0,
                options: &[],
                payload: &[],
            };
            repr.emit(&mut tcp::Packet::new_unchecked(&mut l4[..tcp::HEADER_LEN]), dst, src);
            tcp::HEADER_LEN
        }
        None => {
            // Quote the IP header and the first 8 bytes of its payload.
            let quote_len = (spec.l4_offset.saturating_sub(spec.l3_offset) + 8)
                .min(l3.len())
                .min(48);
            l4[0] = if v4 { 3 } else { 1 };
            l4[1] = if v4 { 13 } else { 1 };
            l4[8..8 + quote_len].copy_from_slice(&l3[..quote_len]);
            8 + quote_len
        }
    };
    let total = eth_len + ip_hdr + l4_len;
    if buf.len() < total {
        return Err(RenderError::BufferTooSmall(total));
    }
    let buf = &mut buf[..total];
    let mut eth = ethernet::Frame::new_unchecked(&mut buf[..]);
    eth.set_dst_addr(to);
    eth.set_src_addr(from);
    if tagged {
        eth.set_ethertype(EtherType::VLAN);
        let vid = l2.segment.vlan_id().unwrap_or(0);
        buf[14..16].copy_from_slice(&(vid & 0xfff).to_be_bytes());
        buf[16..18].copy_from_slice(&l2.ethertype.0.to_be_bytes());
    } else {
        eth.set_ethertype(l2.ethertype);
    }
    let (ip_buf, l4_buf) = buf[eth_len..].split_at_mut(ip_hdr);
    l4_buf.copy_from_slice(&l4[..l4_len]);
    let proto = if spec.tcp.is_some() {
        IpProtocol::TCP
    } else if v4 {
        IpProtocol::ICMP
    } else {
        IpProtocol::ICMPV6
    };
    match (dst, src) {
        (IpAddr::V4(from), IpAddr::V4(to)) => {
            if proto == IpProtocol::ICMP {
                icmpv4::Packet::new_unchecked(&mut *l4_buf).fill_checksum();
            }
            let repr = Ipv4Repr {
                src_addr: from,
                dst_addr: to,
                protocol: proto,
                payload_len: l4_len,
                ttl: 64,
                dscp: 0,
                ecn: 0,
                ident: 0,
                dont_frag: true,
                more_frags: false,
                frag_offset: 0,
                options: &[],
            };
            repr.emit(&mut ipv4::Packet::new_unchecked(ip_buf));
        }
        (from, to) => {
            // The engine makes a reply only for keys whose addresses are of one family.
            let (from, to) = (v6(from), v6(to));
            if proto == IpProtocol::ICMPV6 {
                icmpv6::Packet::new_unchecked(&mut *l4_buf).fill_checksum(from, to);
            }
            let repr = ipv6::Ipv6Repr {
                src_addr: from,
                dst_addr: to,
                next_header: proto,
                payload_len: l4_len,
                hop_limit: 64,
                traffic_class: 0,
                flow_label: 0,
            };
            repr.emit(&mut ipv6::Packet::new_unchecked(ip_buf));
        }
    }
    Ok(total)
}

fn v6(ip: IpAddr) -> core::net::Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

/// Write an Ethernet frame (addresses `macs`, an optional VLAN tag, the
/// ethertype and payload) into `buf`, which is exactly its length.
fn write_inner(buf: &mut [u8], macs: &[u8], tag: Option<u16>, ethertype: EtherType, payload: &[u8]) {
    buf[..12].copy_from_slice(macs);
    let mut at = 12;
    if let Some(vid) = tag {
        buf[at..at + 2].copy_from_slice(&EtherType::VLAN.0.to_be_bytes());
        buf[at + 2..at + 4].copy_from_slice(&(vid & 0xfff).to_be_bytes());
        at += 4;
    }
    buf[at..at + 2].copy_from_slice(&ethertype.0.to_be_bytes());
    buf[at + 2..].copy_from_slice(payload);
}
