//! Shared helpers of the lab's integration tests: privilege checks that skip
//! (outside CI) or fail (in CI), unique lab names, and a guard that removes a
//! lab even when a test panics.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use palisade_lab::{Lab, LabSpec};

/// Whether tests needing root and the lab's tools can run; panics in CI when
/// they cannot (CI installs the tools and runs as root).
pub fn can_run(tools: &[&str]) -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let missing: Vec<&str> = ["ip", "ethtool", "sysctl"]
        .iter()
        .chain(tools)
        .copied()
        .filter(|t| !on_path(t))
        .collect();
    let reason = if !root {
        Some("not root".to_string())
    } else if !missing.is_empty() {
        Some(format!("missing tools: {}", missing.join(", ")))
    } else {
        None
    };
    match reason {
        None => true,
        Some(r) if ci => panic!("CI is set but the lab test cannot run: {r}"),
        Some(r) => {
            eprintln!("SKIPPED: {r} (set CI=true to make this a failure)");
            false
        }
    }
}

pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// A lab name unique to this process and call.
pub fn unique_name() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("labt{}x{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

pub fn three_tier() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/three-tier")
}

/// Removes the lab and its state directory when dropped.
pub struct Guard {
    pub name: String,
    pub state_dir: PathBuf,
}

impl Guard {
    pub fn new() -> Guard {
        let name = unique_name();
        let state_dir = std::env::temp_dir().join(format!("palisade-{name}"));
        Guard { name, state_dir }
    }

    pub fn spec(&self, policy_dir: PathBuf) -> LabSpec {
        LabSpec {
            state_dir: self.state_dir.clone(),
            ..LabSpec::from_inventory(policy_dir).with_name(&self.name)
        }
    }

    pub fn generated(&self, hosts: usize, vms: usize) -> LabSpec {
        LabSpec {
            name: self.name.clone(),
            ..LabSpec::generated(hosts, vms, &self.state_dir).expect("generated lab")
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(e) = Lab::down(&self.name, &self.state_dir) {
            eprintln!("cleanup of {}: {e}", self.name);
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

pub fn sh(lab: &Lab, vm: &str, cmd: &str) -> std::process::Output {
    lab.exec(vm, &["sh", "-c", cmd], Duration::from_secs(20)).expect("exec")
}

pub fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Root-namespace interface names.
pub fn root_links() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

pub fn netns_names() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

pub fn pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').and_then(|i| s.get(i + 2..i + 3)).map(|st| st != "Z"))
        .unwrap_or(false)
}

/// Bridge the host-side ends of each zone (VLAN-less) in `host`'s namespace,
/// standing in for the agent: proves the wiring, not the firewall.
pub fn bridge_zones(lab: &Lab, host: &str) {
    let ns = lab.host_netns(host);
    let plan = lab.plan().clone();
    let run = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .arg("-n")
            .arg(&ns)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let zones: std::collections::BTreeSet<String> = plan
        .vms
        .iter()
        .filter(|v| v.host == host)
        .flat_map(|v| v.vnics.iter().map(|n| n.zone.clone()))
        .chain(plan.zones.iter().filter(|z| z.host == host).map(|z| z.name.clone()))
        .collect();
    for (i, zone) in zones.iter().enumerate() {
        let br = format!("tbr{i}");
        run(&["link", "add", &br, "type", "bridge"]);
        run(&["link", "set", &br, "up"]);
        for v in plan.vms.iter().filter(|v| v.host == host) {
            for n in v.vnics.iter().filter(|n| &n.zone == zone) {
                run(&["link", "set", &n.host_if, "master", &br]);
            }
        }
        for z in plan.zones.iter().filter(|z| z.host == host && &z.name == zone) {
            run(&["link", "set", &z.host_if, "master", &br]);
        }
    }
}
