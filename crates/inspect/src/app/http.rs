//! HTTP/1.x, light: request and status lines, headers, and enough of the
//! body framing (Content-Length, chunked, until close) to find the next
//! message.
//!
//! The parser is fed each direction's reassembled bytes as they become
//! available and builds transactions: a request and its response. A
//! transaction's buffers appear as its messages progress: the method and
//! URI with the request line, the host, user agent and header block with
//! the end of the request headers, the status code with the status line.
//! Lines end in CRLF or a bare LF. The URI buffer is normalized as
//! Suricata's is: percent-decoding of path and query, dot segments removed;
//! the host is lowercased and loses its port, and comes from an absolute URI
//! or a CONNECT authority before the Host header.
//!
//! Bounds: a line longer than `MAX_LINE` or a header block larger than
//! `MAX_HEADERS` ends parsing of that direction (counted as an error, the
//! flow's data is still inspected as a stream); at most `MAX_TXS`
//! transactions are kept (the oldest finished ones go first).

use std::collections::VecDeque;

use crate::persist::{Reader, Result as PersistResult, bound, put_bytes, put_opt_bytes, put_u32, put_u64};

/// Longest request, status or header line.
pub const MAX_LINE: usize = 16 * 1024;
/// Largest header block of one message.
pub const MAX_HEADERS: usize = 64 * 1024;
/// Live transactions kept per flow.
pub const MAX_TXS: usize = 32;

const METHODS: &[&[u8]] = &[
    b"GET",
    b"POST",
    b"HEAD",
    b"PUT",
    b"DELETE",
    b"OPTIONS",
    b"CONNECT",
    b"TRACE",
    b"PATCH",
    b"PROPFIND",
    b"PROPPATCH",
    b"MKCOL",
    b"COPY",
    b"MOVE",
    b"LOCK",
    b"UNLOCK",
    b"SEARCH",
    b"REPORT",
    b"CHECKOUT",
    b"MERGE",
    b"NOTIFY",
    b"SUBSCRIBE",
    b"UNSUBSCRIBE",
    b"ACL",
    b"MKACTIVITY",
    b"VERSION-CONTROL",
    b"BASELINE-CONTROL",
    b"UPDATE",
    b"LABEL",
    b"MKWORKSPACE",
    b"ORDERPATCH",
    b"POLL",
    b"BMOVE",
    b"BCOPY",
    b"BDELETE",
    b"BPROPPATCH",
    b"BPROPFIND",
];

/// Whether `data` starts like an HTTP request: `Some(true)` yes, `Some(false)`
/// no, `None` too short to tell.
pub fn looks_like_request(data: &[u8]) -> Option<bool> {
    for m in METHODS {
        let need = m.len() + 1;
        let n = data.len().min(need);
        if data[..n] == [*m, b" ".as_slice()].concat()[..n] {
            if data.len() < need {
                return None;
            }
            return Some(true);
        }
    }
    Some(false)
}

/// Whether `data` starts like an HTTP response.
pub fn looks_like_response(data: &[u8]) -> Option<bool> {
    let sig = b"HTTP/";
    let n = data.len().min(sig.len());
    if data[..n] != sig[..n] {
        return Some(false);
    }
    if data.len() < sig.len() { None } else { Some(true) }
}

/// How far a message has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Progress {
    /// Nothing yet.
    #[default]
    None,
    /// The request or status line.
    Line,
    /// The headers (complete).
    Headers,
    /// The body, or the message is complete.
    Complete,
}

/// One request/response exchange.
#[derive(Debug, Clone, Default)]
pub struct HttpTx {
    /// Transaction number within the flow.
    pub id: u64,
    /// Request method.
    pub method: Vec<u8>,
    /// Request URI as sent.
    pub uri_raw: Vec<u8>,
    /// Normalized URI (the `http.uri` buffer).
    pub uri: Vec<u8>,
    /// Request protocol (`HTTP/1.1`), empty for HTTP/0.9.
    pub protocol: Vec<u8>,
    /// Normalized host, when known.
    pub host: Option<Vec<u8>>,
    /// User-Agent value, when sent.
    pub user_agent: Option<Vec<u8>>,
    /// Request header lines as `Name: value\r\n`, Cookie left out.
    pub request_header_block: Vec<u8>,
    /// Status code (three digits).
    pub status: Option<Vec<u8>>,
    /// Response header lines as `Name: value\r\n`, Set-Cookie left out.
    pub response_header_block: Vec<u8>,
    /// Response body length announced or seen.
    pub response_length: u64,
    /// Request progress.
    pub request: Progress,
    /// Response progress.
    pub response: Progress,
    /// Progress changed since detection last looked.
    pub updated: bool,
    /// Its EVE record was produced.
    pub logged: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    None,
    Length(u64),
    Chunked(ChunkState),
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Line,
    Headers,
    Body(Body),
    /// Parsing stopped (error, tunnel, limits).
    Stopped,
}

#[derive(Debug)]
struct Side {
    state: State,
    line: Vec<u8>,
    header_bytes: usize,
    /// Raw headers of the message being parsed.
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// Index into txs of the message being parsed.
    current: Option<u64>,
}

impl Side {
    fn new() -> Self {
        Side {
            state: State::Line,
            line: Vec::new(),
            header_bytes: 0,
            headers: Vec::new(),
            current: None,
        }
    }
}

/// Parser errors and limits hit, for counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HttpCounters {
    /// Malformed request or status lines (parsing of that direction stopped).
    pub malformed: u64,
    /// Lines or header blocks over the limits.
    pub too_long: u64,
    /// Transactions dropped because too many were live.
    pub txs_evicted: u64,
}

/// The HTTP state of one flow.
#[derive(Debug)]
pub struct HttpParser {
    request: Side,
    response: Side,
    txs: VecDeque<HttpTx>,
    next_id: u64,
    /// Counters.
    pub counters: HttpCounters,
}

impl Default for HttpParser {
    fn default() -> Self {
        HttpParser {
            request: Side::new(),
            response: Side::new(),
            txs: VecDeque::new(),
            next_id: 0,
            counters: HttpCounters::default(),
        }
    }
}

impl HttpParser {
    /// A parser for a new flow.
    pub fn new() -> Self {
        Self::default()
    }

    /// The live transactions.
    pub fn txs(&self) -> &VecDeque<HttpTx> {
        &self.txs
    }

    /// The live transactions, mutable (detection clears `updated`).
    pub fn txs_mut(&mut self) -> &mut VecDeque<HttpTx> {
        &mut self.txs
    }

    /// Drops finished transactions detection has seen.
    pub fn prune(&mut self) {
        while let Some(tx) = self.txs.front() {
            let done =
                tx.request == Progress::Complete && tx.response == Progress::Complete && !tx.updated && tx.logged;
            if !done {
                break;
            }
            self.txs.pop_front();
        }
    }

    /// Whether both directions stopped parsing.
    pub fn stopped(&self) -> bool {
        self.request.state == State::Stopped && self.response.state == State::Stopped
    }

    fn tx_mut(&mut self, id: u64) -> Option<&mut HttpTx> {
        self.txs.iter_mut().find(|t| t.id == id)
    }

    fn new_tx(&mut self) -> u64 {
        if self.txs.len() >= MAX_TXS {
            self.txs.pop_front();
            self.counters.txs_evicted += 1;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.txs.push_back(HttpTx {
            id,
            updated: true,
            ..HttpTx::default()
        });
        id
    }

    /// Feeds client-to-server bytes.
    pub fn parse_request(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.request.state {
                State::Stopped => return,
                State::Body(body) => {
                    let (used, next) = consume_body(body, data, &mut self.request.line);
                    data = &data[used..];
                    match next {
                        Some(b) => self.request.state = State::Body(b),
                        None => self.finish_request(),
                    }
                }
                State::Line | State::Headers => {
                    let Some(line) = take_line(&mut self.request.line, &mut data) else {
                        if self.request.line.len() > MAX_LINE {
                            self.counters.too_long += 1;
                            self.request.state = State::Stopped;
                        }
                        return;
                    };
                    if self.request.state == State::Line {
                        self.request_line(&line);
                    } else {
                        self.request_header_line(&line);
                    }
                }
            }
        }
    }

    /// The peer closed its direction: a body delimited by the close ends.
    pub fn request_closed(&mut self) {
        if let State::Body(_) = self.request.state {
            self.finish_request();
        }
    }

    fn request_line(&mut self, line: &[u8]) {
        if line.is_empty() {
            // Leading empty lines between requests are tolerated.
            return;
        }
        let mut parts = line.split(|&b| b == b' ').filter(|p| !p.is_empty());
        let (Some(method), Some(uri)) = (parts.next(), parts.next()) else {
            self.counters.malformed += 1;
            self.request.state = State::Stopped;
            return;
        };
        if !method
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        {
            self.counters.malformed += 1;
            self.request.state = State::Stopped;
            return;
        }
        let protocol = parts.next().unwrap_or(b"").to_vec();
        // A response that never came leaves its tx waiting; a new request gets a new tx.
        let id = self.new_tx();
        let (normalized, uri_host) = normalize_uri(uri, method == b"CONNECT");
        let tx = self.tx_mut(id).expect("just created");
        tx.method = method.to_vec();
        tx.uri_raw = uri.to_vec();
        tx.uri = normalized;
        tx.host = uri_host;
        tx.protocol = protocol.clone();
        tx.request = Progress::Line;
        tx.updated = true;
        self.request.current = Some(id);
        self.request.headers.clear();
        self.request.header_bytes = 0;
        if protocol.is_empty() {
            // HTTP/0.9: no headers, no body.
            self.finish_request();
        } else {
            self.request.state = State::Headers;
        }
    }

    fn request_header_line(&mut self, line: &[u8]) {
        self.request.header_bytes += line.len() + 2;
        if self.request.header_bytes > MAX_HEADERS {
            self.counters.too_long += 1;
            self.request.state = State::Stopped;
            return;
        }
        if !line.is_empty() {
            push_header(&mut self.request.headers, line);
            return;
        }
        // End of headers.
        let headers = std::mem::take(&mut self.request.headers);
        let body = body_framing(&headers, true, false);
        if let Some(id) = self.request.current
            && let Some(tx) = self.tx_mut(id)
        {
            for (name, value) in &headers {
                if name.eq_ignore_ascii_case(b"host") && tx.host.is_none() {
                    tx.host = Some(normalize_host(value));
                }
                if name.eq_ignore_ascii_case(b"user-agent") && tx.user_agent.is_none() {
                    tx.user_agent = Some(value.clone());
                }
            }
            tx.request_header_block = header_block(&headers, b"cookie");
            tx.request = Progress::Headers;
            tx.updated = true;
        }
        match body {
            Body::None => self.finish_request(),
            b => self.request.state = State::Body(b),
        }
    }

    fn finish_request(&mut self) {
        if let Some(id) = self.request.current.take()
            && let Some(tx) = self.tx_mut(id)
        {
            tx.request = Progress::Complete;
            tx.updated = true;
        }
        self.request.state = State::Line;
    }

    /// Feeds server-to-client bytes.
    pub fn parse_response(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.response.state {
                State::Stopped => return,
                State::Body(body) => {
                    let before = data.len();
                    let (used, next) = consume_body(body, data, &mut self.response.line);
                    data = &data[used..];
                    if let Some(id) = self.response.current
                        && let Some(tx) = self.tx_mut(id)
                        && matches!(body, Body::UntilClose | Body::Chunked(_))
                    {
                        tx.response_length += (before - data.len()) as u64;
                    }
                    match next {
                        Some(b) => self.response.state = State::Body(b),
                        None => self.finish_response(),
                    }
                }
                State::Line | State::Headers => {
                    let Some(line) = take_line(&mut self.response.line, &mut data) else {
                        if self.response.line.len() > MAX_LINE {
                            self.counters.too_long += 1;
                            self.response.state = State::Stopped;
                        }
                        return;
                    };
                    if self.response.state == State::Line {
                        self.status_line(&line);
                    } else {
                        self.response_header_line(&line);
                    }
                }
            }
        }
    }

    /// The server closed its direction: a body delimited by the close ends.
    pub fn response_closed(&mut self) {
        if let State::Body(_) = self.response.state {
            self.finish_response();
        }
    }

    fn status_line(&mut self, line: &[u8]) {
        if line.is_empty() {
            return;
        }
        let mut parts = line.splitn(3, |&b| b == b' ');
        let proto = parts.next().unwrap_or(b"");
        let code = parts.next().unwrap_or(b"");
        if !proto.starts_with(b"HTTP/") || code.len() != 3 || !code.iter().all(u8::is_ascii_digit) {
            self.counters.malformed += 1;
            self.response.state = State::Stopped;
            return;
        }
        // The oldest request without a response; a response with no request gets its own tx.
        let id = match self.txs.iter().find(|t| t.response == Progress::None).map(|t| t.id) {
            Some(id) => id,
            None => self.new_tx(),
        };
        let tx = self.tx_mut(id).expect("exists");
        tx.status = Some(code.to_vec());
        tx.response = Progress::Line;
        tx.updated = true;
        self.response.current = Some(id);
        self.response.headers.clear();
        self.response.header_bytes = 0;
        self.response.state = State::Headers;
    }

    fn response_header_line(&mut self, line: &[u8]) {
        self.response.header_bytes += line.len() + 2;
        if self.response.header_bytes > MAX_HEADERS {
            self.counters.too_long += 1;
            self.response.state = State::Stopped;
            return;
        }
        if !line.is_empty() {
            push_header(&mut self.response.headers, line);
            return;
        }
        let headers = std::mem::take(&mut self.response.headers);
        let mut body = body_framing(&headers, false, false);
        let mut tunnel = false;
        if let Some(id) = self.response.current
            && let Some(tx) = self.tx_mut(id)
        {
            let code = tx.status.as_deref().unwrap_or(b"000");
            let no_body = code[0] == b'1' || code == b"204" || code == b"304" || tx.method == b"HEAD";
            if no_body {
                body = Body::None;
            }
            if let Body::Length(n) = body {
                tx.response_length = n;
            }
            // A successful CONNECT turns the connection into a tunnel.
            tunnel = tx.method == b"CONNECT" && code[0] == b'2';
            tx.response_header_block = header_block(&headers, b"set-cookie");
            tx.response = Progress::Headers;
            tx.updated = true;
        }
        match body {
            Body::None => self.finish_response(),
            b => self.response.state = State::Body(b),
        }
        if tunnel {
            self.request.state = State::Stopped;
            self.response.state = State::Stopped;
        }
    }

    fn finish_response(&mut self) {
        if let Some(id) = self.response.current.take()
            && let Some(tx) = self.tx_mut(id)
        {
            tx.response = Progress::Complete;
            tx.updated = true;
        }
        if self.response.state != State::Stopped {
            self.response.state = State::Line;
        }
    }
}

/// Takes one line (without its CRLF or LF) from `data`, buffering a partial line in `buf`.
fn take_line(buf: &mut Vec<u8>, data: &mut &[u8]) -> Option<Vec<u8>> {
    match memchr::memchr(b'\n', data) {
        Some(i) => {
            buf.extend_from_slice(&data[..i]);
            *data = &data[i + 1..];
            let mut line = std::mem::take(buf);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            Some(line)
        }
        None => {
            let room = (MAX_LINE + 1).saturating_sub(buf.len());
            buf.extend_from_slice(&data[..data.len().min(room)]);
            *data = &[];
            None
        }
    }
}

fn push_header(headers: &mut Vec<(Vec<u8>, Vec<u8>)>, line: &[u8]) {
    if matches!(line.first(), Some(b' ') | Some(b'\t')) {
        // Folded continuation of the previous header.
        if let Some((_, value)) = headers.last_mut() {
            value.push(b' ');
            value.extend_from_slice(trim(line));
        }
        return;
    }
    let Some(colon) = memchr::memchr(b':', line) else {
        // Not a header; ignored as libhtp does.
        return;
    };
    headers.push((trim(&line[..colon]).to_vec(), trim(&line[colon + 1..]).to_vec()));
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !matches!(c, b' ' | b'\t')).unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !matches!(c, b' ' | b'\t'))
        .map_or(start, |e| e + 1);
    &b[start..end.max(start)]
}

fn header_block(headers: &[(Vec<u8>, Vec<u8>)], skip: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        if name.eq_ignore_ascii_case(skip) {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn body_framing(headers: &[(Vec<u8>, Vec<u8>)], request: bool, _head: bool) -> Body {
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case(b"transfer-encoding") && v.to_ascii_lowercase().windows(7).any(|w| w == b"chunked")
    });
    if chunked {
        return Body::Chunked(ChunkState::Size);
    }
    let length = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(b"content-length"))
        .and_then(|(_, v)| std::str::from_utf8(v).ok()?.trim().parse::<u64>().ok());
    match (length, request) {
        (Some(0), _) => Body::None,
        (Some(n), _) => Body::Length(n),
        (None, true) => Body::None,
        (None, false) => Body::UntilClose,
    }
}

/// Consumes body bytes; returns how many were used and the next body state
/// (`None` when the body ended).
fn consume_body(body: Body, data: &[u8], line: &mut Vec<u8>) -> (usize, Option<Body>) {
    match body {
        Body::None => (0, None),
        Body::UntilClose => (data.len(), Some(Body::UntilClose)),
        Body::Length(n) => {
            let take = (n.min(data.len() as u64)) as usize;
            let left = n - take as u64;
            (take, (left > 0).then_some(Body::Length(left)))
        }
        Body::Chunked(state) => {
            let mut rest = data;
            let mut state = state;
            loop {
                if rest.is_empty() {
                    return (data.len(), Some(Body::Chunked(state)));
                }
                match state {
                    ChunkState::Size => {
                        let Some(l) = take_line(line, &mut rest) else {
                            return (data.len(), Some(Body::Chunked(state)));
                        };
                        let hex: Vec<u8> = l.iter().copied().take_while(u8::is_ascii_hexdigit).collect();
                        let size = std::str::from_utf8(&hex)
                            .ok()
                            .and_then(|s| u64::from_str_radix(s, 16).ok());
                        state = match size {
                            Some(0) => ChunkState::Trailer,
                            Some(n) => ChunkState::Data(n),
                            // A malformed chunk size: treat the rest as body until close.
                            None => return (data.len() - rest.len(), Some(Body::UntilClose)),
                        };
                    }
                    ChunkState::Data(n) => {
                        let take = n.min(rest.len() as u64) as usize;
                        rest = &rest[take..];
                        state = if n - take as u64 == 0 {
                            ChunkState::DataEnd
                        } else {
                            ChunkState::Data(n - take as u64)
                        };
                    }
                    ChunkState::DataEnd => {
                        let Some(_) = take_line(line, &mut rest) else {
                            return (data.len(), Some(Body::Chunked(state)));
                        };
                        state = ChunkState::Size;
                    }
                    ChunkState::Trailer => {
                        let Some(l) = take_line(line, &mut rest) else {
                            return (data.len(), Some(Body::Chunked(state)));
                        };
                        if l.is_empty() {
                            return (data.len() - rest.len(), None);
                        }
                    }
                }
            }
        }
    }
}

/// The `http.uri` buffer from a request target, and the host it names (absolute
/// form, or CONNECT's authority form).
pub fn normalize_uri(uri: &[u8], connect: bool) -> (Vec<u8>, Option<Vec<u8>>) {
    let mut host = None;
    let mut rest = uri;
    if connect {
        if !uri.starts_with(b"/") && !uri.is_empty() {
            host = Some(normalize_host(uri));
        }
    } else if let Some(i) = find(uri, b"://")
        && uri[..i]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
    {
        let after = &uri[i + 3..];
        let end = after
            .iter()
            .position(|&b| matches!(b, b'/' | b'?' | b'#'))
            .unwrap_or(after.len());
        let authority = &after[..end];
        let hostport = match memchr::memrchr(b'@', authority) {
            Some(at) => &authority[at + 1..],
            None => authority,
        };
        if !hostport.is_empty() {
            host = Some(normalize_host(hostport));
        }
        rest = &after[end..];
    }
    let (path_query, fragment) = match memchr::memchr(b'#', rest) {
        Some(i) => (&rest[..i], Some(&rest[i..])),
        None => (rest, None),
    };
    let (path, query) = match memchr::memchr(b'?', path_query) {
        Some(i) => (&path_query[..i], Some(&path_query[i + 1..])),
        None => (path_query, None),
    };
    let mut out = remove_dot_segments(&percent_decode(path));
    if let Some(q) = query {
        out.push(b'?');
        out.extend_from_slice(&percent_decode(q));
    }
    if let Some(f) = fragment {
        out.extend_from_slice(f);
    }
    (out, host)
}

/// Lowercases a host and drops its port and a trailing dot.
pub fn normalize_host(value: &[u8]) -> Vec<u8> {
    let v = trim(value);
    let host = if v.starts_with(b"[") {
        // [IPv6]:port
        match memchr::memchr(b']', v) {
            Some(i) => &v[..=i],
            None => v,
        }
    } else {
        match memchr::memrchr(b':', v) {
            Some(i) if v[i + 1..].iter().all(u8::is_ascii_digit) => &v[..i],
            _ => v,
        }
    };
    let host = host.strip_suffix(b".").unwrap_or(host);
    host.to_ascii_lowercase()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

/// Decodes `%XX` escapes; invalid ones are kept as written.
pub fn percent_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%'
            && i + 2 < s.len()
            && let (Some(h), Some(l)) = (hex(s[i + 1]), hex(s[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// RFC 3986 section 5.2.4 on a decoded path.
pub fn remove_dot_segments(path: &[u8]) -> Vec<u8> {
    if !path.windows(2).any(|w| w == b"./" || w == b"/.") && path != b"." && path != b".." {
        return path.to_vec();
    }
    let mut input = path;
    let mut out: Vec<u8> = Vec::with_capacity(path.len());
    while !input.is_empty() {
        if input.starts_with(b"../") {
            input = &input[3..];
        } else if input.starts_with(b"./") || input.starts_with(b"/./") {
            input = &input[2..];
        } else if input == b"/." {
            input = b"/";
        } else if input.starts_with(b"/../") || input == b"/.." {
            input = if input.len() == 3 { b"/" } else { &input[3..] };
            match memchr::memrchr(b'/', &out) {
                Some(i) => out.truncate(i),
                None => out.clear(),
            }
        } else if input == b"." || input == b".." {
            input = b"";
        } else {
            let start = usize::from(input[0] == b'/');
            let end = input[start..]
                .iter()
                .position(|&b| b == b'/')
                .map_or(input.len(), |p| p + start);
            out.extend_from_slice(&input[..end]);
            input = &input[end..];
        }
    }
    out
}

// Carrying the parser to another host (live migration): `crate::persist`.
// Every bound the parser relies on is checked on the way in.

/// Bytes one buffered field of a carried transaction or side may have.
const PERSIST_FIELD: usize = 4 << 20;

fn progress_code(p: Progress) -> u8 {
    match p {
        Progress::None => 0,
        Progress::Line => 1,
        Progress::Headers => 2,
        Progress::Complete => 3,
    }
}

fn progress_of(r: &mut Reader<'_>, field: &'static str) -> PersistResult<Progress> {
    Ok(match r.code(field, 3)? {
        0 => Progress::None,
        1 => Progress::Line,
        2 => Progress::Headers,
        _ => Progress::Complete,
    })
}

impl HttpTx {
    pub(crate) fn persist(&self, out: &mut Vec<u8>) {
        put_u64(out, self.id);
        for b in [&self.method, &self.uri_raw, &self.uri, &self.protocol] {
            put_bytes(out, b);
        }
        put_opt_bytes(out, self.host.as_deref());
        put_opt_bytes(out, self.user_agent.as_deref());
        put_bytes(out, &self.request_header_block);
        put_opt_bytes(out, self.status.as_deref());
        put_bytes(out, &self.response_header_block);
        put_u64(out, self.response_length);
        out.push(progress_code(self.request));
        out.push(progress_code(self.response));
        out.push(u8::from(self.updated) | u8::from(self.logged) << 1);
    }

    pub(crate) fn restore(r: &mut Reader<'_>) -> PersistResult<HttpTx> {
        let id = r.counter("http transaction id")?;
        let method = r.bytes("http method", PERSIST_FIELD)?;
        let uri_raw = r.bytes("http raw uri", PERSIST_FIELD)?;
        let uri = r.bytes("http uri", PERSIST_FIELD)?;
        let protocol = r.bytes("http protocol", PERSIST_FIELD)?;
        let host = r.opt_bytes("http host", PERSIST_FIELD)?;
        let user_agent = r.opt_bytes("http user agent", PERSIST_FIELD)?;
        let request_header_block = r.bytes("http request headers", PERSIST_FIELD)?;
        let status = r.opt_bytes("http status", PERSIST_FIELD)?;
        let response_header_block = r.bytes("http response headers", PERSIST_FIELD)?;
        let response_length = r.counter("http response length")?;
        let request = progress_of(r, "http request progress")?;
        let response = progress_of(r, "http response progress")?;
        let f = r.flags("http transaction flags", 2)?;
        Ok(HttpTx {
            id,
            method,
            uri_raw,
            uri,
            protocol,
            host,
            user_agent,
            request_header_block,
            status,
            response_header_block,
            response_length,
            request,
            response,
            updated: f & 1 != 0,
            logged: f & 2 != 0,
        })
    }
}

impl Side {
    fn persist(&self, out: &mut Vec<u8>) {
        match self.state {
            State::Line => out.push(0),
            State::Headers => out.push(1),
            State::Body(b) => {
                out.push(2);
                match b {
                    Body::None => out.push(0),
                    Body::Length(n) => {
                        out.push(1);
                        put_u64(out, n);
                    }
                    Body::Chunked(c) => {
                        out.push(2);
                        match c {
                            ChunkState::Size => out.push(0),
                            ChunkState::Data(n) => {
                                out.push(1);
                                put_u64(out, n);
                            }
                            ChunkState::DataEnd => out.push(2),
                            ChunkState::Trailer => out.push(3),
                        }
                    }
                    Body::UntilClose => out.push(3),
                }
            }
            State::Stopped => out.push(3),
        }
        put_bytes(out, &self.line);
        put_u64(out, self.header_bytes as u64);
        put_u32(out, self.headers.len() as u32);
        for (n, v) in &self.headers {
            put_bytes(out, n);
            put_bytes(out, v);
        }
        match self.current {
            None => out.push(0),
            Some(id) => {
                out.push(1);
                put_u64(out, id);
            }
        }
    }

    fn restore(r: &mut Reader<'_>) -> PersistResult<Side> {
        let state = match r.code("http state", 3)? {
            0 => State::Line,
            1 => State::Headers,
            2 => State::Body(match r.code("http body", 3)? {
                0 => Body::None,
                1 => Body::Length(r.u64("http body length")?),
                2 => Body::Chunked(match r.code("http chunk state", 3)? {
                    0 => ChunkState::Size,
                    1 => ChunkState::Data(r.u64("http chunk length")?),
                    2 => ChunkState::DataEnd,
                    _ => ChunkState::Trailer,
                }),
                _ => Body::UntilClose,
            }),
            _ => State::Stopped,
        };
        let line = r.bytes("http line", PERSIST_FIELD)?;
        let at = r.at();
        let header_bytes = r.u64("http header bytes")?;
        bound("http header bytes", at, header_bytes, 1 << 32)?;
        let at = r.at();
        let n = r.u32("http header count")? as usize;
        bound("http header count", at, n as u64, MAX_HEADERS as u64)?;
        let mut headers = Vec::new();
        for _ in 0..n {
            headers.push((
                r.bytes("http header name", MAX_HEADERS)?,
                r.bytes("http header value", MAX_HEADERS)?,
            ));
        }
        let current = match r.bool("http current")? {
            false => None,
            true => Some(r.u64("http current")?),
        };
        Ok(Side {
            state,
            line,
            header_bytes: header_bytes as usize,
            headers,
            current,
        })
    }
}

impl HttpParser {
    /// Appends the parser's state (`crate::persist`); its counters stay here.
    pub(crate) fn persist(&self, out: &mut Vec<u8>) {
        self.request.persist(out);
        self.response.persist(out);
        put_u64(out, self.next_id);
        out.push(self.txs.len() as u8);
        for tx in &self.txs {
            tx.persist(out);
        }
    }

    /// A parser from [`HttpParser::persist`]'s bytes.
    pub(crate) fn restore(r: &mut Reader<'_>) -> PersistResult<HttpParser> {
        let request = Side::restore(r)?;
        let response = Side::restore(r)?;
        let next_id = r.counter("http next transaction")?;
        let at = r.at();
        let n = usize::from(r.u8("http transaction count")?);
        bound("http transaction count", at, n as u64, MAX_TXS as u64)?;
        let mut txs = VecDeque::with_capacity(n);
        for _ in 0..n {
            txs.push_back(HttpTx::restore(r)?);
        }
        Ok(HttpParser {
            request,
            response,
            txs,
            next_id,
            counters: HttpCounters::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (raw URI, normalized, host it names).
    type UriCase<'a> = (&'a [u8], &'a [u8], Option<&'a [u8]>);

    #[test]
    fn uri_normalization() {
        let cases: &[UriCase<'_>] = &[
            (b"/one", b"/one", None),
            (b"/normalized%20uri", b"/normalized uri", None),
            (b"/%2e%2e/images.gif", b"/images.gif", None),
            (b"/a/b/../c/./d", b"/a/c/d", None),
            (
                b"//index.php?page=../../../etc/passwd",
                b"//index.php?page=../../../etc/passwd",
                None,
            ),
            (b"/search?q=1%202", b"/search?q=1 2", None),
            (b"http://Ex.COM:8080/x?y", b"/x?y", Some(b"ex.com")),
            (b"/bad%zzescape", b"/bad%zzescape", None),
            (b"/a#frag", b"/a#frag", None),
        ];
        for (raw, uri, host) in cases {
            let (u, h) = normalize_uri(raw, false);
            assert_eq!(u, *uri, "{}", String::from_utf8_lossy(raw));
            assert_eq!(h.as_deref(), *host, "{}", String::from_utf8_lossy(raw));
        }
        assert_eq!(normalize_uri(b"/", true).1, None);
        assert_eq!(
            normalize_uri(b"Host.example:443", true).1.as_deref(),
            Some(&b"host.example"[..])
        );
        assert_eq!(normalize_host(b" www.ExAmPlE.cOM "), b"www.example.com");
        assert_eq!(normalize_host(b"[::1]:80"), b"[::1]");
    }

    #[test]
    fn requests_and_responses_pair_up_across_any_split() {
        let req = b"GET /a HTTP/1.1\r\nHost: X.org\r\nUser-Agent: ua\r\nCookie: c\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /c HTTP/1.0\n\n";
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiHTTP/1.1 404 NF\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nHTTP/1.0 500 E\r\n\r\nbody until close";
        for split in [1, 2, 7, 13, 64, 1000] {
            let mut p = HttpParser::new();
            for c in req.chunks(split) {
                p.parse_request(c);
            }
            for c in resp.chunks(split) {
                p.parse_response(c);
            }
            p.response_closed();
            let txs = p.txs();
            assert_eq!(txs.len(), 3, "split {split}");
            assert_eq!(txs[0].uri, b"/a");
            assert_eq!(txs[0].host.as_deref(), Some(&b"x.org"[..]));
            assert_eq!(txs[0].user_agent.as_deref(), Some(&b"ua"[..]));
            assert_eq!(txs[0].request_header_block, b"Host: X.org\r\nUser-Agent: ua\r\n");
            assert_eq!(txs[0].status.as_deref(), Some(&b"200"[..]));
            assert_eq!(txs[1].method, b"POST");
            assert_eq!(txs[1].status.as_deref(), Some(&b"404"[..]));
            assert_eq!(txs[2].uri, b"/c");
            assert_eq!(txs[2].status.as_deref(), Some(&b"500"[..]));
            assert!(
                txs.iter()
                    .all(|t| t.request == Progress::Complete && t.response == Progress::Complete)
            );
        }
    }

    #[test]
    fn buffers_appear_as_the_request_progresses() {
        let mut p = HttpParser::new();
        p.parse_request(b"POST /now_this HTTP/1.0\r\nUser-Agent: Mozilla/1.0\r\n");
        let tx = &p.txs()[0];
        assert_eq!(tx.request, Progress::Line);
        assert_eq!(tx.uri, b"/now_this");
        assert!(tx.user_agent.is_none(), "headers are not complete");
        p.parse_request(b"\r\n");
        assert_eq!(p.txs()[0].request, Progress::Complete);
        assert_eq!(p.txs()[0].user_agent.as_deref(), Some(&b"Mozilla/1.0"[..]));
    }

    #[test]
    fn empty_header_values_exist() {
        let mut p = HttpParser::new();
        p.parse_request(b"GET / HTTP/1.1\nHost: localhost\nUser-Agent:\n\n");
        assert_eq!(p.txs()[0].user_agent.as_deref(), Some(&b""[..]));
    }

    #[test]
    fn malformed_and_oversized_input_stops_parsing() {
        let mut p = HttpParser::new();
        p.parse_request(b"GET%00 /x HTTP/1.1\r\n\r\n");
        assert_eq!(p.counters.malformed, 1);
        assert!(p.txs().is_empty());
        let mut p = HttpParser::new();
        p.parse_request(b"GET /");
        p.parse_request(&vec![b'a'; MAX_LINE + 10]);
        assert_eq!(p.counters.too_long, 1);
        let mut p = HttpParser::new();
        for _ in 0..(MAX_TXS + 5) {
            p.parse_request(b"GET / HTTP/1.1\r\n\r\n");
        }
        assert_eq!(p.txs().len(), MAX_TXS);
        assert_eq!(p.counters.txs_evicted, 5);
    }

    #[test]
    fn connect_tunnels_stop_parsing() {
        let mut p = HttpParser::new();
        p.parse_request(b"CONNECT / HTTP/1.1\r\nMp-Country: US\r\n\r\n");
        p.parse_response(b"HTTP/1.1 200 OK\r\n\r\n");
        assert!(p.stopped());
        assert_eq!(p.txs()[0].host, None);
    }

    #[test]
    fn detection_probes() {
        assert_eq!(looks_like_request(b"GET / HTTP/1.1"), Some(true));
        assert_eq!(looks_like_request(b"GE"), None);
        assert_eq!(looks_like_request(b"GET%00 /"), Some(false));
        assert_eq!(looks_like_request(b"\x16\x03\x01"), Some(false));
        assert_eq!(looks_like_response(b"HTTP/1.0 200"), Some(true));
        assert_eq!(looks_like_response(b"HTT"), None);
    }
}
