//! The packet as the inspection engine sees it: addresses, transport header
//! fields and payload, borrowed from the caller's frame.
//!
//! [`Packet`] is a plain value with public fields so the datapath, which has
//! already parsed the frame for its own purposes, can build one without
//! parsing again; [`crate::decode`] builds them from captured frames.

use core::net::IpAddr;

/// TCP header fields inspection needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpHeader {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number.
    pub ack: u32,
    /// The flags byte: FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10, URG 0x20, ECE 0x40, CWR 0x80.
    pub flags: u8,
    /// Receive window, unscaled.
    pub window: u16,
    /// The segment carries a TCP Fast Open option (kind 34, or the experimental 254/0xF989).
    pub fast_open: bool,
}

/// TCP flag bits of [`TcpHeader::flags`].
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// The transport layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP.
    Tcp(TcpHeader),
    /// UDP.
    Udp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
    },
    /// ICMPv4 or ICMPv6.
    Icmp {
        /// Message type.
        icmp_type: u8,
        /// Code.
        code: u8,
        /// The echo identifier, for echo requests and replies.
        echo_id: Option<u16>,
    },
    /// Anything else, or a non-first fragment.
    Other,
}

/// One IP packet to inspect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol number of the transport (after IPv6 extension headers).
    pub protocol: u8,
    /// TTL, or IPv6 hop limit.
    pub ttl: u8,
    /// Transport header.
    pub transport: Transport,
    /// Transport payload (for ICMP: after the 8-byte header).
    pub payload: &'a [u8],
    /// Part of a fragmented datagram (ports are not known).
    pub fragment: bool,
    /// Length of the IP packet, for byte counters.
    pub ip_len: usize,
    /// False when the caller checked a TCP segment's checksum and found it
    /// wrong: the receiver will discard the segment, so it is not taken into
    /// the stream (it is still inspected as a packet, as Suricata does).
    pub checksum_ok: bool,
}

/// IP protocol numbers the engine treats specially.
pub mod proto {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
}

impl Packet<'_> {
    /// Source and destination ports (0 for protocols without them).
    pub fn ports(&self) -> (u16, u16) {
        match self.transport {
            Transport::Tcp(t) => (t.src_port, t.dst_port),
            Transport::Udp { src_port, dst_port } => (src_port, dst_port),
            _ => (0, 0),
        }
    }

    /// The TCP header, for TCP packets.
    pub fn tcp(&self) -> Option<&TcpHeader> {
        match &self.transport {
            Transport::Tcp(t) => Some(t),
            _ => None,
        }
    }

    /// Whether this is an ICMP error message (destination unreachable, time
    /// exceeded, parameter problem, and their ICMPv6 counterparts), which
    /// quotes the packet that caused it.
    pub fn is_icmp_error(&self) -> bool {
        match self.transport {
            Transport::Icmp { icmp_type, .. } => {
                if self.protocol == proto::ICMPV6 {
                    matches!(icmp_type, 1..=4)
                } else {
                    matches!(icmp_type, 3 | 11 | 12)
                }
            }
            _ => false,
        }
    }
}
