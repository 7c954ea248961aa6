//! Thin wrappers over the tools and system calls the lab drives.
//!
//! Interfaces and namespaces are made with iproute2 (`ip`) rather than
//! netlink by hand: it is what an operator would type, its error messages are
//! the kernel's, and every command can be replayed from the error text.

use std::ffi::OsStr;
use std::io::Read;
use std::path::Path;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::LabError;

fn render(program: &OsStr, args: &[&OsStr]) -> String {
    let mut s = program.to_string_lossy().into_owned();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run a program to completion; fail unless it exits 0.
pub(crate) fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<Output, LabError> {
    let args: Vec<&OsStr> = args.iter().map(AsRef::as_ref).collect();
    let line = render(program.as_ref(), &args);
    let out = Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LabError::Command {
            command: line.clone(),
            status: "could not start".into(),
            stderr: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(LabError::Command {
            command: line,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

/// `ip ARGS…` in the root namespace.
pub(crate) fn ip<S: AsRef<OsStr>>(args: &[S]) -> Result<Output, LabError> {
    run("ip", args)
}

/// `ip -n NS ARGS…`.
pub(crate) fn ip_n(ns: &str, args: &[&str]) -> Result<Output, LabError> {
    let mut v = vec!["-n", ns];
    v.extend_from_slice(args);
    run("ip", &v)
}

/// `ip netns exec NS ARGS…`.
pub(crate) fn netns_exec(ns: &str, args: &[&str]) -> Result<Output, LabError> {
    let mut v = vec!["netns", "exec", ns];
    v.extend_from_slice(args);
    run("ip", &v)
}

/// Run a prepared command with a deadline, collecting both outputs. On timeout
/// the child is killed and reaped so nothing is left running.
pub(crate) fn output_timeout(mut cmd: Command, timeout: Duration, what: &str) -> Result<Output, LabError> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| LabError::Command {
            command: what.to_string(),
            status: "could not start".into(),
            stderr: e.to_string(),
        })?;
    // Readers on threads: a child that fills one pipe while we wait on the
    // other would otherwise deadlock.
    let mut so = child.stdout.take();
    let mut se = child.stderr.take();
    let t_out = thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = so.as_mut() {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let t_err = thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = se.as_mut() {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let start = Instant::now();
    let status: ExitStatus = loop {
        match child.try_wait().map_err(LabError::io(format!("waiting for {what}")))? {
            Some(st) => break st,
            None if start.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LabError::Timeout {
                    what: what.to_string(),
                    secs: timeout.as_secs_f64(),
                });
            }
            None => thread::sleep(Duration::from_millis(5)),
        }
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    Ok(Output { status, stdout, stderr })
}

/// Names of all network namespaces (`ip netns list`, first column).
pub(crate) fn netns_list() -> Result<Vec<String>, LabError> {
    let out = ip(&["netns", "list"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

/// Pids of the processes inside a namespace (`ip netns pids`); empty if it is gone.
pub(crate) fn netns_pids(ns: &str) -> Vec<i32> {
    match ip(&["netns", "pids", ns]) {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Whether `pid` is a live (not zombie) process.
pub(crate) fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name,
        // which may itself contain spaces and parentheses.
        Ok(s) => s
            .rfind(')')
            .and_then(|i| s.get(i + 2..i + 3))
            .is_some_and(|st| st != "Z" && st != "X"),
        Err(_) => false,
    }
}

/// The command line of `pid`, NUL separators turned into spaces.
pub(crate) fn pid_cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " ").trim().to_string())
        .unwrap_or_default()
}

/// Send `sig` to `pid`; errors (already gone) are ignored.
pub(crate) fn signal(pid: i32, sig: i32) {
    if pid > 0 {
        // SAFETY: kill(2) has no memory-safety preconditions; a stale pid only
        // yields ESRCH, which we ignore.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Reap `pid` if it is our child and has exited (no-op otherwise).
pub(crate) fn reap(pid: i32) {
    if pid > 0 {
        let mut status = 0;
        // SAFETY: waitpid with WNOHANG on a pid that is not our child returns
        // ECHILD; `status` is a valid, writable int.
        unsafe {
            libc::waitpid(pid, &mut status, libc::WNOHANG);
        }
    }
}

/// Terminate processes: SIGTERM, wait up to `grace`, then SIGKILL; wait until
/// all are gone (or zombies we cannot reap). Returns the pids that were alive.
pub(crate) fn terminate(pids: &[i32], grace: Duration) -> Vec<i32> {
    let alive: Vec<i32> = pids.iter().copied().filter(|&p| pid_alive(p)).collect();
    for &p in &alive {
        signal(p, libc::SIGTERM);
    }
    let start = Instant::now();
    let mut killed = false;
    loop {
        for &p in &alive {
            reap(p);
        }
        if alive.iter().all(|&p| !pid_alive(p)) {
            break;
        }
        if !killed && start.elapsed() >= grace {
            for &p in &alive {
                signal(p, libc::SIGKILL);
            }
            killed = true;
        }
        if start.elapsed() >= grace + Duration::from_secs(5) {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    alive
}

/// A thread running inside another network namespace (see [`spawn_in_netns`]).
#[derive(Debug)]
pub struct NetnsThread<T>(thread::JoinHandle<Option<T>>);

impl<T> NetnsThread<T> {
    /// Wait for the closure's result.
    pub fn join(self) -> Result<T, LabError> {
        match self.0.join() {
            Ok(Some(t)) => Ok(t),
            Ok(None) => Err(LabError::Invalid("thread did not enter its namespace".into())),
            Err(_) => Err(LabError::Invalid("thread in namespace panicked".into())),
        }
    }

    /// Whether the closure has returned.
    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

/// Run `f` on a new thread that first joins network namespace `ns` (setns on
/// that thread only; the rest of the process stays where it is). Sockets the
/// closure opens live in `ns`.
pub fn spawn_in_netns<T, F>(ns: &str, f: F) -> Result<NetnsThread<T>, LabError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = Path::new("/run/netns").join(ns);
    let file = std::fs::File::open(&path).map_err(LabError::io(format!("opening {}", path.display())))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a valid, open namespace fd; it only changes this
        // thread's network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            let _ = tx.send(Err(std::io::Error::last_os_error()));
            return None;
        }
        let _ = tx.send(Ok(()));
        Some(f())
    });
    match rx.recv() {
        Ok(Ok(())) => Ok(NetnsThread(handle)),
        Ok(Err(e)) => Err(LabError::io(format!("entering namespace {ns}"))(e)),
        Err(_) => Err(LabError::Invalid(format!("thread entering namespace {ns} died"))),
    }
}

/// Whether a program is on `PATH`.
pub(crate) fn have(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}
