//! The engine's service-chain stage: where a steered connection's packets
//! go, and the checks on those that come back from an appliance.
//!
//! It runs after the connection step (the packet is already accounted to its
//! connection, which holds the [`Steer`]) and before the outputs are staged:
//! a steered packet's output is the chosen appliance instance's port instead
//! of its L2 destination. The semantics are the `service` module's.

use palisade_wire::flow::{FlowInfo, FlowKey};

use crate::decision::Results;
use crate::events::EventSink;
use crate::flow_table::FlowHash;
use crate::port::PortId;
use crate::probe::{ProbeDirection, ProbeFields, ProbeKey, ProbeReturn};
use crate::service::{ChainStats, OffloadError, OffloadVerdict, ServicePort, Side, Steer};
use crate::switch::Location;
use crate::table::Slot;
use crate::verdict::DropReason;
use palisade_policy::model::OnFailure;

use super::{Engine, Packet, ROUTING_DOMAIN};

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
    /// [`Steer::instance`] index them.
    pub fn service_chains(&self) -> &[ChainStats] {
        &self.services.chains
    }

    /// The chain and appliance VM a steering names (for flow records).
    pub fn appliance_of(&self, steer: &Steer) -> Option<(&str, &str)> {
        let chain = self.services.chains.get(usize::from(steer.chain))?;
        let instance = chain.instances.get(usize::from(steer.instance))?;
        Some((&chain.name, &instance.vm))
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

    /// A new connection's steering through `chain`: the instance its hash
    /// picks among those up (counted), or none yet.
    pub(super) fn first_instance(&mut self, chain: u16, key: &FlowKey) -> Steer {
        let mut s = Steer::new(chain);
        if let Some(i) = self.services.pick(chain, key.symmetric_hash()) {
            s.instance = i;
            if let Some(inst) = self.services.instance_mut(chain, i) {
                inst.flows += 1;
            }
        }
        s
    }

    /// Whether a packet whose TCP tracking ends its connection at once (a
    /// reset before any reply) is on its
    /// way into the connection's appliance: a packet of a steered
    /// connection, not offloaded, that is not coming back from the
    /// appliance (or from a router, on a routed flow's second leg).
    pub(super) fn reset_goes_through_appliance(&self, pkt: &Packet, slot: Slot) -> bool {
        pkt.service.is_none()
            && !pkt.second_leg
            && self
                .conns
                .get(slot)
                .and_then(|c| c.steer)
                .is_some_and(|s| s.offload.is_none())
    }

    /// Whether `to` is an appliance port (where [`Engine::steer`] sends a steered packet).
    pub(super) fn is_appliance(&self, to: Option<Location>) -> bool {
        matches!(to, Some(Location::Port(p)) if self.services.role(p).is_some())
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
    /// connection is steered, then the chosen instance's port for its
    /// direction. An instance that is down hands the connection to another
    /// one; with none up, `on_failure` decides.
    pub(super) fn steer(
        &mut self,
        pkt: &Packet,
        slot: Slot,
        reply: bool,
        to: Option<Location>,
    ) -> Result<Option<Location>, DropReason> {
        let Some(conn) = self.conns.get(slot) else {
            return Ok(to);
        };
        let Some(mut s) = conn.steer else { return Ok(to) };
        // A routed flow's second leg went through the appliance on its first.
        if pkt.second_leg {
            return Ok(to);
        }
        match s.offload {
            Some(OffloadVerdict::Allow) => return Ok(to),
            Some(OffloadVerdict::Drop) => return Err(DropReason::ApplianceOffloadDrop),
            None => {}
        }
        let key = conn.key;
        let packets = pkt.packets;
        if !self.services.instance(s.chain, s.instance).is_some_and(|i| i.up) {
            match self.services.pick(s.chain, key.symmetric_hash()) {
                Some(i) => {
                    let moved = s.instance != Steer::UNASSIGNED;
                    s.instance = i;
                    if let Some(c) = self.services.chain_mut(s.chain)
                        && moved
                    {
                        c.failovers += 1;
                    }
                    if let Some(inst) = self.services.instance_mut(s.chain, i) {
                        inst.flows += 1;
                    }
                }
                None => {
                    let Some(c) = self.services.chain_mut(s.chain) else {
                        return Ok(to);
                    };
                    return match c.on_failure {
                        OnFailure::Open => {
                            c.bypassed += packets;
                            Ok(to)
                        }
                        OnFailure::Closed => {
                            c.dropped += packets;
                            Err(DropReason::ApplianceDown)
                        }
                    };
                }
            }
        }
        s.segments[usize::from(reply)] = pkt.l2.segment;
        if let Some(c) = self.conns.get_mut(slot) {
            c.steer = Some(s);
        }
        let Some(inst) = self.services.instance_mut(s.chain, s.instance) else {
            return Ok(to);
        };
        // Up implies both ports are attached.
        let port = if reply { inst.vnic_out.1 } else { inst.vnic_in.1 };
        let Some(port) = port else { return Ok(to) };
        inst.sent += packets;
        Ok(Some(Location::Port(port)))
    }

    /// Check a packet that came back from an appliance before it touches
    /// any state: its 5-tuple must be a connection steered through this
    /// instance, arriving on the side its direction leaves by (the
    /// initiator's packets on `out`, the responder's on `in`), and not
    /// offloaded. Returns the steering and the direction.
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
        if s.chain != role.chain || s.instance != role.instance || role.side != side || s.offload.is_some() {
            return Err(DropReason::ApplianceNotSteered);
        }
        Ok((s, reply))
    }

    /// The rest of the pipeline for a packet back from an appliance: checked
    /// ([`Engine::check_return`]), tracked through its connection again
    /// (windows and states; never classified, never a new connection), and
    /// switched towards its destination in the segment it was steered from.
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
        // Tracked, not classified: the connection exists (checked above).
        // A reset that ends the connection (kept for it on its way in) ends it now.
        self.decide(pkt, info, hash, inner, sink)?;
        if let Some(inst) = self.services.instance_mut(s.chain, s.instance) {
            inst.returned += pkt.packets;
        }
        pkt.l2.segment = s.segments[usize::from(reply)];
        let to = self.l2_destination(pkt)?;
        self.not_to_appliance(to)?;
        self.push_outputs(to, pkt, true, Some(key), out);
        Ok(())
    }
}
