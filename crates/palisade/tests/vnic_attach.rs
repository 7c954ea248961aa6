//! `palisade vnic attach`: the libvirt XML for a VM of the three-tier
//! example bound to a vhost-user socket (or a tap) in an agent
//! configuration, and `--apply` with and without `virsh` on the PATH (a
//! stand-in script records what it was asked to do).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

const EXE: &str = env!("CARGO_BIN_EXE_palisade");

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        let p = std::env::temp_dir().join(format!("palisade-vnic-attach-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn three_tier() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/three-tier"))
}

fn agent_config(dir: &Path) -> PathBuf {
    let p = dir.join("hv1.toml");
    let text = format!(
        "host = \"hv1\"\npolicy = \"{}\"\nstate_dir = \"{}\"\nworkers = 4\n[underlay]\nlocal = \"192.168.100.1\"\n\
         [[vnic]]\nname = \"web-1.0\"\nvhost_user = \"/run/palisade/vhost/web-1.sock\"\n\
         [[vnic]]\nname = \"app-1.0\"\ninterface = \"vn-app-1\"\n",
        three_tier().display(),
        dir.join("state").display()
    );
    std::fs::write(&p, text).unwrap();
    p
}

fn palisade(args: &[&str], path_env: Option<&Path>) -> Output {
    let mut c = Command::new(EXE);
    c.args(args);
    if let Some(p) = path_env {
        c.env("PATH", p);
    }
    c.output().unwrap()
}

#[test]
fn prints_the_vhost_user_interface_of_a_vm() {
    let dir = TempDir::new("print");
    let config = agent_config(dir.path());
    let out = palisade(
        &[
            "vnic",
            "attach",
            "web-1",
            "--libvirt",
            "--config",
            config.to_str().unwrap(),
        ],
        None,
    );
    assert!(out.status.success(), "{out:?}");
    let xml = String::from_utf8(out.stdout).unwrap();
    let body: String = xml.lines().skip(1).map(|l| format!("{l}\n")).collect();
    assert_eq!(
        body,
        "<interface type='vhostuser'>\n  <mac address='02:00:0a:00:01:0b'/>\n  \
         <source type='unix' path='/run/palisade/vhost/web-1.sock' mode='client'>\n    \
         <reconnect enabled='yes' timeout='1'/>\n  </source>\n  <model type='virtio'/>\n  \
         <driver queues='4'/>\n</interface>\n"
    );
    assert!(xml.starts_with("<!-- web-1.0 of web-1: virsh attach-device "), "{xml}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("<access mode='shared'/>"),
        "the memory backing is asked for: {err}"
    );

    let tap = palisade(
        &[
            "vnic",
            "attach",
            "app-1",
            "--libvirt",
            "--tap",
            "--config",
            config.to_str().unwrap(),
        ],
        None,
    );
    assert!(tap.status.success(), "{tap:?}");
    assert!(String::from_utf8_lossy(&tap.stdout).contains("<target dev='vn-app-1' managed='no'/>"));

    // app-1 is a tap here: asking for vhost-user says so, and fails.
    let wrong = palisade(
        &[
            "vnic",
            "attach",
            "app-1",
            "--libvirt",
            "--config",
            config.to_str().unwrap(),
        ],
        None,
    );
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("bound to interface \"vn-app-1\""),
        "{wrong:?}"
    );
    // web-2 runs on hv2: not this host's to attach.
    let elsewhere = palisade(
        &[
            "vnic",
            "attach",
            "web-2",
            "--libvirt",
            "--config",
            config.to_str().unwrap(),
        ],
        None,
    );
    assert!(
        String::from_utf8_lossy(&elsewhere.stderr).contains("runs on host \"hv2\""),
        "{elsewhere:?}"
    );
}

#[test]
fn apply_runs_virsh_or_says_it_is_missing() {
    let dir = TempDir::new("apply");
    let config = agent_config(dir.path());
    let args = [
        "vnic",
        "attach",
        "web-1",
        "--libvirt",
        "--apply",
        "--domain",
        "web-1-dom",
        "--config",
        config.to_str().unwrap(),
    ];
    // No virsh on the PATH.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = palisade(&args, Some(&empty));
    assert!(!out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("virsh is not installed: nothing applied"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("<interface type='vhostuser'>"));

    // A virsh that records its arguments and the device file it was given.
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let log = dir.path().join("virsh.log");
    let script = format!(
        "#!/bin/sh\n[ \"$1\" = --version ] && {{ echo 9.0.0; exit 0; }}\necho \"$@\" >> {log}\ncat \"$3\" >> {log}\n",
        log = log.display()
    );
    std::fs::write(bin.join("virsh"), script).unwrap();
    std::fs::set_permissions(bin.join("virsh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:/bin:/usr/bin", bin.display());
    let out = palisade(&args, Some(Path::new(&path)));
    assert!(out.status.success(), "{out:?}");
    let recorded = std::fs::read_to_string(&log).unwrap();
    assert!(recorded.starts_with("attach-device web-1-dom /"), "{recorded}");
    assert!(
        recorded.contains("--live --config\n<interface type='vhostuser'>"),
        "{recorded}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("attached web-1.0 of web-1 to domain web-1-dom"));
}
