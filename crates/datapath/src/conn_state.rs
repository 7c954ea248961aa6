//! The states of a tracked connection, shared by the connection table
//! ([`crate::conntrack`]), TCP tracking ([`crate::tcptrack`]), flow events
//! ([`crate::events`]) and state blobs ([`crate::state`]): a module of its
//! own so that none of them needs another for it.

/// A connection's state (TCP's are Linux netfilter's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnState {
    /// TCP: the initiator's SYN was seen.
    SynSent,
    /// TCP: the responder's SYN-ACK was seen.
    SynReceived,
    /// TCP: the handshake completed (or was picked up mid-stream).
    Established,
    /// TCP: one side sent FIN.
    FinWait,
    /// TCP: the last ACK after both FINs was seen; lingering for late segments.
    TimeWait,
    /// Other protocols: only the initiator has sent.
    New,
    /// Other protocols: the responder has answered.
    Replied,
    /// TCP: a SYN came from both sides (simultaneous open).
    SynSent2,
    /// TCP: the FIN of one side was acknowledged.
    CloseWait,
    /// TCP: both sides sent FIN; waiting for the last ACK.
    LastAck,
    /// TCP: a reset was seen; lingering briefly for late segments.
    Close,
}

impl ConnState {
    /// Stable wire code (state blobs).
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The state of a wire code.
    pub const fn from_code(code: u8) -> Option<ConnState> {
        Some(match code {
            0 => ConnState::SynSent,
            1 => ConnState::SynReceived,
            2 => ConnState::Established,
            3 => ConnState::FinWait,
            4 => ConnState::TimeWait,
            5 => ConnState::New,
            6 => ConnState::Replied,
            7 => ConnState::SynSent2,
            8 => ConnState::CloseWait,
            9 => ConnState::LastAck,
            10 => ConnState::Close,
            _ => return None,
        })
    }
}
