//! Health probes through service-chain appliances: a frame sent into one
//! side of an instance that must come out of the other.
//!
//! Link state ([`crate::Engine::set_port_link`]) tells that an appliance's
//! vNICs are there; only a frame that crosses it tells that it forwards.
//! Every round, the [`ProbeMonitor`] makes two probe frames per instance:
//! one into its `in` port that must come back on its `out` port (the
//! initiator's direction), one into `out` that must come back on `in`.
//! The engine that receives a probe back on an appliance port consumes it
//! (it is never delivered: [`crate::DropReason::ApplianceProbe`]), checks it
//! and hands it to the caller ([`crate::Engine::take_probe_returns`]); the
//! monitor counts a round answered when both came back before the next
//! round, lost otherwise. `down_after` rounds lost in a row take the
//! instance out of service, `up_after` rounds answered in a row return it
//! (hysteresis: one lost frame does not move flows, and a flapping
//! appliance does not get them back at its first answer). The result goes
//! to every engine with [`crate::Engine::set_probe_health`]; an instance
//! serves while its link is up *and* its probes answer.
//!
//! A probe is an IPv4/UDP frame to the BFD echo port (3785, the port of a
//! frame meant to be looped back) between link-local addresses, whose
//! payload carries a marker, the chain and instance it was sent through,
//! its direction, the round and a tag: a keyed hash (SipHash-1-3 under a
//! random [`ProbeKey`] the appliance never sees) of the rest. A probe back
//! on an appliance port counts only if its tag is right, it names the
//! instance that port belongs to, and it arrives on the side its direction
//! leaves by; the monitor then takes only the current round. So an
//! appliance cannot answer for another instance (its frames only arrive on
//! its own ports, and it cannot make a tag), cannot answer ahead (the next
//! round's tag is unknown to it), and cannot reflect a probe back where it
//! came in. What it can do is pass the probes and nothing else: a probe
//! checks the path, not the appliance's verdicts.
//!
//! An external instance (reached over the underlay) is probed the same
//! way through its tunnels: the probe frame goes VXLAN-encapsulated to its
//! address in the VNI of the side it enters ([`ProbeFrame::remote`]), and
//! must come back from that address in the other side's VNI, where the
//! engine that receives it checks it as above (the (address, VNI) it comes
//! from names the instance and side). It has no link: its probes are its
//! only health.
//!
//! Byte order: network (big endian) throughout the frame.

use core::hash::{BuildHasher, Hasher};
use core::net::Ipv4Addr;
use core::ops::Range;
use std::collections::HashMap;
use std::hash::RandomState;
use std::sync::Arc;

use palisade_policy::model::ChainProbe;

use crate::port::{PortId, UPLINK};
use crate::service::ChainStats;

/// The UDP port probes are sent to and from: the BFD echo port.
pub const PROBE_UDP_PORT: u16 = 3785;

/// The marker a probe's payload starts with.
const MAGIC: [u8; 8] = *b"PLSDPROB";

/// Field offsets in a probe frame (untagged Ethernet, IPv4 without options, UDP).
mod field {
    use core::ops::Range;
    pub const DST_MAC: Range<usize> = 0..6;
    pub const SRC_MAC: Range<usize> = 6..12;
    pub const ETHERTYPE: Range<usize> = 12..14;
    pub const IP: usize = 14;
    pub const IP_TOTAL_LEN: Range<usize> = 16..18;
    pub const IP_PROTOCOL: usize = 23;
    pub const IP_CHECKSUM: Range<usize> = 24..26;
    pub const IP_SRC: Range<usize> = 26..30;
    pub const IP_DST: Range<usize> = 30..34;
    pub const UDP: usize = 34;
    pub const UDP_SRC: Range<usize> = 34..36;
    pub const UDP_DST: Range<usize> = 36..38;
    pub const UDP_LEN: Range<usize> = 38..40;
    pub const MAGIC: Range<usize> = 42..50;
    pub const CHAIN: Range<usize> = 50..52;
    pub const INSTANCE: Range<usize> = 52..54;
    pub const DIRECTION: usize = 54;
    pub const RESERVED: Range<usize> = 55..58;
    pub const ROUND: Range<usize> = 58..66;
    pub const TAG: Range<usize> = 66..74;
    pub const END: usize = 74;
}

/// Length of a probe frame.
pub const PROBE_FRAME_LEN: usize = field::END;

/// Which way a probe crosses an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeDirection {
    /// Into `in`, out of `out` (the way a connection's initiator's packets go).
    Forward,
    /// Into `out`, out of `in` (the responder's way).
    Reverse,
}

impl ProbeDirection {
    const fn byte(self) -> u8 {
        match self {
            ProbeDirection::Forward => 0,
            ProbeDirection::Reverse => 1,
        }
    }

    const fn index(self) -> usize {
        self.byte() as usize
    }
}

/// The key probe tags are made with: random, shared by every engine of an
/// agent (so that any of them can check a probe another one's round sent),
/// never on the wire.
#[derive(Debug, Clone, Default)]
pub struct ProbeKey(RandomState);

impl ProbeKey {
    /// A fresh random key.
    pub fn random() -> ProbeKey {
        ProbeKey(RandomState::new())
    }

    fn tag(&self, chain: u16, instance: u16, direction: ProbeDirection, round: u64) -> u64 {
        let mut h = self.0.build_hasher();
        h.write_u16(chain);
        h.write_u16(instance);
        h.write_u8(direction.byte());
        h.write_u64(round);
        h.finish()
    }
}

/// A probe frame to send into an appliance port, or over the underlay to
/// an external appliance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeFrame {
    /// The port to send it on (for an external appliance, the uplink).
    pub port: PortId,
    /// The frame; for an external appliance the underlay datagram's
    /// payload: the VXLAN header (the VNI of the side it enters), then the
    /// probe frame.
    pub frame: Vec<u8>,
    /// For an external appliance, its address: `frame` goes to it over the
    /// underlay socket (`None`: out of `port`).
    pub remote: Option<Ipv4Addr>,
}

/// The underlay payload of a probe into an external appliance: a plain
/// VXLAN header (no group policy: the appliance is no Palisade host) for
/// `vni`, then `frame`.
fn tunnelled(vni: u32, frame: &[u8]) -> Vec<u8> {
    use palisade_wire::vxlan;
    let mut out = vec![0u8; vxlan::HEADER_LEN + frame.len()];
    vxlan::VxlanRepr { vni, gbp: None }.emit(&mut vxlan::Packet::new_unchecked(&mut out[..vxlan::HEADER_LEN]));
    out[vxlan::HEADER_LEN..].copy_from_slice(frame);
    out
}

/// A probe that came back through its instance and passed the checks
/// (tag, instance, side), as the receiving engine hands it over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeReturn {
    /// The chain (index into the engine's chains).
    pub chain: u16,
    /// The instance (index into the chain's instances).
    pub instance: u16,
    /// Which way it crossed.
    pub direction: ProbeDirection,
    /// The round it was sent in.
    pub round: u64,
}

/// A probe frame's fields, as read back (not yet checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProbeFields {
    pub(crate) chain: u16,
    pub(crate) instance: u16,
    pub(crate) direction: ProbeDirection,
    pub(crate) round: u64,
    tag: u64,
}

impl ProbeFields {
    /// Whether its tag is the one `key` makes for its fields.
    pub(crate) fn authentic(&self, key: &ProbeKey) -> bool {
        key.tag(self.chain, self.instance, self.direction, self.round) == self.tag
    }
}

fn be16(b: &[u8], r: Range<usize>) -> u16 {
    u16::from_be_bytes([b[r.start], b[r.start + 1]])
}

/// A probe frame's fields if `frame` is shaped as one (the marker at its
/// place in an IPv4/UDP frame to the probe port); `None` for anything else,
/// which then goes the way of any frame. Shape only: the caller checks.
pub(crate) fn parse(frame: &[u8]) -> Option<ProbeFields> {
    if frame.len() < field::END
        || frame[field::ETHERTYPE] != [0x08, 0x00]
        || frame[field::IP] != 0x45
        || frame[field::IP_PROTOCOL] != 17
        || be16(frame, field::UDP_DST) != PROBE_UDP_PORT
        || frame[field::MAGIC] != MAGIC
        // Zero, so that every byte a probe carries is either fixed or tagged.
        || frame[field::RESERVED] != [0; 3]
    {
        return None;
    }
    let direction = match frame[field::DIRECTION] {
        0 => ProbeDirection::Forward,
        1 => ProbeDirection::Reverse,
        _ => return None,
    };
    let u64_at = |r: Range<usize>| u64::from_be_bytes(<[u8; 8]>::try_from(&frame[r]).unwrap_or([0; 8]));
    Some(ProbeFields {
        chain: be16(frame, field::CHAIN),
        instance: be16(frame, field::INSTANCE),
        direction,
        round: u64_at(field::ROUND),
        tag: u64_at(field::TAG),
    })
}

/// The probe frame for `instance` of `chain` in `direction`, round `round`.
///
/// Its MACs are locally administered unicast addresses, one per direction,
/// so that a learning bridge inside the appliance learns each on the side
/// it enters and sends the other direction's probe out of the right side.
pub fn probe_frame(key: &ProbeKey, chain: u16, instance: u16, direction: ProbeDirection, round: u64) -> Vec<u8> {
    let mut f = vec![0u8; field::END];
    let mac = |d: u8| [0x02, 0x50, 0x4c, 0x53, 0x44, d];
    let (src, dst) = (direction.byte(), 1 - direction.byte());
    f[field::DST_MAC].copy_from_slice(&mac(dst));
    f[field::SRC_MAC].copy_from_slice(&mac(src));
    f[field::ETHERTYPE].copy_from_slice(&[0x08, 0x00]);
    let ip_len = (field::END - field::IP) as u16;
    f[field::IP] = 0x45;
    f[field::IP_TOTAL_LEN].copy_from_slice(&ip_len.to_be_bytes());
    f[field::IP + 6] = 0x40; // don't fragment
    f[field::IP + 8] = 64; // TTL
    f[field::IP_PROTOCOL] = 17;
    let addr = |d: u8| [169, 254, 0x50, 1 + d];
    f[field::IP_SRC].copy_from_slice(&addr(src));
    f[field::IP_DST].copy_from_slice(&addr(dst));
    let sum = ipv4_checksum(&f[field::IP..field::UDP]);
    f[field::IP_CHECKSUM].copy_from_slice(&sum.to_be_bytes());
    f[field::UDP_SRC].copy_from_slice(&PROBE_UDP_PORT.to_be_bytes());
    f[field::UDP_DST].copy_from_slice(&PROBE_UDP_PORT.to_be_bytes());
    f[field::UDP_LEN].copy_from_slice(&((field::END - field::UDP) as u16).to_be_bytes());
    // UDP checksum 0: none (IPv4).
    f[field::MAGIC].copy_from_slice(&MAGIC);
    f[field::CHAIN].copy_from_slice(&chain.to_be_bytes());
    f[field::INSTANCE].copy_from_slice(&instance.to_be_bytes());
    f[field::DIRECTION] = direction.byte();
    f[field::ROUND].copy_from_slice(&round.to_be_bytes());
    f[field::TAG].copy_from_slice(&key.tag(chain, instance, direction, round).to_be_bytes());
    f
}

/// The Internet checksum of an IPv4 header whose checksum field is zero.
fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One instance's probing, as the monitor keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceProbe {
    /// The chain's name.
    pub chain: Arc<str>,
    /// The appliance VM.
    pub vm: Arc<str>,
    /// Its probes answer (or it has not been probed out of service yet).
    pub up: bool,
    /// Rounds lost in a row (while up) or answered in a row (while down).
    pub streak: u32,
    /// Probe frames sent through it.
    pub sent: u64,
    /// Probe frames that came back in time.
    pub returned: u64,
    /// Rounds lost.
    pub missed: u64,
    /// Times its probes took it down.
    pub downs: u64,
    /// The round in flight and which directions have come back.
    round: Option<u64>,
    back: [bool; 2],
    /// When its last round was sent (the caller's clock, ns).
    sent_at: u64,
}

/// An instance whose probe health changed in a [`ProbeMonitor::tick`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeChange {
    /// The chain (index into the engine's chains).
    pub chain: u16,
    /// The instance (index into the chain's instances).
    pub instance: u16,
    /// Its probes now answer.
    pub up: bool,
}

/// The probing of every chain's instances: rounds, hysteresis, counters.
/// Time is passed in; it holds no engine, so one monitor serves every
/// engine of a host.
#[derive(Debug)]
pub struct ProbeMonitor {
    key: ProbeKey,
    round: u64,
    /// By (chain name, appliance VM, `in` vNIC): survives policy changes
    /// that renumber chains.
    instances: HashMap<InstanceName, InstanceProbe>,
}

/// An instance by name: its chain, its appliance VM and its `in` vNIC.
type InstanceName = (Arc<str>, Arc<str>, Arc<str>);

impl ProbeMonitor {
    /// A monitor making tags with `key` (the one the engines check with,
    /// [`crate::Engine::set_probe_key`]).
    pub fn new(key: ProbeKey) -> ProbeMonitor {
        ProbeMonitor {
            key,
            round: 0,
            instances: HashMap::new(),
        }
    }

    /// Every instance's probing, in no particular order.
    pub fn instances(&self) -> impl Iterator<Item = &InstanceProbe> {
        self.instances.values()
    }

    /// One round of housekeeping at `now` (ns) over `chains` (as an engine
    /// runs them: [`crate::Engine::service_chains`]), given the probes the
    /// engines took back since the last call: credits them, closes the
    /// rounds that are due (answered or lost, with hysteresis), and appends
    /// the frames of the rounds it starts to `frames`. Only instances whose
    /// chain is probed and whose ports are both attached and have link are
    /// probed (link down is down already; probing resumes with the link).
    /// Returns the instances whose probe health changed, to hand to every
    /// engine.
    pub fn tick(
        &mut self,
        now: u64,
        chains: &[ChainStats],
        returns: &[ProbeReturn],
        frames: &mut Vec<ProbeFrame>,
    ) -> Vec<ProbeChange> {
        let mut changes = Vec::new();
        let mut seen = Vec::with_capacity(self.instances.len());
        for (ci, chain) in chains.iter().enumerate() {
            let Some(config) = chain.probe else { continue };
            for (ii, inst) in chain.instances.iter().enumerate() {
                // Where each direction's probe goes in: the instance's ports,
                // or its tunnels.
                let into = match inst.external {
                    Some(x) => [
                        (UPLINK, Some((x.address, x.vni_in))),
                        (UPLINK, Some((x.address, x.vni_out))),
                    ],
                    None => match (inst.vnic_in.1, inst.vnic_out.1) {
                        (Some(p_in), Some(p_out)) => [(p_in, None), (p_out, None)],
                        _ => continue,
                    },
                };
                let (ci, ii) = (ci as u16, ii as u16);
                let id = (chain.name.clone(), inst.vm.clone(), inst.vnic_in.0.clone());
                seen.push(id.clone());
                let state = self.instances.entry(id).or_insert_with(|| InstanceProbe {
                    chain: chain.name.clone(),
                    vm: inst.vm.clone(),
                    up: true,
                    streak: 0,
                    sent: 0,
                    returned: 0,
                    missed: 0,
                    downs: 0,
                    round: None,
                    back: [false; 2],
                    sent_at: 0,
                });
                for r in returns.iter().filter(|r| r.chain == ci && r.instance == ii) {
                    if state.round == Some(r.round) && !state.back[r.direction.index()] {
                        state.back[r.direction.index()] = true;
                        state.returned += 1;
                    }
                }
                if !inst.link_up {
                    // Down by link: nothing to probe; a round in flight is void.
                    state.round = None;
                    continue;
                }
                let interval = u64::from(config.interval_ms) * 1_000_000;
                if state.round.is_some() && now.saturating_sub(state.sent_at) < interval {
                    continue;
                }
                if state.round.is_some() && close_round(state, &config) {
                    changes.push(ProbeChange {
                        chain: ci,
                        instance: ii,
                        up: state.up,
                    });
                }
                self.round += 1;
                state.round = Some(self.round);
                state.back = [false; 2];
                state.sent_at = now;
                state.sent += 2;
                for ((port, tunnel), direction) in
                    into.into_iter().zip([ProbeDirection::Forward, ProbeDirection::Reverse])
                {
                    let frame = probe_frame(&self.key, ci, ii, direction, self.round);
                    frames.push(match tunnel {
                        Some((remote, vni)) => ProbeFrame {
                            port,
                            frame: tunnelled(vni, &frame),
                            remote: Some(remote),
                        },
                        None => ProbeFrame {
                            port,
                            frame,
                            remote: None,
                        },
                    });
                }
            }
        }
        // Instances no longer declared or attached are forgotten.
        self.instances.retain(|k, _| seen.contains(k));
        changes
    }
}

/// Close `state`'s round in flight: answered (both directions back) or
/// lost. Returns whether its health changed.
fn close_round(state: &mut InstanceProbe, config: &ChainProbe) -> bool {
    let answered = state.back == [true; 2];
    if !answered {
        state.missed += 1;
    }
    if answered == state.up {
        // As expected: the streak towards a change starts over.
        state.streak = 0;
        return false;
    }
    state.streak += 1;
    let needed = if state.up { config.down_after } else { config.up_after };
    if state.streak < needed {
        return false;
    }
    state.up = !state.up;
    state.streak = 0;
    if !state.up {
        state.downs += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_frame_reads_back_and_its_tag_holds_only_under_its_key() {
        let key = ProbeKey::random();
        let f = probe_frame(&key, 3, 7, ProbeDirection::Reverse, 42);
        assert_eq!(f.len(), PROBE_FRAME_LEN);
        let p = parse(&f).expect("a probe");
        assert_eq!(
            (p.chain, p.instance, p.direction, p.round),
            (3, 7, ProbeDirection::Reverse, 42)
        );
        assert!(p.authentic(&key));
        assert!(!p.authentic(&ProbeKey::random()));
        // Any field changed breaks the tag.
        for at in [field::CHAIN.start + 1, field::INSTANCE.start + 1, field::ROUND.end - 1] {
            let mut g = f.clone();
            g[at] ^= 1;
            assert!(!parse(&g).unwrap().authentic(&key), "byte {at}");
        }
        // The IPv4 header checksums to zero.
        assert_eq!(ipv4_checksum(&f[field::IP..field::UDP]), 0);
    }

    #[test]
    fn only_a_probe_shaped_frame_parses() {
        let f = probe_frame(&ProbeKey::random(), 0, 0, ProbeDirection::Forward, 1);
        for (at, v) in [(12, 0x86), (14, 0x46), (23, 6), (37, 0xc8), (42, b'X'), (54, 2)] {
            let mut g = f.clone();
            g[at] = v;
            assert_eq!(parse(&g), None, "byte {at} = {v}");
        }
        assert_eq!(parse(&f[..f.len() - 1]), None);
    }

    #[test]
    fn any_prefix_or_byte_of_a_probe_changed_parses_or_not_without_panic_and_never_authenticates() {
        let key = ProbeKey::random();
        let f = probe_frame(&key, 1, 2, ProbeDirection::Forward, 9);
        for n in 0..f.len() {
            assert_eq!(parse(&f[..n]), None, "prefix {n}");
        }
        // Every value of every byte of the tagged fields: a changed probe is
        // never taken for a genuine one (the tag covers what it names).
        for at in field::CHAIN.start..field::END {
            for v in 0..=255u8 {
                let mut g = f.clone();
                if g[at] == v {
                    continue;
                }
                g[at] = v;
                if let Some(p) = parse(&g) {
                    assert!(!p.authentic(&key), "byte {at} = {v}");
                }
            }
        }
    }
}
