//! Live migrations ordered through the controller: who may order one, what
//! is checked, one per VM at a time, the source agent's reports, and the
//! records the order and its outcome leave (store and trail).

mod common;

use common::*;
use palisade_api::client::{Client, ClientAuth, ClientError};
use palisade_api::migration::{
    ArrivalReport, MigrationKind, MigrationOrder, MigrationReport, MigrationState, StagedReport,
};
use palisade_audit::record::{ChangeRecord, Record};

fn client(env: &Env, token: &str) -> Client {
    Client::new(&env.url(), ClientAuth::Token(token.to_string())).unwrap()
}

fn status(e: ClientError) -> u16 {
    match e {
        ClientError::Api { status, .. } => status,
        other => panic!("expected an API error, got {other}"),
    }
}

/// What the store holds, bar the agents' last-seen times.
fn migrations(env: &Env) -> Vec<(String, Vec<u8>)> {
    env.store.list_prefix("migrations/").unwrap()
}

fn changes(env: &Env) -> Vec<(String, Vec<u8>)> {
    env.store.list_prefix("changes/").unwrap()
}

/// The controller trail's change records whose action starts with `vm.migrate`.
fn trail_records(env: &Env) -> Vec<ChangeRecord> {
    let q = palisade_audit::Query {
        kind: Some(palisade_audit::RecordKind::Change),
        ..Default::default()
    };
    env.trail
        .query(&q)
        .unwrap()
        .into_iter()
        .filter_map(|(_, r)| match r {
            Record::Change(c) if c.action.starts_with("vm.migrate") => Some(c),
            _ => None,
        })
        .collect()
}

/// The destination agent `host` says it is ready for `order`.
fn stage(agent: &Client, host: &str, order: &MigrationOrder) -> MigrationOrder {
    let ready = StagedReport {
        id: order.id.clone(),
        ready: true,
        reason: None,
    };
    agent.report_staged(host, &order.vm, &ready).unwrap()
}

fn report(id: &str, state: MigrationState) -> MigrationReport {
    MigrationReport {
        id: id.to_string(),
        state,
        connections: None,
        state_bytes: None,
        state_blake3: None,
        switchover_us: None,
        reason: None,
    }
}

#[test]
fn orders_are_role_checked_validated_one_per_vm_and_their_outcome_recorded() {
    let env = Env::start("migration-orders");
    let op = client(&env, &env.operator);
    let admin = client(&env, &env.admin);
    // Plain HTTP: agents act with an admin token.
    let agent = client(&env, &env.admin);

    // No policy yet: no VM.
    assert_eq!(status(op.migrate("web-1", "hv2").unwrap_err()), 404);
    op.apply(&files(POLICY_V1), "first", false).unwrap();
    agent.register("hv1", "test").unwrap();

    // Who may order: operator and admin only; refused before anything is read.
    for token in [&env.reader, &env.auditor] {
        assert_eq!(status(client(&env, token).migrate("web-1", "hv2").unwrap_err()), 403);
    }
    assert_eq!(
        status(client(&env, "not-a-token").migrate("web-1", "hv2").unwrap_err()),
        401
    );
    // What is checked: the VM, the host's name, the hosts' agents, the VM's own host.
    assert_eq!(status(op.migrate("web-9", "hv2").unwrap_err()), 404);
    assert_eq!(status(op.migrate("web-1", "hv 2").unwrap_err()), 400);
    assert_eq!(status(op.migrate("web-1", "hv1").unwrap_err()), 422);
    let e = op.migrate("web-1", "hv2").unwrap_err();
    assert!(e.to_string().contains("no agent is registered on \"hv2\""), "{e}");
    assert_eq!(status(e), 422);
    assert_eq!(status(op.migrate("web-1", "hv9").unwrap_err()), 422);
    // None of the refusals stored anything.
    assert!(migrations(&env).is_empty());
    let changes_before = changes(&env).len();
    assert_eq!(status(op.migration("web-1").unwrap_err()), 404);

    agent.register("hv2", "test").unwrap();
    let order = op.migrate("web-1", "hv2").unwrap();
    assert_eq!(order.state, MigrationState::Pending);
    assert_eq!((order.from.as_str(), order.to.as_str()), ("hv1", "hv2"));
    assert_eq!(order.vnics, vec!["web-1.0".to_string()]);
    assert_eq!(order.requested_by, "olga");
    // Recorded as a change with the order.
    assert_eq!(changes(&env).len(), changes_before + 1);
    let ordered = trail_records(&env);
    assert_eq!(ordered.len(), 1);
    assert_eq!(
        (
            ordered[0].action.as_str(),
            ordered[0].actor.as_str(),
            ordered[0].resource.as_str()
        ),
        ("vm.migrate", "olga", "vm/web-1")
    );

    // One migration per VM at a time: a second order is refused (409), nothing changes.
    let stored = migrations(&env);
    let e = admin.migrate("web-1", "hv2").unwrap_err();
    assert!(e.to_string().contains("one migration per VM"), "{e}");
    assert_eq!(status(e), 409);
    assert_eq!(migrations(&env), stored);

    // The destination pre-stages first: hv2's agent gets the order, hv1's not yet.
    assert_eq!(agent.migration_orders("hv2").unwrap(), vec![order.clone()]);
    assert!(agent.migration_orders("hv1").unwrap().is_empty());
    let e = agent
        .report_migration("hv1", "web-1", &report(&order.id, MigrationState::Running))
        .unwrap_err();
    assert!(e.to_string().contains("pre-stage"), "{e}");
    assert_eq!(status(e), 409);
    // Only the destination stages it.
    let ready = StagedReport {
        id: order.id.clone(),
        ready: true,
        reason: None,
    };
    assert_eq!(status(agent.report_staged("hv1", "web-1", &ready).unwrap_err()), 422);
    let order = stage(&agent, "hv2", &order);
    assert!(order.staged_ns.is_some());
    assert_eq!(stage(&agent, "hv2", &order), order, "staging twice changes nothing");
    let stored = migrations(&env);
    // Then only the source's agent gets the order.
    assert!(agent.migration_orders("hv2").unwrap().is_empty());
    let taken = agent.migration_orders("hv1").unwrap();
    assert_eq!(taken, vec![order.clone()]);
    // A report from another host, for another order, or saying pending is refused.
    assert_eq!(
        status(
            agent
                .report_migration("hv2", "web-1", &report(&order.id, MigrationState::Running))
                .unwrap_err()
        ),
        422
    );
    assert_eq!(
        status(
            agent
                .report_migration("hv1", "web-1", &report("web-1@1", MigrationState::Running))
                .unwrap_err()
        ),
        409
    );
    assert_eq!(
        status(
            agent
                .report_migration("hv1", "web-1", &report(&order.id, MigrationState::Pending))
                .unwrap_err()
        ),
        400
    );
    assert_eq!(
        status(
            agent
                .report_migration("hv1", "db-1", &report(&order.id, MigrationState::Running))
                .unwrap_err()
        ),
        404
    );
    assert_eq!(migrations(&env), stored);

    // Taken: no longer handed out, still refusing a second order.
    let running = agent
        .report_migration("hv1", "web-1", &report(&order.id, MigrationState::Running))
        .unwrap();
    assert_eq!(running.state, MigrationState::Running);
    assert!(running.started_ns.is_some());
    assert!(agent.migration_orders("hv1").unwrap().is_empty());
    assert_eq!(status(op.migrate("web-1", "hv2").unwrap_err()), 409);

    // The outcome: stored, and a migration record in the trail.
    let hash = "5a".repeat(32);
    let mut done = report(&order.id, MigrationState::Completed);
    done.connections = Some(7);
    done.state_bytes = Some(1012);
    done.state_blake3 = Some(hash.clone());
    done.switchover_us = Some(1250);
    let completed = agent.report_migration("hv1", "web-1", &done).unwrap();
    assert_eq!(completed.state, MigrationState::Completed);
    assert_eq!(op.migration("web-1").unwrap(), completed);
    let recs = trail_records(&env);
    let rec = recs
        .iter()
        .find(|c| c.action == "vm.migrate.completed")
        .expect("a migration record");
    assert_eq!((rec.actor.as_str(), rec.resource.as_str()), ("agent/hv1", "vm/web-1"));
    let d: serde_json::Value = serde_json::from_str(&rec.diff).unwrap();
    assert_eq!(d["from"], "hv1");
    assert_eq!(d["to"], "hv2");
    assert_eq!(d["connections"], 7);
    assert_eq!(d["state_blake3"], hash.as_str());
    assert_eq!(d["outcome"], "completed");
    assert_eq!(d["started_ns"], serde_json::json!(completed.started_ns));
    assert_eq!(d["finished_ns"], serde_json::json!(completed.finished_ns));
    // Over: a second report is refused.
    assert_eq!(status(agent.report_migration("hv1", "web-1", &done).unwrap_err()), 409);

    // The VM now runs on hv2: ordering it there is refused, back to hv1 is
    // an order hv2's agent carries out.
    assert_eq!(status(op.migrate("web-1", "hv2").unwrap_err()), 422);
    let back = op.migrate("web-1", "hv1").unwrap();
    assert_eq!((back.from.as_str(), back.to.as_str()), ("hv2", "hv1"));
    assert!(
        agent.migration_orders("hv2").unwrap().is_empty(),
        "not before it is staged"
    );
    let back = stage(&agent, "hv1", &back);
    assert!(agent.migration_orders("hv1").unwrap().is_empty());
    assert_eq!(agent.migration_orders("hv2").unwrap().len(), 1);
    let mut fail = report(&back.id, MigrationState::Failed);
    fail.reason = Some("destination agent import: refused".into());
    let failed = agent.report_migration("hv2", "web-1", &fail).unwrap();
    assert_eq!(failed.state, MigrationState::Failed);
    let recs = trail_records(&env);
    let rec = recs
        .iter()
        .find(|c| c.action == "vm.migrate.failed")
        .expect("a failure record");
    assert!(rec.diff.contains("import: refused"), "{}", rec.diff);
    // A failed migration leaves the VM where it was: hv2.
    assert_eq!(status(op.migrate("web-1", "hv2").unwrap_err()), 422);
}

#[test]
fn hostile_reports_are_refused_with_the_field_named() {
    let env = Env::start("migration-hostile");
    let op = client(&env, &env.operator);
    let agent = client(&env, &env.admin);
    op.apply(&files(POLICY_V1), "first", false).unwrap();
    agent.register("hv1", "test").unwrap();
    agent.register("hv2", "test").unwrap();
    let order = op.migrate("web-1", "hv2").unwrap();
    let stored = migrations(&env);
    let post = |body: &str| -> (u16, String) {
        let r = ureq::post(&format!("{}/v1/agents/hv1/migrations/web-1", env.url()))
            .set("Authorization", &format!("Bearer {}", env.admin))
            .send_string(body);
        match r {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap()),
            Err(e) => panic!("{e}"),
        }
    };
    let id = &order.id;
    for (body, want, names) in [
        (
            format!(r#"{{"id":"{id}","state":"completed","state_blake3":"XYZ"}}"#),
            400,
            "state_blake3",
        ),
        (
            format!(r#"{{"id":"{id}","state":"completed","switchover_us":1.5}}"#),
            400,
            "expected u64",
        ),
        (
            format!(r#"{{"id":"{id}","state":"completed","connections":-1}}"#),
            400,
            "expected u64",
        ),
        (
            format!(r#"{{"id":"{id}","state":"completed","extra":1}}"#),
            400,
            "extra",
        ),
        (
            format!(r#"{{"id":"{id}","state":"moved"}}"#),
            400,
            "unknown variant `moved`",
        ),
        (
            format!(r#"{{"id":"{id}","state":"failed","reason":"a\u001b[2Jb"}}"#),
            400,
            "reason",
        ),
        (
            format!(r#"{{"id":"{id}","state":"failed","reason":"{}"}}"#, "x".repeat(5000)),
            413,
            "reason",
        ),
        (r#"["x"]"#.to_string(), 400, "JSON object"),
    ] {
        let (s, text) = post(&body);
        assert_eq!(s, want, "{body:.80}: {text}");
        assert!(text.contains(names), "{body:.80}: {text}");
    }
    assert_eq!(migrations(&env), stored);
}

fn arrival(vnic: &str, mac: &str) -> ArrivalReport {
    ArrivalReport {
        vnic: vnic.to_string(),
        mac: mac.to_string(),
        via: "rarp".to_string(),
    }
}

fn host_of(c: &Client, vm: &str) -> Option<String> {
    c.vms().unwrap().into_iter().find(|v| v.name == vm).unwrap().host
}

#[test]
fn a_completed_migration_places_the_vm_on_its_destination_for_everyone() {
    let env = Env::start("migration-location");
    let op = client(&env, &env.operator);
    let agent = client(&env, &env.admin);
    op.apply(&files(POLICY_V1), "first", false).unwrap();
    agent.register("hv1", "test").unwrap();
    agent.register("hv2", "test").unwrap();
    let before = agent.policy().unwrap();
    assert!(before.locations.is_empty());

    let order = op.migrate("web-1", "hv2").unwrap();
    let order = stage(&agent, "hv2", &order);
    agent
        .report_migration("hv1", "web-1", &report(&order.id, MigrationState::Running))
        .unwrap();
    // Not placed before it completes.
    assert_eq!(host_of(&op, "web-1").as_deref(), Some("hv1"));
    agent
        .report_migration("hv1", "web-1", &report(&order.id, MigrationState::Completed))
        .unwrap();

    // The API's inventory and hosts.
    assert_eq!(host_of(&op, "web-1").as_deref(), Some("hv2"));
    let hosts = op.hosts().unwrap();
    let vms_on = |h: &str| {
        let mut v = hosts.iter().find(|x| x.name == h).unwrap().vms.clone();
        v.sort();
        v
    };
    assert_eq!(vms_on("hv1"), Vec::<String>::new());
    assert_eq!(vms_on("hv2"), vec!["db-1".to_string(), "web-1".to_string()]);
    // What the agents are told: a new revision whose bundle places the VM on hv2.
    let after = agent.policy().unwrap();
    assert!(after.revision > before.revision);
    assert_eq!(after.locations.get("web-1").map(String::as_str), Some("hv2"));
    let model = after.model().unwrap();
    assert_eq!(model.inventory.vm("web-1").unwrap().host.as_deref(), Some("hv2"));
    // A watching agent wakes for it (bundle sent without files: same version).
    let watched = agent
        .watch_policy_having(
            "hv1",
            before.revision,
            Some(before.version),
            std::time::Duration::from_secs(5),
        )
        .unwrap()
        .expect("a newer revision");
    assert_eq!(watched.locations, after.locations);

    // A new version keeps the VM where it runs.
    op.apply(&files(POLICY_V2), "second", false).unwrap();
    assert_eq!(host_of(&op, "web-1").as_deref(), Some("hv2"));
    // A failed migration back places nothing.
    let back = op.migrate("web-1", "hv1").unwrap();
    assert_eq!(back.from, "hv2");
    let back = stage(&agent, "hv1", &back);
    agent
        .report_migration("hv2", "web-1", &report(&back.id, MigrationState::Failed))
        .unwrap();
    assert_eq!(host_of(&op, "web-1").as_deref(), Some("hv2"));
}

#[test]
fn an_agents_poll_reads_its_own_queue_only() {
    let env = Env::start("migration-queue");
    let op = client(&env, &env.operator);
    let agent = client(&env, &env.admin);
    op.apply(&files(POLICY_V1), "first", false).unwrap();
    agent.register("hv1", "test").unwrap();
    agent.register("hv2", "test").unwrap();
    // Another VM's order the poll must not read (a corrupt value would fail
    // any poll that lists every order: a 503 for every agent).
    env.store.put("migrations/zz-other", b"{not json").unwrap();
    let order = op.migrate("web-1", "hv2").unwrap();
    let queue = |h: &str| env.store.get(&format!("migration-queues/{h}")).unwrap();
    assert_eq!(queue("hv1").as_deref(), Some(&br#"["web-1"]"#[..]));
    assert_eq!(queue("hv2").as_deref(), Some(&br#"["web-1"]"#[..]));
    assert_eq!(agent.migration_orders("hv2").unwrap(), vec![order.clone()]);
    let order = stage(&agent, "hv2", &order);
    // Staged: off the destination's queue.
    assert_eq!(queue("hv2").as_deref(), Some(&b"[]"[..]));
    assert_eq!(agent.migration_orders("hv1").unwrap(), vec![order.clone()]);
    assert!(agent.migration_orders("hv2").unwrap().is_empty());
    agent
        .report_migration("hv1", "web-1", &report(&order.id, MigrationState::Failed))
        .unwrap();
    // Over: off the queue.
    assert_eq!(queue("hv1").as_deref(), Some(&b"[]"[..]));
    assert!(agent.migration_orders("hv1").unwrap().is_empty());
}

#[test]
fn a_detected_migration_places_the_vm_and_orders_its_state_to_follow() {
    let env = Env::start("migration-detected");
    let op = client(&env, &env.operator);
    let agent = client(&env, &env.admin);
    op.apply(&files(POLICY_V1), "first", false).unwrap();
    for h in ["hv1", "hv2", "hv3"] {
        agent.register(h, "test").unwrap();
    }
    let rev = agent.policy().unwrap().revision;

    // Refused, nothing stored: an unknown vNIC, another vNIC's MAC, malformed.
    assert_eq!(
        status(
            agent
                .report_arrival("hv2", &arrival("web-9.0", "02:00:00:00:00:01"))
                .unwrap_err()
        ),
        404
    );
    let e = agent
        .report_arrival("hv2", &arrival("web-1.0", "02:00:00:00:00:02"))
        .unwrap_err();
    assert!(e.to_string().contains("not the announced"), "{e}");
    assert_eq!(status(e), 422);
    assert_eq!(
        status(
            agent
                .report_arrival("hv2", &arrival("web-1.0", "02:00:00:00:00"))
                .unwrap_err()
        ),
        400
    );
    // Its own host announcing it: nothing moves.
    let here = agent
        .report_arrival("hv1", &arrival("web-1.0", "02:00:00:00:00:01"))
        .unwrap();
    assert!(!here.moved && here.order.is_none());
    assert!(migrations(&env).is_empty());
    assert_eq!(agent.policy().unwrap().revision, rev);

    // hv2 sees web-1 announce itself (MAC case is not significant).
    let seen = agent
        .report_arrival("hv2", &arrival("web-1.0", "02:00:00:00:00:01".to_uppercase().as_str()))
        .unwrap();
    assert!(seen.moved);
    assert_eq!(seen.vm, "web-1");
    let follow = seen.order.clone().unwrap();
    assert_eq!(follow.kind, MigrationKind::Follow);
    assert_eq!((follow.from.as_str(), follow.to.as_str()), ("hv1", "hv2"));
    assert_eq!(follow.state, MigrationState::Pending);
    assert_eq!(follow.vnics, vec!["web-1.0".to_string()]);
    assert_eq!(host_of(&op, "web-1").as_deref(), Some("hv2"));
    assert!(agent.policy().unwrap().revision > rev);
    let rec = trail_records(&env)
        .into_iter()
        .find(|c| c.action == "vm.migrate.detected")
        .expect("a detection record");
    assert_eq!((rec.actor.as_str(), rec.resource.as_str()), ("agent/hv2", "vm/web-1"));
    let d: serde_json::Value = serde_json::from_str(&rec.diff).unwrap();
    assert_eq!((d["from"].as_str(), d["to"].as_str()), (Some("hv1"), Some("hv2")));
    assert_eq!(d["mac"], "02:00:00:00:00:01");

    // The guest announces itself again: the same move, nothing new.
    let again = agent
        .report_arrival("hv2", &arrival("web-1.0", "02:00:00:00:00:01"))
        .unwrap();
    assert!(!again.moved);
    assert_eq!(again.order.as_ref().map(|o| &o.id), Some(&follow.id));
    // Another host claiming it while its state follows: refused.
    assert_eq!(
        status(
            agent
                .report_arrival("hv3", &arrival("web-1.0", "02:00:00:00:00:01"))
                .unwrap_err()
        ),
        409
    );
    // An operator cannot order it meanwhile either.
    assert_eq!(status(op.migrate("web-1", "hv3").unwrap_err()), 409);

    // The old host's agent gets the follow order, carries it out, reports.
    assert_eq!(agent.migration_orders("hv1").unwrap(), vec![follow.clone()]);
    agent
        .report_migration("hv1", "web-1", &report(&follow.id, MigrationState::Running))
        .unwrap();
    let mut done = report(&follow.id, MigrationState::Completed);
    done.connections = Some(2);
    let over = agent.report_migration("hv1", "web-1", &done).unwrap();
    assert_eq!(over.kind, MigrationKind::Follow);
    assert!(agent.migration_orders("hv1").unwrap().is_empty());
    assert_eq!(host_of(&op, "web-1").as_deref(), Some("hv2"));
    let rec = trail_records(&env)
        .into_iter()
        .find(|c| c.action == "vm.migrate.completed")
        .expect("its outcome");
    assert!(rec.diff.contains(r#""kind":"follow""#), "{}", rec.diff);

    // An ordered migration to hv3: its own announcement there is not a new move.
    let order = op.migrate("web-1", "hv3").unwrap();
    assert_eq!(order.from, "hv2");
    let own = agent
        .report_arrival("hv3", &arrival("web-1.0", "02:00:00:00:00:01"))
        .unwrap();
    assert!(!own.moved);
    assert_eq!(own.order.map(|o| o.id), Some(order.id));
}

#[test]
fn a_destination_that_is_not_ready_fails_the_order_before_anything_moves() {
    let env = Env::start("migration-prestage");
    let op = client(&env, &env.operator);
    let agent = client(&env, &env.admin);
    op.apply(&files(POLICY_V1), "first", false).unwrap();
    agent.register("hv1", "test").unwrap();
    agent.register("hv2", "test").unwrap();
    let order = op.migrate("web-1", "hv2").unwrap();
    let refused = StagedReport {
        id: order.id.clone(),
        ready: false,
        reason: Some("vNIC web-1.0 is not attached on this host".into()),
    };
    // Another order's report is refused.
    let other = StagedReport {
        id: "web-1@1".into(),
        ..refused.clone()
    };
    assert_eq!(status(agent.report_staged("hv2", "web-1", &other).unwrap_err()), 409);
    let failed = agent.report_staged("hv2", "web-1", &refused).unwrap();
    assert_eq!(failed.state, MigrationState::Failed);
    let reason = failed.reason.clone().unwrap();
    assert!(
        reason.contains("not ready") && reason.contains("not attached"),
        "{reason}"
    );
    // The source never sees it; the VM stays on hv1 and may be ordered again.
    assert!(agent.migration_orders("hv1").unwrap().is_empty());
    assert!(agent.migration_orders("hv2").unwrap().is_empty());
    assert_eq!(host_of(&op, "web-1").as_deref(), Some("hv1"));
    let rec = trail_records(&env)
        .into_iter()
        .find(|c| c.action == "vm.migrate.failed")
        .expect("a failure record");
    assert_eq!(rec.actor, "agent/hv2");
    assert!(rec.diff.contains("not attached"), "{}", rec.diff);
    // Over: a second staging report is refused.
    assert_eq!(status(agent.report_staged("hv2", "web-1", &refused).unwrap_err()), 409);

    // A ready destination: the pre-staging time is in the record.
    let again = op.migrate("web-1", "hv2").unwrap();
    let again = stage(&agent, "hv2", &again);
    agent
        .report_migration("hv1", "web-1", &report(&again.id, MigrationState::Completed))
        .unwrap();
    let rec = trail_records(&env)
        .into_iter()
        .find(|c| c.action == "vm.migrate.completed")
        .expect("a completion record");
    let d: serde_json::Value = serde_json::from_str(&rec.diff).unwrap();
    assert_eq!(d["staged_ns"], serde_json::json!(again.staged_ns));
    assert!(d["prestage_us"].is_u64(), "{d}");
}
