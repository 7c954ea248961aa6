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
//!
//! Large values are stored in chunks, so the store works with etcd's default
//! request limit (`--max-request-bytes`, 1.5 MiB) and its advice to keep
//! values small: a policy version of 50,000 VMs is about 10 MB. A value over
//! [`INLINE_MAX`] is cut into chunks of at most [`CHUNK_BYTES`], each written
//! first under `<prefix>.blobs/<sha-256>` (content-addressed, so a rewrite
//! or a retried transaction writes the same keys; one already there is not
//! written again), and the key itself holds a
//! small manifest naming them, which is what the transaction writes and
//! compares. The manifest is a function of the value, so a compare against a
//! large value compares manifests, and the transaction stays atomic: until it
//! commits no key names the new chunks. Chunks are cut where the content
//! says (a rolling hash of the last 64 bytes, as rsync and backup tools
//! do), not at fixed offsets: a new policy version that adds one VM then
//! differs from the last in a chunk or two, and only those are sent,
//! instead of every chunk after the first changed byte.
//! A transaction that loses its compare
//! leaves its chunks unreferenced; they are small in number (one version's
//! worth per lost race) and are not collected. A read checks every chunk
//! against its hash, and a missing or altered chunk is
//! [`StoreError::Corrupt`] naming the key.
//!
//! [`Store::wait_for_write`] is an etcd watch (`/v3/watch`, a stream of JSON
//! messages, one per line) on the key from the revision after the one given,
//! so a write between the caller's read and the watch is not missed: etcd
//! replays it at once.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use super::{Compare, Store, StoreError};

/// Values up to this size are stored inline under their key: small enough
/// that a transaction of several such puts stays under etcd's request limit.
pub const INLINE_MAX: usize = 128 * 1024;
/// The most bytes in one chunk of a larger value: with its key and the
/// request's framing it stays under etcd's default 1.5 MiB request limit.
pub const CHUNK_BYTES: usize = 1024 * 1024;
/// The most bytes read from one gateway answer. Chunked values keep answers
/// small; a range over many keys is what could approach it.
const MAX_ANSWER_BYTES: u64 = 256 * 1024 * 1024;
/// The fewest bytes in a chunk other than a value's last.
const MIN_CHUNK: usize = 256 * 1024;
/// A chunk ends past [`MIN_CHUNK`] where the rolling hash has these 19 bits
/// clear: on average 512 KiB further on (or at [`CHUNK_BYTES`]).
const CUT_MASK: u64 = ((1 << 19) - 1) << 45;
/// The rolling ("gear") hash's byte values: fixed pseudo-random numbers
/// (SplitMix64), the same in every controller, so equal contents are cut
/// alike wherever they are.
const GEAR: [u64; 256] = gear_table();

const fn gear_table() -> [u64; 256] {
    let mut table = [0u64; 256];
    let mut x: u64 = 0;
    let mut i = 0;
    while i < 256 {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        table[i] = z ^ (z >> 31);
        i += 1;
    }
    table
}

/// `value` cut into chunks where its content says (see the module's documentation).
fn chunks(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = value;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (chunk, after) = rest.split_at(chunk_len(rest));
        rest = after;
        Some(chunk)
    })
}

/// The length of the chunk at the start of `data`.
fn chunk_len(data: &[u8]) -> usize {
    if data.len() <= MIN_CHUNK {
        return data.len();
    }
    let end = data.len().min(CHUNK_BYTES);
    // The hash depends on the last 64 bytes only (each shifts one bit
    // further out): start 64 bytes early so the first cut point sees a
    // full window.
    let mut h: u64 = 0;
    for (i, &b) in data.iter().enumerate().take(end).skip(MIN_CHUNK - 64) {
        h = (h << 1).wrapping_add(GEAR[usize::from(b)]);
        if i >= MIN_CHUNK && h & CUT_MASK == 0 {
            return i + 1;
        }
    }
    end
}

/// The first bytes of a chunk manifest. Stored values are JSON and never
/// start with NUL; a value that does is stored chunked, so a stored value
/// starting with this is always a manifest.
const MANIFEST_MAGIC: &[u8] = b"\0palisade-chunks/1\n";

/// How many bytes of chunks a store keeps in memory (see [`ChunkCache`]).
const CHUNK_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// A [`Store`] on an etcd cluster.
#[derive(Debug, Clone)]
pub struct EtcdStore {
    endpoints: Vec<String>,
    prefix: String,
    agent: ureq::Agent,
    /// Shared by clones, which are the same store.
    chunks: std::sync::Arc<std::sync::Mutex<ChunkCache>>,
}

/// The chunks read or written lately, by hash, oldest dropped first. A
/// chunk's key is its content's hash, so a copy never goes stale: a new
/// policy version shares most chunks with the last one, and a controller
/// that learns of it from the watch reads only the chunk or two it has not
/// seen. (A chunk altered in etcd behind Palisade's back is still found by
/// any store that reads it afresh; this one keeps returning the content the
/// hash names.)
#[derive(Debug, Default)]
struct ChunkCache {
    by_hash: std::collections::HashMap<String, std::sync::Arc<[u8]>>,
    order: std::collections::VecDeque<String>,
    bytes: usize,
}

impl ChunkCache {
    fn get(&self, hash: &str) -> Option<std::sync::Arc<[u8]>> {
        self.by_hash.get(hash).cloned()
    }

    fn put(&mut self, hash: &str, chunk: &[u8]) {
        if self.by_hash.contains_key(hash) || chunk.len() > CHUNK_CACHE_BYTES {
            return;
        }
        while self.bytes + chunk.len() > CHUNK_CACHE_BYTES {
            let Some(old) = self.order.pop_front() else { break };
            if let Some(c) = self.by_hash.remove(&old) {
                self.bytes -= c.len();
            }
        }
        self.bytes += chunk.len();
        self.order.push_back(hash.to_string());
        self.by_hash.insert(hash.to_string(), chunk.into());
    }
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
            chunks: Default::default(),
        }
    }

    fn chunk_cache(&self) -> std::sync::MutexGuard<'_, ChunkCache> {
        // Each change to the cache completes before the lock is let go, and
        // nothing in it can panic half-way: a poisoned lock holds a whole cache.
        self.chunks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Check that some endpoint answers.
    pub fn ping(&self) -> Result<(), StoreError> {
        self.revision().map(|_| ())
    }

    fn key(&self, k: &str) -> String {
        B64.encode(format!("{}{k}", self.prefix))
    }

    /// Where the chunk with this hash lives: beside the prefix, not under it,
    /// so listing the store's keys never lists chunks.
    fn chunk_key(&self, hash: &str) -> String {
        B64.encode(format!("{}.blobs/{hash}", self.prefix.trim_end_matches('/')))
    }

    /// What is stored under a key for `value`: the value itself, or for a
    /// large one its manifest, after writing the chunks it names.
    fn stored_form(&self, value: &[u8], write_chunks: bool) -> Result<Vec<u8>, StoreError> {
        if value.len() <= INLINE_MAX && !value.starts_with(b"\0") {
            return Ok(value.to_vec());
        }
        let mut manifest = MANIFEST_MAGIC.to_vec();
        manifest.extend_from_slice(format!("{}\n", value.len()).as_bytes());
        for chunk in chunks(value) {
            let hash = sha256_hex(chunk);
            if write_chunks {
                if !self.has_chunk(&hash)? {
                    let put = json!({ "key": self.chunk_key(&hash), "value": B64.encode(chunk) });
                    self.call("/v3/kv/put", &put)?;
                }
                self.chunk_cache().put(&hash, chunk);
            }
            manifest.extend_from_slice(hash.as_bytes());
            manifest.push(b'\n');
        }
        Ok(manifest)
    }

    /// Whether the chunk with this hash is stored (a count, not the chunk:
    /// most of a new version's chunks are the last version's).
    fn has_chunk(&self, hash: &str) -> Result<bool, StoreError> {
        let v = self.call(
            "/v3/kv/range",
            &json!({ "key": self.chunk_key(hash), "count_only": true }),
        )?;
        // 64-bit numbers come as strings, and the gateway leaves out zeros.
        Ok(v["count"].as_str().is_some_and(|c| c != "0"))
    }

    /// The value a stored form stands for: itself, or the chunks its manifest names.
    fn resolve(&self, key: &str, stored: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        let Some(manifest) = stored.strip_prefix(MANIFEST_MAGIC) else {
            return Ok(stored);
        };
        let corrupt = |message: String| StoreError::Corrupt {
            key: key.to_string(),
            message,
        };
        let text = std::str::from_utf8(manifest).map_err(|_| corrupt("chunk manifest is not text".into()))?;
        let mut lines = text.lines();
        let len: usize = lines
            .next()
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| corrupt("chunk manifest has no length".into()))?;
        let mut value = Vec::with_capacity(len.min(MAX_ANSWER_BYTES as usize));
        for (i, hash) in lines.enumerate() {
            if let Some(chunk) = self.chunk_cache().get(hash) {
                value.extend_from_slice(&chunk);
                continue;
            }
            let v = self.call("/v3/kv/range", &json!({ "key": self.chunk_key(hash) }))?;
            let chunk = match v["kvs"].as_array().and_then(|a| a.first()) {
                Some(kv) => b64(&kv["value"], key)?,
                None => return Err(corrupt(format!("chunk {i} ({hash}) is missing"))),
            };
            if sha256_hex(&chunk) != hash {
                return Err(corrupt(format!("chunk {i} ({hash}) does not match its hash")));
            }
            self.chunk_cache().put(hash, &chunk);
            value.extend_from_slice(&chunk);
        }
        if value.len() != len {
            return Err(corrupt(format!(
                "chunks add up to {} bytes, the manifest says {len}",
                value.len()
            )));
        }
        Ok(value)
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
                    // ureq's `into_string` stops at 10 MB; the limit here is ours.
                    use std::io::Read as _;
                    let mut text = Vec::new();
                    resp.into_reader()
                        .take(MAX_ANSWER_BYTES + 1)
                        .read_to_end(&mut text)
                        .map_err(|e| etcd_err(ep, e))?;
                    if text.len() as u64 > MAX_ANSWER_BYTES {
                        return Err(etcd_err(
                            ep,
                            format!("answer to {path} is over {MAX_ANSWER_BYTES} bytes"),
                        ));
                    }
                    return serde_json::from_slice(&text).map_err(|e| etcd_err(ep, e));
                }
                // A member without a leader (an election under way, or cut
                // off from the quorum) answers 503: another member may have one.
                Err(ureq::Error::Status(503, resp)) => {
                    let text = resp.into_string().unwrap_or_default();
                    last = etcd_err(
                        ep,
                        if text.trim().is_empty() {
                            "HTTP 503: this member is unavailable (no leader: an election under way, or it \
                             lost the cluster's quorum)"
                                .to_string()
                        } else {
                            format!("HTTP 503: {text}")
                        },
                    );
                }
                // Any other error status is the cluster's word: another endpoint would say the same.
                Err(ureq::Error::Status(code, resp)) => {
                    let text = resp.into_string().unwrap_or_default();
                    let message = if text.trim().is_empty() && code == 400 {
                        // The gateway answers a request over etcd's size limit with an empty 400.
                        format!(
                            "HTTP {code} with no explanation for a request of {} bytes (etcd refuses \
                             requests over its --max-request-bytes, 1.5 MiB unless raised)",
                            body.len()
                        )
                    } else if text.trim().is_empty() {
                        format!("HTTP {code} with no explanation")
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

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
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
            Some(kv) => Ok(Some(self.resolve(key, b64(&kv["value"], key)?)?)),
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
            let value = self.resolve(k, b64(&kv["value"], k)?)?;
            out.push((k.to_string(), value));
        }
        // etcd returns a range in key order already; sorting keeps the contract explicit.
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    fn txn(&self, compares: &[Compare], puts: &[(String, Vec<u8>)]) -> Result<bool, StoreError> {
        let compare = compares
            .iter()
            .map(|c| match &c.value {
                None => Ok(
                    json!({ "key": self.key(&c.key), "target": "CREATE", "result": "EQUAL", "create_revision": "0" }),
                ),
                Some(v) => {
                    let stored = self.stored_form(v, false)?;
                    Ok(json!({ "key": self.key(&c.key), "target": "VALUE", "result": "EQUAL", "value": B64.encode(stored) }))
                }
            })
            .collect::<Result<Vec<Value>, StoreError>>()?;
        // Chunks are written before the transaction that names them.
        let success = puts
            .iter()
            .map(|(k, v)| {
                let stored = self.stored_form(v, true)?;
                Ok(json!({ "request_put": { "key": self.key(k), "value": B64.encode(stored) } }))
            })
            .collect::<Result<Vec<Value>, StoreError>>()?;
        let v = self.call("/v3/kv/txn", &json!({ "compare": compare, "success": success }))?;
        // The gateway leaves out false booleans.
        Ok(v["succeeded"].as_bool().unwrap_or(false))
    }

    fn can_watch(&self) -> bool {
        true
    }

    fn wait_for_write(&self, key: &str, after: u64, timeout: Duration) -> Result<bool, StoreError> {
        self.watch(&self.key(key), after, timeout)
    }

    fn revision(&self) -> Result<u64, StoreError> {
        // A range over one key returns the cluster's header revision; `count_only` keeps it small.
        let v = self.call(
            "/v3/kv/range",
            &json!({ "key": self.key("revision"), "count_only": true }),
        )?;
        header_revision(&v)
    }

    fn lock(&self, name: &str, ttl: Duration, wait: Duration) -> Result<Option<u64>, StoreError> {
        let deadline = std::time::Instant::now() + wait;
        let key = self.lock_key(name);
        loop {
            // A lease per attempt: one granted before a long wait would
            // run out while waiting.
            let granted = self.call("/v3/lease/grant", &json!({ "TTL": ttl.as_secs().max(1).to_string() }))?;
            let lease: u64 = granted["ID"]
                .as_str()
                .and_then(|id| id.parse().ok())
                .ok_or_else(|| etcd_err("", format!("lease grant answered without an ID: {granted}")))?;
            // The key is created bound to the lease: revoking the lease (or
            // its expiry, when the holder is gone) deletes it.
            let txn = json!({
                "compare": [{ "key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0" }],
                "success": [{ "request_put": { "key": key, "value": B64.encode(lease.to_string()), "lease": lease.to_string() } }],
            });
            let v = self.call("/v3/kv/txn", &txn)?;
            if v["succeeded"].as_bool().unwrap_or(false) {
                return Ok(Some(lease));
            }
            self.unlock(name, lease)?;
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // Until the holder's key goes: a watch from the revision of the
            // failed attempt, so a release in between is not missed.
            self.watch(&key, header_revision(&v)?, left)?;
        }
    }

    fn unlock(&self, _name: &str, lease: u64) -> Result<(), StoreError> {
        match self.call("/v3/lease/revoke", &json!({ "ID": lease.to_string() })) {
            Ok(_) => Ok(()),
            // Already gone (expired, or let go before): nothing is held.
            // The gateway says so with a 404 whose body ureq may not read
            // (it ends in an HTTP trailer), hence the status alone.
            Err(StoreError::Etcd { message, .. })
                if message.contains("lease not found") || message.starts_with("HTTP 404") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

impl EtcdStore {
    /// Where the lock `name` lives: beside the prefix, like the chunks.
    fn lock_key(&self, name: &str) -> String {
        B64.encode(format!("{}.locks/{name}", self.prefix.trim_end_matches('/')))
    }

    /// Wait until the key `encoded` (already prefixed and encoded) is
    /// written or deleted after revision `after` (see [`Store::wait_for_write`]).
    fn watch(&self, encoded: &str, after: u64, timeout: Duration) -> Result<bool, StoreError> {
        use std::io::BufRead as _;
        let body =
            json!({ "create_request": { "key": encoded, "start_revision": (after + 1).to_string() } }).to_string();
        let mut last = etcd_err("", "no endpoint configured");
        for ep in &self.endpoints {
            let url = format!("{ep}/v3/watch");
            let resp = match self.agent.post(&url).timeout(timeout).send_string(&body) {
                Ok(r) => r,
                Err(ureq::Error::Status(code, resp)) => {
                    return Err(etcd_err(
                        ep,
                        format!("HTTP {code}: {}", resp.into_string().unwrap_or_default()),
                    ));
                }
                Err(e) => {
                    last = etcd_err(ep, e);
                    continue;
                }
            };
            use std::io::Read as _;
            // One message per line; a line is small (the events of one key),
            // but a peer that never ends one is not read without bound.
            let mut lines = std::io::BufReader::new(resp.into_reader().take(MAX_ANSWER_BYTES));
            let mut line = String::new();
            loop {
                line.clear();
                match lines.read_line(&mut line) {
                    // The stream ended (etcd stopping): the caller re-reads.
                    Ok(0) => return Ok(true),
                    Ok(_) => {}
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) => {
                        return Ok(false);
                    }
                    Err(e) => return Err(etcd_err(ep, e)),
                }
                let msg: Value = serde_json::from_str(&line).map_err(|e| etcd_err(ep, format!("watch stream: {e}")))?;
                if msg.get("error").is_some() {
                    return Err(etcd_err(ep, format!("watch: {}", msg["error"])));
                }
                let r = &msg["result"];
                let written = r["events"].as_array().is_some_and(|e| !e.is_empty());
                // A compacted start revision or a cancelled watch: the writes
                // since `after` cannot be listed, so they may have happened.
                let unknown = r["canceled"].as_bool().unwrap_or(false) || r.get("compact_revision").is_some();
                if written || unknown {
                    return Ok(true);
                }
            }
        }
        Err(last)
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

    /// An endpoint that answers every request with an empty 503, as an etcd
    /// member without a leader does; returns its URL.
    fn leaderless_member() -> String {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf);
                let _ =
                    c.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            }
        });
        url
    }

    /// A member that lost its leader (or the quorum) is passed over for the
    /// next endpoint, and said as what it is, not as an oversized request.
    #[test]
    fn a_leaderless_member_is_passed_over_and_named_as_such() {
        let alone = EtcdStore::new(vec![leaderless_member()], "/p/");
        let e = alone.put("k", b"v").unwrap_err().to_string();
        assert!(e.contains("no leader") && !e.contains("max-request-bytes"), "{e}");
        let Some(etcd) = testing::etcd_or_skip("leaderless", 23_887) else {
            return;
        };
        let s = EtcdStore::new(vec![leaderless_member(), etcd.url.clone()], "/p/");
        s.put("k", b"v").unwrap();
        assert_eq!(s.get("k").unwrap(), Some(b"v".to_vec()));
    }

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

    #[test]
    fn wait_for_write_wakes_on_the_key_and_replays_missed_writes() {
        let Some(etcd) = testing::etcd_or_skip("watch", 23_797) else {
            return;
        };
        let s = EtcdStore::new(vec![etcd.url.clone()], "/pw/");
        let quiet = Duration::from_millis(400);
        // Nothing written: the wait ends with the timeout, saying so.
        let r = s.revision().unwrap();
        let t = std::time::Instant::now();
        assert!(!s.wait_for_write("k", r, quiet).unwrap());
        assert!(t.elapsed() >= Duration::from_millis(300), "{:?}", t.elapsed());
        // A write to another key does not wake it, one under the watched key's prefix neither.
        s.put("other", b"1").unwrap();
        s.put("k2", b"1").unwrap();
        assert!(!s.wait_for_write("k", r, quiet).unwrap());
        // A write made after `after` but before the wait began is replayed.
        s.put("k", b"1").unwrap();
        assert!(s.wait_for_write("k", r, Duration::from_secs(5)).unwrap());
        // A write made during the wait ends it at once.
        let r = s.revision().unwrap();
        let writer = s.clone();
        let put = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            writer.put("k", b"2").unwrap();
        });
        let t = std::time::Instant::now();
        assert!(s.wait_for_write("k", r, Duration::from_secs(20)).unwrap());
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        put.join().unwrap();
        // And from the revision of that write on, all is quiet again.
        let r = s.revision().unwrap();
        assert!(!s.wait_for_write("k", r, quiet).unwrap());
    }

    /// A value of `len` bytes that no two chunks share.
    fn big(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
            .collect()
    }

    #[test]
    fn a_lock_whose_holder_is_gone_expires_with_its_lease() {
        let Some(etcd) = testing::etcd_or_skip("locks", 23_805) else {
            return;
        };
        let (a, b) = (
            EtcdStore::new(vec![etcd.url.clone()], "/pl/"),
            EtcdStore::new(vec![etcd.url.clone()], "/pl/"),
        );
        let ttl = Duration::from_secs(2);
        // `a` takes the lock and is never heard of again (a crashed controller).
        a.lock("compile", ttl, Duration::ZERO).unwrap().expect("a free lock");
        assert_eq!(b.lock("compile", ttl, Duration::from_millis(300)).unwrap(), None);
        let t = std::time::Instant::now();
        let lease = b.lock("compile", ttl, Duration::from_secs(15)).unwrap();
        let waited = t.elapsed();
        assert!(lease.is_some(), "the lease expired and the lock with it");
        assert!(
            waited >= Duration::from_millis(500) && waited < Duration::from_secs(10),
            "{waited:?}"
        );
        // The lock lives beside the prefix: listing the store never shows it.
        assert_eq!(b.list_prefix("").unwrap(), Vec::new());
        b.unlock("compile", lease.unwrap_or_default()).unwrap();
        assert!(a.lock("compile", ttl, Duration::ZERO).unwrap().is_some());
    }

    #[test]
    fn chunks_are_cut_by_content_so_an_edit_changes_one_or_two() {
        // Varied bytes, as text is (a counter's bytes repeat too regularly
        // for the rolling hash to find a cut before the most).
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let value: Vec<u8> = (0..10 * CHUNK_BYTES)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let cut: Vec<&[u8]> = chunks(&value).collect();
        assert_eq!(cut.concat(), value);
        let (last, inner) = cut.split_last().expect("chunks");
        assert!(inner.iter().all(|c| (MIN_CHUNK..=CHUNK_BYTES).contains(&c.len())));
        assert!(last.len() <= CHUNK_BYTES);
        assert!(cut.len() > 10, "cuts fall between the bounds, not only at the most");
        // A few bytes inserted near the start, and a few changed in the middle.
        let mut edited = value.clone();
        edited.splice(100..100, *b"inserted");
        edited[5 * CHUNK_BYTES] ^= 0xff;
        let before: std::collections::HashSet<&[u8]> = cut.iter().copied().collect();
        let after: Vec<&[u8]> = chunks(&edited).collect();
        let new = after.iter().filter(|c| !before.contains(*c)).count();
        assert!(new <= 4, "{new} of {} chunks changed", after.len());
        // Fixed offsets would have changed every chunk after the insertion.
        let fixed_new = edited
            .chunks(CHUNK_BYTES)
            .filter(|c| !value.chunks(CHUNK_BYTES).any(|o| o == *c))
            .count();
        assert_eq!(fixed_new, edited.len().div_ceil(CHUNK_BYTES));
    }

    #[test]
    fn large_values_are_chunked_under_etcds_default_request_limit() {
        // The test etcd runs with the default --max-request-bytes (1.5 MiB):
        // a 3.5 MiB value in one request would be refused.
        let Some(etcd) = testing::etcd_or_skip("chunks", 23_795) else {
            return;
        };
        let s = EtcdStore::new(vec![etcd.url.clone()], "/pc/");
        let large = big(3 * CHUNK_BYTES + 12_345, 1);
        let edge = big(INLINE_MAX + 1, 2);
        let nul = b"\0not a manifest".to_vec();
        let magic = [MANIFEST_MAGIC, b"12\n"].concat();
        let puts = [
            ("v/large".to_string(), large.clone()),
            ("v/edge".to_string(), edge.clone()),
            ("v/nul".to_string(), nul.clone()),
            ("v/magic".to_string(), magic.clone()),
            ("v/small".to_string(), b"{}".to_vec()),
        ];
        assert!(s.txn(&[], &puts).unwrap());
        // Read back through this store (its chunk cache) and a fresh one (etcd).
        let fresh = || EtcdStore::new(vec![etcd.url.clone()], "/pc/");
        for (k, v) in &puts {
            assert_eq!(s.get(k).unwrap().as_ref(), Some(v), "{k}");
            assert_eq!(fresh().get(k).unwrap().as_ref(), Some(v), "{k}");
        }
        // Listing resolves chunked values and never lists the chunks themselves.
        let mut listed = s.list_prefix("").unwrap();
        let mut expected = puts.to_vec();
        listed.sort();
        expected.sort();
        assert_eq!(listed, expected);
        // A compare against a large value holds for that value and fails for another.
        let holds = [Compare {
            key: "v/large".into(),
            value: Some(large.clone()),
        }];
        assert!(s.txn(&holds, &[("v/after".into(), b"1".to_vec())]).unwrap());
        let cut: Vec<&[u8]> = chunks(&large).collect();
        assert!(cut.len() >= 4, "3 MiB in chunks of at most 1 MiB");
        let (first, second) = (cut[0].len(), cut[1].len());
        let mut altered = large.clone();
        altered[first + 7] ^= 0xff;
        let fails = [Compare {
            key: "v/large".into(),
            value: Some(altered.clone()),
        }];
        assert!(!s.txn(&fails, &[("v/after".into(), b"2".to_vec())]).unwrap());
        assert_eq!(s.get("v/after").unwrap().as_deref(), Some(&b"1"[..]));

        // A chunk altered behind the store's back is reported against the key that names it.
        let hash = sha256_hex(cut[1]);
        let put = json!({ "key": s.chunk_key(&hash), "value": B64.encode(&altered[first..first + second]) });
        s.call("/v3/kv/put", &put).unwrap();
        // `s` keeps the chunks it wrote and read, by their hashes, so it
        // still returns the value; a store reading afresh finds the fault.
        assert_eq!(s.get("v/large").unwrap().as_ref(), Some(&large));
        let err = fresh().get("v/large").unwrap_err().to_string();
        assert!(
            err.contains("v/large") && err.contains("chunk 1") && err.contains("does not match"),
            "{err}"
        );
        // And a missing one too.
        s.call("/v3/kv/deleterange", &json!({ "key": s.chunk_key(&hash) }))
            .unwrap();
        let err = fresh().get("v/large").unwrap_err().to_string();
        assert!(err.contains("chunk 1") && err.contains("missing"), "{err}");
        // The other values are untouched.
        assert_eq!(s.get("v/edge").unwrap(), Some(edge));
    }
}
