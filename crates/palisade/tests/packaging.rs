//! What the Debian package installs, checked: the systemd units pass
//! `systemd-analyze verify` (skipped, with a message, where the tool is
//! missing; scripts/install-deps installs it for CI), the shipped agent
//! configuration parses, and, given a built package (`PALISADE_DEB`, set by
//! `scripts/package`), the .deb holds the binary, the units and the configs.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `systemd-analyze verify` on `units` (in a directory of their own): its status and everything it printed.
fn verify(dir: &Path, units: &[PathBuf]) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(units)
        .current_dir(dir)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_systemd_units_verify() {
    if !have("systemd-analyze") {
        eprintln!("skipping: systemd-analyze is missing (apt-get install systemd; scripts/install-deps does)");
        return;
    }
    // The units run /usr/bin/palisade, which verify requires to exist: the
    // copies here run the binary under test instead.
    let dir = TempDir(std::env::temp_dir().join(format!("palisade-units-{}", std::process::id())));
    std::fs::create_dir_all(dir.path()).unwrap();
    let bin = env!("CARGO_BIN_EXE_palisade");
    let mut units = Vec::new();
    for name in ["palisade-agent.service", "palisade-controller.service"] {
        let text = std::fs::read_to_string(repo().join("packaging/systemd").join(name)).unwrap();
        assert!(text.contains("ExecStart=/usr/bin/palisade "), "{name}");
        let path = dir.path().join(name);
        std::fs::write(&path, text.replace("/usr/bin/palisade", bin)).unwrap();
        units.push(path);
    }
    let (ok, text) = verify(dir.path(), &units);
    assert!(ok && text.trim().is_empty(), "systemd-analyze verify:\n{text}");
    // The check can fail: verify warns about a key it does not know (and
    // still exits 0, hence the test of its output).
    let broken = dir.path().join("palisade-broken.service");
    let agent = std::fs::read_to_string(&units[0]).unwrap();
    std::fs::write(&broken, agent.replace("WatchdogSec=30s", "WatchdogSecs=30s")).unwrap();
    let (_, text) = verify(dir.path(), &[broken]);
    assert!(text.contains("WatchdogSecs"), "a misspelt key went unnoticed: {text:?}");
}

#[test]
fn the_agent_unit_is_a_notify_service_with_a_watchdog() {
    let text = std::fs::read_to_string(repo().join("packaging/systemd/palisade-agent.service")).unwrap();
    for line in [
        "Type=notify",
        "Restart=on-failure",
        "WatchdogSec=30s",
        "CapabilityBoundingSet=CAP_NET_RAW CAP_NET_ADMIN CAP_SYS_NICE",
        // The fallback's modules, loaded outside the sandbox that keeps
        // the agent and ExecStopPost= from loading modules themselves.
        "ProtectKernelModules=yes",
        "ExecStartPre=-+/sbin/modprobe -a bridge vxlan",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line}");
    }
    // AF_PACKET must stay allowed, and the host's network must not be taken away.
    let families = text
        .lines()
        .find(|l| l.starts_with("RestrictAddressFamilies="))
        .unwrap();
    assert!(families.contains("AF_PACKET"), "{families}");
    assert!(!text.lines().any(|l| l.starts_with("PrivateNetwork=yes")));
    // The fail-open fallback is armed whenever the agent stops or dies, from
    // the state directory the shipped configuration uses, a failure never
    // blocking the restart.
    let config = palisade_agent::AgentConfig::parse(
        &std::fs::read_to_string(repo().join("packaging/etc/agent.toml")).unwrap(),
        Path::new("agent.toml"),
    )
    .unwrap();
    let arm = format!(
        "ExecStopPost=-/usr/bin/palisade agent fallback arm --state-dir {}",
        config.state_dir.display()
    );
    assert!(text.lines().any(|l| l == arm), "missing {arm}");
}

#[test]
fn the_shipped_agent_config_parses() {
    let path = repo().join("packaging/etc/agent.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let config = palisade_agent::AgentConfig::parse(&text, &path).unwrap();
    assert_eq!(config.state_dir, Path::new("/var/lib/palisade"));
    assert!(config.controller.is_some());
}

#[test]
fn the_package_holds_the_binary_units_and_configs() {
    let Some(deb) = std::env::var_os("PALISADE_DEB") else {
        eprintln!("skipping: no package given (PALISADE_DEB; `bash scripts/package` builds one and sets it)");
        return;
    };
    if !have("dpkg-deb") {
        eprintln!("skipping: dpkg-deb is missing");
        return;
    }
    let out = Command::new("dpkg-deb").arg("-c").arg(&deb).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listing = String::from_utf8_lossy(&out.stdout);
    for path in [
        "./usr/bin/palisade",
        "./lib/systemd/system/palisade-agent.service",
        "./lib/systemd/system/palisade-controller.service",
        "./etc/palisade/agent.toml",
        "./etc/palisade/controller.env",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(path)),
            "{path} not in the package:\n{listing}"
        );
    }
    let out = Command::new("dpkg-deb")
        .args(["-I"])
        .arg(&deb)
        .arg("conffiles")
        .output()
        .unwrap();
    let conffiles = String::from_utf8_lossy(&out.stdout);
    assert!(conffiles.contains("/etc/palisade/agent.toml"), "{conffiles}");
    assert!(conffiles.contains("/etc/palisade/controller.env"), "{conffiles}");
}
