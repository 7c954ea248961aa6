//! A blocking client of the controller API, for the CLI and the agent.
//!
//! It takes a list of controller URLs and fails over: a request that cannot
//! reach a controller (connection refused, reset, timed out) is retried on
//! the next one, and the client stays with whichever answered last. An answer
//! with an error status is the controller's decision and is returned as
//! [`ClientError::Api`], not retried elsewhere.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::bundle::PolicyBundle;
use crate::documents::*;
use crate::tls::{self, TlsError};
use crate::validate::{Escaped, MAX_WAIT_S};

/// How the client authenticates.
#[derive(Debug, Clone)]
pub enum ClientAuth {
    /// An API token (`Authorization: Bearer …`). Over HTTPS, set the CA with [`Client::with_ca`].
    Token(String),
    /// A client certificate (agents): trust `ca`, present `cert`/`key`.
    Cert {
        /// The CA certificate (PEM) the controller's certificate chains to.
        ca: PathBuf,
        /// This host's certificate (PEM).
        cert: PathBuf,
        /// Its key (PEM).
        key: PathBuf,
    },
}

/// A request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No controller could be reached.
    #[error("cannot reach the controller ({url}): {message}")]
    Transport {
        /// The URL tried last.
        url: String,
        /// What failed.
        message: String,
    },
    /// The controller refused the request. Shown with control and invisible
    /// characters escaped (line breaks of the diagnostics kept): the message
    /// may quote what a request held.
    #[error("controller answered {status}: {}{}", Escaped(error), diagnostics.as_deref().map(escape_lines).unwrap_or_default())]
    Api {
        /// HTTP status.
        status: u16,
        /// Its `error` message.
        error: String,
        /// Rendered policy diagnostics, for an invalid policy.
        diagnostics: Option<String>,
    },
    /// The answer did not decode.
    #[error("unexpected answer from {url}: {message}")]
    Decode {
        /// The URL.
        url: String,
        /// The decoding error.
        message: String,
    },
    /// The TLS files could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// No controller URL was given.
    #[error("no controller URL given")]
    NoServer,
}

/// A client of one or more controllers.
#[derive(Debug)]
pub struct Client {
    bases: Vec<String>,
    token: Option<String>,
    agent: ureq::Agent,
    tls: Option<Arc<rustls::ClientConfig>>,
    current: AtomicUsize,
}

fn agent(tls: Option<Arc<rustls::ClientConfig>>) -> ureq::Agent {
    let mut b = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(3))
        .redirects(0);
    if let Some(t) = tls {
        b = b.tls_config(t);
    }
    b.build()
}

impl Client {
    /// A client of the controller at `base_url` (`http://…` or `https://…`).
    pub fn new(base_url: &str, auth: ClientAuth) -> Result<Client, ClientError> {
        Client::with_failover(vec![base_url.to_string()], auth)
    }

    /// A client of several controllers, failing over between them in order.
    pub fn with_failover(base_urls: Vec<String>, auth: ClientAuth) -> Result<Client, ClientError> {
        if base_urls.is_empty() {
            return Err(ClientError::NoServer);
        }
        let bases = base_urls
            .into_iter()
            .map(|u| u.trim_end_matches('/').to_string())
            .collect();
        let (token, tls) = match auth {
            ClientAuth::Token(t) => (Some(t), None),
            ClientAuth::Cert { ca, cert, key } => (None, Some(tls::client_config(&ca, Some((&cert, &key)))?)),
        };
        Ok(Client {
            bases,
            token,
            agent: agent(tls.clone()),
            tls,
            current: AtomicUsize::new(0),
        })
    }

    /// Trust `ca` (PEM) for HTTPS when authenticating with a token.
    pub fn with_ca(mut self, ca: &Path) -> Result<Client, ClientError> {
        if self.tls.is_none() {
            let cfg = tls::client_config(ca, None)?;
            self.agent = agent(Some(cfg.clone()));
            self.tls = Some(cfg);
        }
        Ok(self)
    }

    /// The controller URL the client currently uses.
    pub fn current_url(&self) -> &str {
        let i = self.current.load(Ordering::Relaxed) % self.bases.len();
        &self.bases[i]
    }

    /// Send a request, failing over on transport errors. Returns the status and body text.
    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
        timeout: Duration,
    ) -> Result<(u16, String), ClientError> {
        let n = self.bases.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let idx = (start + i) % n;
            let url = format!("{}{path}", self.bases[idx]);
            let mut req = self.agent.request(method, &url).timeout(timeout);
            if let Some(t) = &self.token {
                req = req.set("Authorization", &format!("Bearer {t}"));
            }
            let res = match &body {
                Some(b) => req.set("Content-Type", "application/json").send_string(b),
                None => req.call(),
            };
            let (status, resp) = match res {
                Ok(r) => (r.status(), r),
                Err(ureq::Error::Status(code, r)) => (code, r),
                Err(ureq::Error::Transport(t)) => {
                    last = Some(ClientError::Transport {
                        url,
                        message: t.to_string(),
                    });
                    continue;
                }
            };
            self.current.store(idx, Ordering::Relaxed);
            let text = resp.into_string().map_err(|e| ClientError::Transport {
                url: url.clone(),
                message: e.to_string(),
            })?;
            if status >= 400 {
                let err: Option<ErrorBody> = serde_json::from_str(&text).ok();
                return Err(match err {
                    Some(e) => ClientError::Api {
                        status,
                        error: e.error,
                        diagnostics: e.diagnostics,
                    },
                    None => ClientError::Api {
                        status,
                        error: text,
                        diagnostics: None,
                    },
                });
            }
            return Ok((status, text));
        }
        Err(last.unwrap_or(ClientError::NoServer))
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        // Serializing the API's request types cannot fail.
        let body = body.map(|b| serde_json::to_string(b).unwrap_or_default());
        let (_, text) = self.send(method, path, body, Duration::from_secs(60))?;
        decode(&self.bases[0], &text)
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call("GET", path, None::<&()>)
    }

    /// Apply `files` as a new policy version (`dry_run`: only validate).
    pub fn apply(&self, files: &Files, message: &str, dry_run: bool) -> Result<ApplyResponse, ClientError> {
        let req = ApplyRequest {
            files: files.clone(),
            message: message.to_string(),
        };
        let path = if dry_run {
            "/v1/policy?dry_run=true"
        } else {
            "/v1/policy"
        };
        self.call("POST", path, Some(&req))
    }

    /// The current effective policy.
    pub fn policy(&self) -> Result<PolicyBundle, ClientError> {
        self.get("/v1/policy")
    }

    /// The version history.
    pub fn versions(&self) -> Result<Vec<VersionSummary>, ClientError> {
        self.get("/v1/policy/versions")
    }

    /// One version with its files.
    pub fn version(&self, v: u64) -> Result<VersionRecord, ClientError> {
        self.get(&format!("/v1/policy/versions/{v}"))
    }

    /// What applying `files` would change.
    pub fn diff(&self, files: &Files) -> Result<DiffResponse, ClientError> {
        let req = ApplyRequest {
            files: files.clone(),
            message: String::new(),
        };
        self.call("POST", "/v1/policy/diff", Some(&req))
    }

    /// Make version `v` current again (as a new version).
    pub fn rollback(&self, v: u64) -> Result<ApplyResponse, ClientError> {
        self.call("POST", &format!("/v1/policy/rollback/{v}"), None::<&()>)
    }

    /// Set and remove tags of a VM.
    pub fn tag(&self, vm: &str, req: &TagRequest) -> Result<TagResponse, ClientError> {
        self.call("PUT", &format!("/v1/vms/{}/tags", segment(vm)), Some(req))
    }

    /// Order VM `vm` migrated to host `to` (the order as stored, `pending`).
    pub fn migrate(&self, vm: &str, to: &str) -> Result<crate::migration::MigrationOrder, ClientError> {
        let req = crate::migration::MigrateRequest { to: to.to_string() };
        self.call("POST", &format!("/v1/vms/{}/migrate", segment(vm)), Some(&req))
    }

    /// The last migration order of VM `vm`, as it stands.
    pub fn migration(&self, vm: &str) -> Result<crate::migration::MigrationOrder, ClientError> {
        self.get(&format!("/v1/vms/{}/migration", segment(vm)))
    }

    /// The migration orders agent `host` is to act on: pre-staging those
    /// to it, carrying out those from it once staged.
    pub fn migration_orders(&self, host: &str) -> Result<Vec<crate::migration::MigrationOrder>, ClientError> {
        self.get(&format!("/v1/agents/{}/migrations", segment(host)))
    }

    /// Agent `host` reports on the migration of `vm` it carries out.
    pub fn report_migration(
        &self,
        host: &str,
        vm: &str,
        report: &crate::migration::MigrationReport,
    ) -> Result<crate::migration::MigrationOrder, ClientError> {
        self.call(
            "POST",
            &format!("/v1/agents/{}/migrations/{}", segment(host), segment(vm)),
            Some(report),
        )
    }

    /// Destination agent `host` says whether it is ready for VM `vm`'s migration.
    pub fn report_staged(
        &self,
        host: &str,
        vm: &str,
        report: &crate::migration::StagedReport,
    ) -> Result<crate::migration::MigrationOrder, ClientError> {
        self.call(
            "POST",
            &format!("/v1/agents/{}/migrations/{}/staged", segment(host), segment(vm)),
            Some(report),
        )
    }

    /// Agent `host` saw a guest announce itself on its vNIC (see
    /// [`crate::migration::ArrivalReport`]).
    pub fn report_arrival(
        &self,
        host: &str,
        arrival: &crate::migration::ArrivalReport,
    ) -> Result<crate::migration::ArrivalResponse, ClientError> {
        self.call("POST", &format!("/v1/agents/{}/arrivals", segment(host)), Some(arrival))
    }

    /// VMs with their effective tags.
    pub fn vms(&self) -> Result<Vec<VmInfo>, ClientError> {
        self.get("/v1/vms")
    }

    /// Hosts.
    pub fn hosts(&self) -> Result<Vec<HostInfo>, ClientError> {
        self.get("/v1/hosts")
    }

    /// Registered agents.
    pub fn agents(&self) -> Result<Vec<AgentRecord>, ClientError> {
        self.get("/v1/agents")
    }

    /// Change records.
    pub fn changes(&self) -> Result<Vec<palisade_audit::record::ChangeRecord>, ClientError> {
        self.get("/v1/changes")
    }

    /// Create an API token (admin only); returns its secret.
    pub fn create_token(&self, name: &str, role: crate::roles::Role) -> Result<String, ClientError> {
        let req = TokenRequest {
            name: name.to_string(),
            role,
        };
        let r: TokenResponse = self.call("POST", "/v1/tokens", Some(&req))?;
        Ok(r.token)
    }

    /// Every token, revoked ones included (admin only; never the secrets).
    pub fn tokens(&self) -> Result<Vec<crate::documents::TokenInfo>, ClientError> {
        self.get("/v1/tokens")
    }

    /// Revoke the live tokens named `name` (or with that id); returns them (admin only).
    pub fn revoke_token(&self, name: &str) -> Result<Vec<crate::documents::TokenInfo>, ClientError> {
        self.call("DELETE", &format!("/v1/tokens/{}", segment(name)), None::<&()>)
    }

    /// Register agent `host`.
    pub fn register(&self, host: &str, agent_version: &str) -> Result<AgentRecord, ClientError> {
        let req = RegisterRequest {
            agent_version: agent_version.to_string(),
            audit_public_key: None,
        };
        self.call("POST", &format!("/v1/agents/{}/register", segment(host)), Some(&req))
    }

    /// Register agent `host` with its audit trail's public key: the
    /// controller pins the first key a host gives and refuses another
    /// ([`ClientError::Api`] 409) until an admin replaces it.
    pub fn register_audit_key(
        &self,
        host: &str,
        agent_version: &str,
        public_key: &[u8; 32],
    ) -> Result<AgentRecord, ClientError> {
        let req = RegisterRequest {
            agent_version: agent_version.to_string(),
            audit_public_key: Some(crate::validate::hex(public_key)),
        };
        self.call("POST", &format!("/v1/agents/{}/register", segment(host)), Some(&req))
    }

    /// Publish agent `host`'s newest signed audit head. Refused (409) when
    /// it is behind or beside the head the controller holds (a rollback or
    /// a fork, which the controller keeps as evidence).
    pub fn put_audit_head(&self, host: &str, head: &palisade_audit::SignedHead) -> Result<AuditHeadInfo, ClientError> {
        self.call(
            "PUT",
            &format!("/v1/agents/{}/audit-head", segment(host)),
            Some(&HeadDocument::of(head)),
        )
    }

    /// The pinned key, newest head and refused heads of agent `host`'s
    /// audit trail, or (`None`) of this controller's own.
    pub fn audit_head(&self, host: Option<&str>) -> Result<AuditHeadInfo, ClientError> {
        match host {
            Some(h) => self.get(&format!("/v1/agents/{}/audit-head", segment(h))),
            None => self.get("/v1/audit/head"),
        }
    }

    /// Replace the pinned audit key of agent `host` (admin only; recorded
    /// as a change). Its head and refused heads are dropped with it.
    pub fn replace_audit_key(&self, host: &str, public_key: &[u8; 32]) -> Result<AuditHeadInfo, ClientError> {
        let req = AuditKeyRequest {
            public_key: crate::validate::hex(public_key),
        };
        self.call("PUT", &format!("/v1/agents/{}/audit-key", segment(host)), Some(&req))
    }

    /// [`Client::audit_head`] as what `palisade_audit::verify::verify_published`
    /// checks a trail against, each head's fields checked.
    pub fn published_heads(&self, host: Option<&str>) -> Result<palisade_audit::verify::PublishedHeads, ClientError> {
        let info = self.audit_head(host)?;
        let source = match host {
            Some(h) => format!("{} (host {h})", self.current_url()),
            None => format!("{} (its own trail)", self.current_url()),
        };
        let bad = |e: crate::validate::RequestError| ClientError::Decode {
            url: self.current_url().to_string(),
            message: e.to_string(),
        };
        let public_key = crate::validate::public_key("public_key", &info.public_key).map_err(bad)?;
        let head = info.head.as_ref().map(HeadDocument::to_head).transpose().map_err(bad)?;
        let conflicts = info
            .conflicts
            .iter()
            .map(|c| {
                Ok(palisade_audit::verify::RefusedHead {
                    head: c.head.to_head()?,
                    fork: c.kind == HeadConflictKind::Fork,
                    reason: c.reason.clone(),
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?;
        Ok(palisade_audit::verify::PublishedHeads {
            source,
            public_key,
            head,
            conflicts,
        })
    }

    /// Report what agent `host` runs.
    pub fn report(&self, host: &str, req: &ReportRequest) -> Result<AgentRecord, ClientError> {
        self.call("POST", &format!("/v1/agents/{}/report", segment(host)), Some(req))
    }

    /// Push agent `host`'s flow records (all with `host` = `host`, at most
    /// [`MAX_FLOW_BATCH`]); the controller's sequence number of the last one,
    /// durable when this returns.
    pub fn push_flows(&self, host: &str, records: &[palisade_audit::record::FlowRecord]) -> Result<u64, ClientError> {
        #[derive(Serialize)]
        struct Batch<'a> {
            records: &'a [palisade_audit::record::FlowRecord],
        }
        let r: FlowPushResponse = self.call(
            "POST",
            &format!("/v1/agents/{}/flows", segment(host)),
            Some(&Batch { records }),
        )?;
        Ok(r.last_seq)
    }

    /// Push agent `host`'s inline-inspection alerts (all with `host` =
    /// `host`, at most [`MAX_ALERT_BATCH`]).
    pub fn push_alerts(
        &self,
        host: &str,
        records: &[palisade_audit::record::AlertRecord],
    ) -> Result<AlertPushResponse, ClientError> {
        #[derive(Serialize)]
        struct Batch<'a> {
            records: &'a [palisade_audit::record::AlertRecord],
        }
        self.call(
            "POST",
            &format!("/v1/agents/{}/alerts", segment(host)),
            Some(&Batch { records }),
        )
    }

    /// The alerts agents pushed to the controller, matching `q`.
    pub fn alerts(&self, q: &AlertQuery) -> Result<AlertList, ClientError> {
        let mut params = Vec::new();
        for (k, v) in [("host", &q.host), ("vm", &q.vm), ("action", &q.action)] {
            if let Some(v) = v {
                params.push(format!("{k}={}", segment(v)));
            }
        }
        for (k, v) in [
            ("sid", q.sid.map(u64::from)),
            ("since", q.since_ns),
            ("until", q.until_ns),
            ("limit", q.limit.map(|l| l as u64)),
        ] {
            if let Some(v) = v {
                params.push(format!("{k}={v}"));
            }
        }
        let path = if params.is_empty() {
            "/v1/alerts".to_string()
        } else {
            format!("/v1/alerts?{}", params.join("&"))
        };
        self.get(&path)
    }

    /// Push agent `host`'s datapath health report; the controller's view of
    /// the host as it stands (its state is derived once a second, so it may
    /// not reflect this report yet).
    pub fn push_health(
        &self,
        host: &str,
        report: &crate::health::HealthReport,
    ) -> Result<crate::health::HostHealth, ClientError> {
        self.call("POST", &format!("/v1/agents/{}/health", segment(host)), Some(report))
    }

    /// Records of the controller's audit trail matching `q`, with their sequence numbers.
    pub fn flows(&self, q: &FlowQuery) -> Result<Vec<(u64, palisade_audit::record::Record)>, ClientError> {
        let mut params = Vec::new();
        for (k, v) in [("vm", &q.vm), ("zone", &q.zone), ("rule", &q.rule)] {
            if let Some(v) = v {
                params.push(format!("{k}={}", segment(v)));
            }
        }
        if let Some(v) = q.verdict {
            let v = match v {
                palisade_audit::record::Verdict::Allow => "allow",
                palisade_audit::record::Verdict::Deny => "deny",
                palisade_audit::record::Verdict::Reject => "reject",
            };
            params.push(format!("verdict={v}"));
        }
        for (k, v) in [("since", q.since_ns), ("until", q.until_ns)] {
            if let Some(v) = v {
                params.push(format!("{k}={v}"));
            }
        }
        if let Some(l) = q.limit {
            params.push(format!("limit={l}"));
        }
        if q.changes {
            params.push("changes=true".into());
        }
        let path = if params.is_empty() {
            "/v1/flows".to_string()
        } else {
            format!("/v1/flows?{}", params.join("&"))
        };
        let list: FlowList = self.get(&path)?;
        Ok(list.records.into_iter().map(|r| (r.seq, r.record)).collect())
    }

    /// How the controller is doing (its audit trail).
    pub fn status(&self) -> Result<ControllerStatus, ClientError> {
        self.get("/v1/status")
    }

    /// Wait up to `wait` for an effective policy newer than `after_rev`:
    /// `Some(bundle)` as soon as there is one, `None` if none came in time.
    pub fn watch_policy(
        &self,
        host: &str,
        after_rev: u64,
        wait: Duration,
    ) -> Result<Option<PolicyBundle>, ClientError> {
        self.watch_policy_having(host, after_rev, None, wait)
    }

    /// [`Client::watch_policy`] for an agent that holds the files of version
    /// `have`: if the new revision is of that version (a tag change), the
    /// bundle comes without them ([`PolicyBundle::same_files`]); complete it
    /// with [`PolicyBundle::resolve`].
    pub fn watch_policy_having(
        &self,
        host: &str,
        after_rev: u64,
        have: Option<u64>,
        wait: Duration,
    ) -> Result<Option<PolicyBundle>, ClientError> {
        let have = have.map(|v| format!("&have={v}")).unwrap_or_default();
        // The server refuses waits over its maximum.
        let wait = wait.min(Duration::from_secs(MAX_WAIT_S));
        let path = format!(
            "/v1/agents/{}/policy?after={after_rev}{have}&wait={}",
            segment(host),
            wait.as_secs()
        );
        let (status, text) = self.send("GET", &path, None, wait + Duration::from_secs(10))?;
        if status == 304 {
            return Ok(None);
        }
        decode(self.current_url(), &text).map(Some)
    }
}

/// Each line of `text` escaped ([`Escaped`]), after a line break.
fn escape_lines(text: &str) -> String {
    text.lines().map(|l| format!("\n{}", Escaped(l))).collect()
}

fn decode<T: DeserializeOwned>(url: &str, text: &str) -> Result<T, ClientError> {
    serde_json::from_str(text).map_err(|e| ClientError::Decode {
        url: url.to_string(),
        message: e.to_string(),
    })
}

/// Percent-encode a path segment (names are usually plain; this keeps odd ones from changing the path).
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
