//! The etcd store: several controllers share one etcd cluster.
//!
//! It speaks etcd's v3 JSON gateway (`/v3/kv/range`, `/v3/kv/txn`) over plain
//! HTTP with a blocking client, rather than gRPC: the gateway is part of every
//! etcd ≥ 3.4, needs no code generation (`protoc`) at build time, and the
//! controller only needs ranges and transactions. Keys and values travel
//! base64-encoded; 64-bit numbers come back as JSON strings. Every key is put
//! under a prefix (`/palisade/` by default), so the cluster can be shared.
//!
//! [`Store::txn`] maps one to one onto an etcd transaction: "key absent" is
//! `create_revision == 0`, "key holds v" is `value == v`; etcd evaluates the
//! comparisons and applies the puts atomically, which is what makes two
//! controllers racing on the current-policy pointer safe.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use super::{Compare, Store, StoreError};

/// A [`Store`] on an etcd cluster.
#[derive(Debug, Clone)]
pub struct EtcdStore {
    endpoints: Vec<String>,
    prefix: String,
    agent: ureq::Agent,
}

impl EtcdStore {
    /// A store on the cluster reachable at `endpoints` (`http://host:port`), keys under `prefix`.
    pub fn new(endpoints: Vec<String>, prefix: &str) -> EtcdStore {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .build();
        EtcdStore {
            endpoints: endpoints
                .into_iter()
                .map(|e| e.trim_end_matches('/').to_string())
                .collect(),
            prefix: prefix.to_string(),
            agent,
        }
    }

    /// Check that some endpoint answers.
    pub fn ping(&self) -> Result<(), StoreError> {
        self.revision().map(|_| ())
    }

    fn key(&self, k: &str) -> String {
        B64.encode(format!("{}{k}", self.prefix))
    }

    /// POST `body` to `path` on the first endpoint that answers.
    fn call(&self, path: &str, body: &Value) -> Result<Value, StoreError> {
        let mut last = StoreError::Etcd {
            endpoint: String::new(),
            message: "no endpoint configured".into(),
        };
        let body = body.to_string();
        for ep in &self.endpoints {
            let url = format!("{ep}{path}");
            match self.agent.post(&url).send_string(&body) {
                Ok(resp) => {
                    return resp
                        .into_string()
                        .map_err(|e| etcd_err(ep, e))
                        .and_then(|s| serde_json::from_str(&s).map_err(|e| etcd_err(ep, e)));
                }
                // An answer with an error status is the cluster's word: another endpoint would say the same.
                Err(ureq::Error::Status(code, resp)) => {
                    let text = resp.into_string().unwrap_or_default();
                    let message = if text.trim().is_empty() {
                        // The gateway answers a request over etcd's size limit with an empty 400.
                        format!(
                            "HTTP {code} with no explanation for a request of {} bytes (etcd refuses \
                             requests over its --max-request-bytes, 1.5 MiB unless raised)",
                            body.len()
                        )
                    } else {
                        format!("HTTP {code}: {text}")
                    };
                    return Err(etcd_err(ep, message));
                }
                Err(e) => last = etcd_err(ep, e),
            }
        }
        Err(last)
    }
}

fn etcd_err(endpoint: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Etcd {
        endpoint: endpoint.to_string(),
        message: e.to_string(),
    }
}

fn b64(v: &Value, what: &str) -> Result<Vec<u8>, StoreError> {
    // The gateway omits empty fields: an empty value is absent, not an error.
    let s = v.as_str().unwrap_or("");
    B64.decode(s)
        .map_err(|e| etcd_err("", format!("bad base64 in {what}: {e}")))
}

fn header_revision(v: &Value) -> Result<u64, StoreError> {
    v["header"]["revision"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| etcd_err("", format!("answer without a revision: {v}")))
}

impl Store for EtcdStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let v = self.call("/v3/kv/range", &json!({ "key": self.key(key) }))?;
        match v["kvs"].as_array().and_then(|a| a.first()) {
            Some(kv) => Ok(Some(b64(&kv["value"], key)?)),
            None => Ok(None),
        }
    }

    fn list_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let full = format!("{}{prefix}", self.prefix);
        let body = json!({ "key": B64.encode(&full), "range_end": B64.encode(super::prefix_end(&full)) });
        let v = self.call("/v3/kv/range", &body)?;
        let mut out = Vec::new();
        for kv in v["kvs"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let k = String::from_utf8(b64(&kv["key"], "key")?).map_err(|e| etcd_err("", e))?;
            let Some(k) = k.strip_prefix(&self.prefix) else {
                continue;
            };
            out.push((k.to_string(), b64(&kv["value"], k)?));
        }
        // etcd returns a range in key order already; sorting keeps the contract explicit.
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn txn(&self, compares: &[Compare], puts: &[(String, Vec<u8>)]) -> Result<bool, StoreError> {
        let compare: Vec<Value> = compares
            .iter()
            .map(|c| match &c.value {
                None => {
                    json!({ "key": self.key(&c.key), "target": "CREATE", "result": "EQUAL", "create_revision": "0" })
                }
                Some(v) => {
                    json!({ "key": self.key(&c.key), "target": "VALUE", "result": "EQUAL", "value": B64.encode(v) })
                }
            })
            .collect();
        let success: Vec<Value> = puts
            .iter()
            .map(|(k, v)| json!({ "request_put": { "key": self.key(k), "value": B64.encode(v) } }))
            .collect();
        let v = self.call("/v3/kv/txn", &json!({ "compare": compare, "success": success }))?;
        // The gateway leaves out false booleans.
        Ok(v["succeeded"].as_bool().unwrap_or(false))
    }

    fn revision(&self) -> Result<u64, StoreError> {
        // A range over one key returns the cluster's header revision; `count_only` keeps it small.
        let v = self.call(
            "/v3/kv/range",
            &json!({ "key": self.key("revision"), "count_only": true }),
        )?;
        header_revision(&v)
    }
}

/// A running throwaway etcd for tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::process::{Child, Command, Stdio};

    /// An etcd child process on loopback with a temporary data dir; killed on drop.
    pub(crate) struct TestEtcd {
        child: Child,
        dir: std::path::PathBuf,
        /// Its client URL.
        pub(crate) url: String,
    }

    impl TestEtcd {
        /// Start one, or say why not (no etcd binary).
        pub(crate) fn start(tag: &str, client_port: u16) -> Result<TestEtcd, String> {
            let dir = std::env::temp_dir().join(format!("palisade-ctl-etcd-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let url = format!("http://127.0.0.1:{client_port}");
            let peer = format!("http://127.0.0.1:{}", client_port + 1);
            let child = Command::new("etcd")
                .arg("--data-dir")
                .arg(&dir)
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
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot run etcd: {e}"))?;
            let me = TestEtcd { child, dir, url };
            let store = super::EtcdStore::new(vec![me.url.clone()], "/t/");
            for _ in 0..100 {
                if store.ping().is_ok() {
                    return Ok(me);
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err("etcd did not come up in 10 s".into())
        }
    }

    impl Drop for TestEtcd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Start etcd, or skip (`None`) with a printed reason when not in CI.
    pub(crate) fn etcd_or_skip(tag: &str, port: u16) -> Option<TestEtcd> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformance_on_real_etcd() {
        let Some(etcd) = testing::etcd_or_skip("conf", 23_791) else {
            return;
        };
        let s = EtcdStore::new(vec!["http://127.0.0.1:1".into(), etcd.url.clone()], "/palisade-test/");
        super::super::conformance::check(&s);
        // The prefix isolates: another prefix sees nothing.
        let other = EtcdStore::new(vec![etcd.url.clone()], "/other/");
        assert_eq!(other.list_prefix("a/").unwrap(), vec![]);
    }
}
