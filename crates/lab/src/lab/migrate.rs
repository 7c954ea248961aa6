//! Live migration of a lab QEMU guest to another host, its firewall state with it.
//!
//! The destination is pre-staged when the lab is built: its agent's
//! configuration lists the guest's vNIC ([`crate::Plan::add_standby`]), so the
//! vNIC's port, its tap and the VM's compiled rules are there before
//! anything moves. Guests on taps or on vhost-user (the destination agent
//! listens on a socket of its own for the vNIC; the agent's backend logs the
//! guest pages it writes while QEMU migrates, `VHOST_USER_PROTOCOL_F_LOG_SHMFD`).
//! [`Lab::migrate`] then:
//!
//! 1. starts the destination QEMU in the destination host's namespace with
//!    `-incoming unix:SOCKET` (a path both host namespaces reach: they share
//!    the file system), its vNIC on the destination host's tap (which that
//!    agent reads), and waits until it is ready to receive (the pre-staging
//!    time reported);
//! 2. migrates with QMP and `pause-before-switchover` ([`crate::qmp::migrate`]):
//!    RAM is copied while the guest runs; when the source pauses the guest,
//!    the switchover step asks the source agent to export the vNIC's
//!    connections (which quiesces its port there) and hands the blob to the
//!    destination agent's import (verified, all or nothing, port forwarding);
//!    only then does QEMU move the device state and start the guest there;
//! 3. quits the source QEMU and has the source agent drop the vNIC's
//!    connections (`release`); the source port stays quiesced: a straggler
//!    (a frame a remote host still sends to the old location) is dropped
//!    and counted in `palisade_vnic_migrating_drops_total`, until the remote
//!    host learns the new location from the guest's first frame from the
//!    destination (its agents learn MACs from the underlay) or from the
//!    guest's gratuitous ARP ([`MigrateOptions::announce`]).
//!
//! A failure at any step before the switchover completes (the destination
//! QEMU not starting, the export or import refused, the destination agent
//! gone) cancels the migration: the source agent resumes the vNIC with every
//! connection it had, the source QEMU keeps running the guest, and the
//! destination QEMU is stopped.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::json;

use super::Lab;
use crate::qmp::{self, Qmp};
use crate::{LabError, qemu, sys};

/// How a migration runs.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Bounds the whole migration (RAM copy under TCG included).
    pub timeout: Duration,
    /// Move the firewall state (export, import). Off only to measure the
    /// same migration without it (a benchmark's baseline): the destination
    /// then has no connections and the source's port is not quiesced.
    pub move_state: bool,
    /// After the switchover, have the guest send a gratuitous ARP (what a
    /// guest with virtio-net's `GUEST_ANNOUNCE` does when QEMU asks it to),
    /// so remote hosts learn where it is before it sends anything else.
    pub announce: bool,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            timeout: Duration::from_secs(120),
            move_state: true,
            announce: true,
        }
    }
}

/// What a migration did and took.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationReport {
    /// The VM.
    pub vm: String,
    /// Its host before.
    pub from: String,
    /// Its host now.
    pub to: String,
    /// Unix time (ms) the migration started and ended.
    pub started_unix_ms: u64,
    /// See `started_unix_ms`.
    pub finished_unix_ms: u64,
    /// Connections moved (imported on the destination).
    pub connections: usize,
    /// Size of the state blob(s), bytes.
    pub state_bytes: usize,
    /// BLAKE3 of the state blob(s) as moved (hex; of their concatenation
    /// when the VM has several vNICs). Empty when no state moved.
    pub state_blake3: String,
    /// Destination QEMU started until it waits for the migration, ms.
    pub prestage_ms: f64,
    /// The source agent's export (quiesce included), ms.
    pub export_ms: f64,
    /// The destination agent's import, ms.
    pub import_ms: f64,
    /// The switchover step (export + import), ms: the blackout the state
    /// move adds, the guest being paused throughout.
    pub switchover_ms: f64,
    /// Guest paused on the source until QEMU reported completion, ms.
    pub paused_ms: f64,
    /// QEMU's own downtime figure, ms (its vCPU pause).
    pub qemu_downtime_ms: Option<u64>,
    /// `migrate` to completion, ms.
    pub total_ms: f64,
    /// Whether the guest's gratuitous ARP was sent.
    pub announced: bool,
    /// Whether the source agent dropped the vNIC's connections after the
    /// switchover (they live on the destination now).
    pub released: bool,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub use palisade_agent::orders::control_post as agent_post;

/// How long one agent request may take (a 50,000-connection blob is a few MB).
const AGENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the destination QEMU may take to be ready for the migration.
const PRESTAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// A destination QEMU stopped unless defused (a failed migration).
#[derive(Debug)]
struct Destination {
    pid: i32,
    paths: Vec<PathBuf>,
    armed: bool,
}

impl Drop for Destination {
    fn drop(&mut self) {
        if self.armed {
            sys::terminate(&[self.pid], Duration::from_secs(2));
            for p in &self.paths {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

fn qmp_connect(socket: &Path, pid: i32, deadline: Instant) -> Result<Qmp, String> {
    loop {
        match Qmp::connect(socket, Duration::from_secs(10)) {
            Ok(q) => return Ok(q),
            Err(e) => {
                if !sys::pid_alive(pid) {
                    return Err("QEMU exited (see its log)".into());
                }
                if Instant::now() >= deadline {
                    return Err(format!("QMP {}: {e}", socket.display()));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The error of `vm`'s migration from `from` to `to`, for a reason.
fn migration_failed<'a>(vm: &'a str, from: &'a str, to: &'a str) -> impl Fn(String) -> LabError + 'a {
    move |reason| LabError::Migration {
        vm: vm.to_string(),
        from: from.to_string(),
        to: to.to_string(),
        reason,
    }
}

fn status(q: &mut Qmp) -> Result<String, String> {
    let v = q.execute("query-status", None).map_err(|e| e.to_string())?;
    Ok(v.get("status").and_then(|s| s.as_str()).unwrap_or("?").to_string())
}

impl Lab {
    /// The host a VM runs on now (a migrated guest's, else the plan's).
    pub fn current_host(&self, vm: &str) -> Result<String, LabError> {
        let plan = self.vm_plan(vm)?;
        Ok(self
            .state
            .guests
            .get(vm)
            .map(|g| g.host.clone())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| plan.host.clone()))
    }

    /// The Unix control socket of `host`'s agent.
    pub fn agent_socket(&self, host: &str) -> PathBuf {
        self.state.state_dir.join(host).join("agent.sock")
    }

    /// Live-migrate QEMU guest `vm` to host `to` with its firewall state
    /// (see the module documentation).
    pub fn migrate(&mut self, vm: &str, to: &str, opts: &MigrateOptions) -> Result<MigrationReport, LabError> {
        self.migrate_with(vm, to, opts, || {})
    }

    /// [`Lab::migrate`], running `between` in the switchover step after the
    /// source's export and before the destination's import (a test makes
    /// the destination fail there).
    pub fn migrate_with(
        &mut self,
        vm: &str,
        to: &str,
        opts: &MigrateOptions,
        between: impl FnOnce(),
    ) -> Result<MigrationReport, LabError> {
        let (plan, from, src) = self.migration_source(vm, to)?;
        let fail = migration_failed(vm, &from, to);
        for h in [&from, &to.to_string()] {
            if !self.state.agents.get(h).is_some_and(|a| sys::pid_alive(a.pid)) {
                return Err(fail(format!("no agent runs on {h}")));
            }
        }
        let (kernel, kver) = qemu::find_kernel().ok_or_else(|| fail("no guest kernel".into()))?;
        let initrd = qemu::build_initramfs(&self.state.state_dir.join("cache"), &kver)?;
        let mem = if src.mem_mib == 0 { 256 } else { src.mem_mib };
        let started_unix_ms = unix_ms();

        // 1. The destination QEMU, waiting for the migration.
        let generation = src.generation + 1;
        let channel = self
            .state
            .state_dir
            .join("qemu")
            .join(format!("{vm}.{generation}.migrate"));
        let uri = format!("unix:{}", channel.display());
        let t = Instant::now();
        let (dst, mut guard, mut dst_qmp) = self.spawn_incoming(
            &plan,
            to,
            generation,
            mem,
            (&kernel, &initrd, &src.accel),
            &channel,
            &fail,
        )?;
        let prestage = t.elapsed();

        // 2. The migration, the state moved while the guest is paused.
        let mut src_qmp = qmp_connect(&src.qmp, src.pid, Instant::now() + Duration::from_secs(10))
            .map_err(|e| fail(format!("source QEMU: {e}")))?;
        let (src_sock, dst_sock) = (self.agent_socket(&from), self.agent_socket(to));
        let vnics: Vec<String> = plan.vnics.iter().map(|n| n.name.clone()).collect();
        let exported = std::cell::Cell::new(false);
        let step = || -> Result<(usize, usize, String, Duration, Duration), String> {
            if !opts.move_state {
                between();
                return Ok((0, 0, String::new(), Duration::ZERO, Duration::ZERO));
            }
            let t = Instant::now();
            let mut blobs = Vec::new();
            let mut sections = Vec::new();
            for n in &vnics {
                exported.set(true);
                let blob = agent_post(&src_sock, &format!("/vnics/{n}/export?peer={to}"), b"", AGENT_TIMEOUT)
                    .map_err(|e| format!("source agent export: {e}"))?;
                blobs.push(blob);
                // Its inspected flows' state, final now the port is quiesced
                // (empty when the source inspects nothing; an agent that
                // predates the route has none to give).
                let section = match agent_post(
                    &src_sock,
                    &format!("/vnics/{n}/export-inspection?peer={to}"),
                    b"",
                    AGENT_TIMEOUT,
                ) {
                    Ok(s) => s,
                    Err(e) if e.contains("no action") => Vec::new(),
                    Err(e) => return Err(format!("source agent inspection export: {e}")),
                };
                sections.push(section);
            }
            let export = t.elapsed();
            between();
            let t = Instant::now();
            let mut moved = 0;
            let mut hasher = blake3::Hasher::new();
            for ((n, blob), section) in vnics.iter().zip(&blobs).zip(&sections) {
                // Held by the destination until the import below commits it.
                if !section.is_empty() {
                    agent_post(
                        &dst_sock,
                        &format!("/vnics/{n}/import-inspection?peer={from}"),
                        section,
                        AGENT_TIMEOUT,
                    )
                    .map_err(|e| format!("destination agent inspection import: {e}"))?;
                }
                let answer = agent_post(
                    &dst_sock,
                    &format!("/vnics/{n}/import?peer={from}"),
                    blob,
                    AGENT_TIMEOUT,
                )
                .map_err(|e| format!("destination agent import: {e}"))?;
                let v: serde_json::Value =
                    serde_json::from_slice(&answer).map_err(|e| format!("destination agent import answer: {e}"))?;
                moved += v
                    .get("imported")
                    .and_then(|i| i.as_u64())
                    .ok_or_else(|| format!("destination agent import answer without a count: {v}"))?
                    as usize;
                hasher.update(blob);
            }
            let bytes = blobs.iter().map(Vec::len).sum();
            Ok((
                moved,
                bytes,
                hasher.finalize().to_hex().to_string(),
                export,
                t.elapsed(),
            ))
        };
        let result = qmp::migrate(&mut src_qmp, &uri, opts.timeout, step);
        let ((connections, state_bytes, state_blake3, export, import), times) = match result {
            Ok(r) => r,
            Err(e) => {
                // The source keeps the guest: its agent forwards for the vNIC
                // again with every connection it had, and a guest QEMU left
                // paused runs again.
                let mut left = Vec::new();
                if exported.get() {
                    for n in &vnics {
                        if let Err(r) =
                            agent_post(&src_sock, &format!("/vnics/{n}/resume?peer={to}"), b"", AGENT_TIMEOUT)
                        {
                            left.push(format!("resume failed: {r}"));
                        }
                    }
                }
                if let Ok(s) = status(&mut src_qmp)
                    && s != "running"
                {
                    // migrate_cancel leaves it running; a failure after the
                    // switchover may not.
                    let _ = src_qmp.execute("cont", None);
                }
                drop(guard);
                let note = if left.is_empty() {
                    "cancelled; the guest runs on the source with its connections".to_string()
                } else {
                    left.join("; ")
                };
                return Err(fail(format!("{e} ({note})")));
            }
        };

        // 3. The guest runs on the destination; the source QEMU goes.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = status(&mut dst_qmp).map_err(|e| fail(format!("destination QEMU after the switchover: {e}")))?;
            if s == "running" {
                break;
            }
            if Instant::now() >= deadline {
                return Err(fail(format!("destination QEMU not running after the switchover ({s})")));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        guard.armed = false;
        let _ = src_qmp.execute("quit", None);
        // The source drops the connections it no longer carries (its port stays quiesced).
        let released = if opts.move_state {
            vnics
                .iter()
                .map(|n| agent_post(&src_sock, &format!("/vnics/{n}/release?peer={to}"), b"", AGENT_TIMEOUT))
                .collect::<Result<Vec<_>, _>>()
                .is_ok()
        } else {
            true
        };
        drop(src_qmp);
        sys::terminate(&[src.pid], Duration::from_secs(5));
        for c in &mut self.children {
            let _ = c.try_wait();
        }
        self.state.guests.insert(vm.to_string(), dst);
        self.consoles.lock().unwrap_or_else(|p| p.into_inner()).remove(vm);
        self.save()?;
        let _ = std::fs::remove_file(&channel);
        let announced = opts.announce && self.announce(&plan);
        drop(fail);
        Ok(MigrationReport {
            vm: vm.to_string(),
            from,
            to: to.to_string(),
            started_unix_ms,
            finished_unix_ms: unix_ms(),
            connections,
            state_bytes,
            state_blake3,
            prestage_ms: ms(prestage),
            export_ms: ms(export),
            import_ms: ms(import),
            switchover_ms: ms(times.switchover),
            paused_ms: ms(times.paused),
            qemu_downtime_ms: times.qemu_downtime_ms,
            total_ms: ms(times.total),
            announced,
            released,
        })
    }
}

/// A destination QEMU waiting with `-incoming` for a migration that the
/// source host's agent drives (ordered through the controller):
/// [`Lab::prestage_incoming`], then [`Lab::adopt_incoming`] once the order
/// completed. Dropped without adoption (the order failed), it is stopped.
#[derive(Debug)]
pub struct Incoming {
    vm: String,
    guest: super::QemuProc,
    channel: PathBuf,
    guard: Destination,
    /// Destination QEMU started until it waits for the migration, ms.
    pub prestage_ms: f64,
}

impl Lab {
    /// The guest's gratuitous ARP from its first IPv4 address (what a guest
    /// with virtio-net's `GUEST_ANNOUNCE` does after a migration); whether
    /// it was sent.
    fn announce(&self, plan: &crate::plan::VmPlan) -> bool {
        plan.vnics
            .first()
            .and_then(|n| super::ipv4s(&n.ips).next().map(|ip| (n.guest_if.clone(), ip)))
            .is_some_and(|(ifname, ip)| {
                let ip = ip.to_string();
                self.exec(
                    &plan.name,
                    &["arping", "-U", "-c", "1", "-w", "1", "-I", &ifname, &ip],
                    Duration::from_secs(10),
                )
                .is_ok()
            })
    }

    /// What a migration of `vm` to `to` starts from, checked before
    /// anything starts: the VM's plan, the host it runs on and its running
    /// QEMU. `to` must be a host of the lab, another than the VM's, where
    /// its vNIC is pre-staged.
    fn migration_source(&self, vm: &str, to: &str) -> Result<(crate::plan::VmPlan, String, super::QemuProc), LabError> {
        let plan = self.vm_plan(vm)?.clone();
        let from = self.current_host(vm)?;
        let fail = migration_failed(vm, &from, to);
        if self.state.plan.host(to).is_none() {
            return Err(LabError::Unknown {
                kind: "host",
                name: to.to_string(),
            });
        }
        let src = self
            .state
            .guests
            .get(vm)
            .cloned()
            .ok_or_else(|| fail("not a running QEMU guest".into()))?;
        if from == to {
            return Err(fail("it runs there already".into()));
        }
        if plan.host != to && !plan.standby.iter().any(|h| h == to) {
            return Err(fail(format!(
                "its vNIC is not pre-staged on {to} (build the lab with `--standby {vm}@{to}`)"
            )));
        }
        drop(fail);
        Ok((plan, from, src))
    }

    /// Start the destination QEMU of `plan`'s VM on `to` with `-incoming`
    /// on the Unix socket `channel`, and wait until it waits for the
    /// migration there: the guest, a guard that stops it unless defused,
    /// and its QMP connection.
    #[allow(clippy::too_many_arguments)]
    fn spawn_incoming(
        &mut self,
        plan: &crate::plan::VmPlan,
        to: &str,
        generation: u32,
        mem: u32,
        boot: (&Path, &Path, &[String]),
        channel: &Path,
        fail: &dyn Fn(String) -> LabError,
    ) -> Result<(super::QemuProc, Destination, Qmp), LabError> {
        let _ = std::fs::remove_file(channel);
        let uri = format!("unix:{}", channel.display());
        let guest = self.spawn_guest(plan, to, generation, mem, Some(&uri), boot)?;
        let guard = Destination {
            pid: guest.pid,
            paths: vec![
                guest.console.clone(),
                guest.monitor.clone(),
                guest.qmp.clone(),
                channel.to_path_buf(),
            ],
            armed: true,
        };
        let deadline = Instant::now() + PRESTAGE_TIMEOUT;
        let mut q = qmp_connect(&guest.qmp, guest.pid, deadline).map_err(|e| fail(format!("destination QEMU: {e}")))?;
        loop {
            let s = status(&mut q).map_err(|e| fail(format!("destination QEMU: {e}")))?;
            if s == "inmigrate" && channel.exists() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(fail(format!("destination QEMU not ready (status {s})")));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok((guest, guard, q))
    }

    /// Start `vm`'s destination QEMU on `to` with `-incoming` on
    /// [`crate::config::incoming_socket`] (where `[migration] incoming` of
    /// the lab's agents points), and wait until it is ready: what libvirt
    /// does on the destination of `virsh migrate`. The source agent then
    /// drives the migration when the controller orders it.
    pub fn prestage_incoming(&mut self, vm: &str, to: &str) -> Result<Incoming, LabError> {
        let (plan, from, src) = self.migration_source(vm, to)?;
        let fail = migration_failed(vm, &from, to);
        let (kernel, kver) = qemu::find_kernel().ok_or_else(|| fail("no guest kernel".into()))?;
        let initrd = qemu::build_initramfs(&self.state.state_dir.join("cache"), &kver)?;
        let mem = if src.mem_mib == 0 { 256 } else { src.mem_mib };
        let channel = crate::config::incoming_socket(&self.state.state_dir, vm, to);
        let t = Instant::now();
        let (guest, guard, _) = self.spawn_incoming(
            &plan,
            to,
            src.generation + 1,
            mem,
            (&kernel, &initrd, &src.accel),
            &channel,
            &fail,
        )?;
        Ok(Incoming {
            vm: vm.to_string(),
            guest,
            channel,
            guard,
            prestage_ms: ms(t.elapsed()),
        })
    }

    /// After the source agent reported the migration completed: the
    /// destination QEMU runs the guest (checked), the source QEMU (which
    /// the agent told to quit) is gone, and the lab's state says where the
    /// guest is. The guest then announces itself (gratuitous ARP); whether
    /// it did is returned.
    pub fn adopt_incoming(&mut self, mut inc: Incoming) -> Result<bool, LabError> {
        let vm = inc.vm.clone();
        let plan = self.vm_plan(&vm)?.clone();
        let from = self.current_host(&vm)?;
        let fail = migration_failed(&vm, &from, &inc.guest.host);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut q =
            qmp_connect(&inc.guest.qmp, inc.guest.pid, deadline).map_err(|e| fail(format!("destination QEMU: {e}")))?;
        loop {
            let s = status(&mut q).map_err(|e| fail(format!("destination QEMU: {e}")))?;
            if s == "running" {
                break;
            }
            if Instant::now() >= deadline {
                return Err(fail(format!("destination QEMU not running ({s})")));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(q);
        inc.guard.armed = false;
        if let Some(src) = self.state.guests.get(&vm) {
            sys::terminate(&[src.pid], Duration::from_secs(5));
        }
        for c in &mut self.children {
            let _ = c.try_wait();
        }
        self.state.guests.insert(vm.clone(), inc.guest.clone());
        self.consoles.lock().unwrap_or_else(|p| p.into_inner()).remove(&vm);
        self.save()?;
        let _ = std::fs::remove_file(&inc.channel);
        Ok(self.announce(&plan))
    }
}

impl Lab {
    /// Migrate `vm` to `to` as a deployment does: the destination QEMU
    /// pre-staged ([`Lab::prestage_incoming`]), the migration ordered
    /// through the controller (`palisade migrate`, the lab built with a
    /// controller), the source host's agent carrying it out (QMP, and the
    /// state over the agents' mutual-TLS channel: a pre-copy while the guest
    /// runs, the delta in its pause), then adopted here. The report's
    /// `switchover_ms` is the agent's state move inside the guest's pause
    /// (the blackout the firewall adds); the pause itself and QEMU's
    /// downtime are not seen from here (`paused_ms` NaN, no downtime), nor
    /// the export and import apart (NaN).
    pub fn migrate_ordered(&mut self, vm: &str, to: &str, timeout: Duration) -> Result<MigrationReport, LabError> {
        let from = self.current_host(vm)?;
        let fail = migration_failed(vm, &from, to);
        let started_unix_ms = unix_ms();
        let t = Instant::now();
        let incoming = self.prestage_incoming(vm, to)?;
        let secs = timeout.as_secs().max(1).to_string();
        let out = self.ctl(&["migrate", vm, "--to", to, "--json", "--timeout", &secs])?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let order: serde_json::Value = stdout
            .trim()
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .ok_or_else(|| {
                fail(format!(
                    "palisade migrate: {}{}",
                    stdout.trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            })?;
        if order["state"] != "completed" {
            return Err(fail(format!("the order ended {}: {}", order["state"], order["reason"])));
        }
        let prestage_ms = incoming.prestage_ms;
        drop(fail);
        let announced = self.adopt_incoming(incoming)?;
        let n = |k: &str| order[k].as_u64().unwrap_or(0);
        Ok(MigrationReport {
            vm: vm.to_string(),
            from,
            to: to.to_string(),
            started_unix_ms,
            finished_unix_ms: unix_ms(),
            connections: n("connections") as usize,
            state_bytes: n("state_bytes") as usize,
            state_blake3: order["state_blake3"].as_str().unwrap_or_default().to_string(),
            prestage_ms,
            export_ms: f64::NAN,
            import_ms: f64::NAN,
            switchover_ms: n("switchover_us") as f64 / 1e3,
            paused_ms: f64::NAN,
            qemu_downtime_ms: None,
            total_ms: ms(t.elapsed()),
            announced,
            released: true,
        })
    }
}

impl MigrationReport {
    /// The report as one JSON line.
    pub fn to_json(&self) -> String {
        json!(self).to_string()
    }
}
