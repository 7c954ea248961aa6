//! Application-layer protocols: detection by content, light parsers, and the
//! transactions whose buffers the rules inspect.
//!
//! Detection looks at the first bytes of each direction, not at ports
//! (except DNS, which has no signature of its own): an HTTP method followed
//! by a space, `HTTP/` in a response, a TLS handshake record header, a
//! well-formed DNS message on port 53. A flow picked up in the middle
//! (midstream) whose first client bytes look like an HTTP response was seen
//! from the wrong end: detection says so and the
//! flow swaps its idea of client and server, as Suricata does.

pub mod dns;
pub mod hpack;
pub mod http;
pub mod http2;
pub mod tls;

use crate::rules::{AppProto, Buffer};

/// Bytes held while a direction's protocol is undecided.
const PROBE_MAX: usize = 64;

/// What detection concluded for a direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Detected {
    /// The protocol is known now.
    Proto(AppProto),
    /// Known, and the flow's client and server are the other way round.
    Reversed(AppProto),
    /// Still undecided.
    Pending,
    /// Not a protocol the engine parses.
    None,
}

#[derive(Debug, Default)]
pub(crate) struct Probe {
    pub(crate) held: Vec<u8>,
    pub(crate) failed: bool,
}

/// The application layer of one flow.
#[derive(Debug)]
pub(crate) enum AppState {
    /// Undecided; per direction (to server, to client).
    Probing([Probe; 2]),
    /// HTTP/1.x.
    Http(Box<http::HttpParser>),
    /// HTTP/2 with prior knowledge.
    Http2(Box<http2::Http2Parser>),
    /// TLS.
    Tls(Box<tls::TlsParser>),
    /// DNS.
    Dns(Box<dns::DnsParser>),
    /// Nothing the engine parses.
    Unknown,
}

impl Default for AppState {
    fn default() -> Self {
        AppState::Probing(Default::default())
    }
}

impl AppState {
    /// The protocol, once detected.
    pub fn proto(&self) -> Option<AppProto> {
        match self {
            AppState::Http(_) | AppState::Http2(_) => Some(AppProto::Http),
            AppState::Tls(_) => Some(AppProto::Tls),
            AppState::Dns(_) => Some(AppProto::Dns),
            _ => None,
        }
    }

    /// The protocol's name as EVE's `app_proto` gives it.
    pub fn name(&self) -> Option<&'static str> {
        match self {
            AppState::Http2(_) => Some("http2"),
            _ => self.proto().map(AppProto::as_str),
        }
    }

    /// Whether detection is still running.
    pub fn probing(&self) -> bool {
        matches!(self, AppState::Probing(_))
    }

    /// Feeds reassembled TCP bytes of one direction. `dns_port`: either port is 53.
    pub fn feed_tcp(&mut self, to_server: bool, data: &[u8], dns_port: bool, midstream: bool) -> Detected {
        if data.is_empty() {
            return Detected::Pending;
        }
        if let AppState::Probing(probes) = self {
            let i = usize::from(!to_server);
            if probes[i].failed {
                return Detected::Pending;
            }
            let mut held = std::mem::take(&mut probes[i].held);
            held.extend_from_slice(&data[..data.len().min(PROBE_MAX)]);
            let verdict = probe_tcp(to_server, &held, dns_port, midstream);
            match verdict {
                Detected::Pending if held.len() < PROBE_MAX => {
                    probes[i].held = held;
                    return Detected::Pending;
                }
                Detected::Pending | Detected::None => {
                    probes[i].failed = true;
                    if probes.iter().all(|p| p.failed) {
                        *self = AppState::Unknown;
                        return Detected::None;
                    }
                    return Detected::Pending;
                }
                Detected::Proto(p) | Detected::Reversed(p) => {
                    let earlier = held.len().saturating_sub(data.len().min(PROBE_MAX));
                    *self = match p {
                        AppProto::Http if http2::looks_like_preface(&held) == Some(true) => {
                            AppState::Http2(Box::default())
                        }
                        AppProto::Http => AppState::Http(Box::default()),
                        AppProto::Tls => AppState::Tls(Box::default()),
                        AppProto::Dns => AppState::Dns(Box::default()),
                    };
                    let to_server = if matches!(verdict, Detected::Reversed(_)) {
                        !to_server
                    } else {
                        to_server
                    };
                    // Bytes held from earlier chunks, then this chunk.
                    self.parse_tcp(to_server, &held[..earlier]);
                    self.parse_tcp(to_server, data);
                    return verdict;
                }
            }
        }
        self.parse_tcp(to_server, data);
        Detected::Pending
    }

    fn parse_tcp(&mut self, to_server: bool, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        match self {
            AppState::Http(h) => {
                if to_server {
                    h.parse_request(data)
                } else {
                    h.parse_response(data)
                }
            }
            AppState::Http2(h) => h.parse(to_server, data),
            AppState::Tls(t) if to_server => t.parse_client(data),
            AppState::Dns(d) => d.parse_stream(to_server, data),
            _ => {}
        }
    }

    /// A direction of a TCP flow closed (FIN or RST, or the flow ended).
    pub fn closed(&mut self, to_server: bool) {
        if let AppState::Http(h) = self {
            if to_server {
                h.request_closed()
            } else {
                h.response_closed()
            }
        }
    }

    /// Feeds one UDP datagram.
    pub fn feed_udp(&mut self, to_server: bool, data: &[u8], dns_port: bool) -> Detected {
        let _ = to_server;
        let mut verdict = Detected::Pending;
        if self.probing() {
            if dns_port && dns::plausible(data) {
                *self = AppState::Dns(Box::default());
                verdict = Detected::Proto(AppProto::Dns);
            } else {
                *self = AppState::Unknown;
                return Detected::None;
            }
        }
        if let AppState::Dns(d) = self {
            d.parse_datagram(data);
        }
        verdict
    }

    /// Whether any transaction changed since detection last looked.
    pub fn has_updates(&self) -> bool {
        match self {
            AppState::Http(h) => h.txs().iter().any(|t| t.updated),
            AppState::Http2(h) => h.txs().any(|t| t.updated),
            AppState::Tls(t) => t.updated,
            AppState::Dns(d) => d.txs().iter().any(|t| t.updated),
            _ => false,
        }
    }

    /// Calls `f` for every transaction that changed (every live one when
    /// `last`, the flow ending), then marks it seen and drops finished ones.
    /// `f`'s flag says the transaction is ready for its log record, once: an
    /// HTTP exchange when its response completed (or the flow ended), a DNS
    /// query when answered (or the flow ended), the TLS ClientHello.
    pub fn drain_updates(&mut self, last: bool, mut f: impl FnMut(&TxView<'_>, bool)) {
        match self {
            AppState::Http(h) => {
                for tx in h.txs_mut().iter_mut().filter(|t| t.updated || (last && !t.logged)) {
                    let log = !tx.logged && (tx.response == http::Progress::Complete || last);
                    tx.logged |= log;
                    f(&TxView::Http(tx), log);
                    tx.updated = false;
                }
                h.prune();
            }
            AppState::Http2(h) => {
                for tx in h.txs_mut().filter(|t| t.updated || (last && !t.logged)) {
                    let log = !tx.logged && (tx.response == http::Progress::Complete || last);
                    tx.logged |= log;
                    f(&TxView::Http(tx), log);
                    tx.updated = false;
                }
                h.prune();
            }
            AppState::Tls(t) if t.updated || (last && t.client_hello && !t.logged) => {
                let log = !t.logged && t.client_hello;
                t.logged |= log;
                f(&TxView::Tls(t), log);
                t.updated = false;
            }
            AppState::Dns(d) => {
                for tx in d.txs_mut().iter_mut().filter(|t| t.updated || (last && !t.logged)) {
                    let log = !tx.logged && (tx.answered || last);
                    tx.logged |= log;
                    f(&TxView::Dns(tx), log);
                    tx.updated = false;
                }
                d.prune();
            }
            _ => {}
        }
    }

    /// Whether any transaction awaits its log record (for the end of a flow).
    pub fn has_unlogged(&self) -> bool {
        match self {
            AppState::Http(h) => h.txs().iter().any(|t| !t.logged),
            AppState::Http2(h) => h.txs().any(|t| !t.logged),
            AppState::Tls(t) => t.client_hello && !t.logged,
            AppState::Dns(d) => d.txs().iter().any(|t| !t.logged),
            _ => false,
        }
    }
}

/// An application-layer transaction's record, for EVE's `http`, `tls` and `dns` events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppRecord {
    /// An HTTP exchange.
    Http {
        /// Request method.
        method: Vec<u8>,
        /// Request URI as sent.
        url: Vec<u8>,
        /// Normalized host.
        hostname: Option<Vec<u8>>,
        /// User-Agent.
        user_agent: Option<Vec<u8>>,
        /// Request protocol.
        protocol: Vec<u8>,
        /// Status code.
        status: Option<Vec<u8>>,
        /// Response body length.
        length: u64,
        /// HTTP/2.
        http2: bool,
    },
    /// A TLS ClientHello.
    Tls {
        /// Server name.
        sni: Option<Vec<u8>>,
        /// Legacy version field.
        version: u16,
    },
    /// A DNS query (and its answer's code, if seen).
    Dns {
        /// Message id.
        id: u16,
        /// Question names and types.
        queries: Vec<(Vec<u8>, u16)>,
        /// Response code of the answer.
        rcode: Option<u8>,
        /// The query itself was seen (not only its answer).
        query_seen: bool,
    },
}

impl AppRecord {
    pub(crate) fn of(tx: &TxView<'_>, http2: bool) -> AppRecord {
        match tx {
            TxView::Http(t) => AppRecord::Http {
                method: t.method.clone(),
                url: t.uri_raw.clone(),
                hostname: t.host.clone(),
                user_agent: t.user_agent.clone(),
                protocol: t.protocol.clone(),
                status: t.status.clone(),
                length: t.response_length,
                http2,
            },
            TxView::Tls(t) => AppRecord::Tls {
                sni: t.sni.clone(),
                version: t.version.unwrap_or(0),
            },
            TxView::Dns(t) => AppRecord::Dns {
                id: t.dns_id,
                queries: t.queries.iter().cloned().zip(t.types.iter().copied()).collect(),
                rcode: t.rcode,
                query_seen: !t.response_only,
            },
        }
    }
}

fn probe_tcp(to_server: bool, data: &[u8], dns_port: bool, midstream: bool) -> Detected {
    let mut undecided = false;
    if to_server {
        match http2::looks_like_preface(data) {
            Some(true) => return Detected::Proto(AppProto::Http),
            None => undecided = true,
            Some(false) => {}
        }
        match http::looks_like_request(data) {
            Some(true) => return Detected::Proto(AppProto::Http),
            None => undecided = true,
            Some(false) => {}
        }
    }
    match http::looks_like_response(data) {
        Some(true) if !to_server => return Detected::Proto(AppProto::Http),
        Some(true) if midstream => return Detected::Reversed(AppProto::Http),
        None => undecided = true,
        _ => {}
    }
    match tls::looks_like_tls(data) {
        Some(true) => return Detected::Proto(AppProto::Tls),
        None => undecided = true,
        Some(false) => {}
    }
    if dns_port {
        if data.len() < 14 {
            undecided = true;
        } else {
            let len = usize::from(u16::from_be_bytes([data[0], data[1]]));
            let msg = &data[2..data.len().min(2 + len)];
            if len >= 12 && (dns::plausible(msg) || msg.len() < len && msg.len() >= 12) {
                return Detected::Proto(AppProto::Dns);
            }
        }
    }
    if undecided { Detected::Pending } else { Detected::None }
}

/// Whether a buffer of a transaction is there.
#[derive(Debug, Clone, Copy)]
pub(crate) enum BufState<'a> {
    /// Not yet: the message has not got that far.
    Pending,
    /// Will not come (the header was not sent, the message ended).
    Absent,
    /// One buffer.
    One(&'a [u8]),
    /// Several (DNS questions): a rule matches if it matches any.
    Many(&'a [Vec<u8>]),
}

/// A transaction, as detection sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum TxView<'a> {
    Http(&'a http::HttpTx),
    Tls(&'a tls::TlsParser),
    Dns(&'a dns::DnsTx),
}

impl<'a> TxView<'a> {
    /// The transaction's protocol.
    pub fn proto(&self) -> AppProto {
        match self {
            TxView::Http(_) => AppProto::Http,
            TxView::Tls(_) => AppProto::Tls,
            TxView::Dns(_) => AppProto::Dns,
        }
    }

    /// The transaction's number in its flow.
    pub fn id(&self) -> u64 {
        match self {
            TxView::Http(t) => t.id,
            TxView::Tls(_) => 0,
            TxView::Dns(t) => t.id,
        }
    }

    /// A buffer; `to_client` picks the response's header block for `http.header`.
    pub fn buffer(&self, buffer: Buffer, to_client: bool) -> BufState<'a> {
        use http::Progress as P;
        match (self, buffer) {
            (TxView::Http(t), Buffer::HttpUri) => match t.request {
                P::None => BufState::Absent,
                _ => BufState::One(&t.uri),
            },
            (TxView::Http(t), Buffer::HttpMethod) => match t.request {
                P::None => BufState::Absent,
                _ => BufState::One(&t.method),
            },
            (TxView::Http(t), Buffer::HttpHost | Buffer::HttpUserAgent) => match t.request {
                P::None => BufState::Absent,
                P::Line => BufState::Pending,
                _ => {
                    let v = if buffer == Buffer::HttpHost {
                        &t.host
                    } else {
                        &t.user_agent
                    };
                    v.as_deref().map_or(BufState::Absent, BufState::One)
                }
            },
            (TxView::Http(t), Buffer::HttpHeader) if !to_client => match t.request {
                P::None => BufState::Absent,
                P::Line => BufState::Pending,
                _ => BufState::One(&t.request_header_block),
            },
            (TxView::Http(t), Buffer::HttpHeader) => match t.response {
                P::None | P::Line => BufState::Pending,
                _ => BufState::One(&t.response_header_block),
            },
            (TxView::Http(t), Buffer::HttpStatCode) => match &t.status {
                Some(s) => BufState::One(s),
                None => BufState::Pending,
            },
            (TxView::Tls(t), Buffer::TlsSni) => match &t.sni {
                Some(s) if t.client_hello => BufState::One(s),
                _ => BufState::Absent,
            },
            (TxView::Dns(t), Buffer::DnsQuery) if !t.response_only => BufState::Many(&t.queries),
            _ => BufState::Absent,
        }
    }
}
