//! Packets and connections for the engine tests: [`Packet`] values built
//! directly (no bytes to parse), and a TCP connection that keeps its own
//! sequence numbers.

#![allow(dead_code)]

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use palisade_inspect::packet::{Packet, TcpHeader, Transport, tcp_flags};
use palisade_inspect::rules::RuleContext;
use palisade_inspect::{Alert, Config, FlowState, Inspector, LoadOptions, Outcome, ProfileSpec, RuleSet};

pub const SYN: u8 = tcp_flags::SYN;
pub const ACK: u8 = tcp_flags::ACK;
pub const FIN: u8 = tcp_flags::FIN;
pub const RST: u8 = tcp_flags::RST;
pub const PA: u8 = tcp_flags::PSH | tcp_flags::ACK;

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// An owned packet; `packet()` borrows it as the engine's view.
#[derive(Debug, Clone)]
pub struct Pkt {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    pub ttl: u8,
    pub transport: Transport,
    pub payload: Vec<u8>,
    pub bad_checksum: bool,
}

impl Pkt {
    pub fn packet(&self) -> Packet<'_> {
        Packet {
            src: self.src,
            dst: self.dst,
            protocol: self.protocol,
            ttl: self.ttl,
            transport: self.transport,
            payload: &self.payload,
            fragment: false,
            ip_len: 40 + self.payload.len(),
            checksum_ok: !self.bad_checksum,
        }
    }

    pub fn udp(src: &str, sp: u16, dst: &str, dp: u16, payload: &[u8]) -> Pkt {
        Pkt {
            src: ip(src),
            dst: ip(dst),
            protocol: 17,
            ttl: 64,
            transport: Transport::Udp {
                src_port: sp,
                dst_port: dp,
            },
            payload: payload.to_vec(),
            bad_checksum: false,
        }
    }

    pub fn icmp(src: &str, dst: &str, icmp_type: u8, code: u8, payload: &[u8]) -> Pkt {
        Pkt {
            src: ip(src),
            dst: ip(dst),
            protocol: 1,
            ttl: 64,
            transport: Transport::Icmp {
                icmp_type,
                code,
                echo_id: matches!(icmp_type, 0 | 8).then_some(7),
            },
            payload: payload.to_vec(),
            bad_checksum: false,
        }
    }
}

/// A TCP connection between a client and a server, tracking sequence numbers.
pub struct Tcp {
    pub client: (IpAddr, u16),
    pub server: (IpAddr, u16),
    pub cseq: u32,
    pub sseq: u32,
}

impl Tcp {
    pub fn new(client: &str, cport: u16, server: &str, sport: u16) -> Tcp {
        Tcp {
            client: (ip(client), cport),
            server: (ip(server), sport),
            cseq: 1000,
            sseq: 9000,
        }
    }

    fn pkt(&self, from_client: bool, flags: u8, seq: u32, ack: u32, payload: &[u8]) -> Pkt {
        let ((src, sp), (dst, dp)) = if from_client {
            (self.client, self.server)
        } else {
            (self.server, self.client)
        };
        Pkt {
            src,
            dst,
            protocol: 6,
            ttl: 64,
            transport: Transport::Tcp(TcpHeader {
                src_port: sp,
                dst_port: dp,
                seq,
                ack,
                flags,
                window: 65535,
                fast_open: false,
            }),
            payload: payload.to_vec(),
            bad_checksum: false,
        }
    }

    /// SYN, SYN-ACK, ACK.
    pub fn handshake(&mut self) -> Vec<Pkt> {
        let syn = self.pkt(true, SYN, self.cseq, 0, b"");
        self.cseq += 1;
        let synack = self.pkt(false, SYN | ACK, self.sseq, self.cseq, b"");
        self.sseq += 1;
        let ack = self.pkt(true, ACK, self.cseq, self.sseq, b"");
        vec![syn, synack, ack]
    }

    /// Client data.
    pub fn c(&mut self, data: &[u8]) -> Pkt {
        let p = self.pkt(true, PA, self.cseq, self.sseq, data);
        self.cseq += data.len() as u32;
        p
    }

    /// Server data.
    pub fn s(&mut self, data: &[u8]) -> Pkt {
        let p = self.pkt(false, PA, self.sseq, self.cseq, data);
        self.sseq += data.len() as u32;
        p
    }

    /// Client data at an explicit offset from the client's next sequence number (no advance).
    pub fn c_at(&self, offset: i64, data: &[u8]) -> Pkt {
        self.pkt(true, PA, (i64::from(self.cseq) + offset) as u32, self.sseq, data)
    }

    /// Advances the client's sequence number (after c_at packets).
    pub fn advance_client(&mut self, n: u32) {
        self.cseq += n;
    }

    /// The server acknowledges everything the client sent.
    pub fn ack_from_server(&self) -> Pkt {
        self.pkt(false, ACK, self.sseq, self.cseq, b"")
    }

    /// The client acknowledges everything the server sent.
    pub fn ack_from_client(&self) -> Pkt {
        self.pkt(true, ACK, self.cseq, self.sseq, b"")
    }

    pub fn fin_from_client(&mut self) -> Pkt {
        let p = self.pkt(true, FIN | ACK, self.cseq, self.sseq, b"");
        self.cseq += 1;
        p
    }

    pub fn fin_from_server(&mut self) -> Pkt {
        let p = self.pkt(false, FIN | ACK, self.sseq, self.cseq, b"");
        self.sseq += 1;
        p
    }

    pub fn rst_from_client(&self) -> Pkt {
        self.pkt(true, RST, self.cseq, 0, b"")
    }
}

pub fn rules(text: &str) -> Arc<RuleSet> {
    Arc::new(RuleSet::parse(text, &RuleContext::default(), LoadOptions::default()).unwrap_or_else(|e| panic!("{e}")))
}

pub fn inspector(text: &str, config: Config) -> Inspector {
    Inspector::new(rules(text), vec![ProfileSpec::full()], config).unwrap()
}

/// What happened to each packet of a run.
#[derive(Debug)]
pub struct Run {
    pub outcomes: Vec<Outcome>,
    /// (packet index, sid) of every alert, in order; `usize::MAX` for the flush.
    pub alerts: Vec<(usize, u32)>,
    pub raw: Vec<(usize, Alert)>,
}

impl Run {
    pub fn sids(&self) -> Vec<u32> {
        self.alerts.iter().map(|a| a.1).collect()
    }

    pub fn at(&self, sid: u32) -> Vec<usize> {
        self.alerts.iter().filter(|a| a.1 == sid).map(|a| a.0).collect()
    }
}

/// Runs packets of one flow through `insp` (profile 0), then flushes the flow.
pub fn run_flow(insp: &mut Inspector, packets: &[Pkt]) -> (Run, FlowState) {
    run_flow_profile(insp, packets, palisade_inspect::ProfileId(0))
}

pub fn run_flow_profile(
    insp: &mut Inspector,
    packets: &[Pkt],
    profile: palisade_inspect::ProfileId,
) -> (Run, FlowState) {
    let mut flow = FlowState::new(profile, &packets[0].packet());
    let mut run = Run {
        outcomes: Vec::new(),
        alerts: Vec::new(),
        raw: Vec::new(),
    };
    let mut buf = Vec::new();
    for (i, p) in packets.iter().enumerate() {
        buf.clear();
        let o = insp.inspect(&mut flow, &p.packet(), Duration::from_secs(i as u64), &mut buf);
        run.outcomes.push(o);
        for a in &buf {
            run.alerts.push((i, insp.rules().get(a.sig).rule.sid));
            run.raw.push((i, *a));
        }
    }
    buf.clear();
    let _ = insp.flush(&mut flow, Duration::from_secs(packets.len() as u64), &mut buf);
    for a in &buf {
        run.alerts.push((usize::MAX, insp.rules().get(a.sig).rule.sid));
        run.raw.push((usize::MAX, *a));
    }
    (run, flow)
}
