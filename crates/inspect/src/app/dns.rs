//! DNS messages, light: the header and the question section, over UDP
//! (one message per datagram) and TCP (two-byte length prefixes).
//!
//! Each query becomes a transaction holding its question names (the
//! `dns.query` buffer, one per question, dotted, case kept); a response with
//! the same id completes it. Names are read with compression pointers
//! followed only backwards and at most `MAX_POINTERS` times, so a crafted
//! message cannot loop; a name longer than 255 bytes is malformed.

use std::collections::VecDeque;

/// Compression pointers followed in one name at most.
pub const MAX_POINTERS: usize = 16;
/// Questions read from one message at most.
pub const MAX_QUESTIONS: usize = 16;
/// Live transactions kept per flow.
pub const MAX_TXS: usize = 64;
/// Largest message buffered from a TCP stream.
pub const MAX_TCP_MESSAGE: usize = 65535;

/// A DNS message's parts the engine uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Transaction id.
    pub id: u16,
    /// QR bit: a response.
    pub response: bool,
    /// Opcode.
    pub opcode: u8,
    /// Response code.
    pub rcode: u8,
    /// Question names and types.
    pub questions: Vec<(Vec<u8>, u16)>,
}

/// Why a message did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsError {
    /// Shorter than its header or sections say.
    Truncated,
    /// A name's labels or pointers are invalid.
    BadName,
}

/// Parses a message's header and questions.
pub fn parse_message(data: &[u8]) -> Result<Message, DnsError> {
    if data.len() < 12 {
        return Err(DnsError::Truncated);
    }
    let id = u16::from_be_bytes([data[0], data[1]]);
    let flags = u16::from_be_bytes([data[2], data[3]]);
    let qdcount = usize::from(u16::from_be_bytes([data[4], data[5]]));
    let mut at = 12;
    let mut questions = Vec::new();
    for _ in 0..qdcount.min(MAX_QUESTIONS) {
        let (name, next) = read_name(data, at)?;
        let t = data.get(next..next + 4).ok_or(DnsError::Truncated)?;
        questions.push((name, u16::from_be_bytes([t[0], t[1]])));
        at = next + 4;
    }
    Ok(Message {
        id,
        response: flags & 0x8000 != 0,
        opcode: ((flags >> 11) & 0x0f) as u8,
        rcode: (flags & 0x0f) as u8,
        questions,
    })
}

/// Reads a name at `at`; returns it dotted and the offset after it.
fn read_name(data: &[u8], mut at: usize) -> Result<(Vec<u8>, usize), DnsError> {
    let mut name = Vec::new();
    let mut end = None;
    let mut pointers = 0;
    loop {
        let len = *data.get(at).ok_or(DnsError::Truncated)?;
        match len & 0xc0 {
            0x00 => {
                if len == 0 {
                    return Ok((name, end.unwrap_or(at + 1)));
                }
                let label = data.get(at + 1..at + 1 + usize::from(len)).ok_or(DnsError::Truncated)?;
                if !name.is_empty() {
                    name.push(b'.');
                }
                name.extend_from_slice(label);
                if name.len() > 255 {
                    return Err(DnsError::BadName);
                }
                at += 1 + usize::from(len);
            }
            0xc0 => {
                let lo = *data.get(at + 1).ok_or(DnsError::Truncated)?;
                let target = usize::from(u16::from_be_bytes([len & 0x3f, lo]));
                // Pointers go backwards only, and not too many times.
                if target >= at || pointers >= MAX_POINTERS {
                    return Err(DnsError::BadName);
                }
                pointers += 1;
                end.get_or_insert(at + 2);
                at = target;
            }
            _ => return Err(DnsError::BadName),
        }
    }
}

/// Whether `data` is plausibly a DNS message (used to detect the protocol).
pub fn plausible(data: &[u8]) -> bool {
    parse_message(data).is_ok_and(|m| m.opcode <= 6 && (m.response || !m.questions.is_empty()))
}

/// One query and whether its response was seen.
#[derive(Debug, Clone, Default)]
pub struct DnsTx {
    /// Transaction number within the flow.
    pub id: u64,
    /// The message id.
    pub dns_id: u16,
    /// Question names.
    pub queries: Vec<Vec<u8>>,
    /// Question types.
    pub types: Vec<u16>,
    /// A response was seen.
    pub answered: bool,
    /// The response's rcode.
    pub rcode: Option<u8>,
    /// Changed since detection last looked.
    pub updated: bool,
    /// This tx was made from a response with no query seen.
    pub response_only: bool,
    /// Its EVE record was produced.
    pub logged: bool,
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DnsCounters {
    /// Messages that did not parse.
    pub malformed: u64,
    /// Transactions dropped because too many were live.
    pub txs_evicted: u64,
}

/// The DNS state of one flow.
#[derive(Debug, Default)]
pub struct DnsParser {
    txs: VecDeque<DnsTx>,
    next_id: u64,
    /// Partial TCP messages per direction (to server, to client).
    tcp_buf: [Vec<u8>; 2],
    /// Counters.
    pub counters: DnsCounters,
}

impl DnsParser {
    /// A parser for a new flow.
    pub fn new() -> Self {
        Self::default()
    }

    /// Live transactions.
    pub fn txs(&self) -> &VecDeque<DnsTx> {
        &self.txs
    }

    /// Live transactions, mutable.
    pub fn txs_mut(&mut self) -> &mut VecDeque<DnsTx> {
        &mut self.txs
    }

    /// Drops answered transactions detection has seen, and any over the limit.
    pub fn prune(&mut self) {
        self.txs.retain(|t| !t.answered || t.updated || !t.logged);
    }

    /// Feeds one UDP datagram.
    pub fn parse_datagram(&mut self, data: &[u8]) {
        match parse_message(data) {
            Ok(m) => self.message(m),
            Err(_) => self.counters.malformed += 1,
        }
    }

    /// Feeds TCP stream bytes of one direction.
    pub fn parse_stream(&mut self, to_server: bool, data: &[u8]) {
        let i = usize::from(!to_server);
        let mut buf = std::mem::take(&mut self.tcp_buf[i]);
        buf.extend_from_slice(data);
        let mut at = 0;
        while buf.len() - at >= 2 {
            let len = usize::from(u16::from_be_bytes([buf[at], buf[at + 1]]));
            if buf.len() - at - 2 < len {
                break;
            }
            let msg = &buf[at + 2..at + 2 + len];
            match parse_message(msg) {
                Ok(m) => self.message(m),
                Err(_) => self.counters.malformed += 1,
            }
            at += 2 + len;
        }
        buf.drain(..at);
        if buf.len() > MAX_TCP_MESSAGE + 2 {
            buf.clear();
        }
        self.tcp_buf[i] = buf;
    }

    fn message(&mut self, m: Message) {
        if m.response {
            if let Some(tx) = self.txs.iter_mut().find(|t| t.dns_id == m.id && !t.answered) {
                tx.answered = true;
                tx.rcode = Some(m.rcode);
                tx.updated = true;
                return;
            }
        }
        if self.txs.len() >= MAX_TXS {
            self.txs.pop_front();
            self.counters.txs_evicted += 1;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.txs.push_back(DnsTx {
            id,
            dns_id: m.id,
            queries: m.questions.iter().map(|q| q.0.clone()).collect(),
            types: m.questions.iter().map(|q| q.1).collect(),
            answered: m.response,
            rcode: m.response.then_some(m.rcode),
            updated: true,
            response_only: m.response,
            logged: false,
        });
    }
}

// Carrying the parser to another host (live migration): `crate::persist`.
impl DnsParser {
    /// Appends the parser's state; its counters stay here.
    pub(crate) fn persist(&self, out: &mut Vec<u8>) {
        use crate::persist::{put_bytes, put_u16, put_u64};
        put_u64(out, self.next_id);
        for b in &self.tcp_buf {
            put_bytes(out, b);
        }
        out.push(self.txs.len() as u8);
        for t in &self.txs {
            put_u64(out, t.id);
            put_u16(out, t.dns_id);
            out.push(t.queries.len().min(t.types.len()).min(usize::from(u8::MAX)) as u8);
            for (q, ty) in t.queries.iter().zip(&t.types).take(usize::from(u8::MAX)) {
                put_bytes(out, q);
                put_u16(out, *ty);
            }
            match t.rcode {
                None => out.push(0),
                Some(c) => {
                    out.push(1);
                    out.push(c);
                }
            }
            out.push(
                u8::from(t.answered)
                    | u8::from(t.updated) << 1
                    | u8::from(t.response_only) << 2
                    | u8::from(t.logged) << 3,
            );
        }
    }

    /// A parser from [`DnsParser::persist`]'s bytes.
    pub(crate) fn restore(r: &mut crate::persist::Reader<'_>) -> crate::persist::Result<DnsParser> {
        use crate::persist::bound;
        let next_id = r.counter("dns next transaction")?;
        let tcp_buf = [
            r.bytes("dns partial message", MAX_TCP_MESSAGE + 2)?,
            r.bytes("dns partial message", MAX_TCP_MESSAGE + 2)?,
        ];
        let at = r.at();
        let n = usize::from(r.u8("dns transaction count")?);
        bound("dns transaction count", at, n as u64, MAX_TXS as u64)?;
        let mut txs = VecDeque::with_capacity(n);
        for _ in 0..n {
            let id = r.counter("dns transaction id")?;
            let dns_id = r.u16("dns message id")?;
            let at = r.at();
            let q = usize::from(r.u8("dns question count")?);
            bound("dns question count", at, q as u64, MAX_QUESTIONS as u64)?;
            let mut queries = Vec::with_capacity(q);
            let mut types = Vec::with_capacity(q);
            for _ in 0..q {
                queries.push(r.bytes("dns question name", 1024)?);
                types.push(r.u16("dns question type")?);
            }
            let rcode = match r.bool("dns rcode")? {
                false => None,
                true => Some(r.u8("dns rcode")?),
            };
            let f = r.flags("dns transaction flags", 4)?;
            txs.push_back(DnsTx {
                id,
                dns_id,
                queries,
                types,
                answered: f & 1 != 0,
                rcode,
                updated: f & 2 != 0,
                response_only: f & 4 != 0,
                logged: f & 8 != 0,
            });
        }
        Ok(DnsParser {
            txs,
            next_id,
            tcp_buf,
            counters: DnsCounters::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut m = vec![(id >> 8) as u8, id as u8, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            m.push(label.len() as u8);
            m.extend_from_slice(label.as_bytes());
        }
        m.extend_from_slice(&[0, 0, 1, 0, 1]);
        m
    }

    #[test]
    fn queries_and_responses() {
        let mut p = DnsParser::new();
        p.parse_datagram(&query(7, "www.Google.com"));
        let mut resp = query(7, "www.Google.com");
        resp[2] |= 0x80;
        p.parse_datagram(&resp);
        assert_eq!(p.txs().len(), 1);
        assert_eq!(p.txs()[0].queries, vec![b"www.Google.com".to_vec()]);
        assert!(p.txs()[0].answered);
    }

    #[test]
    fn tcp_messages_across_segments() {
        let mut p = DnsParser::new();
        let q = query(1, "aol.com");
        let mut framed = vec![0, q.len() as u8];
        framed.extend_from_slice(&q);
        framed.extend_from_slice(&framed.clone());
        for c in framed.chunks(5) {
            p.parse_stream(true, c);
        }
        assert_eq!(p.txs().len(), 2);
    }

    #[test]
    fn compression_loops_and_forward_pointers_are_refused() {
        // A name pointing at itself.
        let mut m = vec![0, 1, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1];
        assert_eq!(parse_message(&m), Err(DnsError::BadName));
        // A pointer forwards.
        m[13] = 16;
        assert_eq!(parse_message(&m), Err(DnsError::BadName));
        assert_eq!(parse_message(&[0; 5]), Err(DnsError::Truncated));
        // A backward pointer is fine.
        let mut ok = query(1, "a.com");
        ok[5] = 2;
        ok.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(parse_message(&ok).unwrap().questions.len(), 2);
    }
}
