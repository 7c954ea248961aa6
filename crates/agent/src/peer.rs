//! The agent-to-agent state channel of live migration.
//!
//! The destination host's agent listens on its underlay address
//! (`[migration] listen`); the source's agent connects to it
//! (`[migration] peers`) when the controller orders a migration there. Both
//! ends authenticate with the certificates they already hold for the
//! controller (`[controller] ca`, `cert`, `key`: one deployment CA, one
//! certificate per host naming it): the source checks that the destination
//! presents the certificate of the host the order names, the destination
//! that the source's certificate names the host it says it is, and that it
//! is not itself.
//!
//! One TLS connection carries one migration, as frames of
//! `length u32 | kind u8 | body` (the length counts the kind and body, at
//! most [`MAX_FRAME`]):
//!
//! 1. `HELLO` (the source's host name), answered `OK`;
//! 2. `STAGE` per vNIC, while the guest still runs: every connection
//!    ([`palisade_datapath::transfer`], full), decoded and verified and held
//!    by the destination, not imported;
//! 3. `COMMIT` per vNIC, in the guest's pause: the delta (connections
//!    created or changed since the pre-copy, keys of those removed), applied
//!    to the staged copy and imported all or nothing ([`Control::import_arrival`]);
//!    a full transfer here needs no pre-copy.
//!
//! `INSPECT` carries a vNIC's inspection section
//! ([`crate::inspection::carry`]): its pre-copy after the `STAGE`, its delta
//! in the pause before the `COMMIT`; the destination holds what it takes
//! until the `COMMIT` is applied ([`Control::import_inspection`]).
//!
//! Each request is answered `OK count` or `ERR message`. What is staged
//! lives in the connection: a source that goes away (a cancelled
//! migration) leaves nothing behind. Framing errors (a frame over the
//! limit, a connection cut mid-frame) end the connection; a refused blob
//! is answered `ERR` and changes nothing.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use palisade_api::tls::{load_certs, load_key, provider, roots};
use palisade_datapath::state::{ConnRecord, Snapshot};
use palisade_datapath::transfer;
use palisade_wire::flow::FlowKey;
use rustls::pki_types::ServerName;
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection, StreamOwned};

use crate::http::{Control, ControlError};

/// Largest frame either end accepts: a transfer of the most connections a
/// blob may hold (2^20, under 48 bytes each) fits.
pub const MAX_FRAME: usize = 64 << 20;
/// Sessions a destination serves at once (each may hold a staged copy).
pub const MAX_SESSIONS: usize = 4;
/// How long the source waits for the destination's TCP handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

const HELLO: u8 = 1;
const STAGE: u8 = 2;
const COMMIT: u8 = 3;
/// A vNIC's inspection section ([`crate::inspection::carry`]): its
/// pre-copy after the `STAGE`, its delta in the pause before the `COMMIT`.
const INSPECT: u8 = 4;
const OK: u8 = 0x80;
const ERR: u8 = 0x81;

/// Why the channel failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The TLS settings could not be built from the configured files.
    #[error("agent-to-agent TLS settings: {0}")]
    Tls(String),
    /// Connecting, the TLS handshake, or the connection failed.
    #[error("{peer}: {message}")]
    Io {
        /// The other end.
        peer: String,
        /// What failed.
        message: String,
    },
    /// The other end answered with an error.
    #[error("{peer} refused: {message}")]
    Refused {
        /// The other end.
        peer: String,
        /// Its reason.
        message: String,
    },
    /// A frame over [`MAX_FRAME`] (or empty).
    #[error("frame of {len} bytes refused (limit {max})")]
    Oversized {
        /// Its declared length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The connection ended inside a frame.
    #[error("connection closed mid-frame ({got} of {want} bytes)")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes the frame declared.
        want: usize,
    },
    /// A frame of a kind not expected there.
    #[error("protocol: {0}")]
    Protocol(String),
}

/// This agent's TLS settings for the channel, both ends.
pub struct PeerTls {
    host: String,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl core::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PeerTls")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl PeerTls {
    /// Settings for host `host` from the deployment's CA certificate `ca`
    /// and this host's certificate and key (which must name `host` and
    /// allow both client and server authentication).
    pub fn load(host: &str, ca: &Path, cert: &Path, key: &Path) -> Result<PeerTls, PeerError> {
        let tls = |e: &dyn std::fmt::Display| PeerError::Tls(e.to_string());
        let roots = Arc::new(roots(ca).map_err(|e| tls(&e))?);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| tls(&e))?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls(&e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                load_certs(cert).map_err(|e| tls(&e))?,
                load_key(key).map_err(|e| tls(&e))?,
            )
            .map_err(|e| tls(&e))?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls(&e))?
            .with_root_certificates((*roots).clone())
            .with_client_auth_cert(
                load_certs(cert).map_err(|e| tls(&e))?,
                load_key(key).map_err(|e| tls(&e))?,
            )
            .map_err(|e| tls(&e))?;
        Ok(PeerTls {
            host: host.to_string(),
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// This host's name.
    pub fn host(&self) -> &str {
        &self.host
    }
}

/// What a destination does with one request of a session: a pre-copy
/// imported into the vNIC's tables (staged: the guest still runs on the
/// source, so nothing of it is forwarded yet; the port is left as it is),
/// or a delta applied to them (removals, a re-decision of everything staged
/// when the policy changed in between, the created and changed
/// connections), after which the vNIC forwards here.
#[derive(Debug)]
pub struct Arrival {
    /// The vNIC.
    pub vnic: String,
    /// The source host (its certificate said so).
    pub peer: String,
    /// A pre-copy to stage (else a delta to commit).
    pub stage: bool,
    /// Keys (initiator direction) of connections to remove first.
    pub removed: Vec<FlowKey>,
    /// Have every connection of the vNIC already here decided again on
    /// its next packet (staged under another policy version than the delta's).
    pub revalidate: bool,
    /// The connections to import (times relative to now on this host).
    pub snapshot: Snapshot,
    /// Transfer bytes received for the vNIC so far (pre-copy and delta).
    pub bytes: u64,
    /// BLAKE3 of those bytes, pre-copy then delta (the source reports the same).
    pub blake3: String,
}

fn io_error(peer: &str) -> impl Fn(std::io::Error) -> PeerError + '_ {
    move |e| PeerError::Io {
        peer: peer.to_string(),
        message: e.to_string(),
    }
}

/// Parts of a frame written together, in one write, up to this size (a
/// request's head, vNIC name and delta; an answer): one write to the TLS
/// stream is one record and one TCP segment, so the reader wakes once for
/// the frame. Larger parts (a pre-copy) are written on their own, not
/// copied.
const COALESCE: usize = 64 << 10;

/// Write one frame. Its small parts go out in one write (see
/// [`COALESCE`]): written part by part, a commit was four TLS records and
/// its answer two, and the other end woke for each one that came after it
/// had gone back to waiting.
fn write_frame(w: &mut impl Write, kind: u8, parts: &[&[u8]]) -> std::io::Result<()> {
    let len: usize = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    let len = u32::try_from(len).map_err(|_| std::io::Error::other("frame too long"))?;
    let mut buf = Vec::with_capacity((len as usize + 4).min(COALESCE));
    buf.extend_from_slice(&len.to_be_bytes());
    buf.push(kind);
    for p in parts {
        if buf.len() + p.len() <= COALESCE {
            buf.extend_from_slice(p);
        } else {
            if !buf.is_empty() {
                w.write_all(&buf)?;
                buf.clear();
            }
            w.write_all(p)?;
        }
    }
    if !buf.is_empty() {
        w.write_all(&buf)?;
    }
    w.flush()
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for both agents on a host
/// (network namespaces share it), so their logs of one exchange line up.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for clock_gettime to write.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Read one frame: `None` when the connection ends cleanly between frames.
/// The body is read as it arrives, never allocated from the declared length.
fn read_frame(r: &mut impl Read, peer: &str) -> Result<Option<(u8, Vec<u8>)>, PeerError> {
    Ok(read_frame_timed(r, peer)?.map(|(kind, body, _)| (kind, body)))
}

/// [`read_frame`], with the time ([`monotonic_ns`]) its first bytes came.
fn read_frame_timed(r: &mut impl Read, peer: &str) -> Result<Option<(u8, Vec<u8>, u64)>, PeerError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    let mut first = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(PeerError::Truncated { got, want: 4 }),
            Ok(n) => {
                if got == 0 {
                    first = monotonic_ns();
                }
                got += n;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(peer)(e)),
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(PeerError::Oversized { len, max: MAX_FRAME });
    }
    let mut body = Vec::with_capacity(len.min(1 << 20));
    r.take(len as u64).read_to_end(&mut body).map_err(io_error(peer))?;
    if body.len() < len {
        return Err(PeerError::Truncated {
            got: body.len(),
            want: len,
        });
    }
    let kind = body.remove(0);
    Ok(Some((kind, body, first)))
}

/// A request's body: `vnic_len u8 | vnic | blob`.
fn split_request(body: &[u8]) -> Result<(&str, &[u8]), String> {
    let (&n, rest) = body.split_first().ok_or("empty request")?;
    let n = usize::from(n);
    if n == 0 || rest.len() < n {
        return Err("request without a vNIC name".into());
    }
    let vnic = std::str::from_utf8(&rest[..n]).map_err(|_| "vNIC name is not UTF-8".to_string())?;
    Ok((vnic, &rest[n..]))
}

/// A pre-copy staged on the destination until its commit.
struct Staged {
    policy_version: u64,
    keys: Vec<FlowKey>,
    bytes: u64,
    hash: blake3::Hasher,
}

/// The destination's side of one session: what it staged, per vNIC, and
/// what each request asks of its tables. Separate from the transport so
/// its rules are tested on their own.
pub struct Staging {
    from: String,
    staged: HashMap<String, Staged>,
    /// What commits left behind, freed by [`Staging::free_committed`] when
    /// the session ends (the source closes it once QEMU has finished):
    /// freeing a large pre-copy's keys (2 MB at 50,000 connections) took
    /// 0.2 to 1.2 ms inside the guest's pause, and freed right after the
    /// answer it still held the CPU the source's wake-up was queued on
    /// (the answer's way back p50 610 us at 50,000 connections against
    /// 80 us at 1,000, load 18).
    spent: Vec<Staged>,
    /// Log lines of the commits' times, written when the session ends for
    /// the same reason.
    notes: Vec<String>,
}

impl Staging {
    /// A session with the source host `from` (authenticated by the caller).
    pub fn new(from: &str) -> Staging {
        Staging {
            from: from.to_string(),
            staged: HashMap::new(),
            spent: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Verify a pre-copy of `vnic`: what to stage. One per vNIC and session.
    pub fn stage(&mut self, vnic: &str, blob: &[u8]) -> Result<Arrival, String> {
        if self.staged.contains_key(vnic) {
            return Err(format!("vNIC {vnic:?} is staged already"));
        }
        let t = transfer::decode(blob).map_err(|e| e.to_string())?;
        if t.vnic != vnic {
            return Err(format!("pre-copy is for vNIC {:?}, not {vnic:?}", t.vnic));
        }
        if !t.full || !t.removed.is_empty() {
            return Err("a pre-copy must hold every connection and no removals".into());
        }
        let keys = distinct_keys(&t.conns).ok_or("pre-copy holds a connection twice")?;
        let mut hash = blake3::Hasher::new();
        hash.update(blob);
        let bytes = blob.len() as u64;
        let arrival = Arrival {
            vnic: vnic.to_string(),
            peer: self.from.clone(),
            stage: true,
            removed: Vec::new(),
            revalidate: false,
            snapshot: Snapshot {
                vnic: vnic.to_string(),
                policy_version: t.policy_version,
                conns: t.conns,
            },
            bytes,
            blake3: hash.finalize().to_hex().to_string(),
        };
        self.staged.insert(
            vnic.to_string(),
            Staged {
                policy_version: t.policy_version,
                keys,
                bytes,
                hash,
            },
        );
        Ok(arrival)
    }

    /// Verify a delta (or a full transfer) of `vnic`: what to apply to
    /// what was staged. Removed keys go; if the staged copy was taken under
    /// another policy version than the delta's, every staged connection is
    /// decided again (a policy change between the pre-copy and the pause:
    /// what it revokes stays revoked); created and changed connections
    /// replace what was staged. A full transfer replaces the staged copy
    /// whole. Once applied, [`Staging::committed`].
    pub fn commit(&mut self, vnic: &str, blob: &[u8]) -> Result<Arrival, String> {
        let t = transfer::decode(blob).map_err(|e| e.to_string())?;
        if t.vnic != vnic {
            return Err(format!("delta is for vNIC {:?}, not {vnic:?}", t.vnic));
        }
        distinct_keys(&t.conns).ok_or("delta holds a connection twice")?;
        let staged = self.staged.get(vnic);
        let (removed, revalidate, mut hash, bytes) = match staged {
            Some(s) if !t.full => (t.removed, s.policy_version != t.policy_version, s.hash.clone(), s.bytes),
            None if !t.full => return Err(format!("a delta for vNIC {vnic:?} without a staged pre-copy")),
            Some(s) => (s.keys.clone(), false, s.hash.clone(), s.bytes),
            None => (Vec::new(), false, blake3::Hasher::new(), 0),
        };
        hash.update(blob);
        Ok(Arrival {
            vnic: vnic.to_string(),
            peer: self.from.clone(),
            stage: false,
            removed,
            revalidate,
            snapshot: Snapshot {
                vnic: vnic.to_string(),
                policy_version: t.policy_version,
                conns: t.conns,
            },
            bytes: bytes + blob.len() as u64,
            blake3: hash.finalize().to_hex().to_string(),
        })
    }

    /// Whether a pre-copy of `vnic` is staged in this session.
    pub fn is_staged(&self, vnic: &str) -> bool {
        self.staged.contains_key(vnic)
    }

    /// `vnic`'s commit was applied: nothing of it is left to discard
    /// (what was staged is kept until [`Staging::free_committed`]).
    pub fn committed(&mut self, vnic: &str) {
        if let Some(s) = self.staged.remove(vnic) {
            self.spent.push(s);
        }
    }

    /// Free what commits left behind: called when the session ends, so
    /// neither the guest's pause nor the answer's way back waits for it.
    pub fn free_committed(&mut self) {
        self.spent = Vec::new();
    }

    /// What the session staged and did not commit (it ended: the migration
    /// was cancelled), per vNIC the keys to remove again.
    pub fn leftovers(&mut self) -> Vec<(String, Vec<FlowKey>)> {
        self.staged.drain().map(|(v, s)| (v, s.keys)).collect()
    }
}

/// Whether host `host` takes a vNIC's state from host `from` (its
/// certificate checked), given the host its inventory (with the
/// controller's locations) places the vNIC's VM on, and whether the vNIC
/// waits for its state here (`awaiting`: its port quiesced, or its guest
/// held for its state moments ago). Taken from the VM's current host only:
/// another agent of the CA (compromised or confused) cannot push
/// connections into a VM that does not run there, or into one that runs
/// here. One lag is allowed: placed here and awaiting (a guest that
/// arrived and was held for its state, whose location the controller moved
/// first; or one that migrated away and comes back before this host heard
/// of its first move).
pub fn check_source(vnic: &str, from: &str, host: &str, placed: Option<&str>, awaiting: bool) -> Result<(), String> {
    match placed {
        Some(p) if p == from => Ok(()),
        Some(p) if p == host && awaiting => Ok(()),
        Some(p) if p == host => Err(format!(
            "vNIC {vnic:?} runs on this host ({host}): its state is not taken from {from}"
        )),
        Some(p) => Err(format!(
            "vNIC {vnic:?} is placed on {p}, not {from}: its state is taken from {p} only"
        )),
        None => Err(format!(
            "vNIC {vnic:?} is placed on no host here: its state is not taken from {from}"
        )),
    }
}

/// The records' keys, if no connection is there twice.
fn distinct_keys(conns: &[ConnRecord]) -> Option<Vec<FlowKey>> {
    let mut seen = std::collections::HashSet::with_capacity(conns.len());
    let mut keys = Vec::with_capacity(conns.len());
    for c in conns {
        if !seen.insert(c.key.canonical().0) {
            return None;
        }
        keys.push(c.key);
    }
    Some(keys)
}

fn describe(e: &ControlError) -> String {
    match e {
        ControlError::UnknownVnic(v) => format!("no vNIC {v:?} on this host"),
        ControlError::Refused(why) => why.clone(),
        ControlError::UnknownFlow => "no such connection".into(),
    }
}

/// Check that the client's certificate (verified against the CA by rustls)
/// names `from`, and that `from` is not this host.
fn check_identity(conn: &ServerConnection, from: &str, host: &str) -> Result<(), String> {
    if from == host {
        return Err(format!("a migration from {from:?} to itself"));
    }
    let cert = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("no client certificate")?;
    let name = ServerName::try_from(from.to_string()).map_err(|_| format!("{from:?} is not a host name"))?;
    let parsed = ParsedCertificate::try_from(cert).map_err(|e| format!("client certificate: {e}"))?;
    rustls::client::verify_server_name(&parsed, &name)
        .map_err(|_| format!("the client certificate is not host {from:?}'s"))
}

/// Serve one source agent's session (see the module's documentation).
fn serve_session(tcp: TcpStream, tls: &PeerTls, control: &dyn Control, idle: Duration) -> Result<(), PeerError> {
    let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "peer".into());
    tcp.set_read_timeout(Some(idle)).map_err(io_error(&peer))?;
    tcp.set_write_timeout(Some(idle)).map_err(io_error(&peer))?;
    let _ = tcp.set_nodelay(true);
    let conn = ServerConnection::new(tls.server.clone()).map_err(|e| PeerError::Tls(e.to_string()))?;
    let mut s = StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).map_err(io_error(&peer))?;
    }
    let reply = |s: &mut StreamOwned<ServerConnection, TcpStream>, r: Result<u64, String>| match r {
        Ok(n) => write_frame(s, OK, &[&n.to_be_bytes()]),
        Err(m) => write_frame(s, ERR, &[m.as_bytes()]),
    };
    let Some((kind, body)) = read_frame(&mut s, &peer)? else {
        return Ok(());
    };
    let from = match (kind, std::str::from_utf8(&body)) {
        (HELLO, Ok(from)) => from.to_string(),
        _ => {
            let _ = reply(&mut s, Err("expected HELLO with the source's host name".into()));
            return Err(PeerError::Protocol("no HELLO".into()));
        }
    };
    if let Err(m) = check_identity(&s.conn, &from, &tls.host) {
        let _ = reply(&mut s, Err(m.clone()));
        return Err(PeerError::Refused {
            peer: format!("{peer} ({from})"),
            message: m,
        });
    }
    reply(&mut s, Ok(0)).map_err(io_error(&peer))?;
    let mut staging = Staging::new(&from);
    let result = serve_requests(&mut s, &peer, &mut staging, control);
    staging.free_committed();
    for note in staging.notes.drain(..) {
        eprintln!("palisade agent: migration from {from}: {note}");
    }
    // A session that ends without its commits leaves nothing staged.
    for (vnic, keys) in staging.leftovers() {
        if let Err(e) = control.discard_staged(&vnic, &keys) {
            eprintln!(
                "palisade agent: migration from {from}: discarding {vnic}'s staged copy: {}",
                describe(&e)
            );
        }
    }
    result
}

/// The requests of an authenticated session, until it ends.
fn serve_requests(
    s: &mut StreamOwned<ServerConnection, TcpStream>,
    peer: &str,
    staging: &mut Staging,
    control: &dyn Control,
) -> Result<(), PeerError> {
    let from = staging.from.clone();
    loop {
        let (frame, first_byte) = match read_frame_timed(s, peer) {
            Ok(Some((kind, body, at))) => ((kind, body), at),
            Ok(None) => return Ok(()),
            Err(e) => {
                let _ = write_frame(s, ERR, &[e.to_string().as_bytes()]);
                return Err(e);
            }
        };
        let apply = |a: Arrival| control.import_arrival(a).map(|n| n as u64).map_err(|e| describe(&e));
        // A commit's time here (in the guest's pause), logged once answered.
        let mut timed = None;
        let source = |vnic: &str| control.check_source(vnic, &from).map_err(|e| describe(&e));
        let answer = match frame {
            (STAGE, body) => split_request(&body).and_then(|(vnic, blob)| {
                source(vnic)?;
                let n = apply(staging.stage(vnic, blob)?);
                if n.is_err() {
                    // Nothing of it went in: nothing to discard.
                    staging.committed(vnic);
                }
                n
            }),
            (COMMIT, body) => split_request(&body).and_then(|(vnic, blob)| {
                // A staged vNIC's source was checked at its pre-copy, moments
                // ago in this session: the pause does not pay for it twice.
                if !staging.is_staged(vnic) {
                    source(vnic)?;
                }
                let t = Instant::now();
                let arrival = staging.commit(vnic, blob)?;
                let (conns, decoded) = (arrival.snapshot.conns.len(), t.elapsed());
                let n = apply(arrival)?;
                staging.committed(vnic);
                timed = Some((vnic.to_string(), conns, decoded, t.elapsed() - decoded));
                Ok(n)
            }),
            (INSPECT, body) => split_request(&body).and_then(|(vnic, blob)| {
                if !staging.is_staged(vnic) {
                    source(vnic)?;
                }
                control
                    .import_inspection(vnic, blob, Some(&from))
                    .map(|n| n as u64)
                    .map_err(|e| describe(&e))
            }),
            (kind, _) => Err(format!("unexpected frame kind {kind:#04x}")),
        };
        let answering = monotonic_ns();
        let written = match answer {
            Ok(n) => write_frame(s, OK, &[&n.to_be_bytes()]),
            Err(m) => write_frame(s, ERR, &[m.as_bytes()]),
        };
        written.map_err(io_error(peer))?;
        let answered = monotonic_ns();
        if let Some((vnic, conns, decoded, applied)) = timed {
            // The clock readings line up with the source's log of the same
            // exchange (one monotonic clock on the host): how long the
            // request took to arrive and the answer to get back.
            let locks = control.apply_note(&vnic).map(|n| format!("; {n}")).unwrap_or_default();
            staging.notes.push(format!(
                "commit of {vnic}: {conns} connections, decode {} us, apply {} us, answer written in {} us; \
                 request's first bytes at {first_byte} ns, answer begun at {answering} ns{locks}",
                decoded.as_micros(),
                applied.as_micros(),
                answered.saturating_sub(answering) / 1000,
            ));
        }
    }
}

/// Listen on `addr` for source agents' sessions, each on its own thread
/// (at most [`MAX_SESSIONS`] at once; more are turned away), until `stop`.
/// A session idle for `idle` is ended. Returns the address bound.
pub fn listen(
    addr: &str,
    tls: Arc<PeerTls>,
    control: Arc<dyn Control>,
    stop: Arc<AtomicBool>,
    idle: Duration,
) -> Result<(SocketAddr, std::thread::JoinHandle<()>), PeerError> {
    let listener = TcpListener::bind(addr).map_err(io_error(addr))?;
    let bound = listener.local_addr().map_err(io_error(addr))?;
    listener.set_nonblocking(true).map_err(io_error(addr))?;
    let sessions = Arc::new(AtomicUsize::new(0));
    let h = std::thread::Builder::new()
        .name("palisade-peer".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let tcp = match listener.accept() {
                    Ok((tcp, _)) => tcp,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    Err(e) => {
                        eprintln!("palisade agent: migration listener: {e}");
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    }
                };
                if sessions.fetch_add(1, Ordering::AcqRel) >= MAX_SESSIONS {
                    sessions.fetch_sub(1, Ordering::AcqRel);
                    // Dropped: the source sees its connection closed.
                    continue;
                }
                let _ = tcp.set_nonblocking(false);
                let (tls, control, sessions) = (tls.clone(), control.clone(), sessions.clone());
                let spawned = std::thread::Builder::new()
                    .name("palisade-peer-session".into())
                    .spawn(move || {
                        if let Err(e) = serve_session(tcp, &tls, &*control, idle) {
                            eprintln!("palisade agent: migration session: {e}");
                        }
                        sessions.fetch_sub(1, Ordering::AcqRel);
                    });
                if spawned.is_err() {
                    // The closure (and its count) went with the failed spawn.
                    eprintln!("palisade agent: migration listener: cannot start a session thread");
                }
            }
        })
        .map_err(io_error(addr))?;
    Ok((bound, h))
}

/// The source's end of a session with one destination agent.
pub struct Session {
    peer: String,
    stream: StreamOwned<ClientConnection, TcpStream>,
    bytes: u64,
    hash: blake3::Hasher,
    last: Option<ExchangeTimes>,
}

/// When the source's last exchange began, was written, and was answered
/// (CLOCK_MONOTONIC readings in nanoseconds: the destination logs its side
/// of the same exchange on the same clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExchangeTimes {
    /// Before the request was written.
    pub started_ns: u64,
    /// Once it was written (handed to the kernel).
    pub written_ns: u64,
    /// Once the answer was read.
    pub answered_ns: u64,
}

impl Session {
    /// Connect to host `to`'s agent at `addr`, check that it presents `to`'s
    /// certificate, and say who we are. `timeout` bounds each later exchange.
    pub fn connect(tls: &PeerTls, to: &str, addr: &str, timeout: Duration) -> Result<Session, PeerError> {
        let peer = format!("{to} ({addr})");
        let io = io_error(&peer);
        let name = ServerName::try_from(to.to_string()).map_err(|_| PeerError::Io {
            peer: peer.clone(),
            message: format!("{to:?} is not a host name"),
        })?;
        let sa = addr
            .to_socket_addrs()
            .map_err(&io)?
            .next()
            .ok_or_else(|| PeerError::Io {
                peer: peer.clone(),
                message: "the address resolves to nothing".into(),
            })?;
        let tcp = TcpStream::connect_timeout(&sa, CONNECT_TIMEOUT).map_err(&io)?;
        tcp.set_read_timeout(Some(timeout)).map_err(&io)?;
        tcp.set_write_timeout(Some(timeout)).map_err(&io)?;
        let _ = tcp.set_nodelay(true);
        let conn = ClientConnection::new(tls.client.clone(), name).map_err(|e| PeerError::Tls(e.to_string()))?;
        let mut stream = StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock).map_err(&io)?;
        }
        drop(io);
        let mut s = Session {
            peer,
            stream,
            bytes: 0,
            hash: blake3::Hasher::new(),
            last: None,
        };
        s.exchange(HELLO, &[tls.host.as_bytes()])?;
        Ok(s)
    }

    fn exchange(&mut self, kind: u8, parts: &[&[u8]]) -> Result<u64, PeerError> {
        let started_ns = monotonic_ns();
        write_frame(&mut self.stream, kind, parts).map_err(io_error(&self.peer))?;
        let written_ns = monotonic_ns();
        let (kind, body) = read_frame(&mut self.stream, &self.peer)?.ok_or_else(|| PeerError::Io {
            peer: self.peer.clone(),
            message: "closed the connection without an answer".into(),
        })?;
        self.last = Some(ExchangeTimes {
            started_ns,
            written_ns,
            answered_ns: monotonic_ns(),
        });
        match kind {
            OK if body.len() == 8 => Ok(u64::from_be_bytes(body[..8].try_into().unwrap_or([0; 8]))),
            ERR => Err(PeerError::Refused {
                peer: self.peer.clone(),
                message: String::from_utf8_lossy(&body)
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(400)
                    .collect(),
            }),
            _ => Err(PeerError::Protocol(format!("unexpected answer kind {kind:#04x}"))),
        }
    }

    fn request(&mut self, kind: u8, vnic: &str, blob: &[u8]) -> Result<u64, PeerError> {
        let name = u8::try_from(vnic.len())
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| PeerError::Protocol(format!("vNIC name {vnic:?} is not 1 to 255 bytes")))?;
        let n = self.exchange(kind, &[&[name], vnic.as_bytes(), blob])?;
        self.bytes += blob.len() as u64;
        self.hash.update(blob);
        Ok(n)
    }

    /// Send the pre-copy of `vnic`; returns the connections the destination staged.
    pub fn stage(&mut self, vnic: &str, blob: &[u8]) -> Result<u64, PeerError> {
        self.request(STAGE, vnic, blob)
    }

    /// Send the delta of `vnic` (or a full transfer); returns the
    /// connections the destination imported.
    pub fn commit(&mut self, vnic: &str, blob: &[u8]) -> Result<u64, PeerError> {
        self.request(COMMIT, vnic, blob)
    }

    /// The times of the last exchange answered.
    pub fn last_exchange(&self) -> Option<ExchangeTimes> {
        self.last
    }

    /// Send an inspection section of `vnic` (its pre-copy, or its delta before the `COMMIT`); returns
    /// the flows the destination took up.
    pub fn inspect(&mut self, vnic: &str, blob: &[u8]) -> Result<u64, PeerError> {
        self.request(INSPECT, vnic, blob)
    }

    /// Transfer bytes sent so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// BLAKE3 of every blob sent, in order.
    pub fn blake3(&self) -> String {
        self.hash.finalize().to_hex().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vnics_state_comes_from_its_vms_host_or_to_a_quiesced_port_here() {
        // (placed on, awaiting its state on hv2, taken from hv1 by hv2)
        let table: [(Option<&str>, bool, Result<(), &str>); 7] = [
            (Some("hv1"), false, Ok(())),
            (Some("hv1"), true, Ok(())),
            // A guest held here for its state (a follow order), or one that
            // left and comes back before this host heard of its first move.
            (Some("hv2"), true, Ok(())),
            (
                Some("hv2"),
                false,
                Err("vNIC \"a.0\" runs on this host (hv2): its state is not taken from hv1"),
            ),
            (
                Some("hv3"),
                false,
                Err("vNIC \"a.0\" is placed on hv3, not hv1: its state is taken from hv3 only"),
            ),
            (
                Some("hv3"),
                true,
                Err("vNIC \"a.0\" is placed on hv3, not hv1: its state is taken from hv3 only"),
            ),
            (
                None,
                true,
                Err("vNIC \"a.0\" is placed on no host here: its state is not taken from hv1"),
            ),
        ];
        for (placed, quiesced, want) in table {
            let got = check_source("a.0", "hv1", "hv2", placed, quiesced);
            assert_eq!(
                got.as_ref().map_err(String::as_str),
                want.as_ref().map_err(|e| *e),
                "{placed:?} {quiesced}"
            );
        }
    }

    /// A writer that keeps each write apart (on the TLS stream each write
    /// is a record of its own, and a segment with `TCP_NODELAY`).
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl Write for Writes {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.push(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// An answer and a commit with its delta go out in one write each, so
    /// the other end wakes once for them; a pre-copy larger than
    /// [`COALESCE`] is written as it is, after the frame's head and name.
    /// Each reads back as the frame written.
    #[test]
    fn small_frames_are_one_write_and_large_parts_go_on_their_own() {
        let frames: [(u8, Vec<Vec<u8>>, usize); 3] = [
            (OK, vec![7u64.to_be_bytes().to_vec()], 1),
            (COMMIT, vec![vec![3], b"a.0".to_vec(), vec![5; 300]], 1),
            (STAGE, vec![vec![3], b"a.0".to_vec(), vec![6; COALESCE + 1]], 2),
        ];
        for (kind, parts, writes) in frames {
            let mut w = Writes::default();
            let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
            write_frame(&mut w, kind, &refs).unwrap();
            assert_eq!(w.0.len(), writes, "kind {kind:#x}");
            let body: Vec<u8> = parts.concat();
            assert_eq!(
                w.0[0][..5],
                [&((body.len() + 1) as u32).to_be_bytes()[..], &[kind]].concat()
            );
            if writes == 2 {
                assert_eq!(w.0[1].len(), COALESCE + 1, "the large part, uncopied");
            }
            let wire = w.0.concat();
            let (k, b) = read_frame(&mut std::io::Cursor::new(wire), "test").unwrap().unwrap();
            assert_eq!((k, b), (kind, body));
        }
    }

    /// A commit's staged copy is not freed with the commit (in the
    /// guest's pause) but when the session ends; a session's leftovers are
    /// only the uncommitted.
    #[test]
    fn a_committed_copy_is_freed_when_the_session_ends() {
        let pre = transfer::encode(&palisade_datapath::transfer::Transfer {
            vnic: "a.0".into(),
            policy_version: 1,
            full: true,
            conns: Vec::new(),
            removed: Vec::new(),
        });
        let mut st = Staging::new("hv1");
        st.stage("a.0", &pre).unwrap();
        assert!(st.is_staged("a.0"));
        st.committed("a.0");
        assert!(!st.is_staged("a.0"));
        assert_eq!(st.spent.len(), 1);
        assert!(st.leftovers().is_empty());
        st.free_committed();
        assert!(st.spent.is_empty());
    }

    #[test]
    fn frames_are_bounded_and_cut_frames_are_named() {
        let mut b = Vec::new();
        write_frame(&mut b, STAGE, &[b"ab", b"c"]).unwrap();
        assert_eq!(read_frame(&mut &b[..], "p").unwrap(), Some((STAGE, b"abc".to_vec())));
        assert_eq!(read_frame(&mut &b""[..], "p").unwrap(), None);
        let cut = read_frame(&mut &b[..7], "p").unwrap_err();
        assert_eq!(cut.to_string(), "connection closed mid-frame (3 of 4 bytes)");
        let cut = read_frame(&mut &b[..2], "p").unwrap_err();
        assert_eq!(cut.to_string(), "connection closed mid-frame (2 of 4 bytes)");
        let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert_eq!(
            read_frame(&mut &huge[..], "p").unwrap_err().to_string(),
            format!("frame of {} bytes refused (limit {MAX_FRAME})", MAX_FRAME + 1)
        );
        assert!(read_frame(&mut &[0u8, 0, 0, 0][..], "p").is_err());
    }

    #[test]
    fn requests_name_their_vnic() {
        assert_eq!(split_request(b"\x03a.0blob"), Ok(("a.0", &b"blob"[..])));
        assert!(split_request(b"").is_err());
        assert!(split_request(b"\x00blob").is_err());
        assert!(split_request(b"\x09a.0").is_err());
        assert!(split_request(b"\x02\xff\xfe").is_err());
    }

    mod channel {
        use super::super::*;
        use palisade_datapath::transfer::Transfer;
        use rcgen::{
            BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        };
        use std::sync::Mutex;

        /// What a destination was handed: vNIC, source, connections, bytes, BLAKE3.
        type Got = (String, String, usize, u64, String);

        /// A destination's engines, reduced to what arrives.
        #[derive(Default)]
        struct Sink {
            arrivals: Mutex<Vec<Got>>,
            /// Inspection sections: vNIC, source, bytes.
            sections: Mutex<Vec<(String, String, usize)>>,
        }

        impl Control for Sink {
            fn export_vnic(&self, _: &str, _: Option<&str>) -> Result<Vec<u8>, ControlError> {
                unreachable!()
            }
            fn import_vnic(&self, _: &str, _: &[u8], _: Option<&str>) -> Result<usize, ControlError> {
                unreachable!()
            }
            fn resume_vnic(&self, _: &str, _: Option<&str>) -> Result<(), ControlError> {
                unreachable!()
            }
            fn release_vnic(&self, _: &str, _: Option<&str>) -> Result<usize, ControlError> {
                unreachable!()
            }
            fn import_inspection(&self, vnic: &str, blob: &[u8], peer: Option<&str>) -> Result<usize, ControlError> {
                if vnic == "full.0" {
                    return Err(ControlError::Refused("inspection section checksum mismatch".into()));
                }
                let peer = peer.unwrap_or_default().to_string();
                self.sections.lock().unwrap().push((vnic.into(), peer, blob.len()));
                Ok(3)
            }
            fn import_arrival(&self, a: Arrival) -> Result<usize, ControlError> {
                if a.vnic == "full.0" {
                    return Err(ControlError::Refused("no room for 9 connections (0 free)".into()));
                }
                let n = a.snapshot.conns.len();
                self.arrivals
                    .lock()
                    .unwrap()
                    .push((a.vnic, a.peer, n, a.bytes, a.blake3));
                Ok(n)
            }
            /// hv2's inventory: `moved.0`'s VM is on hv3, `home.0`'s runs
            /// here, every other on hv1.
            fn check_source(&self, vnic: &str, from: &str) -> Result<(), ControlError> {
                let placed = match vnic {
                    "moved.0" => "hv3",
                    "home.0" => "hv2",
                    _ => "hv1",
                };
                check_source(vnic, from, "hv2", Some(placed), false).map_err(ControlError::Refused)
            }
        }

        /// A CA named `ca` in `dir` and certificates for `hosts` (client and server).
        fn pki(dir: &Path, ca: &str, hosts: &[&str]) {
            let ca_key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, format!("{ca} CA"));
            p.distinguished_name = dn;
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca_cert = p.self_signed(&ca_key).unwrap();
            std::fs::write(dir.join(format!("{ca}.pem")), ca_cert.pem()).unwrap();
            for h in hosts {
                let mut p = CertificateParams::new(vec![h.to_string()]).unwrap();
                let mut dn = DistinguishedName::new();
                dn.push(DnType::CommonName, *h);
                p.distinguished_name = dn;
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
                let key = KeyPair::generate().unwrap();
                let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();
                std::fs::write(dir.join(format!("{ca}-{h}.pem")), cert.pem()).unwrap();
                std::fs::write(dir.join(format!("{ca}-{h}.key")), key.serialize_pem()).unwrap();
            }
        }

        /// Host `host`'s settings with the certificate `ca` issued to `cert_of`.
        fn tls(dir: &Path, ca: &str, host: &str, cert_of: &str) -> Arc<PeerTls> {
            let f = |s: String| dir.join(s);
            Arc::new(
                PeerTls::load(
                    host,
                    &f(format!("{ca}.pem")),
                    &f(format!("{ca}-{cert_of}.pem")),
                    &f(format!("{ca}-{cert_of}.key")),
                )
                .unwrap(),
            )
        }

        struct Lab {
            dir: tempfile::TempDir,
            addr: String,
            sink: Arc<Sink>,
            stop: Arc<AtomicBool>,
            thread: Option<std::thread::JoinHandle<()>>,
        }

        impl Drop for Lab {
            fn drop(&mut self) {
                self.stop.store(true, Ordering::Relaxed);
                if let Some(t) = self.thread.take() {
                    t.join().unwrap();
                }
            }
        }

        /// hv2's listener with the certificate `ca` issued to `cert_of`.
        fn lab(ca: &str, cert_of: &str) -> Lab {
            let dir = tempfile::tempdir().unwrap();
            pki(dir.path(), "good", &["hv1", "hv2", "hv3"]);
            pki(dir.path(), "other", &["hv1", "hv2"]);
            let sink = Arc::new(Sink::default());
            let stop = Arc::new(AtomicBool::new(false));
            let (addr, thread) = listen(
                "127.0.0.1:0",
                tls(dir.path(), ca, "hv2", cert_of),
                sink.clone(),
                stop.clone(),
                Duration::from_secs(10),
            )
            .unwrap();
            Lab {
                dir,
                addr: addr.to_string(),
                sink,
                stop,
                thread: Some(thread),
            }
        }

        fn blob(vnic: &str, full: bool) -> Vec<u8> {
            transfer::encode(&Transfer {
                vnic: vnic.into(),
                policy_version: 3,
                full,
                conns: Vec::new(),
                removed: Vec::new(),
            })
        }

        const T: Duration = Duration::from_secs(10);

        #[test]
        fn a_precopy_and_its_delta_move_between_the_hosts_the_certificates_name() {
            let l = lab("good", "hv2");
            let mut s = Session::connect(&tls(l.dir.path(), "good", "hv1", "hv1"), "hv2", &l.addr, T).unwrap();
            let (pre, delta) = (blob("a.0", true), blob("a.0", false));
            assert_eq!(s.stage("a.0", &pre).unwrap(), 0);
            assert_eq!(s.commit("a.0", &delta).unwrap(), 0);
            let got = l.sink.arrivals.lock().unwrap().clone();
            let bytes = (pre.len() + delta.len()) as u64;
            let staged = (pre.len() as u64, blake3::hash(&pre).to_hex().to_string());
            assert_eq!(
                got,
                [
                    ("a.0".to_string(), "hv1".to_string(), 0, staged.0, staged.1),
                    ("a.0".to_string(), "hv1".to_string(), 0, bytes, s.blake3())
                ]
            );
            assert_eq!(s.bytes(), bytes);
            // The destination's refusal reaches the source with its reason.
            let e = s.commit("full.0", &blob("full.0", true)).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("hv2 ({}) refused: no room for 9 connections (0 free)", l.addr)
            );
        }

        #[test]
        fn an_inspection_section_goes_to_the_destination_and_its_refusal_comes_back() {
            let l = lab("good", "hv2");
            let mut s = Session::connect(&tls(l.dir.path(), "good", "hv1", "hv1"), "hv2", &l.addr, T).unwrap();
            let (pre, delta) = (blob("a.0", true), blob("a.0", false));
            assert_eq!(s.stage("a.0", &pre).unwrap(), 0);
            assert_eq!(s.inspect("a.0", b"section").unwrap(), 3);
            assert_eq!(s.commit("a.0", &delta).unwrap(), 0);
            assert_eq!(
                *l.sink.sections.lock().unwrap(),
                [("a.0".to_string(), "hv1".to_string(), 7)]
            );
            assert_eq!(
                s.bytes(),
                (pre.len() + 7 + delta.len()) as u64,
                "the section is in the transfer's size and hash"
            );
            let e = s.inspect("full.0", b"section").unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("hv2 ({}) refused: inspection section checksum mismatch", l.addr)
            );
        }

        fn refused(l: &Lab, client: Arc<PeerTls>, to: &str) -> String {
            match Session::connect(&client, to, &l.addr, T) {
                Ok(mut s) => s.stage("a.0", &blob("a.0", true)).unwrap_err().to_string(),
                Err(e) => e.to_string(),
            }
        }

        /// A host of the CA that is not where the VM runs cannot push
        /// state into it: not the pre-copy, not a full commit without one,
        /// not into a VM that runs on the destination; the VM's own host can.
        #[test]
        fn state_is_taken_only_from_the_vms_current_host() {
            let l = lab("good", "hv2");
            let d = l.dir.path();
            let mut hv3 = Session::connect(&tls(d, "good", "hv3", "hv3"), "hv2", &l.addr, T).unwrap();
            let e = hv3.stage("a.0", &blob("a.0", true)).unwrap_err().to_string();
            assert!(
                e.ends_with("refused: vNIC \"a.0\" is placed on hv1, not hv3: its state is taken from hv1 only"),
                "{e}"
            );
            let e = hv3.commit("a.0", &blob("a.0", true)).unwrap_err().to_string();
            assert!(e.contains("is placed on hv1, not hv3"), "{e}");
            let e = hv3.commit("home.0", &blob("home.0", true)).unwrap_err().to_string();
            assert!(
                e.ends_with("refused: vNIC \"home.0\" runs on this host (hv2): its state is not taken from hv3"),
                "{e}"
            );
            assert!(l.sink.arrivals.lock().unwrap().is_empty(), "nothing applied");
            // The session goes on: hv3 is where moved.0's VM is.
            assert_eq!(hv3.stage("moved.0", &blob("moved.0", true)).unwrap(), 0);
            assert_eq!(hv3.commit("moved.0", &blob("moved.0", false)).unwrap(), 0);
            let mut hv1 = Session::connect(&tls(d, "good", "hv1", "hv1"), "hv2", &l.addr, T).unwrap();
            assert!(hv1.stage("moved.0", &blob("moved.0", true)).is_err());
            assert_eq!(hv1.stage("a.0", &blob("a.0", true)).unwrap(), 0);
            assert_eq!(l.sink.arrivals.lock().unwrap().len(), 3);
        }

        #[test]
        fn certificates_of_another_ca_or_host_are_refused() {
            let l = lab("good", "hv2");
            let d = l.dir.path();
            // A client certificate of another CA: the destination ends the handshake.
            let e = refused(&l, tls(d, "other", "hv1", "hv1"), "hv2");
            assert!(e.starts_with(&format!("hv2 ({}): ", l.addr)), "{e}");
            // A certificate of the CA, but another host's than the one it claims to be.
            let e = refused(&l, tls(d, "good", "hv1", "hv3"), "hv2");
            assert_eq!(
                e,
                format!("hv2 ({}) refused: the client certificate is not host \"hv1\"'s", l.addr)
            );
            // The destination itself.
            let e = refused(&l, tls(d, "good", "hv2", "hv2"), "hv2");
            assert_eq!(
                e,
                format!("hv2 ({}) refused: a migration from \"hv2\" to itself", l.addr)
            );
            // The source expects hv3 there, the listener is hv2.
            let e = refused(&l, tls(d, "good", "hv1", "hv1"), "hv3");
            assert!(
                e.contains("invalid peer certificate: certificate not valid for name \"hv3\""),
                "{e}"
            );
            assert!(l.sink.arrivals.lock().unwrap().is_empty());
        }

        #[test]
        fn a_listener_of_another_ca_is_refused_by_the_source() {
            let l = lab("other", "hv2");
            let e = refused(&l, tls(l.dir.path(), "good", "hv1", "hv1"), "hv2");
            assert!(
                e.contains("invalid peer certificate") && e.contains("UnknownIssuer"),
                "{e}"
            );
        }

        #[test]
        fn oversized_frames_and_cut_or_corrupt_blobs_are_refused() {
            let l = lab("good", "hv2");
            let client = tls(l.dir.path(), "good", "hv1", "hv1");
            let mut s = Session::connect(&client, "hv2", &l.addr, T).unwrap();
            let pre = blob("a.0", true);
            let e = s.commit("a.0", &pre[..pre.len() - 1]).unwrap_err().to_string();
            assert!(e.contains("refused: state blob checksum mismatch: expected 0x"), "{e}");
            let mut bad = pre.clone();
            bad[0] = b'X';
            let e = s.stage("a.0", &bad).unwrap_err().to_string();
            assert!(
                e.ends_with("refused: not a Palisade connection-state blob (bad magic)"),
                "{e}"
            );
            // A frame over the limit: answered, and the session ended.
            let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
            s.stream.write_all(&huge).unwrap();
            s.stream.flush().unwrap();
            let (kind, body) = read_frame(&mut s.stream, "hv2").unwrap().unwrap();
            assert_eq!(kind, ERR);
            assert_eq!(
                String::from_utf8(body).unwrap(),
                format!("frame of {} bytes refused (limit {MAX_FRAME})", MAX_FRAME + 1)
            );
            assert!(s.stage("a.0", &pre).is_err());
            // A session cut mid-frame leaves nothing behind, and the listener serves the next.
            let mut cut = Session::connect(&client, "hv2", &l.addr, T).unwrap();
            write_frame(&mut cut.stream, STAGE, &[&[3], b"a.0"]).unwrap();
            cut.stream.write_all(&[0, 0, 1, 0, STAGE, 3]).unwrap();
            cut.stream.flush().unwrap();
            drop(cut);
            let mut next = Session::connect(&client, "hv2", &l.addr, T).unwrap();
            assert_eq!(next.commit("b.0", &blob("b.0", true)).unwrap(), 0);
            let got = l.sink.arrivals.lock().unwrap().clone();
            assert_eq!(got.iter().map(|a| a.0.as_str()).collect::<Vec<_>>(), ["b.0"]);
        }

        /// A source host's agent: hands out fixed pre-copy and delta blobs,
        /// records what it is asked.
        struct Source {
            tls: Arc<PeerTls>,
            calls: Mutex<Vec<String>>,
        }

        impl Control for Source {
            fn export_vnic(&self, _: &str, _: Option<&str>) -> Result<Vec<u8>, ControlError> {
                unreachable!("the handover exports pre-copy and delta")
            }
            fn import_vnic(&self, _: &str, _: &[u8], _: Option<&str>) -> Result<usize, ControlError> {
                unreachable!()
            }
            fn resume_vnic(&self, vnic: &str, _: Option<&str>) -> Result<(), ControlError> {
                self.calls.lock().unwrap().push(format!("resume {vnic}"));
                Ok(())
            }
            fn release_vnic(&self, _: &str, _: Option<&str>) -> Result<usize, ControlError> {
                unreachable!()
            }
            fn export_precopy(&self, vnic: &str, _: Option<&str>) -> Result<Vec<u8>, ControlError> {
                self.calls.lock().unwrap().push(format!("precopy {vnic}"));
                Ok(blob(vnic, true))
            }
            fn export_delta(&self, vnic: &str, _: Option<&str>) -> Result<Vec<u8>, ControlError> {
                self.calls.lock().unwrap().push(format!("delta {vnic}"));
                Ok(blob(vnic, false))
            }
            fn peer_tls(&self) -> Option<Arc<PeerTls>> {
                Some(self.tls.clone())
            }
        }

        /// A destination agent that stages the pre-copies and dies before the commit.
        fn dying_destination(tls: Arc<PeerTls>) -> (String, std::thread::JoinHandle<()>) {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let h = std::thread::spawn(move || {
                let (tcp, _) = listener.accept().unwrap();
                let conn = ServerConnection::new(tls.server.clone()).unwrap();
                let mut s = StreamOwned::new(conn, tcp);
                for expect in [HELLO, STAGE] {
                    let (kind, _) = read_frame(&mut s, "source").unwrap().unwrap();
                    assert_eq!(kind, expect);
                    write_frame(&mut s, OK, &[&0u64.to_be_bytes()]).unwrap();
                }
                // The commit arrives; the agent is gone before it answers.
                let _ = read_frame(&mut s, "source");
            });
            (addr, h)
        }

        #[test]
        fn a_destination_dying_mid_transfer_fails_the_switchover_and_the_source_resumes() {
            let dir = tempfile::tempdir().unwrap();
            pki(dir.path(), "good", &["hv1", "hv2"]);
            let (addr, dest) = dying_destination(tls(dir.path(), "good", "hv2", "hv2"));
            let source = Source {
                tls: tls(dir.path(), "good", "hv1", "hv1"),
                calls: Mutex::new(Vec::new()),
            };
            let config = crate::config::MigrationConfig {
                driver: Default::default(),
                libvirt: None,
                qmp: "q".into(),
                incoming: "i".into(),
                peer_control: "p".into(),
                timeout_s: Some(5),
                poll_ms: None,
                listen: None,
                peers: [("hv2".to_string(), addr)].into_iter().collect(),
            };
            let exported = std::cell::RefCell::new(Vec::new());
            {
                let vnics = ["a.0".to_string()];
                let mut h = crate::migrate::Handover::start("hv2", &vnics, &config, &source)
                    .unwrap()
                    .expect("the destination is a configured peer");
                let e = h.switchover("hv2", &exported).unwrap_err();
                assert!(e.starts_with("destination agent import: hv2 ("), "{e}");
                // What orders::carry_out does on a failed switchover.
                for n in exported.borrow().iter() {
                    source.resume_vnic(n, Some("hv2")).unwrap();
                }
            }
            dest.join().unwrap();
            // Resumed once: the handover leaves the exported vNIC to its caller.
            assert_eq!(
                *source.calls.lock().unwrap(),
                ["precopy a.0", "delta a.0", "resume a.0"]
            );
            // A pre-copy that never reached its switchover ends its change keeping.
            let (addr, dest) = dying_destination(tls(dir.path(), "good", "hv2", "hv2"));
            let config = crate::config::MigrationConfig {
                peers: [("hv2".to_string(), addr)].into_iter().collect(),
                ..config
            };
            source.calls.lock().unwrap().clear();
            drop(crate::migrate::Handover::start("hv2", &["a.0".to_string()], &config, &source).unwrap());
            dest.join().unwrap();
            assert_eq!(*source.calls.lock().unwrap(), ["precopy a.0", "resume a.0"]);
        }
    }
}
