//! The fail-open fallback: a kernel bridge per `on_failure: open` zone,
//! armed only while the agent is gone.
//!
//! Palisade is the only forwarder between a host's vNICs and the network, so
//! when the agent dies, traffic stops: every zone fails *closed*. A zone the
//! policy marks `on_failure: open` instead keeps forwarding, unfiltered on
//! this host, through the kernel: per open zone a Linux bridge (`palfb<VNI>`)
//! with the zone's local vNIC ends and a kernel VXLAN device (`palfx<VNI>`,
//! `id VNI dstport PORT local UNDERLAY nolearning gbp`) whose static FDB
//! sends each remote MAC of the zone to its host's tunnel endpoint (and
//! unknown or broadcast destinations to every peer, as the agent floods).
//! Closed zones' vNICs stay unattached and forward nothing.
//! A vhost-user vNIC has no kernel device: no bridge can carry its guest's
//! rings, so it fails closed in any zone while the agent is gone (QEMU keeps
//! the guest's link down until the agent is back and it reconnects).
//!
//! - The agent writes the [`FallbackPlan`] (`fallback.json` in its state
//!   directory) at start and on every policy change: what to build, from the
//!   configuration and the inventory. It never arms anything itself.
//! - [`arm`] (`palisade agent fallback arm`, run by systemd's `ExecStopPost=`
//!   or by the [`crate::supervise`] supervisor when the agent dies) builds it.
//!   It refuses while the agent runs: the agent holds `agent.lock` in the
//!   state directory for its whole life (the kernel drops the lock when the
//!   process dies, SIGKILL included), and arm takes that lock first, so the
//!   kernel bridge and the agent never forward side by side (a bridge next to
//!   a running agent would let local vNICs bypass the policy).
//! - [`disarm`] removes exactly the devices named with the two prefixes (of
//!   the right kind), which releases the vNIC ends. The agent disarms at
//!   start, holding the lock and before it binds its sockets (the kernel
//!   VXLAN device holds the underlay port).
//!
//! The VXLAN devices have `gbp` so that they accept the VXLAN-GBP frames the
//! agents on other hosts send (a kernel VXLAN device without it drops any
//! frame with the G flag). They send plain VXLAN: no group and no
//! policy-applied bit, so the receiving agent does not trust them and judges
//! each flow by its own policy (its vNIC's ingress), as it does for any
//! untrusted tunnel frame; the group id itself is never read by an agent.
//! Fail-open is therefore "unfiltered on this host": the peers still filter.
//!
//! Take-over: when the agent is back, a connection that ran through the
//! fallback meets it mid-stream. One it had before it died is resumed from
//! its snapshots; one opened meanwhile is picked up by its next segment the
//! way the zone's TCP tracking allows: liberal zones (the agent's; as Linux
//! with `nf_conntrack_tcp_loose`) pick up a plain ACK as established if the
//! policy allows the direction (or if it comes from a peer with the
//! policy-applied bit), and a flow the policy denies is dropped from its next
//! segment on. The agent checks every zone's TCP windows liberally (it
//! passes no strict zone to the datapath; the policy language has no such
//! setting), so every allowed connection of a fail-open episode is picked
//! up, with no grace period to bound. The datapath's strict window checking
//! (a `HostConfig` option of the standalone datapath) would refuse such a
//! pickup (it needs a SYN); a zone that is ever made strict and
//! `on_failure: open` must first get what imported state gets: relaxed
//! windows for the connections the policy allows, for a bounded time after
//! the episode.
//!
//! One agent per network namespace: [`disarm`] removes every device named
//! with the two prefixes in the namespace, whichever state directory armed
//! it, and two fallbacks would want the same underlay port. A second agent
//! with another state directory in the same namespace is not refused; it
//! would tear down the first one's armed fallback as it starts.
//!
//! What was armed is recorded (`fallback.armed`: when, which zones) so the
//! restarted agent reports how long fail-open lasted (`/health`, metrics,
//! the controller).
//!
//! The plan is input like any other file: it is checked on load (names,
//! VNIs, MACs, sizes) before any command is made from it, and the commands
//! go to `ip -batch`/`bridge -batch` one per line, so a name holding a space
//! or a newline could change them: such names are refused.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use palisade_policy::Model;
use palisade_policy::model::OnFailure;
use palisade_wire::ethernet::EthernetAddress;
use serde::{Deserialize, Serialize};

use crate::config::AgentConfig;

/// The plan's file in the state directory.
pub const PLAN_FILE: &str = "fallback.json";
/// The record of an armed fallback in the state directory.
pub const ARMED_FILE: &str = "fallback.armed";
/// The lock the agent holds while it runs (and arm while it arms).
pub const LOCK_FILE: &str = "agent.lock";
/// Names of the fallback's bridges: this prefix and the zone's VNI.
pub const BRIDGE_PREFIX: &str = "palfb";
/// Names of the fallback's VXLAN devices: this prefix and the zone's VNI.
pub const VXLAN_PREFIX: &str = "palfx";
/// The plan format's version.
pub const PLAN_VERSION: u32 = 1;
/// The largest plan file read (a plan names at most every MAC of its zones).
pub const MAX_PLAN_BYTES: u64 = 64 << 20;
/// The most zones a plan holds.
pub const MAX_ZONES: usize = 4096;
/// The most remote MACs of one zone.
pub const MAX_REMOTE_MACS: usize = 1_000_000;
/// The largest VNI (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// What to build while the agent is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackPlan {
    /// [`PLAN_VERSION`].
    pub version: u32,
    /// The host.
    pub host: String,
    /// This host's tunnel endpoint.
    pub underlay: Ipv4Addr,
    /// The underlay's UDP port.
    pub port: u16,
    /// The open zones with a port on this host.
    pub open: Vec<OpenZone>,
    /// The closed zones with a port on this host, and those ports'
    /// interfaces: never attached (listed so that arm can detach one that a
    /// zone turned closed left in a bridge).
    pub closed: Vec<ClosedZone>,
}

/// An `on_failure: open` zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenZone {
    /// The zone's name.
    pub zone: String,
    /// The VNI it is carried in between hosts (the agent's: the zone's VNI, or its VLAN id).
    pub vni: u32,
    /// The host-side interfaces of its local vNICs and appliance legs.
    pub interfaces: Vec<String>,
    /// Its vNICs on other hosts: MAC → that host's tunnel endpoint.
    pub remote: BTreeMap<String, Ipv4Addr>,
    /// Where unknown and broadcast destinations go: every peer's tunnel endpoint.
    pub flood: Vec<Ipv4Addr>,
}

/// An `on_failure: closed` zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClosedZone {
    /// The zone's name.
    pub zone: String,
    /// The host-side interfaces of its local ports.
    pub interfaces: Vec<String>,
}

/// A plan, a record or a device operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum FallbackError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The plan (or the record) is not what the agent writes.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, and where.
        message: String,
    },
    /// The plan cannot be made from this configuration and inventory.
    #[error("fallback plan: {0}")]
    Plan(String),
    /// The lock is held: the agent runs (arming now would bypass it), or
    /// another agent uses this state directory.
    #[error(
        "{0} is held: an agent runs on this state directory (the fail-open fallback is armed only while none does)"
    )]
    AgentRunning(PathBuf),
    /// `ip` or `bridge` failed.
    #[error("{tool} -batch: {message}")]
    Command {
        /// The tool.
        tool: &'static str,
        /// Its exit status and what it printed.
        message: String,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> FallbackError + '_ {
    move |source| FallbackError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether `name` is an interface name the fallback will put into a command:
/// 1 to 15 of `A-Z a-z 0-9 _ . -`, not starting with `-` (which `ip` would read as an option).
pub fn safe_interface_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The bridge of the zone carried in `vni`.
pub fn bridge_name(vni: u32) -> String {
    format!("{BRIDGE_PREFIX}{vni}")
}

/// The VXLAN device of the zone carried in `vni`.
pub fn vxlan_name(vni: u32) -> String {
    format!("{VXLAN_PREFIX}{vni}")
}

impl FallbackPlan {
    /// Build the plan of `config`'s ports under `model`: each port's zone,
    /// open or closed; for an open zone its VNI, its local interfaces, the
    /// MACs of its vNICs on the configuration's peers, and the peers.
    pub fn build(config: &AgentConfig, model: &Model) -> Result<FallbackPlan, FallbackError> {
        let inv = &model.inventory;
        // zone → its local interfaces
        let mut local: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for v in &config.vnics {
            let (_, nic) = inv
                .vnic(&v.name)
                .ok_or_else(|| FallbackError::Plan(format!("vnic {} is not in the inventory", v.name)))?;
            // A vhost-user vNIC has no kernel device to bridge: while the
            // agent is gone its guest's rings go unserved, so it fails closed
            // whatever its zone says (said in the module doc).
            let Some(interface) = &v.interface else { continue };
            local.entry(nic.zone.as_str()).or_default().push(interface.clone());
        }
        for a in &config.appliances {
            local.entry(a.zone.as_str()).or_default().push(a.interface.clone());
        }
        let flood: Vec<Ipv4Addr> = config
            .underlay
            .peers
            .values()
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut open = Vec::new();
        let mut closed = Vec::new();
        for (zone, interfaces) in local {
            let z = inv
                .zone(zone)
                .ok_or_else(|| FallbackError::Plan(format!("zone {zone} is not in the inventory")))?;
            match z.on_failure {
                OnFailure::Closed => closed.push(ClosedZone {
                    zone: zone.to_string(),
                    interfaces,
                }),
                OnFailure::Open => {
                    let seg = palisade_datapath::port::zone_segment(z.segment);
                    let vni = palisade_datapath::port::segment_vni(seg)
                        .ok_or_else(|| FallbackError::Plan(format!("zone {zone} has no VNI")))?;
                    let mut remote = BTreeMap::new();
                    for vm in &inv.vms {
                        let Some(h) = vm.host.as_deref() else { continue };
                        if h == config.host {
                            continue;
                        }
                        let Some(vtep) = config.underlay.peers.get(h) else {
                            continue;
                        };
                        for nic in vm.vnics.iter().filter(|n| n.zone == zone) {
                            remote.insert(nic.mac.to_ascii_lowercase(), *vtep);
                        }
                    }
                    open.push(OpenZone {
                        zone: zone.to_string(),
                        vni,
                        interfaces,
                        remote,
                        flood: flood.clone(),
                    });
                }
            }
        }
        let plan = FallbackPlan {
            version: PLAN_VERSION,
            host: config.host.clone(),
            underlay: config.underlay.local,
            port: config.underlay.port,
            open,
            closed,
        };
        plan.check().map_err(FallbackError::Plan)?;
        Ok(plan)
    }

    /// Check everything a command is made from: the version, every
    /// interface name ([`safe_interface_name`], each in one zone only), the
    /// VNIs (1 to 2^24-1, one zone each), the MACs (unicast) and the sizes.
    pub fn check(&self) -> Result<(), String> {
        if self.version != PLAN_VERSION {
            return Err(format!("version {} (this agent writes {PLAN_VERSION})", self.version));
        }
        if self.open.len() + self.closed.len() > MAX_ZONES {
            return Err(format!("more than {MAX_ZONES} zones"));
        }
        if self.port == 0 {
            return Err("port 0".into());
        }
        let mut seen = BTreeSet::new();
        let mut vnis = BTreeSet::new();
        let zones = self
            .open
            .iter()
            .map(|z| (&z.zone, &z.interfaces))
            .chain(self.closed.iter().map(|z| (&z.zone, &z.interfaces)));
        for (zone, interfaces) in zones {
            if zone.is_empty() || zone.len() > 128 || zone.chars().any(char::is_control) {
                return Err(format!("zone name {zone:?}: 1 to 128 printable characters"));
            }
            for i in interfaces {
                if !safe_interface_name(i) {
                    return Err(format!(
                        "zone {zone}: interface {i:?} is not a name the fallback uses (1-15 of A-Z a-z 0-9 _ . -)"
                    ));
                }
                if !seen.insert(i.as_str()) {
                    return Err(format!("zone {zone}: interface {i} is listed twice"));
                }
            }
        }
        for z in &self.open {
            if !(1..=MAX_VNI).contains(&z.vni) {
                return Err(format!(
                    "zone {}: VNI {} is out of range (1 to {MAX_VNI})",
                    z.zone, z.vni
                ));
            }
            if !vnis.insert(z.vni) {
                return Err(format!("zone {}: VNI {} belongs to another open zone", z.zone, z.vni));
            }
            if z.remote.len() > MAX_REMOTE_MACS {
                return Err(format!("zone {}: more than {MAX_REMOTE_MACS} remote MACs", z.zone));
            }
            for mac in z.remote.keys() {
                match mac.parse::<EthernetAddress>() {
                    Ok(m) if m.is_unicast() && mac.len() == 17 => {}
                    _ => return Err(format!("zone {}: remote MAC {mac:?} is not a unicast MAC", z.zone)),
                }
            }
        }
        Ok(())
    }

    /// Write the plan to `state_dir` (atomically: a reader sees the old or the new one whole).
    /// A plan already there byte for byte is left as it is: every start
    /// saves its plan, and the write's sync is a start's slowest step on a
    /// busy disk, for a file that an unchanged policy leaves the same.
    pub fn save(&self, state_dir: &Path) -> Result<(), FallbackError> {
        let path = state_dir.join(PLAN_FILE);
        let tmp = state_dir.join(format!("{PLAN_FILE}.tmp"));
        let text = serde_json::to_vec_pretty(self).map_err(|e| FallbackError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if let Ok(Some(there)) = read_regular(&path, MAX_PLAN_BYTES)
            && there == text
        {
            return Ok(());
        }
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(io_error(&path))
    }

    /// Read and check the plan in `state_dir` (`None`: there is none).
    pub fn load(state_dir: &Path) -> Result<Option<FallbackPlan>, FallbackError> {
        let path = state_dir.join(PLAN_FILE);
        let Some(bytes) = read_regular(&path, MAX_PLAN_BYTES)? else {
            return Ok(None);
        };
        let invalid = |message: String| FallbackError::Invalid {
            path: path.clone(),
            message,
        };
        let plan: FallbackPlan = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        plan.check().map_err(invalid)?;
        Ok(Some(plan))
    }

    /// The open zones' names.
    pub fn open_zones(&self) -> Vec<String> {
        self.open.iter().map(|z| z.zone.clone()).collect()
    }
}

/// Read `path` if it exists: a regular file of at most `max` bytes.
fn read_regular(path: &Path, max: u64) -> Result<Option<Vec<u8>>, FallbackError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(path)(e)),
    };
    let invalid = |message: String| FallbackError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    if !meta.is_file() {
        return Err(invalid("not a regular file".into()));
    }
    if meta.len() > max {
        return Err(invalid(format!("{} bytes, more than the {max} allowed", meta.len())));
    }
    std::fs::read(path).map(Some).map_err(io_error(path))
}

/// The devices a host has now, as far as the fallback cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Devices {
    /// Every interface name → its master's name, if any.
    pub masters: BTreeMap<String, Option<String>>,
    /// Every interface's MTU.
    pub mtus: BTreeMap<String, u32>,
    /// The fallback's bridges that exist (prefix and kind checked).
    pub bridges: BTreeSet<String>,
    /// The fallback's VXLAN devices that exist (prefix and kind checked).
    pub vxlans: BTreeSet<String>,
}

impl Devices {
    /// Read them from `/sys/class/net` (of this network namespace).
    pub fn read() -> Devices {
        let mut d = Devices::default();
        let Ok(entries) = std::fs::read_dir("/sys/class/net") else {
            return d;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let dir = e.path();
            let master = std::fs::read_link(dir.join("master"))
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
            if let Some(mtu) = std::fs::read_to_string(dir.join("mtu"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                d.mtus.insert(name.clone(), mtu);
            }
            if name.starts_with(BRIDGE_PREFIX) && dir.join("bridge").is_dir() {
                d.bridges.insert(name.clone());
            }
            if name.starts_with(VXLAN_PREFIX)
                && std::fs::read_to_string(dir.join("uevent")).is_ok_and(|u| u.lines().any(|l| l == "DEVTYPE=vxlan"))
            {
                d.vxlans.insert(name.clone());
            }
            d.masters.insert(name, master);
        }
        d
    }

    fn ours(&self, name: &str) -> bool {
        self.bridges.contains(name) || self.vxlans.contains(name)
    }
}

/// The commands that arm a plan on a host with `devices`, in three
/// batches run in order: devices made and brought up (`ip`), the VXLAN
/// devices' FDB (`bridge`), then the vNIC ends attached (`ip`) — last, so
/// nothing forwards before the zone's way out exists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArmCommands {
    /// `ip -batch` lines: stale devices removed, devices made, brought up.
    pub setup: Vec<String>,
    /// `bridge -batch` lines: the static FDB.
    pub fdb: Vec<String>,
    /// `ip -batch` lines: interfaces attached to (or, closed, detached from) the bridges.
    pub attach: Vec<String>,
    /// Interfaces of the plan that do not exist now (left out, said).
    pub missing: Vec<String>,
    /// Interfaces attached to a bridge that is not the fallback's (left alone, said).
    pub foreign: Vec<String>,
}

/// The commands to arm `plan` on a host whose devices are `devices`.
/// Idempotent: devices that exist are kept, FDB entries are replaced, an
/// interface already in its bridge is set again (a no-op).
pub fn arm_commands(plan: &FallbackPlan, devices: &Devices) -> ArmCommands {
    let mut c = ArmCommands::default();
    let wanted: BTreeSet<String> = plan
        .open
        .iter()
        .flat_map(|z| [bridge_name(z.vni), vxlan_name(z.vni)])
        .collect();
    // Devices of an older plan (a zone since closed or renumbered): removed first.
    for name in devices.vxlans.iter().chain(&devices.bridges) {
        if !wanted.contains(name) {
            c.setup.push(format!("link del dev {name}"));
        }
    }
    for z in &plan.closed {
        for i in &z.interfaces {
            if let Some(Some(m)) = devices.masters.get(i)
                && devices.ours(m)
                && wanted.contains(m)
            {
                c.attach.push(format!("link set dev {i} nomaster"));
            }
        }
    }
    for z in &plan.open {
        let (br, vx) = (bridge_name(z.vni), vxlan_name(z.vni));
        let present: Vec<&String> = z
            .interfaces
            .iter()
            .filter(|i| devices.masters.contains_key(*i))
            .collect();
        c.missing.extend(
            z.interfaces
                .iter()
                .filter(|i| !devices.masters.contains_key(*i))
                .cloned(),
        );
        // The frames the vNICs send must fit the tunnel device: as large as the largest of them.
        let mtu = present
            .iter()
            .filter_map(|i| devices.mtus.get(*i))
            .copied()
            .max()
            .unwrap_or(1500);
        if !devices.bridges.contains(&br) {
            c.setup.push(format!("link add name {br} type bridge stp_state 0"));
            // No IPv6 address, hence no link-local chatter of our own into the zone.
            c.setup.push(format!("link set dev {br} addrgenmode none"));
        }
        if !devices.vxlans.contains(&vx) {
            c.setup.push(format!(
                "link add name {vx} type vxlan id {} dstport {} local {} nolearning gbp",
                z.vni, plan.port, plan.underlay
            ));
            c.setup.push(format!("link set dev {vx} addrgenmode none"));
        }
        c.setup.push(format!("link set dev {vx} mtu {mtu}"));
        c.setup.push(format!("link set dev {vx} master {br}"));
        c.setup.push(format!("link set dev {vx} up"));
        c.setup.push(format!("link set dev {br} up"));
        for peer in &z.flood {
            c.fdb.push(format!(
                "fdb append 00:00:00:00:00:00 dev {vx} dst {peer} self permanent"
            ));
        }
        for (mac, vtep) in &z.remote {
            c.fdb
                .push(format!("fdb replace {mac} dev {vx} dst {vtep} self permanent"));
        }
        for i in present {
            match devices.masters.get(i) {
                Some(Some(m)) if m != &br && !devices.ours(m) => {
                    c.foreign.push(format!("{i} (in {m})"));
                    continue;
                }
                _ => {}
            }
            c.attach.push(format!("link set dev {i} master {br}"));
            c.attach.push(format!("link set dev {i} up"));
        }
    }
    c
}

/// The commands that remove every fallback device on a host with `devices`
/// (VXLAN devices first; removing a bridge releases its ports).
pub fn disarm_commands(devices: &Devices) -> Vec<String> {
    devices
        .vxlans
        .iter()
        .chain(&devices.bridges)
        .map(|n| format!("link del dev {n}"))
        .collect()
}

/// Run `tool -batch -` on `lines` (nothing when empty).
fn batch(tool: &'static str, lines: &[String]) -> Result<(), FallbackError> {
    if lines.is_empty() {
        return Ok(());
    }
    let fail = |message: String| FallbackError::Command { tool, message };
    let mut child = Command::new(tool)
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot start: {e}")))?;
    let mut text = lines.join("\n");
    text.push('\n');
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| fail(format!("writing its commands: {e}")))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The state directory's lock (`agent.lock`), held: by the agent for its
/// life, by arm while it arms. Released when dropped or when the process
/// dies, however it dies.
#[derive(Debug)]
pub struct StateLock {
    file: File,
}

impl Drop for StateLock {
    /// Unlock before the descriptor closes: an `flock` lock belongs to the
    /// open file description, which a child that another thread is forking
    /// shares until its `exec` closes it (the descriptor is close-on-exec).
    /// Closing ours alone would leave the lock held for that moment, and a
    /// lock taken right after the drop would fail (seen once in the tests).
    fn drop(&mut self) {
        use std::os::fd::AsRawFd as _;
        // SAFETY: flock only reads the descriptor, which `self.file` keeps
        // open for the call; an error leaves the close below to release it.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Open (creating) the lock file of `state_dir`.
fn lock_file(state_dir: &Path) -> Result<File, FallbackError> {
    let path = state_dir.join(LOCK_FILE);
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_error(&path))
}

impl StateLock {
    /// Take the lock now, or `None` if someone holds it.
    pub fn try_take(state_dir: &Path) -> Result<Option<StateLock>, FallbackError> {
        use std::os::fd::AsRawFd as _;
        let file = lock_file(state_dir)?;
        // (`File::try_lock` is newer than the workspace's MSRV.)
        // SAFETY: flock only reads the descriptor, which `file` keeps open for the call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Some(StateLock { file }));
        }
        match std::io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
            e => Err(io_error(&state_dir.join(LOCK_FILE))(e)),
        }
    }

    /// Take the lock, waiting up to `wait` for whoever holds it (an arm in
    /// progress takes milliseconds; another agent on the same state
    /// directory holds it for good: an error naming the file).
    pub fn take(state_dir: &Path, wait: Duration) -> Result<StateLock, FallbackError> {
        let start = Instant::now();
        loop {
            if let Some(l) = StateLock::try_take(state_dir)? {
                return Ok(l);
            }
            if start.elapsed() >= wait {
                return Err(FallbackError::AgentRunning(state_dir.join(LOCK_FILE)));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// What an armed fallback left in the state directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArmedRecord {
    /// When it was armed (Unix nanoseconds).
    pub armed_at_ns: u64,
    /// The open zones it forwards.
    pub zones: Vec<String>,
    /// The interfaces it attached.
    pub interfaces: Vec<String>,
    /// How long arming took, microseconds.
    pub took_us: u64,
}

/// What [`arm`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArmReport {
    /// The record written (`None`: no plan, or no open zone: everything stays closed).
    pub armed: Option<ArmedRecord>,
    /// Interfaces of the plan that do not exist.
    pub missing: Vec<String>,
    /// Interfaces left alone because another bridge holds them.
    pub foreign: Vec<String>,
    /// Where the time went, microseconds from the call: the lock taken,
    /// the plan loaded and the devices read, the devices made (`ip`), the
    /// forwarding entries (`bridge`), the vNICs attached (`ip`): the last is
    /// when the open zones forward again.
    pub phases_us: ArmPhases,
}

/// [`ArmReport::phases_us`]: each phase's end, microseconds from the start of [`arm`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ArmPhases {
    /// The state directory's lock held.
    pub locked: u64,
    /// The plan loaded and the host's devices read.
    pub read: u64,
    /// The bridges and VXLAN devices made (`ip -batch`).
    pub devices: u64,
    /// Their forwarding entries written (`bridge -batch`).
    pub fdb: u64,
    /// The vNICs attached to the bridges (`ip -batch`): forwarding from here.
    pub attached: u64,
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Arm the plan in `state_dir`: refused while the agent runs; without a plan
/// (or without an open zone) nothing is built and every zone stays closed.
pub fn arm(state_dir: &Path) -> Result<ArmReport, FallbackError> {
    let started = Instant::now();
    // A moment's wait: `status` takes the lock briefly to see whether an
    // agent runs; an agent holds it for good.
    let _lock = StateLock::take(state_dir, Duration::from_millis(300))?;
    let us = || started.elapsed().as_micros() as u64;
    let mut phases = ArmPhases {
        locked: us(),
        ..ArmPhases::default()
    };
    let Some(plan) = FallbackPlan::load(state_dir)? else {
        return Ok(ArmReport {
            armed: None,
            missing: Vec::new(),
            foreign: Vec::new(),
            phases_us: phases,
        });
    };
    let devices = Devices::read();
    let cmds = arm_commands(&plan, &devices);
    phases.read = us();
    batch("ip", &cmds.setup)?;
    phases.devices = us();
    batch("bridge", &cmds.fdb)?;
    phases.fdb = us();
    batch("ip", &cmds.attach)?;
    phases.attached = us();
    let interfaces: Vec<String> = plan
        .open
        .iter()
        .flat_map(|z| z.interfaces.iter())
        .filter(|i| !cmds.missing.contains(i) && !cmds.foreign.iter().any(|f| f.starts_with(&format!("{i} "))))
        .cloned()
        .collect();
    let armed = (!plan.open.is_empty()).then(|| ArmedRecord {
        // Kept from an earlier arm of the same episode: fail-open began then.
        armed_at_ns: read_armed(state_dir)
            .ok()
            .flatten()
            .map_or_else(unix_ns, |r| r.armed_at_ns),
        zones: plan.open_zones(),
        interfaces,
        took_us: started.elapsed().as_micros() as u64,
    });
    if let Some(r) = &armed {
        let path = state_dir.join(ARMED_FILE);
        let text = serde_json::to_vec(r).map_err(|e| FallbackError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
        std::fs::write(&path, text).map_err(io_error(&path))?;
    }
    Ok(ArmReport {
        armed,
        missing: cmds.missing,
        foreign: cmds.foreign,
        phases_us: phases,
    })
}

/// The armed record in `state_dir`, if any.
pub fn read_armed(state_dir: &Path) -> Result<Option<ArmedRecord>, FallbackError> {
    let path = state_dir.join(ARMED_FILE);
    let Some(bytes) = read_regular(&path, 1 << 20)? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| FallbackError::Invalid {
            path,
            message: e.to_string(),
        })
}

/// A fail-open episode that ended: what was open, and for how long.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Episode {
    /// The zones that forwarded unfiltered.
    pub zones: Vec<String>,
    /// When the fallback was armed (Unix nanoseconds).
    pub armed_at_ns: u64,
    /// When it was removed (Unix nanoseconds).
    pub ended_at_ns: u64,
}

impl Episode {
    /// How long it lasted, milliseconds.
    pub fn active_ms(&self) -> u64 {
        self.ended_at_ns.saturating_sub(self.armed_at_ns) / 1_000_000
    }
}

/// What [`disarm`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DisarmReport {
    /// The devices removed.
    pub removed: Vec<String>,
    /// The episode that ended, if the fallback had been armed.
    pub episode: Option<Episode>,
}

/// Remove every fallback device of this network namespace and end the
/// episode recorded in `state_dir`. The caller holds the lock (the agent at
/// start) or is the operator. A record that does not parse is removed and
/// said, never trusted.
pub fn disarm(state_dir: &Path) -> Result<DisarmReport, FallbackError> {
    let devices = Devices::read();
    let cmds = disarm_commands(&devices);
    batch("ip", &cmds)?;
    let removed = devices.vxlans.iter().chain(&devices.bridges).cloned().collect();
    let record = read_armed(state_dir);
    let path = state_dir.join(ARMED_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(&path)(e)),
    }
    let episode = record?.map(|r| Episode {
        zones: r.zones,
        armed_at_ns: r.armed_at_ns,
        ended_at_ns: unix_ns(),
    });
    Ok(DisarmReport { removed, episode })
}

/// What `fallback status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    /// The plan's open zones (`None`: no plan: every zone fails closed).
    pub open_zones: Option<Vec<String>>,
    /// The plan's closed zones.
    pub closed_zones: Vec<String>,
    /// Whether the agent runs (holds the lock).
    pub agent_running: bool,
    /// The armed record, if armed.
    pub armed: Option<ArmedRecord>,
    /// The fallback devices present, each with the interfaces attached to it.
    pub devices: BTreeMap<String, Vec<String>>,
}

/// The fallback's state for `state_dir` and this network namespace.
pub fn status(state_dir: &Path) -> Result<Status, FallbackError> {
    let plan = FallbackPlan::load(state_dir)?;
    let agent_running = StateLock::try_take(state_dir)?.is_none();
    let devices = Devices::read();
    let mut present: BTreeMap<String, Vec<String>> = devices
        .bridges
        .iter()
        .chain(&devices.vxlans)
        .map(|n| (n.clone(), Vec::new()))
        .collect();
    for (i, m) in &devices.masters {
        if let Some(m) = m
            && let Some(ports) = present.get_mut(m)
        {
            ports.push(i.clone());
        }
    }
    Ok(Status {
        open_zones: plan.as_ref().map(FallbackPlan::open_zones),
        closed_zones: plan.map_or_else(Vec::new, |p| p.closed.into_iter().map(|z| z.zone).collect()),
        agent_running,
        armed: read_armed(state_dir)?,
        devices: present,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> FallbackPlan {
        FallbackPlan {
            version: PLAN_VERSION,
            host: "hv1".into(),
            underlay: "192.168.100.1".parse().unwrap(),
            port: 4789,
            open: vec![OpenZone {
                zone: "web".into(),
                vni: 100,
                interfaces: vec!["vn-web-1".into(), "vn-web-2".into()],
                remote: BTreeMap::from([("02:00:00:00:00:0c".into(), "192.168.100.2".parse().unwrap())]),
                flood: vec!["192.168.100.2".parse().unwrap()],
            }],
            closed: vec![ClosedZone {
                zone: "db".into(),
                interfaces: vec!["vn-db-1".into()],
            }],
        }
    }

    fn devices(present: &[(&str, Option<&str>)]) -> Devices {
        let mut d = Devices::default();
        for (n, m) in present {
            d.masters.insert(n.to_string(), m.map(str::to_string));
            d.mtus.insert(n.to_string(), 1500);
            if n.starts_with(BRIDGE_PREFIX) {
                d.bridges.insert(n.to_string());
            }
            if n.starts_with(VXLAN_PREFIX) {
                d.vxlans.insert(n.to_string());
            }
        }
        d
    }

    #[test]
    fn arm_builds_bridge_and_tunnel_then_attaches_open_vnics_only() {
        let d = devices(&[("vn-web-1", None), ("vn-web-2", None), ("vn-db-1", None)]);
        let c = arm_commands(&plan(), &d);
        assert_eq!(
            c.setup,
            [
                "link add name palfb100 type bridge stp_state 0",
                "link set dev palfb100 addrgenmode none",
                "link add name palfx100 type vxlan id 100 dstport 4789 local 192.168.100.1 nolearning gbp",
                "link set dev palfx100 addrgenmode none",
                "link set dev palfx100 mtu 1500",
                "link set dev palfx100 master palfb100",
                "link set dev palfx100 up",
                "link set dev palfb100 up",
            ]
        );
        assert_eq!(
            c.fdb,
            [
                "fdb append 00:00:00:00:00:00 dev palfx100 dst 192.168.100.2 self permanent",
                "fdb replace 02:00:00:00:00:0c dev palfx100 dst 192.168.100.2 self permanent",
            ]
        );
        assert_eq!(
            c.attach,
            [
                "link set dev vn-web-1 master palfb100",
                "link set dev vn-web-1 up",
                "link set dev vn-web-2 master palfb100",
                "link set dev vn-web-2 up",
            ]
        );
        // The closed zone's vNIC is named nowhere.
        assert!(
            !c.setup
                .iter()
                .chain(&c.fdb)
                .chain(&c.attach)
                .any(|l| l.contains("vn-db-1"))
        );
        assert!(c.missing.is_empty() && c.foreign.is_empty());
    }

    #[test]
    fn arming_again_keeps_what_exists_and_detaches_a_zone_turned_closed() {
        let d = devices(&[
            ("palfb100", None),
            ("palfx100", Some("palfb100")),
            ("palfb7", None),
            ("vn-web-1", Some("palfb100")),
            ("vn-db-1", Some("palfb100")),
            ("vn-web-2", Some("br-user")),
        ]);
        let c = arm_commands(&plan(), &d);
        assert!(!c.setup.iter().any(|l| l.starts_with("link add")), "{:?}", c.setup);
        assert_eq!(c.setup[0], "link del dev palfb7", "a device of an older plan goes");
        assert!(c.attach.contains(&"link set dev vn-db-1 nomaster".to_string()));
        assert!(c.attach.contains(&"link set dev vn-web-1 master palfb100".to_string()));
        assert_eq!(
            c.foreign,
            ["vn-web-2 (in br-user)"],
            "another bridge's port is left alone"
        );
        assert!(!c.attach.iter().any(|l| l.contains("vn-web-2")));
    }

    #[test]
    fn missing_interfaces_are_left_out_and_said() {
        let c = arm_commands(&plan(), &devices(&[("vn-web-1", None)]));
        assert_eq!(c.missing, ["vn-web-2"]);
        assert!(!c.attach.iter().any(|l| l.contains("vn-web-2")));
    }

    #[test]
    fn disarm_removes_only_prefixed_devices_of_the_right_kind() {
        let mut d = devices(&[
            ("palfb100", None),
            ("palfx100", Some("palfb100")),
            ("vn-web-1", Some("palfb100")),
        ]);
        // A device with our prefix but not a bridge (say, a user's veth) is not ours.
        d.masters.insert("palfb9".into(), None);
        assert_eq!(disarm_commands(&d), ["link del dev palfx100", "link del dev palfb100"]);
        assert!(disarm_commands(&Devices::default()).is_empty());
    }

    #[test]
    fn plans_with_unsafe_names_or_values_are_refused() {
        type Change = Box<dyn Fn(&mut FallbackPlan)>;
        let cases: Vec<(&str, Change)> = vec![
            (
                "newline",
                Box::new(|p| p.open[0].interfaces[0] = "a\nlink del dev eth0".into()),
            ),
            ("space", Box::new(|p| p.open[0].interfaces[0] = "a b".into())),
            ("dash", Box::new(|p| p.open[0].interfaces[0] = "-force".into())),
            ("long", Box::new(|p| p.open[0].interfaces[0] = "x".repeat(16))),
            ("empty", Box::new(|p| p.closed[0].interfaces[0] = String::new())),
            ("twice", Box::new(|p| p.closed[0].interfaces[0] = "vn-web-1".into())),
            ("vni 0", Box::new(|p| p.open[0].vni = 0)),
            ("vni big", Box::new(|p| p.open[0].vni = 1 << 24)),
            (
                "mac",
                Box::new(|p| {
                    p.open[0].remote.insert("01:00:5e:00:00:01".into(), Ipv4Addr::LOCALHOST);
                }),
            ),
            (
                "mac text",
                Box::new(|p| {
                    p.open[0]
                        .remote
                        .insert("02:00:00:00:00:01 dev eth0".into(), Ipv4Addr::LOCALHOST);
                }),
            ),
            ("version", Box::new(|p| p.version = 2)),
            ("port", Box::new(|p| p.port = 0)),
        ];
        assert!(plan().check().is_ok());
        for (what, change) in cases {
            let mut p = plan();
            change(&mut p);
            assert!(p.check().is_err(), "{what} accepted");
        }
    }

    #[test]
    fn plan_files_round_trip_and_bad_ones_are_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        assert!(FallbackPlan::load(dir.path()).unwrap().is_none());
        plan().save(dir.path()).unwrap();
        assert_eq!(FallbackPlan::load(dir.path()).unwrap(), Some(plan()));
        let path = dir.path().join(PLAN_FILE);
        for bad in [&b"{"[..], br#"{"version":1}"#, b"\xff\xfe"] {
            std::fs::write(&path, bad).unwrap();
            let e = FallbackPlan::load(dir.path()).unwrap_err().to_string();
            assert!(e.contains(PLAN_FILE), "{e}");
        }
        let mut p = plan();
        p.open[0].interfaces[0] = "a;b".into();
        std::fs::write(&path, serde_json::to_vec(&p).unwrap()).unwrap();
        assert!(FallbackPlan::load(dir.path()).is_err());
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(
            FallbackPlan::load(dir.path())
                .unwrap_err()
                .to_string()
                .contains("regular")
        );
    }

    #[test]
    fn an_unchanged_plan_is_not_rewritten_and_a_changed_one_is() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PLAN_FILE);
        plan().save(dir.path()).unwrap();
        let inode = || std::fs::metadata(&path).unwrap().ino();
        let first = inode();
        plan().save(dir.path()).unwrap();
        assert_eq!(inode(), first, "the same plan is left in place");
        let mut p = plan();
        p.open[0].interfaces.push("vn-web-3".into());
        p.save(dir.path()).unwrap();
        assert_ne!(inode(), first, "a changed plan replaces the file");
        assert_eq!(FallbackPlan::load(dir.path()).unwrap(), Some(p));
        // A damaged file is replaced, not taken for the plan.
        std::fs::write(&path, b"{").unwrap();
        plan().save(dir.path()).unwrap();
        assert_eq!(FallbackPlan::load(dir.path()).unwrap(), Some(plan()));
    }

    #[test]
    fn arm_is_refused_while_the_lock_is_held() {
        let dir = tempfile::tempdir().unwrap();
        plan().save(dir.path()).unwrap();
        let held = StateLock::try_take(dir.path()).unwrap().unwrap();
        assert!(StateLock::try_take(dir.path()).unwrap().is_none());
        assert!(matches!(arm(dir.path()), Err(FallbackError::AgentRunning(_))));
        drop(held);
        assert!(StateLock::try_take(dir.path()).unwrap().is_some());
    }

    #[test]
    fn a_dropped_lock_is_free_while_a_forked_child_still_holds_its_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let held = StateLock::try_take(dir.path()).unwrap().unwrap();
        // A child forked with the lock's descriptor open, as one another
        // thread spawns between its fork and its exec: it only sleeps.
        // SAFETY: the child calls only async-signal-safe functions.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork: {}", std::io::Error::last_os_error());
        if child == 0 {
            // SAFETY: as above.
            unsafe {
                libc::usleep(400_000);
                libc::_exit(0);
            }
        }
        drop(held);
        let free = StateLock::try_take(dir.path()).unwrap().is_some();
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        unsafe { libc::waitpid(child, &mut status, 0) };
        assert!(free, "the lock stayed held by the child's copy of the descriptor");
    }

    #[test]
    fn plan_from_the_three_tier_example() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/three-tier");
        let loaded = palisade_policy::load(&palisade_policy::DirSource::new(&dir)).unwrap();
        let model = &loaded.model;
        let web1 = model.inventory.vnic("web-1.0").unwrap();
        let db1 = model.inventory.vnic("db-1.0").unwrap();
        let host = web1.0.host.clone().unwrap();
        // A peer for every other host of the inventory.
        let mut peers = String::new();
        let others: BTreeSet<&str> = model
            .inventory
            .vms
            .iter()
            .filter_map(|v| v.host.as_deref())
            .filter(|h| *h != host)
            .collect();
        for (i, h) in others.iter().enumerate() {
            peers.push_str(&format!("\"{h}\" = \"192.168.100.{}\", ", i + 2));
        }
        let toml = format!(
            "host = \"{host}\"\nstate_dir = \"/tmp/x\"\npolicy = \"/tmp/p\"\n[underlay]\nlocal = \"192.168.100.1\"\npeers = {{ {} }}\n\
             [[vnic]]\nname = \"web-1.0\"\ninterface = \"vn-web-1\"\n[[vnic]]\nname = \"db-1.0\"\ninterface = \"vn-db-1\"\n",
            peers.trim_end_matches([',', ' '])
        );
        let config = AgentConfig::parse(&toml, Path::new("agent.toml")).unwrap();
        let p = FallbackPlan::build(&config, model).unwrap();
        assert_eq!(p.open_zones(), ["web"]);
        assert_eq!(p.open[0].interfaces, ["vn-web-1"]);
        assert_eq!(p.closed.len(), 1);
        assert_eq!(p.closed[0].zone, db1.1.zone);
        // Every web vNIC on another host, and none of this host's or another zone's.
        let expected: BTreeSet<String> = model
            .inventory
            .vms
            .iter()
            .filter(|v| v.host.as_deref() != Some(host.as_str()))
            .flat_map(|v| v.vnics.iter().filter(|n| n.zone == "web").map(|n| n.mac.clone()))
            .collect();
        assert_eq!(p.open[0].remote.keys().cloned().collect::<BTreeSet<_>>(), expected);
        assert!(!expected.is_empty());
        assert_eq!(p.open[0].flood.len(), others.len());

        // The same web vNIC on vhost-user: no kernel device to bridge, so its
        // open zone has nothing to arm (it fails closed), and the rest stays.
        let vhost = toml.replace(
            "interface = \"vn-web-1\"",
            "vhost_user = \"/run/palisade/vhost/web-1.sock\"",
        );
        assert_ne!(vhost, toml);
        let config = AgentConfig::parse(&vhost, Path::new("agent.toml")).unwrap();
        let p = FallbackPlan::build(&config, model).unwrap();
        assert!(p.open.is_empty(), "{p:?}");
        assert_eq!(p.closed.len(), 1);
        assert_eq!(p.closed[0].interfaces, ["vn-db-1"]);
    }
}
