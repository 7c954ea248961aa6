//! Audit keys and heads at the controller (issue 22, items 9 and 10): an
//! agent's trail key is pinned at registration (trust on first use), its
//! signed heads only move forward, a rollback or fork is refused and kept as
//! evidence, only an admin replaces a key (a recorded change), and the
//! controller's own trail publishes its heads into the store.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use common::*;
use palisade_api::client::{Client, ClientAuth, ClientError};
use palisade_api::{AuditHeadInfo, HeadDocument};
use palisade_audit::record::{ChangeRecord, Record};
use palisade_audit::{AuditConfig, AuditError, AuditLog, HeadPublisher, SignedHead};

fn client(env: &Env, token: &str) -> Client {
    Client::new(&env.url(), ClientAuth::Token(token.to_string())).unwrap()
}

fn status(e: ClientError) -> (u16, String) {
    match e {
        ClientError::Api { status, error, .. } => (status, error),
        other => panic!("expected an API error, got {other}"),
    }
}

/// Collects the heads a log publishes.
#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Vec<SignedHead>>>);

impl HeadPublisher for Collect {
    fn publish(&mut self, head: &SignedHead) -> Result<(), String> {
        self.0.lock().unwrap().push(*head);
        Ok(())
    }
    fn last_published(&mut self) -> Result<Option<SignedHead>, AuditError> {
        Ok(None)
    }
    fn describe(&self) -> String {
        "test".into()
    }
}

fn record(i: u64, what: &str) -> Record {
    Record::Change(ChangeRecord {
        time_ns: 1_700_000_000_000_000_000 + i,
        actor: "t".into(),
        action: what.into(),
        resource: format!("r/{i}"),
        diff: String::new(),
        policy_version: None,
    })
}

/// A trail in `root/name` signed with the key in `key`, whose heads after
/// each of `n` appends (one record each, labelled `what`) are returned.
fn heads(root: &Path, name: &str, key: &Path, n: u64, what: &str) -> (Vec<SignedHead>, [u8; 32]) {
    let c = Collect::default();
    let config = AuditConfig {
        key_file: Some(key.to_path_buf()),
        ..AuditConfig::default()
    };
    let mut log = AuditLog::open_with(&root.join(name), config, vec![Box::new(c.clone())]).unwrap();
    for i in 1..=n {
        log.append(&[record(i, what)]).unwrap();
        log.checkpoint(i).unwrap();
    }
    let pk = log.public_key();
    let got = c.0.lock().unwrap().clone();
    (got, pk)
}

#[test]
fn keys_are_pinned_on_first_use_and_heads_only_move_forward() {
    let env = Env::start("heads-agent");
    let admin = client(&env, &env.admin);
    let root = env.dir.0.join("trails");
    let key = env.dir.0.join("agent.key");
    let (hs, pk) = heads(&root, "a", &key, 3, "x");
    assert_eq!(hs.len(), 3);
    let before = env.trail.status().last_seq;

    // A head before any key is pinned: nothing to check it against.
    let (code, _) = status(admin.put_audit_head("hv1", &hs[0]).unwrap_err());
    assert_eq!(code, 404);

    // Registration pins the key; the same key again is fine.
    admin.register_audit_key("hv1", "t", &pk).unwrap();
    admin.register_audit_key("hv1", "t", &pk).unwrap();
    let info = admin.audit_head(Some("hv1")).unwrap();
    assert_eq!(info.public_key, palisade_api::validate::hex(&pk));
    assert_eq!(info.head, None);

    // Another key is refused, naming the host, and recorded.
    let (_, other_pk) = heads(&root, "b", &env.dir.0.join("other.key"), 1, "x");
    let (code, msg) = status(admin.register_audit_key("hv1", "t", &other_pk).unwrap_err());
    assert_eq!(code, 409, "{msg}");
    assert!(msg.contains("\"hv1\""), "{msg}");
    let info = admin.audit_head(Some("hv1")).unwrap();
    assert_eq!(info.public_key, palisade_api::validate::hex(&pk), "the first key stays");
    assert_eq!(info.refused_keys.len(), 1);
    assert_eq!(info.refused_keys[0].public_key, palisade_api::validate::hex(&other_pk));

    // Valid heads are stored and returned, moving forward; the same one again changes nothing.
    admin.put_audit_head("hv1", &hs[1]).unwrap();
    let info = admin.put_audit_head("hv1", &hs[2]).unwrap();
    assert_eq!(info.head, Some(HeadDocument::of(&hs[2])));
    admin.put_audit_head("hv1", &hs[2]).unwrap();
    assert_eq!(
        admin.audit_head(Some("hv1")).unwrap().head,
        Some(HeadDocument::of(&hs[2]))
    );

    // A forged signature: refused, not stored, not evidence.
    let mut forged = hs[2];
    forged.seq = 10;
    let (code, msg) = status(admin.put_audit_head("hv1", &forged).unwrap_err());
    assert_eq!(code, 422, "{msg}");
    let info = admin.audit_head(Some("hv1")).unwrap();
    assert_eq!(info.head, Some(HeadDocument::of(&hs[2])));
    assert!(info.conflicts.is_empty());

    // A head signed by another key: refused.
    let (other, _) = heads(&root, "c", &env.dir.0.join("other.key"), 5, "x");
    let (code, _) = status(admin.put_audit_head("hv1", &other[4]).unwrap_err());
    assert_eq!(code, 409);

    // A lower seq (a rollback): refused and kept.
    let (code, msg) = status(admin.put_audit_head("hv1", &hs[0]).unwrap_err());
    assert_eq!(code, 409, "{msg}");
    assert!(msg.contains("rollback"), "{msg}");
    // The same seq with another hash (a fork, signed with the same key): refused and kept.
    let (fork, _) = heads(&root, "d", &key, 3, "forked");
    assert_eq!(fork[2].seq, hs[2].seq);
    assert_ne!(fork[2].hash, hs[2].hash);
    let (code, msg) = status(admin.put_audit_head("hv1", &fork[2]).unwrap_err());
    assert_eq!(code, 409, "{msg}");
    assert!(msg.contains("fork"), "{msg}");
    let info = admin.audit_head(Some("hv1")).unwrap();
    assert_eq!(info.head, Some(HeadDocument::of(&hs[2])), "the head held stays");
    assert_eq!(info.conflicts.len(), 2);
    assert_eq!(info.conflicts_seen, 2);
    assert_eq!(info.conflicts[0].head, HeadDocument::of(&hs[0]));
    assert_eq!(info.conflicts[1].head, HeadDocument::of(&fork[2]));
    use palisade_api::HeadConflictKind::*;
    assert_eq!((info.conflicts[0].kind, info.conflicts[1].kind), (Rollback, Fork));
    // What `audit verify --server` does with it: the trail matches the head
    // held, and fails for each refused head, as what it was.
    let published = admin.published_heads(Some("hv1")).unwrap();
    let report = palisade_audit::verify::verify_published(&root.join("a"), &published).unwrap();
    assert_eq!(report.head_seq, Some(3));
    let kinds: Vec<_> = report.problems.iter().map(|p| (p.kind, p.seq)).collect();
    use palisade_audit::ProblemKind as K;
    assert_eq!(kinds, [(K::BehindHead, Some(1)), (K::ConflictingCheckpoints, Some(3))]);
    // Readable by any role.
    let reader = client(&env, &env.reader);
    assert_eq!(reader.audit_head(Some("hv1")).unwrap(), info);
    // Agent endpoints are not for other roles (plain HTTP: admin only).
    let (code, _) = status(client(&env, &env.operator).put_audit_head("hv1", &hs[2]).unwrap_err());
    assert_eq!(code, 403);
    // None of this is a change of the controller's: nothing in its trail.
    assert_eq!(env.trail.status().last_seq, before);
}

#[test]
fn only_an_admin_replaces_a_key_and_it_is_recorded() {
    let env = Env::start("heads-replace");
    let admin = client(&env, &env.admin);
    let root = env.dir.0.join("trails");
    let (hs, pk) = heads(&root, "a", &env.dir.0.join("a.key"), 2, "x");
    let (new_hs, new_pk) = heads(&root, "b", &env.dir.0.join("b.key"), 1, "x");
    admin.register_audit_key("hv1", "t", &pk).unwrap();
    admin.put_audit_head("hv1", &hs[1]).unwrap();
    let _ = admin.put_audit_head("hv1", &hs[0]).unwrap_err();

    for token in [&env.operator, &env.auditor, &env.reader] {
        let (code, _) = status(client(&env, token).replace_audit_key("hv1", &new_pk).unwrap_err());
        assert_eq!(code, 403);
    }
    assert_eq!(
        admin.audit_head(Some("hv1")).unwrap().public_key,
        palisade_api::validate::hex(&pk)
    );

    let info = admin.replace_audit_key("hv1", &new_pk).unwrap();
    assert_eq!(info.public_key, palisade_api::validate::hex(&new_pk));
    assert_eq!((info.head.as_ref(), info.conflicts.len()), (None, 0));
    // The new trail's heads are taken from seq 1 again.
    admin.put_audit_head("hv1", &new_hs[0]).unwrap();
    // The change is in the store and in the controller's trail, naming what was dropped.
    let q = palisade_audit::Query {
        kind: Some(palisade_audit::RecordKind::Change),
        ..Default::default()
    };
    let recorded: Vec<ChangeRecord> = env
        .trail
        .query(&q)
        .unwrap()
        .into_iter()
        .filter_map(|(_, r)| match r {
            Record::Change(c) if c.action == "agent.audit-key" => Some(c),
            _ => None,
        })
        .collect();
    assert_eq!(recorded.len(), 1);
    let c = &recorded[0];
    assert_eq!((c.actor.as_str(), c.resource.as_str()), ("alice", "agent/hv1"));
    assert!(c.diff.contains(&palisade_api::validate::hex(&pk)), "{}", c.diff);
    assert!(c.diff.contains(&palisade_api::validate::hex(&new_pk)), "{}", c.diff);
    assert!(c.diff.contains("dropped head seq 2"), "{}", c.diff);
    assert!(c.diff.contains("dropped refused head seq 1"), "{}", c.diff);
    assert!(env.ctl.changes().unwrap().iter().any(|s| s == c));
    // Not a valid key: 422; not hex: 400.
    let (code, _) = status(admin.replace_audit_key("no.such.host..", &new_pk).unwrap_err());
    assert_eq!(code, 400);
}

#[test]
fn the_controllers_own_heads_go_to_its_store() {
    let dir = TempDir::new("heads-own");
    let store: Arc<dyn palisade_controller::store::Store> =
        Arc::new(palisade_controller::store::EmbeddedStore::open(&dir.0.join("store.redb")).unwrap());
    let audit = dir.0.join("audit");
    let config = || AuditConfig {
        key_file: Some(dir.0.join("audit.key")),
        ..AuditConfig::default()
    };
    let trail = Arc::new(palisade_controller::trail::Trail::open_publishing(&audit, config(), store.clone()).unwrap());
    let ctl = palisade_controller::core::Controller::new(store.clone()).with_trail(trail.clone());
    let admin = ctl
        .create_token("local", "alice", palisade_api::roles::Role::Admin)
        .unwrap();
    let server = palisade_controller::server::spawn(
        ctl.clone(),
        palisade_controller::server::ServeOptions::plain("127.0.0.1:0".parse().unwrap()),
    )
    .unwrap();
    let c = Client::new(&server.url(), ClientAuth::Token(admin)).unwrap();
    ctl.create_token("alice", "rita", palisade_api::roles::Role::ReadOnly)
        .unwrap();
    let info: AuditHeadInfo = c.audit_head(None).unwrap();
    assert_eq!(info.public_key, palisade_api::validate::hex(&trail.public_key()));
    let head = info.head.expect("a head").to_head().unwrap();
    assert!(head.verify());
    assert_eq!(head.seq, trail.status().last_seq);
    assert_eq!(trail.status().published_seq, Some(head.seq));
    // The CLI's view of it checks the trail (intact).
    let published = c.published_heads(None).unwrap();
    let report = palisade_audit::verify::verify_published(&audit, &published).unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.head_seq, Some(head.seq));
    server.stop();
    drop(ctl);

    // Roll the trail back to a copy with fewer records: the store's head
    // is ahead of it, and the trail refuses to open.
    let trail = Arc::try_unwrap(trail).unwrap();
    let copy = dir.0.join("copy");
    copy_dir(&audit, &copy);
    let ctl = palisade_controller::core::Controller::new(store.clone()).with_trail(Arc::new(trail));
    ctl.create_token("local", "olga", palisade_api::roles::Role::Operator)
        .unwrap();
    drop(ctl);
    std::fs::remove_dir_all(&audit).unwrap();
    std::fs::rename(&copy, &audit).unwrap();
    let e = palisade_controller::trail::Trail::open_publishing(&audit, config(), store.clone()).unwrap_err();
    assert!(e.to_string().contains("trail/"), "{e}");
    assert!(e.to_string().contains("older copy"), "{e}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Heads of two histories signed with one key, sent in a scrambled order:
/// the controller's answers and what it keeps are exactly those of a model
/// (forward only; the same head again is a no-op; behind is a rollback,
/// beside a fork, each kept up to the bound and all counted).
#[test]
fn heads_in_any_order_are_kept_or_refused_as_the_model_says() {
    use palisade_api::HeadConflictKind;
    use palisade_controller::core::CoreError;
    let env = Env::start("heads-model");
    let root = env.dir.0.join("trails");
    let key = env.dir.0.join("agent.key");
    let (a, pk) = heads(&root, "a", &key, 24, "a");
    let (b, _) = heads(&root, "b", &key, 24, "b");
    let all: Vec<SignedHead> = a.iter().chain(&b).copied().collect();
    env.ctl
        .register(
            "hv9",
            &palisade_api::RegisterRequest {
                agent_version: "t".into(),
                audit_public_key: Some(palisade_api::validate::hex(&pk)),
            },
        )
        .unwrap();
    // A small xorshift: the order is reproducible.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut held: Option<SignedHead> = None;
    let mut kept: Vec<(SignedHead, HeadConflictKind)> = Vec::new();
    let mut seen = 0u64;
    for _ in 0..400 {
        let h = all[(next() % all.len() as u64) as usize];
        let got = env.ctl.put_audit_head("hv9", &HeadDocument::of(&h));
        let expect = match held {
            None => None,
            Some(p) if h.seq > p.seq => None,
            Some(p) if h.seq == p.seq && h.hash == p.hash => None,
            Some(p) if h.seq == p.seq => Some(HeadConflictKind::Fork),
            Some(_) => Some(HeadConflictKind::Rollback),
        };
        match (expect, got) {
            (None, Ok(info)) => {
                if held.is_none_or(|p| h.seq > p.seq) {
                    held = Some(h);
                }
                assert_eq!(info.head, held.as_ref().map(HeadDocument::of));
            }
            (Some(kind), Err(CoreError::AuditConflict(_))) => {
                seen += 1;
                if kept.len() < palisade_api::validate::MAX_HEAD_CONFLICTS {
                    kept.push((h, kind));
                }
            }
            (e, g) => panic!("head seq {}: expected {e:?}, got {g:?}", h.seq),
        }
    }
    let info = env.ctl.audit_head("hv9").unwrap();
    assert_eq!(info.head, held.as_ref().map(HeadDocument::of));
    assert_eq!(info.conflicts_seen, seen);
    let got: Vec<_> = info.conflicts.iter().map(|c| (c.head.clone(), c.kind)).collect();
    let want: Vec<_> = kept.iter().map(|(h, k)| (HeadDocument::of(h), *k)).collect();
    assert_eq!(got, want);
    assert!(seen > kept.len() as u64, "the bound was reached ({seen} seen)");
}
