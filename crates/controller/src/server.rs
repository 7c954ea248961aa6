//! The HTTP API: axum routes over the [`Controller`], served on plain HTTP
//! (development, loopback) or HTTPS with optional client certificates.
//!
//! Each accepted connection is served by hyper directly, so the TLS layer can
//! hand the request handlers who is on the other end: the verified client
//! certificate's common name is put into every request's extensions
//! ([`Peer`]). Handlers authenticate before they read the body, so an
//! unauthenticated or unauthorized request is refused as such (401/403) even
//! when its body is oversized or malformed, and they validate completely
//! before calling the controller, which writes in one transaction: nothing
//! stored changes on any 4xx.
//!
//! Long-polling: a background task follows the store's current-policy
//! pointer (an etcd watch, so a change made through another controller on
//! the same etcd is seen at once; the embedded store, which only this
//! controller writes, is re-read every `poll_interval`) and publishes it on
//! a [`tokio::sync::watch`] channel; changes made here publish at once. A
//! waiting agent request sleeps on that channel until the revision passes
//! the one it has, or its wait runs out (304).
//!
//! Agents push flow records to `POST /v1/agents/{host}/flows` (authorized
//! like the other agent endpoints); they and the controller's own change
//! records go to its [`crate::trail::Trail`], which `GET /v1/flows` queries.
//! At start, and while a change's record is missing from it, the trail is
//! brought up to the store ([`Controller::sync_trail`]).
//!
//! Agents push inline inspection's alerts to `POST /v1/agents/{host}/alerts`
//! (authorized the same way: a host pushes only its own); the controller
//! keeps them in memory, per host ([`crate::alerts`]), for `GET /v1/alerts`.
//!
//! Agents register their audit trail's public key and send its signed
//! heads (`PUT /v1/agents/{host}/audit-head`); the controller keeps the
//! newest and refuses (409, kept) a rollback or fork: see
//! [`Controller::put_audit_head`].
//!
//! Requests are held to the OpenAPI document ([`crate::openapi_document`]):
//! bodies are JSON objects without unknown fields, query parameters are
//! those the endpoint takes, once each, and every refusal is a JSON
//! `{"error": …}` with the status [`palisade_api::validate`] describes (a 401
//! with a `WWW-Authenticate: Bearer` challenge, a 405 with `Allow`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tower::ServiceExt as _;

use crate::auth::TokenRecord;
use crate::core::{Controller, CoreError};
use crate::tls::common_name;
use palisade_api::roles::Permission;
use palisade_api::validate::*;
use palisade_api::*;

/// The largest request body accepted (413 above): the API's contract,
/// stated with the document that publishes it.
pub use crate::openapi::BODY_LIMIT;
pub use palisade_api::validate::MAX_WAIT_S;

/// Starting the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The async runtime could not start.
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where to listen (port 0: any free port).
    pub listen: SocketAddr,
    /// TLS settings; `None` serves plain HTTP (agents then authenticate with an admin token).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// How often the store's current revision is re-read for long-polls
    /// when the store cannot watch, or its watch fails.
    pub poll_interval: Duration,
    /// Host health: thresholds and the evacuation hooks ([`crate::health`]).
    pub health: crate::health::HealthConfig,
}

impl ServeOptions {
    /// Plain HTTP on `listen`, polling the store every 200 ms.
    pub fn plain(listen: SocketAddr) -> ServeOptions {
        ServeOptions {
            listen,
            tls: None,
            poll_interval: Duration::from_millis(200),
            health: crate::health::HealthConfig::default(),
        }
    }
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The verified client certificate's common name.
    pub cert_cn: Option<String>,
}

#[derive(Clone)]
struct AppState {
    ctl: Controller,
    tls: bool,
    /// The newest effective-policy record seen (from this controller's
    /// changes, or the store poll that brings other controllers' changes).
    revision: Arc<watch::Sender<Arc<CurrentRecord>>>,
    /// The newest bundles, encoded once: when every agent asks at once (a
    /// new version, a fleet restart), each gets the same bytes instead of a
    /// store read and a multi-megabyte encode of its own. Keyed by revision
    /// and by the version a delta is from (`None`: the whole bundle).
    bundle_cache: Arc<std::sync::Mutex<Vec<CachedBundle>>>,
    /// Held while a whole bundle is read and encoded.
    bundle_build: Arc<tokio::sync::Mutex<()>>,
}

/// An error answer: a status and `{"error": …}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
    /// The `WWW-Authenticate` challenge of a 401 (RFC 6750).
    challenge: Option<&'static str>,
}

/// The challenge of a 401 without usable credentials.
const CHALLENGE: &str = "Bearer realm=\"palisade\"";
/// The challenge of a 401 whose token is unknown or revoked.
const CHALLENGE_INVALID: &str = "Bearer realm=\"palisade\", error=\"invalid_token\"";

impl ApiError {
    fn new(status: StatusCode, msg: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                error: msg.into(),
                diagnostics: None,
            },
            challenge: (status == StatusCode::UNAUTHORIZED).then_some(CHALLENGE),
        }
    }

    fn bad_request(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, msg)
    }

    fn unauthorized(msg: impl Into<String>, challenge: &'static str) -> ApiError {
        ApiError {
            challenge: Some(challenge),
            ..ApiError::new(StatusCode::UNAUTHORIZED, msg)
        }
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> ApiError {
        ApiError::from(CoreError::from(e))
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> ApiError {
        match e {
            CoreError::InvalidPolicy(d) => ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                body: ErrorBody {
                    error: "policy is invalid".into(),
                    diagnostics: Some(d),
                },
                challenge: None,
            },
            CoreError::Unprocessable(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m),
            CoreError::NameTaken(m) | CoreError::AuditConflict(m) | CoreError::InProgress(m) => {
                ApiError::new(StatusCode::CONFLICT, m)
            }
            CoreError::BadRequest(m) => ApiError::new(StatusCode::BAD_REQUEST, m),
            CoreError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, m),
            CoreError::Conflict => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            CoreError::TooLarge(m) => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, m),
            CoreError::Unavailable(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, m),
            CoreError::Store(s) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, s.to_string()),
            e @ CoreError::Audit(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body)).into_response();
        if let Some(c) = self.challenge {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static(c));
        }
        r
    }
}

type ApiResult = Result<Response, ApiError>;

fn ok<T: Serialize>(v: T) -> ApiResult {
    Ok(axum::Json(v).into_response())
}

/// Run blocking controller work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, CoreError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("worker failed: {e}")))?
        .map_err(ApiError::from)
}

/// The bearer token's record, if it grants `perm`.
async fn authorize(s: &AppState, headers: &HeaderMap, perm: Permission) -> Result<TokenRecord, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::unauthorized("missing Authorization: Bearer token", CHALLENGE));
    };
    // The scheme is case-insensitive (RFC 7235).
    let secret = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .ok_or_else(|| ApiError::unauthorized("Authorization must be \"Bearer <token>\"", CHALLENGE))?
        .to_string();
    let ctl = s.ctl.clone();
    let rec = blocking(move || ctl.authenticate(&secret))
        .await?
        .ok_or_else(|| ApiError::unauthorized("unknown token", CHALLENGE_INVALID))?;
    if let Some(r) = &rec.revoked {
        return Err(ApiError::unauthorized(
            format!(
                "token \"{}\" was revoked by {} at {} ns",
                Escaped(&rec.name),
                Escaped(&r.by),
                r.time_ns
            ),
            CHALLENGE_INVALID,
        ));
    }
    if !rec.role.allows(perm) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "token \"{}\" has role {}, which may not {perm:?}",
                rec.name,
                rec.role.name()
            ),
        ));
    }
    Ok(rec)
}

/// Who may act for agent `host`: over TLS, only a client certificate for that
/// host; over plain HTTP (development), an admin token. Then the host name
/// itself is checked as a certificate's would be ([`check_host`]), in both
/// modes: it becomes a store key.
async fn authorize_agent(s: &AppState, peer: &Peer, headers: &HeaderMap, host: &str) -> Result<(), ApiError> {
    if !s.tls {
        authorize(s, headers, Permission::Agent).await?;
    } else {
        match &peer.cert_cn {
            None => {
                return Err(ApiError::unauthorized(
                    "agent endpoints need a client certificate signed by the controller's CA",
                    CHALLENGE,
                ));
            }
            Some(cn) if cn != host => {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    format!("client certificate is for {}, not {}", Quoted(cn), Quoted(host)),
                ));
            }
            Some(_) => {}
        }
    }
    check_host(host).map_err(ApiError::from)
}

/// Bodies up to this size are read to the end even when over [`BODY_LIMIT`],
/// so that a plain client finishes sending and receives the 413 (instead of a
/// broken pipe); beyond it the connection is simply cut.
const DRAIN_LIMIT: usize = 2 * BODY_LIMIT;

/// Read and decode a JSON body (after authorization).
async fn json_body<T: DeserializeOwned>(mut body: Body) -> Result<T, ApiError> {
    use http_body_util::BodyExt as _;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is over the limit of {BODY_LIMIT} bytes"),
        )
    };
    let mut buf = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("reading the body: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        total = total.saturating_add(data.len());
        if total <= BODY_LIMIT {
            buf.extend_from_slice(&data);
        } else if total > DRAIN_LIMIT {
            return Err(too_large());
        }
    }
    if total > BODY_LIMIT {
        return Err(too_large());
    }
    decode_body(&buf)
}

/// Decode a request body as the document says: a JSON object (not an array
/// decoded by position, nor a bare value) with no field the document does
/// not name, at any depth.
fn decode_body<T: DeserializeOwned>(buf: &[u8]) -> Result<T, ApiError> {
    let first = buf.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(ApiError::bad_request(
            "malformed JSON body: the request body must be a JSON object",
        ));
    }
    let mut unknown = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(buf);
    let v: T = serde_ignored::deserialize(&mut de, |path| unknown.push(path.to_string()))
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))?;
    if !unknown.is_empty() {
        let names: Vec<String> = unknown.iter().map(|p| Quoted(p).to_string()).collect();
        return Err(ApiError::bad_request(format!(
            "unknown field{} in the request body: {}",
            if names.len() == 1 { "" } else { "s" },
            names.join(", ")
        )));
    }
    Ok(v)
}

/// The query parameters the endpoint at (matched) `path` takes.
fn known_params(path: &str) -> &'static [&'static str] {
    match path {
        "/v1/policy" => &["dry_run"],
        "/v1/agents/{host}/policy" => &["after", "have", "wait"],
        "/v1/flows" => &FLOW_PARAMS,
        "/v1/alerts" => &ALERT_PARAMS,
        _ => &[],
    }
}

const ALERT_PARAMS: [&str; 7] = ["host", "vm", "sid", "action", "since", "until", "limit"];

const FLOW_PARAMS: [&str; 8] = ["vm", "zone", "verdict", "rule", "since", "until", "limit", "changes"];

/// Refuse, for every endpoint, a query parameter it does not take or one
/// given twice, before anything else.
async fn check_query(
    matched: axum::extract::MatchedPath,
    RawQuery(q): RawQuery,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match query(&q, known_params(matched.as_str())) {
        Ok(_) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// The query parameters, by name, percent-decoded, refusing a name not in
/// `known` and a name given twice.
fn query(raw: &Option<String>, known: &[&str]) -> Result<BTreeMap<String, String>, ApiError> {
    let mut out = BTreeMap::new();
    for kv in raw.as_deref().unwrap_or("").split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let k = percent_decode("name", k)?;
        let v = percent_decode(&k, v)?;
        let k = k.as_str();
        if !known.contains(&k) {
            let known = if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            };
            return Err(ApiError::bad_request(format!(
                "unknown query parameter {} (known: {known})",
                Quoted(k)
            )));
        }
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(ApiError::bad_request(format!("query parameter {k} is given twice")));
        }
    }
    Ok(out)
}

/// An integer parameter: 0 to `max`.
fn num_param(q: &BTreeMap<String, String>, name: &str, max: u64) -> Result<Option<u64>, ApiError> {
    let Some(v) = q.get(name) else { return Ok(None) };
    let n: u64 = v.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "query parameter {name}={} is not a number from 0 to {max}",
            Quoted(v)
        ))
    })?;
    if n > max {
        return Err(ApiError::bad_request(format!(
            "query parameter {name}={n} is over the maximum of {max}"
        )));
    }
    Ok(Some(n))
}

/// A boolean parameter: `true` or `false`, nothing else.
fn bool_param(q: &BTreeMap<String, String>, name: &str) -> Result<bool, ApiError> {
    match q.get(name).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(v) => Err(ApiError::bad_request(format!(
            "query parameter {name}={}: expected true or false",
            Quoted(v)
        ))),
    }
}

fn version_param(v: &str) -> Result<u64, ApiError> {
    v.parse()
        .map_err(|_| ApiError::bad_request(format!("version {} is not a number", Quoted(v))))
}

/// A path segment, decoded; a bad escape or non-UTF-8 is a 400 with the usual body.
struct Seg(String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Seg {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Seg, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(Seg(v)),
            Err(e) => Err(ApiError::bad_request(format!("bad path: {}", e.body_text()))),
        }
    }
}

/// Two path segments, decoded, refused as [`Seg`] refuses one.
struct Seg2(String, String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Seg2 {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Seg2, ApiError> {
        match Path::<(String, String)>::from_request_parts(parts, state).await {
            Ok(Path((a, b))) => Ok(Seg2(a, b)),
            Err(e) => Err(ApiError::bad_request(format!("bad path: {}", e.body_text()))),
        }
    }
}

fn publish(s: &AppState, cur: CurrentRecord) {
    s.revision.send_if_modified(|r| {
        let newer = cur.revision > r.revision;
        if newer {
            *r = Arc::new(cur);
        }
        newer
    });
}

/// Publish every change of the current policy, including those other
/// controllers make: on a store that can watch (etcd), each wait ends as
/// soon as the pointer is written; otherwise, and while the watch fails, the
/// pointer is re-read every `interval`.
async fn follow_store(s: AppState, interval: Duration) {
    // A wait still running when the server stops runs out on its own; it
    // holds only the store.
    const WATCH_FOR: Duration = Duration::from_secs(5);
    let watch = s.ctl.store().can_watch();
    let mut complained = false;
    loop {
        // A change whose record did not reach the trail is appended as soon
        // as the trail takes it, not only when the next change comes.
        if s.ctl.trail_pending() {
            let c = s.ctl.clone();
            let _ = blocking(move || c.sync_trail()).await;
        }
        let c = s.ctl.clone();
        let after = match blocking(move || c.current_since()).await {
            Ok((cur, after)) => {
                publish(&s, cur);
                Some(after)
            }
            Err(_) => None,
        };
        let (true, Some(after)) = (watch, after) else {
            tokio::time::sleep(interval).await;
            continue;
        };
        let store = s.ctl.store().clone();
        match blocking(move || crate::core::wait_for_policy_change(&*store, after, WATCH_FOR)).await {
            Ok(_) => complained = false,
            Err(e) => {
                if !complained {
                    eprintln!(
                        "palisade controller: watching the store: {}; re-reading every {interval:?}",
                        e.body.error
                    );
                    complained = true;
                }
                tokio::time::sleep(interval).await;
            }
        }
    }
}

/// Publish the current record after a change made here (the change's own
/// revision or a newer one).
async fn publish_current(s: &AppState) {
    let ctl = s.ctl.clone();
    if let Ok(cur) = blocking(move || ctl.current()).await {
        publish(s, cur);
    }
}

async fn apply(State(s): State<AppState>, RawQuery(q): RawQuery, headers: HeaderMap, body: Body) -> ApiResult {
    let dry_run = bool_param(&query(&q, known_params("/v1/policy"))?, "dry_run")?;
    let tok = authorize(
        &s,
        &headers,
        if dry_run { Permission::Read } else { Permission::Change },
    )
    .await?;
    let req: ApplyRequest = json_body(body).await?;
    let ctl = s.ctl.clone();
    let resp = blocking(move || ctl.apply(&tok.name, &req, dry_run)).await?;
    if !dry_run {
        publish_current(&s).await;
    }
    ok(resp)
}

async fn current(State(s): State<AppState>, headers: HeaderMap) -> ApiResult {
    authorize(&s, &headers, Permission::Read).await?;
    let ctl = s.ctl.clone();
    ok(blocking(move || ctl.bundle()).await?)
}

async fn versions(State(s): State<AppState>, headers: HeaderMap) -> ApiResult {
    authorize(&s, &headers, Permission::Read).await?;
    let ctl = s.ctl.clone();
    ok(blocking(move || ctl.versions()).await?)
}

async fn version(State(s): State<AppState>, Seg(v): Seg, headers: HeaderMap) -> ApiResult {
    authorize(&s, &headers, Permission::Read).await?;
    let v = version_param(&v)?;
    let ctl = s.ctl.clone();
    ok(blocking(move || ctl.version(v)).await?)
}

async fn diff(State(s): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult {
    authorize(&s, &headers, Permission::Read).await?;
    let req: ApplyRequest = json_body(body).await?;
    let ctl = s.ctl.clone();
    ok(blocking(move || ctl.diff(&req.files)).await?)
}

async fn rollback(State(s): State<AppState>, Seg(v): Seg, headers: HeaderMap) -> ApiResult {
    let tok = authorize(&s, &headers, Permission::Change).await?;
    let v = version_param(&v)?;
    let ctl = s.ctl.clone();
    let resp = blocking(move || ctl.rollback(&tok.name, v)).await?;
    publish_current(&s).await;
    ok(resp)
}

async fn vms(State(s): State<AppState>, headers: HeaderMap) -> ApiResult {
    authorize(&s, &headers, Permission::Read).await?;
    let ctl = s.ctl.clone();
    ok(blocking(move || ctl.vms()).await?)
}

async fn hosts(State(s): State<AppState>, headers: HeaderMap) -> ApiResult {
    authorize(&s, &headers, Permission::Read).await?;
    let ctl = s.ctl.clone();
    ok(blocking(move || ctl.hosts()).await?)
}

async fn tag(State(s): State<AppState>, Seg(vm): Seg, headers: HeaderMap, body: Body) -> ApiResult {
    let tok = authorize(&s, &headers, Permission::Change).await?;
    check_text("VM name", &vm, 1, usize::MAX)?;
    let req: TagRequest = json_body(body).await?;
    let ctl = s.ctl.clone();
    let resp = blocking(move || ctl.tag(&tok.name, &vm, &req)).await?;
    publish_current(&s).await;
    ok(resp)
}

async fn migrate(State(s): State<AppState>, Seg(vm): Seg, headers: HeaderMap, body: Body) -> ApiResult {
    let tok = authorize(&s, &headers, Permission::Change).await?;
    check_text("VM name", &vm, 1, usize::MAX)?;
    let req: palisade_api::migration::MigrateRequest = json_body(body).await?;
    let ctl = s.ctl.clone();
    let order = blocking(move || ctl.order_migration(&tok.name, &vm, &req)).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(order)).into_response())
}

async fn migration(State(s): State<AppState>, Seg(vm): Seg, headers: HeaderMap) -> ApiResult {
    authorize(&s, &headers, Permission::Read).await?;
    let ctl = s.ctl.clone();
    ok(blocking(move || ctl.migration(&vm)).await?)
}

async fn migration_orders(
    State(s): State<AppState>,
    Seg(host): Seg,
    axum::Extension(peer): axum::Extension<Peer>,
    headers: HeaderMap,
) -> ApiResult {
    authorize_agent(&s, &peer, &headers, &host).await?;
    let ctl = s.ctl.clone();
    ok(blocking(move || ctl.migration_orders(&host)).await?)
}

async fn report_migration(
    State(s): State<AppState>,
    Seg2(host, vm): Seg2,
    axum::Extension(peer): axum::Extension<Peer>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    authorize_agent(&s, &peer, &headers, &host).await?;
    check_text("VM name", &vm, 1, usize::MAX)?;
    let req: palisade_api::migration::MigrationReport = json_body(body).await?;
    let ctl = s.ctl.clone();
    let order = blocking(move || ctl.report_migration(&host, &vm, &req)).await?;
    // A completed migration placed the VM on its destination: a new revision.
    publish_current(&s).await;
    ok(order)
}

async fn report_staged(
    State(s): State<AppState>,
    Seg2(host, vm): Seg2,
    axum::Extension(peer): axum::Extension<Peer>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    authorize_agent(&s, &peer, &headers, &host).await?;
    check_text("VM name", &vm, 1, usize::MAX)?;
    let req: palisade_api::migration::StagedReport = json_body(body).await?;
    let ctl = s.ctl.clone();
    ok(blocking(move || ctl.report_staged(&host, &vm, &req)).await?)
}

async fn report_arrival(
    State(s): State<AppState>,
    Seg(host): Seg,
    axum::Extension(peer): axum::Extension<Peer>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    authorize_agent(&s, &peer, &headers, &host).await?;
    let req: palisade_api::migration::ArrivalReport = json_body(body).await?;
    let ctl = s.ctl.clone();
    let resp = blocking(move || ctl.report_arrival(&host, &req)).await?;
    if resp.moved {
        publish_current(&s).await;
    }
    ok(resp)
}

async fn agents(State(s): State<AppState>, headers: HeaderMap) -> ApiResult {
    authorize(&s, &headers, Permission::Read).await?;
    let ctl = s.ctl.clone();
    ok(blocking(move || ctl.agents()).await?)
}

async fn changes(State(s): State<AppState>, headers: HeaderMap) -> ApiResult {
    authorize(&s, &headers, Permission::Audit).await?;
    let ctl = s.ctl.clone();
    ok(blocking(move || ctl.changes()).await?)
}

async fn register(
    State(s): State<AppState>,
    Seg(host): Seg,
    axum::Extension(peer): axum::Extension<Peer>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    authorize_agent(&s, &peer, &headers, &host).await?;
    let req: RegisterRequest = json_body(body).await?;
    let ctl = s.ctl.clone();
    ok(blocking(move || ctl.register(&host, &req)).await?)
}

async fn report(
    State(s): State<AppState>,
    Seg(host): Seg,
    axum::Extension(peer): axum::Extension<Peer>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    authorize_agent(&s, &peer, &headers, &host).await?;
    let req: ReportRequest = json_body(body).await?;
    let ctl = s.ctl.clone();
    ok(blocking(move || ctl.report(&host, &req)).await?)
}

async fn health(
    State(s): State<AppState>,
    Seg(host): Seg,
    axum::Extension(peer): axum::Extension<Peer>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    authorize_agent(&s, &peer, &headers, &host).await?;
    let req: palisade_api::health::HealthReport = json_body(body).await?;
    let ctl = s.ctl.clone();
    ok(blocking(move || ctl.health_report(&host, req)).await?)
}

async fn agent_policy(
    State(s): State<AppState>,
    Seg(host): Seg,
    RawQuery(q): RawQuery,
    axum::Extension(peer): axum::Extension<Peer>,
    headers: HeaderMap,
) -> ApiResult {
    authorize_agent(&s, &peer, &headers, &host).await?;
    let q = query(&q, known_params("/v1/agents/{host}/policy"))?;
    let after = num_param(&q, "after", u64::MAX)?.unwrap_or(0);
    let have = num_param(&q, "have", u64::MAX)?;
    let wait = Duration::from_secs(num_param(&q, "wait", MAX_WAIT_S)?.unwrap_or(0));
    let deadline = tokio::time::Instant::now() + wait;
    let mut rx = s.revision.subscribe();
    // The store is the truth on entry; after that, a wake-up carries the
    // record that caused it (read from the store by whoever published it),
    // so a thousand waiting agents do not read the store a thousand times.
    let ctl = s.ctl.clone();
    let mut cur = Arc::new(blocking(move || ctl.current()).await?);
    loop {
        if cur.revision > after {
            if cur.version != 0 && have == Some(cur.version) {
                return ok(PolicyBundle {
                    revision: cur.revision,
                    version: cur.version,
                    files: Files::new(),
                    tags: cur.tags.clone(),
                    locations: cur.locations.clone(),
                    same_files: true,
                    delta: None,
                });
            }
            // An agent holding another version gets the edits from it, when
            // they are worth it; the cache remembers the answer for that
            // version either way (`None` keys the whole bundle).
            let base = have.filter(|&h| h != 0);
            if let Some(bytes) = cached_bundle(&s, cur.revision, base) {
                return Ok(json_bytes(bytes));
            }
            // One build at a time: the agents that asked meanwhile wait and
            // then find it cached, instead of each reading the store.
            let _building = s.bundle_build.lock().await;
            if let Some(bytes) = cached_bundle(&s, cur.revision, base) {
                return Ok(json_bytes(bytes));
            }
            let delta = match base {
                Some(h) => {
                    let ctl = s.ctl.clone();
                    blocking(move || ctl.delta_bundle(h)).await?
                }
                None => None,
            };
            let (bundle, whole) = match (delta, cached_bundle(&s, cur.revision, None)) {
                (Some(d), _) => (d, false),
                (None, Some(bytes)) => {
                    cache_bundle(&s, cur.revision, base, &bytes);
                    return Ok(json_bytes(bytes));
                }
                (None, None) => {
                    let ctl = s.ctl.clone();
                    (blocking(move || ctl.bundle_for(None)).await?, true)
                }
            };
            let bytes =
                axum::body::Bytes::from(serde_json::to_vec(&bundle).map_err(|e| {
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding the bundle: {e}"))
                })?);
            // Keyed by the bundle's own revision: the store may have moved past `cur`.
            cache_bundle(&s, bundle.revision, base, &bytes);
            if whole {
                cache_bundle(&s, bundle.revision, None, &bytes);
            }
            return Ok(json_bytes(bytes));
        }
        // Whatever was published since the store read counts: what is marked
        // seen here is what is looked at.
        let seen = rx.borrow_and_update().clone();
        if seen.revision > cur.revision {
            cur = seen;
            continue;
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            _ => return Ok(StatusCode::NOT_MODIFIED.into_response()),
        }
    }
}

/// An encoded bundle: its revision, the held version it is a delta from
/// (`None`: whole), the bytes.
type CachedBundle = (u64, Option<u64>, axum::body::Bytes);

/// How many encoded bundles are kept: the whole one and deltas from the
/// few versions agents still hold, for the newest revision.
const BUNDLE_CACHE_ENTRIES: usize = 4;

/// The cached bundle of `revision` for holders of version `base` (`None`: the whole bundle).
fn cached_bundle(s: &AppState, revision: u64, base: Option<u64>) -> Option<axum::body::Bytes> {
    let c = s.bundle_cache.lock().ok()?;
    c.iter().find(|e| e.0 == revision && e.1 == base).map(|e| e.2.clone())
}

/// Keep an encoded bundle; entries of older revisions go first.
fn cache_bundle(s: &AppState, revision: u64, base: Option<u64>, bytes: &axum::body::Bytes) {
    let Ok(mut c) = s.bundle_cache.lock() else {
        return;
    };
    c.retain(|e| e.0 >= revision && !(e.0 == revision && e.1 == base));
    if c.len() >= BUNDLE_CACHE_ENTRIES {
        c.remove(0);
    }
    c.push((revision, base, bytes.clone()));
}

fn json_bytes(bytes: axum::body::Bytes) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], bytes).into_response()
}

async fn list_tokens(State(s): State<AppState>, headers: HeaderMap) -> ApiResult {
    authorize(&s, &headers, Permission::ManageTokens).await?;
    let ctl = s.ctl.clone();
    ok(blocking(move || ctl.tokens()).await?)
}

async fn revoke_token(State(s): State<AppState>, Seg(name): Seg, headers: HeaderMap) -> ApiResult {
    let tok = authorize(&s, &headers, Permission::ManageTokens).await?;
    check_token_name(&name)?;
    let ctl = s.ctl.clone();
    ok(blocking(move || ctl.revoke_token(&tok.name, &name)).await?)
}

async fn create_token(State(s): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult {
    let tok = authorize(&s, &headers, Permission::ManageTokens).await?;
    let req: TokenRequest = json_body(body).await?;
    let ctl = s.ctl.clone();
    let (name, role) = (req.name.clone(), req.role);
    let token = blocking(move || ctl.create_token(&tok.name, &req.name, req.role)).await?;
    ok(TokenResponse { name, role, token })
}

async fn push_flows(
    State(s): State<AppState>,
    Seg(host): Seg,
    axum::Extension(peer): axum::Extension<Peer>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    authorize_agent(&s, &peer, &headers, &host).await?;
    let batch: serde_json::Value = json_body(body).await?;
    check_flow_batch_fields(&batch)?;
    let batch: FlowBatch =
        serde_json::from_value(batch).map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))?;
    let ctl = s.ctl.clone();
    ok(blocking(move || ctl.push_flows(&host, batch)).await?)
}

async fn push_alerts(
    State(s): State<AppState>,
    Seg(host): Seg,
    axum::Extension(peer): axum::Extension<Peer>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    authorize_agent(&s, &peer, &headers, &host).await?;
    let batch: AlertBatch = json_body(body).await?;
    let ctl = s.ctl.clone();
    ok(blocking(move || ctl.push_alerts(&host, batch)).await?)
}

fn alert_query(q: &BTreeMap<String, String>) -> Result<AlertQuery, ApiError> {
    let limit = num_param(q, "limit", MAX_ALERT_LIMIT as u64)?.map(|l| usize::try_from(l).unwrap_or(usize::MAX));
    let action = q.get("action").cloned();
    if let Some(a) = &action
        && a != "allowed"
        && a != "blocked"
    {
        return Err(ApiError::bad_request(format!(
            "action={}: expected allowed or blocked",
            Quoted(a)
        )));
    }
    Ok(AlertQuery {
        host: q.get("host").cloned(),
        vm: q.get("vm").cloned(),
        sid: num_param(q, "sid", u64::from(u32::MAX))?.map(|n| n as u32),
        action,
        since_ns: num_param(q, "since", u64::MAX)?,
        until_ns: num_param(q, "until", u64::MAX)?,
        limit,
    })
}

async fn alerts(State(s): State<AppState>, RawQuery(q): RawQuery, headers: HeaderMap) -> ApiResult {
    authorize(&s, &headers, Permission::Read).await?;
    let aq = alert_query(&query(&q, &ALERT_PARAMS)?)?;
    let ctl = s.ctl.clone();
    ok(blocking(move || ctl.alerts(&aq)).await?)
}

async fn put_audit_head(
    State(s): State<AppState>,
    Seg(host): Seg,
    axum::Extension(peer): axum::Extension<Peer>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    authorize_agent(&s, &peer, &headers, &host).await?;
    let doc: HeadDocument = json_body(body).await?;
    let ctl = s.ctl.clone();
    ok(blocking(move || ctl.put_audit_head(&host, &doc)).await?)
}

async fn get_audit_head(State(s): State<AppState>, Seg(host): Seg, headers: HeaderMap) -> ApiResult {
    authorize(&s, &headers, Permission::Read).await?;
    check_host(&host)?;
    let ctl = s.ctl.clone();
    ok(blocking(move || ctl.audit_head(&host)).await?)
}

async fn replace_audit_key(State(s): State<AppState>, Seg(host): Seg, headers: HeaderMap, body: Body) -> ApiResult {
    let tok = authorize(&s, &headers, Permission::ReplaceKeys).await?;
    check_host(&host)?;
    let req: AuditKeyRequest = json_body(body).await?;
    let ctl = s.ctl.clone();
    ok(blocking(move || ctl.replace_audit_key(&tok.name, &host, &req)).await?)
}

async fn own_audit_head(State(s): State<AppState>, headers: HeaderMap) -> ApiResult {
    authorize(&s, &headers, Permission::Read).await?;
    let ctl = s.ctl.clone();
    ok(blocking(move || ctl.own_audit_head()).await?)
}

/// Decode `%XX` escapes (the client escapes everything but unreserved characters).
fn percent_decode(name: &str, v: &str) -> Result<String, ApiError> {
    let bad = || ApiError::bad_request(format!("query parameter {}: bad percent-encoding", Quoted(name)));
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    // `i < b.len()` guards both indexings; the escape's two digits go through `get`.
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .ok_or_else(bad)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

fn flow_query(q: &BTreeMap<String, String>) -> Result<FlowQuery, ApiError> {
    let text = |name: &str| -> Result<Option<String>, ApiError> { Ok(q.get(name).cloned()) };
    let verdict = match text("verdict")?.as_deref() {
        None => None,
        Some("allow") => Some(palisade_audit::record::Verdict::Allow),
        Some("deny") => Some(palisade_audit::record::Verdict::Deny),
        Some("reject") => Some(palisade_audit::record::Verdict::Reject),
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "verdict={}: expected allow, deny or reject",
                Quoted(v)
            )));
        }
    };
    let changes = bool_param(q, "changes")?;
    let limit = num_param(q, "limit", MAX_FLOW_LIMIT as u64)?.map(|l| usize::try_from(l).unwrap_or(usize::MAX));
    Ok(FlowQuery {
        vm: text("vm")?,
        zone: text("zone")?,
        verdict,
        rule: text("rule")?,
        since_ns: num_param(q, "since", u64::MAX)?,
        until_ns: num_param(q, "until", u64::MAX)?,
        limit,
        changes,
    })
}

async fn flows(State(s): State<AppState>, RawQuery(q): RawQuery, headers: HeaderMap) -> ApiResult {
    authorize(&s, &headers, Permission::Read).await?;
    let fq = flow_query(&query(&q, &FLOW_PARAMS)?)?;
    let ctl = s.ctl.clone();
    ok(blocking(move || ctl.flows(&fq)).await?)
}

async fn status(State(s): State<AppState>, headers: HeaderMap) -> ApiResult {
    authorize(&s, &headers, Permission::Read).await?;
    let ctl = s.ctl.clone();
    ok(blocking(move || Ok(ctl.status())).await?)
}

async fn openapi() -> ApiResult {
    ok(crate::openapi::document())
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
}

/// A known path with a method it does not take (axum adds `Allow`).
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", Quoted(uri.path())),
    )
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/policy", post(apply).get(current))
        .route("/v1/policy/versions", get(versions))
        .route("/v1/policy/versions/{v}", get(version))
        .route("/v1/policy/diff", post(diff))
        .route("/v1/policy/rollback/{v}", post(rollback))
        .route("/v1/vms", get(vms))
        .route("/v1/vms/{name}/tags", put(tag))
        .route("/v1/vms/{name}/migrate", post(migrate))
        .route("/v1/vms/{name}/migration", get(migration))
        .route("/v1/hosts", get(hosts))
        .route("/v1/agents", get(agents))
        .route("/v1/changes", get(changes))
        .route("/v1/agents/{host}/register", post(register))
        .route("/v1/agents/{host}/policy", get(agent_policy))
        .route("/v1/agents/{host}/report", post(report))
        .route("/v1/agents/{host}/health", post(health))
        .route("/v1/agents/{host}/flows", post(push_flows))
        .route("/v1/agents/{host}/audit-head", put(put_audit_head).get(get_audit_head))
        .route("/v1/agents/{host}/audit-key", put(replace_audit_key))
        .route("/v1/agents/{host}/migrations", get(migration_orders))
        .route("/v1/agents/{host}/migrations/{name}", post(report_migration))
        .route("/v1/agents/{host}/arrivals", post(report_arrival))
        .route("/v1/agents/{host}/migrations/{name}/staged", post(report_staged))
        .route("/v1/audit/head", get(own_audit_head))
        .route("/v1/flows", get(flows))
        .route("/v1/agents/{host}/alerts", post(push_alerts))
        .route("/v1/alerts", get(alerts))
        .route("/v1/status", get(status))
        .route("/v1/tokens", post(create_token).get(list_tokens))
        .route("/v1/tokens/{name}", axum::routing::delete(revoke_token))
        .route("/openapi.json", get(openapi))
        .route_layer(axum::middleware::from_fn(check_query))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .with_state(state)
}

async fn serve_conn<I>(io: I, app: Router, peer: Peer)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(peer.clone());
        let (tx, mut leftover) = tokio::sync::oneshot::channel();
        let req = req.map(|inner| {
            Body::new(Unread {
                inner: Some(inner),
                leftover: Some(tx),
            })
        });
        let app = app.clone();
        async move {
            let resp = app.oneshot(req).await;
            // The handler answered without reading the whole body (a
            // refusal before it, an endpoint that takes none): read the
            // rest and throw it away while the answer goes out, as a
            // "lingering close" does, so the client gets the answer instead
            // of a reset while it is still sending.
            if let Ok(rest) = leftover.try_recv() {
                tokio::spawn(discard(rest));
            }
            resp
        }
    });
    // A client that goes away mid-request is not the server's problem.
    // A client that never finishes its headers must not hold a connection forever.
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

/// A request body that, dropped before its end, hands what is left of it
/// back to the connection (see [`serve_conn`]).
struct Unread {
    inner: Option<hyper::body::Incoming>,
    leftover: Option<tokio::sync::oneshot::Sender<hyper::body::Incoming>>,
}

impl hyper::body::Body for Unread {
    type Data = axum::body::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        match self.inner.as_mut() {
            Some(b) => std::pin::Pin::new(b).poll_frame(cx),
            None => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(hyper::body::Body::is_end_stream)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| hyper::body::SizeHint::with_exact(0), hyper::body::Body::size_hint)
    }
}

impl Drop for Unread {
    fn drop(&mut self) {
        if let (Some(b), Some(tx)) = (self.inner.take(), self.leftover.take())
            && !hyper::body::Body::is_end_stream(&b)
        {
            let _ = tx.send(b);
        }
    }
}

/// Read and drop the rest of a request body: at most [`DRAIN_LIMIT`] bytes
/// within 10 seconds, after which the connection is simply cut.
async fn discard(mut body: hyper::body::Incoming) {
    use http_body_util::BodyExt as _;
    let read = async {
        let mut total = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            total += frame.data_ref().map_or(0, |d| d.len());
            if total > DRAIN_LIMIT {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
}

/// A server running on its own threads; stopped (connections dropped) on [`RunningServer::stop`] or drop.
#[derive(Debug)]
pub struct RunningServer {
    addr: SocketAddr,
    tls: bool,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    revision: Arc<watch::Sender<Arc<CurrentRecord>>>,
    /// The health monitor's stop flag and thread.
    monitor: Option<(Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<()>)>,
}

impl RunningServer {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr` or `https://addr`.
    pub fn url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.addr)
    }

    /// How many agent policy requests are open now: parked in a long-poll,
    /// or about to be (each subscribes to changes before it reads the store).
    pub fn open_policy_requests(&self) -> usize {
        self.revision.receiver_count()
    }

    /// Stop serving and drop every open connection.
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// Block until the server stops (it only stops through [`RunningServer::stop`] or an error).
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn shutdown(&mut self) {
        if let Some((stop, t)) = self.monitor.take() {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = t.join();
        }
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Start serving `ctl` as `opts` says; returns once the socket is bound.
pub fn spawn(ctl: Controller, opts: ServeOptions) -> Result<RunningServer, ServerError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(ServerError::Runtime)?;
    let std_listener = std::net::TcpListener::bind(opts.listen).map_err(|source| ServerError::Bind {
        addr: opts.listen,
        source,
    })?;
    let addr = std_listener.local_addr().map_err(ServerError::Runtime)?;
    std_listener.set_nonblocking(true).map_err(ServerError::Runtime)?;
    let tls = opts.tls.is_some();
    // The trail first holds every change the store says this controller
    // committed (one may be missing after a crash between the two writes).
    match ctl.sync_trail() {
        Ok(0) => {}
        Ok(n) => eprintln!("palisade controller: audit log: brought up to the store ({n} change record appended)"),
        Err(e) => eprintln!("palisade controller: audit log: {e}"),
    }
    // Off the serving threads: requests are answered meanwhile (a change
    // that comes first compiles for itself, as before).
    let warming = ctl.clone();
    let warm = std::thread::Builder::new().name("palisade-warm".into()).spawn(move || {
        if let Err(e) = warming.warm() {
            eprintln!("palisade controller: compiling the current policy at start: {e}");
        }
    });
    if let Err(e) = warm {
        eprintln!("palisade controller: not compiling the current policy ahead of changes: {e}");
    }
    let monitor_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let monitor = {
        let (ctl, cfg, stop) = (ctl.clone(), opts.health.clone(), monitor_stop.clone());
        std::thread::Builder::new()
            .name("palisade-health".into())
            .spawn(move || crate::health::monitor(ctl, cfg, stop))
            .map_err(ServerError::Runtime)?
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let revision = Arc::new(watch::channel(Arc::new(CurrentRecord::default())).0);
    let serve_revision = revision.clone();
    let thread = std::thread::Builder::new()
        .name(format!("palisade-controller-{addr}"))
        .spawn(move || {
            rt.block_on(serve(ctl, opts, std_listener, serve_revision, stop_rx));
            // Dropping the runtime here cancels every connection task, closing their sockets.
            rt.shutdown_timeout(Duration::from_secs(1));
        })
        .map_err(ServerError::Runtime)?;
    Ok(RunningServer {
        addr,
        tls,
        stop: Some(stop_tx),
        thread: Some(thread),
        revision,
        monitor: Some((monitor_stop, monitor)),
    })
}

async fn serve(
    ctl: Controller,
    opts: ServeOptions,
    std_listener: std::net::TcpListener,
    revision: Arc<watch::Sender<Arc<CurrentRecord>>>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(std_listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("palisade controller: listener: {e}");
            return;
        }
    };
    let state = AppState {
        ctl: ctl.clone(),
        tls: opts.tls.is_some(),
        revision,
        bundle_cache: Arc::default(),
        bundle_build: Arc::default(),
    };
    tokio::spawn(follow_store(state.clone(), opts.poll_interval));
    let app = router(state);
    let acceptor = opts.tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let tcp = tokio::select! {
            _ = &mut stop => return,
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                // Out of descriptors and the like: back off instead of spinning.
                Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue; }
            },
        };
        let app = app.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            match acceptor {
                None => serve_conn(tcp, app, Peer::default()).await,
                Some(a) => {
                    let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(10), a.accept(tcp)).await else {
                        return;
                    };
                    let cert_cn = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| common_name(c));
                    serve_conn(tls, app, Peer { tls: true, cert_cn }).await
                }
            }
        });
    }
}
