//! `palisade alerts`: reads an agent's `/alerts` over its Unix socket (here a
//! stand-in serving fixed records), filters, and prints both ends.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::Command;

const ALERTS: &str = r#"[
 {"timestamp":"2026-12-05T03:00:00.000000000Z","time_ns":1,"host":"hv1","proto":"TCP",
  "src_ip":"198.51.100.7","src_port":40000,"dest_ip":"10.0.1.11","dest_port":80,
  "alert":{"action":"blocked","rule_action":"drop","signature_id":9100001,"rev":1,"signature":"marker\u001b[31m","category":null,"severity":3},
  "profile":"full","src":null,
  "dest":{"name":"web-1","uuid":"6d1f3c2a-8b7e-4c59-9a1d-0f2e3b4c5d01","vnic":"web-1.0","zone":"web","cluster":"prod","host":"hv1","tags":{"tier":"web"}}},
 {"timestamp":"2026-12-05T03:00:01.000000000Z","time_ns":2,"host":"hv1","proto":"TCP",
  "src_ip":"10.0.1.11","src_port":41000,"dest_ip":"10.0.2.21","dest_port":8080,
  "alert":{"action":"allowed","rule_action":"alert","signature_id":2,"rev":1,"signature":"critical","category":null,"severity":1},
  "profile":"critical","src":null,"dest":null}
]"#;

/// A stand-in agent socket answering `n` requests with the alerts above.
fn serve(n: usize) -> (PathBuf, std::thread::JoinHandle<()>) {
    let dir = std::env::temp_dir().join(format!("palisade-alerts-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("agent.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let h = std::thread::spawn(move || {
        for _ in 0..n {
            let (mut s, _) = listener.accept().unwrap();
            // The request, up to the end of its head.
            let mut req = Vec::new();
            let mut buf = [0u8; 256];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            assert!(req.starts_with(b"GET /alerts "), "{}", String::from_utf8_lossy(&req));
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{ALERTS}",
                ALERTS.len()
            );
        }
    });
    (sock, h)
}

fn palisade(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn alerts_are_printed_with_both_ends_and_filtered() {
    let (sock, h) = serve(3);
    let s = sock.to_str().unwrap();
    let out = palisade(&["alerts", "--socket", s]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("blocked drop [9100001:1]")
            && lines[0].contains("198.51.100.7:40000 (external) -> 10.0.1.11:80 (web-1 web-1.0 zone web)")
            && lines[0].contains("profile full"),
        "{text}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "control characters in rule text are escaped: {text:?}"
    );
    let out = palisade(&["alerts", "--socket", s, "--action", "allowed", "--json"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("\"signature_id\":2"), "{text}");
    let out = palisade(&["alerts", "--socket", s, "--vm", "web-1"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    h.join().unwrap();

    let out = palisade(&["alerts", "--socket", s, "--action", "dropped"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("allowed or blocked"),
        "{out:?}"
    );
    let out = palisade(&["alerts", "--socket", "/nonexistent/agent.sock"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/agent.sock"),
        "{out:?}"
    );
}

/// `palisade alerts --server URL`: the controller's alerts, filtered there
/// (host, sid, action, VM, time, last N), printed with their host.
#[test]
fn alerts_come_from_the_controller_with_server() {
    use palisade_api::client::{Client, ClientAuth};
    use palisade_controller::core::Controller;
    use palisade_controller::server::{self, ServeOptions};
    use palisade_controller::store::{EmbeddedStore, Store};
    use std::sync::Arc;

    let dir = std::env::temp_dir().join(format!("palisade-alerts-ctl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.join("s.redb")).unwrap());
    let ctl = Controller::new(store);
    let admin = ctl
        .create_token("local", "alice", palisade_api::roles::Role::Admin)
        .unwrap();
    let reader = ctl
        .create_token("local", "rita", palisade_api::roles::Role::ReadOnly)
        .unwrap();
    let srv = server::spawn(ctl, ServeOptions::plain("127.0.0.1:0".parse().unwrap())).unwrap();
    let url = srv.url();
    let records: Vec<palisade_audit::record::AlertRecord> = serde_json::from_str(ALERTS).unwrap();
    let agent = Client::new(&url, ClientAuth::Token(admin)).unwrap();
    agent.push_alerts("hv1", &records).unwrap();
    let mut other = records[0].clone();
    other.host = "hv2".into();
    other.time_ns = 3;
    other.count = 7;
    agent.push_alerts("hv2", &[other]).unwrap();

    let ask = |extra: &[&str]| {
        let mut args = vec!["alerts", "--server", &url, "--token", &reader];
        args.extend_from_slice(extra);
        palisade(&args)
    };
    let out = ask(&[]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].contains(" hv1 blocked drop [9100001:1]")
            && lines[0].contains("198.51.100.7:40000 (external) -> 10.0.1.11:80 (web-1 web-1.0 zone web)"),
        "{text}"
    );
    assert!(
        lines[2].contains(" hv2 blocked drop") && lines[2].contains("(x7)"),
        "{text}"
    );
    assert!(!text.contains('\u{1b}'), "{text:?}");
    for (extra, want) in [
        (&["--host", "hv2"][..], vec![3]),
        (&["--sid", "9100001"][..], vec![1, 3]),
        (&["--action", "allowed"][..], vec![2]),
        (&["--vm", "web-1", "--host", "hv1"][..], vec![1]),
        (&["--last", "2"][..], vec![2, 3]),
        (&["--since", "2", "--until", "3"][..], vec![2]),
    ] {
        let out = ask(&[extra, &["--json"]].concat());
        assert!(out.status.success(), "{extra:?}: {out:?}");
        let got: Vec<u64> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["time_ns"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(got, want, "{extra:?}");
    }
    // --host only makes sense with --server; --server and --socket exclude each other.
    let out = palisade(&["alerts", "--host", "hv1"]);
    assert!(!out.status.success(), "{out:?}");
    let out = ask(&["--socket", "/tmp/x.sock"]);
    assert!(!out.status.success(), "{out:?}");
    // A bad token is the controller's 401, said as such.
    let out = palisade(&["alerts", "--server", &url, "--token", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"), "{out:?}");
    srv.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
