//! A small QMP client (QEMU's JSON monitor protocol over a Unix socket) and
//! a live migration driven with it: the hypervisor driver of the migrations
//! the controller orders ([`crate::orders`]), and the lab's.
//!
//! [`Qmp::connect`] reads QEMU's greeting and leaves it in command mode;
//! [`Qmp::execute`] sends one command and returns its `return` value (events
//! arriving in between are kept in [`Qmp::events`]). [`migrate`] runs a
//! migration with `pause-before-switchover`: when the source reaches
//! `pre-switchover` its guest is paused and no device state has moved yet,
//! so the caller's `switchover` step (moving the vNIC's firewall state from
//! the source agent to the destination's) runs while nothing can send, and
//! only then does QEMU finish. QEMU is a separate process and its answers
//! are input: lines are bounded, every wait has a deadline.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Longest line accepted from QEMU (its answers here are a few hundred bytes).
const MAX_LINE: u64 = 1 << 20;

/// Why a QMP exchange or a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached, read or written.
    #[error("QMP socket: {0}")]
    Io(#[from] std::io::Error),
    /// QEMU said something that is not QMP.
    #[error("QMP protocol: {0}")]
    Protocol(String),
    /// QEMU refused a command.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// The migration ended in a state other than `completed`.
    #[error("migration {status}: {desc}")]
    Migration {
        /// The final status (`failed`, `cancelled`).
        status: String,
        /// QEMU's `error-desc`, if it gave one.
        desc: String,
    },
    /// A wait passed its deadline.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// The switchover step failed; the migration was cancelled.
    #[error("switchover step failed (migration cancelled): {0}")]
    Switchover(String),
}

/// A connection to one QEMU's monitor.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events QEMU sent while commands were answered (oldest first).
    pub events: Vec<Value>,
}

impl core::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Qmp")
            .field("events", &self.events.len())
            .finish_non_exhaustive()
    }
}

impl Qmp {
    /// Connect to the monitor at `socket`, read the greeting, negotiate
    /// capabilities. `timeout` bounds each read.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            events: Vec::new(),
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("expected a greeting, got {greeting}")));
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        let n = (&mut self.reader).take(MAX_LINE).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Err(QmpError::Protocol("QEMU closed the monitor".into()));
        }
        if line.last() != Some(&b'\n') {
            return Err(QmpError::Protocol(format!("a line longer than {MAX_LINE} bytes")));
        }
        serde_json::from_slice(&line).map_err(|e| QmpError::Protocol(format!("not JSON: {e}")))
    }

    /// Run `command` with `arguments`; returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer.write_all(text.as_bytes())?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: s("class"),
                    desc: s("desc"),
                });
            }
            return Err(QmpError::Protocol(format!("unexpected answer to {command}: {v}")));
        }
    }

    /// The migration's status (`none`, `setup`, `active`, `pre-switchover`,
    /// `device`, `completed`, `failed`, `cancelled`, …) and the whole answer.
    pub fn query_migrate(&mut self) -> Result<(String, Value), QmpError> {
        let v = self.execute("query-migrate", None)?;
        let status = v.get("status").and_then(Value::as_str).unwrap_or("none").to_string();
        Ok((status, v))
    }
}

/// What a migration took.
#[derive(Debug, Clone)]
pub struct MigrationTimes {
    /// From `migrate` to `completed`.
    pub total: Duration,
    /// From `migrate` to `pre-switchover` (RAM copied while the guest ran).
    pub precopy: Duration,
    /// The switchover step (guest paused, state moved) until `migrate-continue`.
    pub switchover: Duration,
    /// From `pre-switchover` to `completed`: the guest paused on the source
    /// and not yet running on the destination, the switchover step included.
    pub paused: Duration,
    /// QEMU's own `downtime` figure, milliseconds (the vCPU pause it measured).
    pub qemu_downtime_ms: Option<u64>,
}

/// Migrate the guest behind `source` to `uri` (`tcp:ADDR:PORT`, where a
/// QEMU started with `-incoming` listens), running `switchover` while the
/// guest is paused before the switchover. If `switchover` fails the
/// migration is cancelled (the guest keeps running on the source) and its
/// error returned. `timeout` bounds the whole migration.
pub fn migrate<T>(
    source: &mut Qmp,
    uri: &str,
    timeout: Duration,
    switchover: impl FnOnce() -> Result<T, String>,
) -> Result<(T, MigrationTimes), QmpError> {
    source.execute(
        "migrate-set-capabilities",
        Some(json!({ "capabilities": [ { "capability": "pause-before-switchover", "state": true } ] })),
    )?;
    let started = Instant::now();
    source.execute("migrate", Some(json!({ "uri": uri })))?;
    let poll = Duration::from_millis(5);
    let wait = |source: &mut Qmp, want: &str| -> Result<Value, QmpError> {
        loop {
            let (status, v) = source.query_migrate()?;
            if status == want {
                return Ok(v);
            }
            if matches!(status.as_str(), "failed" | "cancelled" | "none") {
                let desc = v.get("error-desc").and_then(Value::as_str).unwrap_or("").to_string();
                return Err(QmpError::Migration { status, desc });
            }
            if started.elapsed() > timeout {
                let _ = source.execute("migrate_cancel", None);
                return Err(QmpError::Timeout(format!("migration status {want} (last {status})")));
            }
            std::thread::sleep(poll);
        }
    };
    wait(source, "pre-switchover")?;
    let paused_at = Instant::now();
    let precopy = paused_at - started;
    let value = match switchover() {
        Ok(v) => v,
        Err(why) => {
            let _ = source.execute("migrate_cancel", None);
            return Err(QmpError::Switchover(why));
        }
    };
    let switchover = paused_at.elapsed();
    source.execute("migrate-continue", Some(json!({ "state": "pre-switchover" })))?;
    let done = wait(source, "completed")?;
    Ok((
        value,
        MigrationTimes {
            total: started.elapsed(),
            precopy,
            switchover,
            paused: paused_at.elapsed(),
            qemu_downtime_ms: done.get("downtime").and_then(Value::as_u64),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::sync::{Arc, Mutex};

    /// A fresh directory for one test's socket (removed when dropped).
    struct Dir(std::path::PathBuf);
    impl Dir {
        fn new(name: &str) -> Dir {
            let p = std::env::temp_dir().join(format!("palisade-qmp-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A scripted monitor: answers each command with `answer` (None: close),
    /// recording the commands received.
    fn fake(
        dir: &Path,
        mut answer: impl FnMut(&Value) -> Option<String> + Send + 'static,
    ) -> (std::path::PathBuf, Arc<Mutex<Vec<String>>>, std::thread::JoinHandle<()>) {
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let seen = log.clone();
        let h = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .unwrap();
            for line in BufReader::new(s).lines() {
                let Ok(line) = line else { return };
                let v: Value = serde_json::from_str(&line).unwrap();
                seen.lock().unwrap().push(v["execute"].as_str().unwrap().to_string());
                match answer(&v) {
                    Some(a) => {
                        if w.write_all(a.as_bytes()).is_err() {
                            return;
                        }
                    }
                    None => return,
                }
            }
        });
        (path, log, h)
    }

    #[test]
    fn a_migration_runs_the_switchover_while_paused_then_completes() {
        let dir = Dir::new("ok");
        let phase = Arc::new(Mutex::new(0));
        let p = phase.clone();
        let (sock, log, h) = fake(dir.path(), move |v| {
            let mut phase = p.lock().unwrap();
            Some(match v["execute"].as_str().unwrap() {
                "query-migrate" => {
                    *phase += 1;
                    let status = match *phase {
                        1 | 2 => "active",
                        3 | 4 => "pre-switchover",
                        _ if *phase >= 100 => "completed",
                        _ => "device",
                    };
                    format!(
                        "{{\"event\": \"MIGRATION\", \"data\": {{}}}}\n{{\"return\": {{\"status\": \"{status}\", \"downtime\": 7}}}}\n"
                    )
                }
                "migrate-continue" => {
                    *phase = 100;
                    "{\"return\": {}}\n".into()
                }
                _ => "{\"return\": {}}\n".into(),
            })
        });
        let mut q = Qmp::connect(&sock, Duration::from_secs(5)).unwrap();
        let seen_at_switchover = log.clone();
        let (value, times) = migrate(&mut q, "tcp:10.0.0.2:4444", Duration::from_secs(10), || {
            Ok(seen_at_switchover.lock().unwrap().clone())
        })
        .unwrap();
        // The switchover ran after QEMU reported pre-switchover and before migrate-continue.
        assert_eq!(value.last().map(String::as_str), Some("query-migrate"));
        assert!(!value.contains(&"migrate-continue".to_string()));
        let log = log.lock().unwrap().clone();
        assert_eq!(
            &log[..3],
            ["qmp_capabilities", "migrate-set-capabilities", "migrate"],
            "{log:?}"
        );
        assert_eq!(log.last().map(String::as_str), Some("query-migrate"));
        assert!(log.contains(&"migrate-continue".to_string()));
        assert_eq!(times.qemu_downtime_ms, Some(7));
        assert!(times.paused >= times.switchover && times.total >= times.paused);
        assert!(!q.events.is_empty(), "events are kept, not taken for answers");
        drop(q);
        h.join().unwrap();
    }

    #[test]
    fn a_failed_switchover_cancels_and_errors_are_reported() {
        let dir = Dir::new("cancel");
        let (sock, log, h) = fake(dir.path(), |v| {
            Some(match v["execute"].as_str().unwrap() {
                "query-migrate" => "{\"return\": {\"status\": \"pre-switchover\"}}\n".into(),
                _ => "{\"return\": {}}\n".into(),
            })
        });
        let mut q = Qmp::connect(&sock, Duration::from_secs(5)).unwrap();
        let r: Result<((), _), _> = migrate(&mut q, "tcp:x:1", Duration::from_secs(5), || {
            Err("destination refused the blob".into())
        });
        assert!(
            matches!(r, Err(QmpError::Switchover(ref w)) if w.contains("refused")),
            "{r:?}"
        );
        drop(q);
        h.join().unwrap();
        assert_eq!(log.lock().unwrap().last().map(String::as_str), Some("migrate_cancel"));

        // A refused command, a failed migration, a hostile monitor.
        let dir = Dir::new("errors");
        let (sock, _, h) = fake(dir.path(), |v| {
            Some(match v["execute"].as_str().unwrap() {
                "migrate" => "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no route\"}}\n".into(),
                "query-migrate" => "{\"return\": {\"status\": \"failed\", \"error-desc\": \"lost\"}}\n".into(),
                "bogus" => "[1,2]\n".into(),
                "huge" => format!("{{\"return\": \"{}\"}}\n", "a".repeat(2 << 20)),
                _ => "{\"return\": {}}\n".into(),
            })
        });
        let mut q = Qmp::connect(&sock, Duration::from_secs(5)).unwrap();
        let e = migrate(&mut q, "tcp:x:1", Duration::from_secs(5), || Ok(())).unwrap_err();
        assert_eq!(e.to_string(), "QMP command migrate failed: GenericError: no route");
        let (status, _) = q.query_migrate().unwrap();
        assert_eq!(status, "failed");
        assert!(matches!(q.execute("bogus", None), Err(QmpError::Protocol(_))));
        assert!(matches!(q.execute("huge", None), Err(QmpError::Protocol(_))));
        drop(q);
        let _ = h.join();
    }
}
