//! HTTP/2 in clear text (prior knowledge, as gRPC uses it), light: frames,
//! header blocks, and the same transactions as HTTP/1.x.
//!
//! A connection starts with the client preface; then both directions are
//! frames (9-byte header: length, type, flags, stream). HEADERS and
//! CONTINUATION frames are joined into header blocks and decoded with each
//! direction's HPACK table; a stream's request headers make a transaction
//! (`:method`, `:path`, `:authority` fill the HTTP buffers), its response
//! headers give the status. DATA and other frames are skipped without being
//! buffered, whatever their length. A header block over `MAX_HEADER_BLOCK`,
//! or an HPACK error, ends parsing of the connection (a decoder that lost its
//! table cannot decode later blocks correctly).

use std::collections::VecDeque;

use super::hpack::{Decoder, Headers};
use super::http::{HttpTx, Progress, normalize_host, normalize_uri};

/// The client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Largest header block joined from HEADERS and CONTINUATION frames.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Live transactions (streams) kept.
pub const MAX_TXS: usize = 64;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Whether `data` starts with the client preface (`None`: too short to tell).
pub fn looks_like_preface(data: &[u8]) -> Option<bool> {
    let n = data.len().min(PREFACE.len());
    if data[..n] != PREFACE[..n] {
        Some(false)
    } else if n < PREFACE.len() {
        None
    } else {
        Some(true)
    }
}

#[derive(Debug, Default)]
struct Side {
    /// Bytes of the preface still expected (client side only).
    preface_left: usize,
    /// Partial frame header.
    header: Vec<u8>,
    /// Frame payload bytes still to skip or collect.
    remaining: usize,
    /// The current frame: (type, flags, stream), while its payload is read.
    frame: Option<(u8, u8, u32)>,
    /// Payload of the current HEADERS/CONTINUATION frame.
    payload: Vec<u8>,
    /// Header block being joined: (stream, end_stream, block).
    block: Option<(u32, bool, Vec<u8>)>,
    hpack: Decoder,
    failed: bool,
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Http2Counters {
    /// Protocol or HPACK errors (parsing stopped).
    pub errors: u64,
    /// Transactions dropped because too many were live.
    pub txs_evicted: u64,
}

/// The HTTP/2 state of one flow.
#[derive(Debug)]
pub struct Http2Parser {
    sides: [Side; 2],
    txs: VecDeque<(u32, HttpTx)>,
    next_id: u64,
    /// Counters.
    pub counters: Http2Counters,
}

impl Default for Http2Parser {
    fn default() -> Self {
        let mut sides: [Side; 2] = Default::default();
        sides[0].preface_left = PREFACE.len();
        Http2Parser {
            sides,
            txs: VecDeque::new(),
            next_id: 0,
            counters: Http2Counters::default(),
        }
    }
}

impl Http2Parser {
    /// A parser for a new connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Live transactions, by stream.
    pub fn txs(&self) -> impl Iterator<Item = &HttpTx> {
        self.txs.iter().map(|(_, t)| t)
    }

    /// Live transactions, mutable.
    pub fn txs_mut(&mut self) -> impl Iterator<Item = &mut HttpTx> {
        self.txs.iter_mut().map(|(_, t)| t)
    }

    /// Drops finished transactions detection has seen.
    pub fn prune(&mut self) {
        self.txs.retain(|(_, t)| {
            !(t.request == Progress::Complete && t.response == Progress::Complete && !t.updated && t.logged)
        });
    }

    /// Feeds one direction's bytes.
    pub fn parse(&mut self, to_server: bool, mut data: &[u8]) {
        let i = usize::from(!to_server);
        while !data.is_empty() && !self.sides[i].failed {
            let side = &mut self.sides[i];
            if side.preface_left > 0 {
                let at = PREFACE.len() - side.preface_left;
                let n = side.preface_left.min(data.len());
                if data[..n] != PREFACE[at..at + n] {
                    self.fail(i);
                    return;
                }
                side.preface_left -= n;
                data = &data[n..];
                continue;
            }
            if side.frame.is_none() {
                let need = 9 - side.header.len();
                let n = need.min(data.len());
                side.header.extend_from_slice(&data[..n]);
                data = &data[n..];
                if side.header.len() < 9 {
                    return;
                }
                let h = std::mem::take(&mut side.header);
                let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                side.frame = Some((h[3], h[4], stream));
                side.remaining = len;
                side.payload.clear();
                if matches!(h[3], HEADERS | CONTINUATION)
                    && side.block.as_ref().map_or(0, |b| b.2.len()) + len > MAX_HEADER_BLOCK
                {
                    self.fail(i);
                    return;
                }
            }
            let side = &mut self.sides[i];
            let (ty, flags, stream) = side.frame.expect("set above");
            let n = side.remaining.min(data.len());
            if matches!(ty, HEADERS | CONTINUATION) {
                side.payload.extend_from_slice(&data[..n]);
            }
            side.remaining -= n;
            data = &data[n..];
            if side.remaining == 0 {
                side.frame = None;
                let payload = std::mem::take(&mut side.payload);
                self.frame(i, ty, flags, stream, &payload);
            }
        }
    }

    fn fail(&mut self, i: usize) {
        if !self.sides[i].failed {
            self.sides[i].failed = true;
            self.counters.errors += 1;
        }
    }

    fn frame(&mut self, i: usize, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
        match ty {
            HEADERS => {
                let mut p = payload;
                if flags & PADDED != 0 {
                    let Some((&pad, rest)) = p.split_first() else {
                        return self.fail(i);
                    };
                    if usize::from(pad) > rest.len() {
                        return self.fail(i);
                    }
                    p = &rest[..rest.len() - usize::from(pad)];
                }
                if flags & PRIORITY != 0 {
                    if p.len() < 5 {
                        return self.fail(i);
                    }
                    p = &p[5..];
                }
                if self.sides[i].block.is_some() || stream == 0 {
                    return self.fail(i);
                }
                self.sides[i].block = Some((stream, flags & END_STREAM != 0, p.to_vec()));
                if flags & END_HEADERS != 0 {
                    self.end_block(i);
                }
            }
            CONTINUATION => {
                match self.sides[i].block.as_mut() {
                    Some((s, _, b)) if *s == stream => b.extend_from_slice(payload),
                    _ => return self.fail(i),
                }
                if flags & END_HEADERS != 0 {
                    self.end_block(i);
                }
            }
            DATA if flags & END_STREAM != 0 => self.end_stream(i, stream),
            _ => {
                // A header block must be followed by its CONTINUATION frames only.
                if self.sides[i].block.is_some() {
                    self.fail(i);
                }
            }
        }
    }

    fn end_block(&mut self, i: usize) {
        let Some((stream, end_stream, block)) = self.sides[i].block.take() else {
            return;
        };
        let headers = match self.sides[i].hpack.decode(&block) {
            Ok(h) => h,
            Err(_) => return self.fail(i),
        };
        if i == 0 {
            self.request_headers(stream, headers);
        } else {
            self.response_headers(stream, headers);
        }
        if end_stream {
            self.end_stream(i, stream);
        }
    }

    fn tx(&mut self, stream: u32) -> &mut HttpTx {
        if let Some(pos) = self.txs.iter().position(|(s, _)| *s == stream) {
            return &mut self.txs[pos].1;
        }
        if self.txs.len() >= MAX_TXS {
            self.txs.pop_front();
            self.counters.txs_evicted += 1;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.txs.push_back((
            stream,
            HttpTx {
                id,
                ..HttpTx::default()
            },
        ));
        &mut self.txs.back_mut().expect("pushed").1
    }

    fn request_headers(&mut self, stream: u32, headers: Headers) {
        let tx = self.tx(stream);
        if tx.request != Progress::None {
            // Trailers.
            tx.updated = true;
            return;
        }
        let mut authority = None;
        for (name, value) in &headers {
            match name.as_slice() {
                b":method" => tx.method = value.clone(),
                b":path" => {
                    tx.uri_raw = value.clone();
                    tx.uri = normalize_uri(value, false).0;
                }
                b":authority" => authority = Some(normalize_host(value)),
                b"host" if tx.host.is_none() => tx.host = Some(normalize_host(value)),
                b"user-agent" => tx.user_agent = Some(value.clone()),
                _ => {}
            }
        }
        if authority.is_some() {
            tx.host = authority;
        }
        tx.protocol = b"HTTP/2".to_vec();
        tx.request_header_block = block(&headers, b"cookie");
        tx.request = Progress::Headers;
        tx.updated = true;
    }

    fn response_headers(&mut self, stream: u32, headers: Headers) {
        let tx = self.tx(stream);
        if tx.response == Progress::None {
            tx.status = headers.iter().find(|(n, _)| n == b":status").map(|(_, v)| v.clone());
            tx.response_header_block = block(&headers, b"set-cookie");
            tx.response = Progress::Headers;
        }
        tx.updated = true;
    }

    fn end_stream(&mut self, i: usize, stream: u32) {
        let tx = self.tx(stream);
        if i == 0 {
            tx.request = Progress::Complete;
        } else {
            tx.response = Progress::Complete;
        }
        tx.updated = true;
    }
}

/// Regular (not pseudo) headers as `name: value\r\n`, leaving out `skip`.
fn block(headers: &Headers, skip: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (n, v) in headers {
        if n.starts_with(b":") || n.eq_ignore_ascii_case(skip) {
            continue;
        }
        out.extend_from_slice(n);
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    out
}

// Carrying the parser to another host (live migration): `crate::persist`.
// Every bound the parser relies on is checked on the way in.
impl Side {
    fn persist(&self, out: &mut Vec<u8>) {
        use crate::persist::{put_bytes, put_u32};
        out.push(self.preface_left as u8);
        put_bytes(out, &self.header);
        put_u32(out, self.remaining as u32);
        match self.frame {
            None => out.push(0),
            Some((ty, flags, stream)) => {
                out.push(1);
                out.push(ty);
                out.push(flags);
                put_u32(out, stream);
            }
        }
        put_bytes(out, &self.payload);
        match &self.block {
            None => out.push(0),
            Some((stream, end, block)) => {
                out.push(1);
                put_u32(out, *stream);
                out.push(u8::from(*end));
                put_bytes(out, block);
            }
        }
        self.hpack.persist(out);
        out.push(u8::from(self.failed));
    }

    fn restore(r: &mut crate::persist::Reader<'_>) -> crate::persist::Result<Side> {
        use crate::persist::bound;
        let at = r.at();
        let preface_left = usize::from(r.u8("http2 preface left")?);
        bound("http2 preface left", at, preface_left as u64, PREFACE.len() as u64)?;
        let header = r.bytes("http2 frame header", 8)?;
        let at = r.at();
        let remaining = r.u32("http2 frame remaining")? as usize;
        bound("http2 frame remaining", at, remaining as u64, (1 << 24) - 1)?;
        let frame = match r.bool("http2 frame")? {
            false => None,
            true => Some((
                r.u8("http2 frame type")?,
                r.u8("http2 frame flags")?,
                r.u32("http2 frame stream")?,
            )),
        };
        let payload = r.bytes("http2 frame payload", 1 << 24)?;
        let block = match r.bool("http2 header block")? {
            false => None,
            true => Some((
                r.u32("http2 header block stream")?,
                r.bool("http2 header block end")?,
                r.bytes("http2 header block", MAX_HEADER_BLOCK)?,
            )),
        };
        Ok(Side {
            preface_left,
            header,
            remaining,
            frame,
            payload,
            block,
            hpack: Decoder::restore(r)?,
            failed: r.bool("http2 failed")?,
        })
    }
}

impl Http2Parser {
    /// Appends the parser's state, both directions' HPACK tables included
    /// (`crate::persist`); its counters stay here.
    pub(crate) fn persist(&self, out: &mut Vec<u8>) {
        use crate::persist::{put_u32, put_u64};
        for side in &self.sides {
            side.persist(out);
        }
        put_u64(out, self.next_id);
        out.push(self.txs.len() as u8);
        for (stream, tx) in &self.txs {
            put_u32(out, *stream);
            tx.persist(out);
        }
    }

    /// A parser from [`Http2Parser::persist`]'s bytes.
    pub(crate) fn restore(r: &mut crate::persist::Reader<'_>) -> crate::persist::Result<Http2Parser> {
        use crate::persist::bound;
        let sides = [Side::restore(r)?, Side::restore(r)?];
        let next_id = r.counter("http2 next transaction")?;
        let at = r.at();
        let n = usize::from(r.u8("http2 transaction count")?);
        bound("http2 transaction count", at, n as u64, MAX_TXS as u64)?;
        let mut txs = VecDeque::with_capacity(n);
        for _ in 0..n {
            let stream = r.u32("http2 transaction stream")?;
            txs.push_back((stream, HttpTx::restore(r)?));
        }
        Ok(Http2Parser {
            sides,
            txs,
            next_id,
            counters: Http2Counters::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn literal(name: &str, value: &str) -> Vec<u8> {
        let mut b = vec![0x00, name.len() as u8];
        b.extend_from_slice(name.as_bytes());
        b.push(value.len() as u8);
        b.extend_from_slice(value.as_bytes());
        b
    }

    #[test]
    fn requests_and_responses_over_streams_and_long_data_frames() {
        let mut client = PREFACE.to_vec();
        client.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        let mut req = literal(":method", "GET");
        req.extend(literal(":path", "/malware/payload.exe"));
        let (a, b) = req.split_at(10);
        client.extend(frame(HEADERS, END_STREAM, 3, a));
        client.extend(frame(CONTINUATION, END_HEADERS, 3, b));
        let mut server = frame(0x4, 0, 0, &[]);
        server.extend(frame(HEADERS, END_HEADERS, 3, &[0x88])); // :status 200
        server.extend(frame(DATA, END_STREAM, 3, &vec![0u8; 70_000]));
        for chunk in [1, 7, 1000, 100_000] {
            let mut p = Http2Parser::new();
            for c in client.chunks(chunk) {
                p.parse(true, c);
            }
            for c in server.chunks(chunk) {
                p.parse(false, c);
            }
            let tx = p.txs().next().unwrap();
            assert_eq!(tx.uri, b"/malware/payload.exe", "chunk {chunk}");
            assert_eq!(tx.status.as_deref(), Some(&b"200"[..]));
            assert_eq!((tx.request, tx.response), (Progress::Complete, Progress::Complete));
        }
    }

    #[test]
    fn errors_stop_the_direction() {
        let mut p = Http2Parser::new();
        p.parse(true, b"PRI * HTTP/1.1");
        assert_eq!(p.counters.errors, 1);
        let mut p = Http2Parser::new();
        let mut c = PREFACE.to_vec();
        c.extend(frame(HEADERS, END_HEADERS, 1, &[0x80])); // index 0
        p.parse(true, &c);
        assert_eq!(p.counters.errors, 1);
        assert_eq!(looks_like_preface(b"PRI * HT"), None);
        assert_eq!(looks_like_preface(b"GET / HTTP/1.1\r\n\r\nxxxxxxx"), Some(false));
    }
}
