//! The connections a fail-open episode let through, as the agent that
//! ended it meets them: taken over or cut.
//!
//! While the agent was gone, its `on_failure: open` zones forwarded through
//! the kernel fallback ([`crate::fallback`]), unfiltered on this host, so
//! connections may have opened that this agent never saw begin. When it is
//! back, the first segment of each meets an empty entry: a TCP segment with
//! ACK (not an opening SYN) of a connection the tables do not hold. The
//! engine then picks it up as established if the policy allows it, or
//! denies it, and every later segment of it is dropped; either event is
//! marked [`palisade_datapath::FlowEvent::midstream`] (where an opening's
//! start or a denied SYN is not).
//!
//! `TakeOver` counts both, per worker, for the start that ended an
//! episode and only for connections with a local end in one of the
//! episode's zones: connections the runs before held were imported before
//! the workers ran, so they make no start event and are not counted. TCP
//! only: a UDP or ICMP flow has no opening to tell it from a new one. A
//! denied connection is counted once although both of its directions are
//! denied, each on its first segment; one whose first segment was denied
//! (the policy allows only the other direction) and that its other end's
//! segment then picks up counts as picked up, not cut. Counted for the
//! whole run: an idle connection of the episode may be met long after.

use std::collections::HashSet;
use std::sync::Arc;

use palisade_datapath::{EventKind, FlowEvent};
use palisade_wire::flow::FlowKey;
use palisade_wire::ip::IpProtocol;

/// Denied connections remembered so that their two directions count once;
/// beyond it, each further denial counts (at most one too many each).
const CUT_KEYS_KEPT: usize = 65_536;

/// What the take-over of a fail-open episode's connections did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TakeOverCounts {
    /// Connections met mid-stream and picked up as established under the policy.
    pub picked_up: u64,
    /// Connections met mid-stream that the policy denies: cut.
    pub cut: u64,
}

impl TakeOverCounts {
    /// Add `other`'s counts (another worker's).
    pub fn add(&mut self, other: TakeOverCounts) {
        self.picked_up += other.picked_up;
        self.cut += other.cut;
    }
}

/// One worker's count of the episode's connections it meets.
#[derive(Debug)]
pub(crate) struct TakeOver {
    /// By port id: whether the port's zone forwarded during the episode.
    episode_ports: Arc<[bool]>,
    /// The connections counted as cut (by their direction-independent key).
    cut_keys: HashSet<FlowKey>,
    counts: TakeOverCounts,
}

impl TakeOver {
    /// Counting the connections of the ports marked in `episode_ports` (by port id).
    pub fn new(episode_ports: Arc<[bool]>) -> TakeOver {
        TakeOver {
            episode_ports,
            cut_keys: HashSet::new(),
            counts: TakeOverCounts::default(),
        }
    }

    /// What was counted so far.
    pub fn counts(&self) -> TakeOverCounts {
        self.counts
    }

    /// Count `ev` if it is a TCP connection of the episode's ports met mid-stream.
    pub fn note(&mut self, ev: &FlowEvent) {
        if ev.key.protocol != IpProtocol::TCP || !ev.midstream {
            return;
        }
        let in_episode = ev
            .owners
            .iter()
            .flatten()
            .any(|p| self.episode_ports.get(usize::from(p.0)).copied().unwrap_or(false));
        if !in_episode {
            return;
        }
        let (key, _) = ev.key.canonical();
        match ev.kind {
            EventKind::Start => {
                self.counts.picked_up += 1;
                if self.cut_keys.remove(&key) {
                    self.counts.cut -= 1;
                }
            }
            EventKind::Denied(_) => {
                if self.cut_keys.contains(&key) {
                    return;
                }
                if self.cut_keys.len() < CUT_KEYS_KEPT {
                    self.cut_keys.insert(key);
                }
                self.counts.cut += 1;
            }
            EventKind::Update | EventKind::End(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_datapath::port::PortId;
    use palisade_datapath::{ConnState, DropReason};
    use palisade_wire::flow::Segment;

    fn key(sport: u16, dport: u16, protocol: IpProtocol) -> FlowKey {
        let v4 = |last: u8| std::net::Ipv4Addr::new(10, 0, 0, last).to_ipv6_mapped().octets();
        FlowKey {
            segment: Segment::vlan(100),
            src: v4(10),
            dst: v4(11),
            src_port: sport,
            dst_port: dport,
            protocol,
            icmp_type: 0,
            icmp_code: 0,
        }
    }

    /// An event of `kind`, met mid-stream or not, with the state the engine
    /// gives it (a denial has no connection: `New`; a start met mid-stream
    /// is `Established`, an opening `SynSent`).
    fn event(kind: EventKind, key: FlowKey, midstream: bool, owners: [Option<PortId>; 2]) -> FlowEvent {
        let state = match kind {
            EventKind::Denied(_) => ConnState::New,
            _ if midstream => ConnState::Established,
            _ => ConnState::SynSent,
        };
        FlowEvent {
            kind,
            key,
            state,
            midstream,
            packets: 1,
            bytes: 60,
            reply_packets: 0,
            reply_bytes: 0,
            rules: [None; 2],
            policy_version: 1,
            trusted: false,
            owners,
            created: 0,
            last_seen: 0,
            now: 0,
            steer: None,
        }
    }

    const DENY: EventKind = EventKind::Denied(DropReason::PolicyDeny);
    const MID: bool = true;
    const OPENING: bool = false;

    #[test]
    fn mid_stream_connections_of_the_episode_zones_are_counted_once() {
        // Port 1 was in an open zone, port 2 in a closed one.
        let mut t = TakeOver::new(vec![false, true, false].into());
        let (open, closed) = (Some(PortId(1)), Some(PortId(2)));
        let tcp = IpProtocol::TCP;
        // Picked up: a start met mid-stream, an end in the open zone.
        t.note(&event(EventKind::Start, key(40000, 80, tcp), MID, [closed, open]));
        // Not counted: an opening, a UDP flow, the closed zone's, its later
        // events (an update is never marked; one that were is not counted).
        t.note(&event(EventKind::Start, key(40001, 80, tcp), OPENING, [open, None]));
        t.note(&event(
            EventKind::Start,
            key(40002, 53, IpProtocol::UDP),
            MID,
            [open, None],
        ));
        t.note(&event(EventKind::Start, key(40003, 80, tcp), MID, [closed, None]));
        t.note(&event(EventKind::Update, key(40000, 80, tcp), MID, [closed, open]));
        // A denied SYN is no cut connection.
        t.note(&event(DENY, key(40004, 2222, tcp), OPENING, [open, None]));
        assert_eq!(t.counts(), TakeOverCounts { picked_up: 1, cut: 0 });
        // Cut: both directions denied, counted once.
        let denied = key(40005, 2222, tcp);
        t.note(&event(DENY, denied, MID, [open, None]));
        t.note(&event(DENY, denied.reversed(), MID, [None, open]));
        assert_eq!(t.counts(), TakeOverCounts { picked_up: 1, cut: 1 });
        // Denied one way, then picked up from the other: picked up.
        let one_way = key(40006, 443, tcp);
        t.note(&event(DENY, one_way.reversed(), MID, [None, open]));
        assert_eq!(t.counts().cut, 2);
        t.note(&event(EventKind::Start, one_way, MID, [open, None]));
        assert_eq!(t.counts(), TakeOverCounts { picked_up: 2, cut: 1 });
        // A port id beyond the map is no episode port.
        t.note(&event(
            EventKind::Start,
            key(40007, 80, tcp),
            MID,
            [Some(PortId(9)), None],
        ));
        assert_eq!(t.counts().picked_up, 2);
        let mut sum = t.counts();
        sum.add(TakeOverCounts { picked_up: 1, cut: 1 });
        assert_eq!(sum, TakeOverCounts { picked_up: 3, cut: 2 });
    }
}
