//! The engine's service-chain stage: where a steered connection's packets
//! go, and the checks on those that come back from an appliance.
//!
//! It runs after the connection step (the packet is already accounted to its
//! connection, which holds the [`Steer`]) and before the outputs are staged:
//! a steered packet's output is the port of the chosen instance of the
//! chain's first stage in its direction instead of its L2 destination, and a
//! packet back from a stage goes on to the next stage's instance or, after
//! the last, to its L2 destination. The semantics are the `service` module's.
//!
//! An external instance's "port" is a tunnel: the steered packet leaves on
//! the uplink VXLAN-encapsulated to the appliance's address in the VNI of
//! the side it enters ([`Hop::Tunnel`]); what the appliance sends back is
//! recognised by its (source address, VNI) before the underlay's VNI →
//! segment lookup ([`Engine::external_return`]) and takes the same return
//! path as a packet back from an appliance VM.

use core::net::Ipv4Addr;

use palisade_wire::flow::{FlowInfo, FlowKey};
use palisade_wire::vxlan;

use crate::decision::Results;
use crate::events::EndReason;
use crate::events::EventSink;
use crate::flow_table::FlowHash;
use crate::port::PortId;
use crate::probe::{ProbeDirection, ProbeFields, ProbeKey, ProbeReturn};
use crate::service::{ChainStats, OffloadError, OffloadVerdict, ServicePort, Side, Steer};
use crate::switch::Location;
use crate::table::Slot;
use crate::verdict::DropReason;
use palisade_policy::model::OnFailure;

use super::switching::{entropy, parse_l2};
use super::{Engine, Packet, ROUTING_DOMAIN};
use crate::decision::{Encap, L2, Output};
use crate::port::UPLINK;

/// Where a steered packet goes next: an appliance VM's vNIC port, or an
/// external appliance over the underlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Hop {
    /// The port of an appliance VM's vNIC.
    Port(PortId),
    /// An external appliance: VXLAN to `remote` in `vni`, the VNI of the
    /// side the packet enters.
    Tunnel {
        /// Its underlay address.
        remote: Ipv4Addr,
        /// The VNI of the side the packet enters it by.
        vni: u32,
    },
}

/// Where a packet of a connection goes after the steering stage: an
/// appliance ([`Hop`]), or (not steered, offloaded, no stage left) its L2
/// destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    /// An appliance instance.
    Appliance(Hop),
    /// Its L2 destination, as [`Engine::l2_destination`] found it.
    Deliver(Option<Location>),
}

impl Engine {
    /// Resolve the policy's service chains against the ports (after a policy
    /// change or a new port).
    pub(super) fn resolve_services(&mut self) {
        let ports: Vec<(String, PortId)> = self
            .ports
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (p.name.clone(), PortId(i as u16))))
            .collect();
        let port_of = |name: &str| ports.iter().find(|(n, _)| n == name).map(|(_, p)| *p);
        self.services
            .resolve(self.lookup.service_chains(), self.ports.len(), port_of);
    }

    /// The service chains as this engine runs them: each instance's ports,
    /// health and counters, indexed as [`Steer::chain`] and
    /// [`Steer::instances`] index them.
    pub fn service_chains(&self) -> &[ChainStats] {
        &self.services.chains
    }

    /// The chain a steering names and the appliance VM of each stage an
    /// instance was chosen for, in stage order (for flow records).
    pub fn appliances_of(&self, steer: &Steer) -> Option<(&str, Vec<&str>)> {
        let chain = self.services.chains.get(usize::from(steer.chain))?;
        let vms = steer
            .instances
            .iter()
            .take(usize::from(chain.stages))
            .filter_map(|&i| chain.instances.get(usize::from(i)))
            .map(|i| &*i.vm)
            .collect();
        Some((&chain.name, vms))
    }

    /// Report `port`'s link state (the health of the appliance instances
    /// that use it: an instance is up when both its ports are attached and
    /// up). Ports are up until reported otherwise.
    pub fn set_port_link(&mut self, port: PortId, up: bool) {
        self.services.set_link(port, up);
    }

    /// Use `key` for the tags of appliance health probes: the key of the
    /// [`crate::probe::ProbeMonitor`] that makes them (every engine of a
    /// host the same, since a probe may come back to any of them).
    pub fn set_probe_key(&mut self, key: ProbeKey) {
        self.probe_key = key;
    }

    /// Report whether `instance` of `chain`'s health probes answer
    /// ([`crate::probe::ProbeChange`]): an instance of a probed chain serves
    /// while its link is up and its probes answer. Up until reported otherwise.
    pub fn set_probe_health(&mut self, chain: u16, instance: u16, up: bool) {
        self.services.set_probe(chain, instance, up);
    }

    /// Move the probes taken back since the last call (checked: tag,
    /// instance, side) to `out`, for the monitor's next round.
    pub fn take_probe_returns(&mut self, out: &mut Vec<ProbeReturn>) {
        out.append(&mut self.probe_returns);
    }

    /// A probe-shaped frame that came in on appliance port `role`: credited
    /// if its tag is right, it names this port's instance and it leaves the
    /// instance on the side its direction leaves by; rejected (and counted)
    /// otherwise. Either way it goes no further.
    pub(super) fn probe_back(&mut self, role: ServicePort, probe: &ProbeFields) -> DropReason {
        /// Returns kept between two takes: a few rounds of every instance.
        const MAX_RETURNS: usize = 4096;
        let leaves_by = match probe.direction {
            ProbeDirection::Forward => Side::Out,
            ProbeDirection::Reverse => Side::In,
        };
        let genuine = probe.chain == role.chain
            && probe.instance == role.instance
            && role.side == leaves_by
            && probe.authentic(&self.probe_key);
        if !genuine {
            if let Some(c) = self.services.chain_mut(role.chain) {
                c.probes_rejected += 1;
            }
            return DropReason::ApplianceNotSteered;
        }
        if let Some(i) = self.services.instance_mut(role.chain, role.instance) {
            i.probes_returned += 1;
        }
        if self.probe_returns.len() < MAX_RETURNS {
            self.probe_returns.push(ProbeReturn {
                chain: probe.chain,
                instance: probe.instance,
                direction: probe.direction,
                round: probe.round,
            });
        }
        DropReason::ApplianceProbe
    }

    /// An appliance's decision for the rest of the connection `key` belongs
    /// to (either direction): `allow` takes it off its chain, `drop` drops
    /// its later packets. It holds until the connection ends or a policy
    /// change re-decides it.
    pub fn offload_flow(&mut self, key: &FlowKey, verdict: OffloadVerdict) -> Result<(), OffloadError> {
        let mut key = *key;
        key.segment = ROUTING_DOMAIN;
        let slot = self.conns.find(&key).ok_or(OffloadError::NoConnection)?;
        let conn = self.conns.get_mut(slot).ok_or(OffloadError::NoConnection)?;
        let steer = conn.steer.as_mut().ok_or(OffloadError::NotSteered)?;
        let first = steer.offload.is_none();
        steer.offload = Some(verdict);
        let chain = steer.chain;
        if first && let Some(c) = self.services.chain_mut(chain) {
            c.offloaded += 1;
        }
        Ok(())
    }

    /// A new connection's steering through `chain`: at each stage, the
    /// instance its hash picks among those up (counted), or none yet.
    pub(super) fn first_instance(&mut self, chain: u16, key: &FlowKey) -> Steer {
        let mut s = Steer::new(chain);
        let stages = self.services.chains.get(usize::from(chain)).map_or(0, |c| c.stages);
        let hash = key.symmetric_hash();
        for stage in 0..stages {
            if let Some(i) = self.services.pick(chain, stage, hash) {
                s.instances[usize::from(stage)] = i;
                if let Some(inst) = self.services.instance_mut(chain, i) {
                    inst.flows += 1;
                }
            }
        }
        s
    }

    /// The stages of `chain` a packet crosses after `from` (`None`: all of
    /// them), in its direction (`reply`: responder → initiator, last stage
    /// first).
    fn stages_after(&self, chain: u16, from: Option<u16>, reply: bool) -> impl Iterator<Item = u16> + use<> {
        let n = self.services.chains.get(usize::from(chain)).map_or(0, |c| c.stages);
        let (lo, hi) = match (from, reply) {
            (None, _) => (0, n),
            (Some(k), false) => (k.saturating_add(1).min(n), n),
            (Some(k), true) => (0, k.min(n)),
        };
        let forward = (!reply).then_some(lo..hi).into_iter().flatten();
        let backward = reply.then(|| (lo..hi).rev()).into_iter().flatten();
        forward.chain(backward)
    }

    /// Whether a packet whose TCP tracking ends its connection at once (a
    /// reset before any reply) is on its
    /// way into the connection's appliance: a packet of a steered
    /// connection, not offloaded, that is not coming back from the
    /// appliance (or from a router, on a routed flow's second leg).
    /// Back from stage k of a chain: whether a stage follows in its direction.
    pub(super) fn reset_goes_through_appliance(&self, pkt: &Packet, slot: Slot) -> bool {
        let Some(s) = self.conns.get(slot).and_then(|c| c.steer) else {
            return false;
        };
        if s.offload.is_some() {
            return false;
        }
        match pkt.service {
            None => !pkt.second_leg,
            Some(role) => {
                let reply = role.side == Side::In;
                self.stages_after(s.chain, Some(role.stage), reply).next().is_some()
            }
        }
    }

    /// A frame's L2 destination may not be an appliance port: appliances
    /// receive steered packets only.
    #[inline]
    pub(super) fn not_to_appliance(&self, to: Option<Location>) -> Result<(), DropReason> {
        match to {
            Some(Location::Port(p)) if self.services.role(p).is_some() => Err(DropReason::NoRoute),
            _ => Ok(()),
        }
    }

    /// Where a packet of connection `slot` goes (`reply`: it travels
    /// responder → initiator): `to`, its L2 destination, unless the
    /// connection is steered, then its instance at the chain's first stage
    /// in its direction ([`Engine::next_stage`]).
    pub(super) fn steer(
        &mut self,
        pkt: &Packet,
        slot: Slot,
        reply: bool,
        to: Option<Location>,
    ) -> Result<Next, DropReason> {
        // A routed flow's second leg went through the appliances on its first.
        if pkt.second_leg {
            return Ok(Next::Deliver(to));
        }
        if let Some(c) = self.conns.get_mut(slot)
            && let Some(s) = c.steer.as_mut()
            && s.offload.is_none()
        {
            s.segments[usize::from(reply)] = pkt.l2.segment;
        }
        Ok(match self.next_stage(pkt, slot, reply, None)? {
            Some(hop) => Next::Appliance(hop),
            None => Next::Deliver(to),
        })
    }

    /// Stage the outputs of a packet the steering stage decided
    /// ([`Engine::steer`], [`Engine::returning`]): to an appliance port, into
    /// the tunnel to an external appliance, or towards its L2 destination.
    pub(super) fn push_next(&mut self, next: Next, pkt: &Packet, key: &FlowKey, out: &mut Results) {
        match next {
            Next::Appliance(Hop::Port(p)) => self.push_outputs(Some(Location::Port(p)), pkt, true, Some(key), out),
            Next::Appliance(Hop::Tunnel { remote, vni }) => {
                self.counters.encapsulated += pkt.packets;
                out.push_output(Output {
                    port: UPLINK,
                    encap: Some(Encap {
                        remote,
                        vni,
                        group_id: 0,
                        // The appliance is no Palisade host: nothing to tell it.
                        policy_applied: false,
                        source_port: entropy(Some(key)),
                    }),
                });
            }
            Next::Deliver(to) => self.push_outputs(to, pkt, true, Some(key), out),
        }
    }

    /// A VXLAN packet from the underlay (its VXLAN header at `offset` of
    /// `frame`, sent by `remote`) that an external appliance instance sends
    /// back: its role (instance and side, by the (address, VNI) it came
    /// from) and its inner frame's L2, or `None` when it is not one (it then
    /// goes the way of any underlay packet). Looked up before the VNI is
    /// taken for a segment's: an appliance's VNIs are its own.
    pub(super) fn external_return(
        &self,
        frame: &[u8],
        offset: usize,
        remote: Ipv4Addr,
    ) -> Option<Result<(ServicePort, L2), DropReason>> {
        let vx = vxlan::Packet::new_checked(frame.get(offset..)?).ok()?;
        let repr = vxlan::VxlanRepr::parse(&vx).ok()?;
        let role = self.services.tunnel_role(remote, repr.vni)?;
        Some(parse_l2(frame, offset + vxlan::HEADER_LEN).map(|mut l2| {
            // Switched in the segment it was steered from, once checked
            // ([`Engine::returning`]); until then in none.
            l2.segment = palisade_wire::flow::Segment::UNTAGGED;
            (role, l2)
        }))
    }

    /// The appliance instance (its port, or its tunnel) a packet of connection `slot`
    /// goes to next (`reply`: it travels responder → initiator), `from`
    /// the stage it comes back from (`None`: on its way in), or `None` when
    /// it goes to its destination: not steered, offloaded (`allow`), or no
    /// stage left. At each stage in its direction, the instance recorded
    /// for the connection if it is up, else another of the stage's
    /// instances (a failover, recorded); with none up, `on_failure`
    /// decides: `open` skips the stage, `closed` drops the packet.
    fn next_stage(
        &mut self,
        pkt: &Packet,
        slot: Slot,
        reply: bool,
        from: Option<u16>,
    ) -> Result<Option<Hop>, DropReason> {
        let Some(conn) = self.conns.get(slot) else {
            return Ok(None);
        };
        let Some(mut s) = conn.steer else { return Ok(None) };
        match s.offload {
            Some(OffloadVerdict::Allow) => return Ok(None),
            Some(OffloadVerdict::Drop) => return Err(DropReason::ApplianceOffloadDrop),
            None => {}
        }
        let hash = conn.key.symmetric_hash();
        let packets = pkt.packets;
        let mut next = None;
        for stage in self.stages_after(s.chain, from, reply) {
            let st = usize::from(stage);
            let current = s.instances[st];
            let serving = self
                .services
                .instance(s.chain, current)
                .is_some_and(|i| i.up && i.stage == stage);
            if !serving {
                match self.services.pick(s.chain, stage, hash) {
                    Some(i) => {
                        s.instances[st] = i;
                        if current != Steer::UNASSIGNED
                            && let Some(c) = self.services.chain_mut(s.chain)
                        {
                            c.failovers += 1;
                        }
                        if let Some(inst) = self.services.instance_mut(s.chain, i) {
                            inst.flows += 1;
                        }
                    }
                    None => {
                        let Some(c) = self.services.chain_mut(s.chain) else {
                            return Ok(None);
                        };
                        match c.on_failure {
                            OnFailure::Open => {
                                c.bypassed += packets;
                                continue;
                            }
                            OnFailure::Closed => {
                                c.dropped += packets;
                                return Err(DropReason::ApplianceDown);
                            }
                        }
                    }
                }
            }
            let Some(inst) = self.services.instance_mut(s.chain, s.instances[st]) else {
                continue;
            };
            // Up implies both ports are attached (or the instance is external).
            let hop = match inst.external {
                Some(x) => Some(Hop::Tunnel {
                    remote: x.address,
                    vni: if reply { x.vni_out } else { x.vni_in },
                }),
                None => (if reply { inst.vnic_out.1 } else { inst.vnic_in.1 }).map(Hop::Port),
            };
            if let Some(hop) = hop {
                inst.sent += packets;
                next = Some(hop);
                break;
            }
        }
        if let Some(c) = self.conns.get_mut(slot) {
            c.steer = Some(s);
        }
        Ok(next)
    }

    /// Check a packet that came back from an appliance before it touches
    /// any state: its 5-tuple must be a connection steered through this
    /// instance at this instance's stage, arriving on the side its
    /// direction leaves by (the initiator's packets on `out`, the
    /// responder's on `in`), and not offloaded. Returns the steering and
    /// the direction.
    fn check_return(&self, pkt: &Packet, key: &FlowKey) -> Result<(Steer, bool), DropReason> {
        let role = pkt.service.ok_or(DropReason::ApplianceNotSteered)?;
        let conn = self
            .conns
            .find(key)
            .and_then(|slot| self.conns.get(slot))
            .ok_or(DropReason::ApplianceNotSteered)?;
        let s = conn.steer.ok_or(DropReason::ApplianceNotSteered)?;
        let reply = conn.key != *key;
        let side = if reply { Side::In } else { Side::Out };
        let recorded = s.instances.get(usize::from(role.stage)).copied();
        if s.chain != role.chain || recorded != Some(role.instance) || role.side != side || s.offload.is_some() {
            return Err(DropReason::ApplianceNotSteered);
        }
        Ok((s, reply))
    }

    /// The rest of the pipeline for a packet back from an appliance: checked
    /// ([`Engine::check_return`]), tracked through its connection again
    /// (windows and states; never classified, never a new connection), and
    /// sent to the instance of the next stage in its direction or, after the
    /// last, switched towards its destination in the segment it was steered
    /// from.
    pub(super) fn returning(
        &mut self,
        pkt: &mut Packet,
        info: &FlowInfo,
        hash: Option<FlowHash>,
        inner: &[u8],
        sink: &mut dyn EventSink,
        out: &mut Results,
    ) -> Result<(), DropReason> {
        let key = &info.key;
        // ICMP errors and neighbour discovery are never steered.
        if info.icmp.is_some_and(|(ty, _)| {
            let v6 = key.protocol.0 == 58;
            palisade_wire::flow::is_icmp_error(v6, ty) || (v6 && (130..=143).contains(&ty))
        }) {
            return Err(DropReason::ApplianceNotSteered);
        }
        let (s, reply) = self.check_return(pkt, key)?;
        let role = pkt.service.ok_or(DropReason::ApplianceNotSteered)?;
        // Tracked, not classified: the connection exists (checked above).
        // A reset that ends the connection (kept for it on its way in) ends
        // it now, unless a stage follows (then it ends after the last).
        let conn = self.decide(pkt, info, hash, inner, sink)?;
        if let Some(inst) = self.services.instance_mut(s.chain, role.instance) {
            inst.returned += pkt.packets;
        }
        let next = match conn {
            Some((slot, _)) => {
                let next = self.next_stage(pkt, slot, reply, Some(role.stage));
                if pkt.reset_pending && !matches!(next, Ok(Some(_))) {
                    self.cut(slot, EndReason::Reset, pkt.now, sink);
                }
                next?
            }
            None => None,
        };
        let next = match next {
            Some(hop) => Next::Appliance(hop),
            None => {
                pkt.l2.segment = s.segments[usize::from(reply)];
                let to = self.l2_destination(pkt)?;
                self.not_to_appliance(to)?;
                Next::Deliver(to)
            }
        };
        self.push_next(next, pkt, key, out);
        Ok(())
    }
}
