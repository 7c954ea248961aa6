//! Multi-core: one [`Engine`] per worker thread, each owning its shard of flows.
//!
//! The caller (the I/O layer) hands frames to a [`WorkerPool`], which picks
//! the owning worker with [`Engine::dispatch_key`] and [`shard_of`] (a
//! symmetric hash, so both directions of a connection and the ICMP errors that
//! quote it land on one worker, and workers share no state) and queues them in
//! batches over bounded channels (`sync_channel`): a full queue blocks the
//! dispatcher, which is the back-pressure a packet source needs. Policy
//! updates are broadcast to every worker, queued behind the frames already
//! submitted, so each worker switches at the same point of its own stream.
//!
//! The engines themselves stay single-threaded and sans-IO; this module only
//! adds threads and queues around them. Flow events are discarded here (a
//! worker has no sink yet); the counters come back when the pool finishes.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use crate::engine::{Disposition, Engine};
use crate::lookup::ChainLookup;
use crate::port::PortId;
use crate::shard::shard_of;
use crate::verdict::Counters;

/// Errors of the worker pool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkerError {
    /// No workers were asked for.
    #[error("a worker pool needs at least one worker")]
    NoWorkers,
    /// A worker thread could not be started.
    #[error("could not start worker {0}: {1}")]
    Spawn(usize, String),
    /// A worker stopped (it panicked): its queue is closed.
    #[error("worker {0} has stopped")]
    Stopped(usize),
}

/// Frames queued for one worker, in one allocation.
#[derive(Debug, Default)]
struct Batch {
    data: Vec<u8>,
    /// (time, port, end offset in `data`) of each frame, in order.
    items: Vec<(u64, PortId, usize)>,
}

enum Msg {
    Frames(Batch),
    Policy(Box<dyn ChainLookup + Send>),
}

/// What a worker did, returned when the pool finishes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// The worker's engine counters.
    pub counters: Counters,
    /// Batches it received.
    pub batches: u64,
}

fn work(mut engine: Engine, rx: Receiver<Msg>) -> WorkerReport {
    let mut report = WorkerReport::default();
    while let Ok(msg) = rx.recv() {
        match msg {
            Msg::Frames(batch) => {
                report.batches += 1;
                let mut start = 0;
                for &(now, port, end) in &batch.items {
                    // The offsets were recorded as the frames were appended, in order.
                    let frame = &batch.data[start..end];
                    start = end;
                    // Outputs would go to the I/O layer's ports; the pool only counts.
                    let _: Disposition = engine.process(now, port, frame, &mut ());
                }
            }
            Msg::Policy(lookup) => engine.update_policy(lookup),
        }
    }
    report.counters = engine.counters().clone();
    report
}

/// N worker threads, each owning one engine.
pub struct WorkerPool {
    /// Used only to compute dispatch keys (it sees the same ports as the workers).
    dispatcher: Engine,
    queues: Vec<SyncSender<Msg>>,
    pending: Vec<Batch>,
    handles: Vec<JoinHandle<WorkerReport>>,
    batch_frames: usize,
}

impl core::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("WorkerPool")
            .field("workers", &self.queues.len())
            .field("batch_frames", &self.batch_frames)
            .finish_non_exhaustive()
    }
}

impl WorkerPool {
    /// Start `workers` threads. `make` builds the engines (all alike: same
    /// ports, same policy); it is called once per worker and once more for the
    /// dispatcher. Each queue holds `queue_batches` batches of up to
    /// `batch_frames` frames.
    pub fn new(
        workers: usize,
        queue_batches: usize,
        batch_frames: usize,
        mut make: impl FnMut() -> Engine,
    ) -> Result<WorkerPool, WorkerError> {
        if workers == 0 {
            return Err(WorkerError::NoWorkers);
        }
        let mut queues = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for i in 0..workers {
            let (tx, rx) = sync_channel(queue_batches.max(1));
            let engine = make();
            let handle = std::thread::Builder::new()
                .name(format!("palisade-worker-{i}"))
                .spawn(move || work(engine, rx))
                .map_err(|e| WorkerError::Spawn(i, e.to_string()))?;
            queues.push(tx);
            handles.push(handle);
        }
        Ok(WorkerPool {
            dispatcher: make(),
            pending: (0..workers).map(|_| Batch::default()).collect(),
            queues,
            handles,
            batch_frames: batch_frames.max(1),
        })
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.queues.len()
    }

    /// The worker that owns a frame received on `port`; frames with no flow
    /// (non-IP, unparsable) go to worker 0.
    pub fn worker_of(&self, port: PortId, frame: &[u8]) -> usize {
        self.dispatcher
            .dispatch_key(port, frame)
            .map_or(0, |k| shard_of(&k, self.queues.len()))
    }

    /// Queue a frame received on `port` at `now` for its worker; blocks while
    /// that worker's queue is full.
    pub fn submit(&mut self, now: u64, port: PortId, frame: &[u8]) -> Result<(), WorkerError> {
        let w = self.worker_of(port, frame);
        // `w` < workers: shard_of returns 0..workers, and `pending` has one batch per worker.
        let batch = &mut self.pending[w];
        batch.data.extend_from_slice(frame);
        batch.items.push((now, port, batch.data.len()));
        if batch.items.len() >= self.batch_frames {
            self.send(w)?;
        }
        Ok(())
    }

    fn send(&mut self, w: usize) -> Result<(), WorkerError> {
        let cap = self.batch_frames;
        // `w` indexes `pending` and `queues`, both one per worker.
        let batch = std::mem::replace(
            &mut self.pending[w],
            Batch {
                data: Vec::with_capacity(cap * 128),
                items: Vec::with_capacity(cap),
            },
        );
        self.queues[w]
            .send(Msg::Frames(batch))
            .map_err(|_| WorkerError::Stopped(w))
    }

    /// Send every partly filled batch now.
    pub fn flush(&mut self) -> Result<(), WorkerError> {
        for w in 0..self.queues.len() {
            if !self.pending[w].items.is_empty() {
                self.send(w)?;
            }
        }
        Ok(())
    }

    /// Swap every worker (and the dispatcher) to a new policy, after the
    /// frames submitted so far.
    pub fn update_policy<L>(&mut self, lookup: L) -> Result<(), WorkerError>
    where
        L: ChainLookup + Clone + Send + 'static,
    {
        self.flush()?;
        for (w, q) in self.queues.iter().enumerate() {
            q.send(Msg::Policy(Box::new(lookup.clone())))
                .map_err(|_| WorkerError::Stopped(w))?;
        }
        self.dispatcher.update_policy(Box::new(lookup));
        Ok(())
    }

    /// Flush, stop the workers and return what each did.
    pub fn finish(mut self) -> Result<Vec<WorkerReport>, WorkerError> {
        self.flush()?;
        // Closing the queues ends each worker's loop once it has drained its queue.
        self.queues.clear();
        self.handles
            .into_iter()
            .enumerate()
            .map(|(i, h)| h.join().map_err(|_| WorkerError::Stopped(i)))
            .collect()
    }
}

/// Sum of the workers' counters.
pub fn total(reports: &[WorkerReport]) -> Counters {
    let mut t = Counters::default();
    for r in reports {
        let c = &r.counters;
        t.packets += c.packets;
        t.forwarded += c.forwarded;
        for (a, b) in t.drops.iter_mut().zip(c.drops) {
            *a += b;
        }
        t.cache_hits += c.cache_hits;
        t.cache_misses += c.cache_misses;
        t.cache_evictions += c.cache_evictions;
        t.classifications += c.classifications;
        t.revalidations += c.revalidations;
        t.trusted += c.trusted;
        t.conns_created += c.conns_created;
        t.conns_ended += c.conns_ended;
        t.conns_evicted += c.conns_evicted;
        t.tcp_window_liberal += c.tcp_window_liberal;
        t.icmp_related += c.icmp_related;
        t.flooded += c.flooded;
        t.encapsulated += c.encapsulated;
    }
    t
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use palisade_policy::compile::Compiler;
    use palisade_policy::{MemorySource, load};
    use palisade_wire::ethernet::EthernetAddress;
    use palisade_wire::ip::IpProtocol;
    use palisade_wire::udp::{self, UdpRepr};

    use super::*;
    use crate::engine::EngineConfig;
    use crate::lookup::PolicyLookup;
    use crate::port::{self, UplinkConfig};
    use crate::verdict::DropReason;

    fn policy(version: u64, allow: bool) -> Compiler {
        let text = format!(
            r#"
version: {version}
datacenter: {{ name: dc1, default: deny }}
zones: [{{ name: web, vlan: 100 }}]
vms:
  - {{ name: a, uuid: 00000000-0000-4000-8000-00000000000a, vnics: [{{ name: a.0, mac: "02:00:00:00:00:0a", ips: [10.0.0.10], zone: web }}] }}
  - {{ name: b, uuid: 00000000-0000-4000-8000-00000000000b, vnics: [{{ name: b.0, mac: "02:00:00:00:00:0b", ips: [10.0.0.11], zone: web }}] }}
groups: {{ web: {{ zone: web }} }}
rules:
  datacenter:
    - {{ id: web-dns, from: web, to: web, service: udp/53, action: {} }}
"#,
            if allow { "allow" } else { "deny" }
        );
        let loaded = load(&MemorySource::new().with("p.yaml", text)).unwrap();
        assert!(!loaded.has_errors(), "{}", loaded.render());
        Compiler::new(loaded.model).unwrap()
    }

    fn engine() -> Engine {
        let compiler = policy(1, true);
        let model = compiler.model().clone();
        let mut e = Engine::new(
            EngineConfig::new(UplinkConfig {
                local_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 1]),
                local_ip: Ipv4Addr::new(192, 168, 0, 1),
                gateway_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 0xfe]),
                flood: vec![],
            }),
            Box::new(PolicyLookup::new(compiler)),
        );
        for n in ["a.0", "b.0"] {
            e.add_vnic(port::vnic_from_model(&model, n, &[], 10_000).unwrap())
                .unwrap();
        }
        e
    }

    /// A UDP frame between a (.10) and b (.11).
    fn udp_frame(from_a: bool, client_port: u16) -> Vec<u8> {
        let (a, b) = (Ipv4Addr::new(10, 0, 0, 10), Ipv4Addr::new(10, 0, 0, 11));
        let (src, dst, sport, dport, smac, dmac) = if from_a {
            (a, b, client_port, 53, 0x0a, 0x0b)
        } else {
            (b, a, 53, client_port, 0x0b, 0x0a)
        };
        let u = UdpRepr {
            src_port: sport,
            dst_port: dport,
            payload: b"q",
        };
        let mut l4 = vec![0; u.buffer_len()];
        u.emit(&mut udp::Packet::new_unchecked(&mut l4[..]), src.into(), dst.into());
        crate::fuzzing::vm_frame(smac, dmac, IpProtocol::UDP, &l4)
    }

    #[test]
    fn both_directions_meet_on_one_worker_and_policy_reaches_all() {
        let e = engine();
        let (pa, pb) = (e.port_of("a.0").unwrap(), e.port_of("b.0").unwrap());
        let mut pool = WorkerPool::new(2, 4, 8, engine).unwrap();
        let mut t = 0;
        for round in 0..3 {
            for c in 0..40u16 {
                t += 1;
                pool.submit(t, pa, &udp_frame(true, 1000 + c)).unwrap();
                t += 1;
                pool.submit(t, pb, &udp_frame(false, 1000 + c)).unwrap();
                if round == 0 {
                    assert_eq!(
                        pool.worker_of(pa, &udp_frame(true, 1000 + c)),
                        pool.worker_of(pb, &udp_frame(false, 1000 + c))
                    );
                }
            }
        }
        // Deny from now on: every established flow is cut on its next packet.
        pool.update_policy(PolicyLookup::new(policy(2, false))).unwrap();
        for c in 0..40u16 {
            t += 1;
            pool.submit(t, pa, &udp_frame(true, 1000 + c)).unwrap();
        }
        let reports = pool.finish().unwrap();
        let used = reports.iter().filter(|r| r.counters.packets > 0).count();
        assert_eq!(used, 2, "40 flows spread over both workers");
        let sum = total(&reports);
        assert_eq!(sum.packets, 280);
        // Had a reply landed on another worker than its request, it would have been
        // classified as a new flow there: one classification per flow means they met.
        assert_eq!(sum.conns_created, 40);
        assert_eq!(sum.classifications, 40 + 40, "40 flows, then 40 re-validations");
        assert_eq!(sum.forwarded, 240);
        assert_eq!(sum.dropped(DropReason::PolicyRevoked), 40);
        assert_eq!(WorkerPool::new(0, 1, 1, engine).err(), Some(WorkerError::NoWorkers));
    }
}
