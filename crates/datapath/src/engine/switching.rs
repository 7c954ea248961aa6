//! The engine's switching stage: L2.
//!
//! Parses what arrived (a vNIC's frame, a plain or VXLAN frame on the
//! uplink, a VXLAN payload from the underlay socket), works out where its
//! destination MAC lives and stages the outputs towards it: one port, one
//! remote host with its VXLAN-GBP encapsulation, or a flood of the segment.
//! Also the views of a frame that tools ask for (its inner frame, segment
//! and the key a flow is steered by).

use core::net::{IpAddr, Ipv4Addr};

use palisade_wire::ethernet::{self, EtherType};
use palisade_wire::flow::{self, FlowKey, Segment};
use palisade_wire::ip::IpProtocol;
use palisade_wire::ipv4;
use palisade_wire::{udp, vlan, vxlan};

use crate::decision::{Encap, L2, Output, Results};
use crate::port::{self, PortId, UPLINK};
use crate::switch::Location;
use crate::verdict::DropReason;

use super::{Engine, Packet, ROUTING_DOMAIN};

impl Engine {
    /// Parse what arrived on the uplink: a VXLAN packet for this tunnel
    /// endpoint (decapsulated), or a plain, possibly tagged frame.
    pub(super) fn uplink_l2(&self, frame: &[u8]) -> Result<(L2, bool, Option<Ipv4Addr>), DropReason> {
        if let Some((vxlan_off, remote)) = self.uplink_vxlan(frame)? {
            return self.vxlan_l2(frame, vxlan_off, remote);
        }
        Ok((parse_l2(frame, 0)?, false, None))
    }

    /// Where the VXLAN header of a frame that arrived on the uplink lies and
    /// which tunnel endpoint sent it, if it is a VXLAN packet for this
    /// tunnel endpoint (`None`: a plain frame).
    fn uplink_vxlan(&self, frame: &[u8]) -> Result<Option<(usize, Ipv4Addr)>, DropReason> {
        let outer = parse_l2(frame, 0)?;
        if outer.ethertype == EtherType::IPV4
            && let Some(p) = frame.get(outer.payload..)
            && let Ok(ip) = ipv4::Packet::new_checked(p)
            && ip.protocol() == IpProtocol::UDP
            && ip.dst_addr() == self.config.uplink.local_ip
            && !ip.is_fragment()
            && let Ok(u) = udp::Packet::new_checked(ip.payload())
            && u.dst_port() == vxlan::VXLAN_PORT
        {
            // The offsets add up headers that were just checked to be within the frame.
            let vxlan_off = outer.payload + ip.header_len() + udp::HEADER_LEN;
            return Ok(Some((vxlan_off, ip.src_addr())));
        }
        Ok(None)
    }

    /// A packet from the underlay (the socket's payload from `overlay`, or
    /// a frame on the uplink) that an external appliance sends back: see
    /// [`Engine::external_return`]. `None`: not one.
    pub(super) fn back_from_external_appliance(
        &self,
        frame: &[u8],
        overlay: Option<Ipv4Addr>,
    ) -> Option<Result<(crate::service::ServicePort, L2), DropReason>> {
        let (offset, remote) = match overlay {
            Some(remote) => (0, remote),
            None => self.uplink_vxlan(frame).ok()??,
        };
        self.external_return(frame, offset, remote)
    }

    /// Parse the VXLAN header at `offset` of `frame` (sent by tunnel endpoint
    /// `remote`) and the inner frame behind it.
    pub(super) fn vxlan_l2(
        &self,
        frame: &[u8],
        offset: usize,
        remote: Ipv4Addr,
    ) -> Result<(L2, bool, Option<Ipv4Addr>), DropReason> {
        let vx = vxlan::Packet::new_checked(frame.get(offset..).unwrap_or(&[])).map_err(|_| DropReason::Malformed)?;
        let repr = vxlan::VxlanRepr::parse(&vx).map_err(|_| DropReason::Malformed)?;
        let segment = self.vni_segment(repr.vni).ok_or(DropReason::UnknownVni)?;
        let mut l2 = parse_l2(frame, offset + vxlan::HEADER_LEN)?;
        l2.segment = segment;
        let applied = repr.gbp.is_some_and(|g| g.policy_applied);
        Ok((l2, applied, Some(remote)))
    }

    pub(super) fn vni_segment(&self, vni: u32) -> Option<Segment> {
        let segs = || self.ports.iter().flatten().map(|p| p.segment);
        segs()
            .find(|s| s.vni_id() == Some(vni))
            .or_else(|| segs().find(|s| port::segment_vni(*s) == Some(vni)))
    }

    /// Where the packet's destination MAC lives (`None`: unknown or not
    /// unicast, to be flooded), or why it cannot go there: back out of the
    /// port it came in on, or from the uplink to another host.
    #[inline(always)]
    pub(super) fn l2_destination(&mut self, pkt: &Packet) -> Result<Option<Location>, DropReason> {
        let in_port = pkt.in_port;
        // Every port has one (pipeline checked `in_port`); without one, the
        // table alone answers (no spare to build for every packet).
        let to = match self.last_dst.get_mut(usize::from(in_port.0)) {
            Some(last) => self.macs.lookup_via(last, pkt.l2.segment, pkt.l2.dst),
            None => self.macs.lookup(pkt.l2.segment, pkt.l2.dst),
        };
        match to {
            Some(Location::Port(p)) if p == in_port => Err(DropReason::NoRoute),
            // Except back from an external appliance: this host sent it
            // there, and delivers it as it would have.
            Some(Location::Remote(_)) if in_port == UPLINK && pkt.service.is_none() => Err(DropReason::NoRoute),
            // A frame reaching a migrating VM's old port (a peer that has not
            // yet learned its new host) must not open a connection here.
            Some(Location::Port(p)) if self.any_quiesced && self.is_quiesced(p) => Err(DropReason::VnicMigrating),
            to => Ok(to),
        }
    }

    /// Stage the packet's outputs towards `to` ([`Engine::l2_destination`]).
    pub(super) fn push_outputs(
        &mut self,
        to: Option<Location>,
        pkt: &Packet,
        applied: bool,
        flow: Option<&FlowKey>,
        out: &mut Results,
    ) {
        let l2 = pkt.l2;
        let in_port = pkt.in_port;
        let group_id = pkt.src_vnic.and_then(|p| self.vnic(p)).map_or(0, |v| v.group_id);
        let vni = port::segment_vni(l2.segment).unwrap_or(0);
        // The outer source port is hashed only when the frame is
        // encapsulated, so that local traffic does not pay for it.
        let encap = |remote| Encap {
            remote,
            vni,
            group_id,
            policy_applied: applied,
            source_port: entropy(flow),
        };
        match to {
            Some(Location::Port(p)) => out.push_output(Output { port: p, encap: None }),
            Some(Location::Remote(ip)) => {
                self.counters.encapsulated += pkt.packets;
                out.push_output(Output {
                    port: UPLINK,
                    encap: Some(encap(ip)),
                });
            }
            None => {
                self.counters.flooded += pkt.packets;
                for (i, p) in self.ports.iter().enumerate() {
                    // Appliance ports receive steered packets only.
                    if let Some(p) = p
                        && p.segment == l2.segment
                        && i != usize::from(in_port.0)
                        && self.services.role(PortId(i as u16)).is_none()
                    {
                        out.push_output(Output {
                            port: PortId(i as u16),
                            encap: None,
                        });
                    }
                }
                if in_port != UPLINK {
                    for &ip in &self.config.uplink.flood {
                        out.push_output(Output {
                            port: UPLINK,
                            encap: Some(encap(ip)),
                        });
                    }
                }
            }
        }
    }

    pub(super) fn local_port_of(&self, ip: IpAddr) -> Option<PortId> {
        self.local_ips.get(&port::canonical_ip(ip)).copied()
    }

    /// The flow key a frame received on `port` belongs to, for choosing the
    /// worker (shard) that owns its connection: the key the engine would track
    /// it under, or for an ICMP error the key of the packet it quotes. `None`
    /// for frames that are not IP or do not parse (any worker may take them).
    pub fn dispatch_key(&self, port: PortId, frame: &[u8]) -> Option<FlowKey> {
        let (inner, _) = self.inner_frame(port, frame)?;
        let info = flow::extract(inner).ok()??;
        if let Some((ty, _)) = info.icmp
            && flow::is_icmp_error(info.key.protocol == IpProtocol::ICMPV6, ty)
        {
            let quoted = inner.get(usize::from(info.l4_offset) + 8..)?;
            return flow::extract_quoted(quoted, ROUTING_DOMAIN);
        }
        let mut key = info.key;
        key.segment = ROUTING_DOMAIN;
        Some(key)
    }

    /// The Ethernet frame the engine switches for a frame received on `port`
    /// (for a VXLAN packet arriving on the uplink, the frame inside the
    /// tunnel), and the segment it is switched in. `None` when the frame does
    /// not parse that far (or `port` is no port). Tools that report on what
    /// the engine decided (`palisade replay`) look at this frame, not the
    /// tunnel around it.
    pub fn inner_frame<'a>(&self, port: PortId, frame: &'a [u8]) -> Option<(&'a [u8], Segment)> {
        let l2 = if port == UPLINK {
            self.uplink_l2(frame).ok()?.0
        } else {
            let mut l2 = parse_l2(frame, 0).ok()?;
            l2.segment = self.vnic(port)?.segment;
            l2
        };
        Some((frame.get(l2.eth..)?, l2.segment))
    }

    /// The L2 segment a frame received on `port` is switched in (the vNIC's
    /// zone, or the VLAN or VNI it arrived with on the uplink). Connections
    /// are keyed without it ([`ROUTING_DOMAIN`]); tools that show per-segment
    /// views (`palisade replay`) ask here.
    pub fn frame_segment(&self, port: PortId, frame: &[u8]) -> Option<Segment> {
        if port == UPLINK {
            Some(self.uplink_l2(frame).ok()?.0.segment)
        } else {
            Some(self.vnic(port)?.segment)
        }
    }
}

/// The outer UDP source port of an encapsulated copy of a packet of `flow`
/// (see [`Encap::source_port`]).
pub(super) fn entropy(flow: Option<&FlowKey>) -> u16 {
    flow.map_or(0, |k| 49152 | (k.symmetric_hash() as u16 & 0x3fff))
}

/// Parse an Ethernet header and its VLAN tags starting at `start`.
pub(super) fn parse_l2(frame: &[u8], start: usize) -> Result<L2, DropReason> {
    let data = frame.get(start..).ok_or(DropReason::Malformed)?;
    let eth = ethernet::Frame::new_checked(data).map_err(|_| DropReason::Malformed)?;
    let mut ethertype = eth.ethertype();
    let mut off = start + ethernet::HEADER_LEN;
    let mut vids = [0u16; vlan::MAX_TAGS];
    let mut tags = 0;
    while ethertype.is_vlan_tag() {
        if tags == vlan::MAX_TAGS {
            return Err(DropReason::Malformed);
        }
        let tag = vlan::Packet::new_checked(frame.get(off..).unwrap_or(&[])).map_err(|_| DropReason::Malformed)?;
        vids[tags] = tag.vid();
        tags += 1;
        ethertype = tag.ethertype();
        off += vlan::HEADER_LEN;
    }
    let segment = match tags {
        0 => Segment::UNTAGGED,
        1 => Segment::vlan(vids[0]),
        _ => Segment::qinq(vids[0], vids[1]),
    };
    Ok(L2 {
        eth: start,
        payload: off,
        ethertype,
        src: eth.src_addr(),
        dst: eth.dst_addr(),
        segment,
    })
}
