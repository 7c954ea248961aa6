//! TCP connection tracking: the state machine and the window checks.
//!
//! Palisade judges TCP segments the way Linux netfilter does (the kernel's
//! `nf_conntrack_proto_tcp.c`, itself after Guido van Rooij's "Real Stateful
//! TCP Packet Filtering"), so that a zone behaves like the Linux firewall
//! people already know, and `bench/conntrack-vs-linux` can hold it to that:
//! - a **strict** zone is Linux with `nf_conntrack_tcp_loose=0` and
//!   `nf_conntrack_tcp_be_liberal=0`: a connection starts with a SYN, every
//!   segment must fit the state machine and the sequence windows;
//! - a **liberal** zone is Linux with `nf_conntrack_tcp_loose=1` and
//!   `nf_conntrack_tcp_be_liberal=1`: a plain ACK picks up a connection
//!   mid-stream (after a restart without saved state, or with asymmetric
//!   routing), segments outside the windows pass (and are counted), but the
//!   state machine still holds.
//!
//! Each segment is classified by its flags ([`TcpIndex`]: RST, then SYN or
//! SYN-ACK, then FIN, then ACK) and moves the connection through the
//! transition table (Linux's `tcp_conntracks`). A transition is either a new state, an
//! *invalid* segment (dropped: [`DropReason::TcpInvalidState`]), or an
//! *ignored* one: a segment that may be right while the tracker is out of
//! sync (a SYN on a connection it believes open, a retransmitted SYN-ACK), let
//! through without changing anything but remembered, so that the answer it
//! draws (a SYN-ACK acknowledging it) can bring the tracker back in sync.
//!
//! The window check (Linux's `tcp_in_window`) keeps per side the highest sequence sent
//! (`end`), the highest the other side allowed (`limit`: acknowledgment plus
//! window, where the acknowledgment is the highest SACK edge when the
//! receiver permitted SACK), the largest window seen (`max_win`) and the
//! highest acknowledgment sent (`max_ack`), and checks four bounds: data not
//! beyond what the receiver allowed (a segment overshooting it by at most one
//! window passes without updating anything), not older than one window
//! behind what was sent, acknowledging nothing unsent, and not lagging too far
//! (66,000 bytes or the largest window). Failing the first or third is
//! invalid, the others are ignored.
//!
//! Deliberate differences from Linux (justified in `bench/README.md`): a reset
//! with no connection is forwarded in a liberal zone when the policy allows
//! its direction (Linux calls it invalid), and the engine has no
//! `nf_conntrack_tcp_ignore_invalid_rst` (always as its default, 0).

use palisade_wire::tcp::TcpFlags;

use crate::conn_state::ConnState;
use crate::verdict::{Counters, DropReason};

/// The TCP facts of one segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpSeg {
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number.
    pub ack: u32,
    /// Window (unscaled, as on the wire).
    pub win: u16,
    /// Flags.
    pub flags: TcpFlags,
    /// Payload length.
    pub len: u32,
    /// Window scale option (read from SYN segments only).
    pub wscale: Option<u8>,
    /// The SACK-permitted option (read from SYN segments only).
    pub sack_permitted: bool,
    /// Whether the header has options at all (read from SYN segments only:
    /// a SYN without options leaves the sender's earlier ones in place).
    pub syn_options: bool,
    /// The highest right edge of the segment's SACK blocks.
    pub sack: Option<u32>,
    /// For a TSO/GSO super-frame, where its last segment starts, from
    /// `seq` (0 for one packet). The window check that a segment starts
    /// within what the receiver allowed is made on that last segment, the
    /// one that reaches furthest: the whole super-frame passes only if
    /// each of the packets it stands for would.
    pub last_offset: u32,
}

impl TcpSeg {
    /// The sequence number after the segment (SYN and FIN count one).
    pub fn seq_end(&self) -> u32 {
        let extra = u32::from(self.flags.contains(TcpFlags::SYN)) + u32::from(self.flags.contains(TcpFlags::FIN));
        self.seq.wrapping_add(self.len).wrapping_add(extra)
    }

    fn syn(&self) -> bool {
        self.flags.contains(TcpFlags::SYN)
    }

    fn ack_set(&self) -> bool {
        self.flags.contains(TcpFlags::ACK)
    }

    fn rst(&self) -> bool {
        self.flags.contains(TcpFlags::RST)
    }
}

impl TcpSeg {
    /// Read what the tracker needs from the header's option bytes, as
    /// Linux's `tcp_options` and `tcp_sack` do: on a SYN the window scale and
    /// SACK-permitted options, on any segment the highest right edge of its
    /// first SACK option. A malformed option ends the reading (what came
    /// before it stands); options of a size their kind does not have are
    /// skipped.
    pub fn read_options(&mut self, options: &[u8]) {
        if options.is_empty() {
            return;
        }
        // The common case, timestamps alone (NOP, NOP, TS): nothing to read.
        if !self.syn() && options.len() == 12 && options[..4] == [1, 1, 8, 10] {
            return;
        }
        self.syn_options |= self.syn();
        let mut rest = options;
        while let [kind, tail @ ..] = rest {
            match kind {
                0 => return,
                1 => {
                    rest = tail;
                    continue;
                }
                _ => {}
            }
            let Some(&len) = tail.first() else { return };
            let len = usize::from(len);
            if len < 2 || len > rest.len() {
                return;
            }
            let data = &rest[2..len];
            match (kind, data.len()) {
                (3, 1) if self.syn() => self.wscale = Some(data[0]),
                (4, 0) if self.syn() => self.sack_permitted = true,
                (5, n) if n >= 8 && n % 8 == 0 && self.sack.is_none() => {
                    let right_edges = data
                        .chunks_exact(8)
                        .map(|b| u32::from_be_bytes([b[4], b[5], b[6], b[7]]));
                    self.sack = right_edges.reduce(|a, b| if after(b, a) { b } else { a });
                }
                _ => {}
            }
            rest = &rest[len..];
        }
    }
}

/// What a segment is to the state machine, by its flags (Linux's
/// `get_conntrack_index`: RST first, then SYN with or without ACK, then FIN,
/// then ACK).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TcpIndex {
    /// SYN without ACK.
    Syn = 0,
    /// SYN with ACK.
    SynAck = 1,
    /// FIN (and no SYN or RST).
    Fin = 2,
    /// ACK only (data segments included).
    Ack = 3,
    /// RST.
    Rst = 4,
    /// None of SYN, FIN, RST, ACK.
    None = 5,
}

impl TcpIndex {
    /// The index of a segment's flags.
    pub fn of(flags: TcpFlags) -> TcpIndex {
        if flags.contains(TcpFlags::RST) {
            TcpIndex::Rst
        } else if flags.contains(TcpFlags::SYN) {
            if flags.contains(TcpFlags::ACK) {
                TcpIndex::SynAck
            } else {
                TcpIndex::Syn
            }
        } else if flags.contains(TcpFlags::FIN) {
            TcpIndex::Fin
        } else if flags.contains(TcpFlags::ACK) {
            TcpIndex::Ack
        } else {
            TcpIndex::None
        }
    }

    const fn code(self) -> u8 {
        self as u8
    }

    const fn from_code(code: u8) -> TcpIndex {
        match code {
            0 => TcpIndex::Syn,
            1 => TcpIndex::SynAck,
            2 => TcpIndex::Fin,
            3 => TcpIndex::Ack,
            4 => TcpIndex::Rst,
            _ => TcpIndex::None,
        }
    }
}

/// Whether a TCP flag combination is one no TCP sends (Linux's
/// `tcp_valid_flags`, ignoring PSH, ECE and CWR): the valid ones are SYN,
/// SYN-ACK, RST, RST-ACK, FIN-ACK, ACK, each also with URG except the
/// SYN-ACK and the resets. Such segments are dropped before any lookup.
pub fn bad_tcp_flags(flags: TcpFlags) -> bool {
    const FIN: u16 = TcpFlags::FIN.bits();
    const SYN: u16 = TcpFlags::SYN.bits();
    const RST: u16 = TcpFlags::RST.bits();
    const ACK: u16 = TcpFlags::ACK.bits();
    const URG: u16 = TcpFlags::URG.bits();
    const VALID: [u16; 9] = [
        SYN,
        SYN | URG,
        SYN | ACK,
        RST,
        RST | ACK,
        FIN | ACK,
        FIN | ACK | URG,
        ACK,
        ACK | URG,
    ];
    !VALID.contains(&(flags.bits() & (FIN | SYN | RST | ACK | URG)))
}

/// Per-side flags ([`TcpPeer::flags`]).
pub mod peer_flags {
    /// The side's SYN carried the window scale option.
    pub const WINDOW_SCALE: u8 = 0x01;
    /// The side's SYN carried SACK-permitted.
    pub const SACK_PERM: u8 = 0x02;
    /// The side closed first (its FIN moved the connection to FIN-WAIT).
    pub const CLOSE_INIT: u8 = 0x04;
    /// Window failures of this side's segments pass (a picked-up connection).
    pub const BE_LIBERAL: u8 = 0x08;
    /// The side has sent data not yet acknowledged.
    pub const DATA_UNACK: u8 = 0x10;
    /// `max_ack` holds an acknowledgment.
    pub const MAXACK_SET: u8 = 0x20;
}

/// One side's sequence tracking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpPeer {
    /// Highest sequence number sent plus one (SYN and FIN count one).
    pub end: u32,
    /// Highest acknowledgment (or SACK edge) plus window the other side
    /// advertised: the limit of this side's data.
    pub limit: u32,
    /// Largest window this side advertised (scaled); 0 until it has sent.
    pub max_win: u32,
    /// Highest acknowledgment this side sent.
    pub max_ack: u32,
    /// Window scale shift this side announced (0 unless both SYNs carried the option).
    pub wscale: u8,
    /// [`peer_flags`].
    pub flags: u8,
}

impl TcpPeer {
    /// Whether this side has sent anything the tracker took in.
    pub fn seen(&self) -> bool {
        self.max_win != 0
    }

    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// Connection-wide flags ([`TcpLast::flags`]).
pub mod last_flags {
    /// The last ignored SYN carried the window scale option.
    pub const WINDOW_SCALE: u8 = 0x01;
    /// The last ignored SYN carried SACK-permitted.
    pub const SACK_PERM: u8 = 0x02;
    /// A SYN was seen from the reply direction: a simultaneous open.
    pub const SIMULTANEOUS_OPEN: u8 = 0x04;
    /// A SYN came in LAST-ACK: an ACK from the other side is a challenge ACK (RFC 5961).
    pub const CHALLENGE_ACK: u8 = 0x08;
    /// A segment of the reply direction passed.
    pub const SEEN_REPLY: u8 = 0x10;
    /// The handshake completed (or a picked-up connection was answered).
    pub const ASSURED: u8 = 0x20;
}

/// What the tracker remembers of the last segment it took in (or ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpLast {
    /// Its [`TcpIndex`].
    pub index: TcpIndex,
    /// Its direction: 0 initiator, 1 responder.
    pub dir: u8,
    /// Its acknowledgment (kept for an ACK answering a SYN, RFC 5961).
    pub ack: u32,
    /// The sequence number after it.
    pub end: u32,
    /// Its window, unscaled.
    pub win: u16,
    /// The window scale of the last ignored SYN.
    pub wscale: u8,
    /// [`last_flags`].
    pub flags: u8,
}

impl Default for TcpLast {
    fn default() -> Self {
        TcpLast {
            index: TcpIndex::None,
            dir: 0,
            ack: 0,
            end: 0,
            win: 0,
            wscale: 0,
            flags: 0,
        }
    }
}

impl TcpLast {
    /// The packed index and direction, for state blobs.
    pub const fn index_code(&self) -> u8 {
        self.index.code() | self.dir << 4
    }

    /// Unpack [`TcpLast::index_code`].
    pub const fn set_index_code(&mut self, code: u8) {
        self.index = TcpIndex::from_code(code & 0x0f);
        self.dir = (code >> 4) & 1;
    }

    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// A connection's TCP tracking: both sides and the last segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpTrack {
    /// The initiator (0) and the responder (1).
    pub peers: [TcpPeer; 2],
    /// The last segment.
    pub last: TcpLast,
}

impl TcpTrack {
    /// Whether a reply-direction segment has passed.
    pub fn seen_reply(&self) -> bool {
        self.last.has(last_flags::SEEN_REPLY)
    }

    /// Whether the connection is assured (handshake completed).
    pub fn assured(&self) -> bool {
        self.last.has(last_flags::ASSURED)
    }
}

/// One cell of the transition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    To(ConnState),
    Ignore,
    Invalid,
}

/// The transition table's columns: the TCP states and "none" (a new
/// connection; a TCP connection is never in the other protocols' states, and
/// would be taken as not started).
const fn column(state: Option<ConnState>) -> usize {
    match state {
        None | Some(ConnState::New | ConnState::Replied) => 0,
        Some(ConnState::SynSent) => 1,
        Some(ConnState::SynReceived) => 2,
        Some(ConnState::Established) => 3,
        Some(ConnState::FinWait) => 4,
        Some(ConnState::CloseWait) => 5,
        Some(ConnState::LastAck) => 6,
        Some(ConnState::TimeWait) => 7,
        Some(ConnState::Close) => 8,
        Some(ConnState::SynSent2) => 9,
    }
}

/// Linux's `tcp_conntracks[dir][index][state]`, columns as [`column`].
const TABLE: [[[Next; 10]; 6]; 2] = {
    use ConnState::*;
    use Next::{Ignore as IG, Invalid as IV, To};
    let (ss, sr, es, fw, cw, la, tw, cl, s2) = (
        To(SynSent),
        To(SynReceived),
        To(Established),
        To(FinWait),
        To(CloseWait),
        To(LastAck),
        To(TimeWait),
        To(Close),
        To(SynSent2),
    );
    [
        // The initiator's direction.
        [
            //   none syn-sent syn-recv estab fin-wait close-wait last-ack time-wait close syn-sent2
            /* syn    */
            [ss, ss, IG, IG, IG, IG, IG, ss, ss, s2],
            /* synack */ [IV, IV, sr, IV, IV, IV, IV, IV, IV, sr],
            /* fin    */ [IV, IV, fw, fw, la, la, la, tw, cl, IV],
            /* ack    */ [es, IV, es, es, cw, cw, tw, tw, cl, IV],
            /* rst    */ [IV, cl, cl, cl, cl, cl, cl, cl, cl, cl],
            /* none   */ [IV; 10],
        ],
        // The responder's direction.
        [
            /* syn    */ [IV, s2, IV, IV, IV, IV, IV, ss, IV, s2],
            /* synack */ [IV, sr, IG, IG, IG, IG, IG, IG, IG, sr],
            /* fin    */ [IV, IV, fw, fw, la, la, la, tw, cl, IV],
            /* ack    */ [IV, IG, sr, es, cw, cw, tw, tw, cl, IG],
            /* rst    */ [IV, cl, cl, cl, cl, cl, cl, cl, cl, cl],
            /* none   */ [IV; 10],
        ],
    ]
};

fn next_state(reply: bool, index: TcpIndex, state: Option<ConnState>) -> Next {
    TABLE[usize::from(reply)][index as usize][column(state)]
}

/// `a < b` in sequence space.
fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

fn after(a: u32, b: u32) -> bool {
    before(b, a)
}

/// Most an acknowledgment may lag behind what the other side sent:
/// 66,000 bytes, or the acknowledging side's largest window (Linux's
/// `MAXACKWINDOW`).
fn max_ack_window(sender: &TcpPeer) -> u32 {
    sender.max_win.max(66_000)
}

/// What a segment did to the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracked {
    /// Taken in: state and windows updated.
    Accepted,
    /// Let through without changing the tracking (possibly right while the
    /// tracker is out of sync; see the module documentation).
    Ignored,
    /// A SYN reopening a closed connection: the caller ends it and handles
    /// the segment as the first of a new connection.
    Reopen,
    /// A reset before any reply: let through, and the connection is over at
    /// once (nothing lingers for a connection that never was).
    Kill,
}

/// Read the options a SYN carries into `peer` (Linux's `tcp_options`: only
/// when the header has options at all).
fn take_options(peer: &mut TcpPeer, seg: &TcpSeg) {
    if !seg.syn_options {
        return;
    }
    peer.wscale = 0;
    peer.flags &= peer_flags::BE_LIBERAL;
    if seg.sack_permitted {
        peer.flags |= peer_flags::SACK_PERM;
    }
    if let Some(s) = seg.wscale {
        peer.wscale = s.min(14);
        peer.flags |= peer_flags::WINDOW_SCALE;
    }
}

/// Start tracking a connection on its first segment (from the initiator).
/// A SYN opens it; in a liberal zone a plain ACK picks it up mid-stream, with
/// window failures passing for its whole life. Anything else cannot start
/// one: [`DropReason::TcpNoConnection`].
pub fn open(
    track: &mut TcpTrack,
    state: &mut ConnState,
    seg: &TcpSeg,
    liberal: bool,
    c: &mut Counters,
) -> Result<(), DropReason> {
    *track = TcpTrack::default();
    let index = TcpIndex::of(seg.flags);
    let first = &mut track.peers[0];
    match next_state(false, index, None) {
        Next::To(ConnState::SynSent) => {
            first.end = seg.seq_end();
            first.max_win = u32::from(seg.win).max(1);
            first.limit = first.end;
            take_options(first, seg);
        }
        Next::To(_) if liberal => {
            first.end = seg.seq_end();
            first.max_win = u32::from(seg.win).max(1);
            first.limit = first.end.wrapping_add(first.max_win);
            // Its history is lost: assume SACK, and let windows pass.
            let both = peer_flags::SACK_PERM | peer_flags::BE_LIBERAL;
            track.peers[0].flags = both;
            track.peers[1].flags = both;
        }
        _ => return Err(DropReason::TcpNoConnection),
    }
    track.last.index = TcpIndex::None;
    match segment(track, None, false, seg, liberal, c)? {
        (Tracked::Accepted, Some(s)) => {
            *state = s;
            Ok(())
        }
        _ => Err(DropReason::TcpNoConnection),
    }
}

/// Track one segment of a connection in `state` (`None`: its first
/// segment, from [`open`]); `reply` for the responder's direction. Returns
/// what it did and the state after it; an invalid segment is an error.
/// `liberal`: the zone's window failures pass.
pub fn segment(
    track: &mut TcpTrack,
    state: Option<ConnState>,
    reply: bool,
    seg: &TcpSeg,
    liberal: bool,
    c: &mut Counters,
) -> Result<(Tracked, Option<ConnState>), DropReason> {
    let result = transition(track, state, reply, seg, liberal, c);
    if reply && matches!(result, Ok((Tracked::Accepted | Tracked::Ignored, _))) {
        // Whatever the reply direction sends that passes.
        track.last.flags |= last_flags::SEEN_REPLY;
    }
    result
}

/// [`segment`], but for noting that the reply direction was seen.
fn transition(
    track: &mut TcpTrack,
    state: Option<ConnState>,
    reply: bool,
    seg: &TcpSeg,
    liberal: bool,
    c: &mut Counters,
) -> Result<(Tracked, Option<ConnState>), DropReason> {
    let dir = usize::from(reply);
    let index = TcpIndex::of(seg.flags);
    let mut old = state;
    let mut new = next_state(reply, index, old);
    let mut check_window = true;
    // The transitions with extra conditions (the `switch` of Linux's
    // `nf_conntrack_tcp_packet`).
    let ignore = match new {
        Next::To(ConnState::SynSent) if matches!(old, Some(ConnState::TimeWait | ConnState::Close)) => {
            let closed = (track.peers[0].flags | track.peers[1].flags) & peer_flags::CLOSE_INIT != 0;
            let reset_here = usize::from(track.last.dir) == dir && track.last.index == TcpIndex::Rst;
            if closed || reset_here {
                return Ok((Tracked::Reopen, old));
            }
            true
        }
        Next::Ignore => true,
        Next::Invalid => return Err(DropReason::TcpInvalidState),
        Next::To(ConnState::TimeWait)
            if old == Some(ConnState::LastAck)
                && index == TcpIndex::Ack
                && usize::from(track.last.dir) != dir
                && track.last.index == TcpIndex::Syn
                && track.last.has(last_flags::CHALLENGE_ACK) =>
        {
            // A challenge ACK (RFC 5961) answering a SYN: it acknowledges nothing.
            track.last.flags &= !last_flags::CHALLENGE_ACK;
            return Ok((Tracked::Ignored, old));
        }
        Next::To(ConnState::SynSent2) => {
            track.last.flags |= last_flags::SIMULTANEOUS_OPEN;
            false
        }
        Next::To(ConnState::SynReceived) => {
            if reply && index == TcpIndex::Ack && track.last.has(last_flags::SIMULTANEOUS_OPEN) {
                new = Next::To(ConnState::Established);
            }
            false
        }
        Next::To(ConnState::Close) if index == TcpIndex::Rst => {
            check_window = reset_needs_window_check(track, old, reply, seg, &mut new)?;
            false
        }
        Next::To(_) => false,
    };
    if ignore {
        let last = &track.last;
        if index == TcpIndex::SynAck
            && last.index == TcpIndex::Syn
            && usize::from(last.dir) != dir
            && seg.ack == last.end
        {
            // This SYN-ACK answers a SYN let through while out of sync: the
            // ends agree, so the tracker takes the SYN's side from its notes.
            let (syn_dir, end, win, wscale) = (usize::from(last.dir), last.end, last.win, last.wscale);
            let flags = last.flags & (last_flags::WINDOW_SCALE | last_flags::SACK_PERM);
            let syn_side = &mut track.peers[syn_dir];
            syn_side.end = end;
            syn_side.limit = end;
            syn_side.max_win = u32::from(win).max(1);
            syn_side.wscale = wscale;
            syn_side.flags = (if flags & last_flags::WINDOW_SCALE != 0 {
                peer_flags::WINDOW_SCALE
            } else {
                0
            }) | (if flags & last_flags::SACK_PERM != 0 {
                peer_flags::SACK_PERM
            } else {
                0
            });
            track.last.flags &= !last_flags::CHALLENGE_ACK;
            let this = &mut track.peers[dir];
            let liberal_flag = this.flags & peer_flags::BE_LIBERAL;
            *this = TcpPeer {
                flags: liberal_flag,
                ..TcpPeer::default()
            };
            old = Some(ConnState::SynSent);
            new = Next::To(ConnState::SynReceived);
        } else {
            let last = &mut track.last;
            last.index = index;
            last.dir = dir as u8;
            last.end = seg.seq_end();
            last.win = seg.win;
            if index == TcpIndex::Syn && !reply {
                // Remember its options, should the other side answer it.
                last.flags &= !(last_flags::WINDOW_SCALE | last_flags::SACK_PERM | last_flags::CHALLENGE_ACK);
                last.wscale = 0;
                if seg.syn_options {
                    if let Some(s) = seg.wscale {
                        last.flags |= last_flags::WINDOW_SCALE;
                        last.wscale = s.min(14);
                    }
                    if seg.sack_permitted {
                        last.flags |= last_flags::SACK_PERM;
                    }
                }
                if old == Some(ConnState::LastAck) {
                    last.flags |= last_flags::CHALLENGE_ACK;
                }
            }
            if old == Some(ConnState::SynSent) && index == TcpIndex::Ack && reply {
                last.ack = seg.ack;
            }
            return Ok((Tracked::Ignored, old));
        }
    }
    if check_window {
        match in_window(track, old, dir, seg, liberal, c) {
            Window::Accept => {}
            Window::Ignore => return Ok((Tracked::Ignored, old)),
            Window::Invalid => {
                // Linux notes a FIN or RST it refused, to shorten the
                // timeout when the other side answers (timeouts here do not
                // depend on it); the tracking is otherwise unchanged.
                return Err(DropReason::TcpOutOfWindow);
            }
        }
    }
    let Next::To(new) = new else {
        // Every other cell returned above.
        return Err(DropReason::TcpInvalidState);
    };
    track.last.index = index;
    track.last.dir = dir as u8;
    if old != Some(new) && new == ConnState::FinWait {
        track.peers[dir].flags |= peer_flags::CLOSE_INIT;
    }
    // Whether the reply direction had passed before this segment.
    let seen_reply = track.seen_reply();
    if !seen_reply && seg.rst() {
        // Only a reset answered: the connection never was.
        return Ok((Tracked::Kill, Some(new)));
    }
    if seen_reply
        && !track.assured()
        && matches!(old, Some(ConnState::SynReceived | ConnState::Established))
        && new == ConnState::Established
    {
        track.last.flags |= last_flags::ASSURED;
    }
    Ok((Tracked::Accepted, Some(new)))
}

/// The extra checks of a reset (Linux's `TCP_CONNTRACK_CLOSE` case): returns
/// whether the window check still applies; may keep the state (a reset whose
/// sequence number is not the exact one is answered by a challenge ACK, RFC
/// 5961, and the connection lives on) or refuse the reset.
fn reset_needs_window_check(
    track: &TcpTrack,
    old: Option<ConnState>,
    reply: bool,
    seg: &TcpSeg,
    new: &mut Next,
) -> Result<bool, DropReason> {
    let dir = usize::from(reply);
    let other = &track.peers[1 - dir];
    let last = &track.last;
    // A closing connection's fields may be stale (the ports reused): no checks.
    if matches!(
        old,
        Some(ConnState::FinWait | ConnState::LastAck | ConnState::TimeWait | ConnState::Close | ConnState::CloseWait)
    ) {
        return Ok(false);
    }
    let established = old == Some(ConnState::Established) && track.assured();
    if other.has(peer_flags::MAXACK_SET) && last.index != TcpIndex::Syn {
        let seq = seg.seq;
        if seq == 0 && !established {
            // Most likely the answer to a SYN let through.
            return Ok(true);
        }
        if before(seq, other.max_ack) {
            return Err(DropReason::TcpOutOfWindow);
        }
        if !established || seq == other.max_ack {
            return Ok(true);
        }
        if last.index == TcpIndex::Ack && usize::from(last.dir) == dir && seq == last.end {
            // The reset ending a train of segments.
            return Ok(true);
        }
        if let Some(s) = old {
            *new = Next::To(s);
        }
    }
    // A reset answering a SYN or ACK let through while out of sync may
    // acknowledge what the tracker ignored; one answering a challenge ACK
    // carries that ACK's number.
    let answers_ignored = ((track.seen_reply() && last.index == TcpIndex::Syn)
        || (!track.assured() && last.index == TcpIndex::Ack))
        && seg.ack == last.end;
    let answers_challenge =
        old == Some(ConnState::SynSent) && last.index == TcpIndex::Ack && last.dir == 1 && seg.seq == last.ack;
    Ok(!(answers_ignored || answers_challenge))
}

/// The window check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Window {
    Accept,
    Ignore,
    Invalid,
}

/// Start a side's tracking from its SYN or SYN-ACK.
fn init_sender(track: &mut TcpTrack, dir: usize, seg: &TcpSeg, end: u32, win: u32) {
    let [a, b] = &mut track.peers;
    let (sender, receiver) = if dir == 0 { (a, b) } else { (b, a) };
    sender.end = end;
    sender.limit = end;
    sender.max_win = win.max(1);
    take_options(sender, seg);
    // RFC 7323: scaling applies only when both SYNs carried the option.
    if dir == 1 && !(sender.has(peer_flags::WINDOW_SCALE) && receiver.has(peer_flags::WINDOW_SCALE)) {
        sender.wscale = 0;
        receiver.wscale = 0;
    }
}

/// Linux's `tcp_in_window`: the four bounds, and the updates of both sides.
fn in_window(
    track: &mut TcpTrack,
    state: Option<ConnState>,
    dir: usize,
    seg: &TcpSeg,
    liberal: bool,
    c: &mut Counters,
) -> Window {
    let mut seq = seg.seq;
    let mut ack = seg.ack;
    let mut sack = ack;
    let win = u32::from(seg.win);
    let mut end = seg.seq_end();
    let syn = seg.syn();
    if track.peers[1 - dir].has(peer_flags::SACK_PERM)
        && let Some(edge) = seg.sack
        && after(edge, sack)
    {
        sack = edge;
    }
    if !track.peers[dir].seen() {
        if syn {
            init_sender(track, dir, seg, end, win);
            if !seg.ack_set() {
                // A simultaneous open's SYN.
                return Window::Accept;
            }
        } else {
            // Mid-connection: its history is lost; take what the segment says.
            let [a, b] = &mut track.peers;
            let (sender, receiver) = if dir == 0 { (a, b) } else { (b, a) };
            sender.end = end;
            let swin = win << sender.wscale;
            sender.max_win = swin.max(1);
            sender.limit = end.wrapping_add(sender.max_win);
            if !receiver.seen() {
                receiver.end = sack;
                receiver.limit = sack;
            } else if sack == receiver.end.wrapping_add(1) {
                // Likely the answer to a keep-alive.
                receiver.end = receiver.end.wrapping_add(1);
            }
        }
    } else if syn
        && after(end, track.peers[dir].end)
        && matches!(state, Some(ConnState::SynSent | ConnState::SynReceived))
    {
        // A new SYN (or SYN-ACK) with a later sequence number: the host
        // started over (RFC 793); take its side afresh.
        init_sender(track, dir, seg, end, win);
        if dir == 1 && !seg.ack_set() {
            return Window::Accept;
        }
    }
    let [a, b] = &mut track.peers;
    let (sender, receiver) = if dir == 0 { (a, b) } else { (b, a) };
    if !seg.ack_set() || (seg.rst() && ack == 0) {
        // No acknowledgment (or a reset with ACK and 0, from broken stacks):
        // take it as acknowledging everything.
        ack = receiver.end;
        sack = receiver.end;
    }
    if seg.rst() && seq == 0 && state == Some(ConnState::SynSent) {
        // A reset answering the SYN.
        seq = sender.end;
        end = sender.end;
    }
    let liberal = liberal || sender.has(peer_flags::BE_LIBERAL);
    let refuse = |result: Window, c: &mut Counters| {
        if liberal {
            c.tcp_window_liberal += 1;
            Window::Accept
        } else {
            result
        }
    };
    if !before(seq.wrapping_add(seg.last_offset), sender.limit.wrapping_add(1)) {
        // I: beyond what the receiver allowed.
        let overshot = end.wrapping_sub(sender.limit).wrapping_add(1);
        let ack_ok = after(sack, receiver.end.wrapping_sub(max_ack_window(sender)).wrapping_sub(1));
        let in_recv_win =
            receiver.max_win != 0 && after(end, sender.end.wrapping_sub(receiver.max_win).wrapping_sub(1));
        if in_recv_win && ack_ok && overshot <= receiver.max_win && before(sack, receiver.end.wrapping_add(1)) {
            // Some stacks send a little more than the window allows: let it
            // through, and note its end so that its acknowledgment passes.
            sender.end = end;
            sender.flags |= peer_flags::DATA_UNACK;
            return refuse(Window::Ignore, c);
        }
        return refuse(Window::Invalid, c);
    }
    if !before(sack, receiver.end.wrapping_add(1)) {
        // III: acknowledges what the receiver has not sent.
        return refuse(Window::Invalid, c);
    }
    let in_recv_win = receiver.max_win == 0 || after(end, sender.end.wrapping_sub(receiver.max_win).wrapping_sub(1));
    if !in_recv_win {
        // II: data older than a window behind (a retransmission of acknowledged data).
        return refuse(Window::Ignore, c);
    }
    if !after(sack, receiver.end.wrapping_sub(max_ack_window(sender)).wrapping_sub(1)) {
        // IV: an acknowledgment lagging too far (delayed for long).
        return refuse(Window::Ignore, c);
    }
    let win = if syn { win } else { win << sender.wscale };
    let swin = win.wrapping_add(sack.wrapping_sub(ack));
    sender.max_win = sender.max_win.max(swin);
    if after(end, sender.end) {
        sender.end = end;
        sender.flags |= peer_flags::DATA_UNACK;
    }
    if seg.ack_set() {
        if !sender.has(peer_flags::MAXACK_SET) {
            sender.max_ack = ack;
            sender.flags |= peer_flags::MAXACK_SET;
        } else if after(ack, sender.max_ack) {
            sender.max_ack = ack;
        }
    }
    if receiver.max_win != 0 && after(end, sender.limit) {
        receiver.max_win = receiver.max_win.wrapping_add(end.wrapping_sub(sender.limit));
    }
    if after(sack.wrapping_add(win), receiver.limit.wrapping_sub(1)) {
        receiver.limit = sack.wrapping_add(win);
        if win == 0 {
            receiver.limit = receiver.limit.wrapping_add(1);
        }
    }
    if ack == receiver.end {
        receiver.flags &= !peer_flags::DATA_UNACK;
    }
    Window::Accept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(seq: u32, ack: u32, flags: TcpFlags, len: u32) -> TcpSeg {
        TcpSeg {
            seq,
            ack,
            win: 1000,
            flags,
            len,
            ..TcpSeg::default()
        }
    }

    const SYN: TcpFlags = TcpFlags::SYN;
    const ACK: TcpFlags = TcpFlags::ACK;
    const FIN: TcpFlags = TcpFlags::FIN;
    const RST: TcpFlags = TcpFlags::RST;

    /// A tracker after the three-way handshake (client ISN 100, server 5000).
    fn established() -> (TcpTrack, ConnState, Counters) {
        let (mut t, mut st, mut c) = (TcpTrack::default(), ConnState::New, Counters::default());
        open(&mut t, &mut st, &seg(100, 0, SYN, 0), false, &mut c).unwrap();
        assert_eq!(st, ConnState::SynSent);
        let steps = [
            (true, seg(5000, 101, SYN | ACK, 0), ConnState::SynReceived),
            (false, seg(101, 5001, ACK, 0), ConnState::Established),
        ];
        for (reply, s, want) in steps {
            let (did, next) = segment(&mut t, Some(st), reply, &s, false, &mut c).unwrap();
            assert_eq!((did, next), (Tracked::Accepted, Some(want)));
            st = want;
        }
        assert!(t.assured());
        (t, st, c)
    }

    #[test]
    fn valid_flag_combinations_are_linuxs() {
        let valid = [
            SYN,
            SYN | TcpFlags::URG,
            SYN | ACK,
            RST,
            RST | ACK,
            FIN | ACK,
            FIN | ACK | TcpFlags::URG,
            ACK,
            ACK | TcpFlags::URG,
            ACK | TcpFlags::PSH | TcpFlags::ECE | TcpFlags::CWR,
            SYN | TcpFlags::ECE | TcpFlags::CWR,
        ];
        for f in valid {
            assert!(!bad_tcp_flags(f), "{f:?}");
        }
        for f in [
            TcpFlags::EMPTY,
            FIN,
            FIN | TcpFlags::PSH | TcpFlags::URG,
            SYN | FIN,
            SYN | RST,
            SYN | ACK | TcpFlags::URG,
            RST | FIN,
            RST | ACK | TcpFlags::URG,
            TcpFlags::URG,
            TcpFlags::PSH,
        ] {
            assert!(bad_tcp_flags(f), "{f:?}");
        }
    }

    #[test]
    fn fin_teardown_walks_the_states() {
        let (mut t, mut st, mut c) = established();
        let steps = [
            (false, seg(101, 5001, FIN | ACK, 0), ConnState::FinWait),
            (true, seg(5001, 102, ACK, 0), ConnState::CloseWait),
            (true, seg(5001, 102, FIN | ACK, 0), ConnState::LastAck),
            (false, seg(102, 5002, ACK, 0), ConnState::TimeWait),
        ];
        for (reply, s, want) in steps {
            let (did, next) = segment(&mut t, Some(st), reply, &s, false, &mut c).unwrap();
            assert_eq!((did, next), (Tracked::Accepted, Some(want)), "{s:?}");
            st = want;
        }
        // A SYN from the side that closed first reopens.
        let again = segment(&mut t, Some(st), false, &seg(9000, 0, SYN, 0), false, &mut c).unwrap();
        assert_eq!(again.0, Tracked::Reopen);
    }

    #[test]
    fn windows_strict_and_liberal() {
        let (mut t, st, mut c) = established();
        // Beyond the server's window (1000 from 5001): invalid in a strict zone.
        let far = seg(101 + 50_000, 5001, ACK, 10);
        assert_eq!(
            segment(&mut t, Some(st), false, &far, false, &mut c),
            Err(DropReason::TcpOutOfWindow)
        );
        // Acknowledging what the server never sent: invalid.
        let bad_ack = seg(101, 5001 + 10_000, ACK, 0);
        assert_eq!(
            segment(&mut t, Some(st), false, &bad_ack, false, &mut c),
            Err(DropReason::TcpOutOfWindow)
        );
        // A liberal zone lets both pass and counts them.
        assert_eq!(
            segment(&mut t, Some(st), false, &far, true, &mut c).unwrap().0,
            Tracked::Accepted
        );
        assert_eq!(c.tcp_window_liberal, 1);
        // A retransmission of long-acknowledged data is ignored, not refused.
        let (mut t, st, mut c) = established();
        for i in 0..3u32 {
            let s = seg(101 + i * 900, 5001, ACK, 900);
            assert_eq!(
                segment(&mut t, Some(st), false, &s, false, &mut c).unwrap().0,
                Tracked::Accepted
            );
            let a = seg(5001, 101 + (i + 1) * 900, ACK, 0);
            assert_eq!(
                segment(&mut t, Some(st), true, &a, false, &mut c).unwrap().0,
                Tracked::Accepted
            );
        }
        let old = seg(101, 5001, ACK, 10);
        assert_eq!(
            segment(&mut t, Some(st), false, &old, false, &mut c).unwrap().0,
            Tracked::Ignored
        );
    }

    #[test]
    fn a_reset_before_any_reply_kills_and_one_after_closes() {
        let (mut t, mut st, mut c) = (TcpTrack::default(), ConnState::New, Counters::default());
        open(&mut t, &mut st, &seg(100, 0, SYN, 0), false, &mut c).unwrap();
        let refused = seg(0, 101, RST | ACK, 0);
        assert_eq!(
            segment(&mut t, Some(st), true, &refused, false, &mut c).unwrap().0,
            Tracked::Kill
        );
        let (mut t, st, mut c) = established();
        let rst = seg(5001, 0, RST, 0);
        assert_eq!(
            segment(&mut t, Some(st), true, &rst, false, &mut c).unwrap(),
            (Tracked::Accepted, Some(ConnState::Close))
        );
        // The client's SYN reusing the ports: the reset came from the other
        // side, so it may be out of sync; it passes, ignored, and the server's
        // SYN-ACK answering it brings the tracker back in sync.
        let syn = seg(7000, 0, SYN, 0);
        assert_eq!(
            segment(&mut t, Some(ConnState::Close), false, &syn, false, &mut c)
                .unwrap()
                .0,
            Tracked::Ignored
        );
        let synack = seg(9000, 7001, SYN | ACK, 0);
        assert_eq!(
            segment(&mut t, Some(ConnState::Close), true, &synack, false, &mut c).unwrap(),
            (Tracked::Accepted, Some(ConnState::SynReceived))
        );
    }
}
