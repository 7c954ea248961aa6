//! Live migrations the controller orders, carried out by the source host's agent.
//!
//! The controller reaches no agent; agents pull. A thread asks the
//! controller every `poll` for the orders whose source is this host
//! (`GET /v1/agents/{host}/migrations`), and for each:
//!
//! 1. reports it `running` (the controller then hands it to no one else);
//! 2. drives the hypervisor with the configured driver: QMP on the VM's
//!    monitor socket, `migrate` to the destination QEMU's `-incoming` URI
//!    with `pause-before-switchover` ([`crate::qmp::migrate`]);
//! 3. in the guest's pause, exports each vNIC's connections from this
//!    host's engines (which quiesces the port: frames are dropped and
//!    counted) and hands each blob to the destination agent's control
//!    socket (`/vnics/{name}/import`: verified, all or nothing); only then
//!    does QEMU move the device state and start the guest there;
//! 4. after the switchover quits the source QEMU and drops the vNICs'
//!    connections here (`release`; the port stays quiesced for stragglers);
//! 5. reports the outcome (connections moved, bytes, the blobs' BLAKE3, the
//!    state move's time), which the controller keeps as the order's final
//!    state and as a migration record in its trail.
//!
//! A failure anywhere before the switchover completes (QEMU refusing, the
//! destination agent refusing the blob or gone) cancels the migration: the
//! exported vNICs resume here with every connection they had, a paused
//! guest runs again, and the order is reported `failed` with the reason.
//! The order's names come from the controller and go into paths: they are
//! checked first ([`MigrationConfig::fill`]).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use palisade_api::client::Client;
use palisade_api::migration::{MigrationOrder, MigrationReport, MigrationState};

use crate::config::MigrationConfig;
use crate::error::AgentError;
use crate::http::{Control, ControlError};
use crate::qmp::{self, Qmp};

/// Largest answer read from an agent's control socket (a state blob: the
/// agent caps those at 16 MiB).
const MAX_ANSWER: u64 = 32 << 20;

/// How long one request to a control socket may take (a 50,000-connection
/// blob is a few MB).
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// `POST path` with `body` on the agent control socket `socket`; the body of
/// a 200, else the status line and the agent's message.
pub fn control_post(socket: &Path, path: &str, body: &[u8], timeout: Duration) -> Result<Vec<u8>, String> {
    let io = |e: std::io::Error| format!("{}: {e}", socket.display());
    let mut s = UnixStream::connect(socket).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: agent\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).map_err(io)?;
    s.write_all(body).map_err(io)?;
    let mut out = Vec::new();
    s.take(MAX_ANSWER).read_to_end(&mut out).map_err(io)?;
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("{}: truncated answer to POST {path}", socket.display()))?;
    let status = String::from_utf8_lossy(&out[..split])
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let body = out[split + 4..].to_vec();
    if status.starts_with("HTTP/1.1 200") {
        Ok(body)
    } else {
        Err(format!(
            "POST {path}: {status}: {}",
            String::from_utf8_lossy(&body).trim_end()
        ))
    }
}

fn describe(e: &ControlError) -> String {
    match e {
        ControlError::UnknownVnic(v) => format!("no vNIC {v:?} on this host"),
        ControlError::Refused(why) => why.clone(),
        ControlError::UnknownFlow => "no such connection".into(),
    }
}

/// What the state move in the guest's pause did.
struct Moved {
    connections: u64,
    bytes: u64,
    blake3: String,
    took: Duration,
}

fn report(order: &MigrationOrder, state: MigrationState) -> MigrationReport {
    MigrationReport {
        id: order.id.clone(),
        state,
        connections: None,
        state_bytes: None,
        state_blake3: None,
        switchover_us: None,
        reason: None,
    }
}

fn failed(order: &MigrationOrder, reason: String) -> MigrationReport {
    let mut r = report(order, MigrationState::Failed);
    // The controller bounds reasons; QEMU's and a peer's messages are input.
    r.reason = Some(
        reason
            .chars()
            .filter(|c| !c.is_control())
            .take(palisade_api::migration::MAX_MIGRATION_REASON)
            .collect(),
    );
    r
}

/// Carry out `order` as host `host` (see the module's documentation); the
/// report of its outcome, `completed` or `failed`.
pub fn carry_out(
    order: &MigrationOrder,
    host: &str,
    config: &MigrationConfig,
    control: &dyn Control,
) -> MigrationReport {
    if order.from != host {
        return failed(
            order,
            format!("the order's source is {}, not this host {host}", order.from),
        );
    }
    if order.vnics.is_empty() {
        return failed(order, "the VM has no vNIC".into());
    }
    let paths = (|| {
        Ok::<_, String>((
            MigrationConfig::fill(&config.qmp, &order.vm, &order.to)?,
            MigrationConfig::fill(&config.incoming, &order.vm, &order.to)?,
            MigrationConfig::fill(&config.peer_control, &order.vm, &order.to)?,
        ))
    })();
    let (qmp_path, incoming, peer) = match paths {
        Ok(p) => p,
        Err(e) => return failed(order, e),
    };
    for n in &order.vnics {
        // Names go into the control requests' paths.
        if n.is_empty() || n.len() > 255 || !n.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b'?') {
            return failed(order, format!("vNIC name {n:?} cannot go into a request"));
        }
    }
    let mut q = match Qmp::connect(Path::new(&qmp_path), Duration::from_secs(10)) {
        Ok(q) => q,
        Err(e) => return failed(order, format!("the VM's QMP socket {qmp_path}: {e}")),
    };
    // With the agent-to-agent channel: the state's pre-copy, while the guest runs.
    let mut handover = match crate::migrate::Handover::start(&order.to, &order.vnics, config, control) {
        Ok(h) => h,
        Err(e) => return failed(order, format!("state pre-copy to {}: {e}", order.to)),
    };
    if let Some(h) = &handover {
        eprintln!(
            "palisade agent: migration {}: pre-copy of {} connections staged on {} in {} us",
            order.id,
            h.staged,
            order.to,
            h.precopy.as_micros()
        );
    }
    let exported = std::cell::RefCell::new(Vec::new());
    let step = || -> Result<Moved, String> {
        let t = Instant::now();
        if let Some(h) = handover.as_mut() {
            let (connections, bytes, blake3) = h.switchover(&order.to, &exported)?;
            return Ok(Moved {
                connections,
                bytes,
                blake3,
                took: t.elapsed(),
            });
        }
        let mut blobs = Vec::with_capacity(order.vnics.len());
        for n in &order.vnics {
            let blob = control
                .export_vnic(n, Some(&order.to))
                .map_err(|e| format!("export of {n}: {}", describe(&e)))?;
            exported.borrow_mut().push(n.clone());
            blobs.push(blob);
        }
        let mut moved = 0u64;
        let mut hasher = blake3::Hasher::new();
        for (n, blob) in order.vnics.iter().zip(&blobs) {
            let answer = control_post(
                Path::new(&peer),
                &format!("/vnics/{n}/import?peer={host}"),
                blob,
                CONTROL_TIMEOUT,
            )
            .map_err(|e| format!("destination agent import: {e}"))?;
            let v: serde_json::Value =
                serde_json::from_slice(&answer).map_err(|e| format!("destination agent import answer: {e}"))?;
            moved += v
                .get("imported")
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| format!("destination agent import answer without a count: {v}"))?;
            hasher.update(blob);
        }
        Ok(Moved {
            connections: moved,
            bytes: blobs.iter().map(|b| b.len() as u64).sum(),
            blake3: hasher.finalize().to_hex().to_string(),
            took: t.elapsed(),
        })
    };
    match qmp::migrate(&mut q, &incoming, config.timeout(), step) {
        Ok((moved, _times)) => {
            // The guest runs on the destination: the source QEMU goes, and
            // this host drops the connections it no longer carries.
            let _ = q.execute("quit", None);
            let mut notes = Vec::new();
            for n in &order.vnics {
                if let Err(e) = control.release_vnic(n, Some(&order.to)) {
                    notes.push(format!("release of {n} here: {}", describe(&e)));
                }
            }
            if !notes.is_empty() {
                eprintln!("palisade agent: migration {}: {}", order.id, notes.join("; "));
            }
            let mut r = report(order, MigrationState::Completed);
            r.connections = Some(moved.connections);
            r.state_bytes = Some(moved.bytes);
            r.state_blake3 = Some(moved.blake3);
            r.switchover_us = Some(u64::try_from(moved.took.as_micros()).unwrap_or(u64::MAX));
            r
        }
        Err(e) => {
            // The guest stays here with its connections.
            let mut notes = Vec::new();
            for n in exported.borrow().iter() {
                if let Err(r) = control.resume_vnic(n, Some(&order.to)) {
                    notes.push(format!("resume of {n} failed: {}", describe(&r)));
                }
            }
            if let Ok(v) = q.execute("query-status", None)
                && v.get("status").and_then(serde_json::Value::as_str) != Some("running")
            {
                let _ = q.execute("cont", None);
            }
            let note = if notes.is_empty() {
                "cancelled; the guest runs on the source with its connections".to_string()
            } else {
                notes.join("; ")
            };
            failed(order, format!("{e} ({note})"))
        }
    }
}

/// Start the thread that takes this host's orders from the controller and
/// carries them out, one at a time.
pub fn watch(
    client: Client,
    host: String,
    config: MigrationConfig,
    control: Arc<dyn Control>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, AgentError> {
    std::thread::Builder::new()
        .name("palisade-migrate".into())
        .spawn(move || {
            let mut failing = false;
            while !stop.load(Ordering::Relaxed) {
                match client.migration_orders(&host) {
                    Ok(orders) => {
                        failing = false;
                        for order in orders {
                            take(&client, &host, &config, &*control, &order);
                        }
                    }
                    Err(e) => {
                        if !failing {
                            eprintln!("palisade agent: asking the controller for migration orders: {e}");
                        }
                        failing = true;
                    }
                }
                std::thread::sleep(config.poll());
            }
        })
        .map_err(|e| AgentError::Controller(format!("starting the migration thread: {e}")))
}

/// Take one order: claim it, carry it out, report the outcome (retried: the
/// controller must learn where the VM is).
fn take(client: &Client, host: &str, config: &MigrationConfig, control: &dyn Control, order: &MigrationOrder) {
    if let Err(e) = client.report_migration(host, &order.vm, &report(order, MigrationState::Running)) {
        // Taken by another run, over, or the controller is away: next poll.
        eprintln!("palisade agent: migration {}: not taken: {e}", order.id);
        return;
    }
    let outcome = carry_out(order, host, config, control);
    eprintln!(
        "palisade agent: migration {} of {} to {}: {}{}",
        order.id,
        order.vm,
        order.to,
        outcome.state.name(),
        outcome.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
    );
    for attempt in 0..20 {
        match client.report_migration(host, &order.vm, &outcome) {
            Ok(_) => return,
            Err(e) if attempt == 19 => {
                eprintln!("palisade agent: migration {}: outcome not reported: {e}", order.id);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;
    use std::sync::Mutex;

    /// Records what the order asked of this host's engines.
    #[derive(Default)]
    struct FakeControl {
        calls: Mutex<Vec<String>>,
    }

    impl Control for FakeControl {
        fn export_vnic(&self, vnic: &str, peer: Option<&str>) -> Result<Vec<u8>, ControlError> {
            self.calls.lock().unwrap().push(format!("export {vnic} {peer:?}"));
            Ok(b"state of the vNIC".to_vec())
        }
        fn import_vnic(&self, _: &str, _: &[u8], _: Option<&str>) -> Result<usize, ControlError> {
            unreachable!("the source never imports")
        }
        fn resume_vnic(&self, vnic: &str, _: Option<&str>) -> Result<(), ControlError> {
            self.calls.lock().unwrap().push(format!("resume {vnic}"));
            Ok(())
        }
        fn release_vnic(&self, vnic: &str, _: Option<&str>) -> Result<usize, ControlError> {
            self.calls.lock().unwrap().push(format!("release {vnic}"));
            Ok(3)
        }
    }

    /// A QEMU monitor that migrates: `pre-switchover` until `migrate-continue`,
    /// then `completed`; the commands it got.
    fn fake_qemu(path: &Path) -> (Arc<Mutex<Vec<String>>>, std::thread::JoinHandle<()>) {
        let listener = UnixListener::bind(path).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let seen = log.clone();
        let h = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            let mut continued = false;
            for line in BufReader::new(s).lines() {
                let Ok(line) = line else { return };
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                let cmd = v["execute"].as_str().unwrap().to_string();
                let answer = match cmd.as_str() {
                    "query-migrate" if continued => r#"{"return": {"status": "completed"}}"#,
                    "query-migrate" => r#"{"return": {"status": "pre-switchover"}}"#,
                    "query-status" => r#"{"return": {"status": "running"}}"#,
                    "migrate-continue" => {
                        continued = true;
                        r#"{"return": {}}"#
                    }
                    _ => r#"{"return": {}}"#,
                };
                seen.lock().unwrap().push(cmd);
                if w.write_all(format!("{answer}\n").as_bytes()).is_err() {
                    return;
                }
            }
        });
        (log, h)
    }

    /// A destination agent's control socket answering one import with `answer`.
    fn fake_peer(path: &Path, answer: &'static str) -> std::thread::JoinHandle<String> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut head = String::new();
            let mut len = 0;
            loop {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                if let Some(v) = line.strip_prefix("Content-Length: ") {
                    len = v.trim().parse().unwrap();
                }
                if line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            s.write_all(answer.as_bytes()).unwrap();
            head
        })
    }

    fn setup(dir: &Path) -> (MigrationConfig, MigrationOrder) {
        let config = MigrationConfig {
            qmp: dir.join("{vm}.qmp").display().to_string(),
            incoming: "unix:/nowhere/{vm}.incoming".into(),
            peer_control: dir.join("{to}.sock").display().to_string(),
            timeout_s: Some(10),
            poll_ms: None,
            listen: None,
            peers: Default::default(),
        };
        let order = MigrationOrder {
            id: "vm1@1".into(),
            vm: "vm1".into(),
            vnics: vec!["vm1.0".into()],
            from: "hv1".into(),
            to: "hv2".into(),
            requested_by: "ops".into(),
            requested_ns: 1,
            deadline_ns: u64::MAX,
            state: MigrationState::Running,
            started_ns: None,
            finished_ns: None,
            connections: None,
            state_bytes: None,
            state_blake3: None,
            switchover_us: None,
            reason: None,
        };
        (config, order)
    }

    #[test]
    fn an_order_migrates_with_the_state_moved_in_the_pause_and_the_source_released() {
        let dir = tempfile::tempdir().unwrap();
        let (config, order) = setup(dir.path());
        let (qemu, q) = fake_qemu(&dir.path().join("vm1.qmp"));
        let peer = fake_peer(
            &dir.path().join("hv2.sock"),
            "HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n{\"imported\":3}",
        );
        let control = FakeControl::default();
        let r = carry_out(&order, "hv1", &config, &control);
        assert_eq!(r.state, MigrationState::Completed, "{r:?}");
        assert_eq!(r.connections, Some(3));
        assert_eq!(r.state_bytes, Some(17));
        let hash = blake3::hash(b"state of the vNIC").to_hex().to_string();
        assert_eq!(r.state_blake3.as_deref(), Some(hash.as_str()));
        assert!(r.check().is_ok(), "the controller takes the report");
        assert!(peer.join().unwrap().starts_with("POST /vnics/vm1.0/import?peer=hv1 "));
        assert_eq!(
            *control.calls.lock().unwrap(),
            ["export vm1.0 Some(\"hv2\")", "release vm1.0"]
        );
        q.join().unwrap();
        let qemu = qemu.lock().unwrap().clone();
        let at = |c: &str| {
            qemu.iter()
                .position(|x| x == c)
                .unwrap_or_else(|| panic!("{c} in {qemu:?}"))
        };
        assert!(at("migrate") < at("migrate-continue") && at("migrate-continue") < at("quit"));
    }

    #[test]
    fn a_refused_import_cancels_and_the_source_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let (config, order) = setup(dir.path());
        let (qemu, q) = fake_qemu(&dir.path().join("vm1.qmp"));
        let peer = fake_peer(
            &dir.path().join("hv2.sock"),
            "HTTP/1.1 400 Bad Request\r\nContent-Length: 13\r\n\r\nblob refused\n",
        );
        let control = FakeControl::default();
        let r = carry_out(&order, "hv1", &config, &control);
        assert_eq!(r.state, MigrationState::Failed);
        let reason = r.reason.clone().unwrap();
        assert!(
            reason.contains("blob refused") && reason.contains("cancelled"),
            "{reason}"
        );
        assert!(r.check().is_ok(), "the controller takes the report");
        peer.join().unwrap();
        assert_eq!(
            *control.calls.lock().unwrap(),
            ["export vm1.0 Some(\"hv2\")", "resume vm1.0"]
        );
        drop(control);
        // The monitor sees the cancel, and no quit.
        let _ = q.join();
        let qemu = qemu.lock().unwrap().clone();
        assert!(qemu.contains(&"migrate_cancel".to_string()), "{qemu:?}");
        assert!(!qemu.contains(&"quit".to_string()), "{qemu:?}");
    }

    #[test]
    fn names_that_cannot_go_into_a_path_and_other_hosts_orders_are_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let (config, order) = setup(dir.path());
        let control = FakeControl::default();
        for (vm, to, from) in [
            ("../etc", "hv2", "hv1"),
            ("vm1", "hv2/..", "hv1"),
            (".x", "hv2", "hv1"),
            ("vm1", "hv2", "hv3"),
        ] {
            let o = MigrationOrder {
                vm: vm.into(),
                to: to.into(),
                from: from.into(),
                ..order.clone()
            };
            let r = carry_out(&o, "hv1", &config, &control);
            assert_eq!(r.state, MigrationState::Failed, "{vm} {to} {from}");
        }
        assert!(control.calls.lock().unwrap().is_empty());
    }
}
