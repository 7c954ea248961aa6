//! L2 forwarding per segment, with MAC learning and anti-spoofing.
//!
//! Each segment (VLAN or VNI) is its own broadcast domain: a destination MAC is
//! looked up in that segment only, and unknown, broadcast and multicast
//! destinations are flooded to that segment's ports (and the uplink) only. A
//! vNIC's own MAC is bound statically when its port is added; MACs behind the
//! uplink are learned, with the tunnel endpoint they came from.
//!
//! Anti-spoofing: a VM may send only from its own MAC and addresses, and may
//! claim only those in ARP (sender fields) and IPv6 neighbour discovery (source
//! and target link-layer options, advertised target). It may not send router
//! advertisements or redirects.

use core::net::{IpAddr, Ipv4Addr};
use std::collections::HashMap;

use foldhash::fast::RandomState;

use palisade_wire::arp::{self, ArpRepr};
use palisade_wire::ethernet::EthernetAddress;
use palisade_wire::flow::Segment;
use palisade_wire::icmpv6::{self, Icmpv6Repr, NdiscRepr};

use crate::port::{PortId, VnicPort};
use crate::verdict::DropReason;

/// Where a MAC lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// A local port (a vNIC, or the uplink for the physical network).
    Port(PortId),
    /// Another host, reached through the tunnel endpoint at this address.
    Remote(Ipv4Addr),
}

/// A table key: the segment and the MAC packed into one integer, which
/// hashes in two multiplies (every forwarded packet looks one up).
fn mac_key(segment: Segment, mac: EthernetAddress) -> u128 {
    let [a, b, c, d, e, f] = mac.0;
    u128::from(segment.raw()) << 64 | u128::from(u64::from_be_bytes([0, 0, a, b, c, d, e, f]))
}

/// The MAC table: (segment, MAC) → location, bounded.
#[derive(Debug, Clone)]
pub struct MacTable {
    table: HashMap<u128, Location, RandomState>,
    capacity: usize,
    /// Bumped by every change to `table`, so a remembered lookup
    /// ([`LastDestination`]) knows whether it still holds. Starts at 1: a
    /// fresh `LastDestination` (generation 0) never matches.
    generation: u64,
    /// Learning attempts refused because the table was full.
    pub learn_refused: u64,
}

/// One port's last unicast destination and where it lived, valid while the
/// table has not changed since ([`MacTable::lookup_via`]).
///
/// Most frames a port sends go where its previous frame went (a VM's
/// routed traffic all goes to its gateway's MAC; a bulk transfer to one
/// peer), and remembering that skips the table's hash and probe, the biggest
/// single cost of switching a cached flow's packet.
#[derive(Debug, Clone, Copy, Default)]
pub struct LastDestination {
    key: u128,
    generation: u64,
    location: Option<Location>,
}

impl MacTable {
    /// A table of at most `capacity` learned or bound MACs.
    pub fn new(capacity: usize) -> Self {
        MacTable {
            table: HashMap::with_capacity_and_hasher(capacity, RandomState::default()),
            capacity,
            generation: 1,
            learn_refused: 0,
        }
    }

    /// Bind a vNIC's MAC to its port (static).
    pub fn bind(&mut self, segment: Segment, mac: EthernetAddress, port: PortId) {
        self.table.insert(mac_key(segment, mac), Location::Port(port));
        self.generation += 1;
    }

    /// Learn where `mac` lives from a frame received from outside; a MAC bound
    /// to a local vNIC is never moved by what arrives on the uplink.
    pub fn learn(&mut self, segment: Segment, mac: EthernetAddress, at: Location) {
        if !mac.is_unicast() {
            return;
        }
        let room = self.table.len() < self.capacity;
        match self.table.get_mut(&mac_key(segment, mac)) {
            Some(Location::Port(p)) if *p != crate::port::UPLINK => {}
            // Every frame from outside is learned from: only a move is a change.
            Some(loc) if *loc == at => {}
            Some(loc) => {
                *loc = at;
                self.generation += 1;
            }
            None if room => {
                self.table.insert(mac_key(segment, mac), at);
                self.generation += 1;
            }
            None => self.learn_refused += 1,
        }
    }

    /// Where `mac` lives in `segment`.
    pub fn lookup(&self, segment: Segment, mac: EthernetAddress) -> Option<Location> {
        if !mac.is_unicast() {
            return None;
        }
        self.table.get(&mac_key(segment, mac)).copied()
    }

    /// Where `mac` lives in `segment`, answered from `last` when it names the
    /// same destination and the table has not changed since; `last` then
    /// remembers this lookup.
    pub fn lookup_via(&self, last: &mut LastDestination, segment: Segment, mac: EthernetAddress) -> Option<Location> {
        if !mac.is_unicast() {
            return None;
        }
        let key = mac_key(segment, mac);
        if last.key == key && last.generation == self.generation {
            return last.location;
        }
        let location = self.table.get(&key).copied();
        *last = LastDestination {
            key,
            generation: self.generation,
            location,
        };
        location
    }

    /// Forget a vNIC's binding (no engine path detaches a vNIC yet; the
    /// table's tests use it).
    #[cfg(test)]
    pub fn unbind(&mut self, segment: Segment, mac: EthernetAddress) {
        self.table.remove(&mac_key(segment, mac));
        self.generation += 1;
    }
}

/// Check an ARP packet a VM sent.
pub fn check_arp(port: &VnicPort, payload: &[u8]) -> Result<(), DropReason> {
    let packet = arp::Packet::new_checked(payload).map_err(|_| DropReason::Malformed)?;
    let repr = ArpRepr::parse(&packet).map_err(|_| DropReason::Malformed)?;
    let ip_ok = port.any_source
        || repr.source_protocol_addr.is_unspecified()
        || port.owns(IpAddr::V4(repr.source_protocol_addr));
    if repr.source_hardware_addr != port.mac || !ip_ok {
        return Err(DropReason::SpoofedArp);
    }
    Ok(())
}

/// Check the source address of an IP packet a VM sent. DHCP discovery
/// (0.0.0.0 → UDP 67) and IPv6 neighbour discovery from the unspecified or a
/// link-local address are allowed before the VM has its address.
pub fn check_ip_source(port: &VnicPort, src: IpAddr, protocol: u8, dst_port: u16) -> Result<(), DropReason> {
    if port.any_source || port.owns(src) {
        return Ok(());
    }
    let ok = match src {
        IpAddr::V4(a) => a.is_unspecified() && protocol == 17 && dst_port == 67,
        IpAddr::V6(a) => (a.is_unspecified() || a.is_unicast_link_local()) && protocol == 58,
    };
    if ok { Ok(()) } else { Err(DropReason::SpoofedIp) }
}

/// Check an ICMPv6 message a VM sent (neighbour discovery claims).
pub fn check_icmpv6(port: &VnicPort, message: &[u8]) -> Result<(), DropReason> {
    let packet = icmpv6::Packet::new_checked(message).map_err(|_| DropReason::Malformed)?;
    let Ok(Icmpv6Repr::Ndisc(nd)) = Icmpv6Repr::parse(&packet) else {
        return Ok(());
    };
    if port.any_source {
        // A router leg announces itself and answers for the addresses it routes.
        return Ok(());
    }
    match nd {
        NdiscRepr::RouterAdvert { .. } | NdiscRepr::Redirect { .. } => return Err(DropReason::SpoofedNd),
        NdiscRepr::NeighborAdvert { target_addr, .. } if !port.owns(IpAddr::V6(target_addr)) => {
            return Err(DropReason::SpoofedNd);
        }
        _ => {}
    }
    for opt in nd.option_iter() {
        let opt = opt.map_err(|_| DropReason::Malformed)?;
        if let Some(mac) = opt.link_layer_addr()
            && mac != port.mac
        {
            return Err(DropReason::SpoofedNd);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port() -> VnicPort {
        VnicPort {
            name: "a.0".into(),
            vm: "a".into(),
            mac: EthernetAddress([2, 0, 0, 0, 0, 1]),
            ips: vec!["10.0.0.1".parse().unwrap()],
            zone: "z".into(),
            segment: Segment::vlan(10),
            group_id: 1,
            strict: false,
            max_conns: 10,
            any_source: false,
        }
    }

    /// A remembered lookup answers only for the same destination in the
    /// same segment, and only until the table changes.
    #[test]
    fn a_remembered_destination_holds_until_the_table_changes() {
        let mut t = MacTable::new(8);
        let seg = Segment::vlan(10);
        let (mac, other) = (EthernetAddress([2, 0, 0, 0, 0, 9]), EthernetAddress([2, 0, 0, 0, 0, 8]));
        let vtep = |d| Location::Remote(Ipv4Addr::new(192, 168, 0, d));
        let mut last = LastDestination::default();
        assert_eq!(t.lookup_via(&mut last, seg, mac), None, "unknown yet");
        t.learn(seg, mac, vtep(2));
        assert_eq!(t.lookup_via(&mut last, seg, mac), Some(vtep(2)), "learned since");
        t.learn(seg, mac, vtep(2));
        assert_eq!(t.lookup_via(&mut last, seg, mac), Some(vtep(2)), "relearned in place");
        t.learn(seg, mac, vtep(3));
        assert_eq!(
            t.lookup_via(&mut last, seg, mac),
            Some(vtep(3)),
            "moved to another host"
        );
        assert_eq!(t.lookup_via(&mut last, Segment::vlan(11), mac), None, "another segment");
        assert_eq!(t.lookup_via(&mut last, seg, other), None, "another MAC");
        t.bind(seg, other, PortId(4));
        assert_eq!(
            t.lookup_via(&mut last, seg, other),
            Some(Location::Port(PortId(4))),
            "bound since"
        );
        t.unbind(seg, other);
        assert_eq!(t.lookup_via(&mut last, seg, other), None, "unbound since");
        let broadcast = EthernetAddress([0xff; 6]);
        assert_eq!(t.lookup_via(&mut last, seg, broadcast), None, "never remembered");
    }

    #[test]
    fn learning_never_moves_a_bound_vnic() {
        let mut t = MacTable::new(2);
        let mac = EthernetAddress([2, 0, 0, 0, 0, 1]);
        t.bind(Segment::vlan(10), mac, PortId(3));
        t.learn(Segment::vlan(10), mac, Location::Remote(Ipv4Addr::new(1, 1, 1, 1)));
        assert_eq!(t.lookup(Segment::vlan(10), mac), Some(Location::Port(PortId(3))));
        assert_eq!(t.lookup(Segment::vlan(11), mac), None, "segments are separate");
        let other = EthernetAddress([2, 0, 0, 0, 0, 2]);
        t.learn(Segment::vlan(10), other, Location::Port(PortId(0)));
        t.learn(
            Segment::vlan(10),
            EthernetAddress([2, 0, 0, 0, 0, 3]),
            Location::Port(PortId(0)),
        );
        assert_eq!(t.learn_refused, 1);
        assert_eq!(t.lookup(Segment::vlan(10), EthernetAddress::BROADCAST), None);
    }

    #[test]
    fn source_checks() {
        let p = port();
        assert_eq!(check_ip_source(&p, "10.0.0.1".parse().unwrap(), 6, 80), Ok(()));
        assert_eq!(
            check_ip_source(&p, "10.0.0.2".parse().unwrap(), 6, 80),
            Err(DropReason::SpoofedIp)
        );
        assert_eq!(check_ip_source(&p, "0.0.0.0".parse().unwrap(), 17, 67), Ok(()));
        assert_eq!(check_ip_source(&p, "fe80::1".parse().unwrap(), 58, 0), Ok(()));
        assert_eq!(
            check_ip_source(&p, "fe80::1".parse().unwrap(), 6, 0),
            Err(DropReason::SpoofedIp)
        );
    }
}
