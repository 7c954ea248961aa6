//! Shared fixtures: a small valid policy, stores, in-process servers, a throwaway etcd.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use palisade_api::Files;
use palisade_api::roles::Role;
use palisade_controller::core::Controller;
use palisade_controller::server::{self, RunningServer, ServeOptions};
use palisade_controller::store::{EmbeddedStore, Store};
use palisade_controller::trail::Trail;

pub const INVENTORY: &str = r#"datacenter: { name: dc1, default: deny }
clusters: [{ name: prod, hosts: [hv1, hv2] }]
zones: [{ name: web, vlan: 100 }, { name: db, vlan: 200 }]
vms:
  - name: web-1
    uuid: 00000000-0000-4000-8000-000000000001
    cluster: prod
    host: hv1
    tags: { tier: web }
    vnics: [{ name: web-1.0, mac: "02:00:00:00:00:01", ips: [10.0.1.11], zone: web }]
  - name: db-1
    uuid: 00000000-0000-4000-8000-000000000002
    cluster: prod
    host: hv2
    tags: { tier: db }
    vnics: [{ name: db-1.0, mac: "02:00:00:00:00:02", ips: [10.0.2.21], zone: db }]
"#;

pub const POLICY_V1: &str = r#"groups: { web: { tags: { tier: web } }, db: { tags: { tier: db } }, internet: external }
rules:
  datacenter:
    - { id: https-in, from: internet, to: web, service: tcp/443, action: allow }
"#;

pub const POLICY_V2: &str = r#"groups: { web: { tags: { tier: web } }, db: { tags: { tier: db } }, internet: external }
rules:
  datacenter:
    - { id: https-in, from: internet, to: web, service: tcp/443, action: allow }
    - { id: web-to-db, from: web, to: db, service: tcp/5432, action: allow }
"#;

pub fn files(policy: &str) -> Files {
    [
        ("inventory.yaml".to_string(), INVENTORY.to_string()),
        ("policy.yaml".to_string(), policy.to_string()),
    ]
    .into()
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("palisade-ctl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An embedded-store controller on plain HTTP with one token per role and an audit trail in `dir/audit`.
pub struct Env {
    pub dir: TempDir,
    pub audit: PathBuf,
    pub trail: Arc<Trail>,
    pub store: Arc<dyn Store>,
    pub ctl: Controller,
    pub server: RunningServer,
    pub admin: String,
    pub operator: String,
    pub auditor: String,
    pub reader: String,
}

impl Env {
    pub fn start(tag: &str) -> Env {
        let dir = TempDir::new(tag);
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.0.join("store.redb")).unwrap());
        let audit = dir.0.join("audit");
        let trail = Arc::new(Trail::open(&audit).unwrap());
        let ctl = Controller::new(store.clone()).with_trail(trail.clone());
        let admin = ctl.create_token("local", "alice", Role::Admin).unwrap();
        let operator = ctl.create_token("local", "olga", Role::Operator).unwrap();
        let auditor = ctl.create_token("local", "audrey", Role::Auditor).unwrap();
        let reader = ctl.create_token("local", "rita", Role::ReadOnly).unwrap();
        let server = server::spawn(ctl.clone(), ServeOptions::plain("127.0.0.1:0".parse().unwrap())).unwrap();
        Env {
            dir,
            audit,
            trail,
            store,
            ctl,
            server,
            admin,
            operator,
            auditor,
            reader,
        }
    }

    pub fn url(&self) -> String {
        self.server.url()
    }
}

/// An etcd child process on loopback with a temporary data dir; killed on drop.
pub struct TestEtcd {
    child: std::process::Child,
    _dir: TempDir,
    pub url: String,
}

impl TestEtcd {
    pub fn start(tag: &str, client_port: u16) -> Result<TestEtcd, String> {
        let dir = TempDir::new(&format!("etcd-{tag}"));
        let url = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{}", client_port + 1);
        let child = std::process::Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.0.join("data"))
            .args([
                "--name",
                "t",
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run etcd: {e}"))?;
        let me = TestEtcd { child, _dir: dir, url };
        let store = palisade_controller::store::EtcdStore::new(vec![me.url.clone()], "/t/");
        for _ in 0..100 {
            if store.ping().is_ok() {
                return Ok(me);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Err("etcd did not come up in 10 s".into())
    }

    /// Start etcd, or skip (`None`) with a printed reason when `CI` is not set.
    pub fn or_skip(tag: &str, port: u16) -> Option<TestEtcd> {
        match TestEtcd::start(tag, port) {
            Ok(e) => Some(e),
            Err(why) if std::env::var_os("CI").is_none() => {
                eprintln!("skipping: {why}");
                None
            }
            Err(why) => panic!("CI is set and etcd is required: {why}"),
        }
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A three-member etcd cluster on 127.0.0.1 (client port `base + 2i`, peer
/// port `base + 2i + 1` for member `i`), each member killable on its own.
pub struct TestEtcdCluster {
    members: Vec<Option<std::process::Child>>,
    _dir: TempDir,
    /// Each member's client URL.
    pub urls: Vec<String>,
}

impl TestEtcdCluster {
    pub fn start(tag: &str, base: u16) -> Result<TestEtcdCluster, String> {
        let dir = TempDir::new(&format!("etcd3-{tag}"));
        let peer = |i: u16| format!("http://127.0.0.1:{}", base + 2 * i + 1);
        let urls: Vec<String> = (0..3).map(|i| format!("http://127.0.0.1:{}", base + 2 * i)).collect();
        let cluster = (0..3)
            .map(|i| format!("m{i}={}", peer(i)))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for i in 0..3u16 {
            let child = std::process::Command::new("etcd")
                .arg("--data-dir")
                .arg(dir.0.join(format!("m{i}")))
                .args(["--name", &format!("m{i}")])
                .args(["--listen-client-urls", &urls[usize::from(i)]])
                .args(["--advertise-client-urls", &urls[usize::from(i)]])
                .args([
                    "--listen-peer-urls",
                    &peer(i),
                    "--initial-advertise-peer-urls",
                    &peer(i),
                ])
                .args(["--initial-cluster", &cluster, "--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", tag])
                // Elections in about a second here (the defaults: 100 ms heartbeats, 1 s election).
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot run etcd: {e}"))?;
            members.push(Some(child));
        }
        let me = TestEtcdCluster {
            members,
            _dir: dir,
            urls,
        };
        for _ in 0..200 {
            if (0..3).all(|i| {
                me.status(i)
                    .is_some_and(|s| s["leader"].as_str().is_some_and(|l| l != "0"))
            }) {
                return Ok(me);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Err("the etcd cluster did not elect a leader in 20 s".into())
    }

    /// Member `i`'s `/v3/maintenance/status` answer, if it gives one.
    pub fn status(&self, i: usize) -> Option<serde_json::Value> {
        let agent = ureq::AgentBuilder::new()
            .timeout(std::time::Duration::from_secs(2))
            .build();
        let resp = agent
            .post(&format!("{}/v3/maintenance/status", self.urls[i]))
            .send_string("{}")
            .ok()?;
        serde_json::from_str(&resp.into_string().ok()?).ok()
    }

    /// The member that leads now (the one whose status names itself leader).
    pub fn leader(&self) -> Option<usize> {
        (0..3).find(|&i| {
            self.status(i)
                .is_some_and(|s| s["leader"].is_string() && s["leader"] == s["header"]["member_id"])
        })
    }

    /// Kill member `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start the cluster, or skip (`None`) with a printed reason when `CI` is not set.
    pub fn or_skip(tag: &str, base: u16) -> Option<TestEtcdCluster> {
        match TestEtcdCluster::start(tag, base) {
            Ok(e) => Some(e),
            Err(why) if std::env::var_os("CI").is_none() => {
                eprintln!("skipping: {why}");
                None
            }
            Err(why) => panic!("CI is set and etcd is required: {why}"),
        }
    }
}

impl Drop for TestEtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// A CA in `ca` with the controller's server certificate (for 127.0.0.1)
/// and a client certificate for each of `hosts`.
pub fn test_ca(ca: &std::path::Path, hosts: &[&str]) {
    palisade_controller::tls::init_ca(ca).unwrap();
    palisade_controller::tls::issue(ca, "controller", true, &["127.0.0.1".parse().unwrap()]).unwrap();
    for h in hosts {
        palisade_controller::tls::issue(ca, h, false, &[]).unwrap();
    }
}

/// A client of the controller at `url` with host `name`'s certificate from
/// the CA in `ca` (an agent's mutual TLS).
pub fn agent(ca: &std::path::Path, url: &str, name: &str) -> palisade_api::client::Client {
    let auth = palisade_api::client::ClientAuth::Cert {
        ca: ca.join("ca.pem"),
        cert: ca.join(format!("{name}.pem")),
        key: ca.join(format!("{name}.key")),
    };
    palisade_api::client::Client::new(url, auth).unwrap()
}
