//! One host's ports, named against the inventory, and the engine built from them.
//!
//! The agent (from its TOML configuration) and `palisade replay` (from a
//! [`Topology`] document) describe a host the same way: which of the
//! inventory's vNICs are local to it, which appliance ports (router and
//! gateway legs) it has, which zones check TCP windows strictly and how many
//! connections a vNIC may hold. [`build`] turns a [`HostPorts`] into an engine
//! with every port added in the description's order, so engines built from
//! one description (one per worker) agree on every port id.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use palisade_policy::Model;
use palisade_wire::ethernet::EthernetAddress;
use serde::Deserialize;

use crate::engine::{Engine, EngineConfig};
use crate::lookup::ChainLookup;
use crate::port::{self, PortError, PortId, UplinkConfig, VnicPort};

/// An appliance port: a router or gateway leg in a zone, which may send from
/// any address but only from its own MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appliance {
    /// A name for counters and logs.
    pub name: String,
    /// The zone it is attached to.
    pub zone: String,
    /// Its MAC.
    pub mac: EthernetAddress,
}

/// What one host's engine switches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPorts {
    /// The host's name in the inventory.
    pub host: String,
    /// The inventory's vNICs local to the host, in port order; `None`: every
    /// vNIC of every VM the inventory places on `host`, which must have one.
    pub vnics: Option<Vec<String>>,
    /// Appliance ports, after the vNICs.
    pub appliances: Vec<Appliance>,
    /// Further MACs a local vNIC is seen sending from (see [`HostEngine::macs`]).
    pub extra_macs: Vec<(EthernetAddress, String)>,
    /// Zones whose TCP windows are checked strictly.
    pub strict_zones: Vec<String>,
    /// Most connections per vNIC (appliances have no limit).
    pub max_conns: u32,
}

/// An engine built from a [`HostPorts`].
pub struct HostEngine {
    /// The engine.
    pub engine: Engine,
    /// Each port, in the description's order: the vNICs, then the appliances.
    pub ports: Vec<PortId>,
    /// Which port a frame from a local MAC arrives on: every port's own MAC
    /// and the extra ones (for a capture, which does not say).
    pub macs: HashMap<EthernetAddress, PortId>,
}

impl core::fmt::Debug for HostEngine {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HostEngine")
            .field("ports", &self.ports)
            .field("macs", &self.macs)
            .finish_non_exhaustive()
    }
}

/// A host description that cannot be built. Each variant says which entry;
/// its source, when it has one, says what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// No vNICs were listed and the inventory places none on the host.
    #[error("host {0:?} has no vNICs in the inventory")]
    NoVnics(String),
    /// A vNIC cannot be made a port.
    #[error("vNIC {name:?}")]
    Vnic {
        /// The vNIC.
        name: String,
        /// Why.
        source: PortError,
    },
    /// An appliance's zone is not in the inventory.
    #[error("appliance {name:?}: zone {zone:?} is not in the policy's inventory")]
    ApplianceZone {
        /// The appliance.
        name: String,
        /// Its zone.
        zone: String,
    },
    /// An appliance cannot be made a port.
    #[error("appliance {name:?}")]
    Appliance {
        /// The appliance.
        name: String,
        /// Why.
        source: PortError,
    },
    /// An extra MAC names a vNIC that is not one of the host's ports.
    #[error("MAC {mac} names vNIC {vnic:?}, which is not local to this host")]
    MacNotLocal {
        /// The MAC.
        mac: EthernetAddress,
        /// The vNIC it names.
        vnic: String,
    },
    /// A MAC in a topology document does not parse.
    #[error("{field}: invalid MAC {value:?}")]
    BadMac {
        /// Where it is.
        field: String,
        /// What was written.
        value: String,
    },
}

/// Build the engine for `ports` from `model` (the inventory the policy of
/// `lookup` was compiled from).
pub fn build(
    ports: &HostPorts,
    config: EngineConfig,
    model: &Model,
    lookup: Box<dyn ChainLookup + Send>,
) -> Result<HostEngine, HostError> {
    let names: Vec<String> = match &ports.vnics {
        Some(names) => names.clone(),
        None => {
            let names: Vec<String> = model
                .inventory
                .vms
                .iter()
                .filter(|vm| vm.host.as_deref() == Some(ports.host.as_str()))
                .flat_map(|vm| vm.vnics.iter().map(|n| n.name.clone()))
                .collect();
            if names.is_empty() {
                return Err(HostError::NoVnics(ports.host.clone()));
            }
            names
        }
    };
    let mut engine = Engine::new(config, lookup);
    let mut ids = Vec::new();
    let mut macs = HashMap::new();
    for name in names {
        let vnic_err = |source| HostError::Vnic {
            name: name.clone(),
            source,
        };
        let vnic = port::vnic_from_model(model, &name, &ports.strict_zones, ports.max_conns).map_err(vnic_err)?;
        let mac = vnic.mac;
        let id = engine.add_vnic(vnic).map_err(vnic_err)?;
        ids.push(id);
        macs.insert(mac, id);
    }
    for a in &ports.appliances {
        let zone = model.inventory.zone(&a.zone).ok_or_else(|| HostError::ApplianceZone {
            name: a.name.clone(),
            zone: a.zone.clone(),
        })?;
        let vnic = VnicPort {
            name: a.name.clone(),
            vm: format!("appliance:{}", a.name),
            mac: a.mac,
            ips: Vec::new(),
            zone: a.zone.clone(),
            segment: port::zone_segment(zone.segment),
            group_id: 0,
            strict: false,
            max_conns: u32::MAX,
            any_source: true,
        };
        let id = engine.add_vnic(vnic).map_err(|source| HostError::Appliance {
            name: a.name.clone(),
            source,
        })?;
        ids.push(id);
        macs.insert(a.mac, id);
    }
    for (mac, name) in &ports.extra_macs {
        let id = engine.port_of(name).ok_or_else(|| HostError::MacNotLocal {
            mac: *mac,
            vnic: name.clone(),
        })?;
        macs.insert(*mac, id);
    }
    Ok(HostEngine {
        engine,
        ports: ids,
        macs,
    })
}

/// The topology document of `palisade replay` (JSON): the host a capture
/// was taken on, its local vNICs, MAC overrides and its uplink.
///
/// ```json
/// {
///   "host": "hv1",
///   "vnics": ["web-1.0", "app-1.0"],
///   "macs": { "02:00:00:00:99:99": "app-1.0" },
///   "strict_zones": ["mgmt"],
///   "max_conns": 1000,
///   "uplink": {
///     "underlay_ip": "192.168.0.1",
///     "mac": "0e:00:00:00:00:01",
///     "gateway_mac": "0e:00:00:00:00:fe",
///     "flood": ["192.168.0.2"]
///   }
/// }
/// ```
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// The host the capture was taken on (the inventory's host name).
    pub host: String,
    /// vNICs local to the host; default: every vNIC of a VM placed on `host`.
    #[serde(default)]
    pub vnics: Option<Vec<String>>,
    /// Extra MAC → vNIC bindings (a VM observed sending from another MAC).
    #[serde(default)]
    pub macs: BTreeMap<String, String>,
    /// Zones whose TCP windows are checked strictly.
    #[serde(default)]
    pub strict_zones: Vec<String>,
    /// Most connections per vNIC (default 1000).
    #[serde(default = "default_max_conns")]
    pub max_conns: u32,
    /// The uplink.
    pub uplink: UplinkTopology,
}

fn default_max_conns() -> u32 {
    1000
}

/// The uplink of a [`Topology`].
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UplinkTopology {
    /// This host's tunnel endpoint (underlay) address.
    pub underlay_ip: Ipv4Addr,
    /// This host's underlay MAC.
    pub mac: String,
    /// The underlay next hop's MAC.
    pub gateway_mac: String,
    /// Tunnel endpoints that receive flooded frames.
    #[serde(default)]
    pub flood: Vec<Ipv4Addr>,
}

fn parse_mac(value: &str, field: &str) -> Result<EthernetAddress, HostError> {
    value.parse().map_err(|_| HostError::BadMac {
        field: field.to_string(),
        value: value.to_string(),
    })
}

impl Topology {
    /// The uplink's configuration.
    pub fn uplink(&self) -> Result<UplinkConfig, HostError> {
        Ok(UplinkConfig {
            local_mac: parse_mac(&self.uplink.mac, "uplink.mac")?,
            local_ip: self.uplink.underlay_ip,
            gateway_mac: parse_mac(&self.uplink.gateway_mac, "uplink.gateway_mac")?,
            flood: self.uplink.flood.clone(),
        })
    }

    /// The host's ports (no appliances: a capture's host has none).
    pub fn ports(&self) -> Result<HostPorts, HostError> {
        if self.vnics.as_ref().is_some_and(Vec::is_empty) {
            return Err(HostError::NoVnics(self.host.clone()));
        }
        let extra_macs = self
            .macs
            .iter()
            .map(|(mac, vnic)| Ok((parse_mac(mac, "macs")?, vnic.clone())))
            .collect::<Result<_, HostError>>()?;
        Ok(HostPorts {
            host: self.host.clone(),
            vnics: self.vnics.clone(),
            appliances: Vec::new(),
            extra_macs,
            strict_zones: self.strict_zones.clone(),
            max_conns: self.max_conns,
        })
    }

    /// The engine for this host with the default table sizes.
    pub fn build(&self, model: &Model, lookup: Box<dyn ChainLookup + Send>) -> Result<HostEngine, HostError> {
        build(&self.ports()?, EngineConfig::new(self.uplink()?), model, lookup)
    }
}

#[cfg(test)]
mod tests {
    use palisade_policy::compile::Compiler;
    use palisade_policy::{MemorySource, load};
    use palisade_wire::flow::Segment;

    use super::*;
    use crate::lookup::PolicyLookup;

    const INVENTORY: &str = r#"
datacenter: { name: dc1, default: deny }
zones: [{ name: web, vlan: 100 }, { name: mgmt, vni: 5000 }]
vms:
  - { name: a, uuid: 00000000-0000-4000-8000-00000000000a, host: hv1, vnics: [{ name: a.0, mac: "02:00:00:00:00:0a", ips: [10.0.0.10], zone: web }] }
  - { name: b, uuid: 00000000-0000-4000-8000-00000000000b, host: hv1, vnics: [{ name: b.0, mac: "02:00:00:00:00:0b", ips: [10.0.0.11], zone: mgmt }] }
  - { name: c, uuid: 00000000-0000-4000-8000-00000000000c, host: hv2, vnics: [{ name: c.0, mac: "02:00:00:00:00:0c", ips: [10.0.0.12], zone: web }] }
"#;

    fn model() -> Model {
        let loaded = load(&MemorySource::new().with("p.yaml", INVENTORY)).unwrap();
        assert!(!loaded.has_errors(), "{}", loaded.render());
        loaded.model
    }

    fn lookup(model: &Model) -> Box<dyn ChainLookup + Send> {
        Box::new(PolicyLookup::new(Compiler::new(model.clone()).unwrap()))
    }

    fn mac(s: &str) -> EthernetAddress {
        s.parse().unwrap()
    }

    fn ports(vnics: Option<&[&str]>) -> HostPorts {
        HostPorts {
            host: "hv1".into(),
            vnics: vnics.map(|v| v.iter().map(|s| s.to_string()).collect()),
            appliances: Vec::new(),
            extra_macs: Vec::new(),
            strict_zones: vec!["mgmt".into()],
            max_conns: 7,
        }
    }

    fn config() -> EngineConfig {
        EngineConfig::new(UplinkConfig {
            local_mac: EthernetAddress([0; 6]),
            local_ip: Ipv4Addr::new(192, 168, 0, 1),
            gateway_mac: EthernetAddress([0; 6]),
            flood: Vec::new(),
        })
    }

    #[test]
    fn ports_come_in_the_description_order() {
        let m = model();
        let mut p = ports(Some(&["b.0", "a.0"]));
        p.appliances.push(Appliance {
            name: "edge-web".into(),
            zone: "web".into(),
            mac: mac("02:00:00:00:fe:01"),
        });
        p.extra_macs.push((mac("02:00:00:00:99:99"), "a.0".into()));
        let h = build(&p, config(), &m, lookup(&m)).unwrap();
        assert_eq!(h.ports.len(), 3);
        let names: Vec<&str> = h
            .ports
            .iter()
            .map(|id| h.engine.vnic(*id).unwrap().name.as_str())
            .collect();
        assert_eq!(names, ["b.0", "a.0", "edge-web"]);
        let b = h.engine.vnic(h.ports[0]).unwrap();
        assert_eq!((b.strict, b.max_conns, b.segment), (true, 7, Segment::vni(5000)));
        let a = h.engine.vnic(h.ports[1]).unwrap();
        assert_eq!((a.strict, a.max_conns, a.any_source), (false, 7, false));
        // An appliance sends from any address, only from its MAC, without a connection limit.
        let edge = h.engine.vnic(h.ports[2]).unwrap();
        assert_eq!(
            (
                edge.vm.as_str(),
                edge.any_source,
                edge.max_conns,
                edge.segment,
                edge.group_id
            ),
            ("appliance:edge-web", true, u32::MAX, Segment::vlan(100), 0)
        );
        assert_eq!(h.macs.len(), 4);
        assert_eq!(h.macs[&mac("02:00:00:00:00:0b")], h.ports[0]);
        assert_eq!(h.macs[&mac("02:00:00:00:99:99")], h.ports[1]);
        assert_eq!(h.macs[&mac("02:00:00:00:fe:01")], h.ports[2]);
        // Two engines from one description agree on every port.
        let again = build(&p, config(), &m, lookup(&m)).unwrap();
        assert_eq!(again.ports, h.ports);
    }

    #[test]
    fn without_a_list_the_inventory_says_which_vnics_are_local() {
        let m = model();
        let h = build(&ports(None), config(), &m, lookup(&m)).unwrap();
        let names: Vec<&str> = h
            .ports
            .iter()
            .map(|id| h.engine.vnic(*id).unwrap().name.as_str())
            .collect();
        assert_eq!(names, ["a.0", "b.0"]);
    }

    #[test]
    fn bad_descriptions_say_which_entry() {
        let m = model();
        let fail = |p: HostPorts| build(&p, config(), &m, lookup(&m)).map(|_| ()).unwrap_err();
        let mut nowhere = ports(None);
        nowhere.host = "hv9".into();
        assert_eq!(fail(nowhere), HostError::NoVnics("hv9".into()));
        assert_eq!(
            fail(ports(Some(&["a.0", "z.0"]))),
            HostError::Vnic {
                name: "z.0".into(),
                source: PortError::UnknownVnic("z.0".into())
            }
        );
        let mut p = ports(Some(&["a.0"]));
        p.appliances.push(Appliance {
            name: "edge".into(),
            zone: "dmz".into(),
            mac: mac("02:00:00:00:fe:01"),
        });
        let e = fail(p);
        assert_eq!(
            e,
            HostError::ApplianceZone {
                name: "edge".into(),
                zone: "dmz".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "appliance \"edge\": zone \"dmz\" is not in the policy's inventory"
        );
        // A MAC may only name a port of this host (c.0 is on hv2).
        let mut p = ports(Some(&["a.0"]));
        p.extra_macs.push((mac("02:00:00:00:99:99"), "c.0".into()));
        let e = fail(p);
        assert!(
            matches!(&e, HostError::MacNotLocal { vnic, .. } if vnic == "c.0"),
            "{e}"
        );
    }

    const TOPOLOGY: &str = r#"{
        "host": "hv1",
        "vnics": ["a.0"],
        "macs": { "02:00:00:00:99:99": "a.0" },
        "uplink": { "underlay_ip": "192.168.0.1", "mac": "0e:00:00:00:00:01", "gateway_mac": "0e:00:00:00:00:fe" }
    }"#;

    #[test]
    fn a_topology_document_builds_its_host() {
        let t: Topology = serde_json::from_str(TOPOLOGY).unwrap();
        assert_eq!((t.max_conns, t.strict_zones.len(), t.uplink.flood.len()), (1000, 0, 0));
        let uplink = t.uplink().unwrap();
        assert_eq!(uplink.gateway_mac, mac("0e:00:00:00:00:fe"));
        let m = model();
        let h = t.build(&m, lookup(&m)).unwrap();
        assert_eq!(h.ports.len(), 1);
        assert_eq!(h.macs[&mac("02:00:00:00:99:99")], h.ports[0]);
        assert_eq!(h.engine.vnic(h.ports[0]).unwrap().max_conns, 1000);
    }

    #[test]
    fn bad_topology_documents_are_refused() {
        let unknown = TOPOLOGY.replace("\"host\"", "\"hots\": 1, \"host\"");
        let e = serde_json::from_str::<Topology>(&unknown).unwrap_err().to_string();
        assert!(e.contains("unknown field `hots`"), "{e}");
        let m = model();
        let build = |text: &str| {
            let t: Topology = serde_json::from_str(text).unwrap();
            t.build(&m, lookup(&m)).map(|_| ()).unwrap_err()
        };
        assert_eq!(
            build(&TOPOLOGY.replace("0e:00:00:00:00:fe", "nope")),
            HostError::BadMac {
                field: "uplink.gateway_mac".into(),
                value: "nope".into()
            }
        );
        assert_eq!(
            build(&TOPOLOGY.replace("02:00:00:00:99:99", "02:00")),
            HostError::BadMac {
                field: "macs".into(),
                value: "02:00".into()
            }
        );
        assert_eq!(
            build(&TOPOLOGY.replace("[\"a.0\"]", "[]")),
            HostError::NoVnics("hv1".into())
        );
    }
}
