//! Per-flow detection state: a value the caller keeps beside its own
//! connection entry and hands back with each packet of the flow.
//!
//! It holds what inspection must remember between packets: which end is the
//! client, the TCP reassembly state, the application-layer parser, flowbits,
//! flow-tracked thresholds, which signatures each transaction has already
//! been judged against, and the flow's verdict (passed or dropped). A flow
//! the policy does not inspect has no `FlowState` at all.

use core::net::IpAddr;

use crate::app::AppState;
use crate::packet::{Packet, Transport, tcp_flags};
use crate::prefilter::SigId;
use crate::rules::AppProto;
use crate::tcp::{TcpSession, TcpState};
use crate::threshold::Window;

/// Which way a packet goes within its flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client (the flow's initiator).
    ToServer,
    /// From the server.
    ToClient,
}

impl Direction {
    pub(crate) fn index(self) -> usize {
        match self {
            Direction::ToServer => 0,
            Direction::ToClient => 1,
        }
    }
}

/// A profile compiled into an [`crate::Inspector`], by position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProfileId(pub u16);

/// What inspection decided for the whole flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowVerdict {
    /// Keep inspecting.
    Inspect,
    /// An IP-only pass rule matched: no more inspection.
    Pass,
    /// A drop (or, in IPS mode, reject) rule matched: drop every later packet.
    Drop,
}

/// Packet and byte counts per direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowCounts {
    /// Packets to the server, to the client.
    pub packets: [u64; 2],
    /// IP bytes to the server, to the client.
    pub bytes: [u64; 2],
}

/// Detection progress of one transaction.
#[derive(Debug, Clone)]
pub(crate) struct TxDone {
    pub proto: AppProto,
    pub id: u64,
    /// Signatures judged (matched or failed), sorted.
    pub done: Vec<SigId>,
}

/// Detection state proper: what rules remember.
#[derive(Debug, Default)]
pub(crate) struct DetectState {
    /// The ruleset the state was built under (0: none yet).
    pub generation: u64,
    pub flowbits: Vec<u64>,
    pub thresholds: Vec<(SigId, Option<Window>)>,
    pub txs: Vec<TxDone>,
    pub alerted: bool,
}

/// Transaction progress entries kept per flow.
const MAX_TX_STATES: usize = 128;

impl DetectState {
    pub fn flowbit(&self, bit: u32) -> bool {
        self.flowbits
            .get(bit as usize / 64)
            .is_some_and(|w| w & (1 << (bit % 64)) != 0)
    }

    pub fn set_flowbit(&mut self, bit: u32, on: bool) {
        let word = bit as usize / 64;
        if word >= self.flowbits.len() {
            if !on {
                return;
            }
            self.flowbits.resize(word + 1, 0);
        }
        if on {
            self.flowbits[word] |= 1 << (bit % 64);
        } else {
            self.flowbits[word] &= !(1 << (bit % 64));
        }
    }

    pub fn tx_done(&self, proto: AppProto, id: u64, sig: SigId) -> bool {
        self.txs
            .iter()
            .find(|t| t.proto == proto && t.id == id)
            .is_some_and(|t| t.done.binary_search(&sig).is_ok())
    }

    pub fn mark_tx_done(&mut self, proto: AppProto, id: u64, sig: SigId) {
        let entry = match self.txs.iter().position(|t| t.proto == proto && t.id == id) {
            Some(i) => &mut self.txs[i],
            None => {
                if self.txs.len() >= MAX_TX_STATES {
                    // The oldest transaction's state goes; the parsers keep fewer live ones.
                    self.txs.remove(0);
                }
                self.txs.push(TxDone {
                    proto,
                    id,
                    done: Vec::new(),
                });
                self.txs.last_mut().expect("pushed")
            }
        };
        if let Err(at) = entry.done.binary_search(&sig) {
            entry.done.insert(at, sig);
        }
    }

    pub fn threshold(&mut self, sig: SigId) -> &mut Option<Window> {
        let i = match self.thresholds.iter().position(|(s, _)| *s == sig) {
            Some(i) => i,
            None => {
                self.thresholds.push((sig, None));
                self.thresholds.len() - 1
            }
        };
        &mut self.thresholds[i].1
    }
}

/// The detection state of one flow.
#[derive(Debug)]
pub struct FlowState {
    pub(crate) profile: ProfileId,
    pub(crate) protocol: u8,
    pub(crate) client: (IpAddr, u16),
    pub(crate) server: (IpAddr, u16),
    /// Echo identifier, for ICMP echo flows.
    pub(crate) seen: [bool; 2],
    pub(crate) tcp: Option<Box<TcpSession>>,
    pub(crate) app: AppState,
    pub(crate) detect: DetectState,
    pub(crate) verdict: FlowVerdict,
    pub(crate) counts: FlowCounts,
    pub(crate) reversed: bool,
}

impl FlowState {
    /// A flow whose first packet is `first`, inspected under `profile`. The
    /// sender of the first packet is the client, except for a TCP SYN-ACK
    /// (the answer to a SYN not seen), whose receiver is.
    pub fn new(profile: ProfileId, first: &Packet<'_>) -> FlowState {
        let (sp, dp) = first.ports();
        let syn_ack = matches!(first.transport, Transport::Tcp(t)
            if t.flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN | tcp_flags::ACK);
        let (client, server) = if syn_ack {
            ((first.dst, dp), (first.src, sp))
        } else {
            ((first.src, sp), (first.dst, dp))
        };
        FlowState {
            profile,
            protocol: first.protocol,
            client,
            server,
            seen: [false; 2],
            tcp: (first.protocol == 6 && !first.fragment).then(|| Box::new(TcpSession::new())),
            app: AppState::default(),
            detect: DetectState::default(),
            verdict: FlowVerdict::Inspect,
            counts: FlowCounts::default(),
            reversed: false,
        }
    }

    /// The direction of `pkt` in this flow, or `None` if it is not one of its packets.
    pub fn direction(&self, pkt: &Packet<'_>) -> Option<Direction> {
        if pkt.protocol != self.protocol {
            return None;
        }
        let (sp, dp) = pkt.ports();
        if (pkt.src, sp) == self.client && (pkt.dst, dp) == self.server {
            Some(Direction::ToServer)
        } else if (pkt.src, sp) == self.server && (pkt.dst, dp) == self.client {
            Some(Direction::ToClient)
        } else {
            None
        }
    }

    /// The profile the flow is inspected under.
    pub fn profile(&self) -> ProfileId {
        self.profile
    }

    /// The client's address and port.
    pub fn client(&self) -> (IpAddr, u16) {
        self.client
    }

    /// The server's address and port.
    pub fn server(&self) -> (IpAddr, u16) {
        self.server
    }

    /// The IP protocol.
    pub fn protocol(&self) -> u8 {
        self.protocol
    }

    /// The application protocol, once detected.
    pub fn app_proto(&self) -> Option<AppProto> {
        self.app.proto()
    }

    /// The application protocol's name as EVE gives it (`http`, `http2`, `tls`, `dns`).
    pub fn app_name(&self) -> Option<&'static str> {
        self.app.name()
    }

    /// Whether any alert was raised on the flow.
    pub fn alerted(&self) -> bool {
        self.detect.alerted
    }

    /// The flow's verdict.
    pub fn verdict(&self) -> FlowVerdict {
        self.verdict
    }

    /// Whether the caller may skip inspection of later packets: the flow was
    /// passed (forward them) or dropped (drop them).
    pub fn is_decided(&self) -> bool {
        self.verdict != FlowVerdict::Inspect
    }

    /// Packet and byte counts.
    pub fn counts(&self) -> FlowCounts {
        self.counts
    }

    /// Whether client and server were swapped after the first packet (a
    /// midstream flow whose first packet came from the server).
    pub fn reversed(&self) -> bool {
        self.reversed
    }

    /// The TCP state, for TCP flows.
    pub fn tcp_state(&self) -> Option<TcpState> {
        self.tcp.as_ref().map(|t| t.state)
    }

    /// Bytes of stream data the flow holds (charged to the inspector's budget).
    pub fn stream_bytes(&self) -> usize {
        self.tcp.as_ref().map_or(0, |t| t.held())
    }

    pub(crate) fn swap(&mut self) {
        core::mem::swap(&mut self.client, &mut self.server);
        self.seen.swap(0, 1);
        self.counts.packets.swap(0, 1);
        self.counts.bytes.swap(0, 1);
        if let Some(t) = self.tcp.as_mut() {
            t.swap();
        }
        self.reversed = !self.reversed;
    }
}
