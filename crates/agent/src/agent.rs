//! The agent's runtime: real ports around the sans-IO engine.
//!
//! One datapath thread owns the engine, every port (an AF_PACKET ring per vNIC
//! or appliance interface) and the underlay UDP socket. It waits for any of
//! them to be readable, takes a batch from each ready one, runs every frame
//! through the engine, stages the rendered outputs, and flushes each port once
//! per round. Between rounds it expires connections, reloads the policy when
//! its files change (keeping the last good one when the new one has errors),
//! turns flow events into audit records, and publishes metrics.
//!
//! Protection never lapses: Palisade *is* the switch between the VMs and the
//! network, so when the agent stops, traffic stops. On SIGTERM it exports each
//! vNIC's connection state to the state directory and the next start imports
//! it, so established connections survive a restart.

use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use palisade_audit::record::{FlowRecord, Record};
use palisade_datapath::events::FlowEvent;
use palisade_datapath::lookup::PolicyLookup;
use palisade_datapath::port::{self, PortId, UplinkConfig, VnicPort};
use palisade_datapath::{Disposition, DropReason, Engine, EngineConfig};
use palisade_io::afpacket::{AfPacket, AfPacketConfig};
use palisade_io::overlay::UdpOverlay;
use palisade_io::port::{FramePort, wait_readable};
use palisade_policy::compile::Compiler;
use palisade_policy::{DirSource, Model, load};
use palisade_wire::ethernet::EthernetAddress;

use crate::config::AgentConfig;
use crate::http::{self, Published, Shared};
use crate::metrics;
use crate::records::{self, Clock, Identities};

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The policy cannot be loaded at start.
    #[error("policy {dir}: {message}")]
    Policy {
        /// The policy directory.
        dir: PathBuf,
        /// What is wrong (diagnostics rendered).
        message: String,
    },
    /// A port from the configuration cannot be attached.
    #[error("{what}: {message}")]
    Port {
        /// The port (vNIC or appliance name and interface).
        what: String,
        /// Why.
        message: String,
    },
    /// An I/O error on a named resource.
    #[error("{what}: {source}")]
    Io {
        /// The resource.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The controller connection.
    #[error("{0}")]
    Controller(String),
    /// The audit trail failed (records could not be made durable).
    #[error("audit trail {dir}: {message}")]
    Audit {
        /// The audit directory.
        dir: PathBuf,
        /// Why.
        message: String,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Io { what, source }
}

/// Frames taken from one port per round.
const BATCH: usize = 64;
/// Longest frame the agent renders (a VXLAN header plus a 9000-byte jumbo frame, with room).
const MAX_FRAME: usize = 9216 + 64;
/// Flow records kept in memory for `/flows`.
const RECENT_FLOWS: usize = 500;

/// A port of the engine and the interface behind it.
struct Attached {
    /// Vnic or appliance name.
    name: String,
    interface: String,
    port: PortId,
    io: Box<dyn FramePort>,
}

/// Outputs of one round, rendered and waiting to be sent.
#[derive(Default)]
struct Staging {
    buf: Vec<u8>,
    /// (destination, end offset in `buf`).
    items: Vec<(Dest, usize)>,
    /// Outputs the agent has no port for (a plain uplink: this agent has none).
    unroutable: u64,
    /// Outputs that could not be rendered.
    render_errors: u64,
}

#[derive(Clone, Copy)]
enum Dest {
    Port(PortId),
    Overlay(Ipv4Addr),
}

impl Staging {
    /// Append room for one frame; `fill` writes it and returns its length.
    fn push(&mut self, dest: Dest, fill: impl FnOnce(&mut [u8]) -> Option<usize>) {
        let start = self.buf.len();
        self.buf.resize(start + MAX_FRAME, 0);
        match fill(&mut self.buf[start..]) {
            Some(n) => {
                self.buf.truncate(start + n);
                self.items.push((dest, start + n));
            }
            None => {
                self.buf.truncate(start);
                self.render_errors += 1;
            }
        }
    }
}

/// Run one frame through the engine and stage its outputs.
fn handle_frame(
    engine: &mut Engine,
    staging: &mut Staging,
    events: &mut Vec<FlowEvent>,
    now: u64,
    from: Result<PortId, Ipv4Addr>,
    frame: &[u8],
) {
    let disposition = match from {
        Ok(port) => engine.process(now, port, frame, events),
        Err(remote) => engine.process_overlay(now, remote, frame, events),
    };
    match disposition {
        Disposition::Forward => {
            for i in 0..engine.outputs().len() {
                let out = engine.outputs()[i];
                if out.encap.is_some() {
                    let mut remote = None;
                    staging.push(Dest::Overlay(Ipv4Addr::UNSPECIFIED), |buf| {
                        let (r, n) = engine.render_overlay(frame, i, buf).ok()?;
                        remote = Some(r);
                        Some(n)
                    });
                    if let (Some(r), Some(last)) = (remote, staging.items.last_mut()) {
                        last.0 = Dest::Overlay(r);
                    }
                } else if out.port == port::UPLINK {
                    staging.unroutable += 1;
                } else {
                    staging.push(Dest::Port(out.port), |buf| engine.render(frame, i, buf).ok());
                }
            }
        }
        Disposition::Drop(DropReason::PolicyReject) => {
            // Tell the sender: a TCP reset or ICMP prohibited, back out the port it came in on.
            if let Ok(port) = from {
                staging.push(Dest::Port(port), |buf| engine.reject_reply(frame, buf).ok());
            }
        }
        Disposition::Drop(_) => {}
    }
}

/// The running agent.
pub struct Agent {
    config: AgentConfig,
    engine: Engine,
    ports: Vec<Attached>,
    overlay: UdpOverlay,
    model: Model,
    identities: Identities,
    policy_stamp: Option<SystemTime>,
    /// Policies from the controller (controller mode).
    upstream: Option<std::sync::mpsc::Receiver<crate::upstream::Installed>>,
    /// The controller revision in force (controller mode).
    revision: Option<u64>,
    origin: Instant,
    clock: Clock,
    audit: Option<crate::trail::Trail>,
    /// Live IPFIX export of flow records.
    ipfix: Option<palisade_audit::ipfix::IpfixExporter>,
    /// Flow records for the controller (controller mode), sent once a second.
    to_controller: Option<std::sync::mpsc::SyncSender<Vec<FlowRecord>>>,
    controller_batch: Vec<FlowRecord>,
    /// Records the controller channel had no room for (they are in the local trail).
    controller_dropped: u64,
    last_retention: Option<Instant>,
    recent: VecDeque<FlowRecord>,
    shared: Shared,
    staging: Staging,
    events: Vec<FlowEvent>,
    last_update_round: u64,
    policy_errors: u64,
    last_policy_error: Option<String>,
}

impl core::fmt::Debug for Agent {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Agent")
            .field("host", &self.config.host)
            .field("ports", &self.ports.len())
            .finish_non_exhaustive()
    }
}

/// Load and compile the policy directory.
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

/// Where the connection table is saved across a restart.
fn state_file(state_dir: &Path) -> PathBuf {
    state_dir.join("conntrack").join("host.state")
}

impl Agent {
    /// Load the policy, attach every port, import saved connection state and
    /// start the HTTP endpoint. `stop` ends the HTTP threads too.
    pub fn start(config: AgentConfig, stop: Arc<AtomicBool>) -> Result<Agent, AgentError> {
        std::fs::create_dir_all(config.state_dir.join("conntrack"))
            .map_err(io_err(format!("state directory {}", config.state_dir.display())))?;
        let (compiler, policy_stamp, upstream, revision) = match (&config.policy, &config.controller) {
            (Some(dir), _) => (load_policy(dir)?, policy_stamp(dir), None, None),
            (None, Some(cc)) => {
                let client = crate::upstream::client(cc)?;
                // The last good policy first: the controller may be down.
                let (bundle, compiler) = match crate::upstream::load_saved(&config.state_dir) {
                    Some(saved) => {
                        eprintln!(
                            "palisade agent: enforcing saved controller policy revision {} until the controller answers",
                            saved.0.revision
                        );
                        saved
                    }
                    None => crate::upstream::first_policy(&client, &config.host, &config.state_dir, &stop)?,
                };
                let rx = crate::upstream::watch(
                    client,
                    config.host.clone(),
                    config.state_dir.clone(),
                    bundle.clone(),
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
        let model = compiler.model().clone();
        let uplink = UplinkConfig {
            local_mac: EthernetAddress([0; 6]),
            local_ip: config.underlay.local,
            gateway_mac: EthernetAddress([0; 6]),
            flood: config.underlay.peers.values().copied().collect(),
        };
        let mut ec = EngineConfig::new(uplink);
        if let Some(n) = config.flow_capacity {
            ec.flow_capacity = n;
        }
        if let Some(n) = config.conn_capacity {
            ec.conn_capacity = n;
        }
        let mut engine = Engine::new(ec, Box::new(PolicyLookup::new(compiler)));
        let mut ports = Vec::new();
        let afp = AfPacketConfig::default();
        for v in &config.vnics {
            let what = format!("vnic {} on {}", v.name, v.interface);
            let fail = |message: String| AgentError::Port {
                what: what.clone(),
                message,
            };
            let (vm, _) = model
                .inventory
                .vnic(&v.name)
                .ok_or_else(|| fail("not in the policy's inventory".into()))?;
            if vm.host.as_deref().is_some_and(|h| h != config.host) {
                eprintln!(
                    "palisade agent: warning: vnic {} belongs to host {:?} in the inventory, attached here to {}",
                    v.name, vm.host, config.host
                );
            }
            let vnic = port::vnic_from_model(&model, &v.name, &[], 10_000).map_err(|e| fail(e.to_string()))?;
            let id = engine.add_vnic(vnic).map_err(|e| fail(e.to_string()))?;
            let io = AfPacket::open(&v.interface, &afp).map_err(|e| fail(e.to_string()))?;
            ports.push(Attached {
                name: v.name.clone(),
                interface: v.interface.clone(),
                port: id,
                io: Box::new(io),
            });
        }
        for a in &config.appliances {
            let what = format!("appliance {} on {}", a.name, a.interface);
            let fail = |message: String| AgentError::Port {
                what: what.clone(),
                message,
            };
            let zone = model
                .inventory
                .zone(&a.zone)
                .ok_or_else(|| fail(format!("zone {} is not in the policy's inventory", a.zone)))?;
            let mac = a.mac.parse().map_err(|_| fail(format!("bad MAC {}", a.mac)))?;
            let vnic = VnicPort {
                name: a.name.clone(),
                vm: format!("appliance:{}", a.name),
                mac,
                ips: Vec::new(),
                zone: a.zone.clone(),
                segment: port::zone_segment(zone.segment),
                group_id: 0,
                strict: false,
                max_conns: u32::MAX,
                any_source: true,
            };
            let id = engine.add_vnic(vnic).map_err(|e| fail(e.to_string()))?;
            let io = AfPacket::open(&a.interface, &afp).map_err(|e| fail(e.to_string()))?;
            ports.push(Attached {
                name: a.name.clone(),
                interface: a.interface.clone(),
                port: id,
                io: Box::new(io),
            });
        }
        let local = std::net::SocketAddrV4::new(config.underlay.local, config.underlay.port);
        let overlay = UdpOverlay::bind(local).map_err(|e| AgentError::Port {
            what: format!("underlay socket {local}"),
            message: e.to_string(),
        })?;
        let origin = Instant::now();
        let unix_now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let clock = Clock {
            unix_at_zero: unix_now.as_nanos() as u64,
        };
        let audit = match &config.audit {
            Some(dir) => Some(crate::trail::Trail::open(dir, config.audit_retention())?),
            None => None,
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
        let shared: Shared = Arc::new(Mutex::new(Arc::new(Published::default())));
        http::serve(
            shared.clone(),
            config.metrics,
            &config.state_dir.join("agent.sock"),
            stop,
        )
        .map_err(io_err("agent HTTP endpoint"))?;
        let identities = Identities::new(&model);
        let mut agent = Agent {
            config,
            engine,
            ports,
            overlay,
            model,
            identities,
            policy_stamp,
            upstream,
            revision,
            origin,
            clock,
            audit,
            ipfix,
            to_controller,
            controller_batch: Vec::new(),
            controller_dropped: 0,
            last_retention: None,
            recent: VecDeque::new(),
            shared,
            staging: Staging::default(),
            events: Vec::new(),
            last_update_round: 0,
            policy_errors: 0,
            last_policy_error: None,
        };
        agent.import_state();
        agent.publish();
        Ok(agent)
    }

    fn now(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// Import connection state saved by a previous run (then remove it: it is stale once used).
    fn import_state(&mut self) {
        let now = self.now();
        let path = state_file(&self.config.state_dir);
        let Ok(blob) = std::fs::read(&path) else { return };
        match self.engine.import_all(&blob, now, &mut self.events) {
            Ok(n) => eprintln!("palisade agent: resumed {n} connection(s) from {}", path.display()),
            Err(e) => eprintln!("palisade agent: saved state {} refused: {e}", path.display()),
        }
        let _ = std::fs::remove_file(&path);
        // Imported connections are not new flows: their start was recorded before the restart.
        self.events.clear();
    }

    /// Serve until `stop` is set.
    pub fn run(&mut self, stop: &AtomicBool) -> Result<(), AgentError> {
        let mut fds: Vec<i32> = self.ports.iter().map(|p| p.io.fd()).collect();
        fds.push(self.overlay.fd());
        let overlay_index = fds.len() - 1;
        let mut last_housekeeping = Instant::now();
        let mut last_publish = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let ready = match wait_readable(&fds, Duration::from_millis(100)) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err("waiting for packets")(e)),
            };
            let now = self.now();
            for i in ready {
                if i == overlay_index {
                    self.round_overlay(now);
                } else {
                    self.round_port(i, now);
                }
            }
            self.send_staged();
            self.take_upstream();
            if last_housekeeping.elapsed() >= Duration::from_secs(1) {
                last_housekeeping = Instant::now();
                self.housekeeping();
            }
            self.take_events()?;
            if last_publish.elapsed() >= Duration::from_millis(500) {
                last_publish = Instant::now();
                self.publish();
            }
        }
        Ok(())
    }

    fn round_port(&mut self, i: usize, now: u64) {
        let Agent {
            engine,
            ports,
            staging,
            events,
            ..
        } = self;
        let p = &mut ports[i];
        let port = p.port;
        let r = p.io.recv(BATCH, &mut |frame| {
            handle_frame(engine, staging, events, now, Ok(port), frame);
        });
        if let Err(e) = r {
            eprintln!("palisade agent: receive on {}: {e}", p.interface);
        }
    }

    fn round_overlay(&mut self, now: u64) {
        let Agent {
            engine,
            overlay,
            staging,
            events,
            ..
        } = self;
        let r = overlay.recv(BATCH, &mut |remote, payload| {
            handle_frame(engine, staging, events, now, Err(remote), payload);
        });
        if let Err(e) = r {
            eprintln!("palisade agent: receive on the underlay socket: {e}");
        }
    }

    fn send_staged(&mut self) {
        let mut start = 0;
        let index: HashMap<PortId, usize> = self.ports.iter().enumerate().map(|(i, p)| (p.port, i)).collect();
        let mut touched = vec![false; self.ports.len()];
        for &(dest, end) in &self.staging.items {
            let frame = &self.staging.buf[start..end];
            start = end;
            match dest {
                Dest::Port(p) => {
                    if let Some(&i) = index.get(&p) {
                        touched[i] = true;
                        // Send errors are counted by the port (tx_errors) and show in metrics.
                        let _ = self.ports[i].io.send(frame);
                    }
                }
                Dest::Overlay(remote) => {
                    let _ = self.overlay.send_to(remote, frame);
                }
            }
        }
        for (i, t) in touched.into_iter().enumerate() {
            if t {
                let _ = self.ports[i].io.flush();
            }
        }
        if !self.staging.items.is_empty() {
            let _ = self.overlay.flush();
        }
        self.staging.items.clear();
        self.staging.buf.clear();
    }

    /// Install the newest policy the controller sent, if any (checked every
    /// round: an atomic load when there is none, and a change takes effect
    /// within one round of its arrival).
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

    /// Expire idle connections, emit periodic updates, reload a changed policy.
    fn housekeeping(&mut self) {
        let now = self.now();
        self.engine.expire(now, 65_536, &mut self.events);
        // Long-lived flows get an update record every minute.
        let minute = now / 60_000_000_000;
        if minute > self.last_update_round {
            let since = self.last_update_round * 60_000_000_000;
            self.last_update_round = minute;
            let live: Vec<FlowEvent> = self
                .engine
                .conntrack()
                .iter()
                .filter(|(_, c)| c.last_seen >= since && !c.ended)
                .map(|(_, c)| FlowEvent {
                    kind: palisade_datapath::events::EventKind::Update,
                    key: c.key,
                    state: c.state,
                    packets: c.packets,
                    bytes: c.bytes,
                    reply_packets: c.reply_packets,
                    reply_bytes: c.reply_bytes,
                    rules: c.rules,
                    policy_version: c.policy_version,
                    trusted: c.trusted,
                    owners: c.owners,
                    created: c.created,
                    last_seen: c.last_seen,
                    now,
                })
                .collect();
            for ev in &live {
                let rec = records::update_record(ev, &self.config.host, &self.engine, &self.identities, self.clock);
                self.keep(rec);
            }
        }
        let unix_s = (self.clock.unix(now) / 1_000_000_000) as u32;
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

    fn install(&mut self, compiler: Compiler) {
        self.model = compiler.model().clone();
        self.identities = Identities::new(&self.model);
        self.engine.update_policy(Box::new(PolicyLookup::new(compiler)));
        self.last_policy_error = None;
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
                    self.engine.policy_version()
                );
                self.last_policy_error = Some(e.to_string());
            }
        }
    }

    fn keep(&mut self, rec: FlowRecord) {
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
        }
    }

    /// Turn the round's flow events into records; make them durable.
    fn take_events(&mut self) -> Result<(), AgentError> {
        let events = std::mem::take(&mut self.events);
        for ev in &events {
            if let Some(rec) = records::flow_record(ev, &self.config.host, &self.engine, &self.identities, self.clock) {
                self.keep(rec);
            }
        }
        self.events = events;
        self.events.clear();
        if let Some(t) = &mut self.audit {
            t.maybe_flush()?;
        }
        Ok(())
    }

    /// Publish metrics, recent flows and health for the HTTP endpoint.
    pub fn publish(&mut self) {
        let port_stats: Vec<(String, String, palisade_io::port::PortStats)> = self
            .ports
            .iter()
            .map(|p| (p.name.clone(), p.interface.clone(), p.io.stats()))
            .collect();
        let text = metrics::render(&metrics::Snapshot {
            host: &self.config.host,
            engine: &self.engine,
            ports: &port_stats,
            port_ids: &self.ports.iter().map(|p| p.port).collect::<Vec<_>>(),
            overlay: self.overlay.stats(),
            unroutable: self.staging.unroutable,
            render_errors: self.staging.render_errors,
            policy_errors: self.policy_errors,
            audit: self.audit.as_ref().map(|t| t.stats()),
            ipfix: self.ipfix.as_ref().map(|x| x.stats()),
            controller_dropped: self.to_controller.as_ref().map(|_| self.controller_dropped),
        });
        let flows = serde_json::to_string(&self.recent).unwrap_or_else(|_| "[]".into());
        let health = serde_json::json!({
            "host": self.config.host,
            "status": if self.last_policy_error.is_some() { "degraded" } else { "ok" },
            "policy_version": self.engine.policy_version(),
            "controller_revision": self.revision,
            "policy_error": self.last_policy_error,
            "ports": self.ports.len(),
            "connections": self.engine.conntrack().len(),
            "uptime_s": self.origin.elapsed().as_secs(),
        })
        .to_string();
        if let Ok(mut g) = self.shared.lock() {
            *g = Arc::new(Published {
                metrics: text,
                flows,
                health,
            });
        }
    }

    /// Stop: save every connection for the next start, make the trail durable.
    /// Returns how many connections were saved.
    pub fn shutdown(mut self) -> Result<usize, AgentError> {
        let now = self.now();
        let saved = self.engine.conntrack().len();
        let blob = self.engine.export_all(now);
        let path = state_file(&self.config.state_dir);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &blob)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(io_err(format!("saving {}", path.display())))?;
        self.take_events()?;
        let unix_now = self.clock.unix(self.now());
        if let Some(t) = &mut self.audit {
            t.close(unix_now)?;
        }
        Ok(saved)
    }

    /// Ports attached (vNICs and appliances).
    pub fn ports(&self) -> usize {
        self.ports.len()
    }

    /// The engine (tests, metrics).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}
