//! Inline inspection's alerts through the API: agents push their own over
//! mutual TLS (`POST /v1/agents/{host}/alerts`), any role reads them with
//! filters (`GET /v1/alerts`); foreign hosts, oversized batches, unknown
//! fields and bad parameters are refused, and nothing refused is kept.

mod common;

use std::sync::Arc;

use common::*;
use palisade_api::client::{Client, ClientAuth, ClientError};
use palisade_api::roles::Role;
use palisade_api::{AlertQuery, MAX_ALERT_BATCH};
use palisade_audit::record::{AlertInfo, AlertRecord, VmIdentity};
use palisade_controller::core::Controller;
use palisade_controller::server::{self, ServeOptions};
use palisade_controller::store::{EmbeddedStore, Store};
use palisade_controller::tls;

fn status(r: Result<impl std::fmt::Debug, ClientError>) -> u16 {
    match r {
        Err(ClientError::Api { status, .. }) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// An alert of `host` at `i` ms: sid 1 blocked towards `vm`, else sid 2 allowed.
fn alert(host: &str, i: u64, blocked: bool, vm: &str) -> AlertRecord {
    let t = 1_700_000_000_000_000_000 + i * 1_000_000;
    AlertRecord {
        timestamp: palisade_audit::time::format_rfc3339(t),
        time_ns: t,
        host: host.into(),
        flow_id: 1000 + i,
        proto: "TCP".into(),
        src_ip: "198.51.100.7".parse().unwrap(),
        src_port: 40000,
        dest_ip: "10.0.1.11".parse().unwrap(),
        dest_port: 80,
        alert: AlertInfo {
            action: if blocked { "blocked" } else { "allowed" }.into(),
            rule_action: if blocked { "drop" } else { "alert" }.into(),
            signature_id: if blocked { 1 } else { 2 },
            rev: 1,
            signature: "marker".into(),
            category: None,
            severity: 1,
        },
        profile: "full".into(),
        decided_by: Vec::new(),
        src: None,
        dest: Some(VmIdentity {
            name: vm.into(),
            uuid: "u".into(),
            vnic: format!("{vm}.0"),
            zone: "web".into(),
            cluster: None,
            host: Some(host.into()),
            tags: Default::default(),
        }),
        count: 1,
        last_ns: t,
    }
}

#[test]
fn agents_push_their_own_alerts_over_mtls_and_every_role_reads_them_filtered() {
    let tmp = TempDir::new("alerts-mtls");
    let ca = tmp.0.join("ca");
    test_ca(&ca, &["hv1", "hv2"]);
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&tmp.0.join("s.redb")).unwrap());
    let ctl = Controller::new(store);
    let tokens: Vec<String> = [Role::ReadOnly, Role::Auditor, Role::Operator, Role::Admin]
        .into_iter()
        .enumerate()
        .map(|(i, r)| ctl.create_token("local", &format!("t{i}"), r).unwrap())
        .collect();
    let cfg = tls::server_config(
        &ca.join("ca.pem"),
        &ca.join("controller.pem"),
        &ca.join("controller.key"),
    )
    .unwrap();
    let mut opts = ServeOptions::plain("127.0.0.1:0".parse().unwrap());
    opts.tls = Some(cfg);
    let srv = server::spawn(ctl.clone(), opts).unwrap();
    let url = srv.url();
    let hv1 = agent(&ca, &url, "hv1");
    let hv2 = agent(&ca, &url, "hv2");
    let token = |t: &str| {
        Client::new(&url, ClientAuth::Token(t.to_string()))
            .unwrap()
            .with_ca(&ca.join("ca.pem"))
            .unwrap()
    };
    let reader = token(&tokens[0]);

    let ours = vec![
        alert("hv1", 1, true, "web-1"),
        alert("hv1", 2, false, "web-1"),
        alert("hv1", 3, false, "web-2"),
    ];
    let r = hv1.push_alerts("hv1", &ours).unwrap();
    assert_eq!((r.accepted, r.kept, r.evicted), (3, 3, 0));
    hv2.push_alerts("hv2", &[alert("hv2", 4, true, "web-1")]).unwrap();

    // A host pushes only its own: another host's path, another host's record, no certificate.
    assert_eq!(status(hv2.push_alerts("hv1", &ours[..1])), 403);
    match hv1.push_alerts("hv1", &[alert("hv1", 5, true, "x"), alert("hv2", 6, true, "x")]) {
        Err(ClientError::Api { status: 400, error, .. }) => {
            assert!(error.contains("alert 1") && error.contains("hv2"), "{error}")
        }
        other => panic!("expected 400, got {other:?}"),
    }
    assert_eq!(status(reader.push_alerts("hv1", &ours[..1])), 401);
    let big: Vec<AlertRecord> = (0..=MAX_ALERT_BATCH as u64)
        .map(|i| alert("hv1", 100 + i, false, "x"))
        .collect();
    assert_eq!(status(hv1.push_alerts("hv1", &big)), 413);
    assert_eq!(ctl.status().alerts.received, 4, "nothing refused was kept");

    // Every role reads; an agent certificate is no API token.
    for t in &tokens {
        let all = token(t).alerts(&AlertQuery::default()).unwrap();
        assert_eq!(all.alerts.len(), 4);
        assert!(!all.truncated);
    }
    assert_eq!(status(hv1.alerts(&AlertQuery::default())), 401);
    // Filters, each and together; the records come back whole, oldest first.
    let q = |f: fn(&mut AlertQuery)| {
        let mut q = AlertQuery::default();
        f(&mut q);
        reader.alerts(&q).unwrap().alerts
    };
    assert_eq!(q(|_| {})[..3], ours[..]);
    let ids = |v: Vec<AlertRecord>| v.iter().map(|a| (a.host.clone(), a.flow_id)).collect::<Vec<_>>();
    assert_eq!(ids(q(|q| q.host = Some("hv2".into()))), [("hv2".to_string(), 1004)]);
    assert_eq!(
        ids(q(|q| q.sid = Some(1))),
        [("hv1".into(), 1001), ("hv2".into(), 1004)]
    );
    assert_eq!(
        ids(q(|q| q.action = Some("allowed".into()))),
        [("hv1".into(), 1002), ("hv1".into(), 1003)]
    );
    assert_eq!(
        ids(q(|q| {
            q.vm = Some("web-1".into());
            q.action = Some("blocked".into());
            q.host = Some("hv1".into());
        })),
        [("hv1".into(), 1001)]
    );
    let t2 = ours[1].time_ns;
    assert_eq!(
        ids(q(
            |q| (q.since_ns, q.until_ns) = (Some(1_700_000_000_002_000_000), Some(1_700_000_000_004_000_000))
        )),
        [("hv1".into(), 1002), ("hv1".into(), 1003)],
        "{t2}"
    );
    let newest = reader
        .alerts(&AlertQuery {
            limit: Some(1),
            ..AlertQuery::default()
        })
        .unwrap();
    assert_eq!(ids(newest.alerts), [("hv2".into(), 1004)]);
    assert!(newest.truncated);
    assert_eq!(
        status(reader.alerts(&AlertQuery {
            limit: Some(palisade_api::MAX_ALERT_LIMIT + 1),
            ..AlertQuery::default()
        })),
        400
    );
    let st = ctl.status().alerts;
    assert_eq!((st.received, st.kept, st.hosts, st.evicted), (4, 4, 2, 0));
    srv.stop();
}

#[test]
fn malformed_alert_requests_are_refused_with_a_json_error() {
    let env = Env::start("alerts-plain");
    let admin = Client::new(&env.url(), ClientAuth::Token(env.admin.clone())).unwrap();
    let op = Client::new(&env.url(), ClientAuth::Token(env.operator.clone())).unwrap();
    // On plain HTTP an agent is the admin token; an operator may not push.
    assert_eq!(status(op.push_alerts("hv1", &[alert("hv1", 1, true, "web-1")])), 403);
    admin.push_alerts("hv1", &[alert("hv1", 1, true, "web-1")]).unwrap();
    let call = |method: &str, path: &str, token: &str, body: Option<&str>| -> (u16, String) {
        let req =
            ureq::request(method, &format!("{}{path}", env.url())).set("Authorization", &format!("Bearer {token}"));
        let res = match body {
            Some(b) => req.set("Content-Type", "application/json").send_string(b),
            None => req.call(),
        };
        match res {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("{path}: {e}"),
        }
    };
    let good = serde_json::to_value(alert("hv1", 2, false, "web-1")).unwrap();
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut r = good.clone();
        f(&mut r);
        serde_json::json!({ "records": [r] }).to_string()
    };
    for (what, body) in [
        (
            "an unknown top-level field",
            r#"{"records": [], "extra": 1}"#.to_string(),
        ),
        ("an unknown record field", with(&|r| r["color"] = "red".into())),
        (
            "an unknown field in alert",
            with(&|r| r["alert"]["color"] = "red".into()),
        ),
        ("an unknown field in a VM", with(&|r| r["dest"]["color"] = "red".into())),
        ("a bad address", with(&|r| r["src_ip"] = "10.0.0.300".into())),
        ("a port over 65535", with(&|r| r["src_port"] = 70000.into())),
        (
            "a missing signature",
            with(&|r| r["alert"].as_object_mut().unwrap().clear()),
        ),
        ("not an object", "[1, 2]".to_string()),
    ] {
        let (code, text) = call("POST", "/v1/agents/hv1/alerts", &env.admin, Some(&body));
        assert_eq!(code, 400, "{what}: {text}");
        let e: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: {text}"));
        assert!(e["error"].is_string(), "{what}: {text}");
    }
    for bad in [
        "/v1/alerts?color=red",
        "/v1/alerts?action=dropped",
        "/v1/alerts?sid=4294967296",
        "/v1/alerts?limit=x",
        "/v1/alerts?host=%zz",
        "/v1/alerts?sid=1&sid=2",
    ] {
        let (code, text) = call("GET", bad, &env.reader, None);
        assert_eq!(code, 400, "{bad}: {text}");
    }
    // A host filter no host has (empty, or not a host name) matches nothing.
    for path in ["/v1/alerts?host=", "/v1/alerts?host=a%20b", "/v1/alerts?vm="] {
        let (code, text) = call("GET", path, &env.reader, None);
        assert_eq!(code, 200, "{path}: {text}");
        assert_eq!(text, r#"{"alerts":[],"truncated":false}"#, "{path}");
    }
    let (code, text) = call(
        "GET",
        "/v1/alerts?host=hv1&sid=1&action=blocked&vm=web-1",
        &env.reader,
        None,
    );
    assert_eq!(code, 200, "{text}");
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["alerts"].as_array().unwrap().len(), 1, "{text}");
    assert_eq!(r["alerts"][0]["alert"]["signature_id"], 1, "{text}");
    assert_eq!(env.ctl.status().alerts.received, 1);
}
