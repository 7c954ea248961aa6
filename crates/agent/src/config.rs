//! The agent's configuration file (TOML).
//!
//! ```toml
//! host = "hv1"                       # this host's name in the inventory
//! policy = "/etc/palisade/policy"    # standalone mode: the policy directory
//! state_dir = "/var/lib/palisade"    # connection state across restarts, last good policy
//! metrics = "127.0.0.1:9101"         # Prometheus metrics and /flows (optional)
//! audit = "/var/lib/palisade/audit"  # flow records (optional)
//! audit_key = "/var/lib/palisade/audit.key"    # its signing key, outside the trail (this default)
//! audit_head = "/var/lib/palisade/audit.head"  # its last signed head, outside the trail (this default)
//! workers = 4                        # datapath threads (default: one per core)
//! state_snapshot_ms = 200            # connection-table snapshots for crash recovery (0: off)
//! offloads = true                    # TSO/GSO super-frames and partial checksums through the engine whole (default)
//! af_packet_rx = "socket"            # ports read their socket queue (default); "ring": a TPACKET_V3 ring
//! fast_path = "off"                  # "kernel": established flows forwarded in the kernel (tcx/BPF); default off
//! nice = 0                          # the agent's scheduling priority as a nice value (default 0; -10: as ovs-vswitchd)
//! # [controller]                     # controller mode instead of `policy`:
//! # servers = ["https://ctl:7443"]   #   ca, cert, key (mutual TLS) or token
//! # health_interval_s = 3            #   datapath health reports (1-60 s)
//! [underlay]
//! local = "192.168.100.1"            # this host's tunnel endpoint
//! port = 4789
//! peers = { hv2 = "192.168.100.2" }
//! [[vnic]]
//! name = "web-1.0"                   # the vNIC in the inventory
//! interface = "vn-web-1"             # its host-side veth or tap
//! [[vnic]]                           # a QEMU/libvirt guest attached through vhost-user:
//! name = "db-1.0"
//! vhost_user = "/run/palisade/vhost/db-1.sock"  # the agent listens; QEMU connects (reconnect=1)
//! queue_pairs = 4                    # default: one per worker (QEMU's queues= may be fewer)
//! socket_mode = 0o660                # optional: with socket_group, so libvirt's QEMU can connect
//! socket_group = "libvirt-qemu"      # optional: the socket's group (a name in /etc/group, or a number)
//! # [inspect]                        # inline inspection (profiles and defaults come from the policy):
//! # rules = "/etc/palisade/rules/suricata.rules"
//! # classification = "/etc/palisade/rules/classification.config"  # optional
//! # budget_bytes_per_s = 125000000   # per port; over it: bypass (zone open) or drop (zone closed)
//! # [migration]                      # controller mode: how to carry out ordered live migrations
//! # qmp = "/run/palisade/qemu/{vm}.qmp"                 # the VM's QMP socket here
//! # incoming = "unix:/run/palisade/qemu/{vm}.incoming"  # the destination QEMU's -incoming URI
//! # peer_control = "/var/lib/palisade/{to}/agent.sock"  # the destination agent's control socket
//! # timeout_s = 120                  # bounds one migration
//! # listen = "10.0.0.2:7430"         # take peers' migration state here (mutual TLS, [controller] certs)
//! # peers = { hv1 = "10.0.0.1:7430" }  # other agents' listeners: pre-copy + delta over TLS
//! # driver = "libvirt"               # instead of qmp/incoming: libvirt runs the VMs
//! # [migration.libvirt]
//! # destination_uri = "qemu+tls://{to}/system"         # virsh migrate --p2p, and virsh resume there
//! [[appliance]]                      # a router or gateway leg: may send from any address
//! name = "edge-web"
//! interface = "ge-web"
//! zone = "web"
//! mac = "02:00:00:00:fe:01"
//! ```
//!
//! Everything is checked when the file is read; errors name the file and the
//! offending field.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Most datapath workers an agent runs.
pub const MAX_WORKERS: usize = 64;

/// The agent's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This host's name in the inventory.
    pub host: String,
    /// The policy directory (standalone mode). Exactly one of this and `controller`.
    #[serde(default)]
    pub policy: Option<PathBuf>,
    /// Take policy from the controller instead.
    #[serde(default)]
    pub controller: Option<ControllerConfig>,
    /// Where the agent keeps state across restarts.
    pub state_dir: PathBuf,
    /// Address of the HTTP endpoint for metrics and flows.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// Directory of the audit trail (flow records).
    #[serde(default)]
    pub audit: Option<PathBuf>,
    /// The trail's signing key (created 0600 if missing), outside the trail
    /// directory (default `<state_dir>/audit.key`).
    #[serde(default)]
    pub audit_key: Option<PathBuf>,
    /// Where the trail's last signed head is published, outside the trail
    /// directory (default `<state_dir>/audit.head`): `palisade audit verify
    /// --expect-head` checks the trail against it, and the agent refuses to
    /// extend a trail that was cut or rolled back behind it.
    #[serde(default)]
    pub audit_head: Option<PathBuf>,
    /// Delete audit segments older than this (`90d`, `12h`, `30m`, `45s`; default 90 days).
    #[serde(default)]
    pub audit_max_age: Option<String>,
    /// Delete the oldest audit segments while the trail is larger than this many bytes.
    #[serde(default)]
    pub audit_max_bytes: Option<u64>,
    /// Also export flow records, as they are made, to this IPFIX collector (UDP).
    #[serde(default)]
    pub ipfix: Option<SocketAddr>,
    /// At most this many records per second to the collector (the excess is counted, never silent).
    #[serde(default)]
    pub ipfix_rate: Option<u32>,
    /// The VXLAN underlay.
    pub underlay: Underlay,
    /// The vNICs this agent switches.
    #[serde(default, rename = "vnic")]
    pub vnics: Vec<VnicBinding>,
    /// Appliance ports (router legs).
    #[serde(default, rename = "appliance")]
    pub appliances: Vec<ApplianceBinding>,
    /// Flow-table capacity (default 65,536).
    #[serde(default)]
    pub flow_capacity: Option<usize>,
    /// Connection-table capacity (default 32,768).
    #[serde(default)]
    pub conn_capacity: Option<usize>,
    /// Datapath workers (default: one per core). The flow and connection
    /// tables, and each vNIC's connection limit, are shared out between them.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Milliseconds between snapshots of the connection tables to the state
    /// directory, which a start after a crash resumes from (default 200;
    /// 0 turns them off; otherwise 10 to 60,000).
    #[serde(default)]
    pub state_snapshot_ms: Option<u64>,
    /// Carry offloads end to end (default `true`): frames keep their
    /// virtio-net offload state from port to port, so a guest's TSO
    /// super-frames (up to 64 KiB) cross the engine as one unit with their
    /// checksums partial, the kernel (or the underlay's `UDP_SEGMENT`)
    /// segmenting them on the way out, and the underlay's GRO batches are
    /// merged back into super-frames. `false`: every frame is cut into
    /// packets and its checksum completed before the engine (the plain
    /// path, kept to compare).
    #[serde(default = "default_offloads")]
    pub offloads: bool,
    /// How the AF_PACKET ports receive (default `socket`): `socket` reads
    /// the socket's queue with `recvmmsg`, each frame there at once;
    /// `ring` reads a TPACKET_V3 ring, which costs about half as much per
    /// small frame but hands a block over only when it is full or its timer
    /// fires, so a lone frame (a TCP stream's ACK) waits for the timer.
    /// `ring` suits hosts that carry mostly small packets at high rates.
    #[serde(default)]
    pub af_packet_rx: AfPacketRx,
    /// The kernel fast path (default `off`): `kernel` installs each
    /// established connection that needs nothing more from user space (an
    /// allow verdict of the current policy, no inspection, no service
    /// chain, untagged IPv4 TCP/UDP between AF_PACKET vNICs and the
    /// underlay) in an in-kernel flow cache (`palisade_io::kfast`), which
    /// forwards its packets without a copy to the agent. Needs root
    /// (`CAP_BPF`, `CAP_NET_ADMIN`) and tcx (Linux 6.6); when the kernel
    /// refuses, the agent runs without it and says so in its log and
    /// `/health`. See `crate::fastpath`.
    #[serde(default)]
    pub fast_path: FastPathMode,
    /// The agent's scheduling priority as a nice value, -20 to 19 (default
    /// [`DEFAULT_NICE`], 0: the default priority). Set when the agent
    /// starts, so every thread it starts has it. On a host whose guests'
    /// vCPUs compete with the datapath for the same cores, -10 (the
    /// priority Open vSwitch's `ovs-ctl` gives `ovs-vswitchd`) keeps the
    /// datapath and a restart's start-up ahead of them; it is not the
    /// default because on a small host it starves what shares the agent's
    /// cores (measured on 2 cores: a chaos bench's new-flow stall after a
    /// restart p50 87 ms at -10 against 35 ms at 0, and 27 ms TCP connects
    /// through a service chain against under 1.4 ms). A priority above the
    /// default needs `CAP_SYS_NICE`; without it the agent says so and runs
    /// at the default.
    #[serde(default)]
    pub nice: Option<i32>,
    /// Inline inspection (`[inspect]`): off when absent.
    #[serde(default)]
    pub inspect: Option<InspectConfig>,
    /// How this agent carries out the live migrations the controller orders
    /// (`[migration]`, controller mode only): none when absent.
    #[serde(default)]
    pub migration: Option<MigrationConfig>,
}

/// The agent's default scheduling priority ([`AgentConfig::nice`]).
pub const DEFAULT_NICE: i32 = 0;

/// The kernel fast path ([`AgentConfig::fast_path`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FastPathMode {
    /// Every packet through the engine.
    #[default]
    Off,
    /// Established flows forwarded by the kernel.
    Kernel,
}

/// How the AF_PACKET ports receive ([`AgentConfig::af_packet_rx`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AfPacketRx {
    /// `recvmmsg` from the socket's queue.
    #[default]
    Socket,
    /// A TPACKET_V3 receive ring.
    Ring,
}

/// Which hypervisor driver carries out the migrations the controller orders.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HypervisorKind {
    /// QEMU's monitor (QMP) on the VM's socket, to a destination QEMU
    /// started with `-incoming` (the lab's; a host without libvirt).
    #[default]
    Qmp,
    /// libvirt, through `virsh` ([`LibvirtConfig`]): a host whose VMs
    /// libvirt runs.
    Libvirt,
}

/// The libvirt driver: `virsh` run with these connection URIs (see
/// [`crate::hypervisor::Libvirt`]). Templates take `{vm}` and `{to}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LibvirtConfig {
    /// The `virsh` program (default `virsh`, looked up in `PATH`).
    #[serde(default)]
    pub virsh: Option<String>,
    /// This host's libvirtd (default `qemu:///system`).
    #[serde(default)]
    pub uri: Option<String>,
    /// The destination's libvirtd as this host's libvirtd reaches it
    /// (peer-to-peer), and as this agent reaches it to resume the guest,
    /// e.g. `qemu+tls://{to}/system`.
    pub destination_uri: String,
    /// Where the destination QEMU takes the migration stream, when not
    /// where libvirt would choose (`--migrateuri`), e.g. `tcp://{to}`.
    #[serde(default)]
    pub migrate_uri: Option<String>,
    /// Where this host's libvirtd is reached from the destination's, to
    /// bring a guest back when the state cannot follow (default: `uri`).
    #[serde(default)]
    pub source_uri: Option<String>,
}

/// How this agent carries out the migrations the controller orders. Each
/// path or URI is a template: `{vm}` is the VM's name, `{to}` the
/// destination host's (names with other characters than letters, digits,
/// `.`, `_` and `-`, or starting with a dot, are refused before they reach
/// a path).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationConfig {
    /// The hypervisor driver (default `qmp`).
    #[serde(default)]
    pub driver: HypervisorKind,
    /// QMP driver: the VM's QMP socket on this host, e.g. `/run/palisade/qemu/{vm}.qmp`.
    #[serde(default)]
    pub qmp: String,
    /// QMP driver: where the destination's QEMU, started with `-incoming`,
    /// listens: e.g. `tcp:{to}:4444` or `unix:/run/palisade/qemu/{vm}.incoming`.
    #[serde(default)]
    pub incoming: String,
    /// libvirt driver: how to reach the libvirt daemons.
    #[serde(default)]
    pub libvirt: Option<LibvirtConfig>,
    /// The destination agent's control socket, e.g.
    /// `/var/lib/palisade/{to}/agent.sock` (the lab's hosts share a file
    /// system; between real hosts this is a forwarded socket).
    pub peer_control: String,
    /// Bounds one migration, seconds (default 120; 1 to 3600).
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// How often the controller is asked for orders, ms (default 500; 50 to 60000).
    #[serde(default)]
    pub poll_ms: Option<u64>,
    /// Where this agent takes migrating VMs' state from the source hosts'
    /// agents (`IP:PORT` on the underlay; mutual TLS with the
    /// `[controller]` certificates). None: only on the control socket.
    #[serde(default)]
    pub listen: Option<String>,
    /// Other hosts' agents' state listeners (`host = "IP:PORT"`): a
    /// migration to a host named here moves the state over mutual TLS, a
    /// pre-copy while the guest runs and the delta in its pause; to any
    /// other host, whole in the pause through `peer_control`.
    #[serde(default)]
    pub peers: std::collections::BTreeMap<String, String>,
}

impl MigrationConfig {
    /// The bound on one migration.
    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.timeout_s.unwrap_or(120))
    }

    /// The time between asking the controller for orders.
    pub fn poll(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.poll_ms.unwrap_or(500))
    }

    /// `template` with `{vm}` and `{to}` put in, refusing names that could
    /// leave the path's directory or break its syntax.
    pub fn fill(template: &str, vm: &str, to: &str) -> Result<String, String> {
        for (what, name) in [("VM", vm), ("host", to)] {
            let ok = !name.is_empty()
                && !name.starts_with('.')
                && name.len() <= 255
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                return Err(format!(
                    "{what} name {name:?} cannot go into a path (letters, digits, . _ -, not starting with a dot)"
                ));
            }
        }
        Ok(template.replace("{vm}", vm).replace("{to}", to))
    }

    /// Templates name only `{vm}` and `{to}`; the numbers are in range.
    fn check(&self) -> Result<(), (String, String)> {
        let mut templates = vec![("peer_control", &self.peer_control)];
        match (self.driver, &self.libvirt) {
            (HypervisorKind::Qmp, None) => {
                templates.push(("qmp", &self.qmp));
                templates.push(("incoming", &self.incoming));
            }
            (HypervisorKind::Qmp, Some(_)) => {
                return Err((
                    "migration.libvirt".into(),
                    "is for driver = \"libvirt\" (the driver is qmp)".into(),
                ));
            }
            (HypervisorKind::Libvirt, None) => {
                return Err((
                    "migration.libvirt".into(),
                    "driver = \"libvirt\" needs a [migration.libvirt] section with destination_uri".into(),
                ));
            }
            (HypervisorKind::Libvirt, Some(l)) => {
                if !self.qmp.is_empty() || !self.incoming.is_empty() {
                    return Err((
                        "migration.qmp".into(),
                        "qmp and incoming are for driver = \"qmp\" (the driver is libvirt)".into(),
                    ));
                }
                templates.push(("libvirt.destination_uri", &l.destination_uri));
                for (field, t) in [
                    ("libvirt.uri", &l.uri),
                    ("libvirt.migrate_uri", &l.migrate_uri),
                    ("libvirt.source_uri", &l.source_uri),
                    ("libvirt.virsh", &l.virsh),
                ] {
                    if let Some(t) = t {
                        templates.push((field, t));
                    }
                }
            }
        }
        for (field, t) in templates {
            let rest = t.replace("{vm}", "").replace("{to}", "");
            if t.is_empty() || rest.contains(['{', '}']) {
                return Err((
                    format!("migration.{field}"),
                    format!("`{t}` must be a path with only {{vm}} and {{to}} in braces"),
                ));
            }
        }
        if self.timeout_s.is_some_and(|t| !(1..=3600).contains(&t)) {
            return Err(("migration.timeout_s".into(), "must be 1 to 3600 seconds".into()));
        }
        if self.poll_ms.is_some_and(|t| !(50..=60_000).contains(&t)) {
            return Err(("migration.poll_ms".into(), "must be 50 to 60000 milliseconds".into()));
        }
        if let Some(l) = &self.listen
            && l.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(("migration.listen".into(), format!("`{l}` is not IP:PORT")));
        }
        for (host, addr) in &self.peers {
            Self::fill("", "vm", host).map_err(|m| (format!("migration.peers.{host}"), m))?;
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return Err((format!("migration.peers.{host}"), format!("`{addr}` is not IP:PORT")));
            }
        }
        Ok(())
    }
}

/// Inline inspection: the signatures the policy's profiles select from,
/// and the budget that bounds what inspection may cost.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InspectConfig {
    /// The rules file (Suricata's rule language, the subset of
    /// `palisade ids check`). Read again with every policy.
    pub rules: PathBuf,
    /// A `classification.config` (classtypes and their priorities; default:
    /// Suricata's own table).
    #[serde(default)]
    pub classification: Option<PathBuf>,
    /// Load the rules that parse when others are refused (they are logged
    /// and counted); otherwise one refused rule fails the load.
    #[serde(default)]
    pub skip_invalid: bool,
    /// A `threshold.config` (Suricata's `threshold`, `event_filter` and
    /// `suppress` lines) applied to the rules; read with them. An entry it
    /// refuses fails the load, with its line and column.
    #[serde(default)]
    pub threshold: Option<PathBuf>,
    /// Bytes per second each port (a vNIC, or an appliance leg) may have
    /// inspected; past it, a zone whose `on_failure` is `open` forwards
    /// uninspected (counted), one that is `closed` drops (counted).
    /// Default: no limit.
    #[serde(default)]
    pub budget_bytes_per_s: Option<u64>,
    /// Reassembled stream bytes all flows of a worker may hold (MiB, default 64).
    #[serde(default)]
    pub stream_memory_mib: Option<u64>,
    /// Inspected flows a worker tracks at most (default 65536): past it the
    /// least recently seen is forgotten.
    #[serde(default)]
    pub max_flows: Option<usize>,
}

fn default_offloads() -> bool {
    true
}

/// Where the controller is and how to prove who we are.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// Controller URLs (several: failover).
    pub servers: Vec<String>,
    /// The CA certificate that signed the controller's (and our) certificate.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// This host's certificate (mutual TLS; its common name must be the host name).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Its key.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// A token instead of a certificate (a controller on loopback with `--insecure-http`).
    #[serde(default)]
    pub token: Option<String>,
    /// Seconds between health reports to the controller (1 to 60; default 3).
    #[serde(default)]
    pub health_interval_s: Option<u64>,
}

/// Seconds between health reports when the configuration does not say.
pub const DEFAULT_HEALTH_INTERVAL_S: u64 = 3;

impl ControllerConfig {
    /// The time between health reports.
    pub fn health_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.health_interval_s.unwrap_or(DEFAULT_HEALTH_INTERVAL_S))
    }
}

/// The VXLAN underlay.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Underlay {
    /// This host's tunnel endpoint address.
    pub local: Ipv4Addr,
    /// The UDP port (default 4789).
    #[serde(default = "default_vxlan_port")]
    pub port: u16,
    /// Other hosts' tunnel endpoints, by host name.
    #[serde(default)]
    pub peers: BTreeMap<String, Ipv4Addr>,
}

fn default_vxlan_port() -> u16 {
    4789
}

/// A vNIC of the inventory bound to a host interface or a vhost-user socket.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VnicBinding {
    /// The vNIC's name in the inventory.
    pub name: String,
    /// The host-side interface (veth end or tap), read through AF_PACKET.
    /// Exactly one of this and `vhost_user`.
    #[serde(default)]
    pub interface: Option<String>,
    /// A vhost-user socket the agent listens on: the VM's QEMU connects to
    /// it (`-chardev socket,path=…,reconnect=1`, libvirt's
    /// `<interface type='vhostuser'>` with `mode='client'`) and its
    /// virtio-net queues are served by the workers straight from guest memory.
    #[serde(default)]
    pub vhost_user: Option<PathBuf>,
    /// Queue pairs the vhost-user device offers (1 to 128; default: one per worker).
    #[serde(default)]
    pub queue_pairs: Option<u16>,
    /// Permission bits of the vhost-user socket (e.g. `0o660`); the umask's when absent.
    #[serde(default)]
    pub socket_mode: Option<u32>,
    /// Group of the vhost-user socket (a group name or number), so that QEMU
    /// running as another user (libvirt's `libvirt-qemu`) can connect while
    /// other local users cannot; the agent's own group when absent.
    #[serde(default)]
    pub socket_group: Option<String>,
}

/// How a vNIC reaches the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VnicAttachment<'a> {
    /// A host interface (veth end or tap).
    Interface(&'a str),
    /// A vhost-user socket the agent serves.
    VhostUser {
        /// The socket.
        socket: &'a Path,
        /// Queue pairs offered (`None`: one per worker).
        queue_pairs: Option<u16>,
        /// The socket's permission bits.
        socket_mode: Option<u32>,
    },
}

impl VnicBinding {
    /// A vNIC on a host interface.
    pub fn on_interface(name: &str, interface: &str) -> VnicBinding {
        VnicBinding {
            name: name.into(),
            interface: Some(interface.into()),
            vhost_user: None,
            queue_pairs: None,
            socket_mode: None,
            socket_group: None,
        }
    }

    /// How the vNIC is attached (a checked configuration has exactly one).
    pub fn attachment(&self) -> VnicAttachment<'_> {
        match (&self.vhost_user, &self.interface) {
            (Some(socket), _) => VnicAttachment::VhostUser {
                socket,
                queue_pairs: self.queue_pairs,
                socket_mode: self.socket_mode,
            },
            (None, Some(i)) => VnicAttachment::Interface(i),
            (None, None) => VnicAttachment::Interface(""),
        }
    }

    /// What counters and logs call its port: the interface, or the socket's path.
    pub fn port_label(&self) -> String {
        match self.attachment() {
            VnicAttachment::Interface(i) => i.to_string(),
            VnicAttachment::VhostUser { socket, .. } => socket.display().to_string(),
        }
    }
}

/// Longest socket path a Unix socket address holds (`sun_path` less its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// A router or gateway leg attached to a zone.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplianceBinding {
    /// A name for counters and logs.
    pub name: String,
    /// The host-side interface.
    pub interface: String,
    /// The zone it is attached to.
    pub zone: String,
    /// The appliance's MAC (the only source MAC it may use).
    pub mac: String,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A value is inconsistent.
    #[error("{path}: {field}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// Parse a duration written `90d`, `12h`, `30m` or `45s`.
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    Some(std::time::Duration::from_secs(secs))
}

impl AgentConfig {
    /// How long audit records are kept.
    pub fn audit_retention(&self) -> palisade_audit::Retention {
        palisade_audit::Retention {
            max_age: Some(
                self.audit_max_age
                    .as_deref()
                    .and_then(parse_duration)
                    .unwrap_or(std::time::Duration::from_secs(90 * 86_400)),
            ),
            max_bytes: self.audit_max_bytes,
        }
    }

    /// The audit trail's signing key file: as configured, else `<state_dir>/audit.key`.
    pub fn audit_key_file(&self) -> PathBuf {
        self.audit_key
            .clone()
            .unwrap_or_else(|| self.state_dir.join("audit.key"))
    }

    /// The audit trail's head file: as configured, else `<state_dir>/audit.head`.
    pub fn audit_head_file(&self) -> PathBuf {
        self.audit_head
            .clone()
            .unwrap_or_else(|| self.state_dir.join("audit.head"))
    }

    /// Datapath workers: as configured, else one per core.
    pub fn workers(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(MAX_WORKERS)
        })
    }

    /// The agent's scheduling priority as a nice value ([`AgentConfig::nice`]).
    pub fn nice(&self) -> i32 {
        self.nice.unwrap_or(DEFAULT_NICE)
    }

    /// The interval between connection-table snapshots (`None`: off).
    pub fn state_snapshot_interval(&self) -> Option<std::time::Duration> {
        match self.state_snapshot_ms {
            None => Some(crate::snapshot::DEFAULT_INTERVAL),
            Some(0) => None,
            Some(ms) => Some(std::time::Duration::from_millis(ms)),
        }
    }

    /// Read and check a configuration file.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        AgentConfig::parse(&text, path)
    }

    /// Parse and check configuration text (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<AgentConfig, ConfigError> {
        let config: AgentConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let invalid = |field: String, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            field,
            message,
        };
        let mut sockets = std::collections::HashSet::new();
        for v in &config.vnics {
            check_vnic_attachment(v, &mut sockets)
                .map_err(|(field, message)| invalid(format!("vnic {}: {field}", v.name), message))?;
        }
        let mut interfaces = std::collections::HashSet::new();
        let all = config
            .vnics
            .iter()
            .filter_map(|v| Some(("vnic", &v.name, v.interface.as_ref()?)))
            .chain(config.appliances.iter().map(|a| ("appliance", &a.name, &a.interface)));
        for (kind, name, interface) in all {
            if interface.is_empty() || interface.len() > 15 || interface.contains(['/', ' ']) {
                return Err(invalid(
                    format!("{kind} {name}: interface"),
                    format!("`{interface}` is not a Linux interface name (1-15 characters, no '/' or spaces)"),
                ));
            }
            if !interfaces.insert(interface.clone()) {
                return Err(invalid(
                    format!("{kind} {name}: interface"),
                    format!("`{interface}` is bound twice"),
                ));
            }
        }
        for a in &config.appliances {
            if a.mac.parse::<palisade_wire::ethernet::EthernetAddress>().is_err() {
                return Err(invalid(
                    format!("appliance {}: mac", a.name),
                    format!("`{}` is not a MAC address", a.mac),
                ));
            }
        }
        if let Some(a) = &config.audit_max_age
            && parse_duration(a).is_none()
        {
            return Err(invalid(
                "audit_max_age".into(),
                format!("`{a}` is not a duration like 90d, 12h, 30m or 45s"),
            ));
        }
        if let Some(i) = &config.inspect {
            if i.budget_bytes_per_s == Some(0) {
                return Err(invalid(
                    "inspect.budget_bytes_per_s".into(),
                    "0 would inspect nothing: leave it out for no limit".into(),
                ));
            }
            if let Some(m) = i.stream_memory_mib
                && !(1..=65_536).contains(&m)
            {
                return Err(invalid(
                    "inspect.stream_memory_mib".into(),
                    format!("{m} is out of range: 1 to 65536"),
                ));
            }
            if let Some(f) = i.max_flows
                && !(1..=16 << 20).contains(&f)
            {
                return Err(invalid(
                    "inspect.max_flows".into(),
                    format!("{f} is out of range: 1 to 16777216"),
                ));
            }
        }
        if let Some(n) = config.nice
            && !(-20..=19).contains(&n)
        {
            return Err(invalid("nice".into(), format!("{n} is out of range: -20 to 19")));
        }
        if let Some(ms) = config.state_snapshot_ms
            && ms != 0
            && !(10..=60_000).contains(&ms)
        {
            return Err(invalid(
                "state_snapshot_ms".into(),
                format!("{ms} is out of range: 0 (off) or 10 to 60000 milliseconds"),
            ));
        }
        match (&config.policy, &config.controller) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "policy".into(),
                    "give a policy directory or a [controller], not both".into(),
                ));
            }
            (None, None) => {
                return Err(invalid(
                    "policy".into(),
                    "no policy: give a policy directory or a [controller] section".into(),
                ));
            }
            (None, Some(c)) if c.health_interval_s.is_some_and(|s| !(1..=60).contains(&s)) => {
                return Err(invalid(
                    "controller.health_interval_s".into(),
                    "must be 1 to 60 seconds".into(),
                ));
            }
            (None, Some(c)) if c.servers.is_empty() => {
                return Err(invalid("controller.servers".into(), "is empty".into()));
            }
            (None, Some(c)) if c.token.is_none() && (c.cert.is_none() || c.key.is_none() || c.ca.is_none()) => {
                return Err(invalid(
                    "controller".into(),
                    "give ca, cert and key (mutual TLS), or a token".into(),
                ));
            }
            _ => {}
        }
        if let Some(audit) = &config.audit {
            // Whoever can write the trail must not find its key, or the head that anchors it, there.
            let inside = |p: &Path| {
                let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
                abs(p).starts_with(abs(audit))
            };
            for (field, path) in [
                ("audit_key", config.audit_key_file()),
                ("audit_head", config.audit_head_file()),
            ] {
                if inside(&path) {
                    return Err(invalid(
                        field.into(),
                        format!(
                            "{} is inside the audit directory {}: keep it outside, where whoever can write the trail cannot reach it",
                            path.display(),
                            audit.display()
                        ),
                    ));
                }
            }
        }
        if let Some(m) = &config.migration {
            if config.controller.is_none() {
                return Err(invalid(
                    "migration".into(),
                    "migrations are ordered by the controller: give a [controller] section".into(),
                ));
            }
            m.check().map_err(|(field, message)| invalid(field, message))?;
            let tls = config
                .controller
                .as_ref()
                .is_some_and(|c| c.ca.is_some() && c.cert.is_some() && c.key.is_some());
            if (m.listen.is_some() || !m.peers.is_empty()) && !tls {
                return Err(invalid(
                    "migration".into(),
                    "listen and peers move state over mutual TLS: give [controller] ca, cert and key".into(),
                ));
            }
        }
        if let Some(w) = config.workers
            && !(1..=MAX_WORKERS).contains(&w)
        {
            return Err(invalid(
                "workers".into(),
                format!("{w} is not between 1 and {MAX_WORKERS}"),
            ));
        }
        if config.workers() > 1 && config.underlay.port == 0 {
            return Err(invalid(
                "underlay.port".into(),
                "0 (any port) cannot be shared by several workers: give the port".into(),
            ));
        }
        if config.underlay.peers.values().any(|p| *p == config.underlay.local) {
            return Err(invalid(
                "underlay.peers".into(),
                format!("lists this host's own address {}", config.underlay.local),
            ));
        }
        Ok(config)
    }
}

/// Check that `v` is attached one way, and a vhost-user socket's settings;
/// `sockets` collects the paths seen so far. Errors are (field, message).
fn check_vnic_attachment(
    v: &VnicBinding,
    sockets: &mut std::collections::HashSet<PathBuf>,
) -> Result<(), (&'static str, String)> {
    let Some(socket) = &v.vhost_user else {
        if v.interface.is_none() {
            return Err(("interface", "give an interface or a vhost_user socket".into()));
        }
        for (field, set) in [
            ("queue_pairs", v.queue_pairs.is_some()),
            ("socket_mode", v.socket_mode.is_some()),
            ("socket_group", v.socket_group.is_some()),
        ] {
            if set {
                return Err((field, "applies only to a vhost_user vNIC".into()));
            }
        }
        return Ok(());
    };
    if v.interface.is_some() {
        return Err((
            "vhost_user",
            "give an interface or a vhost_user socket, not both".into(),
        ));
    }
    let shown = socket.display();
    let bytes = socket.as_os_str().as_encoded_bytes();
    if !socket.is_absolute() {
        return Err(("vhost_user", format!("`{shown}` is not an absolute path")));
    }
    if bytes.len() > MAX_SOCKET_PATH {
        return Err((
            "vhost_user",
            format!(
                "`{shown}` is {} bytes long: a Unix socket path holds at most {MAX_SOCKET_PATH}",
                bytes.len()
            ),
        ));
    }
    if bytes.iter().any(|b| b.is_ascii_control()) || socket.file_name().is_none() || bytes.ends_with(b"/") {
        return Err((
            "vhost_user",
            format!("`{}` is not a usable socket path", shown.to_string().escape_debug()),
        ));
    }
    if !sockets.insert(socket.clone()) {
        return Err(("vhost_user", format!("`{shown}` is bound twice")));
    }
    if let Some(q) = v.queue_pairs
        && !(1..=palisade_io::vhost_user::MAX_QUEUE_PAIRS).contains(&q)
    {
        return Err((
            "queue_pairs",
            format!("{q} is not between 1 and {}", palisade_io::vhost_user::MAX_QUEUE_PAIRS),
        ));
    }
    if let Some(g) = &v.socket_group
        && (g.is_empty() || g.len() > 64 || g.contains([':', '\n', '\0', ' ']))
    {
        return Err((
            "socket_group",
            format!("`{}` is not a group name or number", g.escape_debug()),
        ));
    }
    if let Some(m) = v.socket_mode
        && m > 0o777
    {
        return Err((
            "socket_mode",
            format!("{m:#o} is not a set of permission bits (0o000 to 0o777)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
host = "hv1"
policy = "/p"
state_dir = "/s"
metrics = "127.0.0.1:9101"
[underlay]
local = "192.168.100.1"
peers = { hv2 = "192.168.100.2" }
[[vnic]]
name = "web-1.0"
interface = "vn-web-1"
[[appliance]]
name = "edge-web"
interface = "ge-web"
zone = "web"
mac = "02:00:00:00:fe:01"
"#;

    #[test]
    fn a_lab_config_parses() {
        let c = AgentConfig::parse(GOOD, Path::new("hv1.toml")).unwrap();
        assert_eq!(c.host, "hv1");
        assert_eq!(c.underlay.port, 4789);
        assert_eq!(c.underlay.peers["hv2"], Ipv4Addr::new(192, 168, 100, 2));
        assert_eq!(c.vnics[0].interface.as_deref(), Some("vn-web-1"));
        assert_eq!(c.vnics[0].attachment(), VnicAttachment::Interface("vn-web-1"));
        assert_eq!(c.appliances[0].zone, "web");
        assert!(c.offloads, "offloads are on unless turned off");
        let off = AgentConfig::parse(
            &GOOD.replace("[underlay]", "offloads = false\n[underlay]"),
            Path::new("hv1.toml"),
        )
        .unwrap();
        assert!(!off.offloads);
    }

    #[test]
    fn the_kernel_fast_path_is_off_unless_asked_for_and_its_value_is_checked() {
        let c = AgentConfig::parse(GOOD, Path::new("hv1.toml")).unwrap();
        assert_eq!(c.fast_path, FastPathMode::Off);
        let with = |v: &str| {
            AgentConfig::parse(
                &GOOD.replace("metrics =", &format!("fast_path = {v}\nmetrics =")),
                Path::new("hv1.toml"),
            )
        };
        assert_eq!(with("\"kernel\"").unwrap().fast_path, FastPathMode::Kernel);
        assert_eq!(with("\"off\"").unwrap().fast_path, FastPathMode::Off);
        let e = with("\"xdp\"").unwrap_err().to_string();
        assert!(e.contains("fast_path") || e.contains("xdp"), "{e}");
    }

    #[test]
    fn state_snapshots_default_on_and_their_interval_is_checked() {
        let c = AgentConfig::parse(GOOD, Path::new("hv1.toml")).unwrap();
        assert_eq!(c.state_snapshot_interval(), Some(crate::snapshot::DEFAULT_INTERVAL));
        let with = |v: &str| {
            AgentConfig::parse(
                &GOOD.replace("metrics =", &format!("state_snapshot_ms = {v}\nmetrics =")),
                Path::new("hv1.toml"),
            )
        };
        assert_eq!(with("0").unwrap().state_snapshot_interval(), None);
        assert_eq!(
            with("50").unwrap().state_snapshot_interval(),
            Some(std::time::Duration::from_millis(50))
        );
        for bad in ["5", "60001"] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains("state_snapshot_ms") && e.contains(bad), "{e}");
        }
        assert!(with("-1").is_err());
    }

    #[test]
    fn the_priority_has_its_default_and_is_checked() {
        let c = AgentConfig::parse(GOOD, Path::new("hv1.toml")).unwrap();
        assert_eq!(c.nice(), DEFAULT_NICE);
        let with = |v: &str| {
            AgentConfig::parse(
                &GOOD.replace("metrics =", &format!("nice = {v}\nmetrics =")),
                Path::new("hv1.toml"),
            )
        };
        assert_eq!(with("0").unwrap().nice(), 0);
        assert_eq!(with("-20").unwrap().nice(), -20);
        assert_eq!(with("19").unwrap().nice(), 19);
        for bad in ["-21", "20"] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains("nice") && e.contains(bad), "{e}");
        }
        assert!(with("\"high\"").is_err());
    }

    #[test]
    fn the_audit_key_and_head_default_outside_the_trail() {
        let text = GOOD.replace("metrics =", "audit = \"/s/audit\"\nmetrics =");
        let c = AgentConfig::parse(&text, Path::new("hv1.toml")).unwrap();
        assert_eq!(c.audit_key_file(), Path::new("/s/audit.key"));
        assert_eq!(c.audit_head_file(), Path::new("/s/audit.head"));
        // A trail in the state directory itself would hold the default key: refused, naming the field.
        let text = GOOD.replace("metrics =", "audit = \"/s\"\nmetrics =");
        let e = AgentConfig::parse(&text, Path::new("hv1.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("audit_key") && e.contains("/s/audit.key"), "{e}");
        let text = GOOD.replace(
            "metrics =",
            "audit = \"/s\"\naudit_key = \"/etc/palisade/audit.key\"\naudit_head = \"/s/h/x.head\"\nmetrics =",
        );
        let e = AgentConfig::parse(&text, Path::new("hv1.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("audit_head"), "{e}");
    }

    #[test]
    fn an_inspect_section_parses_and_its_bounds_are_checked() {
        let with =
            |section: &str| AgentConfig::parse(&format!("{GOOD}\n[inspect]\n{section}\n"), Path::new("hv1.toml"));
        let c = with("rules = \"/etc/palisade/rules/x.rules\"\nbudget_bytes_per_s = 1000000").unwrap();
        let i = c.inspect.unwrap();
        assert_eq!(i.rules, Path::new("/etc/palisade/rules/x.rules"));
        assert_eq!(
            (i.budget_bytes_per_s, i.classification, i.skip_invalid),
            (Some(1_000_000), None, false)
        );
        assert!(
            AgentConfig::parse(GOOD, Path::new("hv1.toml"))
                .unwrap()
                .inspect
                .is_none()
        );
        for (bad, field) in [
            ("rules = \"r\"\nbudget_bytes_per_s = 0", "inspect.budget_bytes_per_s"),
            ("rules = \"r\"\nstream_memory_mib = 0", "inspect.stream_memory_mib"),
            ("rules = \"r\"\nmax_flows = 0", "inspect.max_flows"),
            ("budget_bytes_per_s = 5", "rules"),
            ("rules = \"r\"\nrule = \"typo\"", "rule"),
        ] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains(field), "{bad}: {e}");
        }
    }

    #[test]
    fn durations() {
        let d = |s| parse_duration(s).map(|d| d.as_secs());
        assert_eq!(d("90d"), Some(90 * 86_400));
        assert_eq!(d("12h"), Some(43_200));
        assert_eq!(d("30m"), Some(1800));
        assert_eq!(d("45s"), Some(45));
        for bad in ["", "d", "10", "10w", "-1d", "99999999999999999999d"] {
            assert_eq!(d(bad), None, "{bad}");
        }
    }

    const CONTROLLER: &str = "[controller]\nservers = [\"https://c:7443\"]\n";

    #[test]
    fn a_controller_config_parses() {
        let text = GOOD.replace("policy = \"/p\"\n", "").replace(
            "[underlay]",
            &format!("{CONTROLLER}ca = \"/t/ca.pem\"\ncert = \"/t/hv1.pem\"\nkey = \"/t/hv1.key\"\n[underlay]"),
        );
        let c = AgentConfig::parse(&text, Path::new("hv1.toml")).unwrap();
        assert_eq!(c.policy, None);
        assert_eq!(c.controller.unwrap().servers, ["https://c:7443"]);
    }

    const VHOST: &str = "[[vnic]]\nname = \"db-1.0\"\nvhost_user = \"/run/palisade/vhost/db-1.sock\"\n";

    #[test]
    fn a_vhost_user_vnic_parses() {
        let text = format!("{GOOD}{VHOST}queue_pairs = 4\nsocket_mode = 0o660\n");
        let c = AgentConfig::parse(&text, Path::new("hv1.toml")).unwrap();
        assert_eq!(
            c.vnics[1].attachment(),
            VnicAttachment::VhostUser {
                socket: Path::new("/run/palisade/vhost/db-1.sock"),
                queue_pairs: Some(4),
                socket_mode: Some(0o660),
            }
        );
        assert_eq!(c.vnics[1].port_label(), "/run/palisade/vhost/db-1.sock");
        let plain = AgentConfig::parse(&format!("{GOOD}{VHOST}"), Path::new("hv1.toml")).unwrap();
        assert!(matches!(
            plain.vnics[1].attachment(),
            VnicAttachment::VhostUser {
                queue_pairs: None,
                socket_mode: None,
                ..
            }
        ));
    }

    #[test]
    fn bad_vhost_user_vnics_name_the_field() {
        let long = format!("/run/{}.sock", "x".repeat(MAX_SOCKET_PATH));
        let cases = [
            (
                format!("{GOOD}{VHOST}interface = \"vn-db\"\n"),
                "vnic db-1.0: vhost_user: give an interface or a vhost_user socket, not both",
            ),
            (
                format!("{GOOD}[[vnic]]\nname = \"db-1.0\"\n"),
                "vnic db-1.0: interface: give an interface or a vhost_user socket",
            ),
            (
                GOOD.replace("interface = \"vn-web-1\"", "interface = \"vn-web-1\"\nqueue_pairs = 2"),
                "vnic web-1.0: queue_pairs: applies only to a vhost_user vNIC",
            ),
            (
                GOOD.replace(
                    "interface = \"vn-web-1\"",
                    "interface = \"vn-web-1\"\nsocket_mode = 0o600",
                ),
                "vnic web-1.0: socket_mode: applies only",
            ),
            (
                format!("{GOOD}{VHOST}").replace("/run/palisade/vhost/db-1.sock", "db-1.sock"),
                "vhost_user: `db-1.sock` is not an absolute path",
            ),
            (
                format!("{GOOD}{VHOST}").replace("/run/palisade/vhost/db-1.sock", &long),
                "a Unix socket path holds at most 107",
            ),
            (
                format!("{GOOD}{VHOST}").replace("/run/palisade/vhost/db-1.sock", "/run/a\\nb.sock"),
                "is not a usable socket path",
            ),
            (
                format!("{GOOD}{VHOST}").replace("/run/palisade/vhost/db-1.sock", "/run/palisade/"),
                "is not a usable socket path",
            ),
            (
                format!("{GOOD}{VHOST}{}", VHOST.replace("db-1.0", "db-2.0")),
                "vnic db-2.0: vhost_user: `/run/palisade/vhost/db-1.sock` is bound twice",
            ),
            (
                format!("{GOOD}{VHOST}queue_pairs = 0\n"),
                "vnic db-1.0: queue_pairs: 0 is not between 1 and 128",
            ),
            (
                format!("{GOOD}{VHOST}queue_pairs = 129\n"),
                "queue_pairs: 129 is not between",
            ),
            (format!("{GOOD}{VHOST}queue_pairs = 70000\n"), "queue_pairs"),
            (
                format!("{GOOD}{VHOST}socket_mode = 0o1777\n"),
                "socket_mode: 0o1777 is not a set of permission bits",
            ),
            (
                format!("{GOOD}{VHOST}socket_group = \"a:b\"\n"),
                "socket_group: `a:b` is not a group name or number",
            ),
            (format!("{GOOD}{VHOST}socket_group = \"\"\n"), "socket_group"),
            (
                GOOD.replace(
                    "interface = \"vn-web-1\"",
                    "interface = \"vn-web-1\"\nsocket_group = \"kvm\"",
                ),
                "socket_group: applies only",
            ),
        ];
        for (text, want) in cases {
            let err = AgentConfig::parse(&text, Path::new("hv1.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err} should contain {want}");
            assert!(err.starts_with("hv1.toml"), "{err}");
        }
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases = [
            (GOOD.replace("vn-web-1", "ge-web"), "interface: `ge-web` is bound twice"),
            (
                GOOD.replace("vn-web-1", "a-much-too-long-name"),
                "is not a Linux interface name",
            ),
            (GOOD.replace("02:00:00:00:fe:01", "nope"), "appliance edge-web: mac"),
            (GOOD.replace("192.168.100.2", "192.168.100.1"), "underlay.peers"),
            (
                GOOD.replace("[underlay]", "workers = 0\n[underlay]"),
                "workers: 0 is not between 1 and 64",
            ),
            (
                GOOD.replace("[underlay]", "workers = 65\n[underlay]"),
                "workers: 65 is not between",
            ),
            (
                GOOD.replace("[underlay]", "workers = 2\n[underlay]\nport = 0"),
                "underlay.port: 0 (any port) cannot be shared",
            ),
            (GOOD.replace("host = ", "hots = "), "unknown field `hots`"),
            (
                GOOD.replace("\"192.168.100.1\"", "\"300.1.1.1\""),
                "invalid IPv4 address",
            ),
            (GOOD.replace("policy = \"/p\"\n", ""), "no policy"),
            (
                GOOD.replace("[underlay]", "audit_max_age = \"3 weeks\"\n[underlay]"),
                "audit_max_age",
            ),
            (
                GOOD.replace("[underlay]", &format!("{CONTROLLER}[underlay]")),
                "not both",
            ),
            (
                GOOD.replace("policy = \"/p\"\n", "")
                    .replace("[underlay]", &format!("{CONTROLLER}[underlay]")),
                "give ca, cert and key",
            ),
            (
                GOOD.replace("policy = \"/p\"\n", "").replace(
                    "[underlay]",
                    &format!("{CONTROLLER}token = \"t\"\nhealth_interval_s = 0\n[underlay]"),
                ),
                "controller.health_interval_s: must be 1 to 60 seconds",
            ),
        ];
        for (text, want) in cases {
            let err = AgentConfig::parse(&text, Path::new("hv1.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err} should contain {want}");
            assert!(err.starts_with("hv1.toml"), "{err}");
        }
    }
}
