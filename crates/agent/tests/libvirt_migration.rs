//! The libvirt driver against real libvirt daemons: two `libvirtd`, each in
//! a network and mount namespace of its own (two hosts), a TCG guest
//! (`<domain type='qemu'>`) migrated live between them with the driver's
//! own `virsh migrate --live --p2p --suspend`: the switchover step runs
//! while the guest is paused on the destination and runs nowhere, then the
//! guest resumes there; a failing step brings it back, running, to its
//! source. Needs root, `libvirtd`, `virsh`, `ip` and `qemu-system-x86_64`;
//! skipped (and said so) without them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use palisade_agent::config::LibvirtConfig;
use palisade_agent::hypervisor::{Driver, GuestAt, Libvirt, domain_state};

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Two namespaces with a libvirtd each; removed on drop.
struct Hosts {
    dir: PathBuf,
    ns: [String; 2],
}

const ADDR: [&str; 2] = ["10.99.0.1", "10.99.0.2"];

impl Hosts {
    fn up(tag: &str) -> Hosts {
        let dir = std::env::temp_dir().join(format!("palisade-libvirt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ns = [0, 1].map(|i| format!("plv{i}-{}", std::process::id()));
        let h = Hosts { dir, ns };
        let sh = |script: &str| {
            let out = Command::new("sh").args(["-ec", script]).output().unwrap();
            assert!(
                out.status.success(),
                "{script}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        // libvirtd wants its users even when it runs guests as root.
        sh("getent passwd libvirt-qemu >/dev/null || useradd --system --no-create-home libvirt-qemu");
        sh("getent group kvm >/dev/null || groupadd --system kvm");
        sh(&format!(
            "ip netns add {a}; ip netns add {b}
             ip link add {a}v type veth peer name {b}v
             ip link set {a}v netns {a}; ip link set {b}v netns {b}
             ip -n {a} addr add {ia}/24 dev {a}v; ip -n {a} link set {a}v up; ip -n {a} link set lo up
             ip -n {b} addr add {ib}/24 dev {b}v; ip -n {b} link set {b}v up; ip -n {b} link set lo up",
            a = h.ns[0],
            b = h.ns[1],
            ia = ADDR[0],
            ib = ADDR[1]
        ));
        for (i, addr) in ADDR.iter().enumerate() {
            let d = h.dir.join(format!("h{i}"));
            for sub in ["etc", "lib", "log", "cache"] {
                std::fs::create_dir_all(d.join(sub)).unwrap();
            }
            std::fs::write(
                d.join("etc/libvirtd.conf"),
                format!(
                    "listen_tls = 0\nlisten_tcp = 1\nlisten_addr = \"{addr}\"\nauth_tcp = \"none\"\n\
                     auth_unix_rw = \"none\"\nhost_uuid = \"00000000-0000-4000-8000-00000000000{n}\"\n",
                    n = i + 1
                ),
            )
            .unwrap();
            std::fs::write(
                d.join("etc/qemu.conf"),
                format!(
                    "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nsecurity_driver = \"none\"\n\
                     cgroup_controllers = [ ]\nremember_owner = 0\nstdio_handler = \"file\"\n\
                     migration_address = \"{addr}\"\nmigration_host = \"{addr}\"\n"
                ),
            )
            .unwrap();
            let d = d.display();
            // A private mount namespace: this instance's configuration,
            // runtime and state directories over the system's.
            sh(&format!(
                "mkdir -p /run/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt
                 ip netns exec {ns} unshare -m --propagation private sh -c '
                   mount --bind {d}/etc /etc/libvirt
                   mount -t tmpfs none /run/libvirt
                   mount --bind {d}/lib /var/lib/libvirt
                   mount --bind {d}/log /var/log/libvirt
                   mount --bind {d}/cache /var/cache/libvirt
                   exec libvirtd --listen -d -f /etc/libvirt/libvirtd.conf -p {d}/libvirtd.pid' \
                   >{d}/stdout 2>&1",
                ns = h.ns[i]
            ));
        }
        // Up when both answer.
        for i in 0..2 {
            let mut ok = false;
            for _ in 0..100 {
                if h.virsh(i, &["version"]).0 {
                    ok = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            assert!(ok, "libvirtd {i} did not come up");
        }
        h
    }

    fn uri(i: usize) -> String {
        format!("qemu+tcp://{}/system", ADDR[i])
    }

    /// `virsh` as the driver runs it: in host 0's namespace, which reaches both daemons.
    fn wrapper(&self) -> PathBuf {
        let p = self.dir.join("virsh");
        std::fs::write(
            &p,
            format!("#!/bin/sh\nexec ip netns exec {} virsh \"$@\"\n", self.ns[0]),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// `virsh -c HOST-i's URI args`: success and stdout.
    fn virsh(&self, i: usize, args: &[&str]) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns[0], "virsh", "-c", &Hosts::uri(i)])
            .args(args)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn state(&self, i: usize, vm: &str) -> Option<String> {
        let (ok, out) = self.virsh(i, &["domstate", vm]);
        ok.then(|| domain_state(&out).unwrap_or("").to_string())
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for i in 0..2 {
            let _ = self.virsh(i, &["destroy", "plv-guest"]);
            let _ = self.virsh(i, &["undefine", "plv-guest"]);
            if let Ok(pid) = std::fs::read_to_string(self.dir.join(format!("h{i}/libvirtd.pid"))) {
                let _ = Command::new("kill").arg(pid.trim()).status();
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn driver(virsh: &Path, from: usize, to: usize) -> Libvirt {
    let config = LibvirtConfig {
        virsh: Some(virsh.display().to_string()),
        uri: Some(Hosts::uri(from)),
        destination_uri: Hosts::uri(to),
        migrate_uri: Some(format!("tcp://{}", ADDR[to])),
        source_uri: None,
    };
    Libvirt::new(&config, "plv-guest", "hv2", Duration::from_secs(120)).unwrap()
}

#[test]
fn libvirt_migration_runs_the_step_while_the_guest_is_paused_on_the_destination() {
    let root = is_root();
    if !root
        || !["libvirtd", "virsh", "ip", "qemu-system-x86_64"]
            .iter()
            .all(|c| have(c))
    {
        eprintln!("skipping: needs root, libvirtd, virsh, ip and qemu-system-x86_64");
        return;
    }
    let hosts = Hosts::up("mig");
    let xml = hosts.dir.join("guest.xml");
    std::fs::write(
        &xml,
        "<domain type='qemu'><name>plv-guest</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='network'/></os>\
         <devices><emulator>/usr/bin/qemu-system-x86_64</emulator><memballoon model='none'/></devices></domain>",
    )
    .unwrap();
    let xml = xml.display().to_string();
    assert!(hosts.virsh(0, &["define", &xml]).0);
    assert!(hosts.virsh(0, &["start", "plv-guest"]).0);
    assert_eq!(hosts.state(0, "plv-guest").as_deref(), Some("running"));
    let virsh = hosts.wrapper();

    // Host 0 → host 1: the step sees the guest paused there and gone here.
    let mut seen = None;
    driver(&virsh, 0, 1)
        .migrate(&mut || {
            seen = Some((hosts.state(1, "plv-guest"), hosts.state(0, "plv-guest")));
            Ok(())
        })
        .unwrap_or_else(|f| panic!("{f:?}"));
    assert_eq!(seen, Some((Some("paused".into()), None)), "during the step");
    assert_eq!(hosts.state(1, "plv-guest").as_deref(), Some("running"));
    assert_eq!(hosts.state(0, "plv-guest"), None, "undefined on the source");

    // Host 1 → host 0 with a failing step: the guest comes back to host 1, running.
    let f = driver(&virsh, 1, 0)
        .migrate(&mut || {
            assert_eq!(hosts.state(0, "plv-guest").as_deref(), Some("paused"));
            Err("the destination agent refused the state".into())
        })
        .unwrap_err();
    assert_eq!(f.guest, GuestAt::Source, "{}", f.reason);
    assert!(f.reason.contains("migrated back"), "{}", f.reason);
    assert_eq!(hosts.state(1, "plv-guest").as_deref(), Some("running"));
    assert_eq!(hosts.state(0, "plv-guest"), None);

    // A destination that is not there: refused, the guest stays, no step.
    let config = LibvirtConfig {
        virsh: Some(virsh.display().to_string()),
        uri: Some(Hosts::uri(1)),
        destination_uri: "qemu+tcp://10.99.0.9/system".into(),
        migrate_uri: None,
        source_uri: None,
    };
    let mut nowhere = Libvirt::new(&config, "plv-guest", "hv9", Duration::from_secs(60)).unwrap();
    let f = nowhere.migrate(&mut || panic!("no step")).unwrap_err();
    assert_eq!(f.guest, GuestAt::Source);
    eprintln!("unreachable destination: {}", f.reason);
    assert_eq!(hosts.state(1, "plv-guest").as_deref(), Some("running"));
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
