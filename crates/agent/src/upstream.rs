//! Policy from the controller.
//!
//! A watcher thread long-polls the controller for this host's effective
//! policy (the version's files plus the tag overlay) and hands each new one,
//! compiled, to the datapath thread over a channel; the datapath swaps it in
//! between rounds (an epoch bump: flows the new policy denies are cut on their
//! next packet). Every bundle is saved to the state directory before it is
//! handed over, so an agent that starts while the controller is unreachable
//! enforces the last policy it had, and one that loses the controller keeps
//! enforcing it and reconciles when the controller returns (the next poll
//! asks for anything newer than what it has). An agent that has never had a
//! policy does not forward anything until one arrives.
//!
//! The audit trail's signed heads go the same way: the trail hands each to
//! a [`HeadQueue`] (one slot, the newest wins, so the appending thread
//! never waits on the network), and [`head_pusher`] registers the trail's
//! public key with the controller and sends it the newest head, counting
//! failures and trying again with the next head.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use palisade_api::bundle::BundleError;
use palisade_api::client::{Client, ClientAuth};
use palisade_api::{PolicyBundle, ReportRequest};
use palisade_audit::record::{AlertRecord, FlowRecord};
use palisade_audit::{AuditError, HeadPublisher, SignedHead};
use palisade_policy::compile::Compiler;
use palisade_policy::load::Loader;

use crate::config::ControllerConfig;
use crate::error::AgentError;

/// A policy ready to install.
pub struct Installed {
    /// The compiled policy (the watcher keeps its own copy to recompile from).
    pub compiler: Arc<Compiler>,
    /// The controller's effective-policy revision it came from.
    pub revision: u64,
}

impl core::fmt::Debug for Installed {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Installed")
            .field("revision", &self.revision)
            .finish_non_exhaustive()
    }
}

/// Where the last good bundle is kept.
pub fn saved_path(state_dir: &Path) -> PathBuf {
    state_dir.join("controller-policy.json")
}

/// Compile a bundle, loading with `loader` (which remembers its VMs for the next).
/// Callers say which revision it was.
pub fn compile(bundle: &PolicyBundle, loader: &mut Loader) -> Result<Compiler, BundleError> {
    bundle.compile_with(loader)
}

/// The bundle saved by an earlier run, if it is there and still compiles.
pub fn load_saved(state_dir: &Path, loader: &mut Loader) -> Option<(PolicyBundle, Compiler)> {
    let text = std::fs::read_to_string(saved_path(state_dir)).ok()?;
    let bundle: PolicyBundle = match serde_json::from_str(&text) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("palisade agent: saved controller policy is unreadable, ignored: {e}");
            return None;
        }
    };
    match compile(&bundle, loader) {
        Ok(c) => Some((bundle, c)),
        Err(e) => {
            eprintln!("palisade agent: saved controller policy does not compile, ignored: {e}");
            None
        }
    }
}

fn save(state_dir: &Path, bundle: &PolicyBundle) -> std::io::Result<()> {
    let path = saved_path(state_dir);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(bundle).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, &path)
}

/// The controller connection of one agent.
pub fn client(config: &ControllerConfig) -> Result<Client, AgentError> {
    let auth = match (&config.cert, &config.key, &config.token) {
        (Some(cert), Some(key), _) => ClientAuth::Cert {
            ca: config.ca.clone().unwrap_or_default(),
            cert: cert.clone(),
            key: key.clone(),
        },
        (_, _, Some(token)) => ClientAuth::Token(token.clone()),
        _ => {
            return Err(AgentError::Controller(
                "controller: give cert and key (mutual TLS) or a token".into(),
            ));
        }
    };
    let mut c =
        Client::with_failover(config.servers.clone(), auth).map_err(|e| AgentError::Controller(e.to_string()))?;
    if let (Some(ca), None) = (&config.ca, &config.cert) {
        c = c.with_ca(ca).map_err(|e| AgentError::Controller(e.to_string()))?;
    }
    Ok(c)
}

/// Wait for the first policy (blocking; `stop` ends the wait).
pub fn first_policy(
    client: &Client,
    host: &str,
    state_dir: &Path,
    stop: &AtomicBool,
    loader: &mut Loader,
) -> Result<(PolicyBundle, Compiler), AgentError> {
    let mut said = false;
    while !stop.load(Ordering::Relaxed) {
        match client.watch_policy(host, 0, Duration::from_secs(5)) {
            Ok(Some(b)) => match compile(&b, loader) {
                Ok(c) => {
                    let _ = save(state_dir, &b);
                    return Ok((b, c));
                }
                Err(source) => {
                    return Err(AgentError::PolicyRefused {
                        revision: b.revision,
                        source,
                    });
                }
            },
            Ok(None) => {}
            Err(e) => {
                if !said {
                    eprintln!("palisade agent: no policy yet and the controller is unreachable ({e}); waiting");
                    said = true;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    Err(AgentError::Controller("stopped before a policy arrived".into()))
}

/// Start the watcher from `held`, the bundle in force, its compiled policy
/// and the loader that loaded it. The receiver gets every newer policy.
pub fn watch(
    client: Client,
    host: String,
    state_dir: PathBuf,
    held: (PolicyBundle, Arc<Compiler>, Loader),
    stop: Arc<AtomicBool>,
) -> Result<Receiver<Installed>, AgentError> {
    // Depth 1: if the datapath has not taken the last one yet, the watcher waits (it is superseded anyway).
    let (tx, rx) = sync_channel(1);
    std::thread::Builder::new()
        .name("palisade-upstream".into())
        .spawn(move || run(client, host, state_dir, held, stop, tx))
        .map_err(|e| AgentError::Controller(format!("starting the watcher: {e}")))?;
    Ok(rx)
}

fn run(
    client: Client,
    host: String,
    state_dir: PathBuf,
    (mut held, compiled, mut loader): (PolicyBundle, Arc<Compiler>, Loader),
    stop: Arc<AtomicBool>,
    tx: SyncSender<Installed>,
) {
    let mut after = held.revision;
    // The compiled policy of `held`, to recompile a tag change from: a copy
    // of the one in force, made here rather than on the start's path.
    let mut held_compiled = Some(Compiler::clone(&compiled));
    drop(compiled);
    if let Err(e) = client.register(&host, env!("CARGO_PKG_VERSION")) {
        eprintln!("palisade agent: registering with the controller: {e}");
    }
    let mut reachable = true;
    while !stop.load(Ordering::Relaxed) {
        // Saying which version's files we hold makes a tag change cost only the overlay.
        let have = (held.version != 0).then_some(held.version);
        match client.watch_policy_having(&host, after, have, Duration::from_secs(10)) {
            Ok(None) => {}
            Ok(Some(b)) => {
                if !reachable {
                    eprintln!("palisade agent: controller reachable again");
                    reachable = true;
                }
                let revision = b.revision;
                let b = match b.resolve(&held) {
                    Ok(b) => b,
                    Err(e) => {
                        // The held files are not the version they claim (edited on disk)
                        // or the controller is confused: ask again for the whole bundle.
                        eprintln!("palisade agent: policy revision {revision}: {e}");
                        held.version = 0;
                        continue;
                    }
                };
                // A tag change recompiles only what it affects, from the
                // policy compiled for the bundle held.
                match b.compile_from(&held, &mut held_compiled, &mut loader) {
                    Ok(compiler) => {
                        let compiler = Arc::new(compiler);
                        if let Err(e) = save(&state_dir, &b) {
                            eprintln!("palisade agent: saving policy revision {}: {e}", b.revision);
                        }
                        after = b.revision;
                        let installed = Installed {
                            compiler: compiler.clone(),
                            revision: b.revision,
                        };
                        held = b;
                        if tx.send(installed).is_err() {
                            return;
                        }
                        // The copy to recompile the next revision from is
                        // made once the policy is on its way, while this
                        // thread would otherwise wait (80-130 ms at 50,000
                        // VMs: longer than installing a tag change); so is
                        // freeing the one it replaces (about 100 ms).
                        held_compiled = Some(Compiler::clone(&compiler));
                        let report = ReportRequest {
                            installed_revision: after,
                            counters: Default::default(),
                        };
                        let _ = client.report(&host, &report);
                    }
                    Err(e) => {
                        // Keep enforcing what we have; skip this revision.
                        eprintln!("palisade agent: policy revision {} refused: {e}", b.revision);
                        after = b.revision;
                    }
                }
            }
            Err(e) => {
                if reachable {
                    eprintln!("palisade agent: controller unreachable, still enforcing revision {after}: {e}");
                    reachable = false;
                }
                for _ in 0..10 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

/// Start the thread that sends flow records to the controller, batch by
/// batch. The queue is short: if the controller is slow or away, the agent's
/// `try_send` fails and counts the records (they are in the local trail).
pub fn flow_pusher(
    client: Client,
    host: String,
    stop: Arc<AtomicBool>,
) -> Result<SyncSender<Vec<FlowRecord>>, AgentError> {
    let (tx, rx) = sync_channel::<Vec<FlowRecord>>(16);
    std::thread::Builder::new()
        .name("palisade-flow-push".into())
        .spawn(move || {
            let mut failing = false;
            while !stop.load(Ordering::Relaxed) {
                let Ok(batch) = rx.recv_timeout(Duration::from_millis(500)) else {
                    continue;
                };
                match client.push_flows(&host, &batch) {
                    Ok(_) if failing => {
                        eprintln!("palisade agent: sending flow records to the controller again");
                        failing = false;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if !failing {
                            eprintln!(
                                "palisade agent: flow records not sent to the controller ({e}); they stay in the local trail"
                            );
                        }
                        failing = true;
                    }
                }
            }
        })
        .map_err(|e| AgentError::Controller(format!("starting the flow sender: {e}")))?;
    Ok(tx)
}

/// Alerts waiting to go to the controller, bounded: the control thread
/// offers them (never blocking), [`alert_pusher`] sends them in batches and
/// retries a batch that failed (they are in the local trail either way).
/// Past [`ALERT_QUEUE`] waiting, the oldest are shed and counted.
#[derive(Debug, Default)]
pub struct AlertQueue {
    waiting: Mutex<std::collections::VecDeque<AlertRecord>>,
    ready: Condvar,
    pushed: AtomicU64,
    shed: AtomicU64,
    failures: AtomicU64,
}

/// Alerts waiting for the controller at most.
pub const ALERT_QUEUE: usize = 20_000;

/// Alerts per push (the controller takes up to [`palisade_api::MAX_ALERT_BATCH`]).
const ALERT_PUSH_BATCH: usize = 1_000;

/// What became of the alerts offered to the controller.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct AlertPushStats {
    /// Alerts the controller accepted.
    pub pushed: u64,
    /// Alerts shed because too many were waiting (the controller slow or away).
    pub shed: u64,
    /// Pushes that failed (retried).
    pub failures: u64,
    /// Alerts waiting now.
    pub waiting: u64,
}

impl AlertQueue {
    /// An empty queue.
    pub fn new() -> Arc<AlertQueue> {
        Arc::default()
    }

    /// Queue `records`, shedding the oldest waiting past [`ALERT_QUEUE`].
    pub fn offer(&self, records: impl IntoIterator<Item = AlertRecord>) {
        let mut q = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        for r in records {
            if q.len() == ALERT_QUEUE {
                q.pop_front();
                self.shed.fetch_add(1, Ordering::Relaxed);
            }
            q.push_back(r);
        }
        self.ready.notify_one();
    }

    /// Up to `n` of the oldest alerts, waiting at most `wait` for one.
    fn take(&self, n: usize, wait: Duration) -> Vec<AlertRecord> {
        let q = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let (mut q, _) = self
            .ready
            .wait_timeout_while(q, wait, |q| q.is_empty())
            .unwrap_or_else(|p| p.into_inner());
        let n = n.min(q.len());
        q.drain(..n).collect()
    }

    /// Put a batch that failed back in front, as far as there is room (the
    /// newer ones, offered meanwhile, keep their place).
    fn put_back(&self, batch: Vec<AlertRecord>) {
        let mut q = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let room = ALERT_QUEUE.saturating_sub(q.len());
        let lost = batch.len().saturating_sub(room);
        self.shed.fetch_add(lost as u64, Ordering::Relaxed);
        for r in batch.into_iter().skip(lost).rev() {
            q.push_front(r);
        }
    }

    /// The counts so far.
    pub fn stats(&self) -> AlertPushStats {
        AlertPushStats {
            pushed: self.pushed.load(Ordering::Relaxed),
            shed: self.shed.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            waiting: self.waiting.lock().map_or(0, |q| q.len() as u64),
        }
    }
}

/// Start the thread that sends `queue`'s alerts to the controller, up to
/// 1,000 a request. A batch that fails is put back and
/// tried again after a pause that doubles up to 30 s; one the controller
/// refuses as malformed (a 4xx: it would be refused again) is dropped and
/// counted as shed, so one bad record cannot stop the rest.
pub fn alert_pusher(
    client: Client,
    host: String,
    queue: Arc<AlertQueue>,
    stop: Arc<AtomicBool>,
) -> Result<(), AgentError> {
    std::thread::Builder::new()
        .name("palisade-alert-push".into())
        .spawn(move || {
            let mut backoff = Duration::from_secs(1);
            let mut failing = false;
            while !stop.load(Ordering::Relaxed) {
                let batch = queue.take(ALERT_PUSH_BATCH, Duration::from_millis(500));
                if batch.is_empty() {
                    continue;
                }
                match client.push_alerts(&host, &batch) {
                    Ok(_) => {
                        queue.pushed.fetch_add(batch.len() as u64, Ordering::Relaxed);
                        if failing {
                            eprintln!("palisade agent: sending alerts to the controller again");
                            failing = false;
                        }
                        backoff = Duration::from_secs(1);
                    }
                    Err(e) => {
                        queue.failures.fetch_add(1, Ordering::Relaxed);
                        if !failing {
                            eprintln!(
                                "palisade agent: alerts not sent to the controller ({e}); retrying, they are in the local trail"
                            );
                            failing = true;
                        }
                        let refused = matches!(
                            e,
                            palisade_api::client::ClientError::Api { status: 400 | 413 | 422, .. }
                        );
                        if refused {
                            queue.shed.fetch_add(batch.len() as u64, Ordering::Relaxed);
                        } else {
                            queue.put_back(batch);
                        }
                        let until = std::time::Instant::now() + backoff;
                        while std::time::Instant::now() < until && !stop.load(Ordering::Relaxed) {
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
        })
        .map_err(|e| AgentError::Controller(format!("starting the alert sender: {e}")))?;
    Ok(())
}

/// The newest signed head waiting to go to the controller: one slot, a
/// newer head replaces one not sent yet (only the latest matters: it
/// commits to everything before it).
#[derive(Debug, Default)]
pub struct HeadQueue {
    slot: Mutex<Option<SignedHead>>,
    ready: Condvar,
    failures: AtomicU64,
    /// The last seq the controller accepted, plus one (0: none yet).
    accepted: AtomicU64,
}

impl HeadQueue {
    /// An empty queue.
    pub fn new() -> Arc<HeadQueue> {
        Arc::default()
    }

    /// The publisher the trail hands its heads to.
    pub fn publisher(self: &Arc<Self>) -> Box<dyn HeadPublisher> {
        Box::new(QueuePublisher(self.clone()))
    }

    /// Put `head` in the slot unless a newer one is there.
    pub fn offer(&self, head: SignedHead) {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none_or(|h| h.seq <= head.seq) {
            *slot = Some(head);
        }
        self.ready.notify_one();
    }

    /// Take the head waiting, waiting at most `wait` for one.
    fn take(&self, wait: Duration) -> Option<SignedHead> {
        let slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        let (mut slot, _) = self
            .ready
            .wait_timeout_while(slot, wait, |s| s.is_none())
            .unwrap_or_else(|p| p.into_inner());
        slot.take()
    }

    /// Put back a head that could not be sent, unless a newer one came meanwhile.
    fn put_back(&self, head: SignedHead) {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(head);
        }
    }

    /// Heads the controller refused or that could not be delivered.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The last head's seq the controller accepted.
    pub fn accepted_seq(&self) -> Option<u64> {
        self.accepted.load(Ordering::Relaxed).checked_sub(1)
    }

    fn failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// Hands heads to a [`HeadQueue`]: never blocks, never fails.
struct QueuePublisher(Arc<HeadQueue>);

impl HeadPublisher for QueuePublisher {
    fn publish(&mut self, head: &SignedHead) -> Result<(), String> {
        self.0.offer(*head);
        Ok(())
    }

    fn last_published(&mut self) -> Result<Option<SignedHead>, AuditError> {
        // Not read back at open (that would wait on the network): the
        // controller refuses a head behind the one it holds, and keeps it.
        Ok(None)
    }

    fn describe(&self) -> String {
        "the controller (queued)".into()
    }
}

/// Start the thread that registers the trail's `public_key` for `host` with
/// the controller and sends it each head `queue` receives. A head not
/// delivered is counted and tried again (unless a newer one replaced it);
/// one the controller refuses (a rollback or fork it keeps as evidence, or
/// another key than the one pinned) is counted and not sent again.
pub fn head_pusher(
    client: Client,
    host: String,
    public_key: [u8; 32],
    queue: Arc<HeadQueue>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, AgentError> {
    std::thread::Builder::new()
        .name("palisade-head-push".into())
        .spawn(move || push_heads(&client, &host, &public_key, &queue, &stop))
        .map_err(|e| AgentError::Controller(format!("starting the head sender: {e}")))
}

fn push_heads(client: &Client, host: &str, public_key: &[u8; 32], queue: &HeadQueue, stop: &AtomicBool) {
    use palisade_api::client::ClientError;
    let pause = |d: Duration| {
        let t = std::time::Instant::now();
        while t.elapsed() < d && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut registered = false;
    let mut said = false;
    while !stop.load(Ordering::Relaxed) {
        if !registered {
            match client.register_audit_key(host, env!("CARGO_PKG_VERSION"), public_key) {
                Ok(_) => {
                    registered = true;
                    said = false;
                }
                Err(e) => {
                    // A head waiting is a head not published.
                    if queue.slot.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
                        queue.failed();
                    }
                    if !said {
                        eprintln!("palisade agent: audit key not registered with the controller ({e}); retrying");
                        said = true;
                    }
                    pause(Duration::from_secs(1));
                    continue;
                }
            }
        }
        let Some(head) = queue.take(Duration::from_millis(500)) else {
            continue;
        };
        match client.put_audit_head(host, &head) {
            Ok(_) => {
                queue.accepted.fetch_max(head.seq + 1, Ordering::Relaxed);
                said = false;
            }
            Err(ClientError::Api { status: 404, .. }) => {
                // The controller lost the key (a new store): register again.
                queue.put_back(head);
                registered = false;
            }
            Err(e @ ClientError::Api { status: 409 | 422, .. }) => {
                queue.failed();
                eprintln!(
                    "palisade agent: the controller refused audit head seq {}: {e}",
                    head.seq
                );
            }
            Err(e) => {
                queue.failed();
                if !said {
                    eprintln!("palisade agent: audit head not sent to the controller ({e}); retrying");
                    said = true;
                }
                queue.put_back(head);
                pause(Duration::from_secs(1));
            }
        }
    }
}

/// Start the thread that pushes health reports to the controller. The
/// queue holds one: a report the controller is too slow for is replaced by
/// the next, which is fresher anyway.
pub fn health_pusher(
    client: Client,
    host: String,
    stop: Arc<AtomicBool>,
) -> Result<SyncSender<palisade_api::health::HealthReport>, AgentError> {
    let (tx, rx) = sync_channel::<palisade_api::health::HealthReport>(1);
    std::thread::Builder::new()
        .name("palisade-health-push".into())
        .spawn(move || {
            let mut failing = false;
            while !stop.load(Ordering::Relaxed) {
                let Ok(report) = rx.recv_timeout(Duration::from_millis(500)) else {
                    continue;
                };
                match client.push_health(&host, &report) {
                    Ok(_) if failing => {
                        eprintln!("palisade agent: health reports reach the controller again");
                        failing = false;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if !failing {
                            eprintln!("palisade agent: health report not sent to the controller: {e}");
                        }
                        failing = true;
                    }
                }
            }
        })
        .map_err(|e| AgentError::Controller(format!("starting the health sender: {e}")))?;
    Ok(tx)
}
