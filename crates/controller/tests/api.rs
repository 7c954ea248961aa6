//! The HTTP API on the embedded store, through the real server and client.

mod common;

use std::time::{Duration, Instant};

use common::*;
use palisade_api::client::{Client, ClientAuth, ClientError};
use palisade_api::roles::Role;
use palisade_api::{PolicyBundle, TagRequest};

fn client(env: &Env, token: &str) -> Client {
    Client::new(&env.url(), ClientAuth::Token(token.to_string())).unwrap()
}

/// Everything stored, and the store revision.
fn snapshot(env: &Env) -> (Vec<(String, Vec<u8>)>, u64) {
    (env.store.list_prefix("").unwrap(), env.store.revision().unwrap())
}

fn status(e: ClientError) -> u16 {
    match e {
        ClientError::Api { status, .. } => status,
        other => panic!("expected an API error, got {other}"),
    }
}

/// A raw request: (status, parsed JSON body).
fn raw(env: &Env, method: &str, path: &str, token: Option<&str>, body: Option<&[u8]>) -> (u16, serde_json::Value) {
    let mut req = ureq::request(method, &format!("{}{path}", env.url()));
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let res = match body {
        Some(b) => req.send_bytes(b),
        None => req.call(),
    };
    let resp = match res {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    };
    let status = resp.status();
    let text = resp.into_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
}

#[test]
fn apply_versions_diff_rollback_and_change_records() {
    let env = Env::start("api-flow");
    let op = client(&env, &env.operator);

    // Dry run stores nothing.
    let before = snapshot(&env);
    let dry = op.apply(&files(POLICY_V1), "first", true).unwrap();
    assert!(dry.dry_run);
    assert_eq!((dry.version, dry.revision), (1, 1));
    assert_eq!(snapshot(&env), before);

    let v1 = op.apply(&files(POLICY_V1), "first", false).unwrap();
    assert_eq!((v1.version, v1.revision), (1, 1));
    let cur = op.policy().unwrap();
    assert_eq!(cur.version, 1);
    assert_eq!(cur.files, files(POLICY_V1));

    // Diff against v1: the text and the chains that change (web's egress, db's ingress).
    let d = op.diff(&files(POLICY_V2)).unwrap();
    assert_eq!(d.base_version, 1);
    assert!(d.diff.contains("+    - { id: web-to-db"), "{}", d.diff);
    assert!(d.diff.contains("--- a/policy.yaml"), "{}", d.diff);
    let changed: Vec<(String, String)> = d.chains.iter().map(|c| (c.vnic.clone(), c.direction.clone())).collect();
    assert_eq!(
        changed,
        vec![("db-1.0".into(), "ingress".into()), ("web-1.0".into(), "egress".into())]
    );
    // Diff against the same files: nothing.
    let same = op.diff(&files(POLICY_V1)).unwrap();
    assert!(same.diff.is_empty() && same.chains.is_empty(), "{same:?}");

    let v2 = op.apply(&files(POLICY_V2), "web may reach db", false).unwrap();
    assert_eq!(v2.version, 2);
    let hist = op.versions().unwrap();
    assert_eq!(hist.iter().map(|v| v.version).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(hist[1].message, "web may reach db");
    assert_eq!(hist[1].author, "olga");
    assert_eq!(op.version(1).unwrap().files, files(POLICY_V1));
    assert_eq!(status(op.version(9).unwrap_err()), 404);

    // Rollback to 1 is a new version 3 with v1's files.
    let rb = op.rollback(1).unwrap();
    assert_eq!(rb.version, 3);
    let v3 = op.version(3).unwrap();
    assert_eq!(v3.files, files(POLICY_V1));
    assert_eq!(v3.rollback_of, Some(1));
    assert_eq!(op.policy().unwrap().version, 3);

    // Every change is recorded with its actor; only auditors and admins may read them.
    assert_eq!(status(op.changes().unwrap_err()), 403);
    let changes = client(&env, &env.auditor).changes().unwrap();
    let actions: Vec<(&str, &str, Option<u64>)> = changes
        .iter()
        .filter(|c| c.action.starts_with("policy."))
        .map(|c| (c.actor.as_str(), c.action.as_str(), c.policy_version))
        .collect();
    assert_eq!(
        actions,
        [
            ("olga", "policy.apply", Some(1)),
            ("olga", "policy.apply", Some(2)),
            ("olga", "policy.rollback", Some(3))
        ]
    );
    let v2_change = changes.iter().find(|c| c.policy_version == Some(2)).unwrap();
    assert!(v2_change.diff.contains("+    - { id: web-to-db"), "{}", v2_change.diff);

    // Read endpoints.
    let reader = client(&env, &env.reader);
    let vms = reader.vms().unwrap();
    assert_eq!(
        vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        ["web-1", "db-1"]
    );
    let hosts = reader.hosts().unwrap();
    assert_eq!(
        hosts.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(),
        ["hv1", "hv2"]
    );
    assert_eq!(hosts[0].vms, ["web-1"]);
    let doc = raw(&env, "GET", "/openapi.json", None, None);
    assert_eq!(doc.0, 200);
    assert!(doc.1["paths"]["/v1/agents/{host}/policy"]["get"].is_object());
}

#[test]
fn tags_reach_a_watching_agent() {
    let env = Env::start("api-tags");
    let op = client(&env, &env.operator);
    op.apply(&files(POLICY_V2), "", false).unwrap();
    let agent = client(&env, &env.admin);
    agent.register("hv2", "test").unwrap();
    let first = agent.watch_policy("hv2", 0, Duration::from_secs(5)).unwrap().unwrap();
    assert_eq!(first.revision, 1);
    // Nothing newer: 304 after the wait.
    let t = Instant::now();
    assert_eq!(agent.watch_policy("hv2", 1, Duration::from_secs(1)).unwrap(), None);
    assert!(t.elapsed() >= Duration::from_millis(900));

    // A waiting agent sees the retag as soon as it happens.
    let url = env.url();
    let admin = env.admin.clone();
    let waiter = std::thread::spawn(move || {
        let c = Client::new(&url, ClientAuth::Token(admin)).unwrap();
        let t = Instant::now();
        let b = c.watch_policy("hv2", 1, Duration::from_secs(20)).unwrap();
        (b, t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    let req = TagRequest {
        set: [
            ("tier".to_string(), "db".to_string()),
            ("pci".to_string(), "yes".to_string()),
        ]
        .into(),
        remove: vec![],
    };
    // web-1 retagged as db: it leaves group web, joins db: chains change.
    let resp = op.tag("web-1", &req).unwrap();
    assert_eq!(resp.revision, 2);
    assert_eq!(resp.tags.get("tier").map(String::as_str), Some("db"));
    assert!(resp.chains.contains(&"web-1.0".to_string()), "{resp:?}");
    let (bundle, waited) = waiter.join().unwrap();
    let bundle = bundle.expect("the watcher must see the new revision");
    assert!(waited < Duration::from_secs(5), "took {waited:?}");
    assert_eq!((bundle.revision, bundle.version), (2, 1));
    let model = bundle.model().unwrap();
    assert_eq!(
        model.inventory.vm("web-1").unwrap().tags.get("pci").map(String::as_str),
        Some("yes")
    );
    // An agent that holds version 1's files gets the retag without them.
    let delta = agent
        .watch_policy_having("hv2", 1, Some(1), Duration::from_secs(1))
        .unwrap()
        .unwrap();
    assert!(delta.same_files && delta.files.is_empty(), "{delta:?}");
    assert!(delta.model().is_err(), "an unresolved bundle has no model");
    assert_eq!(delta.clone().resolve(&first).unwrap(), bundle);
    let other_version = PolicyBundle {
        version: 9,
        ..first.clone()
    };
    assert!(delta.resolve(&other_version).is_err());

    // Removing a tag the files give, through the overlay.
    let rm = TagRequest {
        set: Default::default(),
        remove: vec!["pci".into(), "tier".into()],
    };
    let r = op.tag("web-1", &rm).unwrap();
    assert!(r.tags.is_empty(), "{r:?}");
    let vms = op.vms().unwrap();
    assert!(vms.iter().find(|v| v.name == "web-1").unwrap().tags.is_empty());
    // The overlay survives a new version.
    op.apply(&files(POLICY_V1), "", false).unwrap();
    // A new version comes as edits to an agent that names the old one.
    let full = agent
        .watch_policy_having("hv2", 2, Some(1), Duration::from_secs(1))
        .unwrap()
        .unwrap();
    assert!(!full.same_files && full.delta.is_some(), "{full:?}");
    let full = full.resolve(&first).unwrap();
    assert_eq!(full.files, files(POLICY_V1));
    assert!(
        op.vms()
            .unwrap()
            .iter()
            .find(|v| v.name == "web-1")
            .unwrap()
            .tags
            .is_empty()
    );
    assert_eq!(status(op.tag("nope", &req).unwrap_err()), 404);

    agent
        .report(
            "hv2",
            &palisade_api::ReportRequest {
                installed_revision: 2,
                counters: [("drops".to_string(), 7)].into(),
            },
        )
        .unwrap();
    let agents = op.agents().unwrap();
    assert_eq!(agents[0].host, "hv2");
    assert_eq!(agents[0].installed_revision, 2);
    let changes = client(&env, &env.admin).changes().unwrap();
    assert!(
        changes
            .iter()
            .any(|c| c.action == "vm.tag" && c.actor == "olga" && c.resource == "vm/web-1")
    );
}

#[test]
fn new_versions_reach_a_holder_as_edits() {
    let env = Env::start("api-delta");
    let op = client(&env, &env.operator);
    op.apply(&files(POLICY_V1), "", false).unwrap();
    let agent = client(&env, &env.admin);
    let v1 = agent.watch_policy("hv2", 0, Duration::from_secs(5)).unwrap().unwrap();
    assert_eq!((v1.version, v1.delta.is_none()), (1, true));
    op.apply(&files(POLICY_V2), "", false).unwrap();
    let whole = agent.watch_policy("hv2", 0, Duration::from_secs(5)).unwrap().unwrap();
    assert_eq!(whole.version, 2);

    // A holder of version 1 gets version 2 as edits of its files, and every
    // such holder the same ones.
    let sent = agent
        .watch_policy_having("hv2", v1.revision, Some(1), Duration::from_secs(5))
        .unwrap()
        .unwrap();
    let again = agent
        .watch_policy_having("hv1", v1.revision, Some(1), Duration::from_secs(5))
        .unwrap()
        .unwrap();
    assert_eq!(sent, again);
    let delta = sent.delta.clone().expect("version 2 as edits of version 1");
    assert_eq!(delta.base, 1);
    assert!(sent.files.is_empty() && !sent.same_files, "{sent:?}");
    assert_eq!(
        delta.changed.keys().collect::<Vec<_>>(),
        ["policy.yaml"],
        "only the changed file travels"
    );
    let sent_bytes = serde_json::to_vec(&sent).unwrap().len();
    let whole_bytes = serde_json::to_vec(&whole).unwrap().len();
    assert!(
        sent_bytes * 2 < whole_bytes,
        "{sent_bytes} bytes of edits vs {whole_bytes} whole"
    );
    assert!(sent.model().is_err(), "an unresolved bundle has no model");
    assert_eq!(sent.clone().resolve(&v1).unwrap(), whole);

    // Held files that are not version 1's do not pass for it: an unchanged
    // file altered on the host fails the digest, a changed one its edits.
    let mut altered = v1.clone();
    altered
        .files
        .get_mut("inventory.yaml")
        .unwrap()
        .push_str("# edited on the host\n");
    let err = sent.clone().resolve(&altered).unwrap_err().to_string();
    assert!(err.contains("version 1") && err.contains("digest"), "{err}");
    let mut altered = v1.clone();
    altered
        .files
        .get_mut("policy.yaml")
        .unwrap()
        .push_str("# edited on the host\n");
    let err = sent.clone().resolve(&altered).unwrap_err().to_string();
    assert!(err.contains("policy.yaml") && err.contains("left over"), "{err}");
    let other = PolicyBundle {
        version: 2,
        ..v1.clone()
    };
    assert!(sent.resolve(&other).is_err());

    // An unknown held version gets the whole bundle.
    let unknown = agent
        .watch_policy_having("hv2", v1.revision, Some(99), Duration::from_secs(5))
        .unwrap()
        .unwrap();
    assert_eq!(unknown, whole);

    // A rollback is a new version with old files: edits again.
    op.rollback(1).unwrap();
    let back = agent
        .watch_policy_having("hv2", whole.revision, Some(2), Duration::from_secs(5))
        .unwrap()
        .unwrap();
    assert_eq!(back.delta.as_ref().map(|d| d.base), Some(2));
    let back = back.resolve(&whole).unwrap();
    assert_eq!((back.version, &back.files), (3, &v1.files));
}

#[test]
fn every_refusal_leaves_the_store_unchanged() {
    let env = Env::start("api-4xx");
    client(&env, &env.operator).apply(&files(POLICY_V1), "", false).unwrap();
    let body = serde_json::to_vec(&serde_json::json!({ "files": files(POLICY_V2), "message": "m" })).unwrap();
    let mut bad_policy = files(POLICY_V2);
    bad_policy.insert("policy.yaml".into(), POLICY_V2.replace("to: db,", "to: dbz,"));
    let invalid = serde_json::to_vec(&serde_json::json!({ "files": bad_policy })).unwrap();
    let huge = vec![b' '; 33 << 20];
    let tag = br#"{"set":{"tier":"db"}}"#;

    // (method, path, token, body, expected status, what the error must say)
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, Option<&'a [u8]>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("POST", "/v1/policy", None, Some(&body), 401, "missing Authorization"),
        (
            "POST",
            "/v1/policy",
            Some("pal_wrong"),
            Some(&body),
            401,
            "unknown token",
        ),
        (
            "POST",
            "/v1/policy",
            Some(&env.reader),
            Some(&body),
            403,
            "role read-only",
        ),
        (
            "POST",
            "/v1/policy",
            Some(&env.auditor),
            Some(&body),
            403,
            "role auditor",
        ),
        (
            "POST",
            "/v1/policy",
            Some(&env.operator),
            Some(b"{\"files\": "),
            400,
            "malformed JSON",
        ),
        (
            "POST",
            "/v1/policy",
            Some(&env.operator),
            Some(b"{\"message\": \"no files\"}"),
            400,
            "malformed JSON",
        ),
        (
            "POST",
            "/v1/policy",
            Some(&env.operator),
            Some(&huge),
            413,
            "over the limit",
        ),
        (
            "POST",
            "/v1/policy",
            Some(&env.operator),
            Some(&invalid),
            422,
            "policy is invalid",
        ),
        (
            "POST",
            "/v1/policy?dry_run=maybe",
            Some(&env.operator),
            Some(&body),
            400,
            "dry_run",
        ),
        (
            "POST",
            "/v1/policy/rollback/1",
            Some(&env.reader),
            None,
            403,
            "role read-only",
        ),
        (
            "POST",
            "/v1/policy/rollback/77",
            Some(&env.operator),
            None,
            404,
            "no version 77",
        ),
        (
            "POST",
            "/v1/policy/rollback/x",
            Some(&env.operator),
            None,
            400,
            "not a number",
        ),
        (
            "PUT",
            "/v1/vms/web-1/tags",
            None,
            Some(tag),
            401,
            "missing Authorization",
        ),
        (
            "PUT",
            "/v1/vms/web-1/tags",
            Some(&env.auditor),
            Some(tag),
            403,
            "role auditor",
        ),
        (
            "PUT",
            "/v1/vms/web-1/tags",
            Some(&env.operator),
            Some(b"[1,2"),
            400,
            "malformed JSON",
        ),
        (
            "PUT",
            "/v1/vms/web-1/tags",
            Some(&env.operator),
            Some(b"{}"),
            400,
            "nothing to set",
        ),
        (
            "PUT",
            "/v1/vms/ghost/tags",
            Some(&env.operator),
            Some(tag),
            404,
            "ghost",
        ),
        ("GET", "/v1/changes", Some(&env.reader), None, 403, "role read-only"),
        ("GET", "/v1/vms", None, None, 401, "missing Authorization"),
        (
            "POST",
            "/v1/agents/hv1/register",
            Some(&env.operator),
            Some(b"{}"),
            403,
            "role operator",
        ),
        ("GET", "/v1/agents/hv1/policy", None, None, 401, "missing Authorization"),
        (
            "POST",
            "/v1/agents/hv1/report",
            Some(&env.admin),
            Some(b"{\"installed_revision\": 1}"),
            404,
            "not registered",
        ),
        ("GET", "/v1/nothing", None, None, 404, "no such endpoint"),
    ];
    for (method, path, token, body, want, needle) in cases {
        let before = snapshot(&env);
        let (got, json) = raw(&env, method, path, token, body);
        let err = json["error"].as_str().unwrap_or_default();
        assert_eq!(got, want, "{method} {path}: {json}");
        assert!(
            err.contains(needle),
            "{method} {path}: error {err:?} should mention {needle:?}"
        );
        assert_eq!(snapshot(&env), before, "{method} {path} changed the store");
    }
    // The invalid policy's diagnostics point at file:line:col.
    let (_, json) = raw(&env, "POST", "/v1/policy", Some(&env.operator), Some(&invalid));
    let diags = json["diagnostics"].as_str().unwrap();
    assert!(diags.contains("policy.yaml:5:"), "{diags}");
    assert!(diags.contains("dbz"), "{diags}");
}

#[test]
fn every_documented_endpoint_is_routed() {
    let env = Env::start("api-openapi");
    let (status, doc) = raw(&env, "GET", "/openapi.json", None, None);
    assert_eq!(status, 200);
    let paths = doc["paths"].as_object().unwrap();
    assert_eq!(paths.len(), 31);
    for (path, ops) in paths {
        let concrete = path
            .replace("{v}", "1")
            .replace("{name}", "web-1")
            .replace("{host}", "hv1");
        for method in ops.as_object().unwrap().keys() {
            let body: Option<&[u8]> = if method == "get" { None } else { Some(b"{}") };
            let (got, json) = raw(&env, &method.to_uppercase(), &concrete, None, body);
            // Unauthenticated: each route answers 401 (or 200 for the document itself), never the fallback.
            let expected = if path == "/openapi.json" { 200 } else { 401 };
            assert_eq!(got, expected, "{method} {path}: {json}");
        }
    }
}

#[test]
fn admins_create_tokens_that_work_and_are_recorded() {
    let env = Env::start("api-tokens");
    let admin = client(&env, &env.admin);
    let before = snapshot(&env);
    match client(&env, &env.operator).create_token("eve", palisade_api::roles::Role::Admin) {
        Err(ClientError::Api { status: 403, .. }) => {}
        other => panic!("expected 403, got {other:?}"),
    }
    assert_eq!(
        status(
            admin
                .create_token("has space", palisade_api::roles::Role::ReadOnly)
                .unwrap_err()
        ),
        400
    );
    assert_eq!(snapshot(&env), before);
    let secret = admin.create_token("ci", palisade_api::roles::Role::Operator).unwrap();
    let ci = client(&env, &secret);
    assert_eq!(ci.apply(&files(POLICY_V1), "from ci", false).unwrap().version, 1);
    assert_eq!(ci.versions().unwrap()[0].author, "ci");
    let changes = admin.changes().unwrap();
    let tok = changes
        .iter()
        .find(|c| c.action == "token.create" && c.resource == "token/ci")
        .unwrap();
    assert_eq!(tok.actor, "alice");
    assert!(
        changes
            .iter()
            .any(|c| c.resource == "token/alice" && c.actor == "local")
    );
    // The store holds only the hash of the secret.
    let stored = env.store.list_prefix("").unwrap();
    assert!(
        stored
            .iter()
            .all(|(k, v)| !k.contains(&secret[4..]) && !String::from_utf8_lossy(v).contains(&secret[4..]))
    );
}

/// A tag change recompiles incrementally from the compiled policy the
/// controller kept of the revision before it. Its every answer (revision,
/// resulting tags, chains that changed) and the bundles agents get equal
/// those of a controller that compiles the whole policy from its store each
/// time (a fresh one per step), through tags, removals and a new version.
#[test]
fn incremental_tags_match_full_recompiles() {
    use palisade_api::ApplyRequest;
    use palisade_controller::core::Controller;
    use palisade_controller::store::EmbeddedStore;
    let dir = TempDir::new("api-incremental");
    let open = |name: &str| std::sync::Arc::new(EmbeddedStore::open(&dir.0.join(name)).unwrap());
    let (store_a, store_b) = (open("a.redb"), open("b.redb"));
    let kept = Controller::new(store_a);
    let fresh = || Controller::new(store_b.clone());
    let apply = |policy| ApplyRequest {
        files: files(policy),
        message: String::new(),
    };
    kept.apply("t", &apply(POLICY_V2), false).unwrap();
    fresh().apply("t", &apply(POLICY_V2), false).unwrap();
    let tag = |set: &[(&str, &str)], remove: &[&str]| TagRequest {
        set: set.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        remove: remove.iter().map(|k| k.to_string()).collect(),
    };
    let steps = [
        ("web-1", tag(&[("tier", "db")], &[])),
        ("web-1", tag(&[("pci", "yes")], &[])),
        ("db-1", tag(&[("tier", "web")], &[])),
        ("web-1", tag(&[], &["tier"])),
        ("web-1", tag(&[("tier", "web")], &["pci"])),
        ("db-1", tag(&[], &["tier"])),
    ];
    // An agent's side of it: it holds a bundle and its compiled policy, and
    // compiles each new revision from those (`compile_from`).
    let chains = |c: &palisade_policy::compile::Compiler| c.chains().cloned().collect::<Vec<_>>();
    let mut held = kept.bundle().unwrap();
    let mut loader = palisade_policy::load::Loader::new();
    let mut held_compiled = Some(held.compile_with(&mut loader).unwrap());
    let mut changed = 0;
    for (i, (vm, req)) in steps.iter().enumerate() {
        if i == 3 {
            kept.apply("t", &apply(POLICY_V1), false).unwrap();
            fresh().apply("t", &apply(POLICY_V1), false).unwrap();
        }
        let got = kept.tag("t", vm, req).unwrap();
        let want = fresh().tag("t", vm, req).unwrap();
        assert_eq!(got, want, "step {i}");
        assert_eq!(kept.bundle().unwrap(), fresh().bundle().unwrap(), "step {i}");
        changed += usize::from(!got.chains.is_empty());

        let next = kept.bundle_for(Some(held.version)).unwrap().resolve(&held).unwrap();
        let incremental = next.compile_from(&held, &mut held_compiled, &mut loader).unwrap();
        assert_eq!(
            chains(&incremental),
            chains(&next.compile().unwrap()),
            "step {i}: agent side"
        );
        (held, held_compiled) = (next, Some(incremental));
    }
    assert!(changed >= 3, "the steps move VMs between groups");
}

/// Controllers sharing a store (etcd, in production) take turns at tag
/// changes: each brings the compiled policy it kept up to the current
/// revision by retagging what the others changed, and answers exactly as a
/// controller compiling from scratch does. A lost compare-and-swap race is
/// undone and caught up the same way.
#[test]
fn controllers_taking_turns_catch_up_instead_of_recompiling() {
    use palisade_api::{ApplyRequest, CompileCounts};
    use palisade_controller::core::Controller;
    use palisade_controller::store::{Compare, EmbeddedStore, Store, StoreError};
    use std::sync::{Arc, Mutex};

    /// A store that runs a hook (another controller's change) just before
    /// its next transaction, so that transaction loses its race.
    struct Racing {
        inner: Arc<EmbeddedStore>,
        hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    }
    impl Store for Racing {
        fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get(key)
        }
        fn list_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            self.inner.list_prefix(prefix)
        }
        fn txn(&self, compares: &[Compare], puts: &[(String, Vec<u8>)]) -> Result<bool, StoreError> {
            let hook = self.hook.lock().unwrap().take();
            if let Some(h) = hook {
                h();
            }
            self.inner.txn(compares, puts)
        }
        fn revision(&self) -> Result<u64, StoreError> {
            self.inner.revision()
        }
        // Granted at once, whoever holds it, as when a holder stalled past
        // its lease: the race reaches the transaction, which is what this
        // test is about.
        fn lock(&self, _: &str, _: Duration, _: Duration) -> Result<Option<u64>, StoreError> {
            Ok(Some(0))
        }
        fn unlock(&self, _: &str, _: u64) -> Result<(), StoreError> {
            Ok(())
        }
    }

    let dir = TempDir::new("api-turns");
    let open = |name: &str| Arc::new(EmbeddedStore::open(&dir.0.join(name)).unwrap());
    let (shared, solo) = (open("shared.redb"), open("solo.redb"));
    let racing = Arc::new(Racing {
        inner: shared.clone(),
        hook: Mutex::new(None),
    });
    let a = Controller::new(racing.clone());
    let b = Controller::new(shared.clone());
    let fresh = || Controller::new(solo.clone());
    let apply = |policy| ApplyRequest {
        files: files(policy),
        message: String::new(),
    };
    let tag = |set: &[(&str, &str)], remove: &[&str]| TagRequest {
        set: set.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        remove: remove.iter().map(|k| k.to_string()).collect(),
    };
    a.apply("t", &apply(POLICY_V2), false).unwrap();
    fresh().apply("t", &apply(POLICY_V2), false).unwrap();
    let steps = [
        ("web-1", tag(&[("tier", "db")], &[])),
        ("db-1", tag(&[("tier", "web")], &[])),
        ("web-1", tag(&[("pci", "yes")], &[])),
        ("web-1", tag(&[], &["tier"])),
        ("db-1", tag(&[], &["tier"])),
        ("web-1", tag(&[("tier", "web")], &["pci"])),
    ];
    for (i, (vm, req)) in steps.iter().enumerate() {
        if i == 3 {
            a.apply("t", &apply(POLICY_V1), false).unwrap();
            fresh().apply("t", &apply(POLICY_V1), false).unwrap();
        }
        let by = if i % 2 == 0 { &a } else { &b };
        let got = by.tag("t", vm, req).unwrap();
        let want = fresh().tag("t", vm, req).unwrap();
        assert_eq!(got, want, "step {i}");
        assert_eq!(a.bundle().unwrap(), fresh().bundle().unwrap(), "step {i}");
    }
    let counts = |c: &Controller| c.status().compiles;
    // a: kept its apply's policy (step 0), caught up with b's steps 1 and
    // 3 (steps 2 and 4); b: compiled whole at its first tag and after the
    // new version, caught up with a's step 4 (step 5).
    assert_eq!(
        counts(&a),
        CompileCounts {
            kept: 1,
            caught_up: 2,
            whole: 0
        }
    );
    assert_eq!(
        counts(&b),
        CompileCounts {
            kept: 0,
            caught_up: 1,
            whole: 2
        }
    );

    // b's change lands while a compiles its own: a's transaction fails, a
    // undoes its retag and catches up with b's before trying again.
    let (b2, solo2) = (b.clone(), fresh());
    *racing.hook.lock().unwrap() = Some(Box::new(move || {
        let req = TagRequest {
            set: [("race".to_string(), "b".to_string())].into(),
            remove: vec![],
        };
        let won = b2.tag("t", "db-1", &req).unwrap();
        assert_eq!(won, solo2.tag("t", "db-1", &req).unwrap());
    }));
    let req = tag(&[("tier", "db")], &[]);
    let got = a.tag("t", "web-1", &req).unwrap();
    assert!(racing.hook.lock().unwrap().is_none(), "the race ran");
    assert_eq!(got, fresh().tag("t", "web-1", &req).unwrap());
    assert_eq!(a.bundle().unwrap(), fresh().bundle().unwrap());
    // The lost try started from a's kept policy, the retry caught up.
    assert_eq!(
        counts(&a),
        CompileCounts {
            kept: 1,
            caught_up: 4,
            whole: 0
        }
    );
}

/// An admin lists tokens (never their secrets) and revokes one: the revoked
/// token authenticates nothing from then on, with a message that says so;
/// its record stays, naming who revoked it; the revocation is a change
/// record; the last admin token cannot be revoked; other roles may do none of it.
#[test]
fn tokens_are_listed_and_revoked() {
    let env = Env::start("api-revoke");
    let admin = client(&env, &env.admin);
    let ci_secret = admin.create_token("ci", Role::Operator).unwrap();
    let ci = client(&env, &ci_secret);
    ci.apply(&files(POLICY_V1), "from ci", false).unwrap();

    let listed = admin.tokens().unwrap();
    let names: Vec<&str> = listed.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["alice", "olga", "audrey", "rita", "ci"]);
    let text = serde_json::to_string(&listed).unwrap();
    for secret in [&env.admin, &env.operator, &ci_secret] {
        assert!(!text.contains(&secret[4..]), "a listing shows no secret");
    }
    assert!(listed.iter().all(|t| t.revoked.is_none() && t.id.len() == 12));

    for other in [&env.operator, &env.auditor, &env.reader] {
        assert_eq!(status(client(&env, other).tokens().unwrap_err()), 403);
        assert_eq!(status(client(&env, other).revoke_token("ci").unwrap_err()), 403);
    }

    let revoked = admin.revoke_token("ci").unwrap();
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0].revoked.as_ref().map(|r| r.by.as_str()), Some("alice"));
    match ci.apply(&files(POLICY_V2), "after revocation", false).unwrap_err() {
        ClientError::Api { status, error, .. } => {
            assert_eq!(status, 401);
            assert!(error.contains("revoked by alice"), "{error}");
        }
        other => panic!("expected 401, got {other}"),
    }
    assert_eq!(
        admin.policy().unwrap().version,
        1,
        "nothing applied with the revoked token"
    );
    assert_eq!(status(admin.revoke_token("ci").unwrap_err()), 404, "already revoked");
    let after = admin.tokens().unwrap();
    assert!(after.iter().find(|t| t.name == "ci").unwrap().revoked.is_some());

    // The only admin token stays.
    match admin.revoke_token("alice").unwrap_err() {
        ClientError::Api { status, error, .. } => {
            assert_eq!(status, 400);
            assert!(error.contains("no admin token"), "{error}");
        }
        other => panic!("expected 400, got {other}"),
    }
    assert!(admin.tokens().is_ok());
    // With a second admin, the first may go, by id.
    let bob = client(&env, &admin.create_token("bob", Role::Admin).unwrap());
    let alice_id = after.iter().find(|t| t.name == "alice").unwrap().id.clone();
    assert_eq!(bob.revoke_token(&alice_id).unwrap()[0].name, "alice");
    assert_eq!(status(admin.tokens().unwrap_err()), 401);

    let changes = bob.changes().unwrap();
    let revokes: Vec<_> = changes.iter().filter(|c| c.action == "token.revoke").collect();
    assert_eq!(revokes.len(), 2);
    assert_eq!(
        (revokes[0].actor.as_str(), revokes[0].resource.as_str()),
        ("alice", "token/ci")
    );
}

/// Changes take the store's compile lock: while another controller holds it
/// (here, the test), an apply waits, and goes on as soon as it is let go.
#[test]
fn a_change_waits_for_the_compile_lock() {
    use palisade_api::ApplyRequest;
    use palisade_controller::core::{COMPILE_LOCK, Controller};
    use palisade_controller::store::{EmbeddedStore, Store};
    use std::sync::Arc;

    let dir = TempDir::new("api-lock");
    let store = Arc::new(EmbeddedStore::open(&dir.0.join("s.redb")).unwrap());
    let ctl = Controller::new(store.clone());
    let held = store
        .lock(COMPILE_LOCK, Duration::from_secs(15), Duration::ZERO)
        .unwrap()
        .expect("a free lock");
    let req = ApplyRequest {
        files: files(POLICY_V1),
        message: String::new(),
    };
    let t = Instant::now();
    std::thread::scope(|s| {
        let apply = s.spawn(|| ctl.apply("t", &req, false));
        std::thread::sleep(Duration::from_millis(400));
        assert!(!apply.is_finished(), "the apply went ahead while the lock was held");
        assert_eq!(ctl.current().unwrap().version, 0);
        store.unlock(COMPILE_LOCK, held).unwrap();
        let resp = apply.join().unwrap().unwrap();
        assert_eq!(resp.version, 1);
    });
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // A dry run compiles without it.
    let held = store
        .lock(COMPILE_LOCK, Duration::from_secs(15), Duration::ZERO)
        .unwrap();
    assert!(held.is_some());
    assert_eq!(ctl.apply("t", &req, true).unwrap().version, 2);
}

/// A controller started on a store that has a policy compiles it ahead of
/// the first change (`Controller::warm`, which the server runs at start):
/// the first tag change then starts from the kept policy.
#[test]
fn a_started_controller_compiles_the_current_policy_ahead() {
    use palisade_api::{ApplyRequest, CompileCounts};
    use palisade_controller::core::Controller;
    use palisade_controller::store::EmbeddedStore;
    use std::sync::Arc;

    let dir = TempDir::new("api-warm");
    let store = Arc::new(EmbeddedStore::open(&dir.0.join("s.redb")).unwrap());
    // Nothing applied yet: nothing to do.
    Controller::new(store.clone()).warm().unwrap();
    let req = ApplyRequest {
        files: files(POLICY_V2),
        message: String::new(),
    };
    Controller::new(store.clone()).apply("t", &req, false).unwrap();
    let started = Controller::new(store.clone());
    started.warm().unwrap();
    let tag = TagRequest {
        set: [("quarantine".to_string(), "true".to_string())].into(),
        remove: Vec::new(),
    };
    started.tag("t", "web-1", &tag).unwrap();
    assert_eq!(
        started.status().compiles,
        CompileCounts {
            kept: 1,
            caught_up: 0,
            whole: 1
        }
    );
    // Without the warm-up the tag change compiles whole.
    let cold = Controller::new(store);
    cold.tag("t", "db-1", &tag).unwrap();
    assert_eq!(cold.status().compiles.whole, 1);
    assert_eq!(cold.status().compiles.kept, 0);
}
