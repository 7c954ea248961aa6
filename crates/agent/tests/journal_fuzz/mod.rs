//! The crash journal's property, for the `journal_replay` fuzz target
//! (`fuzz/fuzz_targets/journal_replay.rs`) and the test that replays its
//! committed inputs (`tests/journal_fuzz_regressions.rs`).
//!
//! An input is a program for the real writer: a journal of 1 to 6 slots a
//! half (so halves fill and overflow), then connection events (start,
//! update, end), snapshot rotations and crash points, each writing through
//! [`Journal::note`] into a file mapped as the agent maps it. What the file
//! holds is then read back with [`parse`] and checked against a model of
//! what was written: the older half's records, then the newer one's, each up
//! to its capacity, nothing torn or damaged. Then the input's last bytes
//! damage the file (single bit flips in headers or slots, a cut, bytes
//! appended) and the damaged file is read again: it is refused with an
//! error, or every operation it yields is one the writer wrote, at most
//! two records (one per half) are counted torn or damaged, and applying it
//! over a snapshot keeps one connection per key. An input whose first byte
//! has its high bit set is read as a journal file itself (any bytes): no
//! panic. Nothing here may panic.

use std::path::PathBuf;

use palisade_agent::journal::{Identity, Journal, Op, Replay, apply, parse, read};
use palisade_datapath::state::{self, Snapshot};
use palisade_datapath::{Conn, ConnState, EndReason, EventKind, ROUTING_DOMAIN};
use palisade_wire::flow::FlowKey;
use palisade_wire::ip::IpProtocol;

/// The input, read a byte at a time (zeros once it runs out).
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }
    fn empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A scratch file in /dev/shm (a tmpfs, as the agent's state directory
/// is), one per process, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        Scratch(dir.join(format!("palisade-journal-fuzz-{}", std::process::id())))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn identity() -> Identity {
    Identity::new("hv1", ["web-1.0", "app-1.0"])
}

/// A connection key from two input bytes: few addresses and ports, so
/// that events meet the same connection again.
fn key(a: u8, b: u8) -> FlowKey {
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src[10..12].copy_from_slice(&[0xff, 0xff]);
    dst[10..12].copy_from_slice(&[0xff, 0xff]);
    src[12..].copy_from_slice(&[10, 0, 0, 1 + a % 4]);
    dst[12..].copy_from_slice(&[10, 0, 1, 1 + (a / 4) % 4]);
    let protocol = match b % 3 {
        0 => IpProtocol::TCP,
        1 => IpProtocol::UDP,
        _ => IpProtocol::SCTP,
    };
    FlowKey {
        segment: ROUTING_DOMAIN,
        src,
        dst,
        src_port: 40000 + u16::from(b / 3 % 4),
        dst_port: 80,
        protocol,
        icmp_type: 0,
        icmp_code: 0,
    }
}

const STATES: [ConnState; 7] = [
    ConnState::SynSent,
    ConnState::SynReceived,
    ConnState::Established,
    ConnState::FinWait,
    ConnState::TimeWait,
    ConnState::New,
    ConnState::Replied,
];

/// The record the writer makes of `conn` at `now`, as the reader decodes it.
fn record_of(conn: &Conn, now: u64) -> Result<state::ConnRecord, String> {
    let blob = state::encode("", conn.policy_version, std::slice::from_ref(conn), now);
    let mut s = state::decode(&blob).map_err(|e| format!("a written record does not decode: {e}"))?;
    s.conns.pop().ok_or_else(|| "no record".to_string())
}

/// The model: each half's generation and the operations written to it.
struct Model {
    halves: [(u64, Vec<Op>); 2],
    active: usize,
    capacity: usize,
}

impl Model {
    fn write(&mut self, op: Op) {
        let (_, ops) = &mut self.halves[self.active];
        if ops.len() < self.capacity {
            ops.push(op);
        }
    }
    fn rotate(&mut self) {
        self.active ^= 1;
        let next = self.halves[self.active ^ 1].0 + 1;
        self.halves[self.active] = (next, Vec::new());
    }
    /// What a reader must find: the older half, then the newer (a half of
    /// generation 0 was never started).
    fn expected(&self) -> Vec<Op> {
        let mut halves: Vec<&(u64, Vec<Op>)> = self.halves.iter().filter(|(g, _)| *g != 0).collect();
        halves.sort_by_key(|(g, _)| *g);
        halves.into_iter().flat_map(|(_, ops)| ops.iter().cloned()).collect()
    }
}

/// Run one input; `Err` says which property failed.
pub fn check(data: &[u8]) -> Result<(), String> {
    let me = identity();
    if data.first().is_some_and(|b| b & 0x80 != 0) {
        // Any bytes as a journal file: refused or read, never a panic.
        if let Ok(r) = parse(&data[1..], &me) {
            bounded(&r, usize::MAX)?;
            one_per_key(apply(None, r))?;
        }
        return Ok(());
    }
    let mut input = Input(data);
    let capacity = 1 + usize::from(input.byte() % 6);
    let scratch = Scratch::new();
    let mut journal =
        Journal::create(&scratch.0, me.clone(), 0, capacity as u32).map_err(|e| format!("create: {e}"))?;
    let mut model = Model {
        halves: [(1, Vec::new()), (0, Vec::new())],
        active: 0,
        capacity,
    };
    // The connections open, by key (the initiator's direction; two events
    // whose bytes make the same key meet the same connection).
    let mut live: std::collections::BTreeMap<FlowKey, Conn> = Default::default();
    let mut now = 1_000_000u64;
    let mut steps = 0;
    // The program: up to 64 steps; what is left damages the file.
    while !input.empty() && steps < 64 {
        steps += 1;
        let op = input.byte();
        now += u64::from(op) * 1_000;
        match op % 5 {
            // A connection starts (or, already known, changes).
            0 | 1 => {
                let (a, b) = (input.byte(), input.byte());
                let id = key(a, b);
                let kind = if live.contains_key(&id) {
                    EventKind::Update
                } else {
                    EventKind::Start
                };
                let conn = live.entry(id).or_insert_with(|| Conn::new(id, now));
                conn.state = STATES[usize::from(op / 5) % STATES.len()];
                conn.packets += u64::from(b);
                conn.bytes += u64::from(a) * 60;
                conn.last_seen = now;
                conn.policy_version = u64::from(op / 64);
                conn.strict = b & 0x40 != 0;
                let event = conn.event(kind, now);
                journal.note(&event, Some(conn), now);
                model.write(Op::Upsert {
                    policy_version: conn.policy_version,
                    record: record_of(conn, now)?,
                });
            }
            // One ends.
            2 => {
                let id = input.byte();
                let Some(conn) = live.keys().copied().nth(usize::from(id) % live.len().max(1)) else {
                    continue;
                };
                let Some(conn) = live.remove(&conn) else { continue };
                let event = conn.event(EventKind::End(EndReason::Closed), now);
                journal.note(&event, None, now);
                model.write(Op::Remove(conn.key));
            }
            // A snapshot round.
            3 => {
                journal.rotate();
                model.rotate();
            }
            // A crash here: what the file holds now is read back.
            _ => {
                let bytes = std::fs::read(&scratch.0).map_err(|e| e.to_string())?;
                whole(&bytes, &me, &model)?;
                let r = read(&scratch.0, &me).map_err(|e| format!("the file is refused: {e}"))?;
                if r != parse(&bytes, &me).map_err(|e| e.to_string())? {
                    return Err("the file reads otherwise than its bytes".into());
                }
            }
        }
    }
    let mut bytes = std::fs::read(&scratch.0).map_err(|e| e.to_string())?;
    drop(journal);
    whole(&bytes, &me, &model)?;
    // Damage, then read again.
    let written: Vec<Op> = model.halves.iter().flat_map(|(_, ops)| ops.iter().cloned()).collect();
    let mut flips = 0;
    while !input.empty() {
        match input.byte() % 4 {
            // One bit flipped (at most three: CRC-32 catches any three in a slot).
            0 | 1 if flips < 3 => {
                let at = usize::from(input.u16()) % bytes.len();
                bytes[at] ^= 1 << (input.byte() % 8);
                flips += 1;
            }
            2 => {
                let cut = usize::from(input.u16()) % (bytes.len() + 1);
                bytes.truncate(cut);
            }
            3 => {
                let n = usize::from(input.byte() % 16);
                bytes.extend(std::iter::repeat_n(input.byte(), n));
            }
            _ => {}
        }
        if bytes.is_empty() {
            break;
        }
    }
    same_from_file(&scratch, &bytes, &me)?;
    if let Ok(r) = parse(&bytes, &me) {
        bounded(&r, 2 * capacity)?;
        if let Some(op) = r.ops.iter().find(|op| !written.contains(op)) {
            return Err(format!("a damaged journal yields an operation never written: {op:?}"));
        }
        // Over a snapshot holding some of the same connections.
        let snapshot = Snapshot {
            vnic: String::new(),
            policy_version: 0,
            conns: live.values().map(|c| record_of(c, now)).collect::<Result<_, _>>()?,
        };
        one_per_key(apply(Some(snapshot), r))?;
    }
    Ok(())
}

/// The agent's reader (which reads a file's used slots only) finds in
/// `bytes`, written as a file, what `parse` finds in them.
fn same_from_file(scratch: &Scratch, bytes: &[u8], me: &Identity) -> Result<(), String> {
    let copy = scratch.0.with_extension("damaged");
    std::fs::write(&copy, bytes).map_err(|e| e.to_string())?;
    let from_file = read(&copy, me);
    let _ = std::fs::remove_file(&copy);
    match (from_file, parse(bytes, me)) {
        (Ok(a), Ok(b)) if a == b => Ok(()),
        (Err(a), Err(b)) if a.reason() == b.reason() => Ok(()),
        (a, b) => Err(format!("the file reads {a:?}, its bytes parse to {b:?}")),
    }
}

/// An undamaged journal reads back exactly as the model wrote it.
fn whole(bytes: &[u8], me: &Identity, model: &Model) -> Result<(), String> {
    let r = parse(bytes, me).map_err(|e| format!("an intact journal is refused: {e}"))?;
    if r.torn != 0 || r.corrupt != 0 {
        return Err(format!(
            "an intact journal has {} torn and {} damaged record(s)",
            r.torn, r.corrupt
        ));
    }
    let expected = model.expected();
    if r.ops != expected {
        return Err(format!(
            "read back {} operation(s), the writer wrote {} the reader should see: {:?} vs {:?}",
            r.ops.len(),
            expected.len(),
            r.ops,
            expected
        ));
    }
    one_per_key(apply(None, r))
}

/// At most `most` operations; at most one record dropped per half.
fn bounded(r: &Replay, most: usize) -> Result<(), String> {
    if r.ops.len() > most {
        return Err(format!("{} operations from halves of {most} slots in all", r.ops.len()));
    }
    if r.torn + r.corrupt > 2 {
        return Err(format!(
            "{} torn and {} damaged: more than one per half",
            r.torn, r.corrupt
        ));
    }
    Ok(())
}

/// Replayed state holds each connection once.
fn one_per_key(s: Snapshot) -> Result<(), String> {
    let mut keys: Vec<FlowKey> = s.conns.iter().map(|c| c.key.canonical().0).collect();
    keys.sort_unstable();
    let n = keys.len();
    keys.dedup();
    if keys.len() != n {
        return Err(format!("{} connection(s) twice in the replayed state", n - keys.len()));
    }
    Ok(())
}
