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
//! on the underlay, each segment's payload) from where they lie. A copy
//! that rendering would not change (an untagged frame, most of them) is
//! not rendered at all but sent from where it arrived ([`DirectBatch`]):
//! a port batch's copies for the underlay from the port's receive buffer,
//! behind VXLAN headers written in the staging buffer; the super-frames of
//! an underlay receive for local ports from the coalescer's buffers, which
//! it holds for the receive (`recv_coalesced_batch`), each port's in one
//! call with the smaller frames staged for it, in the order decided. Those
//! buffers are reused by the next receive, so such copies leave before
//! it, their connection events journaled first: the kernel's copy into its
//! own buffer is then the only copy of their bytes on this host after the
//! receive (measured, bench/README.md: the agents' user-space `memmove`
//! went from 10 % to 1.5 % of their cycles on a single TCP stream).
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
use palisade_datapath::FlowEvent;
use palisade_datapath::port::{self, PortId};
use palisade_datapath::{Encap, Engine, Output, Processed, Results};
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
    /// The count of a fail-open episode's connections this worker meets
    /// (`None`: this start ended no episode).
    pub takeover: Option<crate::takeover::TakeOver>,
    /// This worker's part of the kernel fast path (`None`: off, or the kernel refused it).
    pub fast: Option<crate::fastpath::FastPath>,
}

impl WorkerCore {
    /// A worker's core around `engine`, before it has run: no journal,
    /// inline inspection, take-over count or fast path yet (the agent adds
    /// what its configuration asks for), every tally at zero.
    pub(crate) fn new(engine: Engine, identities: Arc<Identities>) -> WorkerCore {
        WorkerCore {
            engine,
            identities,
            port_stats: Vec::new(),
            overlay_stats: PortStats::default(),
            unroutable: 0,
            render_errors: 0,
            quiesced: Vec::new(),
            quiesced_drops: 0,
            journal: None,
            inline: None,
            probe_out: Vec::new(),
            takeover: None,
            fast: None,
        }
    }

    /// Fold what the kernel fast path forwarded into the engine now, for a
    /// reader of the connections (a snapshot, a state export, a migration's
    /// export) that must see it; with `pull_back`, that port's flows leave
    /// the kernel too (a migration pauses it). No-op without the fast path.
    pub(crate) fn settle_fast_path(&mut self, now: u64, pull_back: Option<PortId>) {
        if let Some(fast) = &mut self.fast {
            let mut parked = self.quiesced.clone();
            parked.extend(pull_back);
            fast.sync(&mut self.engine, now, &parked);
        }
    }
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
    /// The staged frames in order: (destination, `buf[start..end]`, the frame's offload state).
    items: Vec<(Dest, usize, usize, Offload)>,
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
                self.items.push((dest, start, start + n, offload));
            }
            None => self.render_errors += 1,
        }
    }

    /// Render a frame made from one of `len` bytes as [`Staging::push`]
    /// does, but keep it out of the staged frames: its place in `buf`
    /// (`None`: `fill` failed), for a caller that sends it itself.
    fn push_rendered(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> Option<usize>) -> Option<(usize, usize)> {
        let start = self.used;
        let end = start + (len + RENDER_ROOM).max(MIN_FRAME);
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        let n = fill(&mut self.buf[start..end])?;
        self.used = start + n;
        Some((start, start + n))
    }

    /// Append `len` bytes written by `fill` (which returns false when it
    /// cannot) that are no frame of their own: a header sent before a frame
    /// that lies elsewhere. Their place in `buf`, `None` when `fill` failed.
    fn push_bytes(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> bool) -> Option<(usize, usize)> {
        let (start, end) = (self.used, self.used + len);
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        if !fill(&mut self.buf[start..end]) {
            return None;
        }
        self.used = end;
        Some((start, end))
    }

    /// Forget the round's frames, keeping the room.
    fn clear(&mut self) {
        self.items.clear();
        self.used = 0;
    }
}

/// Copies that `stage` takes out of the staging buffer, to be sent from
/// where their frame lies: the frame's own bytes are what rendering would
/// write ([`palisade_datapath::render_overlay_in_place`],
/// [`palisade_datapath::render_in_place`]), so the kernel copies them
/// once, when they are sent, instead of twice. They are valid only while
/// the receive that holds them lasts: the caller sends the batch (after
/// journaling the events of the frames in it) before that receive returns.
///
/// With `underlay` on (a batch from a port), every copy for the underlay
/// is taken, in order: its VXLAN header written in the staging buffer,
/// its frame borrowed (or, when rendering changes it, rendered there too).
/// With `ports` on (a receive from the underlay), super-frames for local
/// ports are taken; smaller frames are staged, and [`DirectBatch::send_ports`]
/// sends both together, one call per port, each port's frames in the order
/// they were decided.
struct DirectBatch<'f> {
    underlay: bool,
    ports: bool,
    items: Vec<Direct<'f>>,
}

/// A copy taken by a [`DirectBatch`].
enum Direct<'f> {
    /// For the underlay: its VXLAN header (`head`, in the staging buffer), then its frame.
    Underlay {
        remote: Ipv4Addr,
        head: (usize, usize),
        body: Body<'f>,
        offload: Offload,
    },
    /// A frame for a local port, as it lies; it leaves after the first
    /// `after` frames staged (those staged before it was taken).
    Port {
        port: PortId,
        frame: &'f [u8],
        offload: Offload,
        after: usize,
    },
}

/// Where the frame of a [`Direct::Underlay`] lies.
enum Body<'f> {
    /// `buf[start..end]` of the staging buffer.
    Staged(usize, usize),
    /// Where it arrived.
    Borrowed(&'f [u8]),
}

impl<'f> DirectBatch<'f> {
    /// A batch that takes nothing: every copy is staged.
    fn off() -> Self {
        DirectBatch {
            underlay: false,
            ports: false,
            items: Vec::new(),
        }
    }

    /// A batch taking what `underlay` and `ports` say, reusing the room of
    /// `spare` (see [`DirectBatch::spare`]).
    fn new(underlay: bool, ports: bool, spare: Vec<Direct<'static>>) -> Self {
        DirectBatch {
            underlay,
            ports,
            items: recycle(spare),
        }
    }

    /// The (empty) room, for the next batch.
    fn spare(self) -> Vec<Direct<'static>> {
        recycle(self.items)
    }

    /// Take the copy of `p` for the underlay (`encap`); false: stage it.
    /// `origin` is `p`'s frame, as long as the receive holds it.
    fn overlay(&mut self, staging: &mut Staging, p: &Processed<'_>, origin: &'f [u8], encap: &Encap) -> bool {
        if !self.underlay {
            return false;
        }
        let Some(offload) = palisade_datapath::render_overlay_offload(p) else {
            staging.render_errors += 1;
            return true;
        };
        let (head, body) = match palisade_datapath::render_overlay_in_place(p) {
            Some(frame) => {
                let frame = in_place(origin, frame);
                let Some(head) = staging.push_bytes(vxlan::HEADER_LEN, |b| {
                    palisade_datapath::render_overlay_header(encap, b).is_ok()
                }) else {
                    staging.render_errors += 1;
                    return true;
                };
                (head, Body::Borrowed(frame))
            }
            None => {
                // A tag taken off: the whole copy rendered, as when staged.
                let Some((start, end)) =
                    staging.push_rendered(p.frame().len(), |b| palisade_datapath::render_overlay(p, encap, b).ok())
                else {
                    staging.render_errors += 1;
                    return true;
                };
                let at = start + vxlan::HEADER_LEN;
                ((start, at), Body::Staged(at, end))
            }
        };
        self.items.push(Direct::Underlay {
            remote: encap.remote,
            head,
            body,
            offload,
        });
        true
    }

    /// Take the copy of `p` for local port `out`; false: stage it.
    /// `origin` is `p`'s frame, as long as the receive holds it.
    fn port(&mut self, staging: &mut Staging, p: &Processed<'_>, origin: &'f [u8], out: &Output) -> bool {
        // Small frames are staged and sent together, one call per port.
        if !self.ports || p.offload().gso.is_none() {
            return false;
        }
        let Some(frame) = palisade_datapath::render_in_place(p, out) else {
            return false;
        };
        match palisade_datapath::render_offload(p, out) {
            Some(offload) => self.items.push(Direct::Port {
                port: out.port,
                frame: in_place(origin, frame),
                offload,
                after: staging.items.len(),
            }),
            None => staging.render_errors += 1,
        }
        true
    }

    /// Send the copies for the underlay (errors are counted by the socket).
    fn send_underlay(&mut self, overlay: &mut UdpOverlay, staging: &Staging) {
        if self.items.is_empty() {
            return;
        }
        let buf = &staging.buf;
        let mut frames = self.items.iter().filter_map(|d| match *d {
            Direct::Underlay {
                remote,
                head,
                ref body,
                offload,
            } => Some(Outgoing {
                remote,
                prefix: &buf[head.0..head.1],
                frame: match *body {
                    Body::Staged(start, end) => &buf[start..end],
                    Body::Borrowed(frame) => frame,
                },
                offload,
            }),
            Direct::Port { .. } => None,
        });
        let _ = overlay.send_batch(&mut frames);
        self.items.retain(|d| matches!(d, Direct::Port { .. }));
    }

    /// Send the copies for local ports with what was staged for the ports,
    /// each port's in one call and in the order they were decided (a copy
    /// taken here after the frames staged before it); returns how many
    /// were dropped for a quiesced port.
    fn send_ports(
        &mut self,
        ports: &mut [Attached],
        staging: &mut Staging,
        sockets: &mut Sockets,
        quiesced: &[PortId],
    ) -> u64 {
        if !self.items.iter().any(|d| matches!(d, Direct::Port { .. })) {
            return 0;
        }
        let mut dropped = 0;
        let staged = staging.items.iter().filter_map(|&(dest, ..)| match dest {
            Dest::Port(p) => Some(p),
            Dest::Overlay(_) => None,
        });
        let direct = self.items.iter().filter_map(|d| match d {
            Direct::Port { port, .. } => Some(*port),
            Direct::Underlay { .. } => None,
        });
        for p in staged.chain(direct) {
            if quiesced.contains(&p) {
                dropped += 1;
            } else if let Some(i) = sockets.of(p) {
                sockets.touched[i] = true;
            }
        }
        for (i, attached) in ports.iter_mut().enumerate() {
            if !std::mem::take(&mut sockets.touched[i]) {
                continue;
            }
            let port = attached.port;
            let buf = &staging.buf;
            let mut staged = staging
                .items
                .iter()
                .enumerate()
                .filter(|(_, (dest, ..))| matches!(dest, Dest::Port(p) if *p == port))
                .map(|(k, (_, start, end, offload))| (k, &buf[*start..*end], offload))
                .peekable();
            let mut direct = self
                .items
                .iter()
                .filter_map(|d| match d {
                    Direct::Port {
                        port: p,
                        frame,
                        offload,
                        after,
                    } if *p == port => Some((*after, *frame, offload)),
                    _ => None,
                })
                .peekable();
            // The two in the order they were decided.
            let mut frames = std::iter::from_fn(|| match (staged.peek(), direct.peek()) {
                (Some(&(k, ..)), Some(&(after, ..))) if after > k => staged.next().map(|(_, f, o)| (f, o)),
                (_, Some(_)) => direct.next().map(|(_, f, o)| (f, o)),
                (Some(_), None) => staged.next().map(|(_, f, o)| (f, o)),
                (None, None) => None,
            });
            let _ = attached.io.send_frames(&mut frames);
        }
        staging.items.retain(|(dest, ..)| matches!(dest, Dest::Overlay(_)));
        self.items.retain(|d| matches!(d, Direct::Underlay { .. }));
        dropped
    }
}

/// `frame` (the end of a decision's frame, from its Ethernet header on) as
/// the end of `origin`, the same frame as its receive holds it.
fn in_place<'f>(origin: &'f [u8], frame: &[u8]) -> &'f [u8] {
    let at = origin.len() - frame.len();
    debug_assert!(std::ptr::eq(origin[at..].as_ptr(), frame.as_ptr()));
    &origin[at..]
}

/// `v` emptied, its allocation kept for items of another lifetime (an
/// in-place collect: nothing is allocated, the layouts being the same).
fn recycle<'a, 'b>(mut v: Vec<Direct<'a>>) -> Vec<Direct<'b>> {
    v.clear();
    v.into_iter().map(|_| unreachable!("the vector is empty")).collect()
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
        let at = Arrived {
            in_port: port::UPLINK,
            from: None,
            origin: payload,
        };
        inspect_and_stage(
            engine,
            staging,
            events,
            inline,
            &processed,
            at,
            now,
            &mut DirectBatch::off(),
        );
    }
}

/// Run a super-frame (or a plain frame) that arrived on the underlay
/// through the engine whole: `offload` describes `payload` from its start.
/// Super-frames for local ports may leave straight away (`direct`).
#[allow(clippy::too_many_arguments)]
fn handle_overlay_offloaded<'f>(
    engine: &mut Engine,
    staging: &mut Staging,
    events: &mut Vec<FlowEvent>,
    results: &mut Results,
    now: u64,
    remote: Ipv4Addr,
    payload: &'f [u8],
    offload: Offload,
    inline: &mut Inspection<'_>,
    direct: &mut DirectBatch<'f>,
) {
    engine.process_overlay_offloaded(now, remote, payload, offload, events, results);
    if let Some(processed) = results.get(0, payload) {
        let at = Arrived {
            in_port: port::UPLINK,
            from: None,
            origin: payload,
        };
        inspect_and_stage(engine, staging, events, inline, &processed, at, now, direct);
    }
}

/// Run a batch of frames with their offload state that arrived on `port`
/// through the engine whole ([`Engine::process_batch_offloaded`]) and stage their outputs
/// (the copies for the underlay in `direct`); `offloads` is scratch kept between batches.
#[allow(clippy::too_many_arguments)]
fn handle_frames<'f>(
    engine: &mut Engine,
    staging: &mut Staging,
    events: &mut Vec<FlowEvent>,
    results: &mut Results,
    offloads: &mut Vec<Offload>,
    inline: &mut Inspection<'_>,
    now: u64,
    port: PortId,
    frames: &[RxFrame<'f>],
    direct: &mut DirectBatch<'f>,
) {
    offloads.clear();
    offloads.extend(frames.iter().map(|f| f.offload));
    engine.process_batch_offloaded(now, port, frames, offloads, events, results);
    // As `results.iter(frames)`, each frame's own lifetime kept for `direct`.
    for (i, frame) in frames.iter().enumerate() {
        if let Some(processed) = results.get(i, frame.bytes) {
            let at = Arrived {
                in_port: port,
                from: Some(port),
                origin: frame.bytes,
            };
            inspect_and_stage(engine, staging, events, inline, &processed, at, now, direct);
        }
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
        let at = Arrived {
            in_port: port,
            from: Some(port),
            origin: processed.frame(),
        };
        inspect_and_stage(
            engine,
            staging,
            events,
            inline,
            &processed,
            at,
            now,
            &mut DirectBatch::off(),
        );
    }
}

/// A worker's inline inspection and what its alert records name.
struct Inspection<'a> {
    inline: Option<&'a mut Inline>,
    identities: &'a Identities,
    /// The kernel fast path, which notes the directions it could take.
    fast: Option<&'a mut crate::fastpath::FastPath>,
}

/// Stage a processed frame, first inspecting it when its flow has a
/// profile (a flow without one costs one test of a byte here): dropped
/// frames are not staged, a rejected one's sender gets the reply.
#[allow(clippy::too_many_arguments)]
#[inline]
fn inspect_and_stage<'f>(
    engine: &mut Engine,
    staging: &mut Staging,
    events: &mut Vec<FlowEvent>,
    inline: &mut Inspection<'_>,
    processed: &Processed<'_>,
    at: Arrived<'f>,
    now: u64,
    direct: &mut DirectBatch<'f>,
) {
    let Arrived { in_port, from, .. } = at;
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
    if let Some(fast) = inline.fast.as_deref_mut() {
        fast.observe(processed, in_port);
    }
    stage(staging, processed, at, direct);
}

/// Where a processed frame came from: its port (the uplink for the
/// underlay), the port a reply goes back out of (`None` from the
/// underlay), and the frame itself as long as its receive holds it.
#[derive(Clone, Copy)]
struct Arrived<'f> {
    in_port: PortId,
    from: Option<PortId>,
    origin: &'f [u8],
}

/// Stage what the engine decided for one frame: its outputs, or the reply
/// to a rejected frame that came in on a port (`at.from`); `direct` may take
/// an output to send from where its frame lies.
/// Each copy leaves with the frame's offload state moved to where
/// rendering put its headers (for the underlay, counted after the VXLAN header).
fn stage<'f>(staging: &mut Staging, processed: &Processed<'_>, at: Arrived<'f>, direct: &mut DirectBatch<'f>) {
    let from = at.from;
    let len = processed.frame().len();
    for out in processed.outputs {
        match out.encap {
            Some(encap) => {
                if direct.overlay(staging, processed, at.origin, &encap) {
                    continue;
                }
                let offload = palisade_datapath::render_overlay_offload(processed);
                staging.push(Dest::Overlay(encap.remote), len, offload, |buf| {
                    palisade_datapath::render_overlay(processed, &encap, buf).ok()
                });
            }
            None if out.port == port::UPLINK => staging.unroutable += 1,
            None => {
                if direct.port(staging, processed, at.origin, out) {
                    continue;
                }
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
        let mut direct_spare = Vec::new();
        // The connection table's sweep, in steps of a bounded number of
        // slots under the lock, one a round (see `crate::quiet`).
        let mut sweep = palisade_datapath::Sweep::new();
        let sweep_slots = crate::quiet::sweep_step_slots();
        let mut sweep_updates = Vec::new();
        let mut sweep_pass = SweepPass::default();
        while !halt.load(Ordering::Relaxed) {
            // While a sweep pass is under way the next round comes at once
            // (its step is this round's housekeeping), unless it is held off.
            let wait = if sweep.is_active() && crate::quiet::QUIET.sweep_may_step() {
                Duration::ZERO
            } else {
                Duration::from_millis(100)
            };
            let ready = match wait_readable(&fds, wait) {
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
                    fast: core.fast.as_mut(),
                };
                // Events before this one are in the journal.
                let mut journaled = 0;
                for i in ready {
                    let engine = &mut core.engine;
                    if i == overlay_index {
                        let r = if offloaded {
                            let journal = &mut core.journal;
                            let quiesced = &core.quiesced;
                            let ports = &mut self.io.ports;
                            let sockets = &mut sockets;
                            let spare = &mut direct_spare;
                            let journaled = &mut journaled;
                            self.io
                                .overlay
                                .recv_coalesced_batch(BATCH, &mut coalescer, &mut |arrivals| {
                                    // Super-frames for local ports leave from where they lie (the
                                    // receive buffer, the coalescer's), before those are reused:
                                    // a receive's in one call per port.
                                    let mut direct = DirectBatch::new(false, true, std::mem::take(spare));
                                    for a in arrivals {
                                        // The coalescer's offsets count from the inner frame; the engine's from the VXLAN header.
                                        let Some(o) = a.offload.shifted(0, vxlan::HEADER_LEN as u16) else {
                                            staging.render_errors += 1;
                                            continue;
                                        };
                                        handle_overlay_offloaded(
                                            engine,
                                            &mut staging,
                                            &mut events,
                                            &mut results,
                                            now,
                                            a.remote,
                                            a.payload,
                                            o,
                                            &mut inspection,
                                            &mut direct,
                                        );
                                    }
                                    if !direct.items.is_empty() {
                                        journal_events(journal, engine, &events[*journaled..], now);
                                        *journaled = events.len();
                                        quiesced_drops += direct.send_ports(ports, &mut staging, sockets, quiesced);
                                    }
                                    *spare = direct.spare();
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
                            let journal = &mut core.journal;
                            let overlay = &mut self.io.overlay;
                            let spare = &mut direct_spare;
                            let journaled = &mut journaled;
                            p.io.recv_frames(BATCH, &mut |frames| {
                                // Copies for the underlay leave from the receive buffer, before it is reused.
                                let mut direct = DirectBatch::new(true, false, std::mem::take(spare));
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
                                    &mut direct,
                                );
                                if !direct.items.is_empty() {
                                    journal_events(journal, engine, &events[*journaled..], now);
                                    *journaled = events.len();
                                    direct.send_underlay(overlay, &staging);
                                }
                                *spare = direct.spare();
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
                if !sweep.is_active() && last_housekeeping.elapsed() >= Duration::from_secs(1) {
                    last_housekeeping = Instant::now();
                    if let Some(ins) = &mut core.inline {
                        ins.expire(now);
                    }
                    // Long-lived flows get an update record every minute:
                    // this pass reports those seen since the last round.
                    let minute = now / 60_000_000_000;
                    let mut updates_since = None;
                    if minute > last_update_round {
                        updates_since = Some(last_update_round * 60_000_000_000);
                        last_update_round = minute;
                    }
                    sweep.start(updates_since);
                    sweep_pass = SweepPass::default();
                }
                if sweep.is_active() && crate::quiet::QUIET.sweep_may_step() {
                    let held = Instant::now();
                    let step = core
                        .engine
                        .sweep_step(&mut sweep, now, sweep_slots, &mut events, &mut sweep_updates);
                    for ev in sweep_updates.drain(..) {
                        records.push(records::update_record(
                            &ev,
                            &self.host,
                            &core.engine,
                            &core.identities,
                            self.clock,
                        ));
                    }
                    sweep_pass.note(step.scanned, held.elapsed());
                    if step.done && crate::quiet::log_holds() {
                        // Printed after the lock is released.
                        sweep_pass.log = true;
                    }
                }
                // The kernel fast path: its counts folded in, flows installed and removed.
                if let Some(fast) = &mut core.fast
                    && fast.due()
                {
                    fast.sync(&mut core.engine, now, &core.quiesced);
                }
                journal_events(&mut core.journal, &core.engine, &events[journaled..], now);
                for ev in events.drain(..) {
                    if let Some(t) = &mut core.takeover {
                        t.note(&ev);
                    }
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
                        // Into an external appliance: over the underlay socket
                        // (the frame is its VXLAN payload).
                        let dest = probe.remote.map_or(Dest::Port(probe.port), Dest::Overlay);
                        staging.push(dest, n, Some(Offload::NONE), |buf| {
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
            if std::mem::take(&mut sweep_pass.log) {
                eprintln!("palisade agent: worker {}: {sweep_pass}", self.index);
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
    let dropped = send_staged_to_ports(&mut io.ports, staging, sockets, quiesced);
    if !staging.items.is_empty() {
        // One batch, in order: a super-frame is cut by the kernel
        // (UDP_SEGMENT), each packet's headers written apart and its
        // payload sent from the staging buffer where it lies.
        let buf = &staging.buf;
        let mut frames = staging.items.iter().filter_map(|&(dest, start, end, offload)| {
            let frame = &buf[start..end];
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

/// Send the frames staged for local ports, each port's in one call from
/// the staging buffer where they lie, and keep only those for the
/// underlay staged; returns how many were dropped for a quiesced port.
/// Send errors are counted by the port (tx_errors, offload_errors) and
/// show in metrics. A port with virtio-net headers hands a super-frame
/// to the kernel whole; one without segments it.
fn send_staged_to_ports(
    ports: &mut [Attached],
    staging: &mut Staging,
    sockets: &mut Sockets,
    quiesced: &[PortId],
) -> u64 {
    let mut dropped = 0;
    let mut any = false;
    for &(dest, ..) in &staging.items {
        match dest {
            Dest::Port(p) if quiesced.contains(&p) => dropped += 1,
            Dest::Port(p) => {
                if let Some(i) = sockets.of(p) {
                    sockets.touched[i] = true;
                    any = true;
                }
            }
            Dest::Overlay(_) => {}
        }
    }
    if !any {
        staging.items.retain(|(dest, ..)| matches!(dest, Dest::Overlay(_)));
        return dropped;
    }
    for (i, attached) in ports.iter_mut().enumerate() {
        if !std::mem::take(&mut sockets.touched[i]) {
            continue;
        }
        let port = attached.port;
        let buf = &staging.buf;
        let mut frames = staging
            .items
            .iter()
            .filter(|(dest, ..)| matches!(dest, Dest::Port(p) if *p == port))
            .map(|(_, start, end, offload)| (&buf[*start..*end], offload));
        let _ = attached.io.send_frames(&mut frames);
    }
    staging.items.retain(|(dest, ..)| matches!(dest, Dest::Overlay(_)));
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

/// One sweep pass's lock holds, for its log line (`PALISADE_LOG_HOLDS=1`).
#[derive(Debug, Default)]
struct SweepPass {
    /// When its first step began (CLOCK_MONOTONIC ns, as the migration logs').
    began_ns: u64,
    /// When its last step ended.
    ended_ns: u64,
    steps: usize,
    slots: usize,
    /// Its steps' lock holds together, and the longest.
    held: Duration,
    longest: Duration,
    /// A line is due once the lock is released.
    log: bool,
}

impl SweepPass {
    /// A step that looked at `slots` slots holding the lock `held`.
    fn note(&mut self, slots: usize, held: Duration) {
        let at = crate::quiet::monotonic_ns();
        if self.steps == 0 {
            self.began_ns = at.saturating_sub(held.as_nanos() as u64);
        }
        self.ended_ns = at;
        self.steps += 1;
        self.slots += slots;
        self.held += held;
        self.longest = self.longest.max(held);
    }
}

impl std::fmt::Display for SweepPass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sweep of {} slots in {} steps: lock held {} us at most, {} us in all; from {} ns to {} ns",
            self.slots,
            self.steps,
            self.longest.as_micros(),
            self.held.as_micros(),
            self.began_ns,
            self.ended_ns
        )
    }
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddrV4, UdpSocket};
    use std::sync::{Arc, Mutex};

    use palisade_io::port::{FramePort, PortStats, RxFrame};

    use super::*;

    /// What a recording port was asked to send, in order.
    type Log = Arc<Mutex<Vec<Vec<u8>>>>;
    /// How many times a recording port transmitted.
    type Sends = Arc<std::sync::atomic::AtomicUsize>;

    /// A port that records what it is asked to send, in order, and how
    /// many times it transmitted (each `send_frames` call flushes once).
    struct Recording(Log, Sends);

    impl FramePort for Recording {
        fn recv_frames(&mut self, _: usize, _: &mut dyn FnMut(&[RxFrame<'_>])) -> std::io::Result<usize> {
            Ok(0)
        }
        fn send_frame(&mut self, frame: &[u8], _: &Offload) -> std::io::Result<()> {
            self.0.lock().unwrap().push(frame.to_vec());
            Ok(())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.1.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        fn fd(&self) -> i32 {
            -1
        }
        fn stats(&self) -> PortStats {
            PortStats::default()
        }
    }

    fn port(n: u16) -> (Attached, Arc<Mutex<Vec<Vec<u8>>>>) {
        let (a, log, _) = counting_port(n);
        (a, log)
    }

    /// A recording port, with the count of its transmissions.
    fn counting_port(n: u16) -> (Attached, Log, Sends) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let flushes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let a = Attached {
            interface: format!("p{n}"),
            port: PortId(n),
            io: Box::new(Recording(log.clone(), flushes.clone())),
        };
        (a, log, flushes)
    }

    fn staged(staging: &mut Staging, dest: Dest, bytes: &[u8]) {
        staging.push(dest, bytes.len(), Some(Offload::NONE), |b| {
            b[..bytes.len()].copy_from_slice(bytes);
            Some(bytes.len())
        });
    }

    #[test]
    fn a_port_frame_sent_in_place_leaves_after_those_staged_before_it() {
        let (p1, log1) = port(1);
        let (p2, log2) = port(2);
        let mut ports = vec![p1, p2];
        let mut sockets = Sockets::new(&ports);
        let mut staging = Staging::default();
        staged(&mut staging, Dest::Port(PortId(1)), b"staged first");
        staged(&mut staging, Dest::Overlay(Ipv4Addr::LOCALHOST), b"for the underlay");
        staged(&mut staging, Dest::Port(PortId(2)), b"to a quiesced port");
        let arrived = b"sent where it lies".to_vec();
        let mut direct = DirectBatch::new(false, true, Vec::new());
        for port in [PortId(1), PortId(2)] {
            direct.items.push(Direct::Port {
                port,
                frame: &arrived,
                offload: Offload::NONE,
                after: staging.items.len(),
            });
        }
        let quiesced = [PortId(2)];
        let dropped = direct.send_ports(&mut ports, &mut staging, &mut sockets, &quiesced);
        assert_eq!(
            *log1.lock().unwrap(),
            vec![b"staged first".to_vec(), arrived.clone()],
            "in order"
        );
        assert!(log2.lock().unwrap().is_empty());
        assert_eq!(dropped, 2, "the staged and the direct frame for the quiesced port");
        // Only the underlay's frame is still staged, and the batch is empty.
        assert_eq!(staging.items.len(), 1);
        assert!(matches!(staging.items[0].0, Dest::Overlay(_)));
        assert!(direct.items.is_empty());
    }

    #[test]
    fn a_receive_s_copies_for_a_port_leave_in_one_call_in_the_order_decided() {
        // A batch from the underlay: a super-frame taken in place, a small
        // frame staged after it, another in place, another staged; for two ports.
        let (p1, log1, sends1) = counting_port(1);
        let (p2, log2, sends2) = counting_port(2);
        let mut ports = vec![p1, p2];
        let mut sockets = Sockets::new(&ports);
        let mut staging = Staging::default();
        let (first, third) = (b"first, in place".to_vec(), b"third, in place".to_vec());
        let other = b"for the other port, in place".to_vec();
        let mut direct = DirectBatch::new(false, true, Vec::new());
        fn take<'f>(direct: &mut DirectBatch<'f>, staging: &Staging, port: PortId, frame: &'f [u8]) {
            direct.items.push(Direct::Port {
                port,
                frame,
                offload: Offload::NONE,
                after: staging.items.len(),
            })
        }
        take(&mut direct, &staging, PortId(1), &first[..]);
        staged(&mut staging, Dest::Port(PortId(1)), b"second, staged");
        take(&mut direct, &staging, PortId(2), &other[..]);
        staged(&mut staging, Dest::Overlay(Ipv4Addr::LOCALHOST), b"for the underlay");
        take(&mut direct, &staging, PortId(1), &third[..]);
        staged(&mut staging, Dest::Port(PortId(1)), b"fourth, staged");
        staged(&mut staging, Dest::Port(PortId(2)), b"for the other port, staged");
        let dropped = direct.send_ports(&mut ports, &mut staging, &mut sockets, &[]);
        assert_eq!(dropped, 0);
        assert_eq!(
            *log1.lock().unwrap(),
            vec![
                first.clone(),
                b"second, staged".to_vec(),
                third.clone(),
                b"fourth, staged".to_vec()
            ]
        );
        assert_eq!(
            *log2.lock().unwrap(),
            vec![other.clone(), b"for the other port, staged".to_vec()]
        );
        assert_eq!(
            (sends1.load(Ordering::Relaxed), sends2.load(Ordering::Relaxed)),
            (1, 1),
            "one transmission per port"
        );
        assert_eq!(staging.items.len(), 1, "the underlay's frame stays staged");
        assert!(direct.items.is_empty());
    }

    #[test]
    fn underlay_copies_are_their_header_then_their_frame_in_order() {
        // The underlay socket sends to `remote:<its own port>`: to itself here.
        let port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut overlay = UdpOverlay::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).unwrap();
        let mut staging = Staging::default();
        let head = staging.push_bytes(vxlan::HEADER_LEN, |b| {
            b.copy_from_slice(b"VXLANhdr");
            true
        });
        let rendered = staging
            .push_rendered(20, |b| {
                b[..28].copy_from_slice(b"vxlanHDRrendered frame bytes");
                Some(28)
            })
            .unwrap();
        let arrived = b"a frame as it arrived".to_vec();
        let mut direct = DirectBatch::new(true, false, Vec::new());
        direct.items.push(Direct::Underlay {
            remote: Ipv4Addr::LOCALHOST,
            head: head.unwrap(),
            body: Body::Borrowed(&arrived),
            offload: Offload::NONE,
        });
        direct.items.push(Direct::Underlay {
            remote: Ipv4Addr::LOCALHOST,
            head: (rendered.0, rendered.0 + vxlan::HEADER_LEN),
            body: Body::Staged(rendered.0 + vxlan::HEADER_LEN, rendered.1),
            offload: Offload::NONE,
        });
        direct.send_underlay(&mut overlay, &staging);
        assert!(direct.items.is_empty());
        let mut got = Vec::new();
        for _ in 0..100 {
            overlay.recv(8, &mut |_, d| got.push(d.to_vec())).unwrap();
            if got.len() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            got,
            vec![
                b"VXLANhdra frame as it arrived".to_vec(),
                b"vxlanHDRrendered frame bytes".to_vec()
            ]
        );
        // The room of the batch is kept for the next one.
        assert!(direct.spare().capacity() >= 2);
    }
}
