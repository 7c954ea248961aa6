//! Live migrations the controller orders, carried out by the source host's agent.
//!
//! The controller reaches no agent; agents pull. A thread asks the
//! controller every `poll` for this host's orders
//! (`GET /v1/agents/{host}/migrations`). For one whose destination is this
//! host it pre-stages: it tells the controller whether every vNIC of the VM
//! is attached here with its rules ([`stage`]); only then is the order
//! handed to the source. For one whose source is this host:
//!
//! 1. reports it `running` (the controller then hands it to no one else);
//! 2. drives the hypervisor with the configured driver
//!    ([`crate::hypervisor`]): QMP on the VM's monitor socket, `migrate` to
//!    the destination QEMU's `-incoming` URI with `pause-before-switchover`;
//!    or libvirt, `virsh migrate --live --p2p --suspend`, the guest left
//!    paused on the destination until its state is there;
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
//! A `follow` order (a migration the hypervisor made without the
//! controller, detected on the destination) skips the hypervisor: steps 3
//! and 4 only, the guest already running on the destination. The claim is
//! another agent's, so it is checked first: a guest still sending on its
//! vNIC here has not left, and the order fails with its state kept here.
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
use palisade_api::migration::{MigrationKind, MigrationOrder, MigrationReport, MigrationState, StagedReport};

use crate::config::MigrationConfig;
use crate::error::AgentError;
use crate::http::{Control, ControlError};
use crate::hypervisor::{self, GuestAt};

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

/// How long a `follow` order watches the vNICs for frames from a guest
/// that has not left before taking their state.
pub const FOLLOW_LIVENESS_WINDOW: Duration = Duration::from_millis(200);

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
    let peer = match MigrationConfig::fill(&config.peer_control, &order.vm, &order.to) {
        Ok(p) => p,
        Err(e) => return failed(order, e),
    };
    for n in &order.vnics {
        // Names go into the control requests' paths.
        if n.is_empty() || n.len() > 255 || !n.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b'?') {
            return failed(order, format!("vNIC name {n:?} cannot go into a request"));
        }
    }
    if order.kind == MigrationKind::Follow {
        return follow(order, host, config, control, &peer);
    }
    let mut driver = match hypervisor::open(config, order) {
        Ok(d) => d,
        Err(e) => return failed(order, e),
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
    let mut step = || -> Result<Moved, String> {
        match handover.as_mut() {
            Some(h) => switchover(h, order, &exported),
            None => move_state(order, host, control, &peer, &exported),
        }
    };
    let mut moved = None;
    let outcome = driver.migrate(&mut || {
        moved = Some(step()?);
        Ok(())
    });
    if let Some(h) = &handover {
        for p in &h.phases {
            eprintln!("palisade agent: migration {}: {p}", order.id);
        }
    }
    match (outcome, moved) {
        (Ok(()), Some(moved)) => {
            // The guest runs on the destination: this host drops the
            // connections it no longer carries.
            release(order, control);
            completed(order, moved)
        }
        (Ok(()), None) => failed(order, "the driver finished without the state move".into()),
        (Err(f), _) if f.guest == GuestAt::Destination => {
            // Its state stays here (exported, quiesced) for an operator to act on.
            failed(order, f.reason)
        }
        (Err(f), _) => {
            // The guest stays here with its connections.
            let mut notes = Vec::new();
            for n in exported.borrow().iter() {
                if let Err(r) = control.resume_vnic(n, Some(&order.to)) {
                    notes.push(format!("resume of {n} failed: {}", describe(&r)));
                }
            }
            let note = if notes.is_empty() {
                "cancelled; the guest runs on the source with its connections".to_string()
            } else {
                notes.join("; ")
            };
            failed(order, format!("{} ({note})", f.reason))
        }
    }
}

/// A `follow` order: the hypervisor moved the guest already (the
/// destination saw it announce itself), so only its vNICs' state moves,
/// along the same path as in a migration's pause, and is released here.
/// On a failure the exported vNICs resume here: the state is kept, not lost.
fn follow(
    order: &MigrationOrder,
    host: &str,
    config: &MigrationConfig,
    control: &dyn Control,
    peer: &str,
) -> MigrationReport {
    // The claim comes from another host's agent: a guest still sending here
    // has not left, and its state stays (a compromised or confused agent
    // cannot pull a running VM's connections to itself).
    let before: Vec<Option<u64>> = order.vnics.iter().map(|n| control.vnic_received(n)).collect();
    std::thread::sleep(FOLLOW_LIVENESS_WINDOW);
    for (n, b) in order.vnics.iter().zip(before) {
        if let (Some(b), Some(a)) = (b, control.vnic_received(n))
            && a > b
        {
            return failed(
                order,
                format!(
                    "the guest still sends on {n} here ({} frames in {FOLLOW_LIVENESS_WINDOW:?}): its state stays on this host",
                    a - b
                ),
            );
        }
    }
    let exported = std::cell::RefCell::new(Vec::new());
    // Over the agents' channel when it is configured (a copy, then the
    // delta at once: the guest already runs there), else whole.
    let moved = match crate::migrate::Handover::start(&order.to, &order.vnics, config, control) {
        Ok(Some(mut h)) => switchover(&mut h, order, &exported),
        Ok(None) => move_state(order, host, control, peer, &exported),
        Err(e) => Err(format!("state pre-copy to {}: {e}", order.to)),
    };
    match moved {
        Ok(moved) => {
            release(order, control);
            completed(order, moved)
        }
        Err(e) => {
            for n in exported.borrow().iter() {
                let _ = control.resume_vnic(n, Some(&order.to));
            }
            failed(order, format!("{e} (the state stays on this host)"))
        }
    }
}

/// The pause's state move over the agents' channel: the deltas after the
/// handover's pre-copy, timed as [`move_state`] is.
fn switchover(
    h: &mut crate::migrate::Handover<'_>,
    order: &MigrationOrder,
    exported: &std::cell::RefCell<Vec<String>>,
) -> Result<Moved, String> {
    let t = Instant::now();
    let (connections, bytes, blake3) = h.switchover(&order.to, exported)?;
    Ok(Moved {
        connections,
        bytes,
        blake3,
        took: t.elapsed(),
    })
}

/// Drop the connections of the order's vNICs here (the port stays quiesced
/// for stragglers).
fn release(order: &MigrationOrder, control: &dyn Control) {
    let mut notes = Vec::new();
    for n in &order.vnics {
        if let Err(e) = control.release_vnic(n, Some(&order.to)) {
            notes.push(format!("release of {n} here: {}", describe(&e)));
        }
    }
    if !notes.is_empty() {
        eprintln!("palisade agent: migration {}: {}", order.id, notes.join("; "));
    }
}

fn completed(order: &MigrationOrder, moved: Moved) -> MigrationReport {
    let mut r = report(order, MigrationState::Completed);
    r.connections = Some(moved.connections);
    r.state_bytes = Some(moved.bytes);
    r.state_blake3 = Some(moved.blake3);
    r.switchover_us = Some(u64::try_from(moved.took.as_micros()).unwrap_or(u64::MAX));
    r
}

/// Move the state of the order's vNICs from this host's engines to the
/// destination agent (`peer`, its control socket), recording each vNIC
/// exported in `exported` (resumed by the caller on a failure).
fn move_state(
    order: &MigrationOrder,
    host: &str,
    control: &dyn Control,
    peer: &str,
    exported: &std::cell::RefCell<Vec<String>>,
) -> Result<Moved, String> {
    let t = Instant::now();
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
        // The port is quiesced: its inspected flows' state is final. The
        // destination holds it until the import below commits it (a
        // refused import drops it there).
        let inspection = control
            .export_inspection(n, Some(&order.to))
            .map_err(|e| format!("inspection state of {n}: {}", describe(&e)))?;
        if !inspection.is_empty() {
            control_post(
                Path::new(peer),
                &format!("/vnics/{n}/import-inspection?peer={host}"),
                &inspection,
                CONTROL_TIMEOUT,
            )
            .map_err(|e| format!("destination agent inspection import: {e}"))?;
        }
        let answer = control_post(
            Path::new(peer),
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
}

/// Whether this host, the destination of `order`, is ready for its VM:
/// every vNIC of the VM attached here (its port open and its chains
/// compiled with the policy this agent runs), so the guest's first packet
/// here meets its rules, never the default.
pub fn stage(order: &MigrationOrder, control: &dyn Control) -> StagedReport {
    let missing: Vec<&str> = order
        .vnics
        .iter()
        .filter(|n| !control.has_vnic(n))
        .map(String::as_str)
        .collect();
    StagedReport {
        id: order.id.clone(),
        ready: missing.is_empty(),
        reason: (!missing.is_empty()).then(|| {
            let mut why = format!("vNIC(s) {} not attached on this host", missing.join(", "));
            why.truncate(palisade_api::migration::MAX_MIGRATION_REASON);
            why
        }),
    }
}

/// Start the thread that takes this host's orders from the controller and
/// carries them out, one at a time (and pre-stages those to this host).
pub fn watch(
    client: Client,
    host: String,
    config: Option<MigrationConfig>,
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
                            if order.to == host && order.from != host {
                                // This host is the destination: pre-stage.
                                let r = stage(&order, &*control);
                                if let Err(e) = client.report_staged(&host, &order.vm, &r) {
                                    eprintln!("palisade agent: migration {}: staging not reported: {e}", order.id);
                                }
                            } else {
                                take(&client, &host, config.as_ref(), &*control, &order);
                            }
                        }
                    }
                    Err(e) => {
                        if !failing {
                            eprintln!("palisade agent: asking the controller for migration orders: {e}");
                        }
                        failing = true;
                    }
                }
                std::thread::sleep(
                    config
                        .as_ref()
                        .map_or(Duration::from_millis(500), MigrationConfig::poll),
                );
            }
        })
        .map_err(|e| AgentError::Controller(format!("starting the migration thread: {e}")))
}

/// Take one order: claim it, carry it out, report the outcome (retried: the
/// controller must learn where the VM is).
fn take(client: &Client, host: &str, config: Option<&MigrationConfig>, control: &dyn Control, order: &MigrationOrder) {
    if let Err(e) = client.report_migration(host, &order.vm, &report(order, MigrationState::Running)) {
        // Taken by another run, over, or the controller is away: next poll.
        eprintln!("palisade agent: migration {}: not taken: {e}", order.id);
        return;
    }
    let outcome = match config {
        Some(c) => carry_out(order, host, c, control),
        None => failed(
            order,
            format!(
                "{host}'s agent has no [migration] section: it cannot drive its hypervisor or reach the destination agent"
            ),
        ),
    };
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
        attached: Vec<String>,
        /// Frames from the guest: grows at each look when `live`.
        received: std::sync::atomic::AtomicU64,
        live: bool,
        /// What `export_inspection` gives (empty: nothing here inspects).
        inspection: Vec<u8>,
    }

    impl Control for FakeControl {
        fn has_vnic(&self, vnic: &str) -> bool {
            self.attached.iter().any(|v| v == vnic)
        }
        fn vnic_received(&self, _: &str) -> Option<u64> {
            let step = u64::from(self.live);
            Some(self.received.fetch_add(step, std::sync::atomic::Ordering::Relaxed) + step)
        }
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
        fn export_inspection(&self, vnic: &str, _: Option<&str>) -> Result<Vec<u8>, ControlError> {
            if !self.inspection.is_empty() {
                self.calls.lock().unwrap().push(format!("inspection {vnic}"));
            }
            Ok(self.inspection.clone())
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
        std::thread::spawn(move || answer_one(&listener, answer).0)
    }

    /// Accept one request on `listener`, answer it with `answer`; its head
    /// (up to the blank line) and body.
    fn answer_one(listener: &UnixListener, answer: &str) -> (String, Vec<u8>) {
        let (mut s, _) = listener.accept().unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let (mut head, mut len) = (String::new(), 0);
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
        (head, body)
    }

    /// A destination agent's control socket answering one request per
    /// answer, in turn; each request's head and body.
    fn fake_peer_requests(path: &Path, answers: Vec<&'static str>) -> std::thread::JoinHandle<Vec<(String, Vec<u8>)>> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            for answer in answers {
                seen.push(answer_one(&listener, answer));
            }
            seen
        })
    }

    /// Without the agents' channel the inspection section goes through the
    /// destination's control socket too, after the export (the port
    /// quiesced: its state final) and before the import that commits it;
    /// a destination refusing it fails the migration and the source resumes.
    #[test]
    fn the_control_socket_path_carries_the_inspection_section_before_the_import() {
        let dir = tempfile::tempdir().unwrap();
        let (config, order) = setup(dir.path());
        let (_qemu, q) = fake_qemu(&dir.path().join("vm1.qmp"));
        let peer = fake_peer_requests(
            &dir.path().join("hv2.sock"),
            vec![
                "HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n{\"inspected_flows\":2}",
                "HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n{\"imported\":3}",
            ],
        );
        let control = FakeControl {
            inspection: b"inspection section".to_vec(),
            ..FakeControl::default()
        };
        let r = carry_out(&order, "hv1", &config, &control);
        assert_eq!(r.state, MigrationState::Completed, "{r:?}");
        let seen = peer.join().unwrap();
        assert!(
            seen[0].0.starts_with("POST /vnics/vm1.0/import-inspection?peer=hv1 "),
            "{seen:?}"
        );
        assert_eq!(seen[0].1, b"inspection section");
        assert!(seen[1].0.starts_with("POST /vnics/vm1.0/import?peer=hv1 "), "{seen:?}");
        assert_eq!(
            *control.calls.lock().unwrap(),
            ["export vm1.0 Some(\"hv2\")", "inspection vm1.0", "release vm1.0"]
        );
        q.join().unwrap();

        let dir = tempfile::tempdir().unwrap();
        let (config, order) = setup(dir.path());
        let (_qemu, q) = fake_qemu(&dir.path().join("vm1.qmp"));
        let peer = fake_peer_requests(
            &dir.path().join("hv2.sock"),
            vec!["HTTP/1.1 400 Bad Request\r\nContent-Length: 36\r\n\r\ninspection section checksum mismatch"],
        );
        let control = FakeControl {
            inspection: b"inspection section".to_vec(),
            ..FakeControl::default()
        };
        let r = carry_out(&order, "hv1", &config, &control);
        assert_eq!(r.state, MigrationState::Failed, "{r:?}");
        let reason = r.reason.clone().unwrap_or_default();
        assert!(
            reason.contains("inspection import") && reason.contains("checksum"),
            "{reason}"
        );
        assert_eq!(peer.join().unwrap().len(), 1, "no import after a refused section");
        assert_eq!(
            *control.calls.lock().unwrap(),
            ["export vm1.0 Some(\"hv2\")", "inspection vm1.0", "resume vm1.0"]
        );
        q.join().unwrap();
    }

    fn setup(dir: &Path) -> (MigrationConfig, MigrationOrder) {
        let config = MigrationConfig {
            driver: Default::default(),
            libvirt: None,
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
            kind: MigrationKind::Ordered,
            from: "hv1".into(),
            to: "hv2".into(),
            requested_by: "ops".into(),
            requested_ns: 1,
            deadline_ns: u64::MAX,
            staged_ns: Some(1),
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
    fn a_destination_is_staged_only_with_every_vnic_attached() {
        let dir = tempfile::tempdir().unwrap();
        let (_, order) = setup(dir.path());
        let order = MigrationOrder {
            vnics: vec!["vm1.0".into(), "vm1.1".into()],
            ..order
        };
        let r = stage(&order, &FakeControl::default());
        assert!(!r.ready);
        assert_eq!(
            r.reason.as_deref(),
            Some("vNIC(s) vm1.0, vm1.1 not attached on this host")
        );
        let attached = FakeControl {
            attached: vec!["vm1.0".into(), "vm1.1".into()],
            ..FakeControl::default()
        };
        let r = stage(&order, &attached);
        assert!(r.ready && r.reason.is_none(), "{r:?}");
        assert!(r.check().is_ok());
    }

    #[test]
    fn a_follow_order_moves_the_state_without_the_hypervisor_and_releases_it() {
        let dir = tempfile::tempdir().unwrap();
        let (config, order) = setup(dir.path());
        let order = MigrationOrder {
            kind: MigrationKind::Follow,
            ..order
        };
        // No QMP socket: a follow order never reaches the hypervisor.
        let peer = fake_peer(
            &dir.path().join("hv2.sock"),
            "HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n{\"imported\":3}",
        );
        let control = FakeControl::default();
        let r = carry_out(&order, "hv1", &config, &control);
        assert_eq!(r.state, MigrationState::Completed, "{r:?}");
        assert_eq!(r.connections, Some(3));
        assert!(peer.join().unwrap().starts_with("POST /vnics/vm1.0/import?peer=hv1 "));
        assert_eq!(
            *control.calls.lock().unwrap(),
            ["export vm1.0 Some(\"hv2\")", "release vm1.0"]
        );

        // A guest that still sends here has not left: nothing is exported.
        let live = FakeControl {
            live: true,
            ..FakeControl::default()
        };
        let r = carry_out(&order, "hv1", &config, &live);
        assert_eq!(r.state, MigrationState::Failed);
        assert!(r.reason.as_deref().unwrap().contains("still sends"), "{r:?}");
        assert!(live.calls.lock().unwrap().is_empty());

        // Refused by the destination: the state stays here, resumed.
        std::fs::remove_file(dir.path().join("hv2.sock")).unwrap();
        let control = FakeControl::default();
        let peer = fake_peer(
            &dir.path().join("hv2.sock"),
            "HTTP/1.1 400 Bad Request\r\nContent-Length: 13\r\n\r\nblob refused\n",
        );
        let r = carry_out(&order, "hv1", &config, &control);
        assert_eq!(r.state, MigrationState::Failed);
        assert!(r.reason.as_deref().unwrap().contains("stays on this host"), "{r:?}");
        peer.join().unwrap();
        assert_eq!(
            *control.calls.lock().unwrap(),
            ["export vm1.0 Some(\"hv2\")", "resume vm1.0"]
        );
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
