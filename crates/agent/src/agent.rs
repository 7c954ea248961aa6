//! The agent's runtime: real ports around the sans-IO engine.
//!
//! The agent runs one datapath worker per core (the `worker` module): each has
//! its own engine and its own socket on every port, and the kernel steers
//! each flow to one worker. This module is the control side: it attaches the
//! ports, starts the workers, takes their flow records to the audit trail,
//! IPFIX and the controller, installs new policies in every worker (reloading
//! the policy directory when its files change and keeping the last good
//! policy when the new one has errors), and publishes metrics and health.
//!
//! Protection never lapses: Palisade *is* the switch between the VMs and the
//! network, so when the agent stops, traffic stops. On SIGTERM each worker's
//! connection state is saved to the state directory and the next start hands
//! every connection to the worker its flows are steered to (whatever the
//! number of workers), so established connections survive a restart. A
//! worker that fails stops the agent: its share of the traffic would
//! otherwise stop unnoticed.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use palisade_audit::record::{FlowRecord, Record};
use palisade_datapath::PolicyLookup;
use palisade_datapath::host::{self, Appliance, HostError, HostPorts};
use palisade_datapath::port::{PortError, PortId, UplinkConfig};
use palisade_datapath::{Engine, EngineConfig};
use palisade_io::afpacket::{AfPacket, AfPacketConfig, Fanout};
use palisade_io::overlay::UdpOverlay;
use palisade_io::port::PortStats;
use palisade_io::steer;
use palisade_policy::compile::Compiler;
use palisade_policy::load::Loader;
use palisade_policy::{DirSource, Model, load};
use palisade_wire::ethernet::EthernetAddress;

use crate::config::AgentConfig;
use crate::error::{AgentError, io_err};
use crate::http::{self, Published, Shared};
use crate::inspection::{AlertRing, Inline, InlineSetup, Signatures};
use crate::journal::{Identity, Journal};
use crate::metrics;
use crate::records::{Clock, Identities};
use crate::snapshot::{
    SnapshotTimer, StateKind, check_blob_name, refusal_reason, state_files, state_path, worker_of, write_state,
};
use crate::worker::{Attached, Worker, WorkerCore, WorkerIo, lock};

/// A vNIC or appliance port: its name, its interface, its engine port (the same in every worker).
#[derive(Debug, Clone)]
struct PortBinding {
    name: String,
    /// The interface, or a vhost-user vNIC's socket path.
    interface: String,
    port: PortId,
}

/// The audit trail being opened on a thread of its own.
type TrailOpening = std::thread::JoinHandle<Result<crate::trail::Trail, AgentError>>;
/// Every port's sockets (`[port][worker]`) being opened on a thread of their own.
type SocketsOpening = std::thread::JoinHandle<Result<Vec<Vec<Option<AfPacket>>>, AgentError>>;

/// Flow records kept in memory for `/flows`.
const RECENT_FLOWS: usize = 500;
/// Connections one vNIC may have open (shared out between the workers).
const VNIC_MAX_CONNS: u32 = 10_000;

/// The running agent.
pub struct Agent {
    config: AgentConfig,
    /// Each worker's engine and stats.
    workers: Vec<Arc<Mutex<WorkerCore>>>,
    /// Each worker's sockets, until [`Agent::run`] hands them to the worker threads.
    io: Vec<WorkerIo>,
    /// Each attached port, the same in every worker.
    ports: Vec<PortBinding>,
    /// The vhost-user devices of vNICs attached that way (their sockets live as long as the agent).
    vhost: crate::vhost::VhostVnics,
    policy_stamp: Option<SystemTime>,
    /// The link state last given to the engines of each service-chain
    /// appliance vNIC (by name): the instances' health.
    appliance_links: std::collections::HashMap<String, bool>,
    /// The health probes through service-chain appliances: their rounds
    /// and hysteresis (the engines check and consume what comes back).
    probes: palisade_datapath::probe::ProbeMonitor,
    /// Policies from the controller (controller mode).
    upstream: Option<std::sync::mpsc::Receiver<crate::upstream::Installed>>,
    /// The controller revision in force (controller mode).
    revision: Option<u64>,
    origin: Instant,
    clock: Clock,
    audit: Option<crate::trail::Trail>,
    /// The audit trail while it opens on a thread of its own (opening
    /// verifies the active segment's chain: a few hundred milliseconds
    /// with a large segment, which a restart does not wait for), and the
    /// records kept for it meanwhile.
    audit_opening: Option<(TrailOpening, Vec<Record>)>,
    /// Holds the trail's opening back until the workers have forwarded a
    /// while ([`AUDIT_OPEN_AFTER_WORKERS`]): sent, or dropped, to let it go.
    audit_gate: Option<std::sync::mpsc::Sender<()>>,
    /// Live IPFIX export of flow records.
    ipfix: Option<palisade_audit::ipfix::IpfixExporter>,
    /// Flow records for the controller (controller mode), sent once a second.
    to_controller: Option<std::sync::mpsc::SyncSender<Vec<FlowRecord>>>,
    controller_batch: Vec<FlowRecord>,
    /// Records the controller channel had no room for (they are in the local trail).
    controller_dropped: u64,
    last_retention: Option<Instant>,
    recent: VecDeque<FlowRecord>,
    /// Flows the `default` rule decided, by local vNIC (that vNIC's own
    /// chain: egress when it sent, ingress when it received), every local
    /// vNIC listed from 0. A migrated VM's must stay 0 on the destination:
    /// its connections arrive with their verdicts, never reclassified.
    default_decisions: std::collections::BTreeMap<String, u64>,
    /// What the arrivals watcher did (controller mode): guests held for
    /// their state, holds that expired, arrivals reported.
    arrivals: Option<Arc<crate::arrivals::ArrivalCounts>>,
    /// Migration change records the control socket made, for the trail.
    migrations: Arc<Mutex<Vec<palisade_audit::record::ChangeRecord>>>,
    shared: Shared,
    policy_errors: u64,
    last_policy_error: Option<String>,
    /// Datapath workers running (counted by the control loop).
    workers_alive: u32,
    /// When the policy in force was installed.
    policy_installed: Instant,
    /// The zones of this host's ports, with their `on_failure`.
    zones: std::collections::BTreeMap<String, palisade_api::health::FailureMode>,
    /// Cumulative drops at the last health report.
    drop_baseline: crate::health::DropBaseline,
    /// The health report last published.
    last_report: Option<palisade_api::health::HealthReport>,
    /// Health reports for the controller (controller mode), one per interval.
    to_controller_health: Option<std::sync::mpsc::SyncSender<palisade_api::health::HealthReport>>,
    /// systemd's notification socket (`READY=1`, `WATCHDOG=1`), if any.
    notifier: crate::notify::Notifier,
    /// Connection-table snapshots for a start after a crash.
    snapshots: SnapshotTimer,
    /// What the start resumed from (for `/health`).
    resumed: Option<Resumed>,
    /// The start resumed a clean stop's saved state (removed once read).
    imported_saved: bool,
    /// The previous run's journals (`host-N.journal.prev`) wait for this
    /// run's first complete snapshot round.
    older_journals: bool,
    /// When this run's first snapshot round was taken.
    first_snapshot: FirstSnapshot,
    /// What followed `agent ready` (said once, see [`crate::after_ready`]).
    after_ready: Option<crate::after_ready::AfterReady>,
    /// This run's journals, made while the state was read (taken at start).
    fresh_journals: Option<FreshJournals>,
    /// State files refused at start, by reason (corrupt, truncated, foreign, no room...).
    state_refused: std::collections::BTreeMap<&'static str, u64>,
    /// The first refusals' file, reason and message (for `/health`).
    refusals: Vec<Refusal>,
    /// The host and vNIC set its state files must belong to.
    identity: Identity,
    /// The state directory's lock, held for the agent's life: while it is
    /// held the fail-open fallback cannot be armed.
    _lock: crate::fallback::StateLock,
    /// The fail-open episode this start ended (the fallback was armed while the agent was gone).
    fail_open: Option<crate::fallback::Episode>,
    /// The open zones of the fallback plan in force (`None`: no plan could be made: all closed).
    fallback_open: Option<Vec<String>>,
    /// Inline inspection's signatures in force (`None`: no `[inspect]`).
    signatures: Option<Arc<Signatures>>,
    /// Signature loads that failed at a policy change (the previous ones stay in force).
    inspect_errors: u64,
    /// The last such failure.
    last_inspect_error: Option<String>,
    /// Recent alerts, for `/alerts`.
    alerts: AlertRing,
    /// `alerts` as the JSON `/alerts` serves.
    alerts_json: String,
    /// Alerts waiting for the controller (controller mode with `[inspect]`).
    alert_queue: Option<Arc<crate::upstream::AlertQueue>>,
    /// What became of the alerts the workers handed over.
    alert_stats: AlertStats,
    /// The kernel fast path's state, for `/health`.
    fast_path: crate::fastpath::Status,
}

/// Where the alerts the workers raised went (for metrics).
#[derive(Debug, Clone, Copy, Default)]
pub struct AlertStats {
    /// Alert records queued for the audit trail.
    pub recorded: u64,
    /// Alerts the workers shed, reported by "alerts not recorded" records.
    pub not_recorded: u64,
    /// "Alerts not recorded" records written.
    pub gap_records: u64,
}

/// What a start resumed its connections from.
#[derive(Debug, Clone, serde::Serialize)]
struct Resumed {
    /// `saved` (a clean stop's exact state) or `snapshot` (what a crash left).
    from: &'static str,
    /// Connections resumed.
    connections: usize,
    /// How old the newest file was, milliseconds.
    age_ms: u64,
    /// What the crash journals added.
    journal: JournalReplayed,
}

/// When a run takes its first snapshot round (see [`Agent::start_journals`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
enum FirstSnapshot {
    /// Snapshots are off.
    #[default]
    None,
    /// At start, before the workers forward.
    BeforeForwarding,
    /// On the control thread once the workers forward, the previous run's
    /// journals kept as the older generation until it is written.
    AfterForwarding,
}

/// A state file refused at start.
#[derive(Debug, Clone, serde::Serialize)]
struct Refusal {
    /// The file.
    file: PathBuf,
    /// The reason's label (as in `palisade_state_refused_total{reason}`).
    reason: &'static str,
    /// What was wrong with it.
    message: String,
}

/// Refusals kept for `/health` (the counters keep counting past them).
const REFUSALS_KEPT: usize = 16;

/// What a start read from the crash journals.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct JournalReplayed {
    /// Records replayed.
    records: u64,
    /// Last records a kill interrupted, dropped.
    torn: u64,
    /// Damaged records, dropped with the rest of their half.
    corrupt: u64,
}

impl core::fmt::Debug for Agent {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Agent")
            .field("host", &self.config.host)
            .field("ports", &self.ports.len())
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

/// Open the audit trail of `config` on a thread of its own (with a
/// controller, its heads also go there once its key is registered).
fn open_trail(
    config: &AgentConfig,
    stop: &Arc<AtomicBool>,
    gate: std::sync::mpsc::Receiver<()>,
) -> Result<Option<TrailOpening>, AgentError> {
    let Some(dir) = config.audit.clone() else {
        return Ok(None);
    };
    let (retention, key, head) = (
        config.audit_retention(),
        config.audit_key_file(),
        config.audit_head_file(),
    );
    let pusher = match &config.controller {
        Some(cc) => Some((crate::upstream::client(cc)?, config.host.clone(), stop.clone())),
        None => None,
    };
    let nice = config.nice();
    let open = move || {
        // Not before the gate opens (or its sender is gone): see `AUDIT_OPEN_AFTER_WORKERS`.
        let _ = gate.recv();
        // Below the start-up's own threads: the datapath waits for the
        // policy, the engines, the state and the sockets, never for the
        // trail (records are kept until it is open), and on a small host
        // its recovery (reading and hashing the last segment) would take
        // their cores. Back to the default once open.
        let _ = set_thread_nice(AUDIT_OPEN_NICE);
        // With a controller, the trail's heads also go to it (registering its key first).
        let heads = pusher.as_ref().map(|_| crate::upstream::HeadQueue::new());
        let trail = crate::trail::Trail::open_with(&dir, retention, &key, &head, heads.clone());
        // Back to the agent's priority (a failure, as at start, leaves the default).
        let _ = set_thread_nice(nice).or_else(|_| set_thread_nice(0));
        let trail = trail?;
        if let (Some(q), Some((client, host, stop))) = (heads, pusher) {
            crate::upstream::head_pusher(client, host, trail.public_key(), q, stop)?;
        }
        Ok(trail)
    };
    std::thread::Builder::new()
        .name("palisade-audit-open".into())
        .spawn(open)
        .map(Some)
        .map_err(io_err("starting the audit trail's opening"))
}

/// The nice value the audit trail's opening runs at during start-up.
const AUDIT_OPEN_NICE: i32 = 10;

/// How long after the workers start the audit trail's opening begins.
///
/// Opening recovers the trail (reads, parses and re-hashes its active
/// segment): a fifth of the agents' CPU over a chaos run (perf, bench/
/// README.md), and even at nice 10 it took a core whenever a start-up
/// thread waited, from the other restarting agent on a small host. The
/// first new connections after a restart come within a few milliseconds
/// of the workers' start, so it begins after them (and after the first
/// snapshot round, due 200 ms after the start); the records made
/// meanwhile are kept for it, as before, and a start that never runs its
/// workers lets it begin at once when it stops.
const AUDIT_OPEN_AFTER_WORKERS: Duration = Duration::from_millis(250);

/// Set the calling thread's nice value (on Linux a thread's own, not the
/// process's; the threads it starts afterwards inherit it). A failure
/// (raising it needs `CAP_SYS_NICE`) leaves it as it was: only scheduling
/// changes.
fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: setpriority takes plain integers; `who` 0 is the caller.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The CPU time this process used so far, user and system, all threads
/// (a start-up's wall time on a busy machine is mostly waiting for a core).
fn process_cpu() -> Duration {
    // SAFETY: getrusage writes the struct it is given, zeroed here.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage for the call's duration.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Load and compile the policy directory.
/// How often the link state of service-chain appliance vNICs is read.
const APPLIANCE_LINK_POLL: Duration = Duration::from_millis(200);

/// How often the service-chain probe monitor is run: the shortest probe
/// interval a chain may ask for (each chain's rounds start when due).
const APPLIANCE_PROBE_TICK: Duration =
    Duration::from_millis(palisade_policy::model::ChainProbe::MIN_INTERVAL_MS as u64);

fn load_policy(dir: &Path) -> Result<Compiler, AgentError> {
    let fail = |message: String| AgentError::Policy {
        dir: dir.to_path_buf(),
        message,
    };
    let loaded = load(&DirSource::new(dir)).map_err(|e| fail(e.to_string()))?;
    if loaded.has_errors() {
        return Err(fail(loaded.render()));
    }
    Compiler::new(loaded.model).map_err(|e| fail(e.to_string()))
}

/// The newest modification time of the policy files (a change triggers a reload).
fn policy_stamp(dir: &Path) -> Option<SystemTime> {
    fn walk(dir: &Path, newest: &mut Option<SystemTime>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                walk(&e.path(), newest);
            } else if let Ok(m) = meta.modified() {
                *newest = Some(newest.map_or(m, |n| n.max(m)));
            }
        }
        if let Ok(m) = std::fs::metadata(dir).and_then(|m| m.modified()) {
            *newest = Some(newest.map_or(m, |n| n.max(m)));
        }
    }
    let mut newest = None;
    walk(dir, &mut newest);
    newest
}

/// A vhost-user vNIC's MAC, from the inventory: the only one QEMU may
/// announce for it (`SEND_RARP`).
fn inventory_mac(model: &Model, vnic: &str) -> Option<[u8; 6]> {
    let (_, v) = model.inventory.vnic(vnic)?;
    v.mac
        .parse::<palisade_wire::ethernet::EthernetAddress>()
        .ok()
        .map(|m| m.0)
}

/// This host's ports as the datapath describes them: the configuration's
/// vNICs, then its appliances; each vNIC's connection limit is shared out
/// between the workers.
fn host_ports(config: &AgentConfig, workers: usize) -> Result<HostPorts, AgentError> {
    let appliances = config
        .appliances
        .iter()
        .map(|a| {
            // Checked when the configuration was read; refused here too rather than assumed.
            let mac = a.mac.parse().map_err(|_| AgentError::Port {
                what: format!("appliance {} on {}", a.name, a.interface),
                message: format!("bad MAC {}", a.mac),
            })?;
            Ok(Appliance {
                name: a.name.clone(),
                zone: a.zone.clone(),
                mac,
            })
        })
        .collect::<Result<_, AgentError>>()?;
    Ok(HostPorts {
        host: config.host.clone(),
        vnics: Some(config.vnics.iter().map(|v| v.name.clone()).collect()),
        appliances,
        extra_macs: Vec::new(),
        strict_zones: Vec::new(),
        max_conns: VNIC_MAX_CONNS.div_ceil(workers as u32),
    })
}

/// A port the datapath refused, named as the configuration names it.
fn port_error(config: &AgentConfig, e: HostError) -> AgentError {
    let vnic = |name: &str| {
        let interface = config
            .vnics
            .iter()
            .find(|v| v.name == name)
            .map_or("?".into(), |v| v.port_label());
        format!("vnic {name} on {interface}")
    };
    let appliance = |name: &str| {
        let interface = config
            .appliances
            .iter()
            .find(|a| a.name == name)
            .map_or("?", |a| &a.interface);
        format!("appliance {name} on {interface}")
    };
    let (what, message) = match e {
        HostError::Vnic {
            name,
            source: PortError::UnknownVnic(_),
        } => (vnic(&name), "not in the policy's inventory".to_string()),
        HostError::Vnic { name, source } => (vnic(&name), source.to_string()),
        HostError::Appliance { name, source } => (appliance(&name), source.to_string()),
        HostError::ApplianceZone { name, zone } => (
            appliance(&name),
            format!("zone {zone} is not in the policy's inventory"),
        ),
        other => (format!("host {}", config.host), other.to_string()),
    };
    AgentError::Port { what, message }
}

/// Instance `instance` of chain `chain` in `from`, as numbered in `to`: the
/// instance of the chain of the same name with the same `in` vNIC (chains
/// and instances are numbered by each engine's policy, and the engines take
/// a policy change one after the other).
fn same_instance(
    from: &[palisade_datapath::ChainStats],
    to: &[palisade_datapath::ChainStats],
    chain: u16,
    instance: u16,
) -> Option<(u16, u16)> {
    let c = from.get(usize::from(chain))?;
    let vnic_in = &c.instances.get(usize::from(instance))?.vnic_in.0;
    let ci = to.iter().position(|t| t.name == c.name)?;
    let ii = to[ci].instances.iter().position(|i| i.vnic_in.0 == *vnic_in)?;
    Some((ci as u16, ii as u16))
}

/// Say so when the policy selects inspection profiles but nothing inspects.
fn warn_uninspected(model: &Model) {
    if model.policy.profiles.iter().any(|p| !p.signatures.is_empty()) {
        eprintln!(
            "palisade agent: warning: the policy selects inspection profiles but there is no [inspect] \
             section: flows pass uninspected"
        );
    }
}

/// By port id: whether inspection that cannot keep up drops the port's
/// frames (its zone's `on_failure` is `closed`).
fn fail_closed_ports(config: &AgentConfig, model: &Model, ports: &[PortBinding]) -> Arc<[bool]> {
    let len = ports.iter().map(|p| usize::from(p.port.0) + 1).max().unwrap_or(0);
    let mut closed = vec![false; len];
    for p in ports {
        let zone = model.inventory.vnic(&p.name).map(|(_, n)| n.zone.as_str()).or_else(|| {
            config
                .appliances
                .iter()
                .find(|a| a.name == p.name)
                .map(|a| a.zone.as_str())
        });
        if let Some(z) = zone.and_then(|z| model.inventory.zone(z)) {
            closed[usize::from(p.port.0)] = z.on_failure == palisade_policy::model::OnFailure::Closed;
        }
    }
    closed.into()
}

/// The zones of the configuration's ports, with their `on_failure` in `model`.
fn zones_of(
    config: &AgentConfig,
    model: &Model,
) -> std::collections::BTreeMap<String, palisade_api::health::FailureMode> {
    let vnic_zones = config
        .vnics
        .iter()
        .filter_map(|v| model.inventory.vnic(&v.name).map(|(_, n)| n.zone.as_str()));
    let appliance_zones = config.appliances.iter().map(|a| a.zone.as_str());
    crate::health::zone_modes(model, vnic_zones.chain(appliance_zones))
}

/// One worker's engine with every port of the configuration added, in the
/// configuration's order (so port ids agree across workers).
fn build_engine(
    config: &AgentConfig,
    model: &Model,
    lookup: Arc<PolicyLookup>,
    workers: usize,
) -> Result<(Engine, Vec<PortBinding>), AgentError> {
    let uplink = UplinkConfig {
        local_mac: EthernetAddress([0; 6]),
        local_ip: config.underlay.local,
        gateway_mac: EthernetAddress([0; 6]),
        flood: config.underlay.peers.values().copied().collect(),
    };
    // The host's tables and each vNIC's connection limit are shared out
    // between the workers, so the totals stay what the configuration says.
    let mut ec = EngineConfig::new(uplink);
    ec.flow_capacity = config.flow_capacity.unwrap_or(ec.flow_capacity).div_ceil(workers);
    ec.conn_capacity = config.conn_capacity.unwrap_or(ec.conn_capacity).div_ceil(workers);
    let built =
        host::build(&host_ports(config, workers)?, ec, model, Box::new(lookup)).map_err(|e| port_error(config, e))?;
    let bound = config
        .vnics
        .iter()
        .map(|v| (&v.name, v.port_label()))
        .chain(config.appliances.iter().map(|a| (&a.name, a.interface.clone())));
    let ports = bound
        .zip(built.ports)
        .map(|((name, interface), port)| PortBinding {
            name: name.clone(),
            interface,
            port,
        })
        .collect();
    Ok((built.engine, ports))
}

/// The AF_PACKET settings of one worker's port when there are `workers`.
///
/// Every worker's ring keeps the default size: the kernel steers a
/// connection to one worker, so one worker's ring alone must hold a single
/// stream's bursts. (Sharing one ring's memory out between the workers
/// left a 4 MiB ring per worker with two; a single TCP stream overflowed it
/// and lost whole super-frames, see bench/README.md.)
fn af_packet_config(workers: usize, rx: crate::config::AfPacketRx) -> AfPacketConfig {
    AfPacketConfig {
        fanout: (workers > 1).then_some(Fanout {
            workers: workers as u32,
            group: None,
        }),
        rx: match rx {
            crate::config::AfPacketRx::Socket => palisade_io::RxMode::Socket,
            crate::config::AfPacketRx::Ring => palisade_io::RxMode::Ring,
        },
        ..AfPacketConfig::default()
    }
}

/// Every worker's AF_PACKET socket on every interface port, as
/// `opened[port][worker]` (empty for a vhost-user port), opened in parallel:
/// one thread per interface.
///
/// Why: setting a socket up waits for the kernel's RCU grace periods
/// (`synchronize_net` when its ring is set up and when its fanout group's
/// program is set), 15-25 ms a socket on the lab's machines; one socket after
/// the other, seven ports and two workers kept a restarted agent from
/// forwarding for a third of a second. Threads waiting side by side share
/// grace periods. The workers of one interface still join its fanout group
/// one after the other in worker order, on that interface's thread: the
/// steering program's result is a member's place in the group, which is its
/// join order (another order would hand flows to workers that do not hold
/// their connections).
fn open_af_packet_ports(
    ports: &[(String, String)],
    vhost: &[bool],
    workers: usize,
    rx: crate::config::AfPacketRx,
) -> Result<Vec<Vec<Option<AfPacket>>>, AgentError> {
    let afp = af_packet_config(workers, rx);
    let afp = &afp;
    let port_error = |(name, interface): &(String, String), index: usize, message: String| AgentError::Port {
        what: format!("{name} on {interface} (worker {index})"),
        message,
    };
    std::thread::scope(|s| {
        let threads: Vec<_> = ports
            .iter()
            .zip(vhost)
            .map(|(p, &is_vhost)| {
                (!is_vhost).then(|| {
                    s.spawn(move || {
                        (0..workers)
                            .map(|index| {
                                AfPacket::open(&p.1, afp)
                                    .map(Some)
                                    .map_err(|e| port_error(p, index, e.to_string()))
                            })
                            .collect::<Result<Vec<_>, _>>()
                    })
                })
            })
            .collect();
        ports
            .iter()
            .zip(threads)
            .map(|(p, thread)| match thread {
                None => Ok(Vec::new()),
                Some(t) => t
                    .join()
                    .unwrap_or_else(|_| Err(port_error(p, 0, "the thread opening it panicked".into()))),
            })
            .collect()
    })
}

fn open_sockets(
    config: &AgentConfig,
    ports: &[PortBinding],
    opened: &mut [Vec<Option<AfPacket>>],
    vhost: &mut crate::vhost::VhostPorts,
    index: usize,
    workers: usize,
) -> Result<WorkerIo, AgentError> {
    let n = workers as u32;
    let mut attached = Vec::new();
    for (p, opened) in ports.iter().zip(opened.iter_mut()) {
        if let Some(io) = vhost.take(&p.interface, index) {
            attached.push(Attached {
                interface: p.interface.clone(),
                port: p.port,
                io: Box::new(io),
            });
            continue;
        }
        let io = opened
            .get_mut(index)
            .and_then(Option::take)
            .ok_or_else(|| AgentError::Port {
                what: format!("{} on {} (worker {index})", p.name, p.interface),
                message: "no socket was opened for it".into(),
            })?;
        attached.push(Attached {
            interface: p.interface.clone(),
            port: p.port,
            io: Box::new(io),
        });
    }
    let local = std::net::SocketAddrV4::new(config.underlay.local, config.underlay.port);
    let overlay = if workers > 1 {
        UdpOverlay::bind_steered(local, index as u32, n)
    } else {
        UdpOverlay::bind(local)
    }
    .map_err(|e| AgentError::Port {
        what: format!("underlay socket {local} (worker {index})"),
        message: e.to_string(),
    })?;
    let mut overlay = overlay;
    if config.offloads {
        // Merged back into super-frames by the worker; a kernel without UDP_GRO leaves it off.
        overlay.enable_gro();
    }
    Ok(WorkerIo {
        ports: attached,
        overlay,
        offloads: config.offloads,
    })
}

/// What the state files the runs before left held: read, checked, decoded
/// and merged with their journals, not yet imported (see
/// [`Agent::import_state`]). Read on a thread of its own while the policy
/// and the engines are built: it needs neither.
struct StateRead {
    /// A clean stop's saved state, or what a crash left.
    kind: StateKind,
    /// Per worker index of the run before: its connections, the file a
    /// refusal at import names, and the files it came from (for messages).
    merged: Vec<(palisade_datapath::state::Snapshot, Option<PathBuf>, String)>,
    /// Files refused: path, reason, message.
    refusals: Vec<(PathBuf, &'static str, String)>,
    /// What the journals added.
    journal: JournalReplayed,
    /// How old the newest blob was.
    newest_age: Option<Duration>,
    /// Time spent on the blobs, the journals and merging them.
    timings: (Duration, Duration, Duration),
    /// This run's journals, made while the state was read, when it may
    /// forward before its first snapshot (see [`fresh_journals`]).
    fresh: Option<FreshJournals>,
}

/// A run's fresh crash journals, one per worker (or why one could not be
/// made), the previous run's moved aside as the older generation.
struct FreshJournals {
    journals: Vec<std::io::Result<Journal>>,
    /// Some journal was moved aside (the first snapshot removes them).
    moved_aside: bool,
}

/// Move the previous run's journals under `dir` aside as the older
/// generation and make `workers` fresh ones, if this run may forward
/// before its first snapshot (see [`Agent::start_journals`]): not after a
/// clean stop's saved state (read once, then removed) nor when an older
/// generation is already there (generations never chain). `None`: the
/// first snapshot is taken before forwarding, and the journals made then.
fn fresh_journals(dir: &Path, identity: &Identity, read: &StateRead, workers: usize) -> Option<FreshJournals> {
    if read.kind == StateKind::Saved || !state_files(dir, StateKind::PrevJournal).is_empty() {
        return None;
    }
    let mut moved_aside = false;
    for path in state_files(dir, StateKind::Journal) {
        let Some(i) = worker_of(&path) else { continue };
        let to = state_path(dir, i, StateKind::PrevJournal);
        if let Err(e) = std::fs::rename(&path, &to) {
            eprintln!(
                "palisade agent: crash journal {}: cannot keep it as {}: {e}; snapshot before forwarding",
                path.display(),
                to.display()
            );
            return None;
        }
        moved_aside = true;
    }
    let journals = (0..workers)
        .map(|i| {
            Journal::create(
                &state_path(dir, i, StateKind::Journal),
                identity.clone(),
                i as u32,
                crate::journal::DEFAULT_CAPACITY,
            )
        })
        .collect();
    Some(FreshJournals { journals, moved_aside })
}

/// Read the state files under `dir` for `identity`: a clean stop's saved
/// state if there is one, else the snapshots a crash left, each with the
/// journals its worker wrote after it (the older generation first: see
/// [`Agent::start_journals`]). A file that fails its checks is refused,
/// never half used.
fn read_state(dir: &Path, identity: &Identity) -> StateRead {
    let saved = state_files(dir, StateKind::Saved);
    let kind = if saved.is_empty() {
        StateKind::Snapshot
    } else {
        StateKind::Saved
    };
    // Per worker index of the runs before: its blob, the journal of the
    // run before the last if that one crashed before its first snapshot,
    // and the last run's journal (replayed in that order).
    let mut sources: std::collections::BTreeMap<usize, (Option<PathBuf>, Vec<PathBuf>)> = Default::default();
    let blobs = if kind == StateKind::Saved {
        saved
    } else {
        state_files(dir, StateKind::Snapshot)
    };
    for (i, path) in blobs.into_iter().enumerate() {
        // `host.state` (a single-threaded agent's) has no index: after the others.
        let index = worker_of(&path).unwrap_or(usize::MAX - i);
        sources.entry(index).or_default().0 = Some(path);
    }
    if kind == StateKind::Snapshot {
        for path in state_files(dir, StateKind::PrevJournal)
            .into_iter()
            .chain(state_files(dir, StateKind::Journal))
        {
            if let Some(index) = worker_of(&path) {
                sources.entry(index).or_default().1.push(path);
            }
        }
    }
    let mut read = StateRead {
        kind,
        merged: Vec::new(),
        refusals: Vec::new(),
        journal: JournalReplayed::default(),
        newest_age: None,
        timings: Default::default(),
        fresh: None,
    };
    for (blob_path, journal_paths) in sources.into_values() {
        let t = Instant::now();
        let mut from_blob = None;
        if let Some(path) = &blob_path {
            let age = std::fs::metadata(path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            read.newest_age = Some(read.newest_age.map_or(age, |a| a.min(age)));
            match read_blob(path, kind, identity) {
                Ok(snap) => from_blob = Some(snap),
                Err((reason, why)) => read.refusals.push((path.clone(), reason, why)),
            }
        }
        read.timings.0 += t.elapsed();
        let t = Instant::now();
        let mut replay: Option<crate::journal::Replay> = None;
        for path in &journal_paths {
            match crate::journal::read(path, identity) {
                Ok(r) => {
                    read.journal.records += r.ops.len() as u64;
                    read.journal.torn += r.torn;
                    read.journal.corrupt += r.corrupt;
                    if r.torn + r.corrupt > 0 {
                        eprintln!(
                            "palisade agent: journal {}: dropped {} torn and {} damaged record(s)",
                            path.display(),
                            r.torn,
                            r.corrupt
                        );
                    }
                    // The older generation first: the newer one's records come after it.
                    match &mut replay {
                        Some(all) => {
                            all.ops.extend(r.ops);
                            all.torn += r.torn;
                            all.corrupt += r.corrupt;
                        }
                        None => replay = Some(r),
                    }
                }
                Err(e) => read.refusals.push((path.clone(), e.reason(), e.to_string())),
            }
        }
        read.timings.1 += t.elapsed();
        let t = Instant::now();
        let snap = match replay {
            Some(r) => crate::journal::apply(from_blob, r),
            None => match from_blob {
                Some(s) => s,
                None => continue,
            },
        };
        read.timings.2 += t.elapsed();
        let what = blob_path
            .as_ref()
            .map_or("no snapshot".into(), |p| p.display().to_string())
            + &journal_paths
                .iter()
                .map(|p| format!(" and {}", p.display()))
                .collect::<String>();
        read.merged
            .push((snap, blob_path.or(journal_paths.last().cloned()), what));
    }
    read
}

/// Read, check and decode a saved state or snapshot file (a snapshot's
/// TCP windows relaxed); `Err` holds the refusal's reason and message.
fn read_blob(
    path: &Path,
    kind: StateKind,
    identity: &Identity,
) -> Result<palisade_datapath::state::Snapshot, (&'static str, String)> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| ("unreadable", e.to_string()))?;
    if !meta.file_type().is_file() {
        return Err(("not_regular", "not a regular file".into()));
    }
    // The largest blob a table could need (and a bound on what a bad file makes us read).
    let limit = 64 + u64::from(palisade_datapath::state::MAX_RECORDS) * palisade_datapath::state::RECORD_LEN as u64;
    if meta.len() > limit {
        return Err((
            "truncated",
            format!("{} bytes, more than any state file ({limit})", meta.len()),
        ));
    }
    let blob = std::fs::read(path).map_err(|e| ("unreadable", e.to_string()))?;
    // Checked and decoded once, relaxed decoded.
    let mut snap = palisade_datapath::state::decode(&blob).map_err(|e| (refusal_reason(&e), e.to_string()))?;
    check_blob_name(&snap.vnic, identity).map_err(|why| ("foreign", why))?;
    if kind == StateKind::Snapshot {
        snap.relax_tcp_windows();
    }
    Ok(snap)
}

impl Agent {
    /// Load the policy, attach every port in every worker, import saved
    /// connection state and start the HTTP endpoint. `stop` ends the HTTP
    /// threads too. The worker threads start in [`Agent::run`].
    pub fn start(config: AgentConfig, stop: Arc<AtomicBool>) -> Result<Agent, AgentError> {
        let t0 = Instant::now();
        // First, so that every thread started from here has it (see `AgentConfig::nice`).
        let nice = config.nice();
        if nice != 0
            && let Err(e) = set_thread_nice(nice)
        {
            eprintln!("palisade agent: cannot take scheduling priority nice {nice}: {e}; running at the default");
        }
        std::fs::create_dir_all(config.state_dir.join("conntrack"))
            .map_err(io_err(format!("state directory {}", config.state_dir.display())))?;
        // First of all: the lock (an arm in progress finishes first; another
        // agent on this state directory stops this one), then the fallback
        // goes, before any socket is bound (its VXLAN device holds the
        // underlay port) and so that the kernel never forwards beside us.
        let lock = crate::fallback::StateLock::take(&config.state_dir, Duration::from_secs(10))?;
        let disarmed = crate::fallback::disarm(&config.state_dir)?;
        if let Some(e) = &disarmed.episode {
            eprintln!(
                "palisade agent: fail-open fallback removed: zone(s) {} forwarded unfiltered for {} ms",
                e.zones.join(","),
                e.active_ms()
            );
        } else if !disarmed.removed.is_empty() {
            eprintln!(
                "palisade agent: fallback devices removed: {}",
                disarmed.removed.join(",")
            );
        }
        let t_fallback = t0.elapsed();
        let mut n = config.workers();
        if n > 1 && !steer::fanout_ignores_outgoing() {
            eprintln!(
                "palisade agent: warning: this kernel cannot keep a fanout group from seeing the host's own \
                 frames (Linux 6.2 can): running 1 datapath worker, not {n}"
            );
            n = 1;
        }
        // Every worker's AF_PACKET socket on every interface port, opened
        // from here on a thread of its own (joined before `start` returns):
        // it mostly waits for the kernel's grace periods, the longest wait
        // of a start, and needs only the configuration's interfaces (in the
        // engines' port order: the vNICs', then the appliances'), not the
        // policy nor the engines, which are built meanwhile. After the
        // fallback is gone, as every socket.
        let opening = {
            let interfaces: Vec<(String, String)> = config
                .vnics
                .iter()
                .map(|v| (v.name.clone(), v.port_label()))
                .chain(config.appliances.iter().map(|a| (a.name.clone(), a.interface.clone())))
                .collect();
            let is_vhost: Vec<bool> = config
                .vnics
                .iter()
                .map(|v| matches!(v.attachment(), crate::config::VnicAttachment::VhostUser { .. }))
                .chain(config.appliances.iter().map(|_| false))
                .collect();
            let rx = config.af_packet_rx;
            std::thread::Builder::new()
                .name("palisade-open".into())
                .spawn(move || open_af_packet_ports(&interfaces, &is_vhost, n, rx))
                .map_err(io_err("starting the socket opening"))?
        };
        // The state the runs before left, read and decoded while the policy
        // and the engines are built (joined at the import), and this run's
        // journals made ready (see `Agent::start_journals`).
        let identity = Identity::new(&config.host, config.vnics.iter().map(|v| v.name.as_str()));
        let reading = {
            let (dir, identity) = (config.state_dir.clone(), identity.clone());
            let journals = config.state_snapshot_interval().map(|_| n);
            std::thread::Builder::new()
                .name("palisade-state".into())
                .spawn(move || {
                    let mut read = read_state(&dir, &identity);
                    if let Some(n) = journals {
                        read.fresh = fresh_journals(&dir, &identity, &read, n);
                    }
                    read
                })
                .map_err(io_err("starting the state reading"))?
        };
        let (audit_gate, gate) = std::sync::mpsc::channel();
        let audit_opening = open_trail(&config, &stop, gate)?;
        let (compiler, policy_stamp, upstream, revision) = match (&config.policy, &config.controller) {
            (Some(dir), _) => (Arc::new(load_policy(dir)?), policy_stamp(dir), None, None),
            (None, Some(cc)) => {
                let client = crate::upstream::client(cc)?;
                // Kept by the watcher: each new version then parses only the
                // VMs it changed.
                let mut loader = Loader::new();
                // The last good policy first: the controller may be down.
                let (bundle, compiler) = match crate::upstream::load_saved(&config.state_dir, &mut loader) {
                    Some(saved) => {
                        eprintln!(
                            "palisade agent: enforcing saved controller policy revision {} until the controller answers",
                            saved.0.revision
                        );
                        saved
                    }
                    None => {
                        crate::upstream::first_policy(&client, &config.host, &config.state_dir, &stop, &mut loader)?
                    }
                };
                let compiler = Arc::new(compiler);
                let rx = crate::upstream::watch(
                    client,
                    config.host.clone(),
                    config.state_dir.clone(),
                    (bundle.clone(), compiler.clone(), loader),
                    stop.clone(),
                )?;
                (compiler, None, Some(rx), Some(bundle.revision))
            }
            (None, None) => {
                return Err(AgentError::Policy {
                    dir: PathBuf::new(),
                    message: "no policy source configured".into(),
                });
            }
        };
        // Shared with the workers' lookup, not copied (50,000 VMs at scale).
        let model = compiler.model();
        for v in &config.vnics {
            if let Some((vm, _)) = model.inventory.vnic(&v.name)
                && vm.host.as_deref().is_some_and(|h| h != config.host)
            {
                eprintln!(
                    "palisade agent: warning: vnic {} belongs to host {:?} in the inventory, attached here to {}",
                    v.name, vm.host, config.host
                );
            }
        }
        let identities = Arc::new(Identities::new(model));
        // One compiled policy for all workers: it is read-only.
        let lookup = Arc::new(PolicyLookup::new(compiler.clone()));
        let t_policy = t0.elapsed();
        let mut workers = Vec::new();
        let mut ports = Vec::new();
        let (vhost, vhost_ports) = crate::vhost::open(&config, n, &|name| inventory_mac(model, name))?;
        // The first engine here, the others at the same time, each on a
        // thread of its own: building one (the host's tables, each port's
        // pipeline) is worker-local work.
        let engines = std::thread::scope(|s| -> Result<Vec<(Engine, Vec<PortBinding>)>, AgentError> {
            let others: Vec<_> = (1..n)
                .map(|_| {
                    let (config, lookup) = (&config, lookup.clone());
                    s.spawn(move || build_engine(config, model, lookup, n))
                })
                .collect();
            let first = build_engine(&config, model, lookup.clone(), n)?;
            let mut all = vec![first];
            for h in others {
                all.push(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))?);
            }
            Ok(all)
        })?;
        // One key for every engine: a probe may come back to any worker.
        let probe_key = palisade_datapath::probe::ProbeKey::random();
        for (mut engine, p) in engines {
            engine.set_probe_key(probe_key.clone());
            ports = p;
            workers.push(Arc::new(Mutex::new(WorkerCore::new(engine, identities.clone()))));
        }
        let t_sockets = t0.elapsed();
        let origin = Instant::now();
        let unix_now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let clock = Clock {
            unix_at_zero: unix_now.as_nanos() as u64,
        };
        let ipfix = match config.ipfix {
            Some(collector) => {
                let e = palisade_audit::ipfix::IpfixExporter::connect(collector, 1)
                    .map_err(io_err(format!("IPFIX socket towards {collector}")))?;
                Some(match config.ipfix_rate {
                    Some(r) => e.with_rate_limit(r),
                    None => e,
                })
            }
            None => None,
        };
        let to_controller = match &config.controller {
            Some(cc) => Some(crate::upstream::flow_pusher(
                crate::upstream::client(cc)?,
                config.host.clone(),
                stop.clone(),
            )?),
            None => None,
        };
        let to_controller_health = match &config.controller {
            Some(cc) => Some(crate::upstream::health_pusher(
                crate::upstream::client(cc)?,
                config.host.clone(),
                stop.clone(),
            )?),
            None => None,
        };
        let alert_queue = match (&config.controller, &config.inspect) {
            (Some(cc), Some(_)) => {
                let q = crate::upstream::AlertQueue::new();
                crate::upstream::alert_pusher(
                    crate::upstream::client(cc)?,
                    config.host.clone(),
                    q.clone(),
                    stop.clone(),
                )?;
                Some(q)
            }
            _ => None,
        };
        let zones = zones_of(&config, model);
        let shared: Shared = Arc::new(Mutex::new(Arc::new(Published::default())));
        let migrations = Arc::new(Mutex::new(Vec::new()));
        let peer_tls = match (&config.controller, &config.migration) {
            (Some(cc), Some(mc)) if mc.listen.is_some() || !mc.peers.is_empty() => match (&cc.ca, &cc.cert, &cc.key) {
                (Some(ca), Some(cert), Some(key)) => Some(Arc::new(
                    crate::peer::PeerTls::load(&config.host, ca, cert, key)
                        .map_err(|e| AgentError::Controller(e.to_string()))?,
                )),
                _ => None,
            },
            _ => None,
        };
        let control = Arc::new(VnicControl {
            workers: workers.clone(),
            origin,
            host: config.host.clone(),
            records: migrations.clone(),
            peer_tls: peer_tls.clone(),
            precopied: Mutex::new(std::collections::HashMap::new()),
            inspect_marks: Mutex::new(HashMap::new()),
            delta_phases: Mutex::new(HashMap::new()),
            imported: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            holds_started: Mutex::new(HashMap::new()),
            quiet_staged: Mutex::new(std::collections::HashSet::new()),
            apply_locks: Mutex::new(HashMap::new()),
        });
        if let (Some(mc), Some(tls)) = (&config.migration, &peer_tls)
            && let Some(listen) = &mc.listen
        {
            let (bound, _) = crate::peer::listen(listen, tls.clone(), control.clone(), stop.clone(), mc.timeout())
                .map_err(|e| AgentError::Controller(format!("migration listener: {e}")))?;
            eprintln!("palisade agent: taking migration state from peers on {bound} (mutual TLS)");
        }
        let arrival_counts = config
            .controller
            .as_ref()
            .map(|_| Arc::new(crate::arrivals::ArrivalCounts::default()));
        if let (Some(cc), Some(counts)) = (&config.controller, &arrival_counts) {
            // A guest that arrives without the controller's order: detected,
            // reported, held for its state (detached, ends with `stop`).
            // Often: the report, and so the state's arrival, waits for it.
            let poll = config
                .migration
                .as_ref()
                .map_or(Duration::from_millis(200), |m| m.poll().min(Duration::from_millis(200)));
            crate::arrivals::watch(
                crate::upstream::client(cc)?,
                config.host.clone(),
                control.clone(),
                counts.clone(),
                poll,
                stop.clone(),
            )?;
        }
        if let Some(cc) = &config.controller {
            // Detached like the other upstream threads: it ends with `stop`.
            // Without `[migration]` it still pre-stages migrations to this
            // host and fails, with the reason, those from it.
            crate::orders::watch(
                crate::upstream::client(cc)?,
                config.host.clone(),
                config.migration.clone(),
                control.clone(),
                stop.clone(),
            )?;
        }
        http::serve_with_control(
            shared.clone(),
            config.metrics,
            &config.state_dir.join("agent.sock"),
            stop,
            Some(control),
        )
        .map_err(io_err("agent HTTP endpoint"))?;
        let signatures = match &config.inspect {
            Some(ic) => {
                let sigs = Arc::new(Signatures::load(ic, model)?);
                if sigs.refused > 0 {
                    eprintln!(
                        "palisade agent: inspection: {} rule(s) refused in {}",
                        sigs.refused,
                        ic.rules.display()
                    );
                }
                Some(sigs)
            }
            None => {
                warn_uninspected(model);
                None
            }
        };
        let default_decisions = config.vnics.iter().map(|v| (v.name.clone(), 0)).collect();
        let mut agent = Agent {
            config,
            workers,
            io: Vec::new(),
            ports,
            vhost,
            policy_stamp,
            upstream,
            revision,
            origin,
            clock,
            audit: None,
            audit_opening: audit_opening.map(|h| (h, Vec::new())),
            audit_gate: Some(audit_gate),
            ipfix,
            to_controller,
            controller_batch: Vec::new(),
            controller_dropped: 0,
            last_retention: None,
            recent: VecDeque::new(),
            default_decisions,
            arrivals: arrival_counts,
            migrations,
            shared,
            policy_errors: 0,
            last_policy_error: None,
            appliance_links: std::collections::HashMap::new(),
            probes: palisade_datapath::probe::ProbeMonitor::new(probe_key),
            snapshots: SnapshotTimer::new(None, origin),
            resumed: None,
            imported_saved: false,
            older_journals: false,
            first_snapshot: FirstSnapshot::None,
            after_ready: None,
            fresh_journals: None,
            state_refused: Default::default(),
            refusals: Vec::new(),
            identity,
            _lock: lock,
            fail_open: disarmed.episode,
            fallback_open: None,
            workers_alive: 0,
            policy_installed: Instant::now(),
            zones,
            drop_baseline: Default::default(),
            last_report: None,
            to_controller_health,
            notifier: crate::notify::Notifier::from_env(),
            signatures,
            inspect_errors: 0,
            last_inspect_error: None,
            alerts: AlertRing::default(),
            alerts_json: String::new(),
            alert_queue,
            alert_stats: AlertStats::default(),
            fast_path: crate::fastpath::Status {
                mode: "off",
                ..Default::default()
            },
        };
        agent.start_inspection(model);
        agent.start_takeover(model);
        let t_rest = t0.elapsed();
        agent.save_fallback_plan(model);
        let t_plan = t0.elapsed();
        agent.import_state(reading.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        let t_import = t0.elapsed();
        agent.start_journals();
        let t_journal = t0.elapsed();
        agent.attach_sockets(Some(opening), vhost_ports)?;
        let t_attach = t0.elapsed();
        agent.publish();
        eprintln!(
            "palisade agent: start-up {:.1?} ({:.1?} of CPU): fallback {:.1?}, policy {:.1?}, engines {:.1?}, audit/http {:.1?}, \
             plan {:.1?}, state import {:.1?}, first snapshot and journals {:.1?}, sockets (rest) {:.1?}, publish {:.1?}",
            t0.elapsed(),
            process_cpu(),
            t_fallback,
            t_policy - t_fallback,
            t_sockets - t_policy,
            t_rest - t_sockets,
            t_plan - t_rest,
            t_import - t_plan,
            t_journal - t_import,
            t_attach - t_journal,
            t0.elapsed() - t_attach
        );
        Ok(agent)
    }

    fn now(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// Give each worker its sockets once `opening` has opened them (and the
    /// vhost-user vNICs' queues).
    fn attach_sockets(
        &mut self,
        opening: Option<SocketsOpening>,
        mut vhost_ports: crate::vhost::VhostPorts,
    ) -> Result<(), AgentError> {
        let n = self.workers.len();
        let mut opened = match opening {
            Some(t) => t.join().map_err(|_| AgentError::Port {
                what: "the interfaces".into(),
                message: "the thread opening their sockets panicked".into(),
            })??,
            None => Vec::new(),
        };
        for i in 0..n {
            let io = open_sockets(&self.config, &self.ports, &mut opened, &mut vhost_ports, i, n)?;
            self.io.push(io);
        }
        self.set_up_fast_path();
        Ok(())
    }

    /// With `fast_path = "kernel"`, load and attach the kernel fast path
    /// (`crate::fastpath`) on the vNIC ports' sockets and netdevs and the
    /// underlay, and give each worker its part. When the kernel refuses, the
    /// agent runs without it and says so (log, `/health`).
    fn set_up_fast_path(&mut self) {
        use std::os::fd::BorrowedFd;
        if self.config.fast_path != crate::config::FastPathMode::Kernel {
            return;
        }
        let vnic_names: std::collections::HashSet<&str> = self.config.vnics.iter().map(|v| v.name.as_str()).collect();
        let vnics: Vec<(PortId, String, Vec<BorrowedFd<'_>>)> = self
            .ports
            .iter()
            .enumerate()
            .filter(|(_, p)| vnic_names.contains(p.name.as_str()))
            .map(|(j, p)| {
                let fds = self
                    .io
                    .iter()
                    .filter_map(|w| w.ports.get(j))
                    .filter(|a| a.port == p.port && a.io.fd() >= 0)
                    // SAFETY: the descriptor belongs to a socket in `self.io`, which outlives this borrow.
                    .map(|a| unsafe { BorrowedFd::borrow_raw(a.io.fd()) })
                    .collect();
                (p.port, p.interface.clone(), fds)
            })
            .collect();
        let snap = af_packet_config(self.workers.len(), self.config.af_packet_rx).frame_size as u32;
        let local = self.config.underlay.local;
        match crate::fastpath::KernelPath::set_up(local, self.config.underlay.port, snap, &vnics) {
            Ok((shared, status)) => {
                eprintln!(
                    "palisade agent: kernel fast path on: vNICs [{}]{}",
                    status.interfaces.join(","),
                    if status.skipped.is_empty() {
                        String::new()
                    } else {
                        format!("; left to user space: {}", status.skipped.join("; "))
                    }
                );
                let shared = Arc::new(shared);
                for w in &self.workers {
                    crate::worker::lock(w).fast = Some(crate::fastpath::FastPath::new(shared.clone()));
                }
                self.fast_path = status;
            }
            Err(e) => {
                eprintln!("palisade agent: kernel fast path refused, running without it: {e}");
                self.fast_path = crate::fastpath::Status {
                    mode: "kernel",
                    active: false,
                    error: Some(e),
                    ..Default::default()
                };
            }
        }
    }

    /// Write the fail-open plan of `model` for whoever arms the fallback
    /// while we are gone. A plan that cannot be made is removed, and said:
    /// then nothing arms and every zone fails closed.
    fn save_fallback_plan(&mut self, model: &Model) {
        let dir = &self.config.state_dir;
        let made = crate::fallback::FallbackPlan::build(&self.config, model);
        let result = made.and_then(|p| p.save(dir).map(|()| p));
        match result {
            Ok(p) => {
                let open = p.open_zones();
                if self.fallback_open.as_ref() != Some(&open) {
                    eprintln!(
                        "palisade agent: fail-open fallback planned for zone(s) [{}]; the others fail closed",
                        open.join(",")
                    );
                }
                self.fallback_open = Some(open);
            }
            Err(e) => {
                let _ = std::fs::remove_file(dir.join(crate::fallback::PLAN_FILE));
                eprintln!("palisade agent: no fail-open fallback (every zone fails closed): {e}");
                self.fallback_open = None;
            }
        }
    }

    /// Import the connection state the runs before left, as [`read_state`]
    /// read it, each connection into the worker its flows are steered to: a
    /// clean stop's saved state if there is one (then removed: it is stale
    /// once used), else the snapshots a crash left, their TCP windows
    /// relaxed (see [`crate::snapshot`]), each with the crash journals its
    /// worker wrote after it replayed over it (see [`crate::journal`]). A
    /// file that fails its checks (damaged, truncated, of another version,
    /// another host's or another vNIC set's) is refused with a message
    /// naming it and the problem, and counted by reason; the agent then
    /// starts without it, never stops for it.
    fn import_state(&mut self, read: StateRead) {
        let dir = self.config.state_dir.clone();
        let StateRead {
            kind,
            merged,
            refusals,
            journal,
            newest_age,
            timings: (t_blob, t_journal, t_apply),
            fresh,
        } = read;
        self.fresh_journals = fresh;
        for (path, reason, why) in refusals {
            self.refuse(&path, reason, &why);
        }
        let now = self.now();
        let mut resumed_total = 0;
        let t = Instant::now();
        let (snaps, sources): (Vec<_>, Vec<_>) =
            merged.into_iter().map(|(s, source, what)| (s, (source, what))).unzip();
        for ((source, what), (resumed, refused)) in sources.into_iter().zip(self.import_decoded(snaps, now)) {
            if let Some(e) = refused {
                self.refuse(&source.unwrap_or_default(), refusal_reason(&e), &e.to_string());
            }
            eprintln!("palisade agent: resumed {resumed} connection(s) from {what}");
            resumed_total += resumed;
        }
        let t_import = t.elapsed();
        eprintln!(
            "palisade agent: state import: files {t_blob:.1?}, journals {t_journal:.1?}, merge {t_apply:.1?}, into the tables {t_import:.1?}"
        );
        if kind == StateKind::Saved {
            for old in state_files(&dir, StateKind::Saved) {
                let _ = std::fs::remove_file(old);
            }
            // A clean stop's state supersedes any snapshot or journal the run before it left.
            for old in state_files(&dir, StateKind::Snapshot)
                .into_iter()
                .chain(state_files(&dir, StateKind::Journal))
                .chain(state_files(&dir, StateKind::PrevJournal))
            {
                let _ = std::fs::remove_file(old);
            }
        }
        self.imported_saved = kind == StateKind::Saved;
        if newest_age.is_some() || journal.records > 0 {
            self.resumed = Some(Resumed {
                from: match kind {
                    StateKind::Saved => "saved",
                    _ => "snapshot",
                },
                connections: resumed_total,
                age_ms: newest_age.unwrap_or_default().as_millis() as u64,
                journal,
            });
        }
        // The first snapshot one interval from now (the files just read stay
        // until then, in case this run crashes first).
        self.snapshots = SnapshotTimer::new(self.config.state_snapshot_interval(), Instant::now());
    }

    /// Hand each connection of every snapshot in `snaps` to the worker its
    /// flows are steered to; returns per snapshot how many were imported
    /// and why some were not (the first worker's refusal).
    ///
    /// Every worker imports its shares of all the snapshots at once, each
    /// on a thread of its own: a worker's file holds (nearly) only its own
    /// connections, so importing file by file kept one worker busy while
    /// the others waited.
    fn import_decoded(
        &mut self,
        snaps: Vec<palisade_datapath::state::Snapshot>,
        now: u64,
    ) -> Vec<(usize, Option<palisade_datapath::StateError>)> {
        let n = self.workers.len() as u32;
        // By worker, its share of each snapshot (in the snapshots' order), in one pass over each.
        let mut shares: Vec<Vec<palisade_datapath::state::Snapshot>> = (0..n).map(|_| Vec::new()).collect();
        for snap in snaps {
            // Counted first, so that each share is allocated once, to size.
            let to: Vec<usize> = snap
                .conns
                .iter()
                .map(|c| (steer::addresses_worker(c.key.src_addr(), c.key.dst_addr(), n) as usize).min(n as usize - 1))
                .collect();
            let mut sizes = vec![0; n as usize];
            for &w in &to {
                sizes[w] += 1;
            }
            // All of it one worker's (a worker's own file, the usual case): moved whole.
            let whole = sizes.iter().position(|&size| size == snap.conns.len());
            let mut parts: Vec<palisade_datapath::state::Snapshot> = sizes
                .iter()
                .map(|&size| palisade_datapath::state::Snapshot {
                    vnic: snap.vnic.clone(),
                    policy_version: snap.policy_version,
                    conns: Vec::with_capacity(if whole.is_some() { 0 } else { size }),
                })
                .collect();
            match whole {
                Some(w) => parts[w].conns = snap.conns,
                None => {
                    for (c, w) in snap.conns.into_iter().zip(to) {
                        parts[w].conns.push(c);
                    }
                }
            }
            for (w, part) in parts.into_iter().enumerate() {
                shares[w].push(part);
            }
        }
        let results: Vec<Vec<Result<usize, palisade_datapath::StateError>>> = std::thread::scope(|s| {
            let imports: Vec<_> = self
                .workers
                .iter()
                .zip(shares)
                .map(|(core, parts)| {
                    s.spawn(move || {
                        let mut core = lock(core);
                        // Imported connections are not new flows: their start was
                        // recorded before the restart. Their events are not kept.
                        parts
                            .into_iter()
                            .map(|part| core.engine.import_decoded_where(part, now, &mut (), |_| true))
                            .collect()
                    })
                })
                .collect();
            imports
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let files = results.first().map_or(0, Vec::len);
        let mut out: Vec<(usize, Option<palisade_datapath::StateError>)> = (0..files).map(|_| (0, None)).collect();
        for worker in results {
            for ((resumed, refused), r) in out.iter_mut().zip(worker) {
                match r {
                    Ok(k) => *resumed += k,
                    Err(e) => {
                        refused.get_or_insert(e);
                    }
                }
            }
        }
        out
    }

    /// Say that the state file `path` was refused and why, and count it.
    fn refuse(&mut self, path: &Path, reason: &'static str, why: &str) {
        eprintln!(
            "palisade agent: state file {} refused ({reason}): {why}; starting without it",
            path.display()
        );
        *self.state_refused.entry(reason).or_default() += 1;
        if self.refusals.len() < REFUSALS_KEPT {
            self.refusals.push(Refusal {
                file: path.to_path_buf(),
                reason,
                message: why.to_string(),
            });
        }
    }

    /// Open each worker's crash journal, empty, with nothing the runs before
    /// wrote lost if this one crashes before its first snapshot round.
    /// Without snapshots there is no journal. A journal that cannot be made
    /// is said once; that worker runs on snapshots alone.
    ///
    /// After a crash (the usual case) the previous run's journals become
    /// the older generation, `host-N.journal.prev`, and this run's fresh
    /// journals (both done by the thread that read the state, once it has:
    /// [`fresh_journals`]) the newer: the snapshots a crash left, the older and the
    /// newer generation together hold everything, so the first snapshot
    /// round need not finish before forwarding starts. It is due at once,
    /// on the control thread, and removes the older generation once every
    /// worker's file is written. A start that finds an older generation
    /// already there (the run before crashed before its first round), that
    /// resumed a clean stop's saved state (removed once read), or that
    /// cannot move a journal aside takes the round here, before forwarding,
    /// as a chain of generations is never built.
    fn start_journals(&mut self) {
        if self.config.state_snapshot_interval().is_none() {
            return;
        }
        let dir = self.config.state_dir.clone();
        if let Some(fresh) = self.fresh_journals.take() {
            // Made while the state was read: forward first, snapshot soon after.
            self.first_snapshot = FirstSnapshot::AfterForwarding;
            self.older_journals = fresh.moved_aside;
            self.snapshots.first_round_after_start(Instant::now());
            for ((i, core), j) in self.workers.iter().enumerate().zip(fresh.journals) {
                match j {
                    Ok(j) => lock(core).journal = Some(j),
                    Err(e) => eprintln!(
                        "palisade agent: crash journal {}: {e}; worker {i} runs on snapshots alone",
                        state_path(&dir, i, StateKind::Journal).display()
                    ),
                }
            }
            return;
        }
        self.first_snapshot = FirstSnapshot::BeforeForwarding;
        self.older_journals = !state_files(&dir, StateKind::PrevJournal).is_empty();
        self.snapshot();
        if self.snapshots.failing() {
            return;
        }
        for (i, core) in self.workers.iter().enumerate() {
            let path = state_path(&dir, i, StateKind::Journal);
            match Journal::create(&path, self.identity.clone(), i as u32, crate::journal::DEFAULT_CAPACITY) {
                Ok(j) => lock(core).journal = Some(j),
                Err(e) => eprintln!(
                    "palisade agent: crash journal {}: {e}; worker {i} runs on snapshots alone",
                    path.display()
                ),
            }
        }
    }

    /// Write every worker's connections to its snapshot file (each worker is
    /// locked only while its table is encoded, and its journal switched to
    /// the other half at that moment).
    fn snapshot(&mut self) {
        let started = Instant::now();
        let now = self.now();
        let name = crate::snapshot::blob_name(&self.identity);
        let (mut connections, mut bytes, mut ok) = (0u64, 0u64, true);
        let dir = &self.config.state_dir;
        let name = &name;
        // Every worker's table encoded and written at once, each on a thread of its own.
        let written: Vec<(u64, u64, PathBuf, std::io::Result<()>, Duration)> = std::thread::scope(|s| {
            let rounds: Vec<_> = self
                .workers
                .iter()
                .enumerate()
                .map(|(i, core)| {
                    s.spawn(move || {
                        let (n, blob, held) = {
                            let mut core = lock(core);
                            let locked = Instant::now();
                            core.settle_fast_path(now, None);
                            let n = core.engine.conntrack().len() as u64;
                            let blob = core.engine.export_all_named(name, now);
                            if let Some(j) = &mut core.journal {
                                j.rotate();
                            }
                            (n, blob, locked.elapsed())
                        };
                        let path = state_path(dir, i, StateKind::Snapshot);
                        let result = write_state(&path, &blob);
                        // A round not written holds the next rotation back
                        // (the older half is then the only copy of its events).
                        if let Some(j) = &mut lock(core).journal {
                            j.snapshot_saved(result.is_ok());
                        }
                        (n, blob.len() as u64, path, result, held)
                    })
                })
                .collect();
            rounds
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let mut held = Duration::ZERO;
        for (n, len, path, result, h) in written {
            held = held.max(h);
            connections += n;
            bytes += len;
            if let Err(e) = result {
                // Said once when snapshots start failing, not every round.
                if ok && !self.snapshots.failing() {
                    eprintln!("palisade agent: state snapshot {}: {e}", path.display());
                }
                ok = false;
            }
        }
        let ended = Instant::now();
        if crate::quiet::log_holds() {
            let at = crate::quiet::monotonic_ns();
            eprintln!(
                "palisade agent: snapshot round of {connections} connections: lock held {} us at most, round {} us; from {} ns to {at} ns",
                held.as_micros(),
                (ended - started).as_micros(),
                at.saturating_sub((ended - started).as_nanos() as u64),
            );
        }
        self.snapshots.done(started, ended, connections, bytes, ok);
        if let Some(a) = &mut self.after_ready {
            a.snapshot_round(started, ended, held);
        }
        if ok && self.older_journals {
            // Every worker's file now holds what the older generation added.
            for old in state_files(&self.config.state_dir, StateKind::PrevJournal) {
                if let Err(e) = std::fs::remove_file(&old) {
                    eprintln!("palisade agent: older crash journal {}: {e}", old.display());
                }
            }
            self.older_journals = false;
        }
    }

    /// Serve until `stop` is set: start one thread per worker, then take
    /// their records, install policies and publish metrics here. Returns an
    /// error if a worker fails (the others are stopped first).
    pub fn run(&mut self, stop: &AtomicBool) -> Result<(), AgentError> {
        let ready = Instant::now();
        self.after_ready = Some(crate::after_ready::AfterReady::new(
            ready,
            self.clock.unix(self.now()),
            self.first_snapshot == FirstSnapshot::AfterForwarding && self.snapshots.stats.written == 0,
        ));
        if self.first_snapshot == FirstSnapshot::AfterForwarding && self.snapshots.stats.written == 0 {
            // Not with the first new flows: see `SnapshotTimer::first_round_after_start`.
            self.snapshots.first_round_after_start(ready);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let halt = AtomicBool::new(false);
        let ios = std::mem::take(&mut self.io);
        std::thread::scope(|scope| {
            let mut handles = Vec::new();
            for (index, io) in ios.into_iter().enumerate() {
                let worker = Worker {
                    index,
                    host: self.config.host.clone(),
                    origin: self.origin,
                    clock: self.clock,
                    core: self.workers[index].clone(),
                    io,
                    records: tx.clone(),
                };
                let halt = &halt;
                let h = std::thread::Builder::new()
                    .name(format!("palisade-w{index}"))
                    .spawn_scoped(scope, move || worker.run(halt));
                match h {
                    Ok(h) => handles.push(h),
                    Err(e) => {
                        halt.store(true, Ordering::Relaxed);
                        return Err(io_err(format!("starting worker {index}"))(e));
                    }
                }
            }
            drop(tx);
            if let Some(a) = &mut self.after_ready {
                a.workers_started(Instant::now());
            }
            let served = self.control(&rx, stop, &handles);
            halt.store(true, Ordering::Relaxed);
            let failures: Vec<Option<String>> = handles
                .into_iter()
                .map(|h| match h.join() {
                    Ok(Ok(())) => None,
                    Ok(Err(why)) => Some(why.to_string()),
                    Err(_) => Some("it panicked".to_string()),
                })
                .collect();
            let result = match served {
                // The control loop saw a worker stop; its join says why.
                Err(AgentError::Worker { index, message }) => Err(AgentError::Worker {
                    index,
                    message: failures[index].clone().unwrap_or(message),
                }),
                Ok(()) => match failures.into_iter().enumerate().find_map(|(i, f)| Some((i, f?))) {
                    Some((index, message)) => Err(AgentError::Worker { index, message }),
                    None => Ok(()),
                },
                other => other,
            };
            // What the workers recorded before they stopped.
            for batch in rx.try_iter() {
                self.keep_all(batch);
            }
            result
        })
    }

    /// The control loop: until `stop`, or until a worker stops on its own.
    fn control(
        &mut self,
        rx: &Receiver<Vec<FlowRecord>>,
        stop: &AtomicBool,
        workers: &[std::thread::ScopedJoinHandle<'_, Result<(), crate::worker::WorkerFailure>>],
    ) -> Result<(), AgentError> {
        let mut last_housekeeping = Instant::now();
        let mut last_publish = Instant::now();
        let mut last_health = Instant::now();
        let mut last_links = Instant::now();
        let mut last_probes = Instant::now();
        let health_interval = self.health_interval();
        // The workers were started just before.
        let workers_started = Instant::now();
        self.workers_alive = workers.iter().filter(|h| !h.is_finished()).count() as u32;
        self.notifier.ready(&format!(
            "{} datapath worker(s) on {} port(s)",
            self.workers_alive,
            self.ports.len()
        ));
        while !stop.load(Ordering::Relaxed) {
            // Fed from this loop: a loop that stops turning gets the agent restarted.
            self.notifier.watchdog();
            // Records wake the loop; otherwise it ticks to take policies and publish.
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(batch) => self.keep_all(batch),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
            }
            for batch in rx.try_iter() {
                self.keep_all(batch);
            }
            self.poll_trail(false)?;
            let moved = std::mem::take(&mut *self.migrations.lock().unwrap_or_else(|p| p.into_inner()));
            if let Some(t) = &mut self.audit {
                for rec in moved {
                    t.push(Record::Change(rec));
                }
                t.maybe_flush()?;
            } else if let Some((_, kept)) = &mut self.audit_opening {
                // Kept until the trail is open (it opens on a thread of its own at start).
                kept.extend(moved.into_iter().map(Record::Change));
            }
            self.workers_alive = workers.iter().filter(|h| !h.is_finished()).count() as u32;
            if let Some(index) = workers.iter().position(|h| h.is_finished()) {
                // Its join (in `run`) says why; fail now so the others stop and the error shows.
                return Err(AgentError::Worker {
                    index,
                    message: "stopped".into(),
                });
            }
            self.take_upstream();
            if last_links.elapsed() >= APPLIANCE_LINK_POLL {
                last_links = Instant::now();
                self.poll_appliance_links();
            }
            if last_probes.elapsed() >= APPLIANCE_PROBE_TICK {
                last_probes = Instant::now();
                self.probe_appliances();
            }
            if last_housekeeping.elapsed() >= Duration::from_secs(1) {
                last_housekeeping = Instant::now();
                self.housekeeping();
            }
            // Not in a migration's flight: its pause would wait for the
            // round's locks (see `crate::quiet`); taken when it is over.
            if self.snapshots.due(Instant::now()) && !crate::quiet::QUIET.migration_quiet() {
                self.snapshot();
            }
            if self.audit_gate.is_some() && workers_started.elapsed() >= AUDIT_OPEN_AFTER_WORKERS {
                // The trail's opening may begin.
                if let Some(gate) = self.audit_gate.take() {
                    let _ = gate.send(());
                }
            }
            if let Some(line) = self.after_ready.as_mut().and_then(|a| a.line(Instant::now())) {
                eprintln!("{line}");
            }
            if last_health.elapsed() >= health_interval {
                // A report boundary: publish fresh figures, send them, and
                // count the next report's drops from here.
                last_health = Instant::now();
                last_publish = last_health;
                self.publish();
                self.report_health();
            } else if last_publish.elapsed() >= Duration::from_millis(500) {
                last_publish = Instant::now();
                self.publish();
            }
        }
        Ok(())
    }

    /// Give the engines the link state of every vNIC that is one side of a
    /// service-chain appliance (its host interface's carrier): an instance
    /// with a side down gets no new packets, its flows move to another
    /// instance or follow the chain's `on_failure`. Only changes are pushed.
    fn poll_appliance_links(&mut self) {
        let sides: Vec<String> = match self.workers.first() {
            Some(core) => lock(core)
                .engine
                .service_chains()
                .iter()
                .flat_map(|c| c.instances.iter())
                .flat_map(|i| [&i.vnic_in, &i.vnic_out])
                .filter(|(_, port)| port.is_some())
                .map(|(name, _)| name.to_string())
                .collect(),
            None => return,
        };
        for vnic in sides {
            let Some(interface) = self
                .config
                .vnics
                .iter()
                .find(|v| v.name == vnic)
                .and_then(|v| v.interface.as_deref())
            else {
                continue;
            };
            let up = crate::links::carrier(interface);
            if self.appliance_links.get(&vnic) == Some(&up) {
                continue;
            }
            eprintln!(
                "palisade agent: appliance vNIC {vnic} ({interface}) link {}",
                if up { "up" } else { "down" }
            );
            self.appliance_links.insert(vnic.clone(), up);
            for core in &self.workers {
                let mut core = lock(core);
                if let Some(port) = core.engine.port_of(&vnic) {
                    core.engine.set_port_link(port, up);
                }
            }
        }
    }

    /// Run the service-chain probes (every [`APPLIANCE_PROBE_TICK`]; the
    /// monitor starts a chain's round when its interval is due): take back what the engines
    /// received, hand health changes to every engine, and queue the new
    /// round's frames on the first worker, which sends them with its next
    /// round. Nothing to do (one lock) when no chain is declared.
    fn probe_appliances(&mut self) {
        let Some(first) = self.workers.first() else { return };
        let chains = {
            let core = lock(first);
            if core.engine.service_chains().is_empty() {
                return;
            }
            core.engine.service_chains().to_vec()
        };
        let mut returns = Vec::new();
        for core in &self.workers {
            lock(core).engine.take_probe_returns(&mut returns);
        }
        let now = self.origin.elapsed().as_nanos() as u64;
        let mut frames = Vec::new();
        let changes = self.probes.tick(now, &chains, &returns, &mut frames);
        for c in &changes {
            if let Some((chain, inst)) = chains
                .get(usize::from(c.chain))
                .and_then(|ch| Some((&ch.name, ch.instances.get(usize::from(c.instance))?)))
            {
                eprintln!(
                    "palisade agent: service chain {chain} appliance {} probes {}",
                    inst.vm,
                    if c.up {
                        "answer again: in service"
                    } else {
                        "lost: out of service"
                    }
                );
            }
        }
        for core in &self.workers {
            let mut core = lock(core);
            for c in &changes {
                // Resolved against each engine's own chains: a worker that has
                // not yet taken a policy change the first one has may number
                // them differently.
                if let Some((ci, ii)) = same_instance(&chains, core.engine.service_chains(), c.chain, c.instance) {
                    core.engine.set_probe_health(ci, ii, c.up);
                }
            }
        }
        if !frames.is_empty() {
            lock(first).probe_out.extend(frames);
        }
    }

    /// Install the newest policy the controller sent, if any (checked every
    /// tick: an atomic load when there is none, and a change takes effect
    /// within a tick of its arrival).
    fn take_upstream(&mut self) {
        let mut newest = None;
        while let Some(i) = self.upstream.as_ref().and_then(|rx| rx.try_recv().ok()) {
            newest = Some(i);
        }
        if let Some(i) = newest {
            self.install(i.compiler);
            self.revision = Some(i.revision);
            eprintln!("palisade agent: controller policy revision {} installed", i.revision);
        }
    }

    /// Take the audit trail once it has opened (`wait`: wait for it),
    /// queueing the records kept meanwhile. A trail that fails to open
    /// stops the agent, as a failing append does: the few records of the
    /// start-up are then lost with the process, as a batch not yet
    /// appended would be.
    fn poll_trail(&mut self, wait: bool) -> Result<(), AgentError> {
        if wait {
            // Whatever held it back: it must open now.
            self.audit_gate = None;
        }
        let finished = self
            .audit_opening
            .as_ref()
            .is_some_and(|(h, _)| wait || h.is_finished());
        if !finished {
            return Ok(());
        }
        let Some((handle, kept)) = self.audit_opening.take() else {
            return Ok(());
        };
        let mut trail = handle.join().map_err(|_| AgentError::Audit {
            dir: self.config.audit.clone().unwrap_or_default(),
            message: "opening the trail panicked".into(),
        })??;
        for r in kept {
            trail.push(r);
        }
        self.audit = Some(trail);
        Ok(())
    }

    /// Export records, apply retention, reload a changed policy.
    fn housekeeping(&mut self) {
        let now = self.now();
        let unix_s = (self.clock.unix(now) / 1_000_000_000) as u32;
        if let Some(t) = &mut self.audit
            && let Err(e) = t.tick(self.clock.unix(now))
        {
            // The next append fails the same way and stops the agent; say it now.
            eprintln!("palisade agent: audit checkpoint: {e}");
        }
        if let Some(x) = &mut self.ipfix {
            let _ = x.flush(unix_s);
        }
        if let Some(tx) = &self.to_controller
            && !self.controller_batch.is_empty()
        {
            let batch = std::mem::take(&mut self.controller_batch);
            let n = batch.len() as u64;
            if tx.try_send(batch).is_err() {
                self.controller_dropped += n;
            }
        }
        if self
            .last_retention
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(3600))
            && let Some(t) = &mut self.audit
        {
            self.last_retention = Some(Instant::now());
            match t.retain(self.clock.unix(now)) {
                Ok(0) => {}
                Ok(n) => eprintln!("palisade agent: audit retention deleted {n} record(s)"),
                Err(e) => eprintln!("palisade agent: audit retention: {e}"),
            }
        }
        if let Some(dir) = self.config.policy.clone() {
            let stamp = policy_stamp(&dir);
            if stamp != self.policy_stamp {
                self.policy_stamp = stamp;
                self.reload_policy(&dir);
            }
        }
    }

    /// Swap `compiler` in on every worker. Each worker switches between two
    /// of its rounds; flows cached under the old policy are re-validated on
    /// their next packet.
    fn install(&mut self, compiler: impl Into<Arc<Compiler>>) {
        let compiler = compiler.into();
        self.zones = zones_of(&self.config, compiler.model());
        self.save_fallback_plan(compiler.model());
        self.policy_installed = Instant::now();
        let identities = Arc::new(Identities::new(compiler.model()));
        // The signatures are read again with each policy (its profiles select from them).
        if let Some(ic) = &self.config.inspect
            && !self
                .signatures
                .as_ref()
                .is_some_and(|s| s.unchanged(ic, compiler.model()))
        {
            match Signatures::load(ic, compiler.model()) {
                Ok(sigs) => {
                    self.signatures = Some(Arc::new(sigs));
                    self.last_inspect_error = None;
                }
                Err(e) => {
                    self.inspect_errors += 1;
                    eprintln!("palisade agent: inspection: signatures not reloaded, the previous ones stay: {e}");
                    self.last_inspect_error = Some(e.to_string());
                }
            }
        } else if self.config.inspect.is_none() {
            warn_uninspected(compiler.model());
        }
        // One compiled policy for all workers: it is read-only.
        let lookup = Arc::new(PolicyLookup::new(compiler.clone()));
        for core in &self.workers {
            let mut core = lock(core);
            core.engine.update_policy(Box::new(lookup.clone()));
            core.identities = identities.clone();
            // Revocation is immediate: every flow the kernel forwards was
            // judged under the epoch that just ended, so all come back to
            // user space now (to be judged again), not at the worker's next sync.
            let now = self.origin.elapsed().as_nanos() as u64;
            core.settle_fast_path(now, None);
        }
        self.start_inspection(compiler.model());
        // The MAC a vhost-user vNIC may announce follows the inventory.
        let model = compiler.model();
        for (vnic, mac) in self.vhost.update_macs(&|name| inventory_mac(model, name)) {
            let mac = mac.map_or("none".to_string(), |m| {
                palisade_wire::ethernet::EthernetAddress(m).to_string()
            });
            eprintln!("palisade agent: vnic {vnic}: vhost-user announcements now for MAC {mac}");
        }
        self.last_policy_error = None;
    }

    /// Give every worker an inspector over the signatures in force: new
    /// signatures, a fresh one (detection starts over, flows are taken up
    /// mid-stream); the same, the one it has, with the ports' failure modes
    /// of this policy.
    fn start_inspection(&mut self, model: &Model) {
        let (Some(ic), Some(sigs)) = (&self.config.inspect, &self.signatures) else {
            return;
        };
        let closed = fail_closed_ports(&self.config, model, &self.ports);
        let setup = InlineSetup::new(ic, sigs.clone(), closed, &self.config.host, self.clock);
        for core in &self.workers {
            let mut core = lock(core);
            match &mut core.inline {
                Some(i) if i.same_signatures(&setup) => i.update(&setup),
                slot => *slot = Some(Inline::new(setup.clone())),
            }
        }
    }

    /// If this start ended a fail-open episode, have every worker count the
    /// episode's connections it meets (see [`crate::takeover`]): those with
    /// an end on a port of one of the episode's zones.
    fn start_takeover(&mut self, model: &Model) {
        let Some(episode) = &self.fail_open else {
            return;
        };
        let len = self.ports.iter().map(|p| usize::from(p.port.0) + 1).max().unwrap_or(0);
        let mut in_episode = vec![false; len];
        for p in &self.ports {
            let zone = model.inventory.vnic(&p.name).map(|(_, n)| n.zone.as_str()).or_else(|| {
                self.config
                    .appliances
                    .iter()
                    .find(|a| a.name == p.name)
                    .map(|a| a.zone.as_str())
            });
            in_episode[usize::from(p.port.0)] = zone.is_some_and(|z| episode.zones.iter().any(|e| e == z));
        }
        let in_episode: Arc<[bool]> = in_episode.into();
        for core in &self.workers {
            lock(core).takeover = Some(crate::takeover::TakeOver::new(in_episode.clone()));
        }
    }

    /// Swap in the policy in `dir`, or keep enforcing the current one if it is broken.
    pub fn reload_policy(&mut self, dir: &Path) {
        match load_policy(dir) {
            Ok(compiler) => {
                let version = compiler.model().policy.version;
                self.install(compiler);
                eprintln!("palisade agent: policy version {version} installed");
            }
            Err(e) => {
                self.policy_errors += 1;
                eprintln!(
                    "palisade agent: policy reload failed, still enforcing version {}: {e}",
                    self.policy_version()
                );
                self.last_policy_error = Some(e.to_string());
            }
        }
    }

    fn keep_all(&mut self, batch: Vec<FlowRecord>) {
        for rec in batch {
            self.keep(rec);
        }
    }

    fn keep(&mut self, rec: FlowRecord) {
        if let (Some(a), palisade_audit::record::Phase::Start, palisade_audit::record::Verdict::Allow) =
            (&mut self.after_ready, &rec.phase, &rec.verdict)
        {
            a.flow_started(rec.start_ns);
        }
        for d in rec.decided_by.iter().filter(|d| d.rule == "default") {
            let end = if d.chain == "egress" { &rec.src } else { &rec.dst };
            if let Some(n) = end.vm.as_ref().and_then(|vm| self.default_decisions.get_mut(&vm.vnic)) {
                *n += 1;
            }
        }
        if self.recent.len() == RECENT_FLOWS {
            self.recent.pop_front();
        }
        self.recent.push_back(rec.clone());
        if let Some(x) = &mut self.ipfix {
            // Over the rate limit the record is counted as dropped (ExportStats), never silently lost:
            // it is still in the audit trail.
            let _ = x.export(&rec, (rec.time_ns / 1_000_000_000) as u32);
        }
        if self.to_controller.is_some() {
            self.controller_batch.push(rec.clone());
        }
        if let Some(t) = &mut self.audit {
            t.push(Record::Flow(rec));
        } else if let Some((_, kept)) = &mut self.audit_opening {
            kept.push(Record::Flow(rec));
        }
    }

    /// Take the workers' alert records: each goes to `/alerts`, the audit
    /// trail and the controller; alerts a worker shed are written to the
    /// trail as one "alerts not recorded" record. Returns whether any came.
    fn take_alerts(&mut self) -> bool {
        let mut taken = crate::inspection::TakenAlerts::default();
        for core in &self.workers {
            if let Some(i) = &mut lock(core).inline {
                taken.merge(i.take_records());
            }
        }
        if taken.records.is_empty() && taken.shed == 0 {
            return false;
        }
        let trail_records = taken.audit_records(&self.config.host, self.clock.unix(self.now()));
        if taken.shed > 0 {
            self.alert_stats.not_recorded += taken.shed;
            self.alert_stats.gap_records += 1;
        }
        if let Some(q) = &self.alert_queue {
            q.offer(taken.records.iter().cloned());
        }
        let n = taken.records.len() as u64;
        for a in taken.records {
            self.alerts.push(a);
        }
        if let Some(t) = &mut self.audit {
            for r in trail_records {
                t.push(r);
            }
            self.alert_stats.recorded += n;
        } else if let Some((_, kept)) = &mut self.audit_opening {
            kept.extend(trail_records);
            self.alert_stats.recorded += n;
        }
        true
    }

    /// Publish metrics, recent flows and health for the HTTP endpoint.
    pub fn publish(&mut self) {
        let fresh_alerts = self.take_alerts();
        let mut guards: Vec<_> = self.workers.iter().map(|c| lock(c)).collect();
        let mut port_stats: Vec<(String, String, PortStats)> = self
            .ports
            .iter()
            .map(|p| (p.name.clone(), p.interface.clone(), PortStats::default()))
            .collect();
        let mut overlay = PortStats::default();
        let (mut unroutable, mut render_errors) = (0, 0);
        for g in &guards {
            for ((_, _, total), s) in port_stats.iter_mut().zip(&g.port_stats) {
                total.merge(s);
            }
            overlay.merge(&g.overlay_stats);
            unroutable += g.unroutable;
            render_errors += g.render_errors;
        }
        let quiesced_drops: u64 = guards.iter().map(|g| g.quiesced_drops).sum();
        let mut inline = crate::inspection::InlineCounters::default();
        let mut inline_flows = 0;
        let mut inline_gauges = metrics::InlineGauges::default();
        for g in &mut guards {
            if let Some(i) = &mut g.inline {
                inline.merge(&i.counters());
                inline_flows += i.flows();
                inline_gauges.add(i);
            }
        }
        let takeover = self.fail_open.as_ref().map(|_| {
            let mut all = crate::takeover::TakeOverCounts::default();
            for t in guards.iter().filter_map(|g| g.takeover.as_ref()) {
                all.add(t.counts());
            }
            all
        });
        let engines: Vec<&Engine> = guards.iter().map(|g| &g.engine).collect();
        let journal = guards.iter().filter_map(|g| g.journal.as_ref()).fold(
            crate::journal::JournalStats::default(),
            |mut all, j| {
                all.records += j.stats.records;
                all.overflows += j.stats.overflows;
                all.rotations += j.stats.rotations;
                all
            },
        );
        let mut text = metrics::render(&metrics::Snapshot {
            host: &self.config.host,
            engines: &engines,
            ports: &port_stats,
            port_ids: &self.ports.iter().map(|p| p.port).collect::<Vec<_>>(),
            overlay,
            unroutable,
            render_errors,
            policy_errors: self.policy_errors,
            audit: self.audit.as_ref().map(|t| t.stats()),
            ipfix: self.ipfix.as_ref().map(|x| x.stats()),
            controller_dropped: self.to_controller.as_ref().map(|_| self.controller_dropped),
            snapshots: self.snapshots.stats,
            state_refused: &self.state_refused,
            journal,
        });
        text.push_str(&format!(
            "# HELP palisade_vnic_migrating_drops_total Frames dropped because their vNIC's VM is migrating away \
             (its state exported, forwarding stopped).\n\
             # TYPE palisade_vnic_migrating_drops_total counter\n\
             palisade_vnic_migrating_drops_total{{host=\"{}\"}} {quiesced_drops}\n",
            self.config.host
        ));
        // The kernel fast path: what the kernel forwarded (folded into the
        // connections and rules above at each worker's sync, a few times a second).
        let fast_stats: Vec<_> = guards.iter().filter_map(|g| g.fast.as_ref().map(|f| f.stats)).collect();
        let fast = &fast_stats;
        if !fast.is_empty() {
            let host = &self.config.host;
            for (name, help, kind, v) in [
                (
                    "palisade_fast_path_kernel_packets_total",
                    "Packets the kernel fast path forwarded (a super-frame's segments each).",
                    "counter",
                    fast.iter().map(|f| f.kernel_packets).sum::<u64>(),
                ),
                (
                    "palisade_fast_path_kernel_bytes_total",
                    "Bytes the kernel fast path forwarded.",
                    "counter",
                    fast.iter().map(|f| f.kernel_bytes).sum::<u64>(),
                ),
                (
                    "palisade_fast_path_entries",
                    "Flow directions in the kernel fast path's map.",
                    "gauge",
                    fast.iter().map(|f| f.installed as u64).sum::<u64>(),
                ),
                (
                    "palisade_fast_path_errors_total",
                    "Kernel fast path map operations that failed.",
                    "counter",
                    fast.iter().map(|f| f.errors).sum::<u64>(),
                ),
            ] {
                text.push_str(&format!(
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{host=\"{host}\"}} {v}\n"
                ));
            }
        }
        if let Some(a) = &self.arrivals {
            use std::sync::atomic::Ordering::Relaxed;
            for (name, help, v) in [
                (
                    "palisade_arrivals_reported_total",
                    "Guests seen announcing themselves on a vNIC placed on another host, reported to the controller.",
                    a.reported.load(Relaxed),
                ),
                (
                    "palisade_arrivals_moved_total",
                    "Of those, the ones the controller took as a migration here (a follow order for the old host).",
                    a.moved.load(Relaxed),
                ),
                (
                    "palisade_arrivals_held_total",
                    "vNICs held (frames dropped as vnic_migrating) for the state of a guest that arrived without it.",
                    a.held.load(Relaxed),
                ),
                (
                    "palisade_arrivals_hold_expired_total",
                    "Holds that reached their bound without the state: the vNIC forwarded without its connections.",
                    a.hold_expired.load(Relaxed),
                ),
                (
                    "palisade_arrivals_report_failures_total",
                    "Arrival reports the controller did not take (away or refusing).",
                    a.failed.load(Relaxed),
                ),
            ] {
                text.push_str(&format!(
                    "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{host=\"{}\"}} {v}\n",
                    self.config.host
                ));
            }
        }
        text.push_str(
            "# HELP palisade_vnic_default_rule_decisions_total Flows the default rule (zone or datacenter) decided, \
             by local vNIC and that vNIC's chain.\n\
             # TYPE palisade_vnic_default_rule_decisions_total counter\n",
        );
        for (vnic, n) in &self.default_decisions {
            text.push_str(&format!(
                "palisade_vnic_default_rule_decisions_total{{host=\"{}\",vnic=\"{}\"}} {n}\n",
                self.config.host,
                vnic.replace('\\', "\\\\").replace('"', "\\\"")
            ));
        }
        text.push_str(&metrics::probe_metrics(&self.config.host, &self.probes));
        if !self.vhost.is_empty() {
            text.push_str(&self.vhost.metrics(&self.config.host));
        }
        if self.config.inspect.is_some() {
            text.push_str(&metrics::inspection(
                &self.config.host,
                &inline,
                self.inspect_errors,
                self.alerts.overwritten,
                &self.alert_stats,
                self.alert_queue.as_ref().map(|q| q.stats()),
            ));
            text.push_str(&metrics::inspection_state(&self.config.host, &inline_gauges, &inline));
        }
        text.push_str(&metrics::fallback(
            &self.config.host,
            &self.zones,
            self.fallback_open.as_deref(),
            self.fail_open.as_ref(),
        ));
        text.push_str(&metrics::fallback_takeover(&self.config.host, takeover));
        let connections: usize = engines.iter().map(|e| e.conntrack().len()).sum();
        let policy_version = engines.first().map_or(0, |e| e.policy_version());
        let ring_drops_total = port_stats.iter().map(|(_, _, s)| s.kernel_drops).sum::<u64>() + overlay.kernel_drops;
        let (report, _) = crate::health::report(crate::health::Inputs {
            host: &self.config.host,
            time_ns: self.clock.unix(self.now()),
            interval_ms: self.health_interval().as_millis() as u64,
            uptime_s: self.origin.elapsed().as_secs(),
            workers: (self.workers.len() as u32, self.workers_alive),
            engines: &engines,
            policy: (policy_version, self.revision, self.policy_installed.elapsed().as_secs()),
            policy_error: self.last_policy_error.as_deref(),
            ring_drops_total,
            baseline: self.drop_baseline,
            zones: self.zones.clone(),
            fallback_planned: self.fallback_open.is_some(),
            last_fail_open: self.fail_open.as_ref(),
            takeover,
        });
        drop(engines);
        drop(guards);
        let flows = serde_json::to_string(&self.recent).unwrap_or_else(|_| "[]".into());
        // Serialized again only when new alerts came (up to 4096 records).
        if fresh_alerts || self.alerts_json.is_empty() {
            self.alerts_json =
                serde_json::to_string(&self.alerts.iter().collect::<Vec<_>>()).unwrap_or_else(|_| "[]".into());
        }
        let alerts = self.alerts_json.clone();
        // The report the controller gets, and what only the host needs.
        let mut health = serde_json::to_value(&report).unwrap_or_default();
        if let Some(h) = health.as_object_mut() {
            h.insert("ports".into(), self.ports.len().into());
            if !self.vhost.is_empty() {
                h.insert("vhost_user".into(), self.vhost.health());
            }
            h.insert("connections".into(), connections.into());
            if let Some(sigs) = &self.signatures {
                h.insert(
                    "inspection".into(),
                    serde_json::json!({
                        "signatures": sigs.len(),
                        "refused": sigs.refused,
                        "flows": inline_flows,
                        "counters": inline,
                        "load_errors": self.inspect_errors,
                        "last_error": self.last_inspect_error,
                    }),
                );
            }
            h.insert(
                "audit".into(),
                serde_json::to_value(self.audit.as_ref().map(|t| t.status())).unwrap_or_default(),
            );
            // The kernel fast path: configured mode, whether it runs, and
            // the workers' counts of what it forwarded (folded so far).
            let mut fast = serde_json::to_value(&self.fast_path).unwrap_or_default();
            if self.fast_path.active
                && let Some(f) = fast.as_object_mut()
            {
                // As read with the metrics above, under the workers' locks.
                let stats = &fast_stats;
                f.insert("workers".into(), serde_json::to_value(stats).unwrap_or_default());
                f.insert(
                    "installed".into(),
                    stats.iter().map(|s| s.installed).sum::<usize>().into(),
                );
                f.insert(
                    "kernel_packets".into(),
                    stats.iter().map(|s| s.kernel_packets).sum::<u64>().into(),
                );
                f.insert(
                    "kernel_bytes".into(),
                    stats.iter().map(|s| s.kernel_bytes).sum::<u64>().into(),
                );
            }
            h.insert("fast_path".into(), fast);
        }
        if let Some(h) = health.as_object_mut() {
            h.insert(
                "state".into(),
                serde_json::json!({
                    "snapshots": self.snapshots.stats,
                    "first_snapshot": self.first_snapshot,
                    "older_journals_kept": self.older_journals,
                    "resumed": self.resumed,
                    "refused": self.state_refused,
                    "refused_total": self.state_refused.values().sum::<u64>(),
                    "refusals": self.refusals,
                    "journal": journal,
                }),
            );
            h.insert(
                "fallback".into(),
                serde_json::json!({
                    "open_zones": self.fallback_open,
                    "active": false,
                    "last": self.fail_open.as_ref().map(|e| serde_json::json!({
                        "zones": e.zones,
                        "armed_at_ns": e.armed_at_ns,
                        "ended_at_ns": e.ended_at_ns,
                        "active_ms": e.active_ms(),
                        "taken_over": takeover,
                    })),
                }),
            );
        }
        let health = health.to_string();
        self.last_report = Some(report);
        if let Ok(mut g) = self.shared.lock() {
            *g = Arc::new(Published {
                metrics: text,
                flows,
                health,
                alerts,
            });
        }
    }

    /// The time between health reports.
    fn health_interval(&self) -> Duration {
        self.config
            .controller
            .as_ref()
            .map_or(Duration::from_secs(crate::config::DEFAULT_HEALTH_INTERVAL_S), |c| {
                c.health_interval()
            })
    }

    /// A report boundary: send the report just published to the controller
    /// (if the sender is busy, this one is skipped: the next is as fresh) and
    /// count the next report's drops from its figures.
    fn report_health(&mut self) {
        let Some(report) = self.last_report.take() else { return };
        self.drop_baseline.ring += report.ring_drops;
        self.drop_baseline.table += report.table_drops;
        if let Some(tx) = &self.to_controller_health {
            let _ = tx.try_send(report.clone());
        }
        self.last_report = Some(report);
    }

    /// The last health report published (what `/health` serves, less the host-only fields).
    pub fn health(&self) -> Option<&palisade_api::health::HealthReport> {
        self.last_report.as_ref()
    }

    /// Stop: save every worker's connections for the next start, make the
    /// trail durable. Returns how many connections were saved.
    pub fn shutdown(mut self) -> Result<usize, AgentError> {
        self.notifier.stopping();
        let now = self.now();
        for old in state_files(&self.config.state_dir, StateKind::Saved) {
            // Left by a run that stopped before importing them; superseded now.
            let _ = std::fs::remove_file(old);
        }
        let mut saved = 0;
        for (i, core) in self.workers.iter().enumerate() {
            let mut core = lock(core);
            core.settle_fast_path(now, None);
            saved += core.engine.conntrack().len();
            let blob = core
                .engine
                .export_all_named(&crate::snapshot::blob_name(&self.identity), now);
            let path = state_path(&self.config.state_dir, i, StateKind::Saved);
            write_state(&path, &blob).map_err(io_err(format!("saving {}", path.display())))?;
        }
        // The exact state supersedes the snapshots (older by up to an
        // interval) and the journals written after them.
        for old in state_files(&self.config.state_dir, StateKind::Snapshot)
            .into_iter()
            .chain(state_files(&self.config.state_dir, StateKind::Journal))
            .chain(state_files(&self.config.state_dir, StateKind::PrevJournal))
        {
            let _ = std::fs::remove_file(old);
        }
        let unix_now = self.clock.unix(self.now());
        self.poll_trail(true)?;
        if let Some(t) = &mut self.audit {
            // Appends and syncs what is queued, then checkpoints.
            t.close(unix_now)?;
        }
        Ok(saved)
    }

    /// Ports attached (vNICs and appliances), each with one socket per worker.
    pub fn ports(&self) -> usize {
        self.ports.len()
    }

    /// Datapath workers.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// The policy version in force.
    pub fn policy_version(&self) -> u64 {
        self.workers.first().map_or(0, |c| lock(c).engine.policy_version())
    }
}

/// A vNIC's pre-copy handed out ([`http::Control::export_precopy`]).
/// Where a delta's time on the source went, in the guest's pause.
#[derive(Debug, Clone, Copy)]
struct DeltaPhases {
    /// Connections and bytes of the delta.
    conns: usize,
    bytes: usize,
    /// Taking every worker's lock (waiting out the batch each is in).
    lock: Duration,
    /// The engines' change export.
    export: Duration,
    /// Quiescing the port in every worker.
    quiesce: Duration,
    /// Encoding, hashing and recording the transfer.
    encode: Duration,
}

impl core::fmt::Display for DeltaPhases {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "delta of {} connections ({} B): lock {} us, export {} us, quiesce {} us, encode {} us",
            self.conns,
            self.bytes,
            self.lock.as_micros(),
            self.export.as_micros(),
            self.quiesce.as_micros(),
            self.encode.as_micros()
        )
    }
}

struct Precopied {
    /// Each worker's change generation at the pre-copy.
    marks: Vec<u64>,
    /// The pre-copy's bytes.
    bytes: u64,
    /// BLAKE3 over the pre-copy (the delta is added at the export).
    hash: blake3::Hasher,
}

/// The agent's side of live migration, served on the Unix socket: every
/// worker's share of a vNIC's connections exported as one blob, a blob's
/// connections imported each into the worker its flows are steered to
/// ([`crate::migrate`]). Every worker is locked together for either, so no
/// frame of the vNIC is forwarded between one worker's part and another's.
struct VnicControl {
    workers: Vec<Arc<Mutex<WorkerCore>>>,
    origin: Instant,
    /// This host (for the records).
    host: String,
    /// A change record per export, import and resume, which the control
    /// loop appends to the audit trail: `vnic.migrate.export|import|resume`
    /// on `vnic/NAME`, its description JSON (this host, the peer the caller
    /// named, connections, the blob's size and BLAKE3: the export's hash on
    /// the source and the import's on the destination match).
    records: Arc<Mutex<Vec<palisade_audit::record::ChangeRecord>>>,
    /// The agent-to-agent channel's TLS settings, when configured.
    peer_tls: Option<Arc<crate::peer::PeerTls>>,
    /// Per vNIC with a pre-copy out: each worker's change generation at
    /// it, and the pre-copy's size and hash (the export's record covers
    /// pre-copy and delta, as the destination's import record does).
    precopied: Mutex<std::collections::HashMap<String, Precopied>>,
    /// Per vNIC with an inspection pre-copy out: each worker's mark (`None`
    /// for a worker without inspection), what its delta is taken against.
    inspect_marks: Mutex<HashMap<String, Vec<Option<crate::inspection::carry::PrecopyMark>>>>,
    /// Per vNIC, where its last delta's time in the guest's pause went:
    /// logged once the pause is over (by the release or the resume), not in it.
    delta_phases: Mutex<HashMap<String, DeltaPhases>>,
    /// When each vNIC's state was last imported: its guest's announcement
    /// right after is that migration's, not one to hold for.
    imported: Mutex<HashMap<String, Instant>>,
    /// vNICs held for their state since when ([`http::Control::hold_vnic`]).
    held: Mutex<HashMap<String, Instant>>,
    /// When each vNIC's last hold started, kept past its end: a follow
    /// order's state arriving after the hold expired is still taken from
    /// the VM's last host ([`http::Control::check_source`]).
    holds_started: Mutex<HashMap<String, Instant>>,
    /// vNICs staged here whose migration holds housekeeping off until its
    /// delta is applied or the staging discarded ([`crate::quiet`]).
    quiet_staged: Mutex<std::collections::HashSet<String>>,
    /// Per vNIC, how its last delta's apply waited for the workers' locks
    /// and held them ([`http::Control::apply_note`]).
    apply_locks: Mutex<HashMap<String, (Duration, Duration)>>,
}

/// How long after a vNIC's hold started its state is still taken from the
/// host it left once the hold expired (a follow order that ran late).
const LATE_STATE_WINDOW: Duration = Duration::from_secs(60);

/// How long after an import a vNIC's announcement belongs to that migration.
const IMPORT_ANNOUNCE_WINDOW: Duration = Duration::from_secs(10);

impl VnicControl {
    fn now(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    fn record(&self, action: &str, vnic: &str, peer: Option<&str>, connections: usize, blob: Option<&[u8]>) {
        let hash = blob.map(|b| (b.len() as u64, blake3::hash(b).to_hex().to_string()));
        self.record_hashed(action, vnic, peer, connections, hash);
    }

    /// [`VnicControl::record`] with the state's size and BLAKE3 given.
    fn record_hashed(
        &self,
        action: &str,
        vnic: &str,
        peer: Option<&str>,
        connections: usize,
        state: Option<(u64, String)>,
    ) {
        let time_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let (from, to) = match action {
            "import" => (peer, Some(self.host.as_str())),
            _ => (Some(self.host.as_str()), peer),
        };
        let diff = serde_json::json!({
            "vnic": vnic,
            "host": self.host,
            "from": from,
            "to": to,
            "connections": connections,
            "state_bytes": state.as_ref().map(|s| s.0),
            "state_blake3": state.map(|s| s.1),
        });
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(palisade_audit::record::ChangeRecord {
                time_ns,
                actor: "local".into(),
                action: format!("vnic.migrate.{action}"),
                resource: format!("vnic/{vnic}"),
                diff: diff.to_string(),
                policy_version: None,
            });
    }

    /// Log where `vnic`'s last delta spent the guest's pause, if it had one
    /// (after the pause: the log's write is not the guest's to wait for).
    fn log_delta_phases(&self, vnic: &str) {
        let phases = self.delta_phases.lock().unwrap_or_else(|p| p.into_inner()).remove(vnic);
        if let Some(p) = phases {
            eprintln!("palisade agent: migration of {vnic}: {p}");
        }
    }

    /// Forget `vnic`'s pre-copy; with none left, the engines stop keeping
    /// removed connections' keys.
    fn end_precopy(&self, guards: &mut [std::sync::MutexGuard<'_, WorkerCore>], vnic: &str) {
        self.inspect_marks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(vnic);
        let mut pre = self.precopied.lock().unwrap_or_else(|p| p.into_inner());
        if pre.remove(vnic).is_some() {
            // Its pause is over (released or resumed): housekeeping may run.
            crate::quiet::QUIET.end_migration();
        }
        if pre.is_empty() {
            for core in guards.iter_mut() {
                core.engine.end_vnic_changes();
            }
        }
    }

    /// Quiesce (`true`) or resume `vnic`'s port in every worker (locked).
    /// The VM is here now (or back) with its state: the vNIC forwards, and
    /// is no longer standby, so its announcement to come is this
    /// migration's, not an arrival without state. Call [`Self::arrived`]
    /// once the workers' locks are released.
    fn forward_arrived(
        guards: &mut [std::sync::MutexGuard<'_, WorkerCore>],
        vnic: &str,
    ) -> Result<(), http::ControlError> {
        for core in guards.iter_mut() {
            if let Some(port) = core.engine.port_of(vnic) {
                core.engine.set_port_standby(port, false);
            }
        }
        Self::quiesce(guards, vnic, false)
    }

    /// After [`Self::forward_arrived`], without the workers' locks (a hold's
    /// end takes `held` before them): the import noted, a hold over.
    fn arrived(&self, vnic: &str) {
        self.imported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(vnic.to_string(), Instant::now());
        self.held.lock().unwrap_or_else(|p| p.into_inner()).remove(vnic);
    }

    /// Move the inspected flows held for `vnic`'s commit into the workers' live tables.
    fn commit_held_inspection(guards: &mut [std::sync::MutexGuard<'_, WorkerCore>], vnic: &str, now: u64) {
        let mut inlines: Vec<Option<&mut crate::inspection::Inline>> =
            guards.iter_mut().map(|g| g.inline.as_mut()).collect();
        crate::inspection::carry::commit_staged(&mut inlines, vnic, now);
    }

    /// Forget the inspected flows held for `vnic` (its commit was refused).
    fn drop_held_inspection(guards: &mut [std::sync::MutexGuard<'_, WorkerCore>], vnic: &str) {
        let mut inlines: Vec<Option<&mut crate::inspection::Inline>> =
            guards.iter_mut().map(|g| g.inline.as_mut()).collect();
        crate::inspection::carry::discard_staged(&mut inlines, vnic);
    }

    fn quiesce(
        guards: &mut [std::sync::MutexGuard<'_, WorkerCore>],
        vnic: &str,
        on: bool,
    ) -> Result<(), http::ControlError> {
        for core in guards.iter_mut() {
            let port = core
                .engine
                .port_of(vnic)
                .ok_or_else(|| http::ControlError::UnknownVnic(vnic.to_string()))?;
            core.quiesced.retain(|&p| p != port);
            if on {
                core.quiesced.push(port);
            }
            // Frames from the port are discarded by the worker; frames
            // towards it by the engine, before they open a connection.
            core.engine.set_port_quiesced(port, on);
        }
        Ok(())
    }
}

fn control_error(e: crate::migrate::MigrateError) -> http::ControlError {
    match e {
        crate::migrate::MigrateError::UnknownVnic(v) => http::ControlError::UnknownVnic(v),
        other => http::ControlError::Refused(other.to_string()),
    }
}

impl http::Control for VnicControl {
    /// From the export on, the vNIC's frames are dropped (counted in
    /// `palisade_vnic_migrating_drops_total`) until an import or a resume.
    /// The connections stay in the tables: a migration that fails resumes
    /// with them intact.
    fn export_vnic(&self, vnic: &str, peer: Option<&str>) -> Result<Vec<u8>, http::ControlError> {
        let now = self.now();
        let mut guards: Vec<_> = self.workers.iter().map(|c| lock(c)).collect();
        // Kernel-forwarded traffic counted, and the vNIC's flows out of the kernel, before the export.
        for g in guards.iter_mut() {
            let port = g.engine.port_of(vnic);
            g.settle_fast_path(now, port);
        }
        let blob = {
            let mut engines: Vec<&mut Engine> = guards.iter_mut().map(|g| &mut g.engine).collect();
            crate::migrate::export(&mut engines, vnic, now).map_err(control_error)?
        };
        Self::quiesce(&mut guards, vnic, true)?;
        drop(guards);
        let n = crate::migrate::claimed_count(&blob).unwrap_or(0);
        self.record("export", vnic, peer, n, Some(&blob));
        Ok(blob)
    }

    fn import_vnic(&self, vnic: &str, blob: &[u8], peer: Option<&str>) -> Result<usize, http::ControlError> {
        let now = self.now();
        let mut guards: Vec<_> = self.workers.iter().map(|c| lock(c)).collect();
        let imported = {
            let mut engines: Vec<&mut Engine> = guards.iter_mut().map(|g| &mut g.engine).collect();
            crate::migrate::import(&mut engines, vnic, blob, now).map_err(control_error)
        };
        let n = match imported {
            Ok(n) => n,
            Err(e) => {
                // Refused: the inspection section sent before it goes too.
                Self::drop_held_inspection(&mut guards, vnic);
                return Err(e);
            }
        };
        // The inspection section sent before it (the control socket's
        // `inspection` request) joins the live tables with the connections.
        Self::commit_held_inspection(&mut guards, vnic, now);
        Self::forward_arrived(&mut guards, vnic)?;
        drop(guards);
        self.arrived(vnic);
        self.record("import", vnic, peer, n, Some(blob));
        Ok(n)
    }

    /// After the VM runs on the destination: its connections leave this
    /// host's tables (they live there now), the port stays quiesced, so a
    /// straggler is dropped and counted, not forwarded on stale state.
    fn release_vnic(&self, vnic: &str, peer: Option<&str>) -> Result<usize, http::ControlError> {
        let now = self.now();
        let mut guards: Vec<_> = self.workers.iter().map(|c| lock(c)).collect();
        let mut released = 0;
        for core in guards.iter_mut() {
            let port = core
                .engine
                .port_of(vnic)
                .ok_or_else(|| http::ControlError::UnknownVnic(vnic.to_string()))?;
            // Their inspection state moved with them (or is of no use here now).
            let core = &mut **core;
            if let Some(inline) = core.inline.as_mut() {
                inline.forget_vnic_flows(&core.engine, port);
            }
            let before = core.engine.conntrack().len();
            // Their end is in the destination's trail, not here.
            core.engine.export_vnic(port, now, true, &mut ());
            released += before - core.engine.conntrack().len();
        }
        // Quiesced in the engines only, not by the workers: frames from the
        // port reach the engine, which drops them but still counts its
        // guest announcing itself, so a guest back here through a
        // migration made without the controller is reported, not dropped
        // unseen (frames towards the port are dropped by the engine alike).
        for core in guards.iter_mut() {
            if let Some(port) = core.engine.port_of(vnic) {
                core.quiesced.retain(|&p| p != port);
                core.engine.set_port_quiesced(port, true);
            }
        }
        self.end_precopy(&mut guards, vnic);
        drop(guards);
        self.log_delta_phases(vnic);
        self.record("release", vnic, peer, released, None);
        Ok(released)
    }

    fn resume_vnic(&self, vnic: &str, peer: Option<&str>) -> Result<(), http::ControlError> {
        let mut guards: Vec<_> = self.workers.iter().map(|c| lock(c)).collect();
        Self::quiesce(&mut guards, vnic, false)?;
        self.end_precopy(&mut guards, vnic);
        drop(guards);
        self.log_delta_phases(vnic);
        self.record("resume", vnic, peer, 0, None);
        Ok(())
    }

    /// Every connection of the vNIC, the port still forwarding; each
    /// worker's change generation is kept for the delta.
    fn export_precopy(&self, vnic: &str, peer: Option<&str>) -> Result<Vec<u8>, http::ControlError> {
        let now = self.now();
        let mut guards: Vec<_> = self.workers.iter().map(|c| lock(c)).collect();
        for g in guards.iter_mut() {
            g.settle_fast_path(now, None);
        }
        let (t, marks) = {
            let mut engines: Vec<&mut Engine> = guards.iter_mut().map(|g| &mut g.engine).collect();
            crate::migrate::export_changes(&mut engines, vnic, now, None).map_err(control_error)?
        };
        drop(guards);
        let blob = palisade_datapath::transfer::encode(&t);
        let mut hash = blake3::Hasher::new();
        hash.update(&blob);
        let earlier = self.precopied.lock().unwrap_or_else(|p| p.into_inner()).insert(
            vnic.to_string(),
            Precopied {
                marks,
                bytes: blob.len() as u64,
                hash,
            },
        );
        if earlier.is_none() {
            // Until its pause is over (`end_precopy`), no housekeeping
            // hold lands in it.
            crate::quiet::QUIET.begin_migration();
        }
        self.record("precopy", vnic, peer, t.conns.len(), Some(&blob));
        Ok(blob)
    }

    /// The port stops forwarding (as for an export) and the changes since
    /// the pre-copy go out; without a pre-copy, every connection.
    fn export_delta(&self, vnic: &str, peer: Option<&str>) -> Result<Vec<u8>, http::ControlError> {
        let started = Instant::now();
        let now = self.now();
        // No sweep step starts until the pause's work here is done.
        let _wanted = crate::quiet::QUIET.want_locks();
        let mut guards: Vec<_> = self.workers.iter().map(|c| lock(c)).collect();
        let locked = Instant::now();
        let pre = self
            .precopied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(vnic)
            .map(|p| (p.marks.clone(), p.bytes, p.hash.clone()));
        // The pause: kernel-forwarded traffic counted, the vNIC's flows out of the kernel.
        for g in guards.iter_mut() {
            let port = g.engine.port_of(vnic);
            g.settle_fast_path(now, port);
        }
        let (t, _) = {
            let mut engines: Vec<&mut Engine> = guards.iter_mut().map(|g| &mut g.engine).collect();
            let since = pre.as_ref().map(|p| p.0.as_slice());
            crate::migrate::export_changes(&mut engines, vnic, now, since).map_err(control_error)?
        };
        let exported = Instant::now();
        Self::quiesce(&mut guards, vnic, true)?;
        drop(guards);
        let quiesced = Instant::now();
        let blob = palisade_datapath::transfer::encode(&t);
        // A full delta replaces the pre-copy on the destination, whose hash
        // still covers both (it received both).
        let (bytes, mut hash) = pre.map_or((0, blake3::Hasher::new()), |p| (p.1, p.2));
        hash.update(&blob);
        let state = (bytes + blob.len() as u64, hash.finalize().to_hex().to_string());
        self.record_hashed("export", vnic, peer, t.conns.len(), Some(state));
        let phases = DeltaPhases {
            conns: t.conns.len(),
            bytes: blob.len(),
            lock: locked - started,
            export: exported - locked,
            quiesce: quiesced - exported,
            encode: quiesced.elapsed(),
        };
        self.delta_phases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(vnic.to_string(), phases);
        Ok(blob)
    }

    /// Every inspected flow of the vNIC, every worker's, as one pre-copy
    /// section (empty when no worker inspects); each worker's mark is kept
    /// for the delta.
    fn export_inspection_precopy(&self, vnic: &str, _peer: Option<&str>) -> Result<Vec<u8>, http::ControlError> {
        let started = Instant::now();
        let now = self.now();
        let mut guards: Vec<_> = self.workers.iter().map(|c| lock(c)).collect();
        let mut flows = Vec::new();
        let mut marks = Vec::with_capacity(guards.len());
        for core in guards.iter_mut() {
            let core = &mut **core;
            let port = core
                .engine
                .port_of(vnic)
                .ok_or_else(|| http::ControlError::UnknownVnic(vnic.to_string()))?;
            marks.push(
                core.inline
                    .as_mut()
                    .map(|inline| inline.precopy_vnic_flows(&core.engine, port, now, &mut flows)),
            );
        }
        drop(guards);
        if marks.iter().all(Option::is_none) {
            return Ok(Vec::new());
        }
        self.inspect_marks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(vnic.to_string(), marks);
        let blob =
            crate::inspection::carry::encode_section(vnic, crate::inspection::carry::SectionKind::Precopy, &flows, &[]);
        eprintln!(
            "palisade agent: inspection pre-copy of {vnic}: {} flows, {} bytes, {} us",
            flows.len(),
            blob.len(),
            started.elapsed().as_micros()
        );
        Ok(blob)
    }

    /// The detection state of the vNIC's inspected flows, every worker's,
    /// as one section (empty when no worker inspects): after a pre-copy
    /// the delta since it (whole when a worker's inspector changed since),
    /// else every flow.
    fn export_inspection(&self, vnic: &str, _peer: Option<&str>) -> Result<Vec<u8>, http::ControlError> {
        use crate::inspection::carry::{self, SectionKind};
        let started = Instant::now();
        let now = self.now();
        let marks = self
            .inspect_marks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(vnic)
            .cloned();
        let mut guards: Vec<_> = self.workers.iter().map(|c| lock(c)).collect();
        let mut ports = Vec::with_capacity(guards.len());
        for core in guards.iter() {
            ports.push(
                core.engine
                    .port_of(vnic)
                    .ok_or_else(|| http::ControlError::UnknownVnic(vnic.to_string()))?,
            );
        }
        if guards.iter().all(|g| g.inline.is_none()) {
            return Ok(Vec::new());
        }
        let mut flows = Vec::new();
        let mut gone = Vec::new();
        let mut kind = if marks.is_some() {
            SectionKind::Delta
        } else {
            SectionKind::Whole
        };
        if let Some(marks) = &marks {
            for ((core, port), mark) in guards.iter_mut().zip(&ports).zip(marks) {
                let core = &mut **core;
                let Some(inline) = core.inline.as_mut() else {
                    continue;
                };
                let taken = mark
                    .as_ref()
                    .and_then(|m| inline.delta_vnic_flows(&core.engine, *port, now, m, &mut flows, &mut gone));
                if taken.is_none() {
                    // This worker's inspector is not the one the pre-copy saw: all go whole.
                    kind = SectionKind::Whole;
                    break;
                }
            }
        }
        if kind == SectionKind::Whole {
            flows.clear();
            gone.clear();
            for (core, port) in guards.iter_mut().zip(&ports) {
                let core = &mut **core;
                if let Some(inline) = core.inline.as_mut() {
                    inline.export_vnic_flows(&core.engine, *port, now, &mut flows);
                }
            }
        }
        drop(guards);
        let blob = carry::encode_section(vnic, kind, &flows, &gone);
        eprintln!(
            "palisade agent: inspection state of {vnic} ({kind:?}): {} flows, {} removed, {} bytes, {} us",
            flows.len(),
            gone.len(),
            blob.len(),
            started.elapsed().as_micros()
        );
        Ok(blob)
    }

    /// Held for the vNIC's commit, each flow on the worker its connection
    /// is steered to, all or nothing: a pre-copy or whole section instead
    /// of what is held, a delta over it. The flows join the live tables
    /// when the vNIC's connections are committed ([`Self::import_arrival`],
    /// [`Self::import_vnic`]).
    fn import_inspection(&self, vnic: &str, blob: &[u8], peer: Option<&str>) -> Result<usize, http::ControlError> {
        let started = Instant::now();
        let now = self.now();
        let mut guards: Vec<_> = self.workers.iter().map(|c| lock(c)).collect();
        if guards.iter().any(|g| g.engine.port_of(vnic).is_none()) {
            return Err(http::ControlError::UnknownVnic(vnic.to_string()));
        }
        let done = {
            let mut inlines: Vec<Option<&mut crate::inspection::Inline>> =
                guards.iter_mut().map(|g| g.inline.as_mut()).collect();
            crate::inspection::carry::stage(&mut inlines, vnic, blob, now)
                .map_err(|e| http::ControlError::Refused(e.to_string()))?
        };
        drop(guards);
        eprintln!(
            "palisade agent: migration from {}: inspection state of {vnic}: {} flows held for the commit ({} resumed mid-stream), {} of an unknown profile, {} on workers without inspection, {} bytes, {} us",
            peer.unwrap_or("?"),
            done.flows,
            done.midstream,
            done.unknown_profile,
            done.uninspected,
            blob.len(),
            started.elapsed().as_micros()
        );
        Ok(done.flows)
    }

    /// A pre-copy goes into the tables with the port left as it is (the
    /// guest still runs on the source); a delta is applied to them and the
    /// port forwards. Returns the connections staged, or after a delta
    /// those the vNIC holds (what the migration moved).
    fn import_arrival(&self, a: crate::peer::Arrival) -> Result<usize, http::ControlError> {
        let now = self.now();
        let vnic = a.vnic.clone();
        // A delta is applied in the guest's pause: no sweep step starts
        // meanwhile, and the wait for the locks is measured.
        let _wanted = crate::quiet::QUIET.want_locks();
        let asked = Instant::now();
        let mut guards: Vec<_> = self.workers.iter().map(|c| lock(c)).collect();
        let locked = Instant::now();
        let applied = {
            let mut engines: Vec<&mut Engine> = guards.iter_mut().map(|g| &mut g.engine).collect();
            crate::migrate::apply_arrival(&mut engines, &a.removed, a.revalidate, a.snapshot, now)
                .map_err(control_error)
        };
        let n = match applied {
            Ok(n) => n,
            Err(e) => {
                if !a.stage {
                    // A refused commit: the inspection state held for it goes too.
                    Self::drop_held_inspection(&mut guards, &vnic);
                }
                return Err(e);
            }
        };
        let n = if a.stage {
            n
        } else {
            // The inspected flows held for this commit join the live tables
            // before the port forwards.
            Self::commit_held_inspection(&mut guards, &vnic, now);
            // What moved is what the vNIC holds now, staged and delta together.
            Self::forward_arrived(&mut guards, &vnic)?;
            guards
                .iter()
                .filter_map(|g| {
                    g.engine
                        .port_of(&vnic)
                        .map(|p| g.engine.conntrack().port_conns(p) as usize)
                })
                .sum()
        };
        drop(guards);
        let held = locked.elapsed();
        let mut quiet = self.quiet_staged.lock().unwrap_or_else(|p| p.into_inner());
        if a.stage {
            if quiet.insert(vnic.clone()) {
                // Staged: housekeeping holds off until the delta is in.
                crate::quiet::QUIET.begin_migration();
            }
        } else {
            if quiet.remove(&vnic) {
                crate::quiet::QUIET.end_migration();
            }
            self.apply_locks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(vnic.clone(), (locked - asked, held));
        }
        drop(quiet);
        if !a.stage {
            self.arrived(&vnic);
        }
        let action = if a.stage { "stage" } else { "import" };
        self.record_hashed(action, &vnic, Some(&a.peer), n, Some((a.bytes, a.blake3)));
        Ok(n)
    }

    fn apply_note(&self, vnic: &str) -> Option<String> {
        let (waited, held) = self
            .apply_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(vnic)?;
        Some(format!(
            "workers' locks waited for {} us, held {} us",
            waited.as_micros(),
            held.as_micros()
        ))
    }

    fn discard_staged(&self, vnic: &str, keys: &[palisade_wire::flow::FlowKey]) -> Result<usize, http::ControlError> {
        let now = self.now();
        let mut removed = 0;
        for core in &self.workers {
            let mut core = lock(core);
            let port = core
                .engine
                .port_of(vnic)
                .ok_or_else(|| http::ControlError::UnknownVnic(vnic.to_string()))?;
            removed += core.engine.remove_vnic_conns(port, keys, now, &mut ());
            if let Some(inline) = core.inline.as_mut() {
                crate::inspection::carry::discard_staged(&mut [Some(inline)], vnic);
            }
        }
        if self.quiet_staged.lock().unwrap_or_else(|p| p.into_inner()).remove(vnic) {
            crate::quiet::QUIET.end_migration();
        }
        self.record("discard", vnic, None, removed, None);
        Ok(removed)
    }

    fn peer_tls(&self) -> Option<Arc<crate::peer::PeerTls>> {
        self.peer_tls.clone()
    }

    fn mark_standby(&self) {
        let recent: Vec<String> = self
            .imported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, t)| t.elapsed() < IMPORT_ANNOUNCE_WINDOW)
            .map(|(v, _)| v.clone())
            .collect();
        for core in &self.workers {
            let mut core = lock(core);
            let marks: Vec<(palisade_datapath::PortId, bool)> = core
                .engine
                .vnic_ports()
                .map(|(port, v)| {
                    let placed = v
                        .ips
                        .iter()
                        .find_map(|ip| core.identities.of(*ip))
                        .and_then(|i| i.host.as_deref());
                    let elsewhere = placed.is_some_and(|h| h != self.host);
                    (port, elsewhere && !recent.contains(&v.name))
                })
                .collect();
            for (port, on) in marks {
                core.engine.set_port_standby(port, on);
            }
        }
    }

    fn vnic_received(&self, vnic: &str) -> Option<u64> {
        let mut total = None;
        for core in &self.workers {
            let core = lock(core);
            let port = core.engine.port_of(vnic)?;
            *total.get_or_insert(0) += core.engine.port_tally(port).packets;
        }
        total
    }

    /// Placed by the identities of the policy the first worker holds
    /// (every worker's engine binds the same ports and policy); waiting
    /// for its state when quiesced in any worker, or held for it in the
    /// last [`LATE_STATE_WINDOW`].
    fn check_source(&self, vnic: &str, from: &str) -> Result<(), http::ControlError> {
        let mut placed = None;
        let mut quiesced = false;
        for (i, core) in self.workers.iter().enumerate() {
            let core = lock(core);
            let port = core
                .engine
                .port_of(vnic)
                .ok_or_else(|| http::ControlError::UnknownVnic(vnic.to_string()))?;
            if i == 0 {
                placed = core.engine.vnic(port).and_then(|v| {
                    v.ips
                        .iter()
                        .find_map(|ip| core.identities.of(*ip))
                        .and_then(|id| id.host.clone())
                });
            }
            quiesced |= core.quiesced.contains(&port) || core.engine.is_quiesced(port);
        }
        let held_lately = self
            .holds_started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(vnic)
            .is_some_and(|t| t.elapsed() < LATE_STATE_WINDOW);
        crate::peer::check_source(vnic, from, &self.host, placed.as_deref(), quiesced || held_lately)
            .map_err(http::ControlError::Refused)
    }

    /// Every worker's engine binds the same ports: the first one's say.
    fn has_vnic(&self, vnic: &str) -> bool {
        self.workers
            .first()
            .is_some_and(|c| lock(c).engine.port_of(vnic).is_some())
    }

    /// Summed over the workers (a vNIC's frames spread over them); placed
    /// by the identities of the policy the workers hold.
    fn announcements(&self) -> Vec<http::VnicAnnouncements> {
        let mut by_vnic: BTreeMap<String, http::VnicAnnouncements> = BTreeMap::new();
        for core in &self.workers {
            let core = lock(core);
            for (port, v) in core.engine.vnic_ports() {
                let (count, kind) = core.engine.announcements(port);
                let placed_on = v
                    .ips
                    .iter()
                    .find_map(|ip| core.identities.of(*ip))
                    .and_then(|i| i.host.clone());
                let held_by_engine = core.engine.is_quiesced(port) && !core.quiesced.contains(&port);
                let e = by_vnic
                    .entry(v.name.clone())
                    .or_insert_with(|| http::VnicAnnouncements {
                        vnic: v.name.clone(),
                        mac: v.mac.to_string(),
                        count: 0,
                        kind: "rarp",
                        placed_on,
                        held_by_engine: false,
                    });
                e.count += count;
                e.held_by_engine |= held_by_engine;
                if let Some(k) = kind {
                    e.kind = k.name();
                }
            }
        }
        by_vnic.into_values().collect()
    }

    fn hold_vnic(&self, vnic: &str) -> Result<bool, http::ControlError> {
        let recent = self
            .imported
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(vnic)
            .is_some_and(|t| t.elapsed() < IMPORT_ANNOUNCE_WINDOW);
        if recent {
            return Ok(false);
        }
        let mut guards: Vec<_> = self.workers.iter().map(|c| lock(c)).collect();
        Self::quiesce(&mut guards, vnic, true)?;
        drop(guards);
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(vnic.to_string(), Instant::now());
        self.holds_started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(vnic.to_string(), Instant::now());
        self.record("hold", vnic, None, 0, None);
        Ok(true)
    }

    fn end_hold(&self, vnic: &str) -> Result<bool, http::ControlError> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.remove(vnic).is_none() {
            return Ok(false);
        }
        let mut guards: Vec<_> = self.workers.iter().map(|c| lock(c)).collect();
        Self::quiesce(&mut guards, vnic, false)?;
        drop(guards);
        drop(held);
        self.record("hold-expired", vnic, None, 0, None);
        Ok(true)
    }

    /// The connection lives in the worker its flows are steered to: every
    /// worker is asked; one that has it steered takes the verdict.
    fn offload_flow(
        &self,
        key: &palisade_wire::flow::FlowKey,
        verdict: palisade_datapath::OffloadVerdict,
    ) -> Result<(), http::ControlError> {
        let mut not_steered = false;
        for core in &self.workers {
            match lock(core).engine.offload_flow(key, verdict) {
                Ok(()) => return Ok(()),
                Err(palisade_datapath::OffloadError::NotSteered) => not_steered = true,
                Err(palisade_datapath::OffloadError::NoConnection) => {}
            }
        }
        if not_steered {
            Err(http::ControlError::Refused(
                "the connection is not steered through a service chain".into(),
            ))
        } else {
            Err(http::ControlError::UnknownFlow)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::same_instance;
    use palisade_datapath::{ChainStats, InstanceStats};
    use palisade_policy::model::OnFailure;

    fn chain(name: &str, vnics: &[&str]) -> ChainStats {
        ChainStats {
            name: name.into(),
            on_failure: OnFailure::Closed,
            stages: 1,
            instances: vnics
                .iter()
                .map(|v| InstanceStats {
                    vm: "vm".into(),
                    stage: 0,
                    vnic_in: ((*v).into(), None),
                    vnic_out: ("out".into(), None),
                    external: None,
                    up: true,
                    link_up: true,
                    probe_up: true,
                    probes_returned: 0,
                    sent: 0,
                    returned: 0,
                    flows: 0,
                })
                .collect(),
            failovers: 0,
            bypassed: 0,
            dropped: 0,
            offloaded: 0,
            probe: None,
            probes_rejected: 0,
        }
    }

    /// A probe change found on the first worker's chains is applied to the
    /// same instance on a worker that numbers chains and instances otherwise
    /// (it has not taken the policy change yet): by name, never by index.
    #[test]
    fn a_probe_change_is_applied_to_the_same_named_instance_on_every_worker() {
        let first = [chain("a", &["a1.in"]), chain("b", &["b1.in", "b2.in"])];
        let other = [chain("b", &["b2.in", "b1.in"]), chain("a", &["a1.in"])];
        assert_eq!(same_instance(&first, &other, 1, 0), Some((0, 1)));
        assert_eq!(same_instance(&first, &other, 1, 1), Some((0, 0)));
        assert_eq!(same_instance(&first, &other, 0, 0), Some((1, 0)));
        // Not there (yet, or any more): nothing to apply.
        assert_eq!(same_instance(&first, &[chain("a", &["x.in"])], 0, 0), None);
        assert_eq!(same_instance(&first, &other, 2, 0), None);
        assert_eq!(same_instance(&first, &first, 1, 1), Some((1, 1)));
    }
}

/// The agent's side of a live migration's inspection state
/// ([`VnicControl`]): held on the destination until the commit, dropped
/// when the commit is refused.
#[cfg(test)]
mod migration_inspection_tests {
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use crate::migrating_host::{self, Conn, Host, host, host_with, model};

    use super::{HashMap, VnicControl, WorkerCore};
    use crate::http::Control;

    /// A one-worker host's control over `h`'s engine and inline inspection.
    fn control(h: Host, name: &str) -> VnicControl {
        let identities = Arc::new(h.identities);
        let mut core = WorkerCore::new(h.engine, identities);
        core.inline = Some(h.inline);
        VnicControl {
            workers: vec![Arc::new(Mutex::new(core))],
            origin: Instant::now(),
            host: name.into(),
            records: Arc::new(Mutex::new(Vec::new())),
            peer_tls: None,
            precopied: Mutex::new(HashMap::new()),
            inspect_marks: Mutex::new(HashMap::new()),
            delta_phases: Mutex::new(HashMap::new()),
            imported: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            holds_started: Mutex::new(HashMap::new()),
            quiet_staged: Mutex::new(std::collections::HashSet::new()),
            apply_locks: Mutex::new(HashMap::new()),
        }
    }

    /// (live inspected flows, flows held for a commit) on `c`.
    fn inspected(c: &VnicControl) -> (usize, usize) {
        let core = super::lock(&c.workers[0]);
        let inline = core.inline.as_ref().unwrap();
        (inline.flows(), inline.staged_total())
    }

    /// a.0 moves from a source with one inspected connection to a
    /// destination whose connection table holds `capacity`: its pre-copy
    /// and inspection pre-copy while the connection talks on, then in the
    /// pause its delta and inspection delta, as the peer channel carries
    /// them. Returns the destination and whether its commit was taken.
    fn migrate(capacity: usize) -> (VnicControl, Result<usize, crate::http::ControlError>) {
        let m = model();
        let mut src = host(&m, "h1");
        let now = migrating_host::MS;
        let mut c = Conn::open(&mut src, 40000, now);
        let _ = c.send(&mut src, b"LOGIN x\r\n", now);
        let src = control(src, "h1");
        let dst = control(host_with(&m, "h2", Some(capacity)), "h2");
        let mut staging = crate::peer::Staging::new("h1");
        let pre = src.export_precopy("a.0", Some("h2")).unwrap();
        dst.import_arrival(staging.stage("a.0", &pre).unwrap()).unwrap();
        let section = src.export_inspection_precopy("a.0", Some("h2")).unwrap();
        assert_eq!(dst.import_inspection("a.0", &section, Some("h1")).unwrap(), 1);
        assert_eq!(inspected(&dst), (0, 1), "held, not live");
        {
            // The guest talks on while the pre-copy is out.
            let mut core = super::lock(&src.workers[0]);
            let core = &mut *core;
            let mut h = Host {
                engine: std::mem::replace(&mut core.engine, host(&m, "x").engine),
                inline: core.inline.take().unwrap(),
                identities: (*core.identities).clone(),
                events: Vec::new(),
            };
            let _ = c.send(&mut h, b"read SECRET\r\n", 2 * now);
            core.engine = h.engine;
            core.inline = Some(h.inline);
        }
        let delta = src.export_delta("a.0", Some("h2")).unwrap();
        let section = src.export_inspection("a.0", Some("h2")).unwrap();
        assert_eq!(dst.import_inspection("a.0", &section, Some("h1")).unwrap(), 1);
        let committed = staging
            .commit("a.0", &delta)
            .map_err(crate::http::ControlError::Refused)
            .and_then(|a| dst.import_arrival(a));
        (dst, committed)
    }

    #[test]
    fn a_committed_delta_brings_the_held_inspection_state_live() {
        let (dst, committed) = migrate(16);
        assert_eq!(committed.unwrap(), 1);
        assert_eq!(inspected(&dst), (1, 0));
    }

    /// A commit refused after the inspection section was taken (here: no
    /// room for the connection on the destination) leaves no inspected
    /// flow behind, neither live nor held.
    #[test]
    fn a_refused_commit_drops_the_inspection_state_it_held() {
        let (dst, committed) = migrate(1);
        let e = committed.unwrap_err();
        assert!(
            matches!(&e, crate::http::ControlError::Refused(m) if m.contains("room")),
            "{e:?}"
        );
        assert_eq!(inspected(&dst), (0, 0));
    }
}
