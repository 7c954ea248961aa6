//! Attaching a VM's vNICs with libvirt: the `<interface>` XML for each, from
//! the inventory and this host's agent configuration.
//!
//! The inventory gives a vNIC its identity (its MAC: the guest must use the
//! address the policy knows it by); the agent configuration says how the
//! vNIC reaches this host's agent: a vhost-user socket the agent listens
//! on (`<interface type='vhostuser'>`, QEMU as the client with reconnect,
//! as many queues as the agent offers) or a tap the agent reads
//! (`<interface type='ethernet'>` with an unmanaged target). The caller
//! (`palisade vnic attach`) prints the XML or hands it to
//! `virsh attach-device`, whose arguments [`virsh_attach_args`] gives.

use std::path::{Path, PathBuf};

use palisade_io::vhost_user::libvirt::{LIBVIRT_MEMORY_BACKING_XML, libvirt_interface_xml, libvirt_tap_interface_xml};
use palisade_policy::model::Inventory;
use palisade_wire::ethernet::EthernetAddress;

use crate::config::{AgentConfig, VnicAttachment};

/// How the caller wants the vNICs attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachKind {
    /// vhost-user sockets (the agent serves the guest's queues).
    VhostUser,
    /// Taps the agent reads.
    Tap,
}

/// One vNIC's attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VnicAttach {
    /// The vNIC's inventory name.
    pub vnic: String,
    /// Its MAC (from the inventory).
    pub mac: EthernetAddress,
    /// Where it attaches: the vhost-user socket or the tap.
    pub target: AttachTarget,
}

/// Where a vNIC attaches on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachTarget {
    /// The agent's vhost-user socket, with the queue pairs it offers.
    VhostUser {
        /// The socket.
        socket: PathBuf,
        /// Queue pairs offered (QEMU's `queues` must not exceed them).
        queue_pairs: u16,
    },
    /// A tap the agent reads.
    Tap {
        /// The tap's name.
        interface: String,
    },
}

impl VnicAttach {
    /// The `<interface>` element for `virsh attach-device`.
    pub fn interface_xml(&self) -> String {
        match &self.target {
            AttachTarget::VhostUser { socket, queue_pairs } => libvirt_interface_xml(socket, self.mac.0, *queue_pairs),
            AttachTarget::Tap { interface } => libvirt_tap_interface_xml(interface, self.mac.0),
        }
    }
}

/// What a VM's attachment needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachPlan {
    /// The libvirt domain: the VM's UUID from the inventory (libvirt's
    /// domain UUID when the inventory comes from the cloud), else its name.
    pub domain: String,
    /// The vNICs, in inventory order.
    pub vnics: Vec<VnicAttach>,
    /// The `<memoryBacking>` the domain needs (vhost-user: guest RAM the agent can map).
    pub memory_backing: Option<&'static str>,
}

/// Why a VM's vNICs cannot be attached as asked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct AttachError(String);

/// The attachment of VM `vm`'s vNICs (only `only`, when given) on the host `config` describes, as `kind`.
pub fn plan(
    config: &AgentConfig,
    inventory: &Inventory,
    vm: &str,
    only: Option<&str>,
    kind: AttachKind,
) -> Result<AttachPlan, AttachError> {
    let err = |m: String| Err(AttachError(m));
    let Some(v) = inventory.vm(vm) else {
        return err(format!("VM {vm:?} is not in the inventory"));
    };
    if let Some(host) = &v.host
        && *host != config.host
    {
        return err(format!(
            "VM {vm:?} runs on host {host:?} in the inventory; this agent configuration is host {:?}'s",
            config.host
        ));
    }
    if let Some(name) = only
        && !v.vnics.iter().any(|n| n.name == name)
    {
        let names: Vec<&str> = v.vnics.iter().map(|n| n.name.as_str()).collect();
        return err(format!("VM {vm:?} has no vNIC {name:?} (it has {names:?})"));
    }
    let mut vnics = Vec::new();
    for nic in v.vnics.iter().filter(|n| only.is_none_or(|o| o == n.name)) {
        let Ok(mac) = nic.mac.parse::<EthernetAddress>() else {
            return err(format!(
                "vNIC {:?}: the inventory's MAC {:?} is not a MAC address",
                nic.name, nic.mac
            ));
        };
        let Some(binding) = config.vnics.iter().find(|b| b.name == nic.name) else {
            return err(format!(
                "vNIC {:?} is not bound in this agent's configuration: add a [[vnic]] with name = {:?} and \
                 vhost_user = \"/run/palisade/vhost/….sock\" (or interface = a tap), and restart the agent",
                nic.name, nic.name
            ));
        };
        let target = match (binding.attachment(), kind) {
            (
                VnicAttachment::VhostUser {
                    socket, queue_pairs, ..
                },
                AttachKind::VhostUser,
            ) => AttachTarget::VhostUser {
                socket: socket.to_path_buf(),
                queue_pairs: crate::vhost::device_config(binding.attachment(), config.offloads, config.workers())
                    .map_or(queue_pairs.unwrap_or(1), |c| c.queue_pairs),
            },
            (VnicAttachment::Interface(i), AttachKind::Tap) => AttachTarget::Tap { interface: i.into() },
            (VnicAttachment::Interface(i), AttachKind::VhostUser) => {
                return err(format!(
                    "vNIC {:?} is bound to interface {i:?} in this agent's configuration, not to a vhost-user \
                     socket: attach it as a tap (--tap), or bind it with vhost_user = …",
                    nic.name
                ));
            }
            (VnicAttachment::VhostUser { socket, .. }, AttachKind::Tap) => {
                return err(format!(
                    "vNIC {:?} is bound to the vhost-user socket {} in this agent's configuration, not to a tap",
                    nic.name,
                    socket.display()
                ));
            }
        };
        vnics.push(VnicAttach {
            vnic: nic.name.clone(),
            mac,
            target,
        });
    }
    if vnics.is_empty() {
        return err(format!("VM {vm:?} has no vNICs"));
    }
    let domain = if v.uuid.is_empty() {
        v.name.clone()
    } else {
        v.uuid.clone()
    };
    Ok(AttachPlan {
        domain,
        memory_backing: (kind == AttachKind::VhostUser).then_some(LIBVIRT_MEMORY_BACKING_XML),
        vnics,
    })
}

/// `virsh` arguments attaching the device described in `xml_file` to `domain`, now and in its persistent definition.
pub fn virsh_attach_args(domain: &str, xml_file: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "attach-device".into(),
        domain.into(),
        xml_file.into(),
        "--live".into(),
        "--config".into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVENTORY: &str = "version: 1\n\
        datacenter: { name: dc1, default: deny }\n\
        zones: [{ name: web, vlan: 100 }]\n\
        vms:\n  \
        - { name: web-1, uuid: 6f1c0e8a-0000-4000-8000-000000000001, host: hv1, \
            vnics: [{ name: web-1.0, mac: \"52:54:00:12:34:56\", ips: [10.0.0.10], zone: web }, \
                    { name: web-1.1, mac: \"52:54:00:12:34:57\", ips: [10.0.0.11], zone: web }] }\n  \
        - { name: far, uuid: 6f1c0e8a-0000-4000-8000-000000000002, host: hv2, \
            vnics: [{ name: far.0, mac: \"52:54:00:00:00:ff\", ips: [10.0.0.12], zone: web }] }\n";

    fn inventory() -> Inventory {
        let loaded = palisade_policy::load(&palisade_policy::MemorySource::new().with("i.yaml", INVENTORY)).unwrap();
        assert!(!loaded.has_errors(), "{}", loaded.render());
        loaded.model.inventory
    }

    fn config(vnics: &str) -> AgentConfig {
        let text = format!(
            "host = \"hv1\"\npolicy = \"/p\"\nstate_dir = \"/s\"\nworkers = 2\n[underlay]\nlocal = \"192.168.0.1\"\n{vnics}"
        );
        AgentConfig::parse(&text, Path::new("hv1.toml")).unwrap()
    }

    const VHOST: &str = "[[vnic]]\nname = \"web-1.0\"\nvhost_user = \"/run/palisade/vhost/web-1'<0>&.sock\"\n\
                         [[vnic]]\nname = \"web-1.1\"\ninterface = \"vn-web-1b\"\n";

    #[test]
    fn vhost_user_xml_snapshot() {
        let p = plan(
            &config(VHOST),
            &inventory(),
            "web-1",
            Some("web-1.0"),
            AttachKind::VhostUser,
        )
        .unwrap();
        assert_eq!(p.domain, "6f1c0e8a-0000-4000-8000-000000000001");
        assert_eq!(p.memory_backing, Some(LIBVIRT_MEMORY_BACKING_XML));
        assert_eq!(p.vnics.len(), 1);
        // The hostile socket name is escaped; the queues are the agent's default (one per worker).
        assert_eq!(
            p.vnics[0].interface_xml(),
            "<interface type='vhostuser'>\n  \
             <mac address='52:54:00:12:34:56'/>\n  \
             <source type='unix' path='/run/palisade/vhost/web-1&apos;&lt;0&gt;&amp;.sock' mode='client'>\n    \
             <reconnect enabled='yes' timeout='1'/>\n  \
             </source>\n  \
             <model type='virtio'/>\n  \
             <driver queues='2'/>\n\
             </interface>\n"
        );
    }

    #[test]
    fn tap_xml_snapshot() {
        let p = plan(&config(VHOST), &inventory(), "web-1", Some("web-1.1"), AttachKind::Tap).unwrap();
        assert_eq!(p.memory_backing, None);
        assert_eq!(
            p.vnics[0].interface_xml(),
            "<interface type='ethernet'>\n  <mac address='52:54:00:12:34:57'/>\n  \
             <target dev='vn-web-1b' managed='no'/>\n  <model type='virtio'/>\n</interface>\n"
        );
    }

    #[test]
    fn refusals_say_what_to_do() {
        let (c, inv) = (config(VHOST), inventory());
        let cases = [
            (
                plan(&c, &inv, "nope", None, AttachKind::VhostUser),
                "VM \"nope\" is not in the inventory",
            ),
            (
                plan(&c, &inv, "far", None, AttachKind::VhostUser),
                "runs on host \"hv2\"",
            ),
            (
                plan(&c, &inv, "web-1", Some("web-1.9"), AttachKind::VhostUser),
                "has no vNIC \"web-1.9\"",
            ),
            // All vNICs as vhost-user: web-1.1 is a tap here.
            (
                plan(&c, &inv, "web-1", None, AttachKind::VhostUser),
                "bound to interface \"vn-web-1b\"",
            ),
            (
                plan(&c, &inv, "web-1", Some("web-1.0"), AttachKind::Tap),
                "bound to the vhost-user socket",
            ),
            (
                plan(&config(""), &inv, "web-1", None, AttachKind::Tap),
                "vNIC \"web-1.0\" is not bound in this agent's configuration",
            ),
        ];
        for (got, want) in cases {
            let e = got.unwrap_err().to_string();
            assert!(e.contains(want), "{e} should contain {want}");
        }
    }

    #[test]
    fn virsh_attaches_live_and_persistently() {
        let a = virsh_attach_args("dom", Path::new("/tmp/x.xml"));
        assert_eq!(a, ["attach-device", "dom", "/tmp/x.xml", "--live", "--config"]);
    }
}
