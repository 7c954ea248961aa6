//! Audit heads through the controller (issue 22, items 9 and 10), end to
//! end and without root: an agent's trail (its `Trail` with the controller
//! queue, and the thread that registers its key and pushes its heads) talks
//! to a real in-process controller; `palisade audit verify --server` then
//! checks trails against what the controller holds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use palisade_agent::trail::Trail as AgentTrail;
use palisade_agent::upstream::{HeadQueue, head_pusher};
use palisade_api::client::{Client, ClientAuth};
use palisade_api::roles::Role;
use palisade_audit::record::{ChangeRecord, Record};
use palisade_controller::core::Controller;
use palisade_controller::server::{self, RunningServer, ServeOptions};
use palisade_controller::store::{EmbeddedStore, Store};
use palisade_controller::trail::Trail as CtlTrail;

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        let p = std::env::temp_dir().join(format!("palisade-heads-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An in-process controller on plain HTTP, its own trail publishing to its store.
struct Ctl {
    server: RunningServer,
    admin: String,
    audit: PathBuf,
}

fn controller(root: &Path) -> Ctl {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&root.join("store.redb")).unwrap());
    let audit = root.join("ctl-audit");
    let config = palisade_audit::AuditConfig {
        key_file: Some(root.join("ctl-audit.key")),
        head_file: Some(root.join("ctl-audit.head")),
        ..palisade_audit::AuditConfig::default()
    };
    let trail = CtlTrail::open_publishing(&audit, config, store.clone()).unwrap();
    let ctl = Controller::new(store).with_trail(Arc::new(trail));
    let admin = ctl.create_token("local", "alice", Role::Admin).unwrap();
    let server = server::spawn(ctl, ServeOptions::plain("127.0.0.1:0".parse().unwrap())).unwrap();
    Ctl { server, admin, audit }
}

fn client(url: &str, token: &str) -> Client {
    Client::new(url, ClientAuth::Token(token.to_string())).unwrap()
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

fn record(i: u64) -> Record {
    Record::Change(ChangeRecord {
        time_ns: 1_700_000_000_000_000_000 + i,
        actor: "agent".into(),
        action: "test".into(),
        resource: format!("r/{i}"),
        diff: String::new(),
        policy_version: None,
    })
}

/// An agent's trail under `root` handing its heads to the controller at
/// `url` (admin token: plain HTTP), and the pusher's stop flag and thread.
struct Agent {
    trail: AgentTrail,
    queue: Arc<HeadQueue>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    next: u64,
}

impl Agent {
    fn start(root: &Path, url: &str, token: &str) -> Agent {
        let queue = HeadQueue::new();
        let trail = AgentTrail::open_with(
            &root.join("trail"),
            palisade_audit::Retention::default(),
            &root.join("audit.key"),
            &root.join("audit.head"),
            Some(queue.clone()),
        )
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = head_pusher(
            client(url, token),
            "hv1".into(),
            trail.public_key(),
            queue.clone(),
            stop.clone(),
        )
        .unwrap();
        let next = trail.status().last_seq + 1;
        Agent {
            trail,
            queue,
            stop,
            thread: Some(thread),
            next,
        }
    }

    /// Append `n` records and sign (and publish) a head over them.
    fn write(&mut self, n: u64) -> u64 {
        for _ in 0..n {
            self.trail.push(record(self.next));
            self.next += 1;
        }
        self.trail.close(now_ns()).unwrap();
        self.next - 1
    }

    fn stop(mut self) -> AgentTrail {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.trail
    }
}

/// Wait until `f` holds (10 s at most).
fn until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(10), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn held_seq(c: &Client) -> Option<u64> {
    c.audit_head(Some("hv1")).ok()?.head.map(|h| h.seq)
}

fn verify(dir: &Path, url: &str, token: &str, host: Option<&str>) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_palisade"));
    cmd.args(["audit", "verify"])
        .arg(dir)
        .args(["--server", url, "--token", token]);
    if let Some(h) = host {
        cmd.args(["--host", h]);
    }
    let out = cmd.env_remove("PALISADE_TOKEN").output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn the_agent_registers_its_key_and_pushes_its_heads() {
    let root = TempDir::new("push");
    let ctl = controller(&root.0);
    let url = ctl.server.url();
    let admin = client(&url, &ctl.admin);
    let agent_root = root.0.join("agent");
    let mut agent = Agent::start(&agent_root, &url, &ctl.admin);
    let seq = agent.write(40);
    until("the head to reach the controller", || held_seq(&admin) == Some(seq));
    let info = admin.audit_head(Some("hv1")).unwrap();
    assert_eq!(info.public_key, palisade_api::validate::hex(&agent.trail.public_key()));
    assert!(info.conflicts.is_empty());
    assert_eq!(agent.queue.accepted_seq(), Some(seq));
    assert_eq!(agent.trail.stats().controller_seq, Some(seq));
    let seq = agent.write(5);
    until("the next head", || held_seq(&admin) == Some(seq));
    assert_eq!(agent.trail.stats().publish_failures, 0);
    let trail = agent.stop();
    drop(trail);

    // Without a controller, heads are counted as failures and the trail goes on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let mut agent = Agent::start(&agent_root, &dead, &ctl.admin);
    let seq2 = agent.write(3);
    assert_eq!(seq2, seq + 3);
    until("a failure to be counted", || agent.trail.stats().publish_failures > 0);
    agent.stop();
}

#[test]
fn verify_against_the_controller_catches_a_restored_older_copy() {
    let root = TempDir::new("e2e");
    let ctl = controller(&root.0);
    let url = ctl.server.url();
    let admin = client(&url, &ctl.admin);
    let agent_root = root.0.join("agent");
    let dir = agent_root.join("trail");
    let mut agent = Agent::start(&agent_root, &url, &ctl.admin);
    let first = agent.write(50);
    until("the first head", || held_seq(&admin) == Some(first));
    // An older copy of the trail and of its head file, taken now.
    let old = root.0.join("old");
    copy_dir(&dir, &old.join("trail"));
    std::fs::copy(agent_root.join("audit.head"), old.join("audit.head")).unwrap();
    let last = agent.write(30);
    until("the newer head", || held_seq(&admin) == Some(last));
    drop(agent.stop());

    // The trail as it is: intact, and it contains the head the controller holds.
    let (code, out) = verify(&dir, &url, &ctl.admin, Some("hv1"));
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("contains the expected head (seq {last})")),
        "{out}"
    );
    // The controller's own trail, against its own published head.
    let (code, out) = verify(&ctl.audit, &url, &ctl.admin, None);
    assert_eq!(code, Some(0), "{out}");

    // The older copy put back: it verifies on its own, but not against the controller.
    std::fs::remove_dir_all(&dir).unwrap();
    copy_dir(&old.join("trail"), &dir);
    let (code, out) = verify(&dir, &url, &ctl.admin, Some("hv1"));
    eprintln!("restored older copy:\n{out}");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("BehindHead"), "{out}");
    assert!(out.contains(&format!("records {}..={last}", first + 1)), "{out}");
    // Another host's view does not fit this trail (another key).
    let (code, out) = verify(&dir, &url, &ctl.admin, Some("nobody"));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("404"), "{out}");

    // The head file rolled back too: the agent starts, but the controller
    // refuses its heads (behind the one it holds) and keeps them; verify
    // fails even once the trail has grown past the cut.
    std::fs::copy(old.join("audit.head"), agent_root.join("audit.head")).unwrap();
    let mut agent = Agent::start(&agent_root, &url, &ctl.admin);
    agent.write(5);
    until("the rollback to be kept", || {
        admin.audit_head(Some("hv1")).is_ok_and(|i| !i.conflicts.is_empty())
    });
    until("the refusal to be counted", || agent.trail.stats().publish_failures > 0);
    drop(agent.stop());
    let (code, out) = verify(&dir, &url, &ctl.admin, Some("hv1"));
    assert_eq!(code, Some(1), "{out}");
    eprintln!("rolled back with its head file:\n{out}");
    assert!(out.contains("refused a head of this trail"), "{out}");
    assert!(out.contains("rollback"), "{out}");
}
