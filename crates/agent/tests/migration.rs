//! One vNIC's connection state moved between hosts (live migration), through
//! the agent's `migrate` module and its Unix-socket endpoint: the workers'
//! shares merged into one blob on the source, split again by steering on the
//! destination (whatever the two hosts' numbers of workers), connections
//! continuing there as established, and every hostile blob or request
//! refused with nothing imported. An agent with no ports needs no privileges.

mod support;
use support::agent_config as config;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use palisade_agent::migrate::{self, MigrateError};
use palisade_agent::{Agent, http};
use palisade_datapath::state::{self, StateError};
use palisade_datapath::{Disposition, DropReason, Engine};
use palisade_datapath::{EventKind, FlowEvent, Results};
use palisade_io::steer;
use palisade_wire::flow::FlowKey;
use palisade_wire::tcp::TcpFlags;

const VMS: usize = 8;

fn keys(blob: &[u8]) -> BTreeSet<FlowKey> {
    state::decode(blob).unwrap().conns.into_iter().map(|c| c.key).collect()
}

fn worker_of(from: usize, to: usize, workers: usize) -> usize {
    steer::addresses_worker(support::ip(from).into(), support::ip(to).into(), workers as u32) as usize
}

/// A host of `workers` engines (one per worker) with every VM's vNIC.
fn host(c: &palisade_policy::compile::Compiler, workers: usize) -> Vec<support_engine::W> {
    (0..workers).map(|_| support_engine::W(support::engine(c))).collect()
}

mod support_engine {
    /// A worker's engine and its ports.
    pub struct W(pub palisade_datapath::host::HostEngine);
}

fn engines(h: &mut [support_engine::W]) -> Vec<&mut Engine> {
    h.iter_mut().map(|w| &mut w.0.engine).collect()
}

/// Run a TCP segment through the worker it is steered to.
fn send(
    h: &mut [support_engine::W],
    (from, to): (usize, usize),
    (sport, dport): (u16, u16),
    flags: TcpFlags,
    (seq, ack): (u32, u32),
    now: u64,
) -> (Disposition, Vec<FlowEvent>) {
    let w = &mut h[worker_of(from, to, h.len())].0;
    let mut events = Vec::new();
    let frame = support::tcp_frame(from, to, sport, dport, flags, seq, ack);
    let d = w
        .engine
        .process(now, w.ports[from], &frame, &mut events, &mut Results::new())
        .disposition;
    (d, events)
}

/// Establish vm-`web` → vm-`db`:`5432` from `sport` (handshake both ways).
fn establish(h: &mut [support_engine::W], web: usize, db: usize, sport: u16, now: u64) {
    for (dir, flags, seq_ack) in [
        ((web, db), TcpFlags::SYN, (1000, 0)),
        ((db, web), TcpFlags::SYN | TcpFlags::ACK, (5000, 1001)),
        ((web, db), TcpFlags::ACK, (1001, 5001)),
    ] {
        let ports = if dir.0 == web { (sport, 5432) } else { (5432, sport) };
        let (d, _) = send(h, dir, ports, flags, seq_ack, now);
        assert_eq!(d, Disposition::Forward, "{dir:?} {flags:?}");
    }
}

#[test]
fn a_vnic_moves_with_its_connections_between_hosts_of_any_worker_counts() {
    let c = support::compiler(VMS);
    for (src_workers, dst_workers) in [(1, 1), (2, 3), (3, 1), (1, 4)] {
        let mut src = host(&c, src_workers);
        // vm-0's connections (the VM that moves), and vm-2's (which stays).
        let mut moving = BTreeSet::new();
        for db in [1, 3, 5, 7] {
            for sport in [40000, 40001] {
                establish(&mut src, 0, db, sport, 1);
                moving.insert((db, sport));
            }
        }
        establish(&mut src, 2, 1, 40000, 1);
        let blob = migrate::export(&mut engines(&mut src), "vm-0.0", 10).unwrap();
        let exported = keys(&blob);
        eprintln!(
            "{src_workers} → {dst_workers} workers: {} connections in {} bytes",
            exported.len(),
            blob.len()
        );
        assert_eq!(exported.len(), moving.len(), "{src_workers} → {dst_workers}");
        assert_eq!(migrate::claimed_count(&blob), Some(exported.len()));
        assert_eq!(migrate::claimed_count(&blob[..17]), None, "a cut header claims nothing");
        assert!(
            exported
                .iter()
                .all(|k| k.src_addr() == std::net::IpAddr::from(support::ip(0)))
        );
        // The source keeps them (a failed migration resumes with its state).
        let kept: usize = src.iter().map(|w| w.0.engine.conntrack().len()).sum();
        assert_eq!(kept, moving.len() + 1);

        let mut dst = host(&c, dst_workers);
        assert_eq!(
            migrate::import(&mut engines(&mut dst), "vm-0.0", &blob, 20).unwrap(),
            moving.len()
        );
        for (i, w) in dst.iter().enumerate() {
            for (_, conn) in w.0.engine.conntrack().iter() {
                let k = conn.key;
                assert_eq!(
                    steer::addresses_worker(k.src_addr(), k.dst_addr(), dst_workers as u32) as usize,
                    i,
                    "{k:?} imported into the worker its flows are steered to"
                );
            }
        }
        // Each stream continues on the destination as the connection it was:
        // forwarded, no new flow (a fresh host would pick it up as one).
        for &(db, sport) in &moving {
            let (d, events) = send(
                &mut dst,
                (db, 0),
                (5432, sport),
                TcpFlags::ACK | TcpFlags::PSH,
                (5001, 1001),
                30,
            );
            assert_eq!(d, Disposition::Forward);
            assert!(
                !events.iter().any(|e| e.kind == EventKind::Start),
                "vm-{db}:{sport} continued without a new flow: {events:?}"
            );
        }
        let mut fresh = host(&c, dst_workers);
        // Without the state the db side's segment is a new flow the policy does not allow.
        let (d, _) = send(
            &mut fresh,
            (1, 0),
            (5432, 40000),
            TcpFlags::ACK | TcpFlags::PSH,
            (5001, 1001),
            30,
        );
        assert!(matches!(d, Disposition::Drop(_)), "without the state: {d:?}");
        // What the policy denies stays denied.
        let (d, _) = send(&mut dst, (0, 1), (40100, 23), TcpFlags::SYN, (1, 0), 31);
        assert_eq!(d, Disposition::Drop(DropReason::PolicyDeny));
    }
}

#[test]
fn hostile_blobs_are_refused_and_import_nothing() {
    let c = support::compiler(VMS);
    let mut src = host(&c, 2);
    establish(&mut src, 0, 1, 40000, 1);
    establish(&mut src, 0, 3, 40000, 1);
    let blob = migrate::export(&mut engines(&mut src), "vm-0.0", 10).unwrap();
    let other = migrate::export(&mut engines(&mut src), "vm-2.0", 10).unwrap();
    let mut dst = host(&c, 3);
    let empty = |dst: &[support_engine::W]| dst.iter().all(|w| w.0.engine.conntrack().is_empty());

    // Every truncation and every single-byte change is refused: nothing goes in.
    for len in 0..blob.len() {
        let r = migrate::import(&mut engines(&mut dst), "vm-0.0", &blob[..len], 20);
        assert!(matches!(r, Err(MigrateError::Refused(_))), "truncated to {len}: {r:?}");
    }
    for i in 0..blob.len() {
        for bit in [0x01, 0x80] {
            let mut bad = blob.clone();
            bad[i] ^= bit;
            let r = migrate::import(&mut engines(&mut dst), "vm-0.0", &bad, 20);
            assert!(matches!(r, Err(MigrateError::Refused(_))), "byte {i} ^ {bit:#x}: {r:?}");
        }
    }
    let mut longer = blob.clone();
    longer.push(0);
    assert!(migrate::import(&mut engines(&mut dst), "vm-0.0", &longer, 20).is_err());
    assert!(empty(&dst));

    // Another vNIC's state, a vNIC this host does not have.
    assert_eq!(
        migrate::import(&mut engines(&mut dst), "vm-0.0", &other, 20),
        Err(MigrateError::Refused(StateError::ForeignVnic {
            expected: "vm-0.0".into(),
            found: "vm-2.0".into()
        }))
    );
    assert_eq!(
        migrate::export(&mut engines(&mut dst), "nope.0", 20),
        Err(MigrateError::UnknownVnic("nope.0".into()))
    );
    assert!(empty(&dst));
    // Merging refuses blobs of different vNICs.
    assert!(matches!(
        migrate::merge(&[blob.clone(), other.clone()]),
        Err(StateError::ForeignVnic { .. })
    ));
    // And what was refused did not stop the good blob.
    assert_eq!(migrate::import(&mut engines(&mut dst), "vm-0.0", &blob, 20).unwrap(), 2);
}

/// Send raw bytes to the socket, half-close, return the status line.
fn raw(sock: &Path, request: &[u8]) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    let _ = s.write_all(request);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines().next().unwrap_or("").to_string()
}

#[test]
fn the_agent_socket_answers_migration_requests_and_refuses_bad_ones() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("policy")).unwrap();
    std::fs::write(tmp.path().join("policy/policy.yaml"), support::policy(VMS)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let agent = Agent::start(config(tmp.path()), stop.clone()).unwrap();
    let sock = tmp.path().join("state/agent.sock");

    // A good blob for a vNIC this agent does not attach.
    let c = support::compiler(VMS);
    let mut src = host(&c, 1);
    establish(&mut src, 0, 1, 40000, 1);
    let blob = migrate::export(&mut engines(&mut src), "vm-0.0", 10).unwrap();

    let cases: [(&str, &[u8], &str); 6] = [
        (
            "/vnics/vm-0.0/export",
            b"",
            "404 Not Found: no vNIC \"vm-0.0\" on this host",
        ),
        (
            "/vnics/vm-0.0/import",
            &blob,
            "404 Not Found: no vNIC \"vm-0.0\" on this host",
        ),
        (
            "/vnics/vm-0.0/import",
            b"PLSDCT\0\x02junk",
            "400 Bad Request: state blob refused",
        ),
        (
            "/vnics/vm-2.0/import",
            &blob,
            "400 Bad Request: state blob refused: state blob is for vNIC",
        ),
        ("/vnics/vm-0.0/explode", b"", "404 Not Found: not found: no action"),
        (
            "/vnics/vm-0.0/export?peer=../x",
            b"",
            "400 Bad Request: bad peer host name",
        ),
    ];
    for (path, body, want) in cases {
        let e = http::post_unix(&sock, path, body).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("HTTP/1.1 {want}")) || e.starts_with(want),
            "{path}: {e}"
        );
    }
    let big = palisade_agent::migrate::MAX_BLOB + 1;
    let statuses = [
        (
            format!("POST /vnics/vm-0.0/import HTTP/1.1\r\nContent-Length: {big}\r\n\r\n"),
            "413",
        ),
        ("POST /vnics/vm-0.0/import HTTP/1.1\r\n\r\n".to_string(), "411"),
        (
            "POST /vnics/vm-0.0/import HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_string(),
            "400",
        ),
        (
            "POST /vnics/vm-0.0/import HTTP/1.1\r\nContent-Length: 100\r\n\r\nshort".to_string(),
            "400",
        ),
        ("GET /vnics/vm-0.0/export HTTP/1.1\r\n\r\n".to_string(), "405"),
        ("POST /vnics//export HTTP/1.1\r\n\r\n".to_string(), "400"),
        ("POST /vnics/x HTTP/1.1\r\n\r\n".to_string(), "404"),
        (
            format!("POST /vnics/x/export HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000)),
            "400",
        ),
    ];
    for (request, status) in &statuses {
        let line = raw(&sock, request.as_bytes());
        assert!(
            line.starts_with(&format!("HTTP/1.1 {status}")),
            "{:.60}: {line}",
            request
        );
    }
    // The GET routes still answer on the same socket, and the drop reason is exported.
    let metrics = http::get_unix(&sock, "/metrics").unwrap();
    assert!(
        metrics.contains("palisade_vnic_migrating_drops_total{host=\"hv1\"} 0\n"),
        "{metrics}"
    );
    assert!(http::get_unix(&sock, "/health").is_ok());
    drop(agent);
    stop.store(true, Ordering::Relaxed);
}
