//! The hypervisor drivers of the migrations the controller orders: one
//! trait, [`Driver`], with QEMU's monitor ([`QmpDriver`], the lab's) and
//! libvirt ([`Libvirt`], a host whose VMs libvirt runs) behind it, chosen
//! by the agent's `[migration] driver`.
//!
//! A driver moves the guest and calls the caller's `switchover` step once
//! the guest runs nowhere: the step moves the vNICs' firewall state, so the
//! guest's first packet on the destination meets its connections.
//!
//! - QMP: `migrate` with `pause-before-switchover`; the step runs in the
//!   source's `pre-switchover` pause, before any device state moved. A
//!   failed step cancels the migration: the guest never left.
//! - libvirt: `virsh migrate --live --p2p --suspend`: libvirt copies the
//!   guest and leaves it paused on the destination; the step runs then,
//!   and `virsh resume` on the destination starts it. libvirt has no
//!   pause-before-switchover, so a failed step means the guest is already
//!   on the destination, paused: the driver migrates it back (`virsh
//!   migrate` from the destination) and resumes it here, where its state
//!   still is; only if that fails too is the guest resumed on the
//!   destination (running without its connections beats not running), and
//!   the failure says so.
//!
//! `virsh` runs as a child process with its arguments passed as such (no
//! shell); names in them passed [`MigrationConfig::fill`]. Its output is
//! input: read bounded, only `error:` lines kept for a reason.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use palisade_api::migration::MigrationOrder;

use crate::config::{HypervisorKind, LibvirtConfig, MigrationConfig};
use crate::qmp::{self, Qmp};

/// Where a failed migration left the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestAt {
    /// Running on this host, its state here (the migration did not happen).
    Source,
    /// Running on the destination, without the state this host still holds.
    Destination,
}

/// A migration that did not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Why, in the hypervisor's words where it gave them.
    pub reason: String,
    /// Where the guest runs now.
    pub guest: GuestAt,
}

/// A hypervisor that can move one guest to the order's destination.
pub trait Driver {
    /// Move the guest, running `switchover` while it runs nowhere (see the
    /// module's documentation); after `Ok` it runs on the destination.
    fn migrate(&mut self, switchover: &mut dyn FnMut() -> Result<(), String>) -> Result<(), Failure>;
}

/// The driver `config` names, for `order`.
pub fn open(config: &MigrationConfig, order: &MigrationOrder) -> Result<Box<dyn Driver>, String> {
    match config.driver {
        HypervisorKind::Qmp => {
            let socket = MigrationConfig::fill(&config.qmp, &order.vm, &order.to)?;
            let incoming = MigrationConfig::fill(&config.incoming, &order.vm, &order.to)?;
            let q = Qmp::connect(Path::new(&socket), Duration::from_secs(10))
                .map_err(|e| format!("the VM's QMP socket {socket}: {e}"))?;
            Ok(Box::new(QmpDriver {
                q,
                incoming,
                timeout: config.timeout(),
            }))
        }
        HypervisorKind::Libvirt => {
            let l = config
                .libvirt
                .as_ref()
                .ok_or("driver = \"libvirt\" without a [migration.libvirt] section")?;
            Ok(Box::new(Libvirt::new(l, &order.vm, &order.to, config.timeout())?))
        }
    }
}

/// QEMU's monitor on the VM's socket (see the module's documentation).
pub struct QmpDriver {
    q: Qmp,
    incoming: String,
    timeout: Duration,
}

impl Driver for QmpDriver {
    fn migrate(&mut self, switchover: &mut dyn FnMut() -> Result<(), String>) -> Result<(), Failure> {
        match qmp::migrate(&mut self.q, &self.incoming, self.timeout, switchover) {
            Ok(_) => {
                // The guest runs on the destination: the source QEMU goes.
                let _ = self.q.execute("quit", None);
                Ok(())
            }
            Err(e) => {
                // A paused guest runs again here.
                if let Ok(v) = self.q.execute("query-status", None)
                    && v.get("status").and_then(serde_json::Value::as_str) != Some("running")
                {
                    let _ = self.q.execute("cont", None);
                }
                Err(Failure {
                    reason: e.to_string(),
                    guest: GuestAt::Source,
                })
            }
        }
    }
}

/// Largest output kept from one `virsh` run.
const MAX_OUTPUT: u64 = 64 << 10;

/// How long a `virsh` command other than the migration may take.
const VIRSH_TIMEOUT: Duration = Duration::from_secs(30);

/// libvirt through `virsh` (see the module's documentation).
#[derive(Debug, Clone)]
pub struct Libvirt {
    virsh: String,
    vm: String,
    uri: String,
    destination: String,
    migrate_uri: Option<String>,
    source: String,
    timeout: Duration,
}

/// What one `virsh` run gave.
#[derive(Debug)]
struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Libvirt {
    /// The driver for VM `vm` going to host `to`, with `config`'s templates filled.
    pub fn new(config: &LibvirtConfig, vm: &str, to: &str, timeout: Duration) -> Result<Libvirt, String> {
        let fill = |t: &str| MigrationConfig::fill(t, vm, to);
        let uri = fill(config.uri.as_deref().unwrap_or("qemu:///system"))?;
        Ok(Libvirt {
            virsh: fill(config.virsh.as_deref().unwrap_or("virsh"))?,
            vm: vm.to_string(),
            destination: fill(&config.destination_uri)?,
            migrate_uri: config.migrate_uri.as_deref().map(fill).transpose()?,
            source: match &config.source_uri {
                Some(s) => fill(s)?,
                None => uri.clone(),
            },
            uri,
            timeout,
        })
    }

    /// `virsh`'s arguments to move the guest from `from` to `to` and leave
    /// it paused there.
    fn migrate_args(&self, from: &str, to: &str, migrate_uri: Option<&str>) -> Vec<String> {
        let mut a: Vec<String> = [
            "-c",
            from,
            "migrate",
            "--live",
            "--p2p",
            "--suspend",
            "--persistent",
            "--undefinesource",
            "--domain",
            &self.vm,
            "--desturi",
            to,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(m) = migrate_uri {
            a.extend(["--migrateuri".to_string(), m.to_string()]);
        }
        a
    }

    fn args(&self, uri: &str, command: &str) -> Vec<String> {
        ["-c", uri, command, "--domain", &self.vm]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// Run `virsh args`, for at most `timeout` (then `on_timeout` is run and
    /// the child killed).
    fn run(&self, args: &[String], timeout: Duration, on_timeout: Option<&[String]>) -> Result<Ran, String> {
        let mut child = Command::new(&self.virsh)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("running {}: {e}", self.virsh))?;
        let out = child.stdout.take();
        let err = child.stderr.take();
        // Read both pipes on threads: a chatty child cannot block on a full pipe.
        let drain = |p: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut s = Vec::new();
                if let Some(p) = p {
                    let _ = p.take(MAX_OUTPUT).read_to_end(&mut s);
                }
                String::from_utf8_lossy(&s).into_owned()
            })
        };
        let out = drain(out.map(|p| Box::new(p) as Box<dyn Read + Send>));
        let err = drain(err.map(|p| Box::new(p) as Box<dyn Read + Send>));
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if started.elapsed() > timeout => {
                    if let Some(abort) = on_timeout {
                        let _ = self.run(abort, VIRSH_TIMEOUT, None);
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(format!("waiting for {}: {e}", self.virsh)),
            }
        };
        let stdout = out.join().unwrap_or_default();
        let stderr = err.join().unwrap_or_default();
        match status {
            None => Err(format!(
                "virsh {} did not finish within {:?}",
                args.get(2).map(String::as_str).unwrap_or(""),
                timeout
            )),
            Some(s) => Ok(Ran {
                ok: s.success(),
                stdout,
                stderr,
            }),
        }
    }

    /// Run `virsh args`; an error (with virsh's `error:` lines) unless it succeeded.
    fn must(&self, args: &[String], timeout: Duration, on_timeout: Option<&[String]>) -> Result<Ran, String> {
        let r = self.run(args, timeout, on_timeout)?;
        if r.ok {
            Ok(r)
        } else {
            Err(format!(
                "virsh {}: {}",
                args.get(2).map(String::as_str).unwrap_or(""),
                virsh_error(&r.stderr)
            ))
        }
    }

    /// Bring the guest, paused on the destination, back here and run it.
    fn bring_back(&self) -> Result<(), String> {
        let back = self.migrate_args(&self.destination, &self.source, None);
        let abort = self.args(&self.destination, "domjobabort");
        self.must(&back, self.timeout, Some(&abort))?;
        self.must(&self.args(&self.uri, "resume"), VIRSH_TIMEOUT, None)?;
        Ok(())
    }
}

/// The reason in `virsh`'s standard error: its `error:` lines, else its last line.
pub fn virsh_error(stderr: &str) -> String {
    let errors: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.trim().strip_prefix("error:"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let text = if errors.is_empty() {
        stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("failed without a message")
            .trim()
            .to_string()
    } else {
        errors.join("; ")
    };
    text.chars().filter(|c| !c.is_control()).take(1024).collect()
}

/// The state in `virsh domstate`'s answer (`running`, `paused`, `shut off`, …).
pub fn domain_state(stdout: &str) -> Option<&str> {
    let line = stdout.lines().map(str::trim).find(|l| !l.is_empty())?;
    // `--reason` adds " (why)".
    Some(line.split(" (").next().unwrap_or(line))
}

impl Driver for Libvirt {
    fn migrate(&mut self, switchover: &mut dyn FnMut() -> Result<(), String>) -> Result<(), Failure> {
        let at_source = |reason: String| Failure {
            reason,
            guest: GuestAt::Source,
        };
        let go = self.migrate_args(&self.uri, &self.destination, self.migrate_uri.as_deref());
        let abort = self.args(&self.uri, "domjobabort");
        // A failed or aborted `virsh migrate` leaves the guest running here.
        self.must(&go, self.timeout, Some(&abort)).map_err(at_source)?;
        let state = self
            .must(&self.args(&self.destination, "domstate"), VIRSH_TIMEOUT, None)
            .map(|r| domain_state(&r.stdout).unwrap_or("").to_string());
        let stepped = match state {
            Ok(s) if s == "paused" => switchover(),
            Ok(s) => Err(format!(
                "the guest is {s:?} on the destination, not paused: its state was not moved"
            )),
            Err(e) => Err(e),
        };
        let resume_there = || self.must(&self.args(&self.destination, "resume"), VIRSH_TIMEOUT, None);
        match stepped {
            Ok(()) => resume_there().map(|_| ()).map_err(|e| Failure {
                reason: format!("the state moved but the guest does not resume on the destination: {e}"),
                guest: GuestAt::Destination,
            }),
            Err(why) => match self.bring_back() {
                Ok(()) => Err(at_source(format!("{why}; the guest was migrated back and runs here"))),
                Err(back) => {
                    let resumed = resume_there();
                    Err(Failure {
                        reason: format!(
                            "{why}; bringing the guest back failed ({back}); {}",
                            match resumed {
                                Ok(_) => "it runs on the destination without its connections".to_string(),
                                Err(e) => format!("resuming it on the destination failed too ({e})"),
                            }
                        ),
                        guest: GuestAt::Destination,
                    })
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn config() -> LibvirtConfig {
        LibvirtConfig {
            virsh: None,
            uri: None,
            destination_uri: "qemu+tls://{to}/system".into(),
            migrate_uri: Some("tcp://{to}".into()),
            source_uri: Some("qemu+tls://hv1/system".into()),
        }
    }

    #[test]
    fn the_migration_is_live_peer_to_peer_and_leaves_the_guest_paused() {
        let l = Libvirt::new(&config(), "web-1", "hv2", Duration::from_secs(5)).unwrap();
        let go = l.migrate_args(&l.uri, &l.destination, l.migrate_uri.as_deref());
        assert_eq!(
            go.join(" "),
            "-c qemu:///system migrate --live --p2p --suspend --persistent --undefinesource \
             --domain web-1 --desturi qemu+tls://hv2/system --migrateuri tcp://hv2"
        );
        let back = l.migrate_args(&l.destination, &l.source, None);
        assert_eq!(
            back.join(" "),
            "-c qemu+tls://hv2/system migrate --live --p2p --suspend --persistent --undefinesource \
             --domain web-1 --desturi qemu+tls://hv1/system"
        );
        // Names that could leave a path are refused; a name is always the
        // value of --domain, never an option of its own.
        let l = Libvirt::new(&config(), "-x", "hv2", Duration::from_secs(5)).unwrap();
        let a = l.migrate_args(&l.uri, &l.destination, None);
        assert_eq!(a[a.iter().position(|x| x == "--domain").unwrap() + 1], "-x");
        assert!(Libvirt::new(&config(), "web-1", "hv2/../x", Duration::from_secs(5)).is_err());
    }

    #[test]
    fn virsh_answers_are_parsed() {
        assert_eq!(
            virsh_error(
                "error: operation failed: migration out job: unexpectedly failed\nerror: internal error: qemu unexpectedly closed the monitor\n"
            ),
            "operation failed: migration out job: unexpectedly failed; internal error: qemu unexpectedly closed the monitor"
        );
        assert_eq!(virsh_error("something odd\n\n"), "something odd");
        assert_eq!(virsh_error(""), "failed without a message");
        assert_eq!(virsh_error("error: a\u{1b}[2Jb"), "a[2Jb");
        assert_eq!(domain_state("paused\n\n"), Some("paused"));
        assert_eq!(domain_state("paused (migrating)\n"), Some("paused"));
        assert_eq!(domain_state("shut off\n"), Some("shut off"));
        assert_eq!(domain_state("\n"), None);
    }

    /// A `virsh` stand-in: logs its arguments, answers as `script` says.
    fn fake_virsh(dir: &Path, script: &str) -> (String, std::path::PathBuf) {
        let log = dir.join("virsh.log");
        let path = dir.join("virsh");
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\necho \"$*\" >> {}\ncase \"$*\" in\n{script}\nesac\nexit 0\n",
                log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        (path.display().to_string(), log)
    }

    fn commands(log: &Path) -> Vec<String> {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let w: Vec<&str> = l.split(' ').collect();
                format!("{} {}", w[1], w[2])
            })
            .collect()
    }

    fn driver(virsh: String) -> Libvirt {
        let mut c = config();
        c.virsh = Some(virsh);
        Libvirt::new(&c, "web-1", "hv2", Duration::from_secs(5)).unwrap()
    }

    #[test]
    fn a_migration_moves_the_state_while_the_guest_is_paused_on_the_destination() {
        let dir = tempfile::tempdir().unwrap();
        let (virsh, log) = fake_virsh(dir.path(), "*domstate*) echo paused ;;");
        let mut d = driver(virsh);
        let mut stepped = 0;
        d.migrate(&mut || {
            stepped += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(stepped, 1);
        assert_eq!(
            commands(&log),
            [
                "qemu:///system migrate",
                "qemu+tls://hv2/system domstate",
                "qemu+tls://hv2/system resume"
            ]
        );
    }

    #[test]
    fn a_refused_migration_leaves_the_guest_here_and_moves_no_state() {
        let dir = tempfile::tempdir().unwrap();
        let (virsh, log) = fake_virsh(
            dir.path(),
            "*migrate*) echo 'error: Failed to connect: no route to host' >&2; exit 1 ;;",
        );
        let mut d = driver(virsh);
        let e = d.migrate(&mut || panic!("no step without a migration")).unwrap_err();
        assert_eq!(e.guest, GuestAt::Source);
        assert!(e.reason.contains("no route to host"), "{}", e.reason);
        assert_eq!(commands(&log), ["qemu:///system migrate"]);
    }

    #[test]
    fn a_failed_state_move_brings_the_guest_back() {
        let dir = tempfile::tempdir().unwrap();
        let (virsh, log) = fake_virsh(dir.path(), "*domstate*) echo paused ;;");
        let mut d = driver(virsh);
        let e = d
            .migrate(&mut || Err("destination refused the blob".into()))
            .unwrap_err();
        assert_eq!(e.guest, GuestAt::Source);
        assert!(
            e.reason.contains("refused the blob") && e.reason.contains("migrated back"),
            "{}",
            e.reason
        );
        assert_eq!(
            commands(&log),
            [
                "qemu:///system migrate",
                "qemu+tls://hv2/system domstate",
                "qemu+tls://hv2/system migrate",
                "qemu:///system resume"
            ]
        );
        // Back with the source URI the destination's libvirtd reaches.
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("--desturi qemu+tls://hv1/system"), "{text}");
    }

    #[test]
    fn a_guest_that_cannot_come_back_runs_on_the_destination_and_the_failure_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let (virsh, _) = fake_virsh(
            dir.path(),
            "*domstate*) echo paused ;;\n*hv2/system\\ migrate*) echo 'error: source unreachable' >&2; exit 1 ;;",
        );
        let mut d = driver(virsh);
        let e = d.migrate(&mut || Err("import refused".into())).unwrap_err();
        assert_eq!(e.guest, GuestAt::Destination);
        assert!(
            e.reason.contains("source unreachable") && e.reason.contains("without its connections"),
            "{}",
            e.reason
        );
    }

    #[test]
    fn a_guest_running_on_the_destination_without_the_pause_is_not_stepped() {
        let dir = tempfile::tempdir().unwrap();
        let (virsh, _) = fake_virsh(dir.path(), "*domstate*) echo running ;;");
        let mut d = driver(virsh);
        let e = d.migrate(&mut || panic!("not paused: no step")).unwrap_err();
        assert!(e.reason.contains("\"running\""), "{}", e.reason);
    }

    #[test]
    fn a_migration_past_its_bound_is_aborted() {
        let dir = tempfile::tempdir().unwrap();
        let (virsh, log) = fake_virsh(dir.path(), "*\\ migrate\\ *) exec sleep 30 ;;");
        let mut c = config();
        c.virsh = Some(virsh);
        let mut d = Libvirt::new(&c, "web-1", "hv2", Duration::from_millis(300)).unwrap();
        let e = d.migrate(&mut || panic!("no step")).unwrap_err();
        assert_eq!(e.guest, GuestAt::Source);
        assert!(e.reason.contains("did not finish"), "{}", e.reason);
        assert!(commands(&log).contains(&"qemu:///system domjobabort".to_string()));
    }
}
