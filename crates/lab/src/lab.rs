//! Building, using and removing a lab.
//!
//! [`Lab::up`] turns a [`Plan`] into namespaces, veths, taps, QEMU guests and
//! agents, writing a state file as it goes; [`Lab::down`] removes everything
//! with the lab's prefix, from the state file when there is one and by
//! scanning namespaces and their processes when there is not (a crash), so a
//! lab never outlives its `down`.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub mod appliance;
mod migrate;
pub use migrate::{Incoming, MigrateOptions, MigrationReport, agent_post};

use crate::plan::{EDGE_INTERNET_IP, INTERNET_IP, Plan, QemuMode, QemuNic, VmPlan};
use crate::{LabError, config, dns, qemu, sys};

/// How long `up` waits for each agent's `agent ready`.
pub const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `up` waits for a QEMU guest to boot (TCG is slow on a busy machine).
pub const GUEST_BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// Grace period between SIGTERM and SIGKILL in `down`.
pub const TERM_GRACE: Duration = Duration::from_secs(5);
/// The state file's name inside the state directory.
pub const STATE_FILE: &str = "lab.json";

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabSpec {
    /// Lab name: the prefix of every namespace (`pal`).
    pub name: String,
    /// Policy directory whose inventory describes the datacenter.
    pub policy_dir: PathBuf,
    /// Which VMs are QEMU guests.
    pub qemu: QemuMode,
    /// How the QEMU guests' NICs reach the agent (vhost-user unless asked otherwise).
    pub qemu_nic: QemuNic,
    /// Where the state file, agent configurations and logs go.
    pub state_dir: PathBuf,
    /// The `palisade` binary to start agents with (`None`: no agents).
    pub agent_exe: Option<PathBuf>,
    /// Run a controller (embedded store) in the underlay namespace and have
    /// the agents take their policy from it (needs `agent_exe`, the
    /// `palisade` binary).
    pub controller: bool,
    /// Memory of each QEMU guest.
    pub vm_mem_mib: u32,
    /// Leave the namespace VMs' NIC offloads as the kernel sets them (TX
    /// checksum offload and TSO on, as real virtio-net guests run) instead of
    /// turning TX checksum offload (and with it TSO) off. Off by default:
    /// the agent's engine handles offloaded traffic only through its ports'
    /// software segmentation so far.
    pub vm_offloads: bool,
    /// Run each agent under `palisade agent supervise`, which arms the
    /// fail-open fallback of the `open` zones when the agent dies and
    /// restarts it. The state's agent pid is then the supervisor's (the
    /// agent's own is in `<state_dir>/<host>/agent.pid`).
    pub supervise: bool,
    /// `(vm, host)`: pre-stage the QEMU guest `vm`'s vNICs on `host` too, so
    /// it can live-migrate there ([`Plan::add_standby`], [`Lab::migrate`]).
    pub standby: Vec<(String, String)>,
    /// Each agent's connection-table capacity (shared out between its
    /// workers; `None`: the agent's default, 32,768).
    pub conn_capacity: Option<usize>,
    /// A rules file for the agents' inline inspection (their `[inspect]`
    /// section); `None`: the agents inspect nothing.
    pub inspect_rules: Option<PathBuf>,
}

/// The default state directory of lab `name`.
/// The controller's address on the underlay bridge (when the lab runs one).
pub const CONTROLLER_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 168, 100, 254);
/// The controller's HTTPS port.
pub const CONTROLLER_PORT: u16 = 7443;
/// MTU of the underlay links: a 1500-byte frame plus VXLAN's 50 bytes fits.
const UNDERLAY_MTU: &str = "1600";

/// The state directory of lab `name` unless one is given.
pub fn default_state_dir(name: &str) -> PathBuf {
    PathBuf::from(format!("/run/palisade/lab-{name}"))
}

impl LabSpec {
    /// A lab named `pal` from the inventory in `policy_dir`, namespace VMs, no agents.
    pub fn from_inventory(policy_dir: impl Into<PathBuf>) -> LabSpec {
        LabSpec {
            name: "pal".into(),
            policy_dir: policy_dir.into(),
            qemu: QemuMode::None,
            qemu_nic: QemuNic::VhostUser,
            state_dir: default_state_dir("pal"),
            agent_exe: None,
            controller: false,
            vm_mem_mib: 256,
            vm_offloads: false,
            supervise: false,
            standby: Vec::new(),
            conn_capacity: None,
            inspect_rules: None,
        }
    }

    /// Rename the lab; the state directory follows if it was the default one.
    pub fn with_name(mut self, name: &str) -> LabSpec {
        if self.state_dir == default_state_dir(&self.name) {
            self.state_dir = default_state_dir(name);
        }
        self.name = name.to_string();
        self
    }

    /// A generated lab (see [`config::generated_yaml`]): writes the inventory
    /// and policy to `state_dir/policy`, checks that they load, and points
    /// `policy_dir` there.
    pub fn generated(hosts: usize, vms_per_host: usize, state_dir: impl Into<PathBuf>) -> Result<LabSpec, LabError> {
        LabSpec::generated_with(hosts, vms_per_host, state_dir, &[])
    }

    /// [`LabSpec::generated`], the zones in `open_zones` failing open
    /// ([`config::generated_yaml_with`]).
    pub fn generated_with(
        hosts: usize,
        vms_per_host: usize,
        state_dir: impl Into<PathBuf>,
        open_zones: &[&str],
    ) -> Result<LabSpec, LabError> {
        let state_dir = state_dir.into();
        let (inv, pol) = config::generated_yaml_with(hosts, vms_per_host, open_zones).map_err(LabError::Invalid)?;
        let dir = state_dir.join("policy");
        std::fs::create_dir_all(&dir).map_err(LabError::io(format!("creating {}", dir.display())))?;
        for (f, text) in [("inventory.yaml", &inv), ("policy.yaml", &pol)] {
            let p = dir.join(f);
            std::fs::write(&p, text).map_err(LabError::io(format!("writing {}", p.display())))?;
        }
        load_inventory(&dir)?;
        Ok(LabSpec {
            policy_dir: dir,
            state_dir,
            ..LabSpec::from_inventory("")
        })
    }
}

/// Load a policy directory and return its inventory, or the diagnostics.
pub fn load_inventory(dir: &Path) -> Result<palisade_policy::model::Inventory, LabError> {
    let loaded = palisade_policy::load(&palisade_policy::DirSource::new(dir)).map_err(|e| LabError::Policy {
        dir: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    if loaded.has_errors() {
        return Err(LabError::Policy {
            dir: dir.to_path_buf(),
            message: loaded.render(),
        });
    }
    Ok(loaded.model.inventory)
}

/// A running agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentProc {
    /// Its pid.
    pub pid: i32,
    /// Its log (stdout and stderr).
    pub log: PathBuf,
}

/// A running QEMU guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuProc {
    /// QEMU's pid.
    pub pid: i32,
    /// Unix socket of the serial console.
    pub console: PathBuf,
    /// Unix socket of the QEMU monitor.
    pub monitor: PathBuf,
    /// Unix socket of QEMU's machine protocol ([`crate::qmp`]; live migration).
    /// Empty in a state file written before guests had one.
    #[serde(default)]
    pub qmp: PathBuf,
    /// QEMU's log.
    pub log: PathBuf,
    /// The accelerator arguments used.
    pub accel: Vec<String>,
    /// The host it runs on (empty in a state file from before migration:
    /// the plan's host).
    #[serde(default)]
    pub host: String,
    /// Its memory, MiB (0 in a state file from before migration).
    #[serde(default)]
    pub mem_mib: u32,
    /// How many times it migrated (names its sockets: a destination QEMU
    /// runs beside the source until the switchover).
    #[serde(default)]
    pub generation: u32,
}

/// What the state file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabState {
    /// The topology.
    pub plan: Plan,
    /// The policy directory (absolute).
    pub policy_dir: PathBuf,
    /// The state directory (absolute).
    pub state_dir: PathBuf,
    /// Agents by host.
    pub agents: BTreeMap<String, AgentProc>,
    /// QEMU guests by VM.
    pub guests: BTreeMap<String, QemuProc>,
    /// The controller, when the lab runs one.
    #[serde(default)]
    pub controller: Option<ControllerProc>,
}

/// A controller the lab started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerProc {
    /// Its pid.
    pub pid: i32,
    /// Its URL (on the underlay).
    pub url: String,
    /// The CA certificate its server certificate chains to.
    pub ca: PathBuf,
    /// The bootstrap admin token.
    pub token: String,
    /// Its log.
    pub log: PathBuf,
    /// The `palisade` binary (to run CLI commands against it).
    pub exe: PathBuf,
}

/// What [`Lab::down`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DownReport {
    /// Processes stopped: pid and command line.
    pub processes: Vec<(i32, String)>,
    /// Namespaces deleted.
    pub namespaces: Vec<String>,
    /// Links deleted from the root namespace (normally none: the lab creates
    /// every interface inside its namespaces).
    pub links: Vec<String>,
    /// Files removed.
    pub files: Vec<PathBuf>,
}

impl DownReport {
    /// Whether nothing had to be removed.
    pub fn is_empty(&self) -> bool {
        self.processes.is_empty() && self.namespaces.is_empty() && self.links.is_empty() && self.files.is_empty()
    }
}

impl fmt::Display for DownReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return writeln!(f, "nothing to remove");
        }
        for (pid, cmd) in &self.processes {
            writeln!(f, "stopped process {pid}: {cmd}")?;
        }
        for n in &self.namespaces {
            writeln!(f, "deleted namespace {n}")?;
        }
        for l in &self.links {
            writeln!(f, "deleted link {l}")?;
        }
        for p in &self.files {
            writeln!(f, "removed {}", p.display())?;
        }
        Ok(())
    }
}

/// One interface as `ip -j link` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IfStatus {
    /// Name.
    pub name: String,
    /// Operational state (`UP`, `DOWN`, `LOWERLAYERDOWN`, `UNKNOWN`).
    pub state: String,
    /// MAC address.
    pub mac: String,
}

/// A host's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostStatus {
    /// Host name.
    pub name: String,
    /// Its namespace.
    pub ns: String,
    /// Whether the namespace exists.
    pub present: bool,
    /// Agent pid, if one was started.
    pub agent_pid: Option<i32>,
    /// Whether that agent is alive.
    pub agent_alive: bool,
    /// Interfaces in the host namespace.
    pub interfaces: Vec<IfStatus>,
}

/// A VM's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmStatus {
    /// VM name.
    pub name: String,
    /// Host.
    pub host: String,
    /// `netns` or `qemu`.
    pub kind: &'static str,
    /// Namespace exists / QEMU process alive.
    pub alive: bool,
    /// QEMU pid.
    pub pid: Option<i32>,
    /// Addresses from the inventory.
    pub ips: Vec<IpAddr>,
}

/// The whole lab's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LabStatus {
    /// Lab name.
    pub name: String,
    /// Hosts.
    pub hosts: Vec<HostStatus>,
    /// VMs.
    pub vms: Vec<VmStatus>,
    /// Lab namespaces that exist (planned or not).
    pub namespaces: Vec<String>,
}

impl fmt::Display for LabStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "lab {}: {} namespaces", self.name, self.namespaces.len())?;
        for h in &self.hosts {
            let agent = match (h.agent_pid, h.agent_alive) {
                (None, _) => "no agent".to_string(),
                (Some(p), true) => format!("agent pid {p} running"),
                (Some(p), false) => format!("agent pid {p} NOT running"),
            };
            let ifs: Vec<String> = h
                .interfaces
                .iter()
                .map(|i| format!("{}({})", i.name, i.state))
                .collect();
            let present = if h.present { "" } else { " MISSING" };
            writeln!(f, "host {} [{}{present}] {agent}; {}", h.name, h.ns, ifs.join(" "))?;
        }
        for v in &self.vms {
            let ips: Vec<String> = v.ips.iter().map(ToString::to_string).collect();
            let alive = if v.alive { "up" } else { "DOWN" };
            writeln!(f, "vm {} on {} ({}) {alive} {}", v.name, v.host, v.kind, ips.join(" "))?;
        }
        Ok(())
    }
}

/// A process started with [`Lab::spawn`].
#[derive(Debug)]
pub enum Spawned {
    /// A process in a VM namespace (stdout and stderr piped).
    Process(Child),
    /// A background process inside a QEMU guest; its output goes to `log` in the guest.
    Guest {
        /// The VM.
        vm: String,
        /// Its pid inside the guest.
        pid: u32,
        /// Its output file inside the guest.
        log: String,
    },
}

/// A built lab.
#[derive(Debug)]
pub struct Lab {
    state: LabState,
    children: Vec<Child>,
    /// Open serial-console connections by VM (see [`qemu::console_exec`]).
    consoles: Mutex<BTreeMap<String, std::os::unix::net::UnixStream>>,
}

fn mkdir(p: &Path) -> Result<(), LabError> {
    std::fs::create_dir_all(p).map_err(LabError::io(format!("creating {}", p.display())))
}

fn absolute(p: &Path) -> Result<PathBuf, LabError> {
    std::path::absolute(p).map_err(LabError::io(format!("resolving {}", p.display())))
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn ipv4s(ips: &[IpAddr]) -> impl Iterator<Item = Ipv4Addr> + '_ {
    ips.iter().filter_map(|ip| match ip {
        IpAddr::V4(a) => Some(*a),
        IpAddr::V6(_) => None,
    })
}

/// `sysctl -w` keys in slash form (interface names may contain dots) inside `ns`.
fn sysctl(ns: &str, kv: &[String]) -> Result<(), LabError> {
    if kv.is_empty() {
        return Ok(());
    }
    let mut args = vec!["sysctl", "-q", "-w"];
    args.extend(kv.iter().map(String::as_str));
    sys::netns_exec(ns, &args).map(drop)
}

fn no_ipv6(ifname: &str) -> String {
    format!("net/ipv6/conf/{ifname}/disable_ipv6=1")
}

fn tx_off(ns: &str, ifname: &str) -> Result<(), LabError> {
    sys::netns_exec(ns, &["ethtool", "-K", ifname, "tx", "off"]).map(drop)
}

impl Lab {
    /// Build the lab `spec` describes. On error, everything made so far is removed.
    pub fn up(spec: &LabSpec) -> Result<Lab, LabError> {
        let inv = load_inventory(&spec.policy_dir)?;
        let mut plan = Plan::new(&spec.name, &inv, &spec.qemu)?;
        plan.qemu_nic = spec.qemu_nic;
        for (vm, host) in &spec.standby {
            plan.add_standby(vm, host)?;
        }
        if spec.agent_exe.is_none() && plan.vms.iter().any(|v| plan.on_vhost_user(v)) {
            // QEMU does not start a vhost-user guest until a backend answers on its socket.
            return Err(LabError::Invalid(
                "QEMU guests on vhost-user need the agents (their backend): start agents, or attach the guests \
                 through taps"
                    .into(),
            ));
        }
        for tool in ["ip", "ethtool", "sysctl"] {
            if !sys::have(tool) {
                return Err(LabError::Invalid(format!("`{tool}` is not installed")));
            }
        }
        let existing = leftovers(&spec.name)?;
        if !existing.is_empty() {
            return Err(LabError::Invalid(format!(
                "lab {} already exists ({}); run `palisade lab down --name {}` first",
                spec.name,
                existing.join(", "),
                spec.name
            )));
        }
        let state_dir = absolute(&spec.state_dir)?;
        // A new lab starts clean: an earlier lab's agent state (saved
        // connections, a controller policy revision, an audit trail), CA and
        // controller store would otherwise leak into this one. What the lab
        // makes is removed; anything else (the initramfs cache, a generated
        // policy, the caller's files) is left alone.
        let made = [
            "agents",
            "logs",
            "qemu",
            "vhost",
            "ca",
            "controller",
            "www",
            "dns.zone",
            STATE_FILE,
        ];
        let hosts = plan.hosts.iter().map(|h| h.name.as_str());
        for name in made.into_iter().chain(hosts) {
            let p = state_dir.join(name);
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else if p.exists() {
                std::fs::remove_file(&p)
            } else {
                Ok(())
            };
            r.map_err(LabError::io(format!("removing {}", p.display())))?;
        }
        for d in ["", "agents", "logs", "qemu", "vhost", "cache"] {
            mkdir(&state_dir.join(d))?;
        }
        let mut lab = Lab {
            state: LabState {
                plan,
                policy_dir: absolute(&spec.policy_dir)?,
                state_dir,
                agents: BTreeMap::new(),
                guests: BTreeMap::new(),
                controller: None,
            },
            children: Vec::new(),
            consoles: Mutex::new(BTreeMap::new()),
        };
        match lab.build(spec, &inv) {
            Ok(()) => Ok(lab),
            Err(e) => {
                let _ = lab.teardown();
                Err(e)
            }
        }
    }

    fn save(&self) -> Result<(), LabError> {
        let path = self.state.state_dir.join(STATE_FILE);
        let json = serde_json::to_vec_pretty(&self.state).map_err(|e| LabError::State {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, json).map_err(LabError::io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(LabError::io(format!("writing {}", path.display())))
    }

    fn build(&mut self, spec: &LabSpec, inv: &palisade_policy::model::Inventory) -> Result<(), LabError> {
        self.save()?;
        let plan = self.state.plan.clone();
        for ns in plan.namespaces() {
            sys::ip(&["netns", "add", &ns])?;
            sys::ip_n(&ns, &["link", "set", "lo", "up"])?;
        }
        // Underlay: one bridge, one veth per host.
        let u = &plan.underlay_ns;
        sys::ip_n(u, &["link", "add", "br0", "type", "bridge"])?;
        sys::ip_n(u, &["link", "set", "br0", "up"])?;
        for h in &plan.hosts {
            sys::ip_n(
                &h.ns,
                &[
                    "link",
                    "add",
                    "ul0",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &h.underlay_port,
                    "netns",
                    u,
                ],
            )?;
            // Room for VXLAN's 50 bytes around a 1500-byte frame: no fragmentation on the underlay.
            sys::ip_n(u, &["link", "set", &h.underlay_port, "mtu", UNDERLAY_MTU])?;
            sys::ip_n(u, &["link", "set", &h.underlay_port, "master", "br0", "up"])?;
            sys::ip_n(&h.ns, &["addr", "add", &format!("{}/24", h.underlay_ip), "dev", "ul0"])?;
            sys::ip_n(&h.ns, &["link", "set", "ul0", "mtu", UNDERLAY_MTU, "up"])?;
        }
        // Edge router and internet.
        let e = &plan.edge_ns;
        let i = &plan.internet_ns;
        sysctl(e, &["net/ipv4/ip_forward=1".to_string()])?;
        sys::ip_n(
            e,
            &[
                "link", "add", "inet0", "type", "veth", "peer", "name", "eth0", "netns", i,
            ],
        )?;
        sys::ip_n(e, &["addr", "add", &format!("{EDGE_INTERNET_IP}/24"), "dev", "inet0"])?;
        sys::ip_n(i, &["addr", "add", &format!("{INTERNET_IP}/24"), "dev", "eth0"])?;
        tx_off(e, "inet0")?;
        tx_off(i, "eth0")?;
        sys::ip_n(e, &["link", "set", "inet0", "up"])?;
        sys::ip_n(i, &["link", "set", "eth0", "up"])?;
        sys::ip_n(i, &["route", "add", "default", "via", &EDGE_INTERNET_IP.to_string()])?;
        let mut host_sysctl: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for z in &plan.zones {
            let hns = plan.host(&z.host).map(|h| h.ns.clone()).unwrap_or_default();
            sys::ip_n(
                e,
                &[
                    "link", "add", &z.edge_if, "type", "veth", "peer", "name", &z.host_if, "netns", &hns,
                ],
            )?;
            sys::ip_n(e, &["link", "set", &z.edge_if, "address", &z.mac])?;
            sys::ip_n(e, &["addr", "add", &format!("{}/24", z.gateway), "dev", &z.edge_if])?;
            tx_off(e, &z.edge_if)?;
            sys::ip_n(e, &["link", "set", &z.edge_if, "up"])?;
            host_sysctl.entry(hns).or_default().push(no_ipv6(&z.host_if));
        }
        // Namespace VMs: a veth per vNIC.
        for vm in plan.vms.iter().filter(|v| !v.qemu) {
            let Some(vns) = vm.ns.as_deref() else { continue };
            let hns = self.host_netns(&vm.host);
            for nic in &vm.vnics {
                sys::ip_n(
                    vns,
                    &[
                        "link",
                        "add",
                        &nic.guest_if,
                        "type",
                        "veth",
                        "peer",
                        "name",
                        &nic.host_if,
                        "netns",
                        &hns,
                    ],
                )?;
                sys::ip_n(vns, &["link", "set", &nic.guest_if, "address", &nic.mac])?;
                sysctl(vns, &[format!("net/ipv6/conf/{}/accept_dad=0", nic.guest_if)])?;
                for ip in &nic.ips {
                    let a = match ip {
                        IpAddr::V4(a) => format!("{a}/24"),
                        IpAddr::V6(a) => format!("{a}/64"),
                    };
                    let mut args = vec!["addr", "add", &a, "dev", &nic.guest_if];
                    if ip.is_ipv6() {
                        args.push("nodad");
                    }
                    sys::ip_n(vns, &args)?;
                }
                if !spec.vm_offloads {
                    tx_off(vns, &nic.guest_if)?;
                }
                sys::ip_n(vns, &["link", "set", &nic.guest_if, "up"])?;
                host_sysctl.entry(hns.clone()).or_default().push(no_ipv6(&nic.host_if));
            }
            if let Some(gw) = vm.gateway {
                sys::ip_n(vns, &["route", "add", "default", "via", &gw.to_string()])?;
            }
        }
        // QEMU guests on taps: a tap per guest in the host namespace, and
        // in those of the hosts it is pre-staged on (a guest on vhost-user
        // needs none: the agent makes its socket). The taps are persistent:
        // a QEMU that migrates away leaves its tap to the next.
        for vm in plan.vms.iter().filter(|v| v.qemu && !plan.on_vhost_user(v)) {
            for host in std::iter::once(&vm.host).chain(&vm.standby) {
                let hns = self.host_netns(host);
                for nic in &vm.vnics {
                    sys::ip_n(&hns, &["tuntap", "add", "mode", "tap", "name", &nic.host_if])?;
                    host_sysctl.entry(hns.clone()).or_default().push(no_ipv6(&nic.host_if));
                }
            }
        }
        // Host ends: no IPv6 (no link-local chatter for the agent), then up.
        for (hns, kv) in &host_sysctl {
            sysctl(hns, kv)?;
        }
        for z in &plan.zones {
            sys::ip_n(&self.host_netns(&z.host), &["link", "set", &z.host_if, "up"])?;
        }
        for vm in plan.vms.iter().filter(|v| !plan.on_vhost_user(v)) {
            for host in std::iter::once(&vm.host).chain(&vm.standby) {
                for nic in &vm.vnics {
                    sys::ip_n(&self.host_netns(host), &["link", "set", &nic.host_if, "up"])?;
                }
            }
        }
        // Files: DNS zone and agent configurations.
        let zone = self.state.state_dir.join("dns.zone");
        std::fs::write(&zone, dns::Records::from_inventory(inv).to_zone_file())
            .map_err(LabError::io(format!("writing {}", zone.display())))?;
        if spec.controller {
            let exe = spec
                .agent_exe
                .clone()
                .ok_or_else(|| LabError::Invalid("a lab with a controller needs the palisade binary".into()))?;
            self.start_controller(&exe)?;
        }
        for h in &plan.hosts {
            mkdir(&self.state.state_dir.join(&h.name))?;
            let mut text = config::agent_config(&plan, &h.name, &self.state.policy_dir, &self.state.state_dir)
                .ok_or_else(|| LabError::Unknown {
                    kind: "host",
                    name: h.name.clone(),
                })?;
            if let Some(c) = &self.state.controller {
                text = config::with_controller(&text, &c.url, &c.ca, &self.state.state_dir.join("ca"), &h.name);
                text.push_str(&config::migration_section(&self.state.state_dir, &h.name));
                text.push_str(&config::migration_channel(&plan, &h.name));
            }
            if let Some(n) = spec.conn_capacity {
                // A top-level key: before the first table.
                text = text.replacen("\n[", &format!("conn_capacity = {n}\n\n["), 1);
            }
            if let Some(rules) = &spec.inspect_rules {
                text.push_str(&config::inspect_section(rules));
            }
            let p = self.agent_config(&h.name);
            std::fs::write(&p, text).map_err(LabError::io(format!("writing {}", p.display())))?;
        }
        // Guests boot in parallel; then agents start. Guests on vhost-user
        // come after the agents: QEMU waits for its backend's socket.
        let guests: Vec<VmPlan> = plan.vms.iter().filter(|v| v.qemu).cloned().collect();
        let vhost_user = plan.qemu_nic == QemuNic::VhostUser;
        if !guests.is_empty() && !vhost_user {
            self.start_guests(&guests, spec.vm_mem_mib)?;
        }
        if let Some(exe) = &spec.agent_exe {
            self.start_agents(exe, spec.supervise)?;
        }
        if !guests.is_empty() && vhost_user {
            self.start_guests(&guests, spec.vm_mem_mib)?;
        }
        Ok(())
    }

    fn start_guests(&mut self, guests: &[VmPlan], mem: u32) -> Result<(), LabError> {
        let (kernel, kver) = qemu::find_kernel().ok_or_else(|| {
            LabError::Invalid("no /boot/vmlinuz-*-cloud-amd64 (install linux-image-cloud-amd64)".into())
        })?;
        if !sys::have("qemu-system-x86_64") {
            return Err(LabError::Invalid("qemu-system-x86_64 is not installed".into()));
        }
        let initrd = qemu::build_initramfs(&self.state.state_dir.join("cache"), &kver)?;
        let accel: Vec<String> = qemu::accel().iter().map(|s| s.to_string()).collect();
        for vm in guests {
            let g = self.spawn_guest(vm, &vm.host, 0, mem, None, (&kernel, &initrd, &accel))?;
            self.state.guests.insert(vm.name.clone(), g);
            self.save()?;
        }
        for vm in guests {
            let g = &self.state.guests[&vm.name];
            qemu::wait_ready(&vm.name, &g.console, g.pid, GUEST_BOOT_TIMEOUT).map_err(|e| LabError::Qemu {
                vm: vm.name.clone(),
                reason: format!("{e}\n--- {} ---\n{}", g.log.display(), tail(&g.log, 20)),
            })?;
        }
        Ok(())
    }

    /// Start QEMU for guest `vm` in `host`'s namespace, its sockets named
    /// for `generation` (0: `VM.console`; n: `VM.n.console`), its vNIC on
    /// `host`'s agent (vhost-user) or its tap. With `incoming` (a migration
    /// URI) it waits for a migration instead of booting. `boot` is the
    /// kernel, initramfs and accelerator arguments.
    pub(crate) fn spawn_guest(
        &mut self,
        vm: &VmPlan,
        host: &str,
        generation: u32,
        mem: u32,
        incoming: Option<&str>,
        boot: (&Path, &Path, &[String]),
    ) -> Result<QemuProc, LabError> {
        let (kernel, initrd, accel) = boot;
        let nic = vm
            .vnics
            .first()
            .ok_or_else(|| LabError::Invalid(format!("VM {} has no vNIC", vm.name)))?;
        let qdir = self.state.state_dir.join("qemu");
        let stem = match generation {
            0 => vm.name.clone(),
            g => format!("{}.{g}", vm.name),
        };
        let console = qdir.join(format!("{stem}.console"));
        let monitor = qdir.join(format!("{stem}.monitor"));
        let qmp = qdir.join(format!("{stem}.qmp"));
        let log = self.state.state_dir.join("logs").join(format!("qemu-{stem}.log"));
        let mut append = format!("console=ttyS0 quiet palisade.name={}", vm.name);
        if let Some(a) = ipv4s(&nic.ips).next() {
            append.push_str(&format!(" palisade.ip={a}/24"));
        }
        if let Some(a) = nic.ips.iter().find(|ip| ip.is_ipv6()) {
            append.push_str(&format!(" palisade.ip6={a}/64"));
        }
        if let Some(gw) = vm.gateway {
            append.push_str(&format!(" palisade.gw={gw}"));
        }
        let logf = File::create(&log).map_err(LabError::io(format!("creating {}", log.display())))?;
        let logf2 = logf.try_clone().map_err(LabError::io("duplicating log handle"))?;
        let nic_args = if self.state.plan.on_vhost_user(vm) {
            // Guest memory shared with the agent; offloads as the guest's
            // virtio-net driver negotiates them (all on).
            let socket = config::vhost_user_socket_on(&self.state.state_dir, nic, &vm.host, host);
            let accel: Vec<&str> = accel.iter().map(String::as_str).collect();
            qemu::vhost_user_nic_args(&socket, &nic.mac, config::QEMU_QUEUE_PAIRS, mem, &accel)
        } else {
            vec![
                "-netdev".into(),
                format!("tap,id=n0,ifname={},script=no,downscript=no,vnet_hdr=off", nic.host_if),
                "-device".into(),
                format!("virtio-net-pci,netdev=n0,mac={}", nic.mac),
            ]
        };
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.host_netns(host), "qemu-system-x86_64"])
            .args(["-name", &vm.name, "-nodefaults", "-nographic", "-no-reboot"])
            .args(accel)
            .args(["-m", &mem.to_string(), "-smp", "1"])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", &append])
            .args(&nic_args)
            .arg("-serial")
            .arg(format!("unix:{},server=on,wait=off", console.display()))
            .arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", monitor.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        if let Some(uri) = incoming {
            cmd.args(["-incoming", uri]);
        }
        cmd.stdin(Stdio::null()).stdout(logf).stderr(logf2);
        let child = cmd.spawn().map_err(LabError::io("starting qemu-system-x86_64"))?;
        let pid = child.id() as i32;
        self.children.push(child);
        // The name the host's agent finds the guest's monitor by
        // (`[migration] qmp`): one per host, whatever the generation.
        let by_host = config::qmp_link(&self.state.state_dir, &vm.name, host);
        let _ = std::fs::remove_file(&by_host);
        std::os::unix::fs::symlink(&qmp, &by_host).map_err(LabError::io(format!("linking {}", by_host.display())))?;
        Ok(QemuProc {
            pid,
            console,
            monitor,
            qmp,
            log,
            accel: accel.to_vec(),
            host: host.to_string(),
            mem_mib: mem,
            generation,
        })
    }

    /// A CA and certificates, the controller on the underlay (embedded
    /// store), and the lab's policy applied to it as version 1.
    fn start_controller(&mut self, exe: &Path) -> Result<(), LabError> {
        let exe = absolute(exe)?;
        let u = self.state.plan.underlay_ns.clone();
        let ip = CONTROLLER_IP.to_string();
        sys::ip_n(&u, &["addr", "add", &format!("{ip}/24"), "dev", "br0"])?;
        let ca = self.state.state_dir.join("ca");
        let data = self.state.state_dir.join("controller");
        let run = |args: Vec<String>| -> Result<(), LabError> {
            let mut cmd = Command::new(&exe);
            cmd.args(&args);
            let out = sys::output_timeout(cmd, Duration::from_secs(30), &format!("palisade {}", args.join(" ")))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(LabError::Invalid(format!(
                    "palisade {} failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                )))
            }
        };
        let d = ca.to_string_lossy().to_string();
        run(vec!["ca".into(), "init".into(), "--dir".into(), d.clone()])?;
        run([
            "ca",
            "issue",
            "--dir",
            &d,
            "--name",
            "controller",
            "--server",
            "--ip",
            &ip,
        ]
        .map(String::from)
        .to_vec())?;
        for h in self.state.plan.hosts.clone() {
            // Also a server certificate: the agent's migration listener
            // presents it to the source host's agent.
            let ip = h.underlay_ip.to_string();
            run(["ca", "issue", "--dir", &d, "--name", &h.name, "--server", "--ip", &ip]
                .map(String::from)
                .to_vec())?;
        }
        let log = self.state.state_dir.join("logs").join("controller.log");
        let logf = File::create(&log).map_err(LabError::io(format!("creating {}", log.display())))?;
        let logf2 = logf.try_clone().map_err(LabError::io("duplicating log handle"))?;
        let listen = format!("{ip}:{CONTROLLER_PORT}");
        let child = Command::new("ip")
            .args(["netns", "exec", &u])
            .arg(&exe)
            .args(["controller", "--listen", &listen, "--data"])
            .arg(&data)
            .arg("--tls-dir")
            .arg(&ca)
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(logf2)
            .spawn()
            .map_err(LabError::io("starting the controller"))?;
        let pid = child.id() as i32;
        self.children.push(child);
        let token_file = data.join("admin.token");
        let start = Instant::now();
        while !std::fs::read_to_string(&log).is_ok_and(|t| t.contains("serving")) {
            for c in &mut self.children {
                let _ = c.try_wait();
            }
            if !sys::pid_alive(pid) || start.elapsed() >= AGENT_READY_TIMEOUT {
                return Err(LabError::Invalid(format!(
                    "the controller did not start:\n{}",
                    tail(&log, 20)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let token = std::fs::read_to_string(&token_file)
            .map_err(LabError::io(format!("reading {}", token_file.display())))?
            .trim()
            .to_string();
        self.state.controller = Some(ControllerProc {
            pid,
            url: format!("https://{listen}"),
            ca: ca.join("ca.pem"),
            token,
            log,
            exe,
        });
        self.save()?;
        let policy = self.state.policy_dir.to_string_lossy().to_string();
        let out = self.ctl(&["apply", "-f", &policy, "-m", "lab up"])?;
        if !out.status.success() {
            return Err(LabError::Invalid(format!(
                "applying {policy} to the controller failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Run a `palisade` CLI command against the lab's controller (from the
    /// underlay namespace, with its URL, admin token and CA).
    pub fn ctl(&self, args: &[&str]) -> Result<Output, LabError> {
        let c = self
            .state
            .controller
            .as_ref()
            .ok_or_else(|| LabError::Invalid("this lab runs no controller".into()))?;
        let mut argv: Vec<String> = vec![c.exe.to_string_lossy().to_string()];
        argv.extend(args.iter().map(|a| a.to_string()));
        argv.extend([
            "--server".into(),
            c.url.clone(),
            "--token".into(),
            c.token.clone(),
            "--ca".into(),
        ]);
        argv.push(c.ca.to_string_lossy().to_string());
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        self.exec_ns(&self.state.plan.underlay_ns, &refs, Duration::from_secs(30))
    }

    fn start_agents(&mut self, exe: &Path, supervise: bool) -> Result<(), LabError> {
        let exe = absolute(exe)?;
        let hosts = self.state.plan.hosts.clone();
        for h in &hosts {
            let log = self.state.state_dir.join("logs").join(format!("{}.log", h.name));
            let logf = File::create(&log).map_err(LabError::io(format!("creating {}", log.display())))?;
            let logf2 = logf.try_clone().map_err(LabError::io("duplicating log handle"))?;
            let child = Command::new("ip")
                .args(["netns", "exec", &h.ns])
                .arg(&exe)
                .args(if supervise {
                    &["agent", "supervise", "--config"][..]
                } else {
                    &["agent", "--config"][..]
                })
                .arg(self.agent_config(&h.name))
                .stdin(Stdio::null())
                .stdout(logf)
                .stderr(logf2)
                .spawn()
                .map_err(LabError::io(format!("starting {}", exe.display())))?;
            let pid = child.id() as i32;
            self.children.push(child);
            self.state.agents.insert(h.name.clone(), AgentProc { pid, log });
            self.save()?;
        }
        let start = Instant::now();
        for h in &hosts {
            let a = self.state.agents[&h.name].clone();
            loop {
                let text = std::fs::read(&a.log)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                if text.lines().any(|l| l.contains("agent ready")) {
                    break;
                }
                for c in &mut self.children {
                    let _ = c.try_wait();
                }
                let reason = if !sys::pid_alive(a.pid) {
                    Some("the agent exited".to_string())
                } else if start.elapsed() >= AGENT_READY_TIMEOUT {
                    Some(format!("no `agent ready` within {} s", AGENT_READY_TIMEOUT.as_secs()))
                } else {
                    None
                };
                if let Some(reason) = reason {
                    return Err(LabError::Agent {
                        host: h.name.clone(),
                        reason,
                        tail: tail(&a.log, 20),
                        log: a.log.clone(),
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Open the lab whose state file is in `state_dir`.
    pub fn load(state_dir: &Path) -> Result<Lab, LabError> {
        let path = state_dir.join(STATE_FILE);
        let bytes = std::fs::read(&path).map_err(|e| LabError::State {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let state: LabState = serde_json::from_slice(&bytes).map_err(|e| LabError::State {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Lab {
            state,
            children: Vec::new(),
            consoles: Mutex::new(BTreeMap::new()),
        })
    }

    /// Remove lab `name` (state in `state_dir`, if any): stop its agents, QEMU
    /// guests and every process in its namespaces (SIGTERM, then SIGKILL after
    /// [`TERM_GRACE`]), delete its namespaces (which deletes their interfaces)
    /// and its runtime files. Works without a state file and is idempotent.
    pub fn down(name: &str, state_dir: &Path) -> Result<DownReport, LabError> {
        crate::plan::check_name(name)?;
        let state = Lab::load(state_dir)
            .ok()
            .map(|l| l.state.clone())
            .filter(|s| s.plan.name == name);
        down_impl(name, state_dir, state.as_ref(), &mut [])
    }

    /// Remove this lab (as [`Lab::down`]), reaping the processes this `Lab` started.
    pub fn shutdown(mut self) -> Result<DownReport, LabError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<DownReport, LabError> {
        let state = self.state.clone();
        down_impl(&state.plan.name, &state.state_dir, Some(&state), &mut self.children)
    }

    /// The state (topology, processes, paths).
    pub fn state(&self) -> &LabState {
        &self.state
    }

    /// The topology.
    pub fn plan(&self) -> &Plan {
        &self.state.plan
    }

    /// The lab's name.
    pub fn name(&self) -> &str {
        &self.state.plan.name
    }

    /// The agent configuration file of `host` (written for every host, with or without agents).
    pub fn agent_config(&self, host: &str) -> PathBuf {
        self.state.state_dir.join("agents").join(format!("{host}.toml"))
    }

    /// The DNS zone file (`NAME IPV4` lines) for `palisade lab serve dns`.
    pub fn dns_zone_file(&self) -> PathBuf {
        self.state.state_dir.join("dns.zone")
    }

    /// The namespace of `host`.
    pub fn host_netns(&self, host: &str) -> String {
        format!("{}-{host}", self.state.plan.name)
    }

    /// The namespace of namespace VM `vm` (`None` for QEMU guests and unknown VMs).
    pub fn vm_netns(&self, vm: &str) -> Option<String> {
        self.state.plan.vm(vm).and_then(|v| v.ns.clone())
    }

    fn vm_plan(&self, vm: &str) -> Result<&VmPlan, LabError> {
        self.state.plan.vm(vm).ok_or_else(|| LabError::Unknown {
            kind: "vm",
            name: vm.to_string(),
        })
    }

    /// The first IPv4 address of `vm`.
    pub fn vm_ip(&self, vm: &str) -> Result<Ipv4Addr, LabError> {
        let v = self.vm_plan(vm)?;
        v.vnics
            .iter()
            .find_map(|n| ipv4s(&n.ips).next())
            .ok_or_else(|| LabError::Invalid(format!("VM {vm} has no IPv4 address")))
    }

    /// The host `vm` runs on (for a migrated guest, where it runs now).
    pub fn vm_host(&self, vm: &str) -> Result<&str, LabError> {
        let plan = self.vm_plan(vm)?;
        Ok(match self.state.guests.get(vm) {
            Some(g) if !g.host.is_empty() => &g.host,
            _ => &plan.host,
        })
    }

    /// Run `argv` in namespace `ns` with a deadline.
    pub fn exec_ns(&self, ns: &str, argv: &[&str], timeout: Duration) -> Result<Output, LabError> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).args(argv);
        sys::output_timeout(cmd, timeout, &format!("`{}` in {ns}", argv.join(" ")))
    }

    /// Run `argv` in `host`'s namespace.
    pub fn exec_host(&self, host: &str, argv: &[&str], timeout: Duration) -> Result<Output, LabError> {
        if self.state.plan.host(host).is_none() {
            return Err(LabError::Unknown {
                kind: "host",
                name: host.to_string(),
            });
        }
        self.exec_ns(&self.host_netns(host), argv, timeout)
    }

    /// Run `argv` "in the VM": in its namespace, or over a QEMU guest's serial
    /// console (the guest's stderr is returned separately; its exit status is
    /// the command's).
    pub fn exec(&self, vm: &str, argv: &[&str], timeout: Duration) -> Result<Output, LabError> {
        let v = self.vm_plan(vm)?;
        if argv.is_empty() {
            return Err(LabError::Invalid("exec: empty command".into()));
        }
        match &v.ns {
            Some(ns) => self.exec_ns(ns, argv, timeout),
            None => {
                let g = self.state.guests.get(vm).ok_or_else(|| LabError::Qemu {
                    vm: vm.to_string(),
                    reason: "not running".into(),
                })?;
                // One console conversation at a time per Lab.
                let mut consoles = self.consoles.lock().unwrap_or_else(|p| p.into_inner());
                let mut conn = consoles.remove(vm);
                let r = qemu::console_exec(vm, &g.console, &mut conn, argv, timeout);
                if let Some(c) = conn {
                    consoles.insert(vm.to_string(), c);
                }
                r
            }
        }
    }

    /// Start a long-running `argv` in `vm`: a child process for namespace VMs
    /// (stdout and stderr piped), a background job for QEMU guests.
    pub fn spawn(&self, vm: &str, argv: &[&str]) -> Result<Spawned, LabError> {
        let v = self.vm_plan(vm)?;
        if argv.is_empty() {
            return Err(LabError::Invalid("spawn: empty command".into()));
        }
        match &v.ns {
            Some(ns) => Command::new("ip")
                .args(["netns", "exec", ns])
                .args(argv)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map(Spawned::Process)
                .map_err(LabError::io(format!("starting `{}` in {ns}", argv.join(" ")))),
            None => {
                let log = format!(
                    "/tmp/bg-{}.log",
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos())
                        .unwrap_or(0)
                );
                let quoted: Vec<String> = argv.iter().map(|a| qemu::shell_quote(a)).collect();
                let script = format!("{} >{log} 2>&1 </dev/null & echo $!", quoted.join(" "));
                let out = self.exec(vm, &["sh", "-c", &script], Duration::from_secs(20))?;
                let pid = String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .map_err(|_| LabError::Qemu {
                        vm: vm.to_string(),
                        reason: format!("could not start `{}` in the background", argv.join(" ")),
                    })?;
                Ok(Spawned::Guest {
                    vm: vm.to_string(),
                    pid,
                    log,
                })
            }
        }
    }

    /// Stop a process started with [`Lab::spawn`].
    pub fn kill(&self, s: &mut Spawned) -> Result<(), LabError> {
        match s {
            Spawned::Process(c) => {
                let _ = c.kill();
                c.wait().map(drop).map_err(LabError::io("waiting for spawned process"))
            }
            Spawned::Guest { vm, pid, .. } => self
                .exec(vm, &["kill", &pid.to_string()], Duration::from_secs(10))
                .map(drop),
        }
    }

    /// What exists now: namespaces, interfaces, agents, guests.
    pub fn status(&self) -> LabStatus {
        let existing = leftovers(self.name()).unwrap_or_default();
        let present = |ns: &str| existing.iter().any(|n| n == ns);
        let hosts = self
            .state
            .plan
            .hosts
            .iter()
            .map(|h| {
                let agent_pid = self.state.agents.get(&h.name).map(|a| a.pid);
                HostStatus {
                    name: h.name.clone(),
                    ns: h.ns.clone(),
                    present: present(&h.ns),
                    agent_pid,
                    agent_alive: agent_pid.is_some_and(sys::pid_alive),
                    interfaces: if present(&h.ns) { links(&h.ns) } else { Vec::new() },
                }
            })
            .collect();
        let vms = self
            .state
            .plan
            .vms
            .iter()
            .map(|v| {
                let pid = self.state.guests.get(&v.name).map(|g| g.pid);
                VmStatus {
                    name: v.name.clone(),
                    host: self.vm_host(&v.name).unwrap_or(&v.host).to_string(),
                    kind: if v.qemu { "qemu" } else { "netns" },
                    alive: match &v.ns {
                        Some(ns) => present(ns),
                        None => pid.is_some_and(sys::pid_alive),
                    },
                    pid,
                    ips: v.vnics.iter().flat_map(|n| n.ips.iter().copied()).collect(),
                }
            })
            .collect();
        LabStatus {
            name: self.name().to_string(),
            hosts,
            vms,
            namespaces: existing,
        }
    }
}

/// Interfaces of namespace `ns` (`ip -j link`).
pub fn links(ns: &str) -> Vec<IfStatus> {
    let Ok(out) = sys::ip_n(ns, &["-j", "link", "show"]) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout) else {
        return Vec::new();
    };
    v.iter()
        .map(|l| {
            let s = |k: &str| l.get(k).and_then(|x| x.as_str()).unwrap_or_default().to_string();
            IfStatus {
                name: s("ifname"),
                state: s("operstate"),
                mac: s("address"),
            }
        })
        .collect()
}

/// The namespaces that belong to lab `name` (`<name>-…`) and exist now.
pub fn leftovers(name: &str) -> Result<Vec<String>, LabError> {
    let prefix = format!("{name}-");
    Ok(sys::netns_list()?
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect())
}

fn down_impl(
    name: &str,
    state_dir: &Path,
    state: Option<&LabState>,
    children: &mut [Child],
) -> Result<DownReport, LabError> {
    let mut report = DownReport::default();
    let mut namespaces = leftovers(name)?;
    if let Some(s) = state {
        for ns in s.plan.namespaces() {
            if !namespaces.contains(&ns) && Path::new("/run/netns").join(&ns).exists() {
                namespaces.push(ns);
            }
        }
    }
    // Processes: those recorded (if still what we started) and any inside the namespaces.
    let me = std::process::id() as i32;
    let mut pids: Vec<i32> = Vec::new();
    if let Some(s) = state {
        if let Some(c) = &s.controller
            && sys::pid_cmdline(c.pid).contains("controller")
        {
            pids.push(c.pid);
        }
        for a in s.agents.values() {
            if sys::pid_cmdline(a.pid).contains("agent") {
                pids.push(a.pid);
            }
        }
        for g in s.guests.values() {
            if sys::pid_cmdline(g.pid).contains("qemu") {
                pids.push(g.pid);
            }
        }
    }
    for ns in &namespaces {
        pids.extend(sys::netns_pids(ns));
    }
    pids.sort_unstable();
    pids.dedup();
    pids.retain(|&p| p != me);
    let cmdlines: BTreeMap<i32, String> = pids.iter().map(|&p| (p, sys::pid_cmdline(p))).collect();
    for p in sys::terminate(&pids, TERM_GRACE) {
        report
            .processes
            .push((p, cmdlines.get(&p).cloned().unwrap_or_default()));
    }
    for c in children.iter_mut() {
        let _ = c.try_wait();
    }
    for ns in &namespaces {
        match sys::ip(&["netns", "del", ns]) {
            Ok(_) => report.namespaces.push(ns.clone()),
            Err(e) if Path::new("/run/netns").join(ns).exists() => return Err(e),
            Err(_) => {}
        }
    }
    // Nothing is created in the root namespace, but a crashed older version or
    // a hand-made test interface could have left `<name>-…` links there.
    if let Ok(out) = sys::ip(&["-o", "link", "show"]) {
        let prefix = format!("{name}-");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(ifname) = line.split(": ").nth(1) else {
                continue;
            };
            let ifname = ifname.split('@').next().unwrap_or(ifname);
            if ifname.starts_with(&prefix) && sys::ip(&["link", "del", ifname]).is_ok() {
                report.links.push(ifname.to_string());
            }
        }
    }
    for f in [state_dir.join(STATE_FILE), state_dir.join("qemu")] {
        let removed = if f.is_dir() {
            std::fs::remove_dir_all(&f).is_ok()
        } else {
            std::fs::remove_file(&f).is_ok()
        };
        if removed {
            report.files.push(f);
        }
    }
    let left = leftovers(name)?;
    if !left.is_empty() {
        return Err(LabError::Invalid(format!(
            "namespaces still present after down: {}",
            left.join(", ")
        )));
    }
    Ok(report)
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The lab outlives this handle on purpose (`palisade lab up` exits and
        // leaves it running); only reap children that already exited.
        for c in &mut self.children {
            let _ = c.try_wait();
        }
    }
}
