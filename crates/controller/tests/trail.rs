//! The controller's audit trail: its change records, the flows its agents
//! push over mutual TLS, and queries through the API.

mod common;

use std::sync::Arc;

use common::*;
use palisade_api::client::{Client, ClientAuth, ClientError};
use palisade_api::roles::Role;
use palisade_api::{FlowQuery, MAX_FLOW_BATCH, TagRequest};
use palisade_audit::record::{Decision, Endpoint, FlowRecord, Phase, Record, Verdict, VmIdentity};
use palisade_audit::{LogReader, Query};
use palisade_controller::core::Controller;
use palisade_controller::server::{self, ServeOptions};
use palisade_controller::store::{EmbeddedStore, Store};
use palisade_controller::tls;
use palisade_controller::trail::{Trail, TrailError};

fn status(r: Result<impl std::fmt::Debug, ClientError>) -> u16 {
    match r {
        Err(ClientError::Api { status, .. }) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// A flow on `host`, from `src_vm` (a managed VM) or an external address, to an external address.
fn flow(host: &str, id: u64, src_vm: Option<&str>, verdict: Verdict) -> FlowRecord {
    let t = 1_700_000_000_000_000_000 + id * 1_000_000;
    FlowRecord {
        appliance: None,
        time_ns: t,
        flow_id: id,
        host: host.into(),
        phase: Phase::Start,
        src: Endpoint {
            addr: "10.0.1.11".parse().unwrap(),
            port: 40_000 + id as u16,
            vm: src_vm.map(|name| VmIdentity {
                name: name.into(),
                uuid: "00000000-0000-4000-8000-000000000001".into(),
                vnic: format!("{name}.0"),
                zone: "web".into(),
                cluster: Some("prod".into()),
                host: Some(host.into()),
                tags: Default::default(),
            }),
        },
        dst: Endpoint {
            addr: "203.0.113.7".parse().unwrap(),
            port: 443,
            vm: None,
        },
        protocol: 6,
        icmp: None,
        verdict,
        decided_by: vec![Decision {
            rule: "https-out".into(),
            level: "datacenter".into(),
            policy_version: 1,
            chain: "egress".into(),
        }],
        packets_out: 1,
        bytes_out: 60,
        packets_in: 0,
        bytes_in: 0,
        start_ns: t,
        last_ns: t,
    }
}

fn changes_in(dir: &std::path::Path) -> Vec<(String, String, String)> {
    LogReader::open(dir)
        .unwrap()
        .query(&Query::default())
        .unwrap()
        .into_iter()
        .filter_map(|(_, r)| match r {
            Record::Change(c) => Some((c.actor, c.action, c.resource)),
            _ => None,
        })
        .collect()
}

#[test]
fn every_change_is_in_the_controllers_audit_log() {
    let env = Env::start("trail-changes");
    let op = Client::new(&env.url(), ClientAuth::Token(env.operator.clone())).unwrap();
    op.apply(&files(POLICY_V1), "first", false).unwrap();
    op.apply(&files(POLICY_V1), "dry", true).unwrap();
    op.apply(&files(POLICY_V2), "second", false).unwrap();
    let tag = TagRequest {
        set: [("pci".to_string(), "yes".to_string())].into(),
        remove: Vec::new(),
    };
    op.tag("web-1", &tag).unwrap();
    op.rollback(1).unwrap();
    // Refused changes leave no record.
    assert_eq!(status(op.rollback(99)), 404);
    assert_eq!(
        status(
            Client::new(&env.url(), ClientAuth::Token(env.reader.clone()))
                .unwrap()
                .rollback(1)
        ),
        403
    );

    let s = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
    let want = vec![
        s("local", "token.create", "token/alice"),
        s("local", "token.create", "token/olga"),
        s("local", "token.create", "token/audrey"),
        s("local", "token.create", "token/rita"),
        s("olga", "policy.apply", "policy"),
        s("olga", "policy.apply", "policy"),
        s("olga", "vm.tag", "vm/web-1"),
        s("olga", "policy.rollback", "policy"),
    ];
    assert_eq!(changes_in(&env.audit), want);
    // The same records as the store's, field for field.
    let stored: Vec<Record> = env.ctl.changes().unwrap().into_iter().map(Record::Change).collect();
    let logged: Vec<Record> = LogReader::open(&env.audit)
        .unwrap()
        .query(&Query::default())
        .unwrap()
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    assert_eq!(logged, stored);

    let report = palisade_audit::verify(&env.audit, None).unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!((report.records, report.signed_through), (8, 8));

    // Through the API: changes only with changes=true, filtered by VM.
    let auditor = Client::new(&env.url(), ClientAuth::Token(env.auditor.clone())).unwrap();
    assert!(auditor.flows(&FlowQuery::default()).unwrap().is_empty());
    let q = FlowQuery {
        vm: Some("web-1".into()),
        changes: true,
        ..FlowQuery::default()
    };
    let got = auditor.flows(&q).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, 7);
    assert!(matches!(&got[0].1, Record::Change(c) if c.action == "vm.tag" && c.actor == "olga"));
    let st = auditor.status().unwrap().audit.unwrap();
    assert_eq!((st.last_seq, st.append_failures), (8, 0));
}

#[test]
fn a_failing_audit_log_is_counted_and_never_undoes_a_change() {
    let env = Env::start("trail-fail");
    let op = Client::new(&env.url(), ClientAuth::Token(env.operator.clone())).unwrap();
    // With its directory gone, the log cannot sign the checkpoint over a new record.
    std::fs::remove_dir_all(&env.audit).unwrap();
    let v = op.apply(&files(POLICY_V1), "while the disk is gone", false).unwrap();
    assert_eq!(v.version, 1);
    assert_eq!(op.policy().unwrap().version, 1);
    let st = op.status().unwrap().audit.unwrap();
    assert_eq!(st.append_failures, 1);
    let err = st.last_error.unwrap();
    assert!(err.contains("policy.apply") && err.contains("olga"), "{err}");
}

#[test]
fn one_process_per_audit_log() {
    let tmp = TempDir::new("trail-lock");
    // The trail in a subdirectory: its signing key is kept beside it.
    let dir = tmp.0.join("audit");
    let first = Trail::open(&dir).unwrap();
    assert!(matches!(Trail::open(&dir), Err(TrailError::Locked(_))));
    drop(first);
    Trail::open(&dir).unwrap();
}

#[test]
fn agents_push_flows_over_mtls_and_the_api_queries_them() {
    let tmp = TempDir::new("trail-mtls");
    let ca = tmp.0.join("ca");
    test_ca(&ca, &["hv1", "hv2"]);
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&tmp.0.join("s.redb")).unwrap());
    let audit = tmp.0.join("audit");
    let trail = Arc::new(Trail::open(&audit).unwrap());
    let ctl = Controller::new(store).with_trail(trail.clone());
    let reader_token = ctl.create_token("local", "rita", Role::ReadOnly).unwrap();
    let cfg = tls::server_config(
        &ca.join("ca.pem"),
        &ca.join("controller.pem"),
        &ca.join("controller.key"),
    )
    .unwrap();
    let mut opts = ServeOptions::plain("127.0.0.1:0".parse().unwrap());
    opts.tls = Some(cfg);
    let srv = server::spawn(ctl, opts).unwrap();
    let url = srv.url();
    let hv1 = agent(&ca, &url, "hv1");
    let hv2 = agent(&ca, &url, "hv2");
    let reader = Client::new(&url, ClientAuth::Token(reader_token))
        .unwrap()
        .with_ca(&ca.join("ca.pem"))
        .unwrap();

    let batch = vec![
        flow("hv1", 1, Some("web-1"), Verdict::Allow),
        flow("hv1", 2, None, Verdict::Deny),
        flow("hv1", 3, Some("web-1"), Verdict::Deny),
        flow("hv1", 4, Some("web-2"), Verdict::Allow),
    ];
    let base = trail.status().last_seq;
    assert_eq!(hv1.push_flows("hv1", &batch).unwrap(), base + 4);

    // A record claiming another host: 400 naming it, nothing appended.
    let bad = vec![
        flow("hv1", 5, None, Verdict::Allow),
        flow("hv2", 6, None, Verdict::Allow),
    ];
    match hv1.push_flows("hv1", &bad) {
        Err(ClientError::Api { status: 400, error, .. }) => {
            assert!(error.contains("record 1") && error.contains("hv2"), "{error}")
        }
        other => panic!("expected 400, got {other:?}"),
    }
    // hv2's certificate on hv1's path, and no certificate at all.
    assert_eq!(status(hv2.push_flows("hv1", &batch[..1])), 403);
    assert_eq!(status(reader.push_flows("hv1", &batch[..1])), 401);
    // One record over the batch limit.
    let big: Vec<FlowRecord> = (0..=MAX_FLOW_BATCH as u64)
        .map(|i| flow("hv1", 100 + i, None, Verdict::Allow))
        .collect();
    match hv1.push_flows("hv1", &big) {
        Err(ClientError::Api { status: 413, error, .. }) => assert!(error.contains("10000"), "{error}"),
        other => panic!("expected 413, got {other:?}"),
    }
    assert_eq!(trail.status().last_seq, base + 4);

    // Exactly the pushed records about web-1, in order, with their sequence numbers.
    let q = FlowQuery {
        vm: Some("web-1".into()),
        ..FlowQuery::default()
    };
    let got = reader.flows(&q).unwrap();
    let want = vec![
        (base + 1, Record::Flow(batch[0].clone())),
        (base + 3, Record::Flow(batch[2].clone())),
    ];
    assert_eq!(got, want);
    let q = FlowQuery {
        verdict: Some(Verdict::Deny),
        limit: Some(1),
        ..FlowQuery::default()
    };
    assert_eq!(
        reader.flows(&q).unwrap(),
        vec![(base + 2, Record::Flow(batch[1].clone()))]
    );
    let q = FlowQuery {
        since_ns: Some(batch[2].time_ns),
        ..FlowQuery::default()
    };
    assert_eq!(reader.flows(&q).unwrap().len(), 2);
    let over = FlowQuery {
        limit: Some(100_001),
        ..FlowQuery::default()
    };
    assert_eq!(status(reader.flows(&over)), 400);
    // An agent certificate is no API token.
    assert_eq!(status(hv1.flows(&FlowQuery::default())), 401);

    let report = palisade_audit::verify(&audit, None).unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.records, base + 4);
    srv.stop();
}

#[test]
fn plain_http_agents_push_with_an_admin_token() {
    let env = Env::start("trail-plain");
    let admin = Client::new(&env.url(), ClientAuth::Token(env.admin.clone())).unwrap();
    let op = Client::new(&env.url(), ClientAuth::Token(env.operator.clone())).unwrap();
    let recs = [
        flow("hv1", 1, Some("web-1"), Verdict::Allow),
        flow("hv1", 2, Some("web 1/&x"), Verdict::Allow),
    ];
    assert_eq!(status(op.push_flows("hv1", &recs)), 403);
    let seq = admin.push_flows("hv1", &recs).unwrap();
    let all = op.flows(&FlowQuery::default()).unwrap();
    assert_eq!(all.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [seq - 1, seq]);
    // Odd names travel escaped.
    let odd = FlowQuery {
        vm: Some("web 1/&x".into()),
        ..FlowQuery::default()
    };
    assert_eq!(op.flows(&odd).unwrap(), vec![(seq, Record::Flow(recs[1].clone()))]);
    // Unknown and malformed parameters are refused.
    let get = |path: &str| -> (u16, String) {
        let res = ureq::get(&format!("{}{path}", env.url()))
            .set("Authorization", &format!("Bearer {}", env.reader))
            .call();
        match res {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("{path}: {e}"),
        }
    };
    for bad in [
        "/v1/flows?color=red",
        "/v1/flows?verdict=maybe",
        "/v1/flows?limit=x",
        "/v1/flows?vm=%zz",
    ] {
        let (code, text) = get(bad);
        assert_eq!(code, 400, "{bad}: {text}");
    }
    let (code, text) = get("/v1/flows?vm=web-1&verdict=allow");
    assert_eq!(code, 200, "{text}");
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["records"].as_array().unwrap().len(), 1, "{text}");
    assert_eq!(r["records"][0]["seq"], seq - 1);
    assert_eq!(r["records"][0]["record"]["kind"], "flow");
}
