//! The agents' channel over mutual TLS.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use palisade_api::client::{Client, ClientAuth, ClientError};
use palisade_api::roles::Role;
use palisade_controller::core::Controller;
use palisade_controller::server::{self, ServeOptions};
use palisade_controller::store::{EmbeddedStore, Store};
use palisade_controller::tls;

#[test]
fn agent_certificates_are_bound_to_their_host() {
    let tmp = TempDir::new("mtls");
    let ca = tmp.0.join("ca");
    test_ca(&ca, &["hv1", "hv2"]);
    // A certificate from another CA, with the right name.
    let rogue = tmp.0.join("rogue");
    tls::init_ca(&rogue).unwrap();
    tls::issue(&rogue, "hv1", false, &[]).unwrap();
    std::fs::copy(ca.join("ca.pem"), rogue.join("ca.pem")).unwrap();

    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&tmp.0.join("s.redb")).unwrap());
    let ctl = Controller::new(store.clone());
    let token = ctl.create_token("local", "ops", Role::Admin).unwrap();
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
    assert!(url.starts_with("https://"));

    // API clients use their token over server-authenticated TLS.
    let api = Client::new(&url, ClientAuth::Token(token.clone()))
        .unwrap()
        .with_ca(&ca.join("ca.pem"))
        .unwrap();
    api.apply(&files(POLICY_V1), "over TLS", false).unwrap();

    let hv1 = agent(&ca, &url, "hv1");
    hv1.register("hv1", "t").unwrap();
    let b = hv1.watch_policy("hv1", 0, Duration::from_secs(2)).unwrap().unwrap();
    assert_eq!(b.version, 1);

    // hv1's certificate cannot act for hv2.
    let before = store.list_prefix("").unwrap();
    match hv1.watch_policy("hv2", 0, Duration::from_secs(1)) {
        Err(ClientError::Api { status: 403, error, .. }) => assert!(error.contains("\"hv1\""), "{error}"),
        other => panic!("expected 403, got {other:?}"),
    }
    match hv1.register("hv2", "t") {
        Err(ClientError::Api { status: 403, .. }) => {}
        other => panic!("expected 403, got {other:?}"),
    }
    assert_eq!(store.list_prefix("").unwrap(), before);
    agent(&ca, &url, "hv2")
        .watch_policy("hv2", 0, Duration::from_secs(1))
        .unwrap()
        .unwrap();

    // No certificate: refused, even with an admin token.
    match api.watch_policy("hv1", 0, Duration::from_secs(1)) {
        Err(ClientError::Api { status: 401, error, .. }) => assert!(error.contains("client certificate"), "{error}"),
        other => panic!("expected 401, got {other:?}"),
    }
    // A certificate from another CA does not get through the handshake.
    match agent(&rogue, &url, "hv1").watch_policy("hv1", 0, Duration::from_secs(1)) {
        Err(ClientError::Transport { .. }) => {}
        other => panic!("expected a TLS failure, got {other:?}"),
    }
    // Plain HTTP to the TLS port is not served.
    let plain = Client::new(&url.replace("https", "http"), ClientAuth::Token(token)).unwrap();
    assert!(plain.policy().is_err());
    srv.stop();
}
