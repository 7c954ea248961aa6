//! Helpers for the tests (and the bench) that need real network namespaces.
//!
//! Every namespace is named `io-test-<pid>-<tag>` and removed by a guard's
//! Drop, so a failing test cleans up too. A test thread enters a namespace
//! with `setns` only for the duration of a closure (sockets keep the namespace
//! they were created in), so the tests of one binary can run in parallel.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use palisade_io::{FramePort, wait_readable};

/// Whether CI is set: then missing privileges or tools fail the test instead of skipping it.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

fn tool_works(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// True when the test can run: root, `ip`, and every tool in `tools`. Otherwise prints why and
/// returns false, or panics when CI is set.
pub fn can_run(test: &str, tools: &[&str]) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let mut missing: Vec<String> = Vec::new();
    if !root {
        missing.push("root".into());
    }
    if !tool_works("ip", "-V") {
        missing.push("iproute2 (ip)".into());
    }
    for t in tools {
        if !tool_works(t, "--version") {
            missing.push((*t).into());
        }
    }
    if missing.is_empty() {
        return true;
    }
    let why = format!("{test} needs {}", missing.join(", "));
    assert!(!in_ci(), "{why} (CI is set, so it must run)");
    eprintln!("skipping: {why}");
    false
}

/// Run a command, panicking with its stderr when it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip ARGS...`.
pub fn ip(args: &[&str]) -> String {
    run("ip", args)
}

/// A network namespace that is deleted when dropped.
pub struct Netns {
    /// Its name under /run/netns.
    pub name: String,
}

impl Netns {
    /// Create `io-test-<pid>-<tag>`.
    pub fn new(tag: &str) -> Netns {
        let name = format!("io-test-{}-{tag}", std::process::id());
        // A namespace left behind by a killed earlier run with the same pid would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME ARGS...`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// `ip netns exec NAME PROGRAM ARGS...`.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Run `f` with the calling thread inside this namespace, then return to the previous one.
    pub fn enter<R>(&self, f: impl FnOnce() -> R) -> R {
        let back = File::open("/proc/thread-self/ns/net").expect("open own netns");
        let target = File::open(format!("/run/netns/{}", self.name)).expect("open test netns");
        // SAFETY: both descriptors are valid network-namespace files; setns only changes the
        // calling thread's namespace.
        let r = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        struct Restore(File);
        impl Drop for Restore {
            fn drop(&mut self) {
                // SAFETY: as above, returning the thread to the namespace it came from.
                let r = unsafe { libc::setns(self.0.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns back: {}", std::io::Error::last_os_error());
            }
        }
        let _restore = Restore(back);
        f()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// MAC the VM side sends its IPv4 traffic to (a static neighbour entry for [`SW_IP`]).
pub const SW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// The VM side's address, on `vb`.
pub const VM_IP: &str = "10.0.0.1";
/// The address the VM side sends to; it has a permanent neighbour entry, so no ARP is needed.
pub const SW_IP: &str = "10.0.0.2";

/// Two namespaces joined by a veth pair: `va` in `sw` (the switch side, no address) and `vb`
/// in `vm` (10.0.0.1/24, with 10.0.0.2 a permanent neighbour at [`SW_MAC`]).
pub struct VethPair {
    /// The VM side, holding `vb`.
    pub vm: Netns,
    /// The switch side, holding `va`.
    pub sw: Netns,
}

impl VethPair {
    /// Create the pair; `mtu` applies to both ends.
    pub fn new(tag: &str, mtu: Option<u32>) -> VethPair {
        let vm = Netns::new(&format!("{tag}v"));
        let sw = Netns::new(&format!("{tag}s"));
        sw.ip(&[
            "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", &vm.name,
        ]);
        if let Some(mtu) = mtu {
            let mtu = mtu.to_string();
            sw.ip(&["link", "set", "va", "mtu", &mtu]);
            vm.ip(&["link", "set", "vb", "mtu", &mtu]);
        }
        vm.ip(&["addr", "add", &format!("{VM_IP}/24"), "dev", "vb"]);
        let mac = SW_MAC.map(|b| format!("{b:02x}")).join(":");
        vm.ip(&["neigh", "add", SW_IP, "lladdr", &mac, "dev", "vb", "nud", "permanent"]);
        sw.ip(&["link", "set", "va", "up"]);
        vm.ip(&["link", "set", "vb", "up"]);
        VethPair { vm, sw }
    }
}

/// Receive from `port` until `want` frames matching `pred` arrived or `timeout` passed.
pub fn collect(port: &mut dyn FramePort, want: usize, timeout: Duration, pred: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    drain(port, want, timeout, &mut got, |port, got| {
        port.recv(64, &mut |f| {
            if pred(f) {
                got.push(f.to_vec());
            }
        })
    });
    got
}

/// As [`collect`], through [`FramePort::recv_batch`]; also returns the sizes of the batches.
pub fn collect_batched(
    port: &mut dyn FramePort,
    want: usize,
    timeout: Duration,
    pred: impl Fn(&[u8]) -> bool,
) -> (Vec<Vec<u8>>, Vec<usize>) {
    let (mut got, mut sizes) = (Vec::new(), Vec::new());
    drain(port, want, timeout, &mut got, |port, got| {
        port.recv_batch(64, &mut |frames| {
            sizes.push(frames.len());
            got.extend(frames.iter().filter(|f| pred(f)).map(|f| f.to_vec()));
        })
    });
    (got, sizes)
}

/// Whenever `port` is readable, `receive` from it into `got`, until `got`
/// holds `want` frames or `timeout` passed.
fn drain(
    port: &mut dyn FramePort,
    want: usize,
    timeout: Duration,
    got: &mut Vec<Vec<u8>>,
    mut receive: impl FnMut(&mut dyn FramePort, &mut Vec<Vec<u8>>) -> std::io::Result<usize>,
) {
    let deadline = Instant::now() + timeout;
    while got.len() < want {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let ready = wait_readable(&[port.fd()], (deadline - now).min(Duration::from_millis(20))).unwrap();
        if ready.is_empty() {
            continue;
        }
        receive(&mut *port, got).unwrap();
    }
}

/// The EtherType of an untagged frame.
pub fn ethertype(f: &[u8]) -> u16 {
    f.get(12..14).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]))
}

/// The UDP destination port of an untagged IPv4 frame without options, if it is UDP.
pub fn udp_dst_port(f: &[u8]) -> Option<u16> {
    (ethertype(f) == 0x0800 && f.get(23) == Some(&17) && f.get(14) == Some(&0x45))
        .then(|| f.get(36..38).map(|b| u16::from_be_bytes([b[0], b[1]])))
        .flatten()
}
