//! Service chains: steering allowed flows through appliance VMs.
//!
//! A rule's `redirect: CHAIN` marks the flows it allows; the engine records
//! the chain and the instance chosen at each of its stages for the
//! connection ([`Steer`], held in the [`crate::Conn`]) when it classifies
//! the flow's first packet. From then on every packet of the connection, in
//! both directions, crosses those instances before delivery: the
//! initiator's packets stage by stage in order, each into its instance's
//! `in` vNIC, the responder's in reverse order, each into its instance's
//! `out` vNIC. An appliance bridges them (bump in the wire, addresses
//! unchanged) and they come back on its other vNIC, where the engine checks
//! that the packet belongs to a flow steered through this very instance, at
//! this stage, in this direction (anything else is dropped as
//! [`crate::DropReason::ApplianceNotSteered`]), tracks it through the
//! connection again (TCP windows, states) without classifying it, and sends
//! it to the next stage's instance or, after the last, to its destination.
//! A one-stage chain is the special case.
//!
//! At each stage the instance is chosen by rendezvous hashing of the flow's
//! symmetric hash ([`palisade_wire::flow::FlowKey::symmetric_hash`], the
//! one that steers flows to workers) over that stage's healthy instances:
//! both directions give the same hash, and an instance going down moves
//! only its own flows. Health is the instances' link state as the caller
//! reports it ([`crate::Engine::set_port_link`]): an instance is up when
//! both of its vNICs are attached to this engine and up. A packet whose
//! instance at a stage is down moves its connection to another healthy
//! instance of that stage (counted as a failover); with none, the chain's
//! `on_failure` decides: `open` skips that stage (the packet goes on to
//! the next one, or to its destination), `closed` drops it
//! ([`crate::DropReason::ApplianceDown`]), packet by packet, so the flow
//! goes through the stage again as soon as an instance is back.
//!
//! An instance whose chain is probed also needs its probes to answer
//! (`probe` module: a frame through it each way, every round, with
//! hysteresis), so that an appliance that keeps link but stops forwarding is
//! taken out of service too.
//!
//! An instance may also be an external appliance, reached over the
//! underlay ([`ExternalAppliance`]): a steered packet is sent to it
//! VXLAN-encapsulated, to its address in the VNI of the side it enters
//! (`vni_in` for the initiator's packets, `vni_out` for the responder's),
//! and comes back from that address in the other side's VNI. What comes
//! back is matched by (source address, VNI) in this engine's table of
//! tunnels ([`ServiceChains::tunnel_role`]) before the VNI is taken for a
//! segment's, and from there on it is exactly a packet back from an
//! appliance port: the same checks, the same next stage. An external
//! instance has no link to watch: it is up while its probes answer (or
//! always, with `probe: off`).
//!
//! An appliance may also offload a flow ([`crate::Engine::offload_flow`],
//! vPath style): `allow` takes it off the chain (its packets stay on the
//! flow cache and go straight to their destination), `drop` drops the rest
//! of it ([`crate::DropReason::ApplianceOffloadDrop`]).

use core::net::Ipv4Addr;
use std::collections::HashMap;
use std::sync::Arc;

use palisade_policy::model::{ChainProbe, ExternalAppliance, OnFailure, ServiceChain};
use palisade_wire::flow::Segment;

use crate::port::PortId;

/// The most stages a chain may have
/// ([`palisade_policy::model::ServiceChain::MAX_STAGES`]).
pub const MAX_STAGES: usize = palisade_policy::model::ServiceChain::MAX_STAGES;

/// A connection's steering: the chain and the instance its packets go
/// through at each stage (indices into the engine's current chains, see
/// [`crate::Engine::service_chains`]), and what an appliance said of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Steer {
    /// The chain.
    pub chain: u16,
    /// By stage: the instance chosen for it, an index into the chain's
    /// [`ChainStats::instances`] ([`Steer::UNASSIGNED`] until a packet
    /// finds one of the stage's instances up; unused past the chain's
    /// stages).
    pub instances: [u16; MAX_STAGES],
    /// What an appliance decided for the rest of the flow, if it did.
    pub offload: Option<OffloadVerdict>,
    /// The segment each direction (initiator's, responder's) was switched in
    /// when it was sent into the appliance: it is switched in it again when it
    /// comes back (the appliance's vNICs may sit in another zone).
    pub segments: [Segment; 2],
}

impl Steer {
    /// No instance chosen yet.
    pub const UNASSIGNED: u16 = u16::MAX;

    /// A connection's steering through `chain`, no instance chosen yet.
    pub fn new(chain: u16) -> Steer {
        Steer {
            chain,
            instances: [Steer::UNASSIGNED; MAX_STAGES],
            offload: None,
            segments: [Segment::UNTAGGED; 2],
        }
    }
}

/// An appliance's decision for the rest of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OffloadVerdict {
    /// Deliver the rest of the flow without the appliance.
    Allow,
    /// Drop the rest of the flow.
    Drop,
}

impl OffloadVerdict {
    /// `allow` or `drop`.
    pub const fn name(self) -> &'static str {
        match self {
            OffloadVerdict::Allow => "allow",
            OffloadVerdict::Drop => "drop",
        }
    }

    /// Parse `allow` or `drop`.
    pub fn parse(s: &str) -> Option<OffloadVerdict> {
        match s {
            "allow" => Some(OffloadVerdict::Allow),
            "drop" => Some(OffloadVerdict::Drop),
            _ => None,
        }
    }
}

/// Why [`crate::Engine::offload_flow`] did nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// No connection has that 5-tuple (in either direction).
    #[error("no tracked connection has this 5-tuple")]
    NoConnection,
    /// The connection is not steered through a service chain.
    #[error("the connection is not steered through a service chain")]
    NotSteered,
}

/// Which side of an appliance instance a port is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// The initiator's packets enter here (and the responder's leave).
    In,
    /// The initiator's packets leave here (and the responder's enter).
    Out,
}

/// The role of a port that is one side of an appliance instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServicePort {
    pub(crate) chain: u16,
    pub(crate) stage: u16,
    pub(crate) instance: u16,
    pub(crate) side: Side,
}

/// One instance of a chain and its counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceStats {
    /// The appliance VM (an external appliance: its address).
    pub vm: Arc<str>,
    /// The stage of its chain it serves (0: the first).
    pub stage: u16,
    /// Its `in` vNIC and that vNIC's port here, if attached (an external
    /// appliance: the side's name, `ADDRESS vni N`, and no port).
    pub vnic_in: (Arc<str>, Option<PortId>),
    /// Its `out` vNIC and that vNIC's port here, if attached (as `vnic_in`).
    pub vnic_out: (Arc<str>, Option<PortId>),
    /// An external appliance's address and VNIs (`None`: a VM's vNICs).
    pub external: Option<ExternalAppliance>,
    /// In service: both ports attached with link, and its probes answer
    /// (or its chain is not probed).
    pub up: bool,
    /// Both ports attached and with link (an external appliance: always,
    /// it has no link here).
    pub link_up: bool,
    /// Its probes answer, as the caller last reported
    /// ([`crate::Engine::set_probe_health`]; up until reported otherwise).
    pub probe_up: bool,
    /// Probes this engine took back from it (checked, consumed).
    pub probes_returned: u64,
    /// Packets sent into it.
    pub sent: u64,
    /// Packets that came back from it and went on.
    pub returned: u64,
    /// Connections steered to it (first choice or failover).
    pub flows: u64,
}

/// A service chain as the engine runs it, with its counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainStats {
    /// The chain's name.
    pub name: Arc<str>,
    /// What its flows do when no instance is up.
    pub on_failure: OnFailure,
    /// Its stages (at least one when declared valid).
    pub stages: u16,
    /// Its instances, stage by stage, each stage's in declaration order.
    pub instances: Vec<InstanceStats>,
    /// Connections moved from an instance that went down to another.
    pub failovers: u64,
    /// Packets that skipped a stage because none of its instances was up
    /// (`open`; counted once per stage skipped).
    pub bypassed: u64,
    /// Packets dropped because none of a stage's instances was up (`closed`).
    pub dropped: u64,
    /// Connections an appliance offloaded (either verdict).
    pub offloaded: u64,
    /// Its health probe (`None`: link state only).
    pub probe: Option<ChainProbe>,
    /// Probe-shaped frames from its instances' ports that failed the
    /// checks (a wrong tag, instance or side): dropped, never credited.
    pub probes_rejected: u64,
}

/// The engine's chains: resolved against its ports, with every port's role.
#[derive(Debug, Default)]
pub(crate) struct ServiceChains {
    pub(crate) chains: Vec<ChainStats>,
    /// By port index: the appliance side it is, if any.
    roles: Vec<Option<ServicePort>>,
    /// By port index: link down (reported by the caller; survives policy changes).
    down: Vec<bool>,
    /// External instances' sides by (address, VNI): what a packet coming
    /// back over the underlay from that address in that VNI is.
    tunnels: HashMap<(Ipv4Addr, u32), ServicePort, foldhash::fast::RandomState>,
}

impl ServiceChains {
    /// Whether any chain is declared (the hot path's one test when none is).
    #[inline(always)]
    pub(crate) fn any(&self) -> bool {
        !self.chains.is_empty()
    }

    /// The chain named `name`.
    pub(crate) fn index_of(&self, name: &str) -> Option<u16> {
        self.chains.iter().position(|c| &*c.name == name).map(|i| i as u16)
    }

    /// Whether any chain has an external instance (the underlay path's one
    /// test when none has).
    #[inline(always)]
    pub(crate) fn any_external(&self) -> bool {
        !self.tunnels.is_empty()
    }

    /// The external instance's side that sends from `remote` in `vni`, if any.
    #[inline]
    pub(crate) fn tunnel_role(&self, remote: Ipv4Addr, vni: u32) -> Option<ServicePort> {
        self.tunnels.get(&(remote, vni)).copied()
    }

    /// The appliance role of `port`, if any.
    #[inline(always)]
    pub(crate) fn role(&self, port: PortId) -> Option<ServicePort> {
        self.roles.get(usize::from(port.0)).copied().flatten()
    }

    /// Rebuild from a policy's chains, resolving vNIC names with `port_of`.
    /// Counters carry over for chains and instances of the same names.
    pub(crate) fn resolve(&mut self, decl: &[ServiceChain], ports: usize, port_of: impl Fn(&str) -> Option<PortId>) {
        let old = std::mem::take(&mut self.chains);
        self.roles = vec![None; ports];
        self.tunnels.clear();
        self.down.resize(ports, false);
        for (ci, c) in decl.iter().enumerate().take(usize::from(u16::MAX)) {
            let before = old.iter().find(|o| *o.name == *c.name);
            let mut stats = ChainStats {
                name: c.name.as_str().into(),
                on_failure: c.on_failure,
                stages: c.stages.len().min(MAX_STAGES) as u16,
                instances: Vec::with_capacity(c.appliances().count()),
                failovers: before.map_or(0, |b| b.failovers),
                bypassed: before.map_or(0, |b| b.bypassed),
                dropped: before.map_or(0, |b| b.dropped),
                offloaded: before.map_or(0, |b| b.offloaded),
                probe: c.probe,
                probes_rejected: before.map_or(0, |b| b.probes_rejected),
            };
            let staged = c
                .stages
                .iter()
                .take(MAX_STAGES)
                .enumerate()
                .flat_map(|(si, st)| st.appliances.iter().map(move |a| (si as u16, a)));
            for (ii, (stage, a)) in staged.enumerate().take(usize::from(u16::MAX)) {
                let role = |side| ServicePort {
                    chain: ci as u16,
                    stage,
                    instance: ii as u16,
                    side,
                };
                if let Some(x) = a.external {
                    // Validation makes every (address, VNI) one side of one
                    // instance; should a model that skipped it repeat one,
                    // the first declared keeps it.
                    for (vni, side) in [(x.vni_in, Side::In), (x.vni_out, Side::Out)] {
                        self.tunnels.entry((x.address, vni)).or_insert(role(side));
                    }
                }
                let (pin, pout) = match a.external {
                    Some(_) => (None, None),
                    None => (port_of(&a.vnic_in), port_of(&a.vnic_out)),
                };
                for (p, side) in [(pin, Side::In), (pout, Side::Out)] {
                    if let Some(slot) = p.and_then(|p| self.roles.get_mut(usize::from(p.0))) {
                        *slot = Some(role(side));
                    }
                }
                let prev = before.and_then(|b| b.instances.iter().find(|i| *i.vnic_in.0 == *a.vnic_in));
                stats.instances.push(InstanceStats {
                    vm: a.vm.as_str().into(),
                    stage,
                    vnic_in: (a.vnic_in.as_str().into(), pin),
                    vnic_out: (a.vnic_out.as_str().into(), pout),
                    external: a.external,
                    up: false,
                    link_up: false,
                    probe_up: prev.is_none_or(|p| p.probe_up),
                    probes_returned: prev.map_or(0, |p| p.probes_returned),
                    sent: prev.map_or(0, |p| p.sent),
                    returned: prev.map_or(0, |p| p.returned),
                    flows: prev.map_or(0, |p| p.flows),
                });
            }
            self.chains.push(stats);
        }
        self.refresh_health();
    }

    /// Record `port`'s link state; instances' health follows.
    pub(crate) fn set_link(&mut self, port: PortId, up: bool) {
        let i = usize::from(port.0);
        if self.down.len() <= i {
            self.down.resize(i + 1, false);
        }
        self.down[i] = !up;
        self.refresh_health();
    }

    fn refresh_health(&mut self) {
        let down = &self.down;
        let up = |p: Option<PortId>| p.is_some_and(|p| !down.get(usize::from(p.0)).copied().unwrap_or(false));
        for c in &mut self.chains {
            let probed = c.probe.is_some();
            for i in &mut c.instances {
                i.link_up = i.external.is_some() || (up(i.vnic_in.1) && up(i.vnic_out.1));
                i.up = i.link_up && (i.probe_up || !probed);
            }
        }
    }

    /// Record whether `instance` of `chain`'s probes answer; its health follows.
    pub(crate) fn set_probe(&mut self, chain: u16, instance: u16, up: bool) {
        if let Some(i) = self.instance_mut(chain, instance) {
            i.probe_up = up;
        }
        self.refresh_health();
    }

    /// The instance of `chain`'s `stage` for a flow whose symmetric hash is
    /// `hash`: rendezvous hashing over the stage's healthy instances (the
    /// highest score wins), so an instance going down moves only its own
    /// flows.
    pub(crate) fn pick(&self, chain: u16, stage: u16, hash: u64) -> Option<u16> {
        let c = self.chains.get(usize::from(chain))?;
        c.instances
            .iter()
            .enumerate()
            .filter(|(_, i)| i.up && i.stage == stage)
            .max_by_key(|(n, _)| mix(hash ^ (*n as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)))
            .map(|(n, _)| n as u16)
    }

    /// Instance `instance` of `chain`.
    pub(crate) fn instance(&self, chain: u16, instance: u16) -> Option<&InstanceStats> {
        self.chains
            .get(usize::from(chain))?
            .instances
            .get(usize::from(instance))
    }

    pub(crate) fn instance_mut(&mut self, chain: u16, instance: u16) -> Option<&mut InstanceStats> {
        self.chains
            .get_mut(usize::from(chain))?
            .instances
            .get_mut(usize::from(instance))
    }

    pub(crate) fn chain_mut(&mut self, chain: u16) -> Option<&mut ChainStats> {
        self.chains.get_mut(usize::from(chain))
    }
}

/// A 64-bit finalizer (splitmix64's): every input bit affects every output bit.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
