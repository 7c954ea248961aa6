//! TCP session tracking for inspection: the handshake, which data goes into
//! the streams, acknowledgments, and the end of the connection.
//!
//! This is not a second firewall conntrack (the datapath has one): it
//! tracks what reassembly needs. A session starts with the client's SYN; the
//! SYN-ACK gives the server's initial sequence number; the client's ACK
//! completes the handshake. Data enters a direction's stream once the
//! handshake is complete (or with TCP Fast Open, in the SYN). With
//! `midstream`, a connection first seen after its handshake is taken up from
//! its first packet. Without it, such a connection is not reassembled and its
//! packets are inspected one by one.
//!
//! A packet is *established* (the `flow:established` keyword) when the
//! handshake was complete before it, or when it completes the handshake (or
//! is taken up midstream) carrying data: Suricata's meaning.

use crate::packet::{TcpHeader, tcp_flags};
use crate::stream::{Insert, LocalBudget, Stream, StreamCounters, StreamLimits};

/// Connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TcpState {
    /// Nothing tracked (no SYN seen, no midstream pickup).
    None,
    /// Client SYN seen.
    SynSent,
    /// Server SYN (with ACK) seen.
    SynRecv,
    /// Handshake complete.
    Established,
    /// One side sent FIN.
    Closing,
    /// Both sides sent FIN, or a RST.
    Closed,
}

/// Settings of the tracker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TcpConfig {
    pub midstream: bool,
    pub limits: StreamLimits,
}

/// What a packet did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TcpUpdate {
    /// `flow:established` holds for this packet.
    pub established: bool,
    /// The payload was taken by (or already in) the stream: it is inspected
    /// as stream data, not as a packet.
    pub in_stream: bool,
    /// The payload was held out of order.
    pub held: bool,
}

/// One TCP connection's tracking state; index 0 is the client's direction.
#[derive(Debug)]
pub(crate) struct TcpSession {
    pub state: TcpState,
    pub streams: [Option<Stream>; 2],
    pub midstream: bool,
    pub fin: [bool; 2],
    pub rst: bool,
}

impl TcpSession {
    pub fn new() -> Self {
        TcpSession {
            state: TcpState::None,
            streams: [None, None],
            midstream: false,
            fin: [false; 2],
            rst: false,
        }
    }

    /// Handles one packet of direction `dir` (0 = from the client).
    pub fn track(
        &mut self,
        dir: usize,
        tcp: &TcpHeader,
        payload: &[u8],
        cfg: &TcpConfig,
        budget: &mut LocalBudget,
        counters: &mut StreamCounters,
    ) -> TcpUpdate {
        let f = tcp.flags;
        let (syn, ack, fin, rst) = (
            f & tcp_flags::SYN != 0,
            f & tcp_flags::ACK != 0,
            f & tcp_flags::FIN != 0,
            f & tcp_flags::RST != 0,
        );
        let before = self.state;
        let mut established = before >= TcpState::Established;
        let mut data_ok = before >= TcpState::Established && before < TcpState::Closed;
        let other = 1 - dir;
        match before {
            TcpState::None => {
                if syn && !ack && dir == 0 {
                    self.streams[0] = Some(Stream::new(tcp.seq.wrapping_add(1)));
                    self.state = TcpState::SynSent;
                    if tcp.fast_open && !payload.is_empty() {
                        data_ok = true;
                    }
                } else if syn && ack && dir == 1 && cfg.midstream {
                    // Picked up at the SYN-ACK.
                    self.midstream = true;
                    self.streams[1] = Some(Stream::new(tcp.seq.wrapping_add(1)));
                    self.streams[0] = Some(Stream::new(tcp.ack));
                    self.state = TcpState::SynRecv;
                } else if !syn && !rst && cfg.midstream {
                    self.midstream = true;
                    self.streams[dir] = Some(Stream::new(tcp.seq));
                    if ack {
                        self.streams[other] = Some(Stream::new(tcp.ack));
                    }
                    self.state = TcpState::Established;
                    data_ok = true;
                    established = !payload.is_empty();
                }
            }
            TcpState::SynSent => {
                if syn && dir == 1 {
                    // SYN-ACK, or a simultaneous open's SYN.
                    self.streams[1] = Some(Stream::new(tcp.seq.wrapping_add(1)));
                    self.state = TcpState::SynRecv;
                } else if syn && dir == 0 && tcp.fast_open && !payload.is_empty() {
                    data_ok = true;
                }
            }
            TcpState::SynRecv => {
                if ack && !syn && !rst && dir == 0 {
                    self.state = TcpState::Established;
                    data_ok = true;
                    established = !payload.is_empty();
                } else if ack && !syn && !rst && dir == 1 && self.midstream {
                    self.state = TcpState::Established;
                    data_ok = true;
                }
            }
            TcpState::Established | TcpState::Closing | TcpState::Closed => {}
        }
        // A direction first heard of after a midstream pickup starts where its first packet does.
        if data_ok && self.streams[dir].is_none() && !syn {
            self.streams[dir] = Some(Stream::new(tcp.seq));
        }
        let mut in_stream = false;
        let mut held = false;
        if data_ok && !payload.is_empty() {
            // A SYN's data starts one after its sequence number.
            let seq = if syn { tcp.seq.wrapping_add(1) } else { tcp.seq };
            if let Some(s) = self.streams[dir].as_mut() {
                match s.insert(seq, payload, &cfg.limits, budget, counters) {
                    Insert::Advanced { .. } | Insert::Duplicate => in_stream = true,
                    Insert::Held => {
                        in_stream = true;
                        held = true;
                    }
                    Insert::BeyondDepth | Insert::Refused => {}
                }
            }
        }
        if ack && self.state >= TcpState::SynRecv {
            if let Some(s) = self.streams[other].as_mut() {
                s.ack(tcp.ack);
            }
        }
        if fin && self.state >= TcpState::Established {
            self.fin[dir] = true;
            if let Some(s) = self.streams[dir].as_mut() {
                let end = s.offset_of(tcp.seq.wrapping_add(payload.len() as u32));
                s.fin = Some(end);
            }
            self.state = if self.fin[other] {
                TcpState::Closed
            } else {
                TcpState::Closing
            };
        }
        if rst && self.state > TcpState::None {
            self.rst = true;
            self.state = TcpState::Closed;
        }
        TcpUpdate {
            established,
            in_stream,
            held,
        }
    }

    /// Swaps client and server (a midstream flow seen from the wrong end).
    pub fn swap(&mut self) {
        self.streams.swap(0, 1);
        self.fin.swap(0, 1);
    }

    /// Bytes held by both streams.
    pub fn held(&self) -> usize {
        self.streams.iter().flatten().map(Stream::held).sum()
    }

    /// Returns the streams' budget (the flow is ending).
    pub fn release(&mut self, budget: &mut LocalBudget) {
        for s in self.streams.iter_mut().flatten() {
            s.release_all(budget);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(flags: u8, seq: u32, ack: u32) -> TcpHeader {
        TcpHeader {
            src_port: 1,
            dst_port: 2,
            seq,
            ack,
            flags,
            window: 1000,
            fast_open: false,
        }
    }

    const S: u8 = tcp_flags::SYN;
    const A: u8 = tcp_flags::ACK;
    const F: u8 = tcp_flags::FIN;
    const PA: u8 = tcp_flags::ACK | tcp_flags::PSH;

    fn run(midstream: bool, packets: &[(usize, u8, u32, u32, &[u8])]) -> (TcpSession, Vec<TcpUpdate>) {
        let cfg = TcpConfig {
            midstream,
            limits: StreamLimits::default(),
        };
        let mut budget = LocalBudget::new(crate::stream::MemoryBudget::new(1 << 20));
        let mut c = StreamCounters::default();
        let mut s = TcpSession::new();
        let ups = packets
            .iter()
            .map(|&(dir, flags, seq, ack, data)| s.track(dir, &hdr(flags, seq, ack), data, &cfg, &mut budget, &mut c))
            .collect();
        (s, ups)
    }

    #[test]
    fn handshake_data_and_close() {
        let (s, ups) = run(
            false,
            &[
                (0, S, 100, 0, b""),
                (1, S | A, 500, 101, b""),
                (0, A, 101, 501, b""),
                (0, PA, 101, 501, b"GET /"),
                (1, A, 501, 106, b""),
                (0, F | A, 106, 501, b""),
                (1, F | A, 501, 107, b""),
            ],
        );
        assert_eq!(
            ups.iter().map(|u| u.established).collect::<Vec<_>>(),
            vec![false, false, false, true, true, true, true]
        );
        assert!(ups[3].in_stream);
        assert_eq!(s.state, TcpState::Closed);
        let client = s.streams[0].as_ref().unwrap();
        assert_eq!(client.next(), 5);
        assert_eq!(client.acked_edge(), 5);
    }

    #[test]
    fn without_midstream_a_late_connection_is_not_reassembled() {
        let (s, ups) = run(false, &[(0, PA, 7, 9, b"data")]);
        assert_eq!(s.state, TcpState::None);
        assert!(!ups[0].in_stream && !ups[0].established);
        let (s, ups) = run(true, &[(0, PA, 7, 9, b"data"), (1, A, 9, 11, b"")]);
        assert_eq!(s.state, TcpState::Established);
        assert!(ups[0].in_stream && ups[0].established);
        assert_eq!(s.streams[0].as_ref().unwrap().acked_edge(), 4);
    }

    #[test]
    fn syn_data_only_with_fast_open() {
        let (_, ups) = run(false, &[(0, S, 10, 0, b"hello")]);
        assert!(!ups[0].in_stream, "SYN data without TFO is not stream data");
        let cfg = TcpConfig {
            midstream: false,
            limits: StreamLimits::default(),
        };
        let mut budget = LocalBudget::new(crate::stream::MemoryBudget::new(1 << 20));
        let mut c = StreamCounters::default();
        let mut s = TcpSession::new();
        let mut h = hdr(S, 10, 0);
        h.fast_open = true;
        assert!(s.track(0, &h, b"hello", &cfg, &mut budget, &mut c).in_stream);
        assert_eq!(s.streams[0].as_ref().unwrap().next(), 5);
    }
}
