//! Ports: the vNICs of the VMs on this host, and the uplink.
//!
//! A vNIC port is bound to its VM's identity (VM and vNIC names from the
//! inventory), its MAC and IP addresses and its zone's segment; the switch uses
//! that binding for anti-spoofing, and the connection tracker for per-vNIC
//! limits and strict/liberal window checking. The uplink is the port towards
//! other hosts and the physical network (VXLAN-GBP over the underlay).

use core::net::{IpAddr, Ipv4Addr};

use palisade_policy::model::{self, Model};
use palisade_wire::ethernet::EthernetAddress;
use palisade_wire::flow::Segment;

/// A port index (stable for the engine's lifetime).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(pub u16);

/// The uplink is always port 0.
pub const UPLINK: PortId = PortId(0);

/// A VM's vNIC attached to this host's switch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VnicPort {
    /// The vNIC's name in the inventory (its chains are named after it).
    pub name: String,
    /// The VM's name.
    pub vm: String,
    /// The vNIC's MAC: the only source MAC it may send from.
    pub mac: EthernetAddress,
    /// Its addresses: the only source addresses it may send from.
    pub ips: Vec<IpAddr>,
    /// Its zone.
    pub zone: String,
    /// The zone's segment.
    pub segment: Segment,
    /// The group id carried in VXLAN-GBP for traffic it sends.
    pub group_id: u16,
    /// Whether TCP windows are checked strictly (drop out-of-window segments).
    pub strict: bool,
    /// Most connections it may hold at once (as either end).
    pub max_conns: u32,
    /// An appliance port (a router or gateway leg, not a VM): it forwards
    /// other hosts' packets, so it may send from any IP address (its MAC is
    /// still checked). It owns no address and has no chains of its own; flows
    /// through it are decided by the managed ends' chains, found by address.
    pub any_source: bool,
}

impl VnicPort {
    /// Whether `ip` is one of the vNIC's addresses.
    pub fn owns(&self, ip: IpAddr) -> bool {
        self.ips.iter().any(|a| canonical_ip(*a) == canonical_ip(ip))
    }

    /// Whether `addr`, in a flow key's form (IPv4 addresses IPv4-mapped), is
    /// one of the vNIC's addresses: [`VnicPort::owns`] without converting
    /// the key's address first.
    pub fn owns_mapped(&self, addr: &[u8; 16]) -> bool {
        self.ips.iter().any(|a| match a {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets() == *addr,
            IpAddr::V6(v6) => v6.octets() == *addr,
        })
    }
}

/// IPv4-mapped IPv6 addresses compared as IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The uplink's underlay configuration (this host's VXLAN tunnel endpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkConfig {
    /// This host's underlay MAC.
    pub local_mac: EthernetAddress,
    /// This host's tunnel endpoint address.
    pub local_ip: Ipv4Addr,
    /// The underlay next hop's MAC (all tunnel traffic is sent to it).
    pub gateway_mac: EthernetAddress,
    /// Tunnel endpoints that receive flooded frames (unknown or broadcast destinations).
    pub flood: Vec<Ipv4Addr>,
}

/// The wire segment of a policy zone's segment.
pub fn zone_segment(seg: model::Segment) -> Segment {
    match seg {
        model::Segment::Vlan(v) => Segment::vlan(v),
        model::Segment::Vni(v) => Segment::vni(v),
    }
}

/// The VNI a segment is carried in across hosts: a VXLAN zone's own VNI, and a
/// VLAN zone's id (the usual VLAN-to-VNI mapping).
pub fn segment_vni(seg: Segment) -> Option<u32> {
    seg.vni_id().or_else(|| seg.vlan_id().map(u32::from))
}

/// Errors building a port from the inventory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// No vNIC of that name.
    #[error("vNIC {0:?} is not in the inventory")]
    UnknownVnic(String),
    /// The vNIC's zone is not in the inventory.
    #[error("zone {zone:?} of vNIC {vnic:?} is not in the inventory")]
    UnknownZone {
        /// The vNIC.
        vnic: String,
        /// Its zone.
        zone: String,
    },
    /// The vNIC's MAC does not parse.
    #[error("vNIC {vnic:?} has an invalid MAC {mac:?}")]
    BadMac {
        /// The vNIC.
        vnic: String,
        /// Its MAC as written.
        mac: String,
    },
    /// Too many ports.
    #[error("too many ports")]
    TooMany,
}

/// Build the port of inventory vNIC `name`.
///
/// The group id is the vNIC's position in the inventory plus one (0 means "no
/// group" in VXLAN-GBP); zones listed in `strict_zones` check TCP windows strictly.
pub fn vnic_from_model(
    model: &Model,
    name: &str,
    strict_zones: &[String],
    max_conns: u32,
) -> Result<VnicPort, PortError> {
    let inv = &model.inventory;
    let position = inv.vnics().position(|(_, n)| n.name == name);
    let (vm, nic) = inv.vnic(name).ok_or_else(|| PortError::UnknownVnic(name.to_string()))?;
    let zone = inv.zone(&nic.zone).ok_or_else(|| PortError::UnknownZone {
        vnic: name.to_string(),
        zone: nic.zone.clone(),
    })?;
    let mac: EthernetAddress = nic.mac.parse().map_err(|_| PortError::BadMac {
        vnic: name.to_string(),
        mac: nic.mac.clone(),
    })?;
    Ok(VnicPort {
        name: nic.name.clone(),
        vm: vm.name.clone(),
        mac,
        ips: nic.ips.clone(),
        zone: nic.zone.clone(),
        segment: zone_segment(zone.segment),
        group_id: position.map_or(0, |p| u16::try_from(p + 1).unwrap_or(u16::MAX)),
        strict: strict_zones.contains(&nic.zone),
        max_conns,
        any_source: false,
    })
}

#[cfg(test)]
mod tests {
    use palisade_policy::{MemorySource, load};

    use super::*;

    #[test]
    fn vnic_ports_come_from_the_inventory() {
        let src = MemorySource::new().with(
            "p.yaml",
            r#"
datacenter: { name: dc1, default: deny }
zones: [{ name: web, vlan: 100 }, { name: ovl, vni: 5000 }]
vms:
  - { name: a, uuid: 00000000-0000-4000-8000-00000000000a, vnics: [{ name: a.0, mac: "02:00:00:00:00:0a", ips: [10.0.0.10], zone: web }] }
  - { name: b, uuid: 00000000-0000-4000-8000-00000000000b, vnics: [{ name: b.0, mac: "02:00:00:00:00:0b", ips: [10.0.0.11], zone: ovl }] }
"#,
        );
        let model = load(&src).unwrap().model;
        let a = vnic_from_model(&model, "a.0", &["web".into()], 7).unwrap();
        assert_eq!(
            (a.segment, a.group_id, a.strict, a.max_conns),
            (Segment::vlan(100), 1, true, 7)
        );
        assert!(
            a.owns("::ffff:10.0.0.10".parse().unwrap()),
            "IPv4-mapped is the same address"
        );
        let b = vnic_from_model(&model, "b.0", &[], 7).unwrap();
        assert_eq!((b.segment, b.group_id, b.strict), (Segment::vni(5000), 2, false));
        assert_eq!(segment_vni(a.segment), Some(100));
        assert_eq!(segment_vni(b.segment), Some(5000));
        assert_eq!(
            vnic_from_model(&model, "z.0", &[], 7),
            Err(PortError::UnknownVnic("z.0".into()))
        );
    }
}
