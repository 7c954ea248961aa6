//! The API's contract with hostile callers (issue 22): what a request may
//! hold, how each refusal is answered, and that no change takes effect
//! without its record in the audit trail. One test per defect found; the
//! sweep over every endpoint × role × hostile body is `tests/hostile.rs`.

mod common;

use std::sync::{Arc, Barrier};

use common::*;
use palisade_api::roles::Role;
use palisade_controller::core::Controller;
use palisade_controller::store::{EmbeddedStore, EtcdStore, Store};

/// A raw request: (status, the named response header, parsed JSON body or Null).
fn raw_h(
    env: &Env,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&[u8]>,
    header: &str,
) -> (u16, Option<String>, serde_json::Value) {
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
        Err(e) => panic!("{method} {path}: {e}"),
    };
    let status = resp.status();
    let h = resp.header(header).map(str::to_string);
    let mut text = String::new();
    std::io::Read::read_to_string(&mut resp.into_reader(), &mut text).unwrap();
    (
        status,
        h,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

fn raw(env: &Env, method: &str, path: &str, token: Option<&str>, body: Option<&[u8]>) -> (u16, serde_json::Value) {
    let (s, _, j) = raw_h(env, method, path, token, body, "content-type");
    (s, j)
}

/// Everything stored, and the store revision.
fn snapshot(env: &Env) -> (Vec<(String, Vec<u8>)>, u64) {
    (env.store.list_prefix("").unwrap(), env.store.revision().unwrap())
}

/// The change records of the store and of the trail agree: each stored
/// change is in the trail exactly once, and the trail holds no other.
fn assert_trail_matches_store(env: &Env) {
    let stored = env.ctl.changes().unwrap();
    let logged: Vec<_> = palisade_audit::LogReader::open(&env.audit)
        .unwrap()
        .query(&palisade_audit::Query::default())
        .unwrap()
        .into_iter()
        .filter_map(|(_, r)| match r {
            palisade_audit::record::Record::Change(c) => Some(c),
            _ => None,
        })
        .collect();
    let mut a = stored.clone();
    let mut b = logged.clone();
    let key = |c: &palisade_audit::record::ChangeRecord| (c.time_ns, c.action.clone(), c.resource.clone());
    a.sort_by_key(key);
    b.sort_by_key(key);
    assert_eq!(
        a.len(),
        b.len(),
        "store has {} change records, trail {}",
        a.len(),
        b.len()
    );
    assert_eq!(a, b, "the trail's change records differ from the store's");
}

fn apply_v2(env: &Env) {
    let body = serde_json::to_vec(&serde_json::json!({ "files": files(POLICY_V2) })).unwrap();
    let (s, j) = raw(env, "POST", "/v1/policy", Some(&env.operator), Some(&body));
    assert_eq!(s, 200, "{j}");
}

// ---- item 3: nothing commits that the trail cannot hold ----

/// A 17 MiB tag value was committed (200) and never reached the trail (its
/// record is over the audit frame limit), and with it every later tag
/// change of that VM. Now it is refused before anything is stored, and the
/// next tag change of the VM is in the trail.
#[test]
fn an_oversized_tag_value_is_refused_before_commit() {
    let env = Env::start("contract-bigtag");
    apply_v2(&env);
    let big = "x".repeat(17 << 20);
    let body = serde_json::to_vec(&serde_json::json!({ "set": { "note": big } })).unwrap();
    let before = snapshot(&env);
    let (s, j) = raw(&env, "PUT", "/v1/vms/web-1/tags", Some(&env.operator), Some(&body));
    let short: String = j.to_string().chars().take(300).collect();
    assert!((400..500).contains(&s), "{s}: {short}");
    assert!(j["error"].as_str().unwrap_or_default().contains("note"), "{short}");
    assert_eq!(snapshot(&env), before, "a refused tag change stored something");
    // The VM's next (ordinary) tag change reaches the trail.
    let (s, j) = raw(
        &env,
        "PUT",
        "/v1/vms/web-1/tags",
        Some(&env.operator),
        Some(br#"{"set":{"note":"short"}}"#),
    );
    assert_eq!(s, 200, "{j}");
    let st = env.ctl.status().audit.unwrap();
    assert_eq!(st.append_failures, 0, "{st:?}");
    assert_trail_matches_store(&env);
}

/// A 17 MiB policy file was applied (200) and its change record (the
/// file's diff) never reached the trail. Files, their count and the whole
/// bundle have limits checked before commit, and an apply that is within
/// them always has a record that fits.
#[test]
fn an_oversized_policy_file_is_refused_and_every_apply_is_audited() {
    let env = Env::start("contract-bigfile");
    let mut f = files(POLICY_V2);
    f.insert("big.yaml".into(), format!("# {}\n", "y".repeat(17 << 20)));
    let body = serde_json::to_vec(&serde_json::json!({ "files": f })).unwrap();
    let before = snapshot(&env);
    let (s, j) = raw(&env, "POST", "/v1/policy", Some(&env.operator), Some(&body));
    assert_eq!(s, 413, "{j}");
    assert!(j["error"].as_str().unwrap_or_default().contains("big.yaml"), "{j}");
    assert_eq!(snapshot(&env), before);

    // Too many files.
    let mut many = files(POLICY_V2);
    for i in 0..1100 {
        many.insert(format!("extra-{i}.yaml"), "# nothing\n".into());
    }
    let body = serde_json::to_vec(&serde_json::json!({ "files": many })).unwrap();
    let (s, j) = raw(&env, "POST", "/v1/policy", Some(&env.operator), Some(&body));
    assert_eq!(s, 413, "{j}");
    assert_eq!(snapshot(&env), before);

    // Large files (15 MiB in all), each changing every line between two
    // applies: the diff in the change record is bounded, the record fits
    // the trail (on the old code the record of the second, a 30 MiB diff,
    // could not be appended), and computing it takes bounded time.
    let per_file = 5 << 20;
    let filler = |c: char| {
        let line = format!("# {}\n", c.to_string().repeat(60));
        line.repeat(per_file / line.len())
    };
    for c in ['a', 'b'] {
        let mut f = files(POLICY_V2);
        for i in 0..3 {
            f.insert(format!("pad-{i}.yaml"), filler(c));
        }
        let body = serde_json::to_vec(&serde_json::json!({ "files": f })).unwrap();
        let (s, j) = raw(&env, "POST", "/v1/policy", Some(&env.operator), Some(&body));
        assert_eq!(s, 200, "{j}");
    }
    let st = env.ctl.status().audit.unwrap();
    assert_eq!(st.append_failures, 0, "{st:?}");
    assert_trail_matches_store(&env);
    let last = env.ctl.changes().unwrap().pop().unwrap();
    assert!(
        last.diff.len() <= (1 << 20) + 64 * 1024,
        "{} bytes of diff",
        last.diff.len()
    );
    assert!(
        last.diff.contains("pad-0.yaml"),
        "the clipped diff still names every file"
    );
}

// ---- item 5: the last-admin guard under concurrency ----

/// Two admins revoking each other at once: exactly one may succeed, round
/// after round, so a live admin token always remains.
fn last_admin_race(store: Arc<dyn Store>, rounds: usize) {
    let ctl = Controller::new(store);
    let first = ctl.create_token("local", "seed", Role::Admin).unwrap();
    let _ = first;
    let mut survivor = "seed".to_string();
    for round in 0..rounds {
        let (x, y) = (format!("x{round}"), format!("y{round}"));
        ctl.create_token("local", &x, Role::Admin).unwrap();
        ctl.revoke_token(&x, &survivor).unwrap();
        ctl.create_token("local", &y, Role::Admin).unwrap();
        let barrier = Barrier::new(2);
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| {
                barrier.wait();
                ctl.revoke_token(&x, &y)
            });
            let b = s.spawn(|| {
                barrier.wait();
                ctl.revoke_token(&y, &x)
            });
            (a.join().unwrap(), b.join().unwrap())
        });
        let live_admins = ctl
            .tokens()
            .unwrap()
            .into_iter()
            .filter(|t| t.role == Role::Admin && t.revoked.is_none())
            .count();
        assert_eq!(
            live_admins,
            1,
            "round {round}: {:?} / {:?} left {live_admins} live admin tokens",
            a.as_ref().map(|_| "revoked"),
            b.as_ref().map(|_| "revoked")
        );
        assert!(a.is_ok() != b.is_ok(), "round {round}: exactly one revocation wins");
        survivor = if a.is_ok() { x } else { y };
    }
}

#[test]
fn two_admins_revoking_each_other_leave_one_embedded() {
    let dir = TempDir::new("contract-race");
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.0.join("s.redb")).unwrap());
    last_admin_race(store, 200);
}

#[test]
fn two_admins_revoking_each_other_leave_one_etcd() {
    let Some(etcd) = TestEtcd::or_skip("race", 23_811) else {
        return;
    };
    let store: Arc<dyn Store> = Arc::new(EtcdStore::new(vec![etcd.url.clone()], "/race/"));
    last_admin_race(store, 60);
}

// ---- item 6 ----

/// A wrong method is answered 405 with the JSON error body (and `Allow`).
#[test]
fn a_wrong_method_gets_a_json_405() {
    let env = Env::start("contract-405");
    for (method, path) in [("DELETE", "/v1/policy"), ("PUT", "/v1/tokens"), ("POST", "/v1/vms")] {
        let (s, allow, j) = raw_h(&env, method, path, Some(&env.admin), Some(b"{}"), "allow");
        assert_eq!(s, 405, "{method} {path}");
        assert!(
            j["error"].as_str().is_some_and(|e| e.contains(method)),
            "{method} {path}: {j}"
        );
        assert!(allow.is_some_and(|a| !a.is_empty()), "{method} {path}: no Allow header");
    }
}

/// Token names are unique (a read-only token named like the admin would
/// make change records ambiguous), revoked ones included.
#[test]
fn token_names_are_unique() {
    let env = Env::start("contract-names");
    let before = snapshot(&env);
    let (s, j) = raw(
        &env,
        "POST",
        "/v1/tokens",
        Some(&env.admin),
        Some(br#"{"name":"alice","role":"read-only"}"#),
    );
    assert_eq!(s, 409, "{j}");
    assert!(j["error"].as_str().unwrap_or_default().contains("alice"), "{j}");
    assert_eq!(snapshot(&env), before);
    assert!(env.ctl.create_token("local", "olga", Role::Admin).is_err());
    // A revoked name stays taken: its change records name it.
    env.ctl.create_token("local", "temp", Role::Operator).unwrap();
    env.ctl.revoke_token("alice", "temp").unwrap();
    assert!(env.ctl.create_token("local", "temp", Role::Operator).is_err());
    // Two at once with one new name: one wins.
    let results: Vec<bool> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| s.spawn(|| env.ctl.create_token("local", "twin", Role::ReadOnly).is_ok()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results.iter().filter(|&&ok| ok).count(), 1, "{results:?}");
}

/// File names with NUL, control, bidi or zero-width characters are refused.
#[test]
fn file_names_with_control_characters_are_refused() {
    let env = Env::start("contract-filenames");
    let before = snapshot(&env);
    for name in [
        "a\u{0}.yaml",
        "a\nb.yaml",
        "a\u{1b}[31m.yaml",
        "\u{202e}lmay.yaml",
        "a\u{200b}.yaml",
        ".yaml",
        "../x.yaml",
    ] {
        let mut f = files(POLICY_V2);
        f.insert(name.into(), "# x\n".into());
        let body = serde_json::to_vec(&serde_json::json!({ "files": f })).unwrap();
        let (s, j) = raw(&env, "POST", "/v1/policy", Some(&env.operator), Some(&body));
        assert!((400..500).contains(&s) && s != 404, "{name:?}: {s} {j}");
        assert!(
            j["error"].as_str().unwrap_or_default().contains("file name"),
            "{name:?}: {j}"
        );
    }
    assert_eq!(snapshot(&env), before);
}

/// Unknown fields are refused with an answer naming them: a typo such as
/// `remov` must not silently do nothing.
#[test]
fn unknown_fields_are_refused_by_name() {
    let env = Env::start("contract-unknown");
    apply_v2(&env);
    let before = snapshot(&env);
    let cases: [(&str, &str, &[u8], &str); 6] = [
        (
            "PUT",
            "/v1/vms/web-1/tags",
            br#"{"set":{"a":"b"},"remov":["tier"]}"#,
            "remov",
        ),
        (
            "POST",
            "/v1/tokens",
            br#"{"name":"n1","role":"admin","rolle":"x"}"#,
            "rolle",
        ),
        (
            "POST",
            "/v1/policy",
            br#"{"files":{"a.yaml":"x"},"mesage":"m"}"#,
            "mesage",
        ),
        (
            "POST",
            "/v1/agents/hv1/register",
            br#"{"agent_version":"1","extra":1}"#,
            "extra",
        ),
        (
            "POST",
            "/v1/agents/hv1/flows",
            br#"{"records":[],"record":[]}"#,
            "record",
        ),
        (
            "POST",
            "/v1/agents/hv1/alerts",
            br#"{"records":[],"alerts":[]}"#,
            "alerts",
        ),
    ];
    for (method, path, body, field) in cases {
        let (s, j) = raw(&env, method, path, Some(&env.admin), Some(body));
        assert_eq!(s, 400, "{method} {path}: {j}");
        assert!(
            j["error"].as_str().unwrap_or_default().contains(field),
            "{method} {path}: {j} should name {field}"
        );
    }
    assert_eq!(snapshot(&env), before);
}

/// In plain-HTTP mode an agent's host name is checked like a certificate's
/// would be: no path tricks reach the store.
#[test]
fn agent_host_names_are_validated_in_plain_http() {
    let env = Env::start("contract-host");
    let before = snapshot(&env);
    for host in [
        "..%2F..%2Ftokens%2Fx",
        "a%00b",
        "a%0Ab",
        "-x",
        "a..b",
        "%E2%80%AEx",
        "x%20y",
    ] {
        for (method, what, body) in [
            ("POST", "register", Some(&b"{}"[..])),
            ("POST", "report", Some(&b"{\"installed_revision\":1}"[..])),
            ("GET", "policy", None),
            ("POST", "flows", Some(&b"{\"records\":[]}"[..])),
            ("POST", "alerts", Some(&b"{\"records\":[]}"[..])),
        ] {
            let path = format!("/v1/agents/{host}/{what}");
            let (s, j) = raw(&env, method, &path, Some(&env.admin), body);
            assert_eq!(s, 400, "{path}: {j}");
            assert!(j["error"].as_str().unwrap_or_default().contains("host"), "{path}: {j}");
        }
    }
    assert_eq!(snapshot(&env), before);
    assert!(env.store.list_prefix("tokens/x").unwrap().is_empty());
}

// ---- the API contract ----

/// Top-level bodies are objects: a JSON array no longer decodes into a
/// request by position.
#[test]
fn bodies_must_be_objects() {
    let env = Env::start("contract-arrays");
    apply_v2(&env);
    let before = snapshot(&env);
    for (method, path, body) in [
        ("POST", "/v1/tokens", &br#"["arr-token","read-only"]"#[..]),
        ("POST", "/v1/agents/hv1/register", b"[]"),
        ("PUT", "/v1/vms/web-1/tags", br#"[{"arr":"1"}]"#),
        ("POST", "/v1/agents/hv1/report", b"[1]"),
        ("POST", "/v1/policy?dry_run=true", br#"[{"a.yaml":"x"}]"#),
        ("POST", "/v1/agents/hv1/flows", b"[[]]"),
        ("POST", "/v1/tokens", b"\"x\""),
        ("POST", "/v1/tokens", b"null"),
    ] {
        let (s, j) = raw(&env, method, path, Some(&env.admin), Some(body));
        assert_eq!(s, 400, "{method} {path}: {j}");
        assert!(j["error"].as_str().unwrap_or_default().contains("object"), "{j}");
    }
    assert_eq!(snapshot(&env), before);
}

/// Names, tag keys and values with control, bidi or zero-width characters
/// are refused; `palisade get vms` then never prints them raw.
#[test]
fn control_characters_in_tags_are_refused() {
    let env = Env::start("contract-ctl-chars");
    apply_v2(&env);
    let before = snapshot(&env);
    for bad in [
        "\u{0}",
        "a\nb",
        "\u{1b}[2J",
        "\u{7f}",
        "\u{202e}evil",
        "zero\u{200b}width",
        "\u{feff}bom",
        "\u{85}",
    ] {
        for body in [
            serde_json::json!({ "set": { bad: "v" } }),
            serde_json::json!({ "set": { "k": bad } }),
            serde_json::json!({ "remove": [bad] }),
        ] {
            let b = serde_json::to_vec(&body).unwrap();
            let (s, j) = raw(&env, "PUT", "/v1/vms/web-1/tags", Some(&env.operator), Some(&b));
            assert!(s == 400 || s == 422, "{body}: {s} {j}");
        }
        let b = serde_json::to_vec(&serde_json::json!({ "name": format!("n{bad}"), "role": "read-only" })).unwrap();
        let (s, j) = raw(&env, "POST", "/v1/tokens", Some(&env.admin), Some(&b));
        assert_eq!(s, 400, "{j}");
    }
    assert_eq!(snapshot(&env), before);
}

/// Query parameters are held to the document: `wait` at most 300,
/// booleans only `true` or `false`, unknown ones refused.
#[test]
fn query_parameters_are_held_to_the_document() {
    let env = Env::start("contract-query");
    apply_v2(&env);
    for path in [
        "/v1/agents/hv1/policy?wait=301",
        "/v1/agents/hv1/policy?wait=-1",
        "/v1/agents/hv1/policy?after=1&after=2",
        "/v1/agents/hv1/policy?colour=red",
        "/v1/flows?changes=",
        "/v1/flows?changes=1",
        "/v1/flows?changes=0",
        "/v1/flows?limit=-1",
        "/v1/flows?limit=100001",
        "/v1/policy?dry_run=",
        "/v1/vms?x=1",
    ] {
        let method = if path.starts_with("/v1/policy?") { "POST" } else { "GET" };
        let body = serde_json::to_vec(&serde_json::json!({ "files": files(POLICY_V2) })).unwrap();
        let body = (method == "POST").then_some(&body[..]);
        let (s, j) = raw(&env, method, path, Some(&env.admin), body);
        assert_eq!(s, 400, "{path}: {j}");
        assert!(j["error"].is_string(), "{path}: {j}");
    }
    let (s, j) = raw(&env, "GET", "/v1/agents/hv1/policy?wait=0", Some(&env.admin), None);
    assert_eq!(s, 200, "{j}");
    let (s, j) = raw(&env, "GET", "/v1/flows?changes=false&limit=0", Some(&env.admin), None);
    assert_eq!(s, 200, "{j}");
}

/// Every 401 says how to authenticate (RFC 6750: `WWW-Authenticate: Bearer`).
#[test]
fn unauthorized_answers_carry_www_authenticate() {
    let env = Env::start("contract-401");
    for (token, needle) in [(None, "Bearer"), (Some("pal_nope"), "invalid_token")] {
        let (s, h, j) = raw_h(&env, "GET", "/v1/vms", token, None, "www-authenticate");
        assert_eq!(s, 401, "{j}");
        let h = h.unwrap_or_default();
        assert!(h.starts_with("Bearer") && h.contains(needle), "{h:?}");
    }
}

/// The document is valid OpenAPI 3.0.3, checked by the reference validator
/// (`openapi-spec-validator`, which CI installs: scripts/install-deps).
#[test]
fn the_document_is_valid_openapi_3_0() {
    let doc = palisade_controller::openapi_document();
    let dir = TempDir::new("contract-openapi");
    let path = dir.0.join("openapi.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    let probe = std::process::Command::new("python3")
        .args(["-c", "import openapi_spec_validator"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set and openapi-spec-validator is missing (scripts/install-deps installs it)"
        );
        eprintln!("skipping: python3 -m openapi_spec_validator is not installed (pip install openapi-spec-validator)");
        return;
    }
    let out = std::process::Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The document says what the server enforces.
#[test]
fn the_document_describes_what_the_server_enforces() {
    let doc = palisade_controller::openapi_document();
    let text = doc.to_string();
    assert!(!text.contains("\"type\":["), "a type list is OpenAPI 3.1 only");
    assert!(
        !text.contains("\"required\":[]"),
        "an empty required list is invalid in 3.0"
    );
    let s = &doc["components"]["schemas"];
    assert_eq!(doc["paths"]["/openapi.json"]["get"]["security"], serde_json::json!([]));
    assert_eq!(s["ApplyRequest"]["properties"]["files"]["minProperties"], 1);
    assert_eq!(s["TokenRequest"]["properties"]["name"]["maxLength"], 64);
    assert!(s["TokenRequest"]["properties"]["name"]["pattern"].is_string());
    assert_eq!(s["ApplyRequest"]["additionalProperties"], false);
    let limit = doc["paths"]["/v1/flows"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "limit")
        .unwrap();
    assert_eq!(limit["schema"]["minimum"], 0);
    assert_eq!(limit["schema"]["maximum"], 100_000);
    let counters = &s["ReportRequest"]["properties"]["counters"]["additionalProperties"];
    assert_eq!(counters["maximum"], serde_json::json!(u64::MAX));
    // FlowRecord: every field a real record has, the ones always present required.
    let rec = serde_json::to_value(sample_flow()).unwrap();
    let schema = &s["FlowRecord"];
    let props = schema["properties"].as_object().expect("FlowRecord has properties");
    for k in rec.as_object().unwrap().keys() {
        assert!(props.contains_key(k), "FlowRecord field {k} is not described");
    }
    let required: Vec<&str> = schema["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for k in &required {
        assert!(rec.get(*k).is_some(), "{k} is required but a record need not have it");
    }
    // 401s document WWW-Authenticate.
    let r401 = &doc["paths"]["/v1/vms"]["get"]["responses"]["401"];
    assert!(r401["headers"]["WWW-Authenticate"].is_object(), "{r401}");
}

fn sample_flow() -> palisade_audit::record::FlowRecord {
    use palisade_audit::record::*;
    FlowRecord {
        appliance: None,
        time_ns: 1,
        flow_id: 2,
        host: "hv1".into(),
        phase: Phase::Start,
        src: Endpoint {
            addr: "10.0.1.11".parse().unwrap(),
            port: 1,
            vm: None,
        },
        dst: Endpoint {
            addr: "10.0.1.12".parse().unwrap(),
            port: 2,
            vm: None,
        },
        protocol: 6,
        icmp: None,
        verdict: Verdict::Allow,
        decided_by: vec![],
        packets_out: 0,
        bytes_out: 0,
        packets_in: 0,
        bytes_in: 0,
        start_ns: 1,
        last_ns: 1,
    }
}

/// `null` is not a field left out: `{"set": null}` breaks the document's
/// schema (found by Schemathesis: it was taken as "no tags to set").
#[test]
fn null_fields_are_refused() {
    let env = Env::start("contract-null");
    apply_v2(&env);
    let before = snapshot(&env);
    for (method, path, body) in [
        ("PUT", "/v1/vms/web-1/tags", &br#"{"remove":["tier"],"set":null}"#[..]),
        ("PUT", "/v1/vms/web-1/tags", br#"{"remove":null,"set":{"a":"b"}}"#),
        (
            "POST",
            "/v1/policy?dry_run=true",
            br#"{"files":{"a.yaml":"x"},"message":null}"#,
        ),
        ("POST", "/v1/agents/hv1/register", br#"{"agent_version":null}"#),
    ] {
        let (s, j) = raw(&env, method, path, Some(&env.admin), Some(body));
        assert_eq!(s, 400, "{method} {path} {}: {j}", String::from_utf8_lossy(body));
    }
    assert_eq!(snapshot(&env), before);
}

/// Item 3's other half: a trail that cannot be written (its disk full) does
/// not leave a committed change out for good. The change whose append
/// failed is committed (its record is in the store) and counted; no other
/// change is accepted until the trail has it (503, nothing stored); once
/// space is back the server appends it by itself, and changes go on. Needs
/// root (a small tmpfs); skipped with a message otherwise.
#[test]
fn a_full_trail_disk_holds_changes_back_until_the_record_is_appended() {
    use palisade_controller::server::{self, ServeOptions};
    use palisade_controller::trail::Trail;
    let dir = TempDir::new("contract-full");
    let audit = dir.0.join("audit");
    std::fs::create_dir_all(&audit).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&audit)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root: mounting a tmpfs must work"
        );
        eprintln!("skipping: cannot mount a tmpfs (not root)");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(audit.clone());
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.0.join("s.redb")).unwrap());
    let trail = Arc::new(Trail::open(&audit).unwrap());
    let ctl = Controller::new(store.clone()).with_trail(trail);
    let op = ctl.create_token("local", "olga", Role::Operator).unwrap();
    let mut opts = ServeOptions::plain("127.0.0.1:0".parse().unwrap());
    opts.poll_interval = std::time::Duration::from_millis(100);
    let srv = server::spawn(ctl.clone(), opts).unwrap();
    let call = |method: &str, path: &str, body: &[u8]| -> (u16, serde_json::Value) {
        let req = ureq::request(method, &format!("{}{path}", srv.url())).set("Authorization", &format!("Bearer {op}"));
        let resp = match req.send_bytes(body) {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{e}"),
        };
        let status = resp.status();
        (
            status,
            serde_json::from_str(&resp.into_string().unwrap_or_default()).unwrap_or_default(),
        )
    };
    let apply = serde_json::to_vec(&serde_json::json!({ "files": files(POLICY_V2) })).unwrap();
    assert_eq!(call("POST", "/v1/policy", &apply).0, 200);

    // Fill the disk.
    let filler = audit.join("filler");
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&filler).unwrap();
        while f.write_all(&[0u8; 64 << 10]).and_then(|()| f.sync_all()).is_ok() {}
    }
    // A record larger than what is left of the files' last pages.
    let set: serde_json::Map<String, serde_json::Value> = (0..60)
        .map(|i| (format!("disk-{i}"), serde_json::json!("f".repeat(250))))
        .collect();
    let big = serde_json::to_vec(&serde_json::json!({ "set": set })).unwrap();
    let (s, j) = call("PUT", "/v1/vms/web-1/tags", &big);
    assert_eq!(s, 200, "the change is committed: its record is in the store: {j}");
    let st = ctl.status().audit.unwrap();
    assert_eq!((st.append_failures, st.unaudited), (1, 1), "{st:?}");
    let before = store.list_prefix("").unwrap();
    let (s, j) = call("PUT", "/v1/vms/web-1/tags", br#"{"set":{"next":"change"}}"#);
    assert_eq!(s, 503, "{j}");
    assert!(j["error"].as_str().unwrap_or_default().contains("audit log"), "{j}");
    assert_eq!(
        store.list_prefix("").unwrap(),
        before,
        "nothing stored while the trail lacks a change"
    );

    // Space comes back: the server appends the missing record by itself.
    std::fs::remove_file(&filler).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while ctl.status().audit.unwrap().unaudited != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the missing record was never appended"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        call("PUT", "/v1/vms/web-1/tags", br#"{"set":{"next":"change"}}"#).0,
        200
    );
    srv.stop();
    let stored = ctl.changes().unwrap();
    let logged: Vec<_> = palisade_audit::LogReader::open(&audit)
        .unwrap()
        .query(&palisade_audit::Query::default())
        .unwrap()
        .into_iter()
        .filter_map(|(_, r)| match r {
            palisade_audit::record::Record::Change(c) => Some(c),
            _ => None,
        })
        .collect();
    assert_eq!(stored, logged, "every committed change in the trail, once, in order");
    let report = palisade_audit::verify(&audit, None).unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
}
