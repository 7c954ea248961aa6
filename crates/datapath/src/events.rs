//! Flow events: a connection started, changed state, or ended, and why.
//!
//! The engine reports them to an [`EventSink`] the caller passes with each
//! packet (no queue or lock inside the engine); the audit layer turns them into
//! flow records.

use palisade_wire::flow::FlowKey;

use crate::conn_state::ConnState;
use crate::port::PortId;
use crate::service::Steer;
use crate::verdict::DropReason;

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndReason {
    /// Both sides closed (FIN handshake).
    Closed,
    /// A TCP reset.
    Reset,
    /// No packet within the state's timeout.
    Timeout,
    /// A policy change denied it.
    PolicyRevoked,
    /// Evicted to make room in a full table.
    Evicted,
    /// Exported to another host (live migration).
    Exported,
    /// Inline inspection dropped it ([`crate::DropReason::Inspection`]).
    Inspection,
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A connection was created.
    Start,
    /// Its state changed.
    Update,
    /// It ended.
    End(EndReason),
    /// Policy denied its first packet (no connection was made; later packets
    /// of the flow hit the cached verdict and make no further event).
    Denied(DropReason),
}

/// A flow event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowEvent {
    /// What happened.
    pub kind: EventKind,
    /// The connection's key, in the initiator's direction.
    pub key: FlowKey,
    /// Its connection-tracking state after the event. A `Denied` event has
    /// no connection: `New`.
    pub state: ConnState,
    /// The packet behind the event was a TCP segment with ACK and without
    /// RST of a connection this engine never saw open: one met mid-stream
    /// (that passed while the host's agent was gone, say). Set on a
    /// `Denied` event for such a segment (where a denied SYN or stray reset
    /// leaves it unset) and on the `Start` of a connection picked up from
    /// one (its state `Established`, where an opening's is `SynSent`);
    /// unset on every other event.
    pub midstream: bool,
    /// Packets seen (both directions).
    pub packets: u64,
    /// Bytes seen (both directions).
    pub bytes: u64,
    /// Packets of the responder's direction (included in `packets`).
    pub reply_packets: u64,
    /// Bytes of the responder's direction (included in `bytes`).
    pub reply_bytes: u64,
    /// The deciding rules: the initiator's egress chain and the responder's
    /// ingress chain, as indices for [`crate::Engine::rule_info`]; `None` where
    /// that end is not managed, or the verdict came from another host.
    pub rules: [Option<u32>; 2],
    /// The policy version that decided.
    pub policy_version: u64,
    /// Decided by another host (VXLAN-GBP policy-applied) and trusted here.
    pub trusted: bool,
    /// The local ports at its ends (initiator, responder).
    pub owners: [Option<PortId>; 2],
    /// When its first packet was seen (caller's clock).
    pub created: u64,
    /// When its last packet was seen (caller's clock).
    pub last_seen: u64,
    /// When (caller's clock, nanoseconds).
    pub now: u64,
    /// The service chain and the appliance instance of each of its stages
    /// the connection is steered through ([`crate::Engine::appliances_of`]
    /// names them).
    pub steer: Option<Steer>,
}

/// Where flow events go.
pub trait EventSink {
    /// Receive one event.
    fn event(&mut self, event: &FlowEvent);

    /// A vNIC's guest announced itself (RARP or gratuitous ARP, see
    /// [`crate::announce`]); ignored unless the sink wants it.
    fn announced(&mut self, announcement: &crate::announce::Announcement) {
        let _ = announcement;
    }
}

/// Discard events.
impl EventSink for () {
    fn event(&mut self, _: &FlowEvent) {}
}

/// Collect events (tests, replay).
impl EventSink for Vec<FlowEvent> {
    fn event(&mut self, event: &FlowEvent) {
        self.push(*event);
    }
}
