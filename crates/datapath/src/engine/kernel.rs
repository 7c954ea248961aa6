//! Traffic a kernel fast path forwarded, folded back into the engine.
//!
//! With the agent's kernel fast path (`palisade_io::kfast`) an established
//! connection's packets may be forwarded by the kernel without reaching
//! the engine. The kernel counts them per direction and notes the last
//! time and the TCP high-water marks; the agent hands those here, so the
//! connection's counters and last-seen time (which expiry, flow records,
//! exports and snapshots read), its rules' and its port's tallies, and its
//! TCP tracking stay what they would have been had the engine seen them.

use palisade_wire::flow::FlowKey;

use super::Engine;
use crate::port::PortId;

/// What the kernel forwarded of one direction of a connection since the last fold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KernelForwarded {
    /// Packets (a super-frame's segments each).
    pub packets: u64,
    /// Bytes, as the engine counts a frame's (its segments together).
    pub bytes: u64,
    /// When the last was forwarded, on the engine's clock (0: none).
    pub last_seen: u64,
    /// TCP: the direction's high-water marks.
    pub tcp: Option<KernelTcpMarks>,
}

/// A TCP direction's high-water marks as the kernel noted them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KernelTcpMarks {
    /// Highest sequence number sent plus one.
    pub seq_end: u32,
    /// Highest acknowledgment sent.
    pub ack: u32,
    /// Highest acknowledgment plus scaled window sent: the other side's data limit.
    pub limit: u32,
    /// Largest scaled window sent.
    pub max_win: u32,
}

fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

impl Engine {
    /// Fold what the kernel forwarded of the direction `key` (as its packets
    /// travel), which arrived on `in_port` (a vNIC's, or [`crate::UPLINK`]),
    /// into its connection. Returns false when there is no such connection
    /// (it ended meanwhile: the counts have nowhere to go).
    pub fn fold_kernel_forwarded(&mut self, in_port: PortId, key: &FlowKey, f: &KernelForwarded) -> bool {
        let mut key = *key;
        key.segment = super::ROUTING_DOMAIN;
        let Some(slot) = self.conns.find(&key) else {
            return false;
        };
        let Some(conn) = self.conns.get_mut(slot) else {
            return false;
        };
        let reply = conn.key != key;
        if f.packets > 0 {
            conn.count(reply, f.packets, f.bytes);
        }
        if f.last_seen > conn.last_seen {
            conn.last_seen = f.last_seen;
        }
        if let Some(m) = f.tcp {
            let (me, other) = if reply { (1, 0) } else { (0, 1) };
            let p = &mut conn.tcp.peers[me];
            if after(m.seq_end, p.end) {
                p.end = m.seq_end;
            }
            if after(m.ack, p.max_ack) {
                p.max_ack = m.ack;
            }
            p.max_win = p.max_win.max(m.max_win);
            let o = &mut conn.tcp.peers[other];
            if after(m.limit, o.limit) {
                o.limit = m.limit;
            }
        }
        let rules = conn.rules;
        if f.packets > 0 {
            let second = if rules[1] == rules[0] { None } else { rules[1] };
            for i in [rules[0], second].into_iter().flatten() {
                if let Some(r) = self.rules.get_mut(i as usize) {
                    r.tally.add_n(f.packets, f.bytes);
                }
            }
            self.counters.packets += f.packets;
            self.counters.forwarded += f.packets;
            if let Some(t) = self.port_tallies.get_mut(usize::from(in_port.0)) {
                t.add_n(f.packets, f.bytes);
            }
        }
        true
    }
}
