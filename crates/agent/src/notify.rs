//! The systemd notification protocol (`sd_notify(3)`), without libsystemd.
//!
//! Under a unit with `Type=notify`, systemd passes a datagram socket's path
//! in `$NOTIFY_SOCKET`: a path, or an abstract name written with a leading
//! `@`. The service sends newline-separated `KEY=VALUE` assignments to it:
//! `READY=1` once it serves (here: once the datapath workers run),
//! `WATCHDOG=1` at least every `WatchdogSec` (systemd passes it as
//! `$WATCHDOG_USEC`; the agent sends from its control loop, so a stuck loop
//! gets the agent restarted), `STOPPING=1` when it begins to stop, and a
//! free-form `STATUS=`. Without `$NOTIFY_SOCKET` (not under systemd) every
//! call does nothing.

use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
    /// How often to send `WATCHDOG=1` (half the watchdog timeout), if systemd watches.
    watchdog: Option<Duration>,
    last_watchdog: Option<Instant>,
}

/// Where `$NOTIFY_SOCKET` points: a path, or an abstract name after `@`.
fn address(spec: &str) -> std::io::Result<SocketAddr> {
    match spec.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None if spec.starts_with('/') => SocketAddr::from_pathname(spec),
        None => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("NOTIFY_SOCKET={spec:?} is neither a path nor an abstract name"),
        )),
    }
}

impl Notifier {
    /// From the environment (`$NOTIFY_SOCKET`, `$WATCHDOG_USEC`, `$WATCHDOG_PID`).
    /// A malformed variable is reported and ignored: notifications are not
    /// worth failing the datapath over (systemd then restarts an agent that
    /// never says it is ready, which the log explains).
    pub fn from_env() -> Notifier {
        let socket = std::env::var("NOTIFY_SOCKET").ok().and_then(|spec| {
            let sock = UnixDatagram::unbound().and_then(|s| Ok((s, address(&spec)?)));
            sock.map_err(|e| eprintln!("palisade agent: systemd notifications off: {e}"))
                .ok()
        });
        // WATCHDOG_PID, when set, names the process systemd watches.
        let ours = std::env::var("WATCHDOG_PID")
            .ok()
            .is_none_or(|p| p.parse::<u32>().ok() == Some(std::process::id()));
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&us| us > 0 && ours)
            .map(|us| Duration::from_micros(us) / 2);
        Notifier {
            socket,
            watchdog,
            last_watchdog: None,
        }
    }

    /// A notifier sending to `path` (tests), with a watchdog every `watchdog`.
    pub fn to_path(path: &std::path::Path, watchdog: Option<Duration>) -> std::io::Result<Notifier> {
        Ok(Notifier {
            socket: Some((UnixDatagram::unbound()?, SocketAddr::from_pathname(path)?)),
            watchdog,
            last_watchdog: None,
        })
    }

    /// Whether a service manager listens.
    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Send `state` (newline-separated `KEY=VALUE`). Errors are returned for
    /// tests and logged by callers at most once.
    pub fn send(&self, state: &str) -> std::io::Result<()> {
        match &self.socket {
            Some((s, addr)) => s.send_to_addr(state.as_bytes(), addr).map(|_| ()),
            None => Ok(()),
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.log(self.send(&format!("READY=1\nSTATUS={}", one_line(status))));
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        self.log(self.send("STOPPING=1"));
    }

    /// `WATCHDOG=1`, if systemd watches and half its timeout has passed
    /// since the last one. Call it often (every control-loop round).
    pub fn watchdog(&mut self) {
        let Some(every) = self.watchdog else { return };
        if self.last_watchdog.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        self.last_watchdog = Some(Instant::now());
        self.log(self.send("WATCHDOG=1"));
    }

    fn log(&self, r: std::io::Result<()>) {
        if let Err(e) = r {
            eprintln!("palisade agent: notifying systemd: {e}");
        }
    }
}

/// `s` without newlines (each would start another assignment).
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(s: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_ready_watchdog_and_stopping_to_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut n = Notifier::to_path(&path, Some(Duration::from_secs(3600))).unwrap();
        assert!(n.enabled());
        n.ready("2 workers\nrunning");
        assert_eq!(recv(&listener), "READY=1\nSTATUS=2 workers running");
        n.watchdog();
        assert_eq!(recv(&listener), "WATCHDOG=1");
        // Not again before half the timeout.
        n.watchdog();
        n.stopping();
        assert_eq!(recv(&listener), "STOPPING=1");
    }

    #[test]
    fn addresses() {
        assert!(address("/run/systemd/notify").unwrap().as_pathname().is_some());
        assert_eq!(
            address("@/org/freedesktop/systemd1/notify").unwrap().as_abstract_name(),
            Some(&b"/org/freedesktop/systemd1/notify"[..])
        );
        assert!(address("relative").is_err());
    }

    #[test]
    fn without_a_socket_nothing_happens() {
        let mut n = Notifier {
            socket: None,
            watchdog: Some(Duration::ZERO),
            last_watchdog: None,
        };
        assert!(!n.enabled());
        n.ready("x");
        n.watchdog();
        assert!(n.send("READY=1").is_ok());
    }
}
