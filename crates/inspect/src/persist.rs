//! One flow's inspection state as bytes, to move it to another host's
//! inspector (live migration) and take it up there where it stopped.
//!
//! [`Inspector::export_flow`] writes a [`FlowState`] as one record;
//! [`Inspector::import_flow`] reads it back under the destination's rules.
//! The record carries what later matching depends on: the flow's verdict
//! (a dropped flow stays dropped), its ends and counts, the detection state
//! (flowbits by *name* and per-flow thresholds and transaction progress by
//! signature *gid:sid*, so two hosts that numbered the same rules
//! differently agree; what the destination's rules lack is dropped and
//! counted), the TCP session (handshake state, each direction's sequence
//! base, acknowledgment and progress offsets, and the bytes it still holds:
//! the lookbehind before the next segment and out-of-order segments), and
//! the application-layer state where it is state, not derived: detection
//! in progress (the bytes probed so far), and each parser where it stopped
//! (HTTP/1: each direction's line, headers and body framing and the live
//! transactions; HTTP/2: each direction's frame in progress and its HPACK
//! dynamic table, and the live streams' transactions; TLS: the partial
//! record and handshake; DNS: partial TCP messages and live queries),
//! with per-transaction detection progress, so nothing alerts twice and a
//! header block after the switchover decodes against the table before it.
//! Parser counters stay behind (they count, they do not decide). A flow
//! whose record would exceed [`MAX_RECORD`] is written with a *resume*
//! marker instead of its reassembly and parser state, and the destination
//! takes both up as a mid-stream pick-up does (a session from the next
//! packet, detection on the next bytes), counted in
//! [`crate::Counters::imported_midstream`]; so are flows whose held bytes
//! the destination's limits cannot take. The profile goes by name; the
//! caller maps an unknown one ([`ImportedFlow::profile`] is `None`).
//!
//! Times travel as ages relative to the exporter's clock (a threshold
//! window's start), so the hosts' clocks need not agree.
//!
//! A record from the network is hostile input: every length is bounded,
//! every enumerated value checked, every offset relation the reassembler
//! relies on verified (data between its start and end, out-of-order
//! segments sorted, disjoint and beyond the contiguous data, offsets below
//! 2^62 so no arithmetic on them overflows), and a refusal is a
//! [`PersistError`] naming the field and its offset; decoding never panics.
//! Bytes the destination's limits cannot hold (its out-of-order bounds, its
//! stream memory budget) do not refuse the record: that flow's reassembly
//! is resumed mid-stream instead, counted as above.
//!
//! Layout (big-endian), version 1:
//!
//! ```text
//! magic "PLSI" | version u16 | profile: len u8, utf-8 | protocol u8
//! | client: family u8 (4|6), address, port u16 | server: same
//! | flags u8 (seen to server, seen to client, reversed, alerted) | verdict u8
//! | packets 2 × u64 | bytes 2 × u64
//! | flowbits: count u16, count × (len u8, name)
//! | thresholds: count u16, count × (gid u32, sid u32, has u8 [age_ns u64, count u32])
//! | transactions: count u16 (≤ 128), count × (proto u8, id u64, n u16, n × (gid u32, sid u32))
//! | tcp u8 (0 none, 1 session, 2 resume) [state u8 | flags u8 (midstream, fin ×2, rst) | 2 × stream]
//! | app u8 (0 probing [2 × (failed u8, len u8, held)], 1 nothing parsed, 2 resume,
//!   3 HTTP/1, 4 HTTP/2, 5 TLS, 6 DNS: each parser's own fields, `app/*.rs`)
//! stream: present u8 [base_seq u32 | data_start u64 | next u64 | acked u64
//!   | flags u8 (acked known, depth reached, fin known) | fin u64 | raw u64 | app u64
//!   | data: len u32, bytes | out of order: count u16, count × (offset u64, len u32, bytes)]
//! ```

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::collections::HashMap;
use std::time::Duration;

use crate::app::dns::DnsParser;
use crate::app::http::HttpParser;
use crate::app::http2::Http2Parser;
use crate::app::tls::TlsParser;
use crate::app::{AppState, Probe};
use crate::engine::Inspector;
use crate::flow::{DetectState, FlowCounts, FlowState, FlowVerdict, ProfileId, TxDone};
use crate::prefilter::SigId;
use crate::rules::AppProto;
use crate::stream::{Segment, Stream};
use crate::tcp::{TcpSession, TcpState};
use crate::threshold::Window;

const MAGIC: &[u8; 4] = b"PLSI";
/// The record format version this build writes and reads.
pub const VERSION: u16 = 1;
/// Largest record accepted (two directions' held bytes and the detection state fit well under it).
pub const MAX_RECORD: usize = 16 << 20;
/// Stream offsets at or beyond this are refused (so offset arithmetic cannot overflow).
const MAX_OFFSET: u64 = 1 << 62;
/// Bytes one direction may hold in a record (contiguous and out of order together).
const MAX_HELD: usize = 4 << 20;
/// Out-of-order segments one direction may hold in a record.
const MAX_OOO_SEGMENTS: usize = 1024;
/// Transactions whose detection progress a record may carry (the engine keeps 128).
const MAX_TXS: usize = 128;
/// Bytes a probing direction holds at most (the engine's probe window).
const MAX_PROBE: usize = 64;

/// Why a record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PersistError {
    /// The record ends inside a field.
    #[error("inspection record truncated: {field} at offset {offset} needs {needed} bytes, {left} left")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Where it starts.
        offset: usize,
        /// Bytes it needs.
        needed: usize,
        /// Bytes the record has left.
        left: usize,
    },
    /// Not an inspection-state record.
    #[error("not a Palisade inspection-state record (bad magic)")]
    BadMagic,
    /// A version this build does not read.
    #[error("inspection record version {found} is not one this build reads (it reads version {VERSION})")]
    UnknownVersion {
        /// The record's version.
        found: u16,
    },
    /// A field holds a value it cannot have (an unknown enumeration value, a flag bit not defined).
    #[error("inspection record: {field} at offset {offset} has the invalid value {value}")]
    BadValue {
        /// The field.
        field: &'static str,
        /// Where it is.
        offset: usize,
        /// What it holds.
        value: u64,
    },
    /// A count or length over its bound.
    #[error("inspection record: {field} at offset {offset} is {len}, more than the {max} allowed")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Where it is.
        offset: usize,
        /// Its value.
        len: u64,
        /// The bound.
        max: u64,
    },
    /// Fields that contradict each other.
    #[error("inspection record: {field} at offset {offset}: {why}")]
    Inconsistent {
        /// The field found at fault.
        field: &'static str,
        /// Where it is.
        offset: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// Bytes after the record's end.
    #[error("inspection record: {0} bytes after its end")]
    Trailing(usize),
}

/// What the destination's rules call things: built once per batch of
/// imports ([`Inspector::flow_importer`]) and used for each record.
#[derive(Debug, Clone)]
pub struct FlowImporter {
    generation: u64,
    profiles: HashMap<String, ProfileId>,
    flowbits: HashMap<String, u32>,
    sigs: HashMap<(u32, u32), SigId>,
}

/// A flow taken over from a record.
#[derive(Debug)]
pub struct ImportedFlow {
    /// Its state, ready for [`Inspector::inspect`].
    pub flow: FlowState,
    /// The profile name the record gave.
    pub profile_name: String,
    /// That profile here, or `None`: this inspector has no profile of that
    /// name (the flow's state then names the first profile; the caller
    /// decides, as for a flow whose profile it does not know).
    pub profile: Option<ProfileId>,
    /// The application layer (or the reassembly) could not be carried and
    /// is taken up mid-stream.
    pub resumed_midstream: bool,
    /// Flowbits and signatures the record named that these rules lack.
    pub unknown_refs: u32,
}

impl Inspector {
    /// The names this inspector's rules and profiles use, for [`Inspector::import_flow`].
    pub fn flow_importer(&self) -> FlowImporter {
        let rules = self.rules();
        FlowImporter {
            generation: rules.generation(),
            profiles: self
                .detectors()
                .iter()
                .enumerate()
                .map(|(i, d)| (d.spec.name.clone(), ProfileId(i as u16)))
                .collect(),
            flowbits: rules
                .flowbit_names()
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), i as u32))
                .collect(),
            sigs: rules
                .signatures()
                .iter()
                .enumerate()
                .map(|(i, s)| ((s.rule.gid, s.rule.sid), i as SigId))
                .collect(),
        }
    }

    /// Append `flow`'s state as one record to `out`, at this inspector's
    /// time `now`. A flow whose record would pass [`MAX_RECORD`] (held
    /// bytes and parsed buffers near every bound at once) is written
    /// without its reassembly and application-layer state: the destination
    /// takes those up mid-stream.
    pub fn export_flow(&self, flow: &FlowState, now: Duration, out: &mut Vec<u8>) {
        let start = out.len();
        self.write_flow(flow, now, out, false);
        if out.len() - start > MAX_RECORD {
            out.truncate(start);
            self.write_flow(flow, now, out, true);
        }
    }

    fn write_flow(&self, flow: &FlowState, now: Duration, out: &mut Vec<u8>, lean: bool) {
        let rules = self.rules();
        let profile = self
            .detectors()
            .get(usize::from(flow.profile.0))
            .or_else(|| self.detectors().first())
            .map_or("", |d| d.spec.name.as_str());
        out.extend_from_slice(MAGIC);
        put_u16(out, VERSION);
        put_name(out, profile);
        out.push(flow.protocol);
        put_end(out, flow.client);
        put_end(out, flow.server);
        let flags = u8::from(flow.seen[0])
            | u8::from(flow.seen[1]) << 1
            | u8::from(flow.reversed) << 2
            | u8::from(flow.detect.alerted) << 3;
        out.push(flags);
        out.push(match flow.verdict {
            FlowVerdict::Inspect => 0,
            FlowVerdict::Pass => 1,
            FlowVerdict::Drop => 2,
        });
        for v in flow.counts.packets.iter().chain(&flow.counts.bytes) {
            put_u64(out, *v);
        }
        // Detection state under the rules it was built with; a flow not yet
        // adopted by these rules carries none.
        let current = flow.detect.generation == rules.generation();
        let names = rules.flowbit_names();
        let bits: Vec<&str> = if current {
            (0..names.len())
                .filter(|&b| flow.detect.flowbit(b as u32))
                .map(|b| names[b].as_str())
                .filter(|n| n.len() <= usize::from(u8::MAX))
                .take(usize::from(u16::MAX))
                .collect()
        } else {
            Vec::new()
        };
        put_u16(out, bits.len() as u16);
        for n in bits {
            put_name(out, n);
        }
        let sid_of = |id: SigId| {
            let r = &rules.get(id).rule;
            (r.gid, r.sid)
        };
        let thresholds: &[(SigId, Option<Window>)] = if current { &flow.detect.thresholds } else { &[] };
        let thresholds = &thresholds[..thresholds.len().min(usize::from(u16::MAX))];
        put_u16(out, thresholds.len() as u16);
        for (sig, w) in thresholds {
            let (gid, sid) = sid_of(*sig);
            put_u32(out, gid);
            put_u32(out, sid);
            match w {
                Some(w) => {
                    out.push(1);
                    put_u64(
                        out,
                        now.saturating_sub(w.start).as_nanos().min(u128::from(u64::MAX)) as u64,
                    );
                    put_u32(out, w.count);
                }
                None => out.push(0),
            }
        }
        // Transaction progress refers to the parser's transactions: only with the parser.
        let txs: &[TxDone] = if current && !lean { &flow.detect.txs } else { &[] };
        let txs = &txs[..txs.len().min(MAX_TXS)];
        put_u16(out, txs.len() as u16);
        for t in txs {
            out.push(proto_code(t.proto));
            put_u64(out, t.id);
            let done = &t.done[..t.done.len().min(usize::from(u16::MAX))];
            put_u16(out, done.len() as u16);
            for &sig in done {
                let (gid, sid) = sid_of(sig);
                put_u32(out, gid);
                put_u32(out, sid);
            }
        }
        match flow.tcp.as_deref() {
            None => out.push(0),
            Some(_) if lean => out.push(2),
            Some(t) => {
                out.push(1);
                out.push(match t.state {
                    TcpState::None => 0,
                    TcpState::SynSent => 1,
                    TcpState::SynRecv => 2,
                    TcpState::Established => 3,
                    TcpState::Closing => 4,
                    TcpState::Closed => 5,
                });
                out.push(
                    u8::from(t.midstream) | u8::from(t.fin[0]) << 1 | u8::from(t.fin[1]) << 2 | u8::from(t.rst) << 3,
                );
                for s in &t.streams {
                    put_stream(out, s.as_ref());
                }
            }
        }
        match &flow.app {
            AppState::Probing(p) => {
                out.push(0);
                for probe in p {
                    let held = &probe.held[..probe.held.len().min(MAX_PROBE)];
                    out.push(u8::from(probe.failed));
                    out.push(held.len() as u8);
                    out.extend_from_slice(held);
                }
            }
            AppState::Unknown => out.push(1),
            _ if lean => out.push(2),
            AppState::Http(h) => {
                out.push(3);
                h.persist(out);
            }
            AppState::Http2(h) => {
                out.push(4);
                h.persist(out);
            }
            AppState::Tls(t) => {
                out.push(5);
                t.persist(out);
            }
            AppState::Dns(d) => {
                out.push(6);
                d.persist(out);
            }
        }
    }

    /// Take up a flow from `record` (made by [`Inspector::export_flow`] on
    /// any host) at this inspector's time `now`, its held stream bytes
    /// charged to this inspector's budget. Refused records change nothing.
    pub fn import_flow(&mut self, importer: &FlowImporter, record: &[u8], now: Duration) -> Result<ImportedFlow> {
        let mut imported = decode(importer, record, now)?;
        let (config, budget, counters) = self.persist_parts();
        let limits = config.stream;
        let mut fits = true;
        if let Some(t) = imported.flow.tcp.as_deref() {
            for s in t.streams.iter().flatten() {
                fits &= s.ooo.len() <= limits.max_ooo_segments && s.ooo_bytes <= limits.max_ooo_bytes;
            }
        }
        if let Some(t) = imported.flow.tcp.as_deref_mut()
            && fits
        {
            let mut charged = Vec::new();
            for s in t.streams.iter_mut().flatten() {
                let n = s.held();
                if budget.charge(n) {
                    s.charged = n;
                    charged.push(n);
                } else {
                    fits = false;
                    break;
                }
            }
            if !fits {
                for n in charged {
                    budget.release(n);
                }
                for s in t.streams.iter_mut().flatten() {
                    s.charged = 0;
                }
            }
        }
        if !fits {
            // The held bytes do not fit here: the connection is taken up as
            // a mid-stream pick-up (a session from its next packet), and its
            // application layer with it (the bytes it parsed are gone).
            imported.flow.tcp = Some(Box::new(TcpSession::new()));
            imported.flow.app = AppState::default();
            imported.flow.detect.txs.clear();
            imported.resumed_midstream = true;
        }
        counters.flows_imported += 1;
        counters.imported_midstream += u64::from(imported.resumed_midstream);
        counters.imported_unknown_refs += u64::from(imported.unknown_refs);
        Ok(imported)
    }
}

impl Inspector {
    /// Give back the stream memory `flow` holds, dropping it without
    /// inspecting what it holds (an import undone, a flow forgotten).
    pub fn discard_flow(&mut self, mut flow: FlowState) {
        self.release_flow_memory(&mut flow);
    }

    /// Give back the stream memory `flow` holds (the caller is about to
    /// drop it without [`Inspector::flush`]): its streams are emptied.
    pub fn release_flow_memory(&mut self, flow: &mut FlowState) {
        let (_, budget, _) = self.persist_parts();
        if let Some(t) = flow.tcp.as_mut() {
            t.release(budget);
        }
    }
}

fn proto_code(p: AppProto) -> u8 {
    match p {
        AppProto::Http => 0,
        AppProto::Tls => 1,
        AppProto::Dns => 2,
    }
}

pub(crate) fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// A name of at most 255 bytes (longer ones are cut: no rule or profile name is that long).
fn put_name(out: &mut Vec<u8>, name: &str) {
    let mut n = name.len().min(usize::from(u8::MAX));
    while !name.is_char_boundary(n) {
        n -= 1;
    }
    out.push(n as u8);
    out.extend_from_slice(&name.as_bytes()[..n]);
}

/// Bytes with a u32 length.
pub(crate) fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len() as u32);
    out.extend_from_slice(b);
}

/// Optional bytes: a presence byte, then the bytes.
pub(crate) fn put_opt_bytes(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        None => out.push(0),
        Some(b) => {
            out.push(1);
            put_bytes(out, b);
        }
    }
}

fn put_end(out: &mut Vec<u8>, (addr, port): (IpAddr, u16)) {
    match addr {
        IpAddr::V4(a) => {
            out.push(4);
            out.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            out.push(6);
            out.extend_from_slice(&a.octets());
        }
    }
    put_u16(out, port);
}

fn put_stream(out: &mut Vec<u8>, s: Option<&Stream>) {
    let Some(s) = s else {
        out.push(0);
        return;
    };
    out.push(1);
    put_u32(out, s.base_seq);
    put_u64(out, s.data_start);
    put_u64(out, s.next);
    put_u64(out, s.acked);
    out.push(u8::from(s.acked_known) | u8::from(s.depth_reached) << 1 | u8::from(s.fin.is_some()) << 2);
    put_u64(out, s.fin.unwrap_or(0));
    put_u64(out, s.raw_progress);
    put_u64(out, s.app_progress);
    put_u32(out, s.data.len() as u32);
    out.extend_from_slice(&s.data);
    put_u16(out, s.ooo.len() as u16);
    for seg in &s.ooo {
        put_u64(out, seg.offset);
        put_u32(out, seg.bytes.len() as u32);
        out.extend_from_slice(&seg.bytes);
    }
}

/// Reads a record, naming each field and where it is when it is refused.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

pub(crate) type Result<T> = core::result::Result<T, PersistError>;

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8]> {
        let left = self.buf.len() - self.at;
        if n > left {
            return Err(PersistError::Truncated {
                field,
                offset: self.at,
                needed: n,
                left,
            });
        }
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8> {
        Ok(self.take(1, field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64> {
        let b = self.take(8, field)?;
        let mut a = [0; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A flags byte whose bits above `bits` must be clear.
    pub(crate) fn flags(&mut self, field: &'static str, bits: u32) -> Result<u8> {
        let at = self.at;
        let v = self.u8(field)?;
        if u32::from(v) >> bits != 0 {
            return Err(PersistError::BadValue {
                field,
                offset: at,
                value: u64::from(v),
            });
        }
        Ok(v)
    }

    /// A value of at most `max` (an enumeration's code).
    pub(crate) fn code(&mut self, field: &'static str, max: u8) -> Result<u8> {
        let at = self.at;
        let v = self.u8(field)?;
        if v > max {
            return Err(PersistError::BadValue {
                field,
                offset: at,
                value: u64::from(v),
            });
        }
        Ok(v)
    }

    pub(crate) fn count(&mut self, field: &'static str, max: usize) -> Result<usize> {
        let at = self.at;
        let n = usize::from(self.u16(field)?);
        bound(field, at, n as u64, max as u64)?;
        Ok(n)
    }

    pub(crate) fn bool(&mut self, field: &'static str) -> Result<bool> {
        Ok(self.code(field, 1)? == 1)
    }

    /// Bytes with a u32 length of at most `max`.
    pub(crate) fn bytes(&mut self, field: &'static str, max: usize) -> Result<Vec<u8>> {
        let at = self.at;
        let n = self.u32(field)? as usize;
        bound(field, at, n as u64, max as u64)?;
        Ok(self.take(n, field)?.to_vec())
    }

    /// Optional bytes ([`put_opt_bytes`]).
    pub(crate) fn opt_bytes(&mut self, field: &'static str, max: usize) -> Result<Option<Vec<u8>>> {
        Ok(match self.bool(field)? {
            false => None,
            true => Some(self.bytes(field, max)?),
        })
    }

    /// Where the next field starts.
    pub(crate) fn at(&self) -> usize {
        self.at
    }

    /// A transaction or message counter, below 2^62 so counting on cannot overflow.
    pub(crate) fn counter(&mut self, field: &'static str) -> Result<u64> {
        self.offset(field)
    }

    pub(crate) fn offset(&mut self, field: &'static str) -> Result<u64> {
        let at = self.at;
        let v = self.u64(field)?;
        bound(field, at, v, MAX_OFFSET - 1)?;
        Ok(v)
    }

    pub(crate) fn name(&mut self, field: &'static str) -> Result<&'a str> {
        let len = usize::from(self.u8(field)?);
        let at = self.at;
        let b = self.take(len, field)?;
        core::str::from_utf8(b).map_err(|_| PersistError::Inconsistent {
            field,
            offset: at,
            why: "not UTF-8",
        })
    }

    pub(crate) fn end(&mut self, field: &'static str) -> Result<(IpAddr, u16)> {
        let at = self.at;
        let addr = match self.u8(field)? {
            4 => {
                let b = self.take(4, field)?;
                IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
            }
            6 => {
                let mut a = [0; 16];
                a.copy_from_slice(self.take(16, field)?);
                IpAddr::V6(Ipv6Addr::from(a))
            }
            v => {
                return Err(PersistError::BadValue {
                    field,
                    offset: at,
                    value: u64::from(v),
                });
            }
        };
        Ok((addr, self.u16(field)?))
    }
}

pub(crate) fn bound(field: &'static str, offset: usize, len: u64, max: u64) -> Result<()> {
    if len > max {
        return Err(PersistError::TooLong {
            field,
            offset,
            len,
            max,
        });
    }
    Ok(())
}

pub(crate) fn inconsistent(field: &'static str, offset: usize, why: &'static str) -> PersistError {
    PersistError::Inconsistent { field, offset, why }
}

/// Decodes a record into a flow under `importer`'s names, charging nothing.
fn decode(importer: &FlowImporter, record: &[u8], now: Duration) -> Result<ImportedFlow> {
    bound("record", 0, record.len() as u64, MAX_RECORD as u64)?;
    let mut r = Reader { buf: record, at: 0 };
    if r.take(4, "magic")? != MAGIC {
        return Err(PersistError::BadMagic);
    }
    let version = r.u16("version")?;
    if version != VERSION {
        return Err(PersistError::UnknownVersion { found: version });
    }
    let profile_name = r.name("profile")?.to_string();
    let profile = importer.profiles.get(&profile_name).copied();
    let protocol = r.u8("protocol")?;
    let client = r.end("client")?;
    let server = r.end("server")?;
    let flags = r.flags("flow flags", 4)?;
    let verdict = match r.code("verdict", 2)? {
        0 => FlowVerdict::Inspect,
        1 => FlowVerdict::Pass,
        _ => FlowVerdict::Drop,
    };
    let mut counts = FlowCounts::default();
    for v in counts.packets.iter_mut().chain(counts.bytes.iter_mut()) {
        *v = r.u64("counts")?;
    }
    let mut unknown_refs = 0u32;
    let mut detect = DetectState {
        generation: importer.generation,
        alerted: flags & 8 != 0,
        ..DetectState::default()
    };
    for _ in 0..r.count("flowbit count", usize::from(u16::MAX))? {
        let name = r.name("flowbit")?;
        match importer.flowbits.get(name) {
            Some(&bit) => detect.set_flowbit(bit, true),
            None => unknown_refs += 1,
        }
    }
    for _ in 0..r.count("threshold count", usize::from(u16::MAX))? {
        let key = (r.u32("threshold gid")?, r.u32("threshold sid")?);
        let window = match r.code("threshold window", 1)? {
            0 => None,
            _ => {
                let age = Duration::from_nanos(r.u64("threshold age")?);
                let count = r.u32("threshold count")?;
                Some(Window {
                    start: now.saturating_sub(age),
                    count,
                })
            }
        };
        match importer.sigs.get(&key) {
            Some(&sig) => *detect.threshold(sig) = window,
            None => unknown_refs += 1,
        }
    }
    for _ in 0..r.count("transaction count", MAX_TXS)? {
        let proto = match r.code("transaction protocol", 2)? {
            0 => AppProto::Http,
            1 => AppProto::Tls,
            _ => AppProto::Dns,
        };
        let id = r.u64("transaction id")?;
        let mut done = Vec::new();
        for _ in 0..r.count("transaction signatures", usize::from(u16::MAX))? {
            let key = (r.u32("transaction gid")?, r.u32("transaction sid")?);
            match importer.sigs.get(&key) {
                Some(&sig) => done.push(sig),
                None => unknown_refs += 1,
            }
        }
        done.sort_unstable();
        done.dedup();
        if !detect.txs.iter().any(|t| t.proto == proto && t.id == id) {
            detect.txs.push(TxDone { proto, id, done });
        }
    }
    let mut resumed_midstream = false;
    let tcp = match r.code("tcp", 2)? {
        0 => None,
        2 => {
            resumed_midstream = true;
            Some(Box::new(TcpSession::new()))
        }
        _ => {
            let state = match r.code("tcp state", 5)? {
                0 => TcpState::None,
                1 => TcpState::SynSent,
                2 => TcpState::SynRecv,
                3 => TcpState::Established,
                4 => TcpState::Closing,
                _ => TcpState::Closed,
            };
            let f = r.flags("tcp flags", 4)?;
            let mut t = TcpSession::new();
            t.state = state;
            t.midstream = f & 1 != 0;
            t.fin = [f & 2 != 0, f & 4 != 0];
            t.rst = f & 8 != 0;
            for d in 0..2 {
                t.streams[d] = read_stream(&mut r)?;
            }
            Some(Box::new(t))
        }
    };
    let app = match r.code("app", 6)? {
        0 => {
            let mut probes: [Probe; 2] = Default::default();
            for p in &mut probes {
                p.failed = r.code("probe failed", 1)? == 1;
                let at = r.at;
                let len = usize::from(r.u8("probe length")?);
                bound("probe length", at, len as u64, MAX_PROBE as u64)?;
                p.held = r.take(len, "probe bytes")?.to_vec();
            }
            AppState::Probing(probes)
        }
        1 => AppState::Unknown,
        2 => {
            resumed_midstream = true;
            detect.txs.clear();
            AppState::default()
        }
        3 => AppState::Http(Box::new(HttpParser::restore(&mut r)?)),
        4 => AppState::Http2(Box::new(Http2Parser::restore(&mut r)?)),
        5 => AppState::Tls(Box::new(TlsParser::restore(&mut r)?)),
        _ => AppState::Dns(Box::new(DnsParser::restore(&mut r)?)),
    };
    if r.at != record.len() {
        return Err(PersistError::Trailing(record.len() - r.at));
    }
    let flow = FlowState {
        profile: profile.unwrap_or(ProfileId(0)),
        protocol,
        client,
        server,
        seen: [flags & 1 != 0, flags & 2 != 0],
        tcp,
        app,
        detect,
        verdict,
        counts,
        reversed: flags & 4 != 0,
    };
    Ok(ImportedFlow {
        flow,
        profile_name,
        profile,
        resumed_midstream,
        unknown_refs,
    })
}

fn read_stream(r: &mut Reader<'_>) -> Result<Option<Stream>> {
    if r.code("stream", 1)? == 0 {
        return Ok(None);
    }
    let mut s = Stream::new(r.u32("stream base sequence")?);
    let start_at = r.at;
    s.data_start = r.offset("stream data start")?;
    s.next = r.offset("stream next")?;
    s.acked = r.offset("stream acked")?;
    let f = r.flags("stream flags", 3)?;
    s.acked_known = f & 1 != 0;
    s.depth_reached = f & 2 != 0;
    let fin = r.offset("stream fin")?;
    s.fin = (f & 4 != 0).then_some(fin);
    let raw_at = r.at;
    s.raw_progress = r.offset("stream inspected")?;
    let app_at = r.at;
    s.app_progress = r.offset("stream parsed")?;
    if s.data_start > s.next {
        return Err(inconsistent("stream data start", start_at, "after the stream's end"));
    }
    if !(s.data_start..=s.next).contains(&s.raw_progress) {
        return Err(inconsistent(
            "stream inspected",
            raw_at,
            "outside the bytes the stream holds",
        ));
    }
    if !(s.data_start..=s.next).contains(&s.app_progress) {
        return Err(inconsistent(
            "stream parsed",
            app_at,
            "outside the bytes the stream holds",
        ));
    }
    let len_at = r.at;
    let len = r.u32("stream data length")? as usize;
    bound("stream data length", len_at, len as u64, MAX_HELD as u64)?;
    if len as u64 != s.next - s.data_start {
        return Err(inconsistent(
            "stream data length",
            len_at,
            "differs from the stream's end less its start",
        ));
    }
    s.data = r.take(len, "stream data")?.to_vec();
    let mut held = len;
    // The first held segment starts after the contiguous data; each next one at or after the one before ends.
    let mut earliest = s.next + 1;
    for _ in 0..r.count("out-of-order count", MAX_OOO_SEGMENTS)? {
        let at = r.at;
        let offset = r.offset("out-of-order offset")?;
        if offset < earliest {
            return Err(inconsistent(
                "out-of-order offset",
                at,
                "not after the contiguous data and the segment before",
            ));
        }
        let len_at = r.at;
        let n = r.u32("out-of-order length")? as usize;
        held += n;
        bound("stream held bytes", len_at, held as u64, MAX_HELD as u64)?;
        if n == 0 {
            return Err(inconsistent("out-of-order length", len_at, "an empty segment"));
        }
        earliest = offset + n as u64;
        bound("out-of-order end", len_at, earliest, MAX_OFFSET - 1)?;
        let bytes = r.take(n, "out-of-order bytes")?.to_vec();
        s.ooo_bytes += n;
        s.ooo.push(Segment { offset, bytes });
    }
    Ok(Some(s))
}
