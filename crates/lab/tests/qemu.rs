//! A QEMU guest in the lab: boots (TCG when KVM does not work), `exec` over
//! the serial console returns output and exit status, and the guest is
//! reachable from a namespace VM through a test bridge in the host namespace.

mod common;

use std::time::{Duration, Instant};

use common::*;
use palisade_lab::{Lab, QemuMode, QemuNic};

#[test]
fn qemu_guest_boots_execs_and_answers_ping() {
    if !can_run(&["busybox", "qemu-system-x86_64", "modprobe"]) {
        return;
    }
    if palisade_lab::qemu::find_kernel().is_none() {
        assert!(
            std::env::var("CI").is_err(),
            "CI is set but /boot has no *-cloud-amd64 kernel"
        );
        eprintln!("SKIPPED: no /boot/vmlinuz-*-cloud-amd64");
        return;
    }
    let g = Guard::new();
    let mut spec = g.generated(1, 3);
    spec.qemu = QemuMode::Vms(vec!["vm1".into()]);
    // A tap, bridged below: this lab has no agents (a guest on vhost-user needs its agent).
    spec.qemu_nic = QemuNic::Tap;
    let t0 = Instant::now();
    let lab = Lab::up(&spec).expect("lab up with a QEMU guest");
    eprintln!(
        "guest up in {:.1} s with {:?}",
        t0.elapsed().as_secs_f64(),
        lab.state().guests["vm1"].accel
    );
    let st = lab.status();
    assert!(st.vms.iter().any(|v| v.name == "vm1" && v.kind == "qemu" && v.alive));
    // The guest's QMP socket answers (live migration drives it).
    let mut qmp = palisade_lab::qmp::Qmp::connect(&lab.state().guests["vm1"].qmp, Duration::from_secs(5)).unwrap();
    let status = qmp.execute("query-status", None).unwrap();
    assert_eq!(status["status"], "running", "{status}");
    drop(qmp);

    let o = lab
        .exec("vm1", &["ip", "addr", "show", "eth0"], Duration::from_secs(20))
        .unwrap();
    let text = stdout(&o);
    assert!(o.status.success(), "{text}");
    assert!(text.contains("02:00:0a:0a:00:0a"), "MAC missing: {text}");
    assert!(text.contains("10.10.0.10/24"), "address missing: {text}");
    let o = lab.exec("vm1", &["ip", "route"], Duration::from_secs(20)).unwrap();
    assert!(stdout(&o).contains("default via 10.10.0.1"), "{}", stdout(&o));
    // Exit status, stderr, quoting and a last line without a newline.
    let o = lab
        .exec(
            "vm1",
            &["sh", "-c", "printf 'a b'; echo oops >&2; exit 7"],
            Duration::from_secs(20),
        )
        .unwrap();
    assert_eq!(o.status.code(), Some(7));
    assert_eq!(stdout(&o), "a b");
    assert_eq!(String::from_utf8_lossy(&o.stderr), "oops\n");
    let o = lab
        .exec("vm1", &["echo", "it's $HOME"], Duration::from_secs(20))
        .unwrap();
    assert_eq!(stdout(&o), "it's $HOME\n");

    // A test bridge stands in for the agent: vm3 (namespace, blue) <-> vm1 (guest, blue).
    bridge_zones(&lab, "hv1");
    let mut ok = false;
    for _ in 0..20 {
        if sh(&lab, "vm3", "busybox ping -c1 -W1 10.10.0.10").status.success() {
            ok = true;
            break;
        }
    }
    assert!(ok, "namespace VM cannot ping the QEMU guest");
    let o = lab
        .exec("vm1", &["ping", "-c1", "-W2", "10.10.0.11"], Duration::from_secs(20))
        .unwrap();
    assert!(o.status.success(), "guest cannot ping vm3: {}", stdout(&o));
    // The guest's httpd names the VM.
    let o = sh(&lab, "vm3", "busybox timeout 5 busybox wget -q -O - http://10.10.0.10/");
    assert!(stdout(&o).contains("vm1"), "{}", stdout(&o));

    // Background job in the guest.
    let mut job = lab.spawn("vm1", &["sleep", "100"]).unwrap();
    let palisade_lab::Spawned::Guest { pid, .. } = &job else {
        panic!("guest job expected")
    };
    let pid = *pid;
    let o = lab
        .exec("vm1", &["kill", "-0", &pid.to_string()], Duration::from_secs(10))
        .unwrap();
    assert!(o.status.success());
    lab.kill(&mut job).unwrap();

    let qemu_pid = lab.state().guests["vm1"].pid;
    let report = lab.shutdown().unwrap();
    assert!(report.processes.iter().any(|(p, _)| *p == qemu_pid), "{report}");
    assert!(!pid_alive(qemu_pid));
    assert!(palisade_lab::leftovers(&g.name).unwrap().is_empty());
    assert!(!root_links().iter().any(|l| l == "vn-vm1"));
}
