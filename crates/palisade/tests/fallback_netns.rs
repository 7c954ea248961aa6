//! The fail-open fallback's kernel side, as root in a network namespace of
//! its own: `palisade agent fallback arm` builds exactly the plan (a bridge
//! and a VXLAN-GBP device per open zone, the open zone's interfaces in it,
//! the closed zone's left alone, the remote MACs in the FDB), is refused
//! while the state directory's lock is held, is idempotent, and `disarm`
//! puts the namespace back as it was (a look-alike device left alone).
//! Skipped, with the reason, without root or iproute2 (outside CI).

use std::path::Path;
use std::process::Command;

const EXE: &str = env!("CARGO_BIN_EXE_palisade");

fn possible() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ip = Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success());
    let bridge = Command::new("bridge")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if root && ip && bridge {
        return true;
    }
    let why = format!("root: {root}, ip: {ip}, bridge: {bridge}");
    assert!(std::env::var_os("CI").is_none(), "CI must run the fallback test: {why}");
    eprintln!("skipping: {why}");
    false
}

/// A network namespace removed on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A directory removed on drop.
struct TempDir(std::path::PathBuf);

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

fn sh(ns: &str, cmd: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", cmd])
        .output()
        .unwrap();
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fallback(ns: &str, action: &str, state: &Path) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns, EXE, "agent", "fallback", action, "--state-dir"])
        .arg(state)
        .output()
        .unwrap()
}

/// Every interface with its kind and master: what arm changes and disarm restores.
fn links(ns: &str) -> Vec<(String, String, String)> {
    let json: serde_json::Value = serde_json::from_str(&sh(ns, "ip -d -j link show")).unwrap();
    let mut v: Vec<_> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let s = |k: &str| l[k].as_str().unwrap_or("").to_string();
            (
                s("ifname"),
                l["linkinfo"]["info_kind"].as_str().unwrap_or("").to_string(),
                s("master"),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn arm_builds_exactly_the_plan_again_and_again_and_disarm_removes_exactly_it() {
    if !possible() {
        return;
    }
    let ns = Netns(format!("pfb-{}", std::process::id()));
    assert!(
        Command::new("ip")
            .args(["netns", "add", &ns.0])
            .status()
            .unwrap()
            .success()
    );
    sh(
        &ns.0,
        "ip link add vn-open1 type veth peer name g-open1 && ip link add vn-open2 type veth peer name g-open2 \
         && ip link add vn-closed type veth peer name g-closed && ip link add ul0 type veth peer name ul1 \
         && ip addr add 192.0.2.1/24 dev ul0 && ip link set ul0 up \
         && ip link add palfb9 type veth peer name palfb9p",
    );
    let state = TempDir(std::env::temp_dir().join(format!("palisade-fallback-{}", std::process::id())));
    std::fs::create_dir_all(state.path()).unwrap();
    let plan = serde_json::json!({
        "version": 1, "host": "hv1", "underlay": "192.0.2.1", "port": 4789,
        "open": [{ "zone": "web", "vni": 100, "interfaces": ["vn-open1", "vn-open2", "vn-gone"],
                   "remote": { "02:00:00:00:00:0c": "192.0.2.2" }, "flood": ["192.0.2.2", "192.0.2.3"] }],
        "closed": [{ "zone": "db", "interfaces": ["vn-closed"] }]
    });
    std::fs::write(state.path().join("fallback.json"), plan.to_string()).unwrap();
    let before = links(&ns.0);

    // Refused while the lock is held (the agent runs): nothing is made.
    let lock = palisade_agent::fallback::StateLock::try_take(state.path())
        .unwrap()
        .unwrap();
    let out = fallback(&ns.0, "arm", state.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("agent.lock is held"));
    assert_eq!(links(&ns.0), before);
    drop(lock);

    let out = fallback(&ns.0, "arm", state.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("zone(s) web") && said.contains("missing: vn-gone"),
        "{said}"
    );
    let armed = links(&ns.0);
    let find = |name: &str| armed.iter().find(|l| l.0 == name).cloned();
    assert_eq!(find("palfb100").unwrap().1, "bridge");
    assert_eq!(
        find("palfx100").unwrap(),
        ("palfx100".into(), "vxlan".into(), "palfb100".into())
    );
    assert_eq!(find("vn-open1").unwrap().2, "palfb100");
    assert_eq!(find("vn-open2").unwrap().2, "palfb100");
    assert_eq!(
        find("vn-closed").unwrap().2,
        "",
        "a closed zone's interface is never attached"
    );
    let vx: serde_json::Value = serde_json::from_str(&sh(&ns.0, "ip -d -j link show palfx100")).unwrap();
    let data = &vx[0]["linkinfo"]["info_data"];
    assert_eq!(
        (data["id"].as_u64(), data["port"].as_u64()),
        (Some(100), Some(4789)),
        "{vx}"
    );
    assert_eq!(data["learning"], false, "{vx}");
    assert_eq!(data["gbp"], true, "{vx}");
    assert_eq!(data["local"], "192.0.2.1", "{vx}");
    let fdb = sh(&ns.0, "bridge fdb show dev palfx100");
    assert!(fdb.contains("02:00:00:00:00:0c dst 192.0.2.2"), "{fdb}");
    assert!(
        fdb.contains("00:00:00:00:00:00 dst 192.0.2.2") && fdb.contains("00:00:00:00:00:00 dst 192.0.2.3"),
        "{fdb}"
    );
    let record = std::fs::read_to_string(state.path().join("fallback.armed")).unwrap();
    let record: serde_json::Value = serde_json::from_str(&record).unwrap();
    let first_armed_at = record["armed_at_ns"].as_u64().unwrap();

    // Again: the same devices, the same FDB, and the episode's start kept.
    let out = fallback(&ns.0, "arm", state.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(links(&ns.0), armed);
    assert_eq!(sh(&ns.0, "bridge fdb show dev palfx100"), fdb);
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.path().join("fallback.armed")).unwrap()).unwrap();
    assert_eq!(record["armed_at_ns"].as_u64(), Some(first_armed_at));

    let status = fallback(&ns.0, "status", state.path());
    let said = String::from_utf8_lossy(&status.stdout);
    assert!(
        said.contains("agent: not running") && said.contains("armed: zone(s) web"),
        "{said}"
    );
    assert!(said.contains("device palfb100: palfx100,vn-open1,vn-open2"), "{said}");

    // Disarm: back to what was there, the look-alike veth `palfb9` included; twice is fine.
    for round in 0..2 {
        let out = fallback(&ns.0, "disarm", state.path());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(links(&ns.0), before, "round {round}");
        assert!(!state.path().join("fallback.armed").exists());
    }
}
