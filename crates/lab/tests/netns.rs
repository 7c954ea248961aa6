//! Real namespaces: the three-tier lab's wiring, exec, down after a crash,
//! agents, and forwarding through a Linux bridge standing in for the agent.

mod common;

use std::net::{IpAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use palisade_lab::{Lab, LabError, dns, spawn_in_netns};

fn json(ns: &str, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new("ip")
        .args(["-n", ns, "-j"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip -n {ns} -j {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn read_sysctl(lab: &Lab, ns: &str, path: &str) -> String {
    let out = lab.exec_ns(ns, &["cat", path], Duration::from_secs(5)).unwrap();
    stdout(&out).trim().to_string()
}

#[test]
fn three_tier_up_exec_down() {
    if !can_run(&["busybox"]) {
        return;
    }
    let g = Guard::new();
    let lab = Lab::up(&g.spec(three_tier())).expect("lab up");
    let plan = lab.plan().clone();
    let inv = palisade_lab::lab::load_inventory(&three_tier()).unwrap();

    // Every namespace exists.
    let nss = netns_names();
    for ns in plan.namespaces() {
        assert!(nss.contains(&ns), "namespace {ns} missing");
    }
    assert_eq!(plan.hosts.len(), 2);
    assert_eq!(plan.vms.len(), inv.vms.len());

    // VMs: MAC, addresses and default route from the inventory.
    for vm in &inv.vms {
        let ns = lab.vm_netns(&vm.name).unwrap();
        let nic = &vm.vnics[0];
        let addr = &json(&ns, &["addr", "show", "eth0"])[0];
        assert_eq!(addr["address"], nic.mac.as_str(), "{}", vm.name);
        assert_eq!(addr["operstate"], "UP", "{}", vm.name);
        let have: Vec<String> = addr["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
            .collect();
        for ip in &nic.ips {
            let want = match ip {
                IpAddr::V4(a) => format!("{a}/24"),
                IpAddr::V6(a) => format!("{a}/64"),
            };
            assert!(have.contains(&want), "{}: {want} not in {have:?}", vm.name);
        }
        let IpAddr::V4(v4) = nic.ips[0] else {
            panic!("first address is IPv4")
        };
        let [a, b, c, _] = v4.octets();
        let route = json(&ns, &["route", "show", "default"]);
        assert_eq!(route[0]["gateway"], format!("{a}.{b}.{c}.1"), "{}", vm.name);
        assert_eq!(lab.vm_ip(&vm.name).unwrap(), v4);
        // TX checksum offload off inside the VM; lo up.
        let k = lab
            .exec(&vm.name, &["ethtool", "-k", "eth0"], Duration::from_secs(5))
            .unwrap();
        assert!(stdout(&k).contains("tx-checksumming: off"), "{}", stdout(&k));
        let lo = &json(&ns, &["link", "show", "lo"])[0];
        assert!(lo["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
    }

    // Host ends: present, up, no IPv6, no addresses.
    for vm in &plan.vms {
        let hns = lab.host_netns(&vm.host);
        let nic = &vm.vnics[0];
        assert!(nic.host_if.len() <= 15);
        let l = &json(&hns, &["addr", "show", &nic.host_if])[0];
        assert!(
            l["flags"].as_array().unwrap().iter().any(|f| f == "UP"),
            "{}",
            nic.host_if
        );
        assert_eq!(
            l["addr_info"].as_array().map_or(0, Vec::len),
            0,
            "{}: no addresses",
            nic.host_if
        );
        let p = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", nic.host_if);
        assert_eq!(read_sysctl(&lab, &hns, &p), "1");
    }

    // Edge: one leg per zone with the gateway and the planned MAC, ends in hv1.
    assert_eq!(plan.zones.len(), 4);
    for z in &plan.zones {
        let l = &json(&plan.edge_ns, &["addr", "show", &z.edge_if])[0];
        assert_eq!(l["address"], z.mac.as_str());
        assert_eq!(l["addr_info"][0]["local"], z.gateway.to_string());
        assert_eq!(z.host, "hv1");
        json(&lab.host_netns("hv1"), &["link", "show", &z.host_if]);
    }
    assert_eq!(read_sysctl(&lab, &plan.edge_ns, "/proc/sys/net/ipv4/ip_forward"), "1");
    // Underlay: hosts reach each other (plain kernel bridge, no agent needed).
    let ping = lab
        .exec_host(
            "hv1",
            &["busybox", "ping", "-c1", "-W2", "192.168.100.2"],
            Duration::from_secs(5),
        )
        .unwrap();
    assert!(ping.status.success(), "underlay ping: {}", stdout(&ping));
    // The internet namespace reaches the edge.
    let ping = lab
        .exec_ns(
            &plan.internet_ns,
            &["busybox", "ping", "-c1", "-W2", "203.0.113.1"],
            Duration::from_secs(5),
        )
        .unwrap();
    assert!(ping.status.success());

    // Agent configuration, in the agreed format.
    let cfg = std::fs::read_to_string(lab.agent_config("hv1")).unwrap();
    let policy = std::path::absolute(three_tier()).unwrap();
    for line in [
        "host = \"hv1\"".to_string(),
        format!("policy = \"{}\"", policy.display()),
        format!("state_dir = \"{}\"", g.state_dir.join("hv1").display()),
        "metrics = \"127.0.0.1:9101\"".to_string(),
        format!("audit = \"{}\"", g.state_dir.join("hv1/audit").display()),
        format!("audit_key = \"{}\"", g.state_dir.join("hv1/audit.key").display()),
        format!("audit_head = \"{}\"", g.state_dir.join("hv1/audit.head").display()),
        "workers = 2".to_string(),
        "[underlay]".to_string(),
        "local = \"192.168.100.1\"".to_string(),
        "port = 4789".to_string(),
        "peers = { hv2 = \"192.168.100.2\" }".to_string(),
        "[[vnic]]\nname = \"web-1.0\"\ninterface = \"vn-web-1\"".to_string(),
        "[[appliance]]\nname = \"edge-web\"\ninterface = \"ge-web\"\nzone = \"web\"\nmac = \"02:00:00:00:fe:01\""
            .to_string(),
    ] {
        assert!(cfg.contains(&line), "hv1.toml lacks {line:?}:\n{cfg}");
    }
    let cfg2 = std::fs::read_to_string(lab.agent_config("hv2")).unwrap();
    assert!(
        cfg2.contains("metrics = \"127.0.0.1:9102\"") && !cfg2.contains("[[appliance]]"),
        "{cfg2}"
    );
    assert!(cfg2.contains("interface = \"vn-db-1\""));

    // exec: output, exit status, timeout.
    let o = sh(&lab, "web-1", "echo out; echo err >&2; exit 3");
    assert_eq!(stdout(&o), "out\n");
    assert_eq!(String::from_utf8_lossy(&o.stderr), "err\n");
    assert_eq!(o.status.code(), Some(3));
    let t = lab.exec("web-1", &["sleep", "5"], Duration::from_millis(300));
    assert!(matches!(t, Err(LabError::Timeout { .. })), "{t:?}");
    assert!(matches!(
        lab.exec("nope", &["true"], Duration::from_secs(1)),
        Err(LabError::Unknown { .. })
    ));

    // A second lab of the same name is refused and leaves the first intact.
    let again = Lab::up(&g.spec(three_tier()));
    assert!(
        matches!(again, Err(LabError::Invalid(ref m)) if m.contains("already exists")),
        "{again:?}"
    );
    assert!(sh(&lab, "web-1", "true").status.success());

    // Status, then down: nothing left.
    let st = lab.status();
    assert!(st.hosts.iter().all(|h| h.present && h.agent_pid.is_none()));
    assert!(st.vms.iter().all(|v| v.alive));
    let mut bg = lab.spawn("db-1", &["sleep", "100"]).unwrap();
    let bg_pid = match &bg {
        palisade_lab::Spawned::Process(c) => c.id() as i32,
        palisade_lab::Spawned::Guest { .. } => unreachable!("namespace VM"),
    };
    assert!(pid_alive(bg_pid));
    let report = lab.shutdown().expect("down");
    assert!(report.processes.iter().any(|(p, _)| *p == bg_pid), "{report}");
    if let palisade_lab::Spawned::Process(c) = &mut bg {
        let _ = c.wait();
    }
    assert!(!pid_alive(bg_pid));
    assert_eq!(report.namespaces.len(), plan.namespaces().len(), "{report}");
    let nss = netns_names();
    assert!(nss.iter().all(|n| !n.starts_with(&format!("{}-", g.name))), "{nss:?}");
    let links = root_links();
    for vm in &plan.vms {
        assert!(
            !links.contains(&vm.vnics[0].host_if),
            "{} leaked into the root namespace",
            vm.vnics[0].host_if
        );
    }
    assert!(palisade_lab::leftovers(&g.name).unwrap().is_empty());
    // Idempotent.
    let again = Lab::down(&g.name, &g.state_dir).unwrap();
    assert!(again.processes.is_empty() && again.namespaces.is_empty(), "{again}");
}

/// A stand-in agent: reports ready and stays up.
fn fake_agent(dir: &std::path::Path, ready: bool) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(if ready { "fake-agent" } else { "broken-agent" });
    let body = if ready {
        "#!/bin/sh\necho \"fake $1 $2 $3\"\nhead -n1 \"$3\"\necho 'agent ready'\nexec sleep 1000\n"
    } else {
        "#!/bin/sh\necho 'cannot open interfaces' >&2\nexit 1\n"
    };
    std::fs::write(&p, body).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn crash_then_down_by_prefix() {
    if !can_run(&["busybox"]) {
        return;
    }
    let g = Guard::new();
    let mut spec = g.generated(2, 1);
    spec.agent_exe = Some(fake_agent(&g.state_dir.join("bin"), true));
    let lab = Lab::up(&spec).expect("lab up");
    let agents: Vec<i32> = lab.state().agents.values().map(|a| a.pid).collect();
    assert_eq!(agents.len(), 2);
    assert!(agents.iter().all(|&p| pid_alive(p)));
    let log = std::fs::read_to_string(&lab.state().agents["hv1"].log).unwrap();
    assert!(
        log.contains("fake agent --config") && log.contains("host = \"hv1\""),
        "{log}"
    );
    assert!(lab.status().hosts.iter().all(|h| h.agent_alive));
    let spawned = lab.spawn("vm2", &["sleep", "1000"]).unwrap();
    let sleeper = match &spawned {
        palisade_lab::Spawned::Process(c) => c.id() as i32,
        palisade_lab::Spawned::Guest { .. } => unreachable!(),
    };
    // The crash: the handle is gone and so is the state file.
    drop(lab);
    std::mem::forget(spawned);
    std::fs::remove_file(g.state_dir.join(palisade_lab::lab::STATE_FILE)).unwrap();
    assert!(Lab::load(&g.state_dir).is_err());

    let report = Lab::down(&g.name, &g.state_dir).expect("down by prefix");
    assert_eq!(report.namespaces.len(), 3 + 2 + 2, "{report}");
    for p in agents.iter().chain([&sleeper]) {
        assert!(
            report.processes.iter().any(|(q, _)| q == p),
            "pid {p} not stopped: {report}"
        );
        assert!(!pid_alive(*p), "pid {p} survived");
    }
    assert!(palisade_lab::leftovers(&g.name).unwrap().is_empty());
}

#[test]
fn failing_agent_fails_up_and_leaves_nothing() {
    if !can_run(&["busybox"]) {
        return;
    }
    let g = Guard::new();
    let mut spec = g.generated(1, 1);
    spec.agent_exe = Some(fake_agent(&g.state_dir.join("bin"), false));
    let err = Lab::up(&spec).expect_err("agent exits");
    let text = err.to_string();
    assert!(matches!(err, LabError::Agent { .. }), "{text}");
    assert!(text.contains("cannot open interfaces"), "{text}");
    assert!(palisade_lab::leftovers(&g.name).unwrap().is_empty());
}

#[test]
fn linux_bridge_instead_of_agent_forwards() {
    if !can_run(&["busybox"]) {
        return;
    }
    let g = Guard::new();
    // One host, three VMs: vm1 and vm3 in blue, vm2 in green.
    let lab = Lab::up(&g.generated(1, 3)).expect("lab up");
    // Nothing forwards without an agent.
    assert!(!sh(&lab, "vm1", "busybox ping -c1 -W1 10.10.0.11").status.success());
    bridge_zones(&lab, "hv1");
    let ok = |vm: &str, cmd: &str| {
        let o = sh(&lab, vm, cmd);
        assert!(
            o.status.success(),
            "{vm}: {cmd}: {}{}",
            stdout(&o),
            String::from_utf8_lossy(&o.stderr)
        );
        stdout(&o)
    };
    ok("vm1", "busybox ping -c1 -W2 10.10.0.11"); // same host, same zone
    ok("vm1", "busybox ping -c1 -W2 10.10.0.1"); // the zone gateway (edge)
    ok("vm1", "busybox ping -c1 -W2 10.20.0.10"); // other zone, routed by the edge
    ok("vm2", "busybox ping -c1 -W2 203.0.113.10"); // the internet
    // TCP works too (TX checksums are complete).
    let www = g.state_dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello from vm3\n").unwrap();
    let mut httpd = lab
        .spawn(
            "vm3",
            &["busybox", "httpd", "-f", "-p", "80", "-h", www.to_str().unwrap()],
        )
        .unwrap();
    let mut body = String::new();
    for _ in 0..50 {
        let o = sh(&lab, "vm1", "busybox timeout 3 busybox wget -q -O - http://10.10.0.11/");
        if o.status.success() {
            body = stdout(&o);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(body, "hello from vm3\n");
    lab.kill(&mut httpd).unwrap();
    lab.shutdown().unwrap();
}

#[test]
fn dns_responder_answers_busybox_nslookup() {
    if !can_run(&["busybox"]) {
        return;
    }
    let g = Guard::new();
    let lab = Lab::up(&g.generated(1, 2)).expect("lab up");
    let zone = std::fs::read_to_string(lab.dns_zone_file()).unwrap();
    let records = dns::Records::parse_zone_file(&zone).unwrap();
    assert_eq!(records.get("vm1.lab"), Some("10.10.0.10".parse().unwrap()));
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let server = spawn_in_netns(&lab.vm_netns("vm2").unwrap(), move || {
        let sock = UdpSocket::bind("0.0.0.0:53").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        tx.send(()).unwrap();
        dns::serve(&sock, &records, Some(&stop2))
    })
    .unwrap();
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let o = sh(&lab, "vm2", "busybox nslookup vm1.lab 127.0.0.1");
    let text = stdout(&o);
    assert!(o.status.success() && text.contains("10.10.0.10"), "{text}");
    let o = sh(&lab, "vm2", "busybox nslookup nope.lab 127.0.0.1");
    assert!(!o.status.success() || stdout(&o).contains("NXDOMAIN"), "{}", stdout(&o));
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap().unwrap();
    lab.shutdown().unwrap();
}
