//! The agent's small HTTP endpoint: Prometheus metrics, recent flows, health.
//!
//! Served on an optional TCP address (for Prometheus) and always on a Unix
//! socket in the state directory (for local tools such as `palisade demo`,
//! which can reach it from outside the host's network namespace). The
//! datapath publishes a [`Published`] snapshot a few times a second; requests
//! only read that snapshot, so a slow or hostile client never touches the
//! packet path. Requests are bounded (size and time) and anything but
//! `GET /metrics`, `GET /flows`, `GET /alerts` (inline inspection's recent
//! alerts) and `GET /health` is answered 404 or 405.
//!
//! The Unix socket (root-only by its file mode) also takes the live
//! migration requests when the agent gives a [`Control`]: `POST
//! /vnics/{name}/export` (the vNIC's connection state, forwarding for it
//! stopped), `POST /vnics/{name}/import` (a state blob as the body) and
//! `POST /vnics/{name}/resume` (forwarding back on: a migration that
//! failed), and for inline inspection's state ([`crate::inspection::carry`])
//! `POST /vnics/{name}/export-inspection` (the vNIC's inspection section,
//! after its export; empty when nothing here inspects) and `POST
//! /vnics/{name}/import-inspection` (a section as the body, sent before the
//! import, held until the import commits it; a refused import drops it).
//! These are never served on the TCP address. So is `POST
//! /flows/offload` (a JSON [`OffloadRequest`]): a service-chain appliance's
//! decision for the rest of a flow, vPath style (`allow`: its later packets
//! bypass the appliance; `drop`: they are dropped).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palisade_datapath::OffloadVerdict;
use palisade_wire::flow::FlowKey;
use palisade_wire::ip::IpProtocol;

/// What the endpoint serves, replaced whole by the datapath.
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// Prometheus text exposition.
    pub metrics: String,
    /// JSON array of recent flow records.
    pub flows: String,
    /// JSON health document.
    pub health: String,
    /// JSON array of recent alerts (inline inspection), oldest first.
    pub alerts: String,
}

/// A shared, swappable snapshot.
pub type Shared = Arc<Mutex<Arc<Published>>>;

const MAX_REQUEST: usize = 8192;

/// Why a migration request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlError {
    /// No vNIC of that name on this host (404).
    UnknownVnic(String),
    /// The request or its blob was refused (400), with the reason.
    Refused(String),
    /// No tracked connection has the 5-tuple a request names (404).
    UnknownFlow,
}

/// What the agent does for the Unix socket's migration requests. `peer`
/// is the other host of the migration when the caller names it
/// (`?peer=HOST`), for the audit record.
pub trait Control: Send + Sync {
    /// Stop forwarding for `vnic` and return its connections as one state blob.
    fn export_vnic(&self, vnic: &str, peer: Option<&str>) -> Result<Vec<u8>, ControlError>;
    /// Import a state blob into `vnic` (and forward for it); returns the connections imported.
    fn import_vnic(&self, vnic: &str, blob: &[u8], peer: Option<&str>) -> Result<usize, ControlError>;
    /// Forward for `vnic` again after an export (a migration that did not complete).
    fn resume_vnic(&self, vnic: &str, peer: Option<&str>) -> Result<(), ControlError>;
    /// Drop `vnic`'s connections after its VM migrated away (the port stays
    /// quiesced); returns how many were dropped.
    fn release_vnic(&self, vnic: &str, peer: Option<&str>) -> Result<usize, ControlError>;
    /// A live migration's pre-copy: every connection of `vnic` in the
    /// agent-to-agent encoding ([`palisade_datapath::transfer`]), the port
    /// still forwarding; changes from now on are kept for
    /// [`Control::export_delta`].
    fn export_precopy(&self, vnic: &str, peer: Option<&str>) -> Result<Vec<u8>, ControlError> {
        let _ = (vnic, peer);
        Err(ControlError::Refused("this agent does no pre-copy".into()))
    }
    /// A live migration's delta, in the guest's pause: stop forwarding for
    /// `vnic` (as [`Control::export_vnic`]) and return the connections
    /// created or changed since its [`Control::export_precopy`], and the
    /// keys of those removed (or all of them, marked full, when the changes
    /// were not all kept).
    fn export_delta(&self, vnic: &str, peer: Option<&str>) -> Result<Vec<u8>, ControlError> {
        let _ = (vnic, peer);
        Err(ControlError::Refused("this agent does no pre-copy".into()))
    }
    /// Apply what a peer agent sent over the agent-to-agent channel, all
    /// or nothing: a pre-copy staged into the vNIC's tables, or a delta
    /// applied to them, after which the vNIC forwards here
    /// ([`crate::peer::Arrival`]); returns the connections staged, or
    /// after a delta those the vNIC holds now.
    fn import_arrival(&self, arrival: crate::peer::Arrival) -> Result<usize, ControlError> {
        let _ = arrival;
        Err(ControlError::Refused("this agent takes no state from peers".into()))
    }
    /// A live migration's inspection pre-copy, while the guest runs, after
    /// [`Control::export_precopy`]: every inspected flow of `vnic`
    /// ([`crate::inspection::carry`]); its changes from now on are told
    /// apart for [`Control::export_inspection`]. Empty when nothing here
    /// inspects (nothing is sent then).
    fn export_inspection_precopy(&self, vnic: &str, peer: Option<&str>) -> Result<Vec<u8>, ControlError> {
        let _ = (vnic, peer);
        Ok(Vec::new())
    }
    /// A live migration's inspection section, in the guest's pause after
    /// [`Control::export_delta`] quiesced `vnic`: the detection state of
    /// its inspected flows ([`crate::inspection::carry`]), after an
    /// inspection pre-copy only what changed since; empty when nothing
    /// here inspects (nothing is sent then).
    fn export_inspection(&self, vnic: &str, peer: Option<&str>) -> Result<Vec<u8>, ControlError> {
        let _ = (vnic, peer);
        Ok(Vec::new())
    }
    /// Take up a peer's inspection section for `vnic`, all or nothing,
    /// held until `vnic`'s connections are committed (then its flows join
    /// the live tables; a refused commit drops them); returns the flows
    /// the section carried.
    fn import_inspection(&self, vnic: &str, blob: &[u8], peer: Option<&str>) -> Result<usize, ControlError> {
        let _ = (vnic, blob, peer);
        Err(ControlError::Refused(
            "this agent takes no inspection state from peers".into(),
        ))
    }
    /// Whether `vnic`'s state may come from host `from` (an authenticated
    /// peer agent): only from the host its VM is placed on, see
    /// [`crate::peer::check_source`]. Checked before anything of a peer's
    /// session is staged or applied. The default takes any source: a
    /// control without an inventory has nothing to check against.
    fn check_source(&self, vnic: &str, from: &str) -> Result<(), ControlError> {
        let _ = (vnic, from);
        Ok(())
    }
    /// How the last delta applied to `vnic` ([`Control::import_arrival`])
    /// waited for and held the workers' locks, for the log once the pause
    /// is over (taken: asked once). The default has nothing to say.
    fn apply_note(&self, vnic: &str) -> Option<String> {
        let _ = vnic;
        None
    }
    /// Remove a staged pre-copy whose migration was cancelled (the keys of
    /// its connections); returns how many went.
    fn discard_staged(&self, vnic: &str, keys: &[FlowKey]) -> Result<usize, ControlError> {
        let _ = (vnic, keys);
        Ok(0)
    }
    /// The TLS settings of the agent-to-agent state channel, when this
    /// agent has them (a `[controller]` certificate and `[migration]`).
    fn peer_tls(&self) -> Option<std::sync::Arc<crate::peer::PeerTls>> {
        None
    }
    /// An appliance's decision for the rest of the connection `key` belongs to.
    fn offload_flow(&self, key: &FlowKey, verdict: OffloadVerdict) -> Result<(), ControlError> {
        let _ = (key, verdict);
        Err(ControlError::Refused("this agent takes no offload requests".into()))
    }
    /// Whether `vnic` is attached here (its port, with the rules of the
    /// policy this agent runs): what pre-staging a migration checks.
    fn has_vnic(&self, vnic: &str) -> bool {
        let _ = vnic;
        false
    }
    /// Frames this host took from `vnic`'s guest so far (every worker's);
    /// `None`: not known here.
    fn vnic_received(&self, vnic: &str) -> Option<u64> {
        let _ = vnic;
        None
    }
    /// Mark standby the vNICs whose VM the inventory places on another host
    /// (and whose state was not imported moments ago): a guest announcing
    /// itself on one is held by the engine from that frame on.
    fn mark_standby(&self) {}
    /// The announcements (RARP, gratuitous ARP) each vNIC's guest made so
    /// far, and where the inventory places the vNIC (see [`crate::arrivals`]).
    fn announcements(&self) -> Vec<VnicAnnouncements> {
        Vec::new()
    }
    /// Hold `vnic`'s frames (dropped and counted as `vnic_migrating`) until
    /// its state is imported or [`Control::resume_vnic`]: a guest that
    /// arrived without its state. `Ok(false)`: not held, its state arrived
    /// moments ago (a migration this host took part in).
    fn hold_vnic(&self, vnic: &str) -> Result<bool, ControlError> {
        let _ = vnic;
        Err(ControlError::Refused("this agent holds no vNIC".into()))
    }
    /// End a hold whose state did not come: forward for `vnic` again, its
    /// frames decided without the state. `Ok(true)`: it was still held;
    /// `Ok(false)`: its state was imported meanwhile (which ended the hold).
    fn end_hold(&self, vnic: &str) -> Result<bool, ControlError> {
        let _ = vnic;
        Ok(false)
    }
}

/// A vNIC's guest's announcements of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VnicAnnouncements {
    /// The vNIC.
    pub vnic: String,
    /// Its MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Announcements made (every worker's).
    pub count: u64,
    /// The last one's kind, `rarp` or `garp`.
    pub kind: &'static str,
    /// The host the inventory (with the controller's locations) places the
    /// vNIC's VM on, when it names one.
    pub placed_on: Option<String>,
    /// The engine quiesced the vNIC itself: an announcement on a standby
    /// port ([`Control::mark_standby`]), not yet taken over by a hold.
    pub held_by_engine: bool,
}

/// Longest host name a `?peer=` query may give.
const MAX_PEER_NAME: usize = 253;

/// Split `action?peer=HOST` into the action and the peer; `Err` names what is wrong.
fn peer_query(action: &str) -> Result<(&str, Option<&str>), String> {
    let Some((action, query)) = action.split_once('?') else {
        return Ok((action, None));
    };
    let Some(peer) = query.strip_prefix("peer=") else {
        return Err(format!("unknown query {query:?} (only peer=HOST)"));
    };
    let ok = !peer.is_empty()
        && peer.len() <= MAX_PEER_NAME
        && peer.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok((action, Some(peer)))
    } else {
        Err("bad peer host name".into())
    }
}

/// The body of `POST /flows/offload`: a connection's 5-tuple (either
/// direction) and what to do with the rest of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffloadRequest {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// `allow` (bypass the appliance) or `drop`.
    pub verdict: String,
}

/// Largest offload request body.
const MAX_OFFLOAD_BODY: usize = 1024;

impl OffloadRequest {
    /// The flow key and verdict it names, or why it names none.
    pub fn parse(body: &[u8]) -> Result<(FlowKey, OffloadVerdict), String> {
        let r: OffloadRequest = serde_json::from_slice(body).map_err(|e| format!("bad offload request: {e}"))?;
        let protocol = match r.protocol.as_str() {
            "tcp" => IpProtocol::TCP,
            "udp" => IpProtocol::UDP,
            "sctp" => IpProtocol(132),
            p => return Err(format!("protocol {p:?}: tcp, udp or sctp")),
        };
        let verdict =
            OffloadVerdict::parse(&r.verdict).ok_or_else(|| format!("verdict {:?}: allow or drop", r.verdict))?;
        let octets = |ip: IpAddr| match ip {
            IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            IpAddr::V6(a) => a.octets(),
        };
        if r.src.is_ipv4() != r.dst.is_ipv4() {
            return Err("src and dst are of different IP versions".into());
        }
        let key = FlowKey {
            segment: palisade_datapath::ROUTING_DOMAIN,
            src: octets(r.src),
            dst: octets(r.dst),
            src_port: r.src_port,
            dst_port: r.dst_port,
            protocol,
            icmp_type: 0,
            icmp_code: 0,
        };
        Ok((key, verdict))
    }
}

/// Start serving `shared` on `tcp` (if any) and on the Unix socket `unix`
/// (replacing a stale socket file). Threads stop when `stop` is set.
pub fn serve(
    shared: Shared,
    tcp: Option<SocketAddr>,
    unix: &Path,
    stop: Arc<AtomicBool>,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    serve_with_control(shared, tcp, unix, stop, None)
}

/// [`serve`], with the migration requests of `control` on the Unix socket.
pub fn serve_with_control(
    shared: Shared,
    tcp: Option<SocketAddr>,
    unix: &Path,
    stop: Arc<AtomicBool>,
    control: Option<Arc<dyn Control>>,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    let mut handles = Vec::new();
    if let Some(addr) = tcp {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let (shared, stop) = (shared.clone(), stop.clone());
        handles.push(
            std::thread::Builder::new()
                .name("palisade-http".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match listener.accept() {
                            Ok((s, _)) => {
                                let _ = s.set_nonblocking(false);
                                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                                let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                                handle(s, &shared);
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(50)),
                        }
                    }
                })?,
        );
    }
    if unix.exists() {
        std::fs::remove_file(unix)?;
    }
    let listener = UnixListener::bind(unix)?;
    listener.set_nonblocking(true)?;
    handles.push(
        std::thread::Builder::new()
            .name("palisade-unix".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                            let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                            match &control {
                                Some(c) => handle_control(s, &shared, c.as_ref()),
                                None => handle(s, &shared),
                            }
                        }
                        // Nothing to accept: wait for a client (woken at
                        // once by one, so a migration's export and import
                        // are not each delayed by a polling interval inside
                        // the guest's pause), looking at `stop` every 100 ms.
                        Err(_) => wait_readable(listener.as_raw_fd(), Duration::from_millis(100)),
                    }
                }
            })?,
    );
    Ok(handles)
}

/// Wait until `fd` is readable (a listener: a client waits) or `timeout` passes.
fn wait_readable(fd: std::os::fd::RawFd, timeout: Duration) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, its count 1; poll only writes `revents`.
    let rc = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) };
    if rc < 0 {
        // EINTR or worse: do not spin.
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn handle<S: Read + Write>(stream: S, shared: &Shared) {
    let mut reader = BufReader::new(stream.take(MAX_REQUEST as u64));
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    // Drain the headers (bounded by `take`) so the client sees a clean close.
    let mut h = String::new();
    while reader.read_line(&mut h).is_ok_and(|n| n > 2) {
        h.clear();
    }
    let snapshot = shared.lock().map(|g| g.clone()).unwrap_or_default();
    let (status, ctype, body) = route(&line, &snapshot);
    let mut stream = reader.into_inner().into_inner();
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Read a request's line and headers, at most [`MAX_REQUEST`] bytes in all.
/// Returns the request line and the body length it declares (`None`: none
/// declared; `Some(Err)`: a length that does not parse).
fn read_head<R: BufRead>(r: &mut R) -> Option<(String, Option<Result<usize, ()>>)> {
    let mut budget = MAX_REQUEST as u64;
    let mut line = String::new();
    let n = r.by_ref().take(budget).read_line(&mut line).ok()?;
    budget = budget.saturating_sub(n as u64);
    let mut length = None;
    loop {
        let mut h = String::new();
        let n = r.by_ref().take(budget).read_line(&mut h).ok()?;
        budget = budget.saturating_sub(n as u64);
        if n == 0 || budget == 0 {
            // The connection ended, or the head is larger than allowed, before the blank line.
            return None;
        }
        if h.trim_end().is_empty() {
            return Some((line, length));
        }
        if let Some((name, value)) = h.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            length = Some(value.trim().parse::<usize>().map_err(|_| ()));
        }
    }
}

fn respond<W: Write>(mut w: W, status: &str, ctype: &str, body: &[u8]) {
    let _ = write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = w.write_all(body);
}

/// The Unix socket's handler when the agent takes migration requests.
fn handle_control<S: Read + Write>(stream: S, shared: &Shared, control: &dyn Control) {
    let mut reader = BufReader::new(stream);
    let Some((line, length)) = read_head(&mut reader) else {
        let stream = reader.into_inner();
        return respond(
            stream,
            "400 Bad Request",
            "text/plain",
            b"request head malformed or too large\n",
        );
    };
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if target == "/flows/offload" {
        let (status, body) = offload_request(method, length, &mut reader, control);
        return respond(
            reader.into_inner(),
            status,
            "text/plain",
            format!("{body}\n").as_bytes(),
        );
    }
    let Some(rest) = target.strip_prefix("/vnics/") else {
        let snapshot = shared.lock().map(|g| g.clone()).unwrap_or_default();
        let (status, ctype, body) = route(&line, &snapshot);
        return respond(reader.into_inner(), status, ctype, body.as_bytes());
    };
    let (status, ctype, body) = vnic_request(method, rest, length, &mut reader, control);
    respond(reader.into_inner(), status, ctype, &body);
}

/// Answer `POST /flows/offload`.
fn offload_request<R: Read>(
    method: &str,
    length: Option<Result<usize, ()>>,
    body: &mut R,
    control: &dyn Control,
) -> (&'static str, String) {
    if method != "POST" {
        return ("405 Method Not Allowed", "only POST".into());
    }
    let n = match length {
        None => {
            return (
                "411 Length Required",
                "an offload request needs a Content-Length".into(),
            );
        }
        Some(Err(())) => return ("400 Bad Request", "Content-Length does not parse".into()),
        Some(Ok(n)) if n > MAX_OFFLOAD_BODY => {
            return (
                "413 Content Too Large",
                format!("offload request of {n} bytes exceeds {MAX_OFFLOAD_BODY} bytes"),
            );
        }
        Some(Ok(n)) => n,
    };
    let mut text = vec![0; n];
    if let Err(e) = body.read_exact(&mut text) {
        return ("400 Bad Request", format!("body shorter than its Content-Length ({e})"));
    }
    let (key, verdict) = match OffloadRequest::parse(&text) {
        Ok(k) => k,
        Err(why) => return ("400 Bad Request", why),
    };
    match control.offload_flow(&key, verdict) {
        Ok(()) => ("200 OK", format!("offloaded: {}", verdict.name())),
        Err(ControlError::UnknownFlow) => ("404 Not Found", "no steered connection has this 5-tuple".into()),
        Err(ControlError::UnknownVnic(v)) => ("404 Not Found", format!("no vNIC {v:?} on this host")),
        Err(ControlError::Refused(why)) => ("400 Bad Request", why),
    }
}

/// Longest vNIC name a request may name.
const MAX_VNIC_NAME: usize = 255;

/// Answer `POST /vnics/{name}/{action}` (`rest` is what follows `/vnics/`).
fn vnic_request<R: Read>(
    method: &str,
    rest: &str,
    length: Option<Result<usize, ()>>,
    body: &mut R,
    control: &dyn Control,
) -> (&'static str, &'static str, Vec<u8>) {
    let text = |s: &'static str, m: String| (s, "text/plain", format!("{m}\n").into_bytes());
    let Some((vnic, action)) = rest.split_once('/') else {
        return text(
            "404 Not Found",
            "not found: try /vnics/NAME/export, import, export-inspection, import-inspection, resume or release".into(),
        );
    };
    if vnic.is_empty() || vnic.len() > MAX_VNIC_NAME || !vnic.bytes().all(|b| b.is_ascii_graphic()) {
        return text("400 Bad Request", "bad vNIC name".into());
    }
    let (action, peer) = match peer_query(action) {
        Ok(x) => x,
        Err(why) => return text("400 Bad Request", why),
    };
    if !matches!(
        action,
        "export" | "import" | "export-inspection" | "import-inspection" | "resume" | "release"
    ) {
        return text(
            "404 Not Found",
            format!(
                "not found: no action {action:?} (export, import, export-inspection, import-inspection, resume, release)"
            ),
        );
    }
    if method != "POST" {
        return text("405 Method Not Allowed", "only POST".into());
    }
    let refused = |e: ControlError| match e {
        ControlError::UnknownVnic(v) => text("404 Not Found", format!("no vNIC {v:?} on this host")),
        ControlError::Refused(why) => text("400 Bad Request", why),
        ControlError::UnknownFlow => text("404 Not Found", "no such connection".into()),
    };
    match action {
        "export" => match control.export_vnic(vnic, peer) {
            Ok(blob) => ("200 OK", "application/octet-stream", blob),
            Err(e) => refused(e),
        },
        "export-inspection" => match control.export_inspection(vnic, peer) {
            Ok(section) => ("200 OK", "application/octet-stream", section),
            Err(e) => refused(e),
        },
        "resume" => match control.resume_vnic(vnic, peer) {
            Ok(()) => ("200 OK", "application/json", b"{\"resumed\":true}".to_vec()),
            Err(e) => refused(e),
        },
        "release" => match control.release_vnic(vnic, peer) {
            Ok(n) => (
                "200 OK",
                "application/json",
                format!("{{\"released\":{n}}}").into_bytes(),
            ),
            Err(e) => refused(e),
        },
        _ => {
            // An inspection section holds reassembled bytes: the channel's frame bound.
            let max = if action == "import-inspection" {
                crate::peer::MAX_FRAME
            } else {
                crate::migrate::MAX_BLOB
            };
            let n = match length {
                None => return text("411 Length Required", "a state blob needs a Content-Length".into()),
                Some(Err(())) => return text("400 Bad Request", "Content-Length does not parse".into()),
                Some(Ok(n)) if n > max => {
                    return text(
                        "413 Content Too Large",
                        format!("state blob of {n} bytes exceeds {max} bytes"),
                    );
                }
                Some(Ok(n)) => n,
            };
            let mut blob = vec![0; n];
            if let Err(e) = body.read_exact(&mut blob) {
                return text(
                    "400 Bad Request",
                    format!("state blob shorter than its Content-Length ({e})"),
                );
            }
            if action == "import-inspection" {
                return match control.import_inspection(vnic, &blob, peer) {
                    Ok(n) => (
                        "200 OK",
                        "application/json",
                        format!("{{\"inspected_flows\":{n}}}").into_bytes(),
                    ),
                    Err(e) => refused(e),
                };
            }
            match control.import_vnic(vnic, &blob, peer) {
                Ok(n) => (
                    "200 OK",
                    "application/json",
                    format!("{{\"imported\":{n}}}").into_bytes(),
                ),
                Err(e) => refused(e),
            }
        }
    }
}

/// POST `body` to `path` on an agent's Unix socket; returns the response body
/// of a 200, else an error carrying the status line and the agent's message.
pub fn post_unix(socket: &Path, path: &str, body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: agent\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let Some(split) = out.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Err(std::io::Error::other("truncated response"));
    };
    let head = String::from_utf8_lossy(&out[..split]).to_string();
    let body = out[split + 4..].to_vec();
    if head.starts_with("HTTP/1.1 200") {
        Ok(body)
    } else {
        let status = head.lines().next().unwrap_or("").to_string();
        Err(std::io::Error::other(format!(
            "{status}: {}",
            String::from_utf8_lossy(&body).trim_end()
        )))
    }
}

/// The response to a request line: status, content type, body.
pub fn route<'a>(request_line: &str, p: &'a Published) -> (&'static str, &'static str, &'a str) {
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return ("400 Bad Request", "text/plain", "malformed request line\n");
    };
    let path = target.split('?').next().unwrap_or(target);
    match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", &p.metrics),
        ("GET", "/flows") => ("200 OK", "application/json", &p.flows),
        ("GET", "/health") => ("200 OK", "application/json", &p.health),
        ("GET", "/alerts") => (
            "200 OK",
            "application/json",
            if p.alerts.is_empty() { "[]" } else { &p.alerts },
        ),
        (_, "/metrics" | "/flows" | "/health" | "/alerts") => ("405 Method Not Allowed", "text/plain", "only GET\n"),
        _ => (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics, /flows, /alerts or /health\n",
        ),
    }
}

/// Fetch `path` from an agent's Unix socket (used by local tools and tests).
pub fn get_unix(socket: &Path, path: &str) -> std::io::Result<String> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: agent\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    match out.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
        Some((head, _)) => Err(std::io::Error::other(head.lines().next().unwrap_or("").to_string())),
        None => Err(std::io::Error::other("truncated response")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn offload_requests_name_a_flow_and_a_verdict_or_are_refused() {
        let ok = br#"{"src":"203.0.113.9","dst":"10.0.1.11","protocol":"tcp","src_port":40000,"dst_port":80,"verdict":"allow"}"#;
        let (key, verdict) = OffloadRequest::parse(ok).unwrap();
        assert_eq!(verdict, OffloadVerdict::Allow);
        assert_eq!((key.src_port, key.dst_port, key.protocol), (40000, 80, IpProtocol::TCP));
        assert_eq!(key.src_addr(), "203.0.113.9".parse::<IpAddr>().unwrap());
        let bad: &[(&[u8], &str)] = &[
            (br#"{"src":"1.2.3.4","dst":"10.0.1.11","protocol":"icmp","src_port":0,"dst_port":0,"verdict":"allow"}"#, "protocol"),
            (br#"{"src":"1.2.3.4","dst":"10.0.1.11","protocol":"tcp","src_port":1,"dst_port":2,"verdict":"maybe"}"#, "verdict"),
            (br#"{"src":"1.2.3.4","dst":"fd00::1","protocol":"tcp","src_port":1,"dst_port":2,"verdict":"drop"}"#, "IP versions"),
            (br#"{"src":"1.2.3.4","dst":"10.0.1.11","protocol":"tcp","src_port":70000,"dst_port":2,"verdict":"drop"}"#, "bad offload request"),
            (br#"{"src":"1.2.3.4","dst":"10.0.1.11","protocol":"tcp","src_port":1,"dst_port":2,"verdict":"drop","x":1}"#, "unknown field"),
            (b"[]", "bad offload request"),
            (b"", "bad offload request"),
        ];
        for (body, why) in bad {
            let e = OffloadRequest::parse(body).unwrap_err();
            assert!(e.contains(why), "{}: {e}", String::from_utf8_lossy(body));
        }
    }

    use super::*;

    #[test]
    fn a_migration_request_names_its_peer_or_is_refused() {
        type Parsed<'a> = Result<(&'a str, Option<&'a str>), &'a str>;
        let cases: [(&str, Parsed); 6] = [
            ("export", Ok(("export", None))),
            ("import?peer=hv2", Ok(("import", Some("hv2")))),
            ("resume?peer=rack-1.dc_a", Ok(("resume", Some("rack-1.dc_a")))),
            ("export?peer=", Err("bad peer host name")),
            ("export?peer=a/b", Err("bad peer host name")),
            ("export?to=hv2", Err("unknown query \"to=hv2\" (only peer=HOST)")),
        ];
        for (input, want) in cases {
            let got = peer_query(input);
            assert_eq!(
                got.as_ref().map_err(String::as_str),
                want.as_ref().map_err(|e| *e),
                "{input}"
            );
        }
        assert!(peer_query(&format!("export?peer={}", "h".repeat(254))).is_err());
    }

    #[test]
    fn routes() {
        let p = Published {
            metrics: "m".into(),
            flows: "[]".into(),
            health: "{}".into(),
            alerts: "[{\"a\":1}]".into(),
        };
        let cases = [
            ("GET /metrics HTTP/1.1\r\n", "200 OK", "m"),
            ("GET /flows?x=1 HTTP/1.1\r\n", "200 OK", "[]"),
            ("GET /health HTTP/1.0\r\n", "200 OK", "{}"),
            ("GET /alerts HTTP/1.1\r\n", "200 OK", "[{\"a\":1}]"),
            ("DELETE /alerts HTTP/1.1\r\n", "405 Method Not Allowed", "only GET\n"),
            ("POST /metrics HTTP/1.1\r\n", "405 Method Not Allowed", "only GET\n"),
            ("GET /../../etc/passwd HTTP/1.1\r\n", "404 Not Found", ""),
            ("\r\n", "400 Bad Request", ""),
            ("GARBAGE", "400 Bad Request", ""),
        ];
        for (line, status, body) in cases {
            let (s, _, b) = route(line, &p);
            assert_eq!(s, status, "{line:?}");
            if !body.is_empty() {
                assert_eq!(b, body);
            }
        }
    }

    #[test]
    fn serves_over_a_unix_socket_and_survives_junk() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let shared: Shared = Arc::new(Mutex::new(Arc::new(Published {
            metrics: "palisade_up 1\n".into(),
            ..Default::default()
        })));
        let stop = Arc::new(AtomicBool::new(false));
        let handles = serve(shared.clone(), None, &sock, stop.clone()).unwrap();
        // A client that sends an endless header line is cut off at the size bound.
        let mut junk = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        let _ = junk.write_all(&vec![b'A'; 3 * MAX_REQUEST]);
        drop(junk);
        assert_eq!(get_unix(&sock, "/metrics").unwrap(), "palisade_up 1\n");
        *shared.lock().unwrap() = Arc::new(Published {
            metrics: "palisade_up 2\n".into(),
            ..Default::default()
        });
        assert_eq!(get_unix(&sock, "/metrics").unwrap(), "palisade_up 2\n");
        assert!(get_unix(&sock, "/nope").is_err());
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().unwrap();
        }
    }
}
