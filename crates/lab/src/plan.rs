//! The lab's topology, computed from an inventory before anything is created.
//!
//! Planning is pure so that every name, address and MAC the lab will use can
//! be checked (and unit-tested) up front: a conflict found half-way through
//! `up` would leave the operator with half a datacenter to clean.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use palisade_policy::model::Inventory;
use serde::{Deserialize, Serialize};

use crate::LabError;

/// Longest Linux interface name (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

/// The underlay subnet: host N (0-based) gets `192.168.100.(N+1)/24`.
pub const UNDERLAY_NET: [u8; 3] = [192, 168, 100];
/// The VXLAN UDP port written into agent configurations.
pub const VXLAN_PORT: u16 = 4789;
/// The edge router's address on the internet segment.
pub const EDGE_INTERNET_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The internet namespace's address.
pub const INTERNET_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// First agent metrics port; host N uses this + N.
pub const METRICS_PORT_BASE: u16 = 9101;

/// Which VMs run as QEMU guests instead of network namespaces.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum QemuMode {
    /// All VMs are namespaces.
    #[default]
    None,
    /// All VMs are QEMU guests.
    All,
    /// These VMs are QEMU guests; the others namespaces.
    Vms(Vec<String>),
}

impl QemuMode {
    fn includes(&self, vm: &str) -> bool {
        match self {
            QemuMode::None => false,
            QemuMode::All => true,
            QemuMode::Vms(v) => v.iter().any(|n| n == vm),
        }
    }
}

/// How QEMU guests' NICs reach their host's agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum QemuNic {
    /// A tap in the host namespace, which the agent reads through AF_PACKET
    /// (QEMU's `vnet_hdr=off`: the guest runs without offloads). What a
    /// state file written before vhost-user guests means.
    #[default]
    Tap,
    /// vhost-user: the agent listens on a socket per vNIC, QEMU connects
    /// (reconnecting when the agent restarts), and the agent serves the
    /// guest's virtio-net queues from its shared memory, offloads on.
    VhostUser,
}

/// A hypervisor host: a namespace running one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPlan {
    /// Inventory name (`hv1`).
    pub name: String,
    /// Namespace (`<p>-hv1`).
    pub ns: String,
    /// Position (0-based), which fixes the underlay address and metrics port.
    pub index: usize,
    /// Address of `ul0` in the host namespace.
    pub underlay_ip: Ipv4Addr,
    /// Name of the veth end bridged in the underlay namespace.
    pub underlay_port: String,
    /// Agent metrics listen address (inside the host namespace).
    pub metrics: String,
}

/// One vNIC: a veth (namespace VM) or tap (QEMU guest) whose host end the agent owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VnicPlan {
    /// Inventory vNIC name (`web-1.0`).
    pub name: String,
    /// MAC address.
    pub mac: String,
    /// Addresses.
    pub ips: Vec<IpAddr>,
    /// Zone.
    pub zone: String,
    /// Interface name inside the VM (`eth0`, `eth1`, …).
    pub guest_if: String,
    /// Interface name in the host namespace (`vn-web-1`).
    pub host_if: String,
}

/// One VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPlan {
    /// Inventory name.
    pub name: String,
    /// Host it runs on.
    pub host: String,
    /// Its namespace (`<p>-vm-web-1`) when it is a namespace VM.
    pub ns: Option<String>,
    /// Whether it is a QEMU guest.
    pub qemu: bool,
    /// vNICs in inventory order.
    pub vnics: Vec<VnicPlan>,
    /// Default gateway (the first vNIC's zone gateway), if any.
    pub gateway: Option<Ipv4Addr>,
    /// Other hosts whose agents have this VM's vNICs pre-staged (attached,
    /// policy compiled, a tap waiting), so it can migrate there (a QEMU
    /// guest on a tap only; see [`Plan::add_standby`]).
    #[serde(default)]
    pub standby: Vec<String>,
}

/// A zone's leg on the edge router.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZonePlan {
    /// Zone name.
    pub name: String,
    /// Gateway address (`x.y.z.1` of the zone's /24).
    pub gateway: Ipv4Addr,
    /// Leg name in the edge namespace.
    pub edge_if: String,
    /// MAC of the edge leg.
    pub mac: String,
    /// Host whose agent owns the other end (the first host).
    pub host: String,
    /// Name of the other end in that host's namespace (`ge-web`).
    pub host_if: String,
    /// Appliance name in the agent configuration (`edge-web`).
    pub appliance: String,
}

/// The whole topology.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Lab name: the prefix of every namespace.
    pub name: String,
    /// Underlay namespace (bridge `br0`).
    pub underlay_ns: String,
    /// Edge router namespace.
    pub edge_ns: String,
    /// Internet namespace.
    pub internet_ns: String,
    /// Hosts.
    pub hosts: Vec<HostPlan>,
    /// VMs.
    pub vms: Vec<VmPlan>,
    /// Zones that have a gateway on the edge router.
    pub zones: Vec<ZonePlan>,
    /// How the QEMU guests' NICs are attached.
    #[serde(default)]
    pub qemu_nic: QemuNic,
}

/// Check a lab name: it prefixes every namespace, and `down` finds a lab's
/// leftovers by `<name>-`, so a name may not contain `-` (which would make
/// lab `a` own lab `a-b`'s namespaces).
pub fn check_name(name: &str) -> Result<(), LabError> {
    let ok = !name.is_empty() && name.len() <= 24 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(LabError::Invalid(format!(
            "lab name {name:?}: use 1-24 ASCII letters, digits or '_' (no '-')"
        )))
    }
}

/// Replace characters an interface name may not hold.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Fit `base` into an interface name unique within `taken` (one namespace),
/// truncating and then numbering as needed, and record it.
pub(crate) fn fit_ifname(base: &str, taken: &mut BTreeSet<String>) -> String {
    let base = sanitize(base);
    let cut = |s: &str, n: usize| s.chars().take(n).collect::<String>();
    let first = cut(&base, IFNAME_MAX);
    if !taken.contains(&first) {
        taken.insert(first.clone());
        return first;
    }
    for i in 1.. {
        let suffix = i.to_string();
        let cand = format!("{}{suffix}", cut(&base, IFNAME_MAX - suffix.len()));
        if !taken.contains(&cand) {
            taken.insert(cand.clone());
            return cand;
        }
    }
    unreachable!("the loop above returns for some i")
}

fn gateway_of(ip: Ipv4Addr) -> Ipv4Addr {
    let [a, b, c, _] = ip.octets();
    Ipv4Addr::new(a, b, c, 1)
}

impl Plan {
    /// Plan a lab named `name` for `inv`.
    pub fn new(name: &str, inv: &Inventory, qemu: &QemuMode) -> Result<Plan, LabError> {
        check_name(name)?;
        if let QemuMode::Vms(list) = qemu {
            for v in list {
                if inv.vm(v).is_none() {
                    return Err(LabError::Unknown {
                        kind: "vm",
                        name: v.clone(),
                    });
                }
            }
        }
        // Hosts: clusters' hosts in order, then any host only a VM names.
        let mut host_names: Vec<String> = Vec::new();
        for c in &inv.clusters {
            for h in &c.hosts {
                if !host_names.contains(h) {
                    host_names.push(h.clone());
                }
            }
        }
        for vm in &inv.vms {
            if let Some(h) = vm.host.as_ref().filter(|h| !host_names.contains(h)) {
                host_names.push(h.clone());
            }
        }
        if host_names.is_empty() {
            host_names.push("hv1".into());
        }
        if host_names.len() > 250 {
            return Err(LabError::Invalid(format!("{} hosts: at most 250", host_names.len())));
        }
        let reserved = ["underlay", "edge", "internet"];
        let mut hosts = Vec::new();
        for (index, h) in host_names.iter().enumerate() {
            if reserved.contains(&h.as_str()) || h.starts_with("vm-") || h.contains('/') || h.is_empty() {
                return Err(LabError::Invalid(format!(
                    "host name {h:?} clashes with the lab's own namespaces"
                )));
            }
            hosts.push(HostPlan {
                name: h.clone(),
                ns: format!("{name}-{h}"),
                index,
                underlay_ip: Ipv4Addr::new(UNDERLAY_NET[0], UNDERLAY_NET[1], UNDERLAY_NET[2], index as u8 + 1),
                underlay_port: String::new(),
                metrics: format!("127.0.0.1:{}", METRICS_PORT_BASE as usize + index),
            });
        }
        let mut underlay_taken: BTreeSet<String> = ["br0".to_string(), "lo".to_string()].into();
        for h in &mut hosts {
            h.underlay_port = fit_ifname(&format!("u-{}", h.name), &mut underlay_taken);
        }
        let first_host = hosts[0].name.clone();

        // Zone gateways: the .1 of the /24 of the zone's first IPv4 address.
        let mut gateways: BTreeMap<&str, Ipv4Addr> = BTreeMap::new();
        for (_, nic) in inv.vnics() {
            if let Some(v4) = nic.ips.iter().find_map(|ip| match ip {
                IpAddr::V4(a) => Some(*a),
                IpAddr::V6(_) => None,
            }) {
                gateways.entry(nic.zone.as_str()).or_insert_with(|| gateway_of(v4));
            }
        }
        let all_ips: BTreeSet<IpAddr> = inv.vnics().flat_map(|(_, n)| n.ips.iter().copied()).collect();
        let all_macs: BTreeSet<String> = inv.vnics().map(|(_, n)| n.mac.to_ascii_lowercase()).collect();

        let mut host_taken: BTreeMap<String, BTreeSet<String>> = hosts
            .iter()
            .map(|h| (h.name.clone(), ["lo".to_string(), "ul0".to_string()].into()))
            .collect();
        let mut edge_taken: BTreeSet<String> = ["lo".to_string(), "inet0".to_string()].into();
        let mut zones = Vec::new();
        for z in &inv.zones {
            let Some(&gw) = gateways.get(z.name.as_str()) else {
                continue;
            };
            if all_ips.contains(&IpAddr::V4(gw)) {
                return Err(LabError::Invalid(format!(
                    "zone {}: a vNIC uses {gw}, the address the lab gives the zone's gateway",
                    z.name
                )));
            }
            let n = zones.len() + 1;
            if n > 255 {
                return Err(LabError::Invalid("more than 255 zones with addresses".into()));
            }
            let mac = format!("02:00:00:00:fe:{n:02x}");
            if all_macs.contains(&mac) {
                return Err(LabError::Invalid(format!(
                    "a vNIC uses MAC {mac}, reserved for the edge router"
                )));
            }
            let taken = host_taken.get_mut(&first_host).expect("every host has a name set");
            zones.push(ZonePlan {
                name: z.name.clone(),
                gateway: gw,
                edge_if: fit_ifname(&format!("z-{}", z.name), &mut edge_taken),
                mac,
                host: first_host.clone(),
                host_if: fit_ifname(&format!("ge-{}", z.name), taken),
                appliance: format!("edge-{}", z.name),
            });
        }

        let mut vms = Vec::new();
        for vm in &inv.vms {
            let host = vm.host.clone().unwrap_or_else(|| first_host.clone());
            let is_qemu = qemu.includes(&vm.name);
            if is_qemu && vm.vnics.len() != 1 {
                return Err(LabError::Invalid(format!(
                    "VM {}: a QEMU guest needs exactly one vNIC, it has {}",
                    vm.name,
                    vm.vnics.len()
                )));
            }
            let taken = host_taken.get_mut(&host).expect("VM hosts were added to the host list");
            let vnics = vm
                .vnics
                .iter()
                .enumerate()
                .map(|(i, nic)| VnicPlan {
                    name: nic.name.clone(),
                    mac: nic.mac.to_ascii_lowercase(),
                    ips: nic.ips.clone(),
                    zone: nic.zone.clone(),
                    guest_if: format!("eth{i}"),
                    host_if: fit_ifname(
                        &if i == 0 {
                            format!("vn-{}", vm.name)
                        } else {
                            format!("vn-{}-{i}", vm.name)
                        },
                        taken,
                    ),
                })
                .collect::<Vec<_>>();
            // Only a vNIC with an IPv4 address can reach a gateway: an
            // appliance VM's vNICs (a bridge, no address) get no route.
            let gateway = vnics
                .iter()
                .filter(|n| n.ips.iter().any(IpAddr::is_ipv4))
                .find_map(|n| zones.iter().find(|z| z.name == n.zone).map(|z| z.gateway));
            vms.push(VmPlan {
                name: vm.name.clone(),
                host,
                ns: (!is_qemu).then(|| format!("{name}-vm-{}", vm.name)),
                qemu: is_qemu,
                vnics,
                gateway,
                standby: Vec::new(),
            });
        }
        Ok(Plan {
            name: name.to_string(),
            underlay_ns: format!("{name}-underlay"),
            edge_ns: format!("{name}-edge"),
            internet_ns: format!("{name}-internet"),
            hosts,
            vms,
            zones,
            qemu_nic: QemuNic::Tap,
        })
    }

    /// Whether `vm`'s vNICs are vhost-user sockets (a QEMU guest on vhost-user) rather than host interfaces.
    pub fn on_vhost_user(&self, vm: &VmPlan) -> bool {
        vm.qemu && self.qemu_nic == QemuNic::VhostUser
    }

    /// Pre-stage `vm`'s vNICs on `host` as well as its own: that host's
    /// agent attaches them (a tap of the same name in its namespace), so a
    /// live migration can move the guest there. A QEMU guest on a tap or on
    /// vhost-user (the agent's backend logs the guest pages it writes while
    /// QEMU migrates, `VHOST_USER_PROTOCOL_F_LOG_SHMFD`).
    pub fn add_standby(&mut self, vm: &str, host: &str) -> Result<(), LabError> {
        if self.host(host).is_none() {
            return Err(LabError::Unknown {
                kind: "host",
                name: host.to_string(),
            });
        }
        let v = self
            .vms
            .iter_mut()
            .find(|v| v.name == vm)
            .ok_or_else(|| LabError::Unknown {
                kind: "vm",
                name: vm.to_string(),
            })?;
        if !v.qemu {
            return Err(LabError::Invalid(format!(
                "VM {vm}: only a QEMU guest can be pre-staged on another host (it migrates)"
            )));
        }
        if v.host == host {
            return Err(LabError::Invalid(format!("VM {vm} lives on {host} already")));
        }
        if !v.standby.iter().any(|h| h == host) {
            v.standby.push(host.to_string());
        }
        Ok(())
    }

    /// The host named `name`.
    pub fn host(&self, name: &str) -> Option<&HostPlan> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// The VM named `name`.
    pub fn vm(&self, name: &str) -> Option<&VmPlan> {
        self.vms.iter().find(|v| v.name == name)
    }

    /// Every namespace of the lab, in creation order.
    pub fn namespaces(&self) -> Vec<String> {
        let mut v = vec![self.underlay_ns.clone(), self.edge_ns.clone(), self.internet_ns.clone()];
        v.extend(self.hosts.iter().map(|h| h.ns.clone()));
        v.extend(self.vms.iter().filter_map(|vm| vm.ns.clone()));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifnames_fit_and_stay_unique() {
        let mut t = BTreeSet::new();
        let a = fit_ifname("vn-a-very-long-vm-name", &mut t);
        let b = fit_ifname("vn-a-very-long-vm-name-2", &mut t);
        let c = fit_ifname("vn-a-very-long-vm-name-3", &mut t);
        assert_eq!(a, "vn-a-very-long-");
        assert_eq!(b, "vn-a-very-long1");
        assert_eq!(c, "vn-a-very-long2");
        assert!([&a, &b, &c].iter().all(|s| s.len() <= IFNAME_MAX));
        assert_eq!(fit_ifname("vn-x/y z", &mut t), "vn-x_y_z");
    }

    fn inventory(extra_vm: &str) -> Inventory {
        let text = format!(
            r#"
datacenter: {{ name: dc, default: deny }}
clusters: [{{ name: c, hosts: [hv1, hv2] }}]
zones:
  - {{ name: web, vlan: 100 }}
  - {{ name: v6only, vlan: 200 }}
vms:
  - name: a-rather-long-vm-name-1
    uuid: 00000000-0000-4000-8000-000000000001
    host: hv2
    vnics:
      - {{ name: a.0, mac: "02:00:00:00:00:01", ips: [10.1.2.11, "fd00::11"], zone: web }}
      - {{ name: a.1, mac: "02:00:00:00:00:02", ips: ["fd00:2::11"], zone: v6only }}
  - name: a-rather-long-vm-name-2
    uuid: 00000000-0000-4000-8000-000000000002
    vnics:
      - {{ name: b.0, mac: "02:00:00:00:00:03", ips: [10.1.2.12], zone: web }}
{extra_vm}"#
        );
        let src = palisade_policy::MemorySource::new().with("inv.yaml", text);
        let loaded = palisade_policy::load(&src).unwrap();
        assert!(!loaded.has_errors(), "{}", loaded.render());
        loaded.model.inventory
    }

    #[test]
    fn plan_from_inventory() {
        let inv = inventory("");
        let p = Plan::new("t", &inv, &QemuMode::None).unwrap();
        let hosts: Vec<(&str, &str, String, &str)> = p
            .hosts
            .iter()
            .map(|h| {
                (
                    h.name.as_str(),
                    h.ns.as_str(),
                    h.underlay_ip.to_string(),
                    h.metrics.as_str(),
                )
            })
            .collect();
        assert_eq!(
            hosts,
            [
                ("hv1", "t-hv1", "192.168.100.1".to_string(), "127.0.0.1:9101"),
                ("hv2", "t-hv2", "192.168.100.2".to_string(), "127.0.0.1:9102")
            ]
        );
        // Only zones with IPv4 addresses get a gateway, on the first host.
        assert_eq!(p.zones.len(), 1);
        let z = &p.zones[0];
        assert_eq!(
            (
                z.gateway.to_string().as_str(),
                z.mac.as_str(),
                z.host.as_str(),
                z.host_if.as_str()
            ),
            ("10.1.2.1", "02:00:00:00:fe:01", "hv1", "ge-web")
        );
        let a = p.vm("a-rather-long-vm-name-1").unwrap();
        assert_eq!(a.ns.as_deref(), Some("t-vm-a-rather-long-vm-name-1"));
        assert_eq!(a.gateway, Some(Ipv4Addr::new(10, 1, 2, 1)));
        assert_eq!(a.vnics[0].host_if, "vn-a-rather-lon");
        assert_eq!(a.vnics[1].host_if, "vn-a-rather-lo1");
        assert_eq!(a.vnics[1].guest_if, "eth1");
        // No host given: the first host; names stay unique per host namespace.
        let b = p.vm("a-rather-long-vm-name-2").unwrap();
        assert_eq!(
            (b.host.as_str(), b.vnics[0].host_if.as_str()),
            ("hv1", "vn-a-rather-lon")
        );
        assert_eq!(p.namespaces().len(), 3 + 2 + 2);
    }

    /// An appliance VM (two vNICs bridged inside it, no address) gets no
    /// default route: none could reach the gateway.
    #[test]
    fn a_vm_without_ipv4_gets_no_gateway() {
        let bridge = r#"  - name: ips
    uuid: 00000000-0000-4000-8000-000000000009
    vnics:
      - { name: ips.0, mac: "02:00:00:00:00:09", ips: [], zone: web }
      - { name: ips.1, mac: "02:00:00:00:00:0a", ips: [], zone: web }
"#;
        let p = Plan::new("t", &inventory(bridge), &QemuMode::None).unwrap();
        let ips = p.vms.iter().find(|v| v.name == "ips").unwrap();
        assert_eq!((ips.vnics.len(), ips.gateway), (2, None));
        let b = p.vms.iter().find(|v| v.name == "a-rather-long-vm-name-2").unwrap();
        assert!(b.gateway.is_some());
    }

    #[test]
    fn plan_rejects_conflicts() {
        let inv = inventory("");
        let unknown = Plan::new("t", &inv, &QemuMode::Vms(vec!["nope".into()]));
        assert!(matches!(unknown, Err(LabError::Unknown { .. })));
        let two_nics = Plan::new("t", &inv, &QemuMode::Vms(vec!["a-rather-long-vm-name-1".into()]));
        assert!(matches!(two_nics, Err(LabError::Invalid(ref m)) if m.contains("exactly one vNIC")));
        assert!(Plan::new("t", &inv, &QemuMode::Vms(vec!["a-rather-long-vm-name-2".into()])).is_ok());
        let gw = inventory(
            "  - { name: gw, uuid: 00000000-0000-4000-8000-000000000003, vnics: [{ name: g.0, mac: \"02:00:00:00:00:09\", ips: [10.1.2.1], zone: web }] }\n",
        );
        assert!(matches!(Plan::new("t", &gw, &QemuMode::None), Err(LabError::Invalid(ref m)) if m.contains("gateway")));
        assert!(Plan::new("a-b", &inv, &QemuMode::None).is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("pal").is_ok());
        assert!(check_name("labt123").is_ok());
        assert!(check_name("a-b").is_err());
        assert!(check_name("").is_err());
        assert!(check_name("x y").is_err());
    }
}
