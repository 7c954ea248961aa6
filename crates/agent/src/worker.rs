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
//! With offloads on (`AgentConfig::offloads`, the default) frames keep
//! their virtio-net offload state end to end: a vNIC's TSO super-frame is
//! received whole (`recv_frames`), decided whole
//! (`Engine::process_batch_offloaded`), and sent whole with its checksum
//! still partial (`send_frames`: the kernel segments it for the guest, or
//! `send_batch` with `UDP_SEGMENT` on the underlay); the underlay's
//! GRO batches are merged back into super-frames (`recv_coalesced`). Off,
//! each frame is cut into plain packets before the engine. A round's
//! outputs are rendered once, into the staging buffer, and sent from there:
//! each port's and the underlay's in one call, which gathers the frames (and,
//! on the underlay, each segment's payload) from where they lie.
//!
//! A worker thread waits for any of its sockets, runs each ready one's batch
//! through its engine and sends that batch's staged outputs before it reads
//! the next socket (so one direction of a stream never waits behind a batch
//! of the other), expires connections once a
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
use palisade_datapath::port::{self, PortId};
use palisade_datapath::{Engine, Processed, Results};
use palisade_datapath::{EventKind, FlowEvent};
use palisade_io::gso::Coalescer;
use palisade_io::overlay::{Outgoing, UdpOverlay};
use palisade_io::port::{FramePort, Offload, PortStats, RxFrame, wait_readable};
use palisade_wire::vxlan;

use crate::inspection::{Inline, InlineVerdict};
use crate::records::{self, Clock, Identities};

/// Frames taken from one port per round.
const BATCH: usize = 64;
/// Room for a rendered frame beyond the frame it is made from (a VXLAN
/// header, a VLAN tag, outer headers), and at least a 9000-byte jumbo frame's.
const RENDER_ROOM: usize = 128;
const MIN_FRAME: usize = 9216 + 64;

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
    /// Offloads end to end (`AgentConfig::offloads`): frames are received
    /// with their offload state, processed whole and sent with it; else
    /// each is cut into plain packets first.
    pub offloads: bool,
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
    /// The crash journal of the connections made, changed or ended since
    /// the last snapshot (`None`: snapshots are off, or it could not be made).
    pub journal: Option<crate::journal::Journal>,
    /// Inline inspection (`None`: no `[inspect]`, or its signatures never loaded).
    pub inline: Option<Inline>,
    /// Service-chain health probes to send into appliance ports (put here
    /// by the control thread, sent with the worker's next round).
    pub probe_out: Vec<palisade_datapath::probe::ProbeFrame>,
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
    /// The rendered frames, `buf[..used]`; the rest is room kept (and
    /// zeroed) from earlier rounds, so that making room for a frame, up to
    /// 64 KiB for a super-frame, does not write it again each time.
    buf: Vec<u8>,
    used: usize,
    /// (destination, end offset in `buf`, the frame's offload state).
    items: Vec<(Dest, usize, Offload)>,
    unroutable: u64,
    render_errors: u64,
}

#[derive(Clone, Copy)]
enum Dest {
    Port(PortId),
    Overlay(Ipv4Addr),
}

impl Staging {
    /// Append room for one frame made from one of `len` bytes; `fill`
    /// writes it and returns its length. It leaves with `offload` (`None`:
    /// it cannot carry its frame's offload state, and is not sent).
    fn push(
        &mut self,
        dest: Dest,
        len: usize,
        offload: Option<Offload>,
        fill: impl FnOnce(&mut [u8]) -> Option<usize>,
    ) {
        let start = self.used;
        let end = start + (len + RENDER_ROOM).max(MIN_FRAME);
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        match offload.and_then(|o| Some((o, fill(&mut self.buf[start..end])?))) {
            Some((offload, n)) => {
                self.used = start + n;
                self.items.push((dest, start + n, offload));
            }
            None => self.render_errors += 1,
        }
    }

    /// Forget the round's frames, keeping the room.
    fn clear(&mut self) {
        self.items.clear();
        self.used = 0;
    }
}

/// Run one frame that arrived on the underlay through the engine and stage its outputs.
#[allow(clippy::too_many_arguments)]
fn handle_overlay(
    engine: &mut Engine,
    staging: &mut Staging,
    events: &mut Vec<FlowEvent>,
    results: &mut Results,
    inline: &mut Inspection<'_>,
    now: u64,
    remote: Ipv4Addr,
    payload: &[u8],
) {
    engine.process_overlay(now, remote, payload, events, results);
    if let Some(processed) = results.get(0, payload) {
        inspect_and_stage(engine, staging, events, inline, &processed, port::UPLINK, now, None);
    }
}

/// Run a super-frame (or a plain frame) that arrived on the underlay
/// through the engine whole: `offload` describes `payload` from its start.
#[allow(clippy::too_many_arguments)]
fn handle_overlay_offloaded(
    engine: &mut Engine,
    staging: &mut Staging,
    events: &mut Vec<FlowEvent>,
    results: &mut Results,
    now: u64,
    remote: Ipv4Addr,
    payload: &[u8],
    offload: Offload,
    inline: &mut Inspection<'_>,
) {
    engine.process_overlay_offloaded(now, remote, payload, offload, events, results);
    if let Some(processed) = results.get(0, payload) {
        inspect_and_stage(engine, staging, events, inline, &processed, port::UPLINK, now, None);
    }
}

/// Run a batch of frames with their offload state that arrived on `port`
/// through the engine whole ([`Engine::process_batch_offloaded`]) and stage
/// their outputs; `offloads` is scratch kept between batches.
#[allow(clippy::too_many_arguments)]
fn handle_frames(
    engine: &mut Engine,
    staging: &mut Staging,
    events: &mut Vec<FlowEvent>,
    results: &mut Results,
    offloads: &mut Vec<Offload>,
    inline: &mut Inspection<'_>,
    now: u64,
    port: PortId,
    frames: &[RxFrame<'_>],
) {
    offloads.clear();
    offloads.extend(frames.iter().map(|f| f.offload));
    engine.process_batch_offloaded(now, port, frames, offloads, events, results);
    for processed in results.iter(frames) {
        inspect_and_stage(engine, staging, events, inline, &processed, port, now, Some(port));
    }
}

/// Run a batch of frames that arrived on `port` through the engine (which
/// looks their flows up ahead, [`Engine::process_batch`]) and stage their outputs.
#[allow(clippy::too_many_arguments)]
fn handle_batch(
    engine: &mut Engine,
    staging: &mut Staging,
    events: &mut Vec<FlowEvent>,
    results: &mut Results,
    inline: &mut Inspection<'_>,
    now: u64,
    port: PortId,
    frames: &[&[u8]],
) {
    engine.process_batch(now, port, frames, events, results);
    for processed in results.iter(frames) {
        inspect_and_stage(engine, staging, events, inline, &processed, port, now, Some(port));
    }
}

/// A worker's inline inspection and what its alert records name.
struct Inspection<'a> {
    inline: Option<&'a mut Inline>,
    identities: &'a Identities,
}

/// Stage a processed frame, first inspecting it when its flow has a
/// profile (a flow without one costs one test of a byte here): dropped
/// frames are not staged, a rejected one's sender gets the reply.
#[allow(clippy::too_many_arguments)]
#[inline]
fn inspect_and_stage(
    engine: &mut Engine,
    staging: &mut Staging,
    events: &mut Vec<FlowEvent>,
    inline: &mut Inspection<'_>,
    processed: &Processed<'_>,
    in_port: PortId,
    now: u64,
    from: Option<PortId>,
) {
    if processed.inspection().is_some()
        && let Some(ins) = inline.inline.as_deref_mut()
    {
        match ins.frame(engine, processed, in_port, now, inline.identities, events) {
            InlineVerdict::Forward => {}
            InlineVerdict::Drop => return,
            InlineVerdict::Reject => {
                if let (Some(port), Some(reply)) = (from, processed.reject_reply()) {
                    staging.push(Dest::Port(port), 0, Some(Offload::NONE), |buf| {
                        palisade_datapath::render_reply(&reply, buf).ok()
                    });
                }
                return;
            }
        }
    }
    stage(staging, processed, from);
}

/// Stage what the engine decided for one frame: its outputs, or the reply
/// to a rejected frame that came in on a port (`from`).
/// Each copy leaves with the frame's offload state moved to where
/// rendering put its headers (for the underlay, counted after the VXLAN header).
fn stage(staging: &mut Staging, processed: &Processed<'_>, from: Option<PortId>) {
    let len = processed.frame().len();
    for out in processed.outputs {
        match out.encap {
            Some(encap) => {
                let offload = palisade_datapath::render_overlay_offload(processed);
                staging.push(Dest::Overlay(encap.remote), len, offload, |buf| {
                    palisade_datapath::render_overlay(processed, &encap, buf).ok()
                });
            }
            None if out.port == port::UPLINK => staging.unroutable += 1,
            None => {
                let offload = palisade_datapath::render_offload(processed, out);
                staging.push(Dest::Port(out.port), len, offload, |buf| {
                    palisade_datapath::render(processed, out, buf).ok()
                })
            }
        }
    }
    // Tell the sender of a rejected frame: a TCP reset or ICMP prohibited,
    // back out the port it came in on.
    if let (Some(port), Some(reply)) = (from, processed.reply()) {
        staging.push(Dest::Port(port), 0, Some(Offload::NONE), |buf| {
            palisade_datapath::render_reply(&reply, buf).ok()
        });
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
#[derive(Debug, thiserror::Error)]
pub(crate) enum WorkerFailure {
    /// Its sockets could not be waited on.
    #[error("waiting for packets: {0}")]
    Wait(#[source] std::io::Error),
    /// The control thread, which takes its flow records, has gone.
    #[error("the control thread has stopped")]
    ControlGone,
}

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
        let mut results = Results::with_capacity(BATCH);
        let mut offloads = Vec::with_capacity(BATCH);
        let mut coalescer = Coalescer::new(vxlan::HEADER_LEN);
        let offloaded = self.io.offloads;
        let mut records = Vec::new();
        let mut last_housekeeping = Instant::now();
        let mut last_update_round = 0;
        let mut quiesced_drops = 0u64;
        while !halt.load(Ordering::Relaxed) {
            let ready = match wait_readable(&fds, Duration::from_millis(100)) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(WorkerFailure::Wait(e)),
            };
            let now = self.origin.elapsed().as_nanos() as u64;
            {
                let mut guard = lock(&self.core);
                let core = &mut *guard;
                let mut inspection = Inspection {
                    inline: core.inline.as_mut(),
                    identities: &core.identities,
                };
                // Events before this one are in the journal.
                let mut journaled = 0;
                for i in ready {
                    let engine = &mut core.engine;
                    if i == overlay_index {
                        let r = if offloaded {
                            self.io
                                .overlay
                                .recv_coalesced(BATCH, &mut coalescer, &mut |remote, payload, offload| {
                                    // The coalescer's offsets count from the inner frame; the engine's from the VXLAN header.
                                    match offload.shifted(0, vxlan::HEADER_LEN as u16) {
                                        Some(o) => handle_overlay_offloaded(
                                            engine,
                                            &mut staging,
                                            &mut events,
                                            &mut results,
                                            now,
                                            remote,
                                            payload,
                                            o,
                                            &mut inspection,
                                        ),
                                        None => staging.render_errors += 1,
                                    }
                                })
                        } else {
                            self.io.overlay.recv(BATCH, &mut |remote, payload| {
                                handle_overlay(
                                    engine,
                                    &mut staging,
                                    &mut events,
                                    &mut results,
                                    &mut inspection,
                                    now,
                                    remote,
                                    payload,
                                );
                            })
                        };
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
                        } else if offloaded {
                            p.io.recv_frames(BATCH, &mut |frames| {
                                handle_frames(
                                    engine,
                                    &mut staging,
                                    &mut events,
                                    &mut results,
                                    &mut offloads,
                                    &mut inspection,
                                    now,
                                    port,
                                    frames,
                                );
                            })
                        } else {
                            p.io.recv_batch(BATCH, &mut |frames| {
                                handle_batch(
                                    engine,
                                    &mut staging,
                                    &mut events,
                                    &mut results,
                                    &mut inspection,
                                    now,
                                    port,
                                    frames,
                                );
                            })
                        };
                        if let Err(e) = r {
                            eprintln!("palisade agent: worker {}: receive on {}: {e}", self.index, p.interface);
                        }
                    }
                    // This socket's outputs leave before the next socket's batch is
                    // read: a stream's ACKs (or its data) are not held behind up to
                    // 64 super-frames of the other direction. Its connection events
                    // are journaled first, as before any frame of theirs leaves.
                    journal_events(&mut core.journal, &core.engine, &events[journaled..], now);
                    journaled = events.len();
                    quiesced_drops += send_staged(&mut self.io, &mut staging, &mut sockets, &core.quiesced);
                }
                if last_housekeeping.elapsed() >= Duration::from_secs(1) {
                    last_housekeeping = Instant::now();
                    core.engine.expire(now, 65_536, &mut events);
                    if let Some(ins) = &mut core.inline {
                        ins.expire(now);
                    }
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
                journal_events(&mut core.journal, &core.engine, &events[journaled..], now);
                for ev in events.drain(..) {
                    if let Some(rec) = records::flow_record(&ev, &self.host, &core.engine, &core.identities, self.clock)
                    {
                        records.push(rec);
                    }
                }
                // Service chains' health probes the control thread queued
                // here: into their appliance ports, with this round's sends.
                if !core.probe_out.is_empty() {
                    for probe in core.probe_out.drain(..) {
                        let n = probe.frame.len();
                        staging.push(Dest::Port(probe.port), n, Some(Offload::NONE), |buf| {
                            buf.get_mut(..n)?.copy_from_slice(&probe.frame);
                            Some(n)
                        });
                    }
                    quiesced_drops += send_staged(&mut self.io, &mut staging, &mut sockets, &core.quiesced);
                }
                // Stats as of this round's sends (read under the lock: never torn).
                core.port_stats.clear();
                core.port_stats.extend(self.io.ports.iter().map(|p| p.io.stats()));
                core.overlay_stats = self.io.overlay.stats();
                core.unroutable = staging.unroutable;
                core.render_errors = staging.render_errors;
                core.quiesced_drops = quiesced_drops;
            }
            if !records.is_empty() && self.records.send(std::mem::take(&mut records)).is_err() {
                return Err(WorkerFailure::ControlGone);
            }
        }
        Ok(())
    }
}

/// Note connection events in the crash journal, if there is one: a few per
/// connection, never per packet.
fn journal_events(journal: &mut Option<crate::journal::Journal>, engine: &Engine, events: &[FlowEvent], now: u64) {
    if let Some(j) = journal {
        let table = engine.conntrack();
        for ev in events {
            j.note(ev, table.find(&ev.key).and_then(|s| table.get(s)), now);
        }
    }
}

/// Send the staged frames; returns how many were dropped for a quiesced port.
fn send_staged(io: &mut WorkerIo, staging: &mut Staging, sockets: &mut Sockets, quiesced: &[PortId]) -> u64 {
    let mut dropped = 0;
    let mut to_underlay = false;
    for &(dest, _, _) in &staging.items {
        match dest {
            Dest::Port(p) if quiesced.contains(&p) => dropped += 1,
            Dest::Port(p) => {
                if let Some(i) = sockets.of(p) {
                    sockets.touched[i] = true;
                }
            }
            Dest::Overlay(_) => to_underlay = true,
        }
    }
    for i in 0..sockets.touched.len() {
        if !std::mem::take(&mut sockets.touched[i]) {
            continue;
        }
        // Each port's frames in one call, sent from the staging buffer
        // where they lie. Send errors are counted by the port (tx_errors,
        // offload_errors) and show in metrics. A port with virtio-net
        // headers hands a super-frame to the kernel whole; one without
        // segments it.
        let port = io.ports[i].port;
        let mut start = 0;
        let mut frames = staging.items.iter().filter_map(|(dest, end, offload)| {
            let frame = &staging.buf[start..*end];
            start = *end;
            matches!(dest, Dest::Port(p) if *p == port).then_some((frame, offload))
        });
        let _ = io.ports[i].io.send_frames(&mut frames);
    }
    if to_underlay {
        // One batch, in order: a super-frame is cut by the kernel
        // (UDP_SEGMENT), each packet's headers written apart and its
        // payload sent from the staging buffer where it lies.
        let mut start = 0;
        let mut frames = staging.items.iter().filter_map(|&(dest, end, offload)| {
            let frame = &staging.buf[start..end];
            start = end;
            match dest {
                Dest::Overlay(remote) => {
                    let (prefix, inner) = frame.split_at(vxlan::HEADER_LEN.min(frame.len()));
                    Some(if offload == Offload::NONE {
                        // A plain frame: one datagram, the VXLAN header included.
                        Outgoing {
                            remote,
                            prefix: &[],
                            frame,
                            offload,
                        }
                    } else {
                        Outgoing {
                            remote,
                            prefix,
                            frame: inner,
                            offload,
                        }
                    })
                }
                Dest::Port(_) => None,
            }
        });
        let _ = io.overlay.send_batch(&mut frames);
    }
    staging.clear();
    dropped
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
        .map(|(_, c)| c.event(EventKind::Update, now))
        .collect()
}
