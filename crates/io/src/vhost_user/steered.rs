//! One vhost-user device shared out between datapath workers, each frame
//! on the worker the steering hash names.
//!
//! The agent's workers share no flow state: every frame of a connection, in
//! both directions and on every port, must reach the one worker
//! [`crate::steer`] names for its addresses, or a reply would miss the
//! connection state its request created. The kernel makes that choice for
//! AF_PACKET ports and the underlay. A guest picks the transmit queue of
//! each frame itself (by the CPU that sent it), so a frame a worker takes
//! from its queue pair often belongs to another worker. Here it is copied
//! into that worker's hand-off queue (bounded: a full queue drops and
//! counts) and the worker is woken; each worker's [`WorkerPort`] hands
//! over, in its own poll round, the frames of its own pairs that are its
//! own and the frames other workers passed to it.
//!
//! Pairs are shared out round robin: pair `i` is received by worker
//! `i % workers`. Frames to the guest may go on any receive queue (the
//! guest takes them from all), so worker `w` sends on pair `w % pairs`:
//! with as many pairs as workers each worker has its own and nothing is
//! shared; with fewer, a pair takes sends from several workers (each call
//! under the pair's lock, as the control thread's). A guest that runs
//! fewer pairs than the device offers (QEMU's `queues=` smaller, or a
//! driver that enabled only some) leaves the others stopped: a worker whose
//! pair is stopped sends on the first running one, chosen once per round.
//!
//! Every pair's counters are reported by the worker that receives from it,
//! so summing the workers' [`PortStats`] counts each pair once.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::pair::QueuePair;
use super::server::{DeviceStatus, VhostUserNet, VhostUserNetConfig};
use super::stats::QueueStats;
use crate::error::IoError;
use crate::port::{FramePort, Offload, PortOffloads, PortStats, RxFrame};
use crate::steer;

/// Most bytes waiting in one worker's hand-off queue of one device (about
/// 64 super-frames, or 2,700 full-size packets).
pub const HANDOFF_MAX_BYTES: usize = 4 << 20;
/// Most frames waiting in one worker's hand-off queue of one device.
pub const HANDOFF_MAX_FRAMES: usize = 4096;
/// Emptied buffers kept for reuse per hand-off queue.
const SPARE_BUFFERS: usize = 256;
/// Frames handed to the caller's callback at once.
const CHUNK: usize = 64;

/// Frames passed between workers, counted for the device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandoffStats {
    /// Frames a worker took from its queue pair and passed to the worker they belong to.
    pub passed: u64,
    /// Frames dropped because the receiving worker's hand-off queue was full.
    pub dropped: u64,
}

/// One worker's hand-off queue of one device.
#[derive(Debug)]
struct Handoff {
    queue: Mutex<HandoffQueue>,
    /// Written when frames are queued for the worker; in its port's epoll set.
    wake: EventFd,
}

#[derive(Debug, Default)]
struct HandoffQueue {
    frames: VecDeque<(Offload, Vec<u8>)>,
    bytes: usize,
    /// Buffers given back by the receiving worker, for the next frames passed.
    spare: Vec<Vec<u8>>,
    stats: HandoffStats,
}

impl Handoff {
    fn lock(&self) -> MutexGuard<'_, HandoffQueue> {
        // Nothing in the queue is left half-changed by a panic: use it as it is.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A vhost-user device whose queue pairs are served by several workers
/// (see the module documentation). Dropping it stops the device.
#[derive(Debug)]
pub struct SteeredVhostUser {
    device: VhostUserNet,
    handoffs: Arc<[Handoff]>,
}

impl SteeredVhostUser {
    /// Open the device and make one port per worker (`workers` ≥ 1), in worker order.
    pub fn open(config: &VhostUserNetConfig, workers: usize) -> Result<(SteeredVhostUser, Vec<WorkerPort>), IoError> {
        let os = |step: &'static str, source: io::Error| IoError::Os {
            kind: "vhost-user",
            name: config.socket.display().to_string(),
            step,
            source,
        };
        let workers = workers.max(1);
        let (device, pairs) = VhostUserNet::open(config)?;
        let handoffs: Arc<[Handoff]> = (0..workers)
            .map(|_| {
                Ok(Handoff {
                    queue: Mutex::new(HandoffQueue::default()),
                    wake: EventFd::new(EFD_NONBLOCK)?,
                })
            })
            .collect::<io::Result<Vec<_>>>()
            .map_err(|e| os("eventfd", e))?
            .into();
        let q = pairs.len();
        let tx: Vec<Vec<QueuePair>> = (0..workers)
            .map(|w| (0..q).map(|k| pairs[(w + k) % q].handle()).collect())
            .collect();
        let mut rx: Vec<Vec<QueuePair>> = (0..workers).map(|_| Vec::new()).collect();
        for (i, pair) in pairs.into_iter().enumerate() {
            rx[i % workers].push(pair);
        }
        let ports = rx
            .into_iter()
            .zip(tx)
            .enumerate()
            .map(|(w, (rx, tx))| WorkerPort::new(w, handoffs.clone(), rx, tx).map_err(|e| os("epoll", e)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((SteeredVhostUser { device, handoffs }, ports))
    }

    /// The device (its socket, status and queue counters).
    pub fn device(&self) -> &VhostUserNet {
        &self.device
    }

    /// The connection, the negotiated features, which rings run.
    pub fn status(&self) -> DeviceStatus {
        self.device.status()
    }

    /// Counters of every queue pair.
    pub fn stats(&self) -> Vec<QueueStats> {
        self.device.stats()
    }

    /// Frames passed between workers, summed over the workers.
    pub fn handoff_stats(&self) -> HandoffStats {
        self.handoffs.iter().fold(HandoffStats::default(), |mut t, h| {
            let s = h.lock().stats;
            t.passed += s.passed;
            t.dropped += s.dropped;
            t
        })
    }
}

/// One worker's side of a [`SteeredVhostUser`] device: a [`FramePort`].
///
/// Readable ([`FramePort::fd`]) when one of its queue pairs has work or
/// another worker passed it frames. [`FramePort::recv_frames`] takes at
/// most `max` frames per call, up to half of them passed by other workers
/// and the rest from its pairs (handing over its own, passing the others
/// on), so one guest cannot keep a worker from its other ports.
#[derive(Debug)]
pub struct WorkerPort {
    worker: usize,
    handoffs: Arc<[Handoff]>,
    rx: Vec<QueuePair>,
    /// Every pair, starting with the one this worker sends on (`w % pairs`).
    tx: Vec<QueuePair>,
    /// The pair sends go to this round (the first running one), once chosen.
    tx_now: Option<usize>,
    /// Pairs sent on since the last flush.
    tx_pending: Vec<bool>,
    epoll: Epoll,
    /// Frames taken from the hand-off queue this call (kept for their buffers).
    taken: Vec<(Offload, Vec<u8>)>,
    /// Workers passed frames during this call, to be woken after it.
    woken: Vec<bool>,
}

impl WorkerPort {
    fn new(worker: usize, handoffs: Arc<[Handoff]>, rx: Vec<QueuePair>, tx: Vec<QueuePair>) -> io::Result<WorkerPort> {
        let epoll = Epoll::new()?;
        let add = |fd: RawFd| epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, fd as u64));
        add(handoffs[worker].wake.as_raw_fd())?;
        for pair in &rx {
            add(pair.fd())?;
        }
        let workers = handoffs.len();
        Ok(WorkerPort {
            worker,
            handoffs,
            rx,
            tx_pending: vec![false; tx.len()],
            tx,
            tx_now: None,
            epoll,
            taken: Vec::new(),
            woken: vec![false; workers],
        })
    }

    /// The queue pairs this worker receives from (by index).
    pub fn pairs(&self) -> Vec<u16> {
        self.rx.iter().map(QueuePair::index).collect()
    }

    /// The queue pair this worker delivers to the guest on while it runs.
    pub fn send_pair(&self) -> u16 {
        self.tx[0].index()
    }

    /// Hand over up to `max` frames other workers passed to this one.
    fn recv_passed(&mut self, max: usize, f: &mut dyn FnMut(&[RxFrame<'_>])) -> usize {
        let handoff = &self.handoffs[self.worker];
        let _ = handoff.wake.read();
        {
            let mut q = handoff.lock();
            while self.taken.len() < max {
                let Some((offload, frame)) = q.frames.pop_front() else {
                    break;
                };
                q.bytes -= frame.len();
                self.taken.push((offload, frame));
            }
            if !q.frames.is_empty() {
                // Left for the next round: stay readable.
                let _ = handoff.wake.write(1);
            }
        }
        let n = self.taken.len();
        let mut batch = [RxFrame {
            bytes: &[],
            offload: Offload::NONE,
        }; CHUNK];
        for chunk in self.taken.chunks(CHUNK) {
            for (slot, (offload, frame)) in batch.iter_mut().zip(chunk) {
                *slot = RxFrame {
                    bytes: frame,
                    offload: *offload,
                };
            }
            f(&batch[..chunk.len()]);
        }
        if n > 0 {
            let mut q = handoff.lock();
            for (_, mut buf) in self.taken.drain(..) {
                if q.spare.len() < SPARE_BUFFERS {
                    buf.clear();
                    q.spare.push(buf);
                }
            }
        }
        n
    }
}

/// Pass `frame` to worker `to`'s hand-off queue, or count it dropped when the queue is full.
fn pass(handoff: &Handoff, frame: &RxFrame<'_>) {
    let mut q = handoff.lock();
    if q.frames.len() >= HANDOFF_MAX_FRAMES || q.bytes + frame.bytes.len() > HANDOFF_MAX_BYTES {
        q.stats.dropped += 1;
        return;
    }
    let mut buf = q.spare.pop().unwrap_or_default();
    buf.extend_from_slice(frame.bytes);
    q.bytes += buf.len();
    q.frames.push_back((frame.offload, buf));
    q.stats.passed += 1;
}

impl FramePort for WorkerPort {
    fn recv_frames(&mut self, max: usize, f: &mut dyn FnMut(&[RxFrame<'_>])) -> io::Result<usize> {
        // At most `max` frames taken per call, half of them (or all, for a
        // worker without pairs) from the hand-off queue, so neither source
        // starves the other; what is left keeps the port readable.
        let passed_budget = if self.rx.is_empty() { max } else { max.div_ceil(2) };
        let mut handed = self.recv_passed(passed_budget, f);
        let mut budget = max - handed;
        let (me, workers) = (self.worker, self.handoffs.len());
        let WorkerPort {
            rx, handoffs, woken, ..
        } = self;
        for pair in rx.iter_mut() {
            if budget == 0 {
                break;
            }
            if workers == 1 {
                let n = pair.recv_frames(budget, f)?;
                handed += n;
                budget -= n.min(budget);
                continue;
            }
            let taken = pair.recv_frames(budget, &mut |frames| {
                let mut mine = [RxFrame {
                    bytes: &[],
                    offload: Offload::NONE,
                }; CHUNK];
                for chunk in frames.chunks(CHUNK) {
                    let mut k = 0;
                    for frame in chunk {
                        let to = steer::frame_worker(frame.bytes, workers as u32) as usize;
                        if to == me {
                            mine[k] = *frame;
                            k += 1;
                        } else {
                            pass(&handoffs[to], frame);
                            woken[to] = true;
                        }
                    }
                    if k > 0 {
                        handed += k;
                        f(&mine[..k]);
                    }
                }
            })?;
            budget -= taken.min(budget);
        }
        for (to, w) in woken.iter_mut().enumerate() {
            if std::mem::take(w) {
                let _ = handoffs[to].wake.write(1);
            }
        }
        Ok(handed)
    }

    fn send_frame(&mut self, frame: &[u8], offload: &Offload) -> io::Result<()> {
        let i = *self
            .tx_now
            .get_or_insert_with(|| self.tx.iter().position(|p| p.running().0).unwrap_or(0));
        self.tx_pending[i] = true;
        self.tx[i].send_frame(frame, offload)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tx_now = None;
        for (pair, pending) in self.tx.iter_mut().zip(&mut self.tx_pending) {
            if std::mem::take(pending) {
                FramePort::flush(pair)?;
            }
        }
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn stats(&self) -> PortStats {
        let mut total = PortStats::default();
        for pair in &self.rx {
            total.merge(&FramePort::stats(pair));
        }
        total
    }

    fn offloads(&self) -> PortOffloads {
        self.tx[0].offloads()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handoff() -> Handoff {
        Handoff {
            queue: Mutex::new(HandoffQueue::default()),
            wake: EventFd::new(EFD_NONBLOCK).unwrap(),
        }
    }

    #[test]
    fn a_full_hand_off_queue_drops_and_counts() {
        // By bytes: 64 super-frames fit, the next is dropped.
        let h = handoff();
        let big = vec![0u8; 65_536];
        let frame = RxFrame {
            bytes: &big,
            offload: Offload::NONE,
        };
        for _ in 0..HANDOFF_MAX_BYTES / big.len() + 3 {
            pass(&h, &frame);
        }
        let q = h.lock();
        assert_eq!(q.bytes, HANDOFF_MAX_BYTES);
        assert_eq!(q.stats, HandoffStats { passed: 64, dropped: 3 });
        drop(q);
        // By frames: small ones stop at the frame limit.
        let h = handoff();
        let small = [0u8; 60];
        let frame = RxFrame {
            bytes: &small,
            offload: Offload::NONE,
        };
        for _ in 0..HANDOFF_MAX_FRAMES + 1 {
            pass(&h, &frame);
        }
        assert_eq!(h.lock().frames.len(), HANDOFF_MAX_FRAMES);
        assert_eq!(h.lock().stats.dropped, 1);
    }
}
