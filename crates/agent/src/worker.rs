//! One datapath worker: an engine and its own socket on every port.
//!
//! A host runs one worker per core. Each owns an [`Engine`], an AF_PACKET ring
//! on every vNIC and appliance interface and a UDP socket on the underlay,
//! and the kernel steers every frame to one worker (`palisade_io::steer`: a
//! packet-fanout program on each interface, a reuseport program on the
//! underlay) by a symmetric hash of the addresses. Both directions of a
//! connection, every fragment of a datagram and the ICMP errors quoting it
//! therefore reach the same worker, on any port, and workers share no flow
//! state and take no lock per packet.
//!
//! A worker thread waits for any of its sockets, runs each ready one's batch
//! through its engine, sends the staged outputs, expires connections once a
//! second, and turns its flow events into audit records itself (rule ids are
//! its engine's), which it hands to the control thread over a channel. The
//! engine sits behind a mutex that the worker holds for one round at a time;
//! the control thread takes it only to install a policy, export state and
//! read counters.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use palisade_audit::record::FlowRecord;
use palisade_datapath::events::{EventKind, FlowEvent};
use palisade_datapath::port::{self, PortId};
use palisade_datapath::{Disposition, DropReason, Engine};
use palisade_io::overlay::UdpOverlay;
use palisade_io::port::{FramePort, PortStats, wait_readable};

use crate::records::{self, Clock, Identities};

/// Frames taken from one port per round.
const BATCH: usize = 64;
/// Longest frame a worker renders (a VXLAN header plus a 9000-byte jumbo frame, with room).
const MAX_FRAME: usize = 9216 + 64;

/// A port of the engine and the worker's socket behind it.
pub(crate) struct Attached {
    /// The interface.
    pub interface: String,
    /// The engine's port.
    pub port: PortId,
    /// The worker's socket on the interface.
    pub io: Box<dyn FramePort>,
}

/// A worker's sockets: one per port, in the engine's port order, and the underlay's.
pub(crate) struct WorkerIo {
    /// The ports.
    pub ports: Vec<Attached>,
    /// The underlay socket.
    pub overlay: UdpOverlay,
}

/// What a worker shares with the control thread.
pub(crate) struct WorkerCore {
    /// The worker's engine.
    pub engine: Engine,
    /// The identities flow records name (replaced with each policy).
    pub identities: Arc<Identities>,
    /// I/O stats of the worker's sockets, one per port (refreshed every round).
    pub port_stats: Vec<PortStats>,
    /// I/O stats of the worker's underlay socket.
    pub overlay_stats: PortStats,
    /// Outputs with nowhere to go (a plain uplink: an agent has none).
    pub unroutable: u64,
    /// Outputs that could not be rendered.
    pub render_errors: u64,
    /// vNIC ports whose VM is migrating away: nothing is forwarded to or from them.
    pub quiesced: Vec<PortId>,
    /// Frames dropped because their port was quiesced (reason `vnic_migrating`).
    pub quiesced_drops: u64,
}

/// Lock a worker's core. A worker that panicked while holding it has
/// stopped (the control thread notices and stops the agent), so the state
/// behind a poisoned lock is still the best there is to read or save.
pub(crate) fn lock(core: &Mutex<WorkerCore>) -> MutexGuard<'_, WorkerCore> {
    core.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Outputs of one round, rendered and waiting to be sent.
#[derive(Default)]
struct Staging {
    buf: Vec<u8>,
    /// (destination, end offset in `buf`).
    items: Vec<(Dest, usize)>,
    unroutable: u64,
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

/// Run one frame that arrived on the underlay through the engine and stage its outputs.
fn handle_overlay(
    engine: &mut Engine,
    staging: &mut Staging,
    events: &mut Vec<FlowEvent>,
    now: u64,
    remote: Ipv4Addr,
    payload: &[u8],
) {
    let disposition = engine.process_overlay(now, remote, payload, events);
    stage(engine, staging, disposition, Err(remote), payload);
}

/// Run a batch of frames that arrived on `port` through the engine (which
/// looks their flows up ahead, [`Engine::process_batch`]) and stage their outputs.
fn handle_batch(
    engine: &mut Engine,
    staging: &mut Staging,
    events: &mut Vec<FlowEvent>,
    now: u64,
    port: PortId,
    frames: &[&[u8]],
) {
    engine.process_batch(now, port, frames, events, |engine, i, disposition| {
        stage(engine, staging, disposition, Ok(port), frames[i]);
    });
}

/// Stage the outputs of the frame the engine has just processed (they are in
/// [`Engine::outputs`] until its next frame).
fn stage(
    engine: &Engine,
    staging: &mut Staging,
    disposition: Disposition,
    from: Result<PortId, Ipv4Addr>,
    frame: &[u8],
) {
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

/// Everything a worker thread needs.
pub(crate) struct Worker {
    /// The worker's index (the kernel steers by it).
    pub index: usize,
    /// The host's name (in flow records).
    pub host: String,
    /// The agent's start (the engines' clock).
    pub origin: Instant,
    /// Engine time → Unix time.
    pub clock: Clock,
    /// Shared with the control thread.
    pub core: Arc<Mutex<WorkerCore>>,
    /// The worker's sockets.
    pub io: WorkerIo,
    /// Flow records for the control thread.
    pub records: Sender<Vec<FlowRecord>>,
}

/// Why a worker stopped early.
pub(crate) type WorkerFailure = String;

impl Worker {
    /// Serve until `halt` is set. Returns early only when the sockets cannot
    /// be waited on or the control thread has gone.
    pub fn run(mut self, halt: &AtomicBool) -> Result<(), WorkerFailure> {
        let mut fds: Vec<i32> = self.io.ports.iter().map(|p| p.io.fd()).collect();
        fds.push(self.io.overlay.fd());
        let overlay_index = fds.len() - 1;
        let mut staging = Staging::default();
        let mut sockets = Sockets::new(&self.io.ports);
        let mut events = Vec::new();
        let mut records = Vec::new();
        let mut last_housekeeping = Instant::now();
        let mut last_update_round = 0;
        let (mut quiesced, mut quiesced_drops) = (Vec::new(), 0u64);
        while !halt.load(Ordering::Relaxed) {
            let ready = match wait_readable(&fds, Duration::from_millis(100)) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("waiting for packets: {e}")),
            };
            let now = self.origin.elapsed().as_nanos() as u64;
            {
                let mut guard = lock(&self.core);
                let core = &mut *guard;
                for i in ready {
                    let engine = &mut core.engine;
                    if i == overlay_index {
                        let r = self.io.overlay.recv(BATCH, &mut |remote, payload| {
                            handle_overlay(engine, &mut staging, &mut events, now, remote, payload);
                        });
                        if let Err(e) = r {
                            eprintln!(
                                "palisade agent: worker {}: receive on the underlay socket: {e}",
                                self.index
                            );
                        }
                    } else {
                        let p = &mut self.io.ports[i];
                        let port = p.port;
                        let r = if core.quiesced.contains(&port) {
                            p.io.recv_batch(BATCH, &mut |frames| quiesced_drops += frames.len() as u64)
                        } else {
                            p.io.recv_batch(BATCH, &mut |frames| {
                                handle_batch(engine, &mut staging, &mut events, now, port, frames);
                            })
                        };
                        if let Err(e) = r {
                            eprintln!("palisade agent: worker {}: receive on {}: {e}", self.index, p.interface);
                        }
                    }
                }
                if last_housekeeping.elapsed() >= Duration::from_secs(1) {
                    last_housekeeping = Instant::now();
                    core.engine.expire(now, 65_536, &mut events);
                    // Long-lived flows get an update record every minute.
                    let minute = now / 60_000_000_000;
                    if minute > last_update_round {
                        let since = last_update_round * 60_000_000_000;
                        last_update_round = minute;
                        for ev in live_since(&core.engine, since, now) {
                            records.push(records::update_record(
                                &ev,
                                &self.host,
                                &core.engine,
                                &core.identities,
                                self.clock,
                            ));
                        }
                    }
                }
                for ev in events.drain(..) {
                    if let Some(rec) = records::flow_record(&ev, &self.host, &core.engine, &core.identities, self.clock)
                    {
                        records.push(rec);
                    }
                }
                // Stats as of the previous round's sends: one round late, never torn.
                core.port_stats.clear();
                core.port_stats.extend(self.io.ports.iter().map(|p| p.io.stats()));
                core.overlay_stats = self.io.overlay.stats();
                core.unroutable = staging.unroutable;
                core.render_errors = staging.render_errors;
                core.quiesced_drops = quiesced_drops;
                quiesced.clone_from(&core.quiesced);
            }
            quiesced_drops += self.send_staged(&mut staging, &mut sockets, &quiesced);
            if !records.is_empty() && self.records.send(std::mem::take(&mut records)).is_err() {
                return Err("the control thread has stopped".into());
            }
        }
        Ok(())
    }

    /// Send the staged frames; returns how many were dropped for a quiesced port.
    fn send_staged(&mut self, staging: &mut Staging, sockets: &mut Sockets, quiesced: &[PortId]) -> u64 {
        let mut dropped = 0;
        let mut start = 0;
        for &(dest, end) in &staging.items {
            let frame = &staging.buf[start..end];
            start = end;
            match dest {
                Dest::Port(p) if quiesced.contains(&p) => dropped += 1,
                Dest::Port(p) => {
                    if let Some(i) = sockets.of(p) {
                        sockets.touched[i] = true;
                        // Send errors are counted by the port (tx_errors) and show in metrics.
                        let _ = self.io.ports[i].io.send(frame);
                    }
                }
                Dest::Overlay(remote) => {
                    let _ = self.io.overlay.send_to(remote, frame);
                }
            }
        }
        for (i, t) in sockets.touched.iter_mut().enumerate() {
            if std::mem::take(t) {
                let _ = self.io.ports[i].io.flush();
            }
        }
        if !staging.items.is_empty() {
            let _ = self.io.overlay.flush();
        }
        staging.items.clear();
        staging.buf.clear();
        dropped
    }
}

/// Which of a worker's sockets serves each engine port, and which were sent on this round.
struct Sockets {
    /// Indexed by the engine's port number.
    by_port: Vec<Option<usize>>,
    touched: Vec<bool>,
}

impl Sockets {
    fn new(ports: &[Attached]) -> Sockets {
        let len = ports.iter().map(|a| usize::from(a.port.0) + 1).max().unwrap_or(0);
        let mut by_port = vec![None; len];
        for (i, a) in ports.iter().enumerate() {
            by_port[usize::from(a.port.0)] = Some(i);
        }
        Sockets {
            by_port,
            touched: vec![false; ports.len()],
        }
    }

    fn of(&self, port: PortId) -> Option<usize> {
        self.by_port.get(usize::from(port.0)).copied().flatten()
    }
}

/// Update events for the live connections seen since `since`.
fn live_since(engine: &Engine, since: u64, now: u64) -> Vec<FlowEvent> {
    engine
        .conntrack()
        .iter()
        .filter(|(_, c)| c.last_seen >= since && !c.ended)
        .map(|(_, c)| FlowEvent {
            kind: EventKind::Update,
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
        .collect()
}
