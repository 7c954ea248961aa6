//! TLS, light: the client's first ClientHello and its server name.
//!
//! The client's bytes are cut into TLS records; handshake records are joined
//! (a ClientHello may span records, and records span TCP segments) until the
//! first handshake message is complete, bounded by `MAX_HANDSHAKE`. When it
//! is a ClientHello, its `server_name` extension gives the `tls.sni` buffer.
//! The parser then stops: what follows is encrypted or not needed.

/// Largest handshake message buffered.
pub const MAX_HANDSHAKE: usize = 64 * 1024;

/// Whether `data` starts like a TLS handshake record: `Some(true)`,
/// `Some(false)`, or `None` when too short to tell.
pub fn looks_like_tls(data: &[u8]) -> Option<bool> {
    match data {
        [] => None,
        [0x16] | [0x16, 0x03] => None,
        [0x16, 0x03, v, ..] if *v <= 0x04 => Some(true),
        _ => Some(false),
    }
}

/// State of the client direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    #[default]
    Records,
    Done,
    Failed,
}

/// The TLS state of one flow.
#[derive(Debug, Default)]
pub struct TlsParser {
    state: State,
    /// Partial record.
    record: Vec<u8>,
    /// Handshake bytes joined from records.
    handshake: Vec<u8>,
    /// The ClientHello was parsed.
    pub client_hello: bool,
    /// Its server name.
    pub sni: Option<Vec<u8>>,
    /// Its legacy version field.
    pub version: Option<u16>,
    /// Changed since detection last looked.
    pub updated: bool,
    /// Malformed input stopped the parser.
    pub malformed: bool,
    /// Its EVE record was produced.
    pub logged: bool,
}

impl TlsParser {
    /// A parser for a new flow.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds client-to-server bytes.
    pub fn parse_client(&mut self, mut data: &[u8]) {
        while self.state == State::Records && !data.is_empty() {
            // Complete the 5-byte record header, then the record.
            let need = if self.record.len() < 5 {
                5 - self.record.len()
            } else {
                let len = usize::from(u16::from_be_bytes([self.record[3], self.record[4]]));
                5 + len - self.record.len()
            };
            let take = need.min(data.len());
            self.record.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.record.len() == 5 {
                let len = usize::from(u16::from_be_bytes([self.record[3], self.record[4]]));
                if self.record[0] != 0x16 || self.record[1] != 0x03 || len == 0 || len > 16384 + 2048 {
                    self.fail();
                    return;
                }
                continue;
            }
            if self.record.len() < 5 {
                continue;
            }
            let len = usize::from(u16::from_be_bytes([self.record[3], self.record[4]]));
            if self.record.len() == 5 + len {
                let body = std::mem::take(&mut self.record);
                self.handshake_bytes(&body[5..]);
            }
        }
    }

    fn fail(&mut self) {
        self.state = State::Failed;
        self.malformed = true;
        self.record = Vec::new();
        self.handshake = Vec::new();
    }

    fn handshake_bytes(&mut self, bytes: &[u8]) {
        self.handshake.extend_from_slice(bytes);
        if self.handshake.len() < 4 {
            return;
        }
        let len = (usize::from(self.handshake[1]) << 16)
            | (usize::from(self.handshake[2]) << 8)
            | usize::from(self.handshake[3]);
        if len > MAX_HANDSHAKE {
            self.fail();
            return;
        }
        if self.handshake.len() < 4 + len {
            return;
        }
        if self.handshake[0] != 1 {
            // Not a ClientHello first: nothing for us.
            self.state = State::Done;
            return;
        }
        let hello = std::mem::take(&mut self.handshake);
        match parse_client_hello(&hello[4..4 + len]) {
            Some((version, sni)) => {
                self.client_hello = true;
                self.version = Some(version);
                self.sni = sni;
                self.updated = true;
                self.state = State::Done;
            }
            None => self.fail(),
        }
    }
}

/// The legacy version and server name of a ClientHello body.
pub fn parse_client_hello(b: &[u8]) -> Option<(u16, Option<Vec<u8>>)> {
    let version = u16::from_be_bytes([*b.first()?, *b.get(1)?]);
    let mut at = 2 + 32;
    let sid = usize::from(*b.get(at)?);
    at += 1 + sid;
    let suites = usize::from(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]));
    at += 2 + suites;
    let comp = usize::from(*b.get(at)?);
    at += 1 + comp;
    if at == b.len() {
        return Some((version, None));
    }
    let ext_len = usize::from(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]));
    at += 2;
    let exts = b.get(at..at + ext_len)?;
    let mut i = 0;
    while i + 4 <= exts.len() {
        let t = u16::from_be_bytes([exts[i], exts[i + 1]]);
        let l = usize::from(u16::from_be_bytes([exts[i + 2], exts[i + 3]]));
        let body = exts.get(i + 4..i + 4 + l)?;
        if t == 0 {
            // server_name: list length, then (type, length, name) entries.
            let mut j = 2;
            while j + 3 <= body.len() {
                let nt = body[j];
                let nl = usize::from(u16::from_be_bytes([body[j + 1], body[j + 2]]));
                let name = body.get(j + 3..j + 3 + nl)?;
                if nt == 0 {
                    return Some((version, Some(name.to_vec())));
                }
                j += 3 + nl;
            }
        }
        i += 4 + l;
    }
    Some((version, None))
}

// Carrying the parser to another host (live migration): `crate::persist`.
impl TlsParser {
    /// Appends the parser's state.
    pub(crate) fn persist(&self, out: &mut Vec<u8>) {
        use crate::persist::{put_bytes, put_opt_bytes, put_u16};
        out.push(match self.state {
            State::Records => 0,
            State::Done => 1,
            State::Failed => 2,
        });
        put_bytes(out, &self.record);
        put_bytes(out, &self.handshake);
        put_opt_bytes(out, self.sni.as_deref());
        match self.version {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                put_u16(out, v);
            }
        }
        out.push(
            u8::from(self.client_hello)
                | u8::from(self.updated) << 1
                | u8::from(self.malformed) << 2
                | u8::from(self.logged) << 3,
        );
    }

    /// A parser from [`TlsParser::persist`]'s bytes. A partial record must
    /// be one whose header the parser accepted (it counts on its length).
    pub(crate) fn restore(r: &mut crate::persist::Reader<'_>) -> crate::persist::Result<TlsParser> {
        use crate::persist::inconsistent;
        let state = match r.code("tls state", 2)? {
            0 => State::Records,
            1 => State::Done,
            _ => State::Failed,
        };
        let at = r.at();
        let record = r.bytes("tls record", 5 + 16384 + 2048)?;
        if record.len() >= 5 {
            let len = usize::from(u16::from_be_bytes([record[3], record[4]]));
            if record[0] != 0x16 || record[1] != 0x03 || len == 0 || len > 16384 + 2048 || record.len() >= 5 + len {
                return Err(inconsistent("tls record", at, "not a partial handshake record"));
            }
        }
        let handshake = r.bytes("tls handshake", MAX_HANDSHAKE + 4)?;
        let sni = r.opt_bytes("tls server name", MAX_HANDSHAKE)?;
        let version = match r.bool("tls version")? {
            false => None,
            true => Some(r.u16("tls version")?),
        };
        let f = r.flags("tls flags", 4)?;
        Ok(TlsParser {
            state,
            record,
            handshake,
            client_hello: f & 1 != 0,
            sni,
            version,
            updated: f & 2 != 0,
            malformed: f & 4 != 0,
            logged: f & 8 != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_hello(sni: &str) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[0u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        let name = sni.as_bytes();
        let mut ext = vec![0, 0];
        let list_len = 3 + name.len();
        let ext_len = 2 + list_len;
        ext.extend_from_slice(&(ext_len as u16).to_be_bytes());
        ext.extend_from_slice(&(list_len as u16).to_be_bytes());
        ext.push(0);
        ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
        ext.extend_from_slice(name);
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![1, 0, (body.len() >> 8) as u8, body.len() as u8];
        hs.extend_from_slice(&body);
        hs
    }

    fn records(hs: &[u8], max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in hs.chunks(max) {
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    #[test]
    fn sni_from_a_hello_split_over_records_and_segments() {
        let hs = client_hello("www.google.com");
        for record_max in [7, 50, 4000] {
            for seg in [1, 3, 100, 10_000] {
                let mut p = TlsParser::new();
                for c in records(&hs, record_max).chunks(seg) {
                    p.parse_client(c);
                }
                assert_eq!(
                    p.sni.as_deref(),
                    Some(&b"www.google.com"[..]),
                    "records {record_max} segments {seg}"
                );
            }
        }
    }

    #[test]
    fn garbage_stops_the_parser() {
        let mut p = TlsParser::new();
        p.parse_client(b"GET / HTTP/1.1\r\n");
        assert!(p.malformed && p.sni.is_none());
        assert_eq!(looks_like_tls(b"\x16\x03\x01\x02\x00"), Some(true));
        assert_eq!(looks_like_tls(b"\x16"), None);
        assert_eq!(looks_like_tls(b"\x17\x03\x03"), Some(false));
        // Truncated hello bodies do not panic.
        let hs = client_hello("a.b");
        for n in 0..hs.len() - 4 {
            let _ = parse_client_hello(&hs[4..4 + n]);
        }
    }
}
