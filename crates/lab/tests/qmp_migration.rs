//! The QMP client against a real QEMU: a TCG guest (the lab's kernel and
//! initramfs, no NIC) live-migrates to a second QEMU started with
//! `-incoming`, the switchover step running while the source reports
//! `pre-switchover`, and the destination runs the guest afterwards.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use palisade_lab::qmp::{self, Qmp};

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu(kernel: &Path, initrd: &Path, qmp: &Path, incoming: Option<&str>) -> Kill {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(palisade_lab::qemu::accel())
        .args(["-M", "pc", "-m", "128", "-nodefaults", "-display", "none", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    if let Some(uri) = incoming {
        c.args(["-incoming", uri]);
    }
    Kill(
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn connect(sock: &Path) -> Qmp {
    let t0 = Instant::now();
    loop {
        match Qmp::connect(sock, Duration::from_secs(10)) {
            Ok(q) => return q,
            Err(e) if t0.elapsed() > Duration::from_secs(10) => panic!("QMP {}: {e}", sock.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[test]
fn qemu_live_migration_pauses_for_the_switchover_step() {
    if !can_run(&["busybox", "qemu-system-x86_64", "modprobe"]) {
        return;
    }
    let Some((kernel, kver)) = palisade_lab::qemu::find_kernel() else {
        eprintln!("SKIPPED: no /boot/vmlinuz-*-cloud-amd64");
        return;
    };
    let dir = std::env::temp_dir().join(format!("palisade-qmp-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let initrd = palisade_lab::qemu::build_initramfs(&dir, &kver).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let _src = qemu(&kernel, &initrd, &dir.join("src.qmp"), None);
    let _dst = qemu(&kernel, &initrd, &dir.join("dst.qmp"), Some(&uri));
    let mut src = connect(&dir.join("src.qmp"));
    let mut dst = connect(&dir.join("dst.qmp"));
    std::thread::sleep(Duration::from_secs(1));
    let (seen, times) = qmp::migrate(&mut src, &uri, Duration::from_secs(60), || {
        // The step runs with the source paused before the switchover: the
        // destination has not started the guest yet.
        let status = dst.execute("query-status", None).map_err(|e| e.to_string())?;
        Ok(status.to_string())
    })
    .unwrap();
    assert!(
        seen.contains("inmigrate"),
        "destination still waiting at the switchover: {seen}"
    );
    let t0 = Instant::now();
    let mut status = dst.execute("query-status", None).unwrap();
    while status["status"] != "running" && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
        status = dst.execute("query-status", None).unwrap();
    }
    assert_eq!(status["status"], "running", "{status}");
    let (s, _) = src.query_migrate().unwrap();
    assert_eq!(s, "completed");
    eprintln!(
        "migration 128 MiB TCG: total {:?}, precopy {:?}, paused {:?} (switchover step {:?}), QEMU downtime {:?} ms",
        times.total, times.precopy, times.paused, times.switchover, times.qemu_downtime_ms
    );
    let _ = std::fs::remove_dir_all(&dir);
}
