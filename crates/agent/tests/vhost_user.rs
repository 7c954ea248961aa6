//! vNICs attached through vhost-user, through the agent's own entry points:
//! two guests (the `vhost` crate's frontend playing QEMU, the virtio driver
//! model playing the guest's driver) on one agent with two workers, each
//! guest transmitting on both of its queue pairs. Policy is enforced between
//! them (an allowed and a denied service), `/health` shows the devices, and
//! after the agent stops and starts again on the same sockets the guests
//! reconnect with the same memory and their connection goes on. No root,
//! no QEMU (the lab's `vhost_user` test runs real guests).

mod support;
use support::free_udp_port;
#[path = "../../io/tests/vhost_frontend/mod.rs"]
mod vhost_frontend;
#[path = "../../io/tests/virtio_driver/mod.rs"]
mod virtio_driver;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use palisade_agent::{Agent, AgentConfig, http};
use palisade_wire::tcp::TcpFlags;
use palisade_wire::virtio_net::VirtioNetRepr;
use vhost_frontend::Guest;

/// A group the test may give a socket to: its own (the group of a
/// directory it made), or group 1 when it runs as root.
fn socket_gid(dir: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(dir).unwrap().gid() {
        0 => 1,
        gid => gid,
    }
}

fn config(dir: &Path, port: u16) -> AgentConfig {
    let mut text = format!(
        "host = \"hv1\"\npolicy = \"{}\"\nstate_dir = \"{}\"\nworkers = 2\nstate_snapshot_ms = 0\n\
         [underlay]\nlocal = \"127.0.0.1\"\nport = {port}\n",
        dir.join("policy").display(),
        dir.join("state").display(),
    );
    for vm in 0..2 {
        text += &format!(
            "[[vnic]]\nname = \"vm-{vm}.0\"\nvhost_user = \"{}\"\nqueue_pairs = 2\nsocket_mode = 0o660\n",
            dir.join(format!("vhost/vm-{vm}.sock")).display()
        );
    }
    // The socket goes to another group, as for libvirt's QEMU user.
    text += &format!("socket_group = \"{}\"\n", socket_gid(dir));
    AgentConfig::parse(&text, Path::new("hv1.toml")).unwrap()
}

/// An agent running in its own thread until `stop`.
struct Running {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<usize>,
}

fn start(dir: &Path, port: u16) -> Running {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let config = config(dir, port);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let mut agent = Agent::start(config, s.clone()).unwrap_or_else(|e| panic!("{e}"));
        ready_tx.send(()).unwrap();
        agent.run(&s).unwrap_or_else(|e| panic!("{e}"));
        agent.shutdown().unwrap()
    });
    ready_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the agent started");
    Running { stop, thread }
}

impl Running {
    fn stop(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// The TCP (source port, flags) of the frames `guest` received on either pair within `wait`, until `want` arrived.
fn received(guest: &mut Guest, want: usize, wait: Duration) -> Vec<(u16, u16, TcpFlags)> {
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        for pair in 0..2 {
            for f in guest.received(pair) {
                let tcp = palisade_wire::tcp::Packet::new_checked(&f[34..]).unwrap();
                got.push((tcp.src_port(), tcp.dst_port(), tcp.flags()));
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    got
}

fn connect(dir: &Path, vm: usize, file: Option<std::fs::File>) -> Guest {
    let socket = dir.join(format!("vhost/vm-{vm}.sock"));
    let mut g = match file {
        None => Guest::connect(&socket, 2, u64::MAX),
        Some(f) => Guest::connect_with(&socket, 2, u64::MAX, f, 0),
    };
    for pair in 0..2 {
        g.post_rx(pair, 32, 2048);
    }
    g
}

#[test]
fn guests_on_vhost_user_are_filtered_and_reconnect_after_an_agent_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("policy")).unwrap();
    std::fs::write(dir.join("policy/policy.yaml"), support::policy(2)).unwrap();
    let port = free_udp_port();
    let agent = start(dir, port);
    let mut web = connect(dir, 0, None);
    let mut db = connect(dir, 1, None);
    let meta = std::fs::metadata(dir.join("vhost/vm-1.sock")).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), socket_gid(dir), "the socket's group is socket_group");

    // vm-0 (web tier) opens tcp/5432 to vm-1 (db tier), one SYN on each of
    // its queues: whichever worker takes it from the ring, the one its
    // addresses hash to decides (and keeps the connection).
    web.transmit(0, &VirtioNetRepr::PLAIN, &support::syn(0, 1, 40000, 5432));
    web.transmit(1, &VirtioNetRepr::PLAIN, &support::syn(0, 1, 40001, 5432));
    // Telnet is denied everywhere: never delivered.
    web.transmit(1, &VirtioNetRepr::PLAIN, &support::syn(0, 1, 40002, 23));
    let mut at_db = received(&mut db, 2, Duration::from_secs(5));
    at_db.sort_unstable();
    assert_eq!(
        at_db,
        [(40000, 5432, TcpFlags::SYN), (40001, 5432, TcpFlags::SYN)],
        "the allowed SYNs, and not telnet"
    );
    // The db replies on either queue: both replies reach web (a worker
    // without the connection would drop a SYN-ACK it never saw open).
    let synack = |sport| support::tcp_frame(1, 0, 5432, sport, TcpFlags::SYN | TcpFlags::ACK, 5000, 1001);
    db.transmit(1, &VirtioNetRepr::PLAIN, &synack(40000));
    db.transmit(0, &VirtioNetRepr::PLAIN, &synack(40001));
    let mut at_web = received(&mut web, 2, Duration::from_secs(5));
    at_web.sort_unstable();
    // (Telnet is denied, not rejected: dropped without a reply.)
    assert_eq!(
        at_web,
        [
            (5432, 40000, TcpFlags::SYN | TcpFlags::ACK),
            (5432, 40001, TcpFlags::SYN | TcpFlags::ACK),
        ]
    );
    assert!(
        received(&mut db, 1, Duration::from_millis(300)).is_empty(),
        "no telnet at db"
    );

    // /health shows both devices, connected, with the offloads negotiated.
    let deadline = Instant::now() + Duration::from_secs(5);
    let health = loop {
        let text = http::get_unix(&dir.join("state/agent.sock"), "/health").unwrap();
        let body = text.split("\r\n\r\n").nth(1).unwrap_or(&text).to_string();
        let h: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if h["vhost_user"][1]["connected"] == true || Instant::now() > deadline {
            break h;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let devices = health["vhost_user"].as_array().expect("vhost_user in /health");
    assert_eq!(devices.len(), 2, "{health}");
    for d in devices {
        assert_eq!(d["connected"], true, "{d}");
        assert_eq!(d["queue_pairs_running"], 2, "{d}");
        assert_eq!(d["features"]["tso4_from_guest"], true, "{d}");
    }

    // The agent stops (its connections saved) and starts again on the same
    // sockets; the guests reconnect with the same memory, as QEMU does.
    assert_eq!(agent.stop(), 2, "both connections saved");
    let Guest { file: web_mem, .. } = web;
    let Guest { file: db_mem, .. } = db;
    let agent = start(dir, port);
    let mut web = connect(dir, 0, Some(web_mem));
    let mut db = connect(dir, 1, Some(db_mem));
    // The handshake goes on across the restart: web's ACK passes.
    web.transmit(
        1,
        &VirtioNetRepr::PLAIN,
        &support::tcp_frame(0, 1, 40000, 5432, TcpFlags::ACK, 1001, 5001),
    );
    assert_eq!(
        received(&mut db, 1, Duration::from_secs(5)),
        [(40000, 5432, TcpFlags::ACK)]
    );
    // And policy still holds.
    web.transmit(0, &VirtioNetRepr::PLAIN, &support::syn(0, 1, 40003, 23));
    assert!(received(&mut db, 1, Duration::from_millis(300)).is_empty());
    agent.stop();
}

/// Send `SEND_RARP(mac)` with `NEED_REPLY` on the guest's raw vhost-user
/// socket, as QEMU does after a migration, and read the acknowledgement
/// (0: announced, 1: refused).
fn send_rarp(guest: &mut Guest, mac: [u8; 6]) -> u64 {
    use std::io::{Read, Write};
    let mut msg = Vec::new();
    // Request 19 (SEND_RARP), flags version 1 | NEED_REPLY, an 8-byte body.
    for v in [19u32, 0x1 | 0x8, 8] {
        msg.extend_from_slice(&v.to_le_bytes());
    }
    let mut body = [0u8; 8];
    body[..6].copy_from_slice(&mac);
    msg.extend_from_slice(&body);
    guest.raw.write_all(&msg).unwrap();
    guest.raw.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut reply = [0u8; 20];
    guest
        .raw
        .read_exact(&mut reply)
        .expect("an acknowledgement of SEND_RARP");
    assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), 19);
    u64::from_le_bytes(reply[12..20].try_into().unwrap())
}

/// The MAC a vhost-user vNIC may announce follows the inventory: after a
/// policy reload that changes vm-0's MAC, QEMU's announcement of the new
/// one goes out and one of the old one is refused.
#[test]
fn a_policy_reload_gives_a_vhost_user_vnic_the_inventorys_new_mac() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("policy")).unwrap();
    std::fs::write(dir.join("policy/policy.yaml"), support::policy(2)).unwrap();
    let agent = start(dir, free_udp_port());
    let mut web = connect(dir, 0, None);
    let old = support::mac(0).0;
    let new = [0x02, 0, 0, 0, 0x09, 0];
    assert_eq!(send_rarp(&mut web, old), 0, "the inventory's MAC is announced");
    assert_eq!(send_rarp(&mut web, new), 1, "another MAC is not");

    let policy = support::policy(2).replace(&support::mac(0).to_string(), "02:00:00:00:09:00");
    assert_ne!(policy, support::policy(2));
    std::fs::write(dir.join("policy/policy.yaml"), policy).unwrap();
    // The agent reloads the policy on its own (it watches the directory).
    let deadline = Instant::now() + Duration::from_secs(20);
    while send_rarp(&mut web, new) != 0 {
        assert!(Instant::now() < deadline, "the new MAC was never announced");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(send_rarp(&mut web, old), 1, "the old MAC is refused now");
    agent.stop();
}
