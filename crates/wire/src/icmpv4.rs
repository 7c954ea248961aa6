//! ICMPv4 messages (RFC 792).
//!
//! The view's buffer is the whole message (the IP payload); the checksum covers
//! all of it and has no pseudo-header. Error messages quote the offending
//! datagram (its IPv4 header and at least 8 bytes of payload; RFC 1812 routers
//! quote more), which [`Packet::quoted_packet`] hands to the datapath so it can
//! relate the error to the flow it concerns.

use core::net::Ipv4Addr;

use crate::checksum;
use crate::field::read_u16;
use crate::{Error, ErrorKind, Layer, Result};

/// IP protocol number of ICMP.
pub const PROTOCOL: u8 = 1;

/// An ICMPv4 message type.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Icmpv4Message(pub u8);

impl Icmpv4Message {
    /// Echo reply.
    pub const ECHO_REPLY: Icmpv4Message = Icmpv4Message(0);
    /// Destination unreachable.
    pub const DST_UNREACHABLE: Icmpv4Message = Icmpv4Message(3);
    /// Source quench (deprecated by RFC 6633, still an error message).
    pub const SOURCE_QUENCH: Icmpv4Message = Icmpv4Message(4);
    /// Redirect.
    pub const REDIRECT: Icmpv4Message = Icmpv4Message(5);
    /// Echo request.
    pub const ECHO_REQUEST: Icmpv4Message = Icmpv4Message(8);
    /// Router advertisement (RFC 1256).
    pub const ROUTER_ADVERT: Icmpv4Message = Icmpv4Message(9);
    /// Router solicitation (RFC 1256).
    pub const ROUTER_SOLICIT: Icmpv4Message = Icmpv4Message(10);
    /// Time exceeded.
    pub const TIME_EXCEEDED: Icmpv4Message = Icmpv4Message(11);
    /// Parameter problem.
    pub const PARAM_PROBLEM: Icmpv4Message = Icmpv4Message(12);
    /// Timestamp request.
    pub const TIMESTAMP: Icmpv4Message = Icmpv4Message(13);
    /// Timestamp reply.
    pub const TIMESTAMP_REPLY: Icmpv4Message = Icmpv4Message(14);

    /// Whether this is an error message, which quotes the datagram that caused it.
    pub const fn is_error(self) -> bool {
        matches!(self.0, 3 | 4 | 5 | 11 | 12)
    }
}

/// Byte ranges of the header fields.
mod field {
    use crate::field::Field;
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECKSUM: Field = 2..4;
    /// The four type-specific bytes ("rest of header"): echo identifier and
    /// sequence number, next-hop MTU in the last two (unreachable, code 4),
    /// pointer in the first (parameter problem), gateway (redirect).
    pub const REST: Field = 4..8;
    pub const ECHO_IDENT: Field = 4..6;
    pub const ECHO_SEQNO: Field = 6..8;
    pub const DATA: usize = 8;
}

/// Length of the ICMPv4 header (type, code, checksum, rest of header).
pub const HEADER_LEN: usize = field::DATA;

/// A read/write view of an ICMPv4 message.
///
/// Contract: once [`Packet::new_checked`] has succeeded, no accessor panics.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wrap a buffer without checking it; accessors may panic on a short buffer.
    pub const fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// Wrap a buffer, checking it is long enough for the header.
    pub fn new_checked(buffer: T) -> Result<Packet<T>> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Check that the buffer holds the 8-byte header.
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < HEADER_LEN {
            Err(Error::new(Layer::Icmpv4, ErrorKind::Truncated))
        } else {
            Ok(())
        }
    }

    /// Give back the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The message type.
    pub fn msg_type(&self) -> Icmpv4Message {
        Icmpv4Message(self.buffer.as_ref()[field::TYPE])
    }

    /// The code.
    pub fn msg_code(&self) -> u8 {
        self.buffer.as_ref()[field::CODE]
    }

    /// The checksum field.
    pub fn checksum(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// The four type-specific bytes after the checksum.
    pub fn rest_of_header(&self) -> [u8; 4] {
        let d = &self.buffer.as_ref()[field::REST];
        [d[0], d[1], d[2], d[3]]
    }

    /// The identifier of an echo request/reply.
    pub fn echo_ident(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::ECHO_IDENT)
    }

    /// The sequence number of an echo request/reply.
    pub fn echo_seq_no(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::ECHO_SEQNO)
    }

    /// Verify the checksum over the whole buffer.
    pub fn verify_checksum(&self) -> bool {
        checksum::fold(checksum::sum(self.buffer.as_ref())) == 0xffff
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Packet<&'a T> {
    /// The bytes after the 8-byte header.
    pub fn data(&self) -> &'a [u8] {
        &self.buffer.as_ref()[field::DATA..]
    }

    /// For an error message, the quoted datagram (IPv4 header first); `None` otherwise.
    ///
    /// The bytes are raw and untrusted: parse them with the IPv4 view, which
    /// checks their length, before relating them to a flow.
    pub fn quoted_packet(&self) -> Option<&'a [u8]> {
        self.msg_type().is_error().then(|| self.data())
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Set the message type.
    pub fn set_msg_type(&mut self, value: Icmpv4Message) {
        self.buffer.as_mut()[field::TYPE] = value.0
    }

    /// Set the code.
    pub fn set_msg_code(&mut self, value: u8) {
        self.buffer.as_mut()[field::CODE] = value
    }

    /// Set the checksum field.
    pub fn set_checksum(&mut self, value: u16) {
        self.buffer.as_mut()[field::CHECKSUM].copy_from_slice(&value.to_be_bytes())
    }

    /// Set the four type-specific bytes.
    pub fn set_rest_of_header(&mut self, value: [u8; 4]) {
        self.buffer.as_mut()[field::REST].copy_from_slice(&value)
    }

    /// Compute and store the checksum over the whole buffer.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let value = checksum::checksum(self.buffer.as_ref());
        self.set_checksum(value)
    }

    /// The bytes after the header, mutably.
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::DATA..]
    }
}

/// A parsed ICMPv4 message.
///
/// An error message whose unused bytes are not zero (RFC 4884 reuses one for
/// a length) parses as [`Icmpv4Repr::Other`], so parse→emit is always byte-exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Icmpv4Repr<'a> {
    /// Echo request.
    EchoRequest {
        /// Identifier.
        ident: u16,
        /// Sequence number.
        seq_no: u16,
        /// Echo data.
        data: &'a [u8],
    },
    /// Echo reply.
    EchoReply {
        /// Identifier.
        ident: u16,
        /// Sequence number.
        seq_no: u16,
        /// Echo data.
        data: &'a [u8],
    },
    /// Destination unreachable.
    DstUnreachable {
        /// Reason (e.g. 3 = port unreachable, 4 = fragmentation needed).
        code: u8,
        /// Next-hop MTU for code 4 (RFC 1191); the same (unused, normally zero) bytes otherwise.
        next_hop_mtu: u16,
        /// The quoted datagram.
        header: &'a [u8],
    },
    /// Time exceeded.
    TimeExceeded {
        /// 0 = TTL exceeded in transit, 1 = fragment reassembly time exceeded.
        code: u8,
        /// The quoted datagram.
        header: &'a [u8],
    },
    /// Parameter problem.
    ParamProblem {
        /// Code.
        code: u8,
        /// Offset of the offending byte in the quoted datagram.
        pointer: u8,
        /// The quoted datagram.
        header: &'a [u8],
    },
    /// Redirect.
    Redirect {
        /// Code (0 = network, 1 = host, ...).
        code: u8,
        /// The better first-hop router.
        gateway: Ipv4Addr,
        /// The quoted datagram.
        header: &'a [u8],
    },
    /// Any other message, kept raw.
    Other {
        /// Message type.
        msg_type: Icmpv4Message,
        /// Code.
        code: u8,
        /// The four type-specific bytes.
        rest: [u8; 4],
        /// The bytes after the header.
        data: &'a [u8],
    },
}

impl<'a> Icmpv4Repr<'a> {
    /// Parse a message. The checksum is not verified here: the caller decides
    /// (see [`Packet::verify_checksum`]).
    pub fn parse<T: AsRef<[u8]> + ?Sized>(packet: &Packet<&'a T>) -> Result<Icmpv4Repr<'a>> {
        packet.check_len()?;
        let code = packet.msg_code();
        let data = packet.data();
        let rest = packet.rest_of_header();
        Ok(match packet.msg_type() {
            Icmpv4Message::ECHO_REQUEST if code == 0 => Icmpv4Repr::EchoRequest {
                ident: packet.echo_ident(),
                seq_no: packet.echo_seq_no(),
                data,
            },
            Icmpv4Message::ECHO_REPLY if code == 0 => Icmpv4Repr::EchoReply {
                ident: packet.echo_ident(),
                seq_no: packet.echo_seq_no(),
                data,
            },
            // Error messages whose unused bytes are not zero (RFC 4884 puts a length in one)
            // stay raw in `Other`, which keeps every byte; `quoted_packet` still works.
            Icmpv4Message::DST_UNREACHABLE if rest[..2] == [0, 0] => Icmpv4Repr::DstUnreachable {
                code,
                next_hop_mtu: u16::from_be_bytes([rest[2], rest[3]]),
                header: data,
            },
            Icmpv4Message::TIME_EXCEEDED if rest == [0; 4] => Icmpv4Repr::TimeExceeded { code, header: data },
            Icmpv4Message::PARAM_PROBLEM if rest[1..] == [0, 0, 0] => Icmpv4Repr::ParamProblem {
                code,
                pointer: rest[0],
                header: data,
            },
            Icmpv4Message::REDIRECT => Icmpv4Repr::Redirect {
                code,
                gateway: Ipv4Addr::from(rest),
                header: data,
            },
            msg_type => Icmpv4Repr::Other {
                msg_type,
                code,
                rest,
                data,
            },
        })
    }

    /// The message type.
    pub const fn msg_type(&self) -> Icmpv4Message {
        match self {
            Icmpv4Repr::EchoRequest { .. } => Icmpv4Message::ECHO_REQUEST,
            Icmpv4Repr::EchoReply { .. } => Icmpv4Message::ECHO_REPLY,
            Icmpv4Repr::DstUnreachable { .. } => Icmpv4Message::DST_UNREACHABLE,
            Icmpv4Repr::TimeExceeded { .. } => Icmpv4Message::TIME_EXCEEDED,
            Icmpv4Repr::ParamProblem { .. } => Icmpv4Message::PARAM_PROBLEM,
            Icmpv4Repr::Redirect { .. } => Icmpv4Message::REDIRECT,
            Icmpv4Repr::Other { msg_type, .. } => *msg_type,
        }
    }

    /// The bytes after the header (echo data, quoted datagram, or raw data).
    const fn data(&self) -> &'a [u8] {
        match *self {
            Icmpv4Repr::EchoRequest { data, .. }
            | Icmpv4Repr::EchoReply { data, .. }
            | Icmpv4Repr::Other { data, .. } => data,
            Icmpv4Repr::DstUnreachable { header, .. }
            | Icmpv4Repr::TimeExceeded { header, .. }
            | Icmpv4Repr::ParamProblem { header, .. }
            | Icmpv4Repr::Redirect { header, .. } => header,
        }
    }

    /// For an error message, the quoted datagram; `None` otherwise.
    pub fn quoted_packet(&self) -> Option<&'a [u8]> {
        self.msg_type().is_error().then(|| self.data())
    }

    /// Header plus data length.
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN + self.data().len()
    }

    /// Write the message, checksum included, into a buffer exactly [`Self::buffer_len`] long.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        debug_assert_eq!(packet.buffer.as_ref().len(), self.buffer_len());
        let (code, rest) = match *self {
            Icmpv4Repr::EchoRequest { ident, seq_no, .. } | Icmpv4Repr::EchoReply { ident, seq_no, .. } => {
                let (i, s) = (ident.to_be_bytes(), seq_no.to_be_bytes());
                (0, [i[0], i[1], s[0], s[1]])
            }
            Icmpv4Repr::DstUnreachable { code, next_hop_mtu, .. } => {
                let m = next_hop_mtu.to_be_bytes();
                (code, [0, 0, m[0], m[1]])
            }
            Icmpv4Repr::TimeExceeded { code, .. } => (code, [0; 4]),
            Icmpv4Repr::ParamProblem { code, pointer, .. } => (code, [pointer, 0, 0, 0]),
            Icmpv4Repr::Redirect { code, gateway, .. } => (code, gateway.octets()),
            Icmpv4Repr::Other { code, rest, .. } => (code, rest),
        };
        packet.set_msg_type(self.msg_type());
        packet.set_msg_code(code);
        packet.set_rest_of_header(rest);
        packet.data_mut().copy_from_slice(self.data());
        packet.fill_checksum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Echo request 10.0.0.1 -> 74.125.225.99, id 0x881c seq 0 (zeek's icmp/icmp-ping.pcap, frame 1).
    const ECHO: [u8; 64] = [
        0x08, 0x00, 0x69, 0x09, 0x88, 0x1c, 0x00, 0x00, 0x4f, 0x85, 0xe0, 0x43, 0x00, 0x0e, 0xeb, 0xff, //
        0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, //
        0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, //
        0x28, 0x29, 0x2a, 0x2b, 0x2c, 0x2d, 0x2e, 0x2f, 0x30, 0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37,
    ];

    /// Network unreachable quoting a bare IPv4 header 10.0.0.2 -> 10.0.0.1
    /// (zeek's icmp/icmp-destunreach-ip.pcap).
    const UNREACH: [u8; 28] = [
        0x03, 0x00, 0xfc, 0xff, 0x00, 0x00, 0x00, 0x00, 0x45, 0x00, 0x00, 0x14, 0x00, 0x01, 0x00, 0x00, //
        0x40, 0x00, 0x66, 0xe7, 0x0a, 0x00, 0x00, 0x02, 0x0a, 0x00, 0x00, 0x01,
    ];

    #[test]
    fn real_echo_request() {
        let p = Packet::new_checked(&ECHO[..]).unwrap();
        assert!(p.verify_checksum());
        assert_eq!(p.checksum(), 0x6909);
        assert_eq!(p.quoted_packet(), None);
        let repr = Icmpv4Repr::parse(&p).unwrap();
        assert_eq!(
            repr,
            Icmpv4Repr::EchoRequest {
                ident: 0x881c,
                seq_no: 0,
                data: &ECHO[8..]
            }
        );
        let mut out = [0u8; 64];
        repr.emit(&mut Packet::new_unchecked(&mut out[..]));
        assert_eq!(out, ECHO);
    }

    #[test]
    fn real_dst_unreachable_quotes_the_datagram() {
        let p = Packet::new_checked(&UNREACH[..]).unwrap();
        assert!(p.verify_checksum());
        assert_eq!(p.quoted_packet(), Some(&UNREACH[8..]));
        let repr = Icmpv4Repr::parse(&p).unwrap();
        assert_eq!(
            repr,
            Icmpv4Repr::DstUnreachable {
                code: 0,
                next_hop_mtu: 0,
                header: &UNREACH[8..]
            }
        );
        assert_eq!(repr.quoted_packet(), Some(&UNREACH[8..]));
        let mut out = [0u8; 28];
        repr.emit(&mut Packet::new_unchecked(&mut out[..]));
        assert_eq!(out, UNREACH);
    }

    #[test]
    fn corrupted_byte_fails_verification() {
        for i in 0..UNREACH.len() {
            let mut b = UNREACH;
            b[i] ^= 0x40;
            assert!(!Packet::new_checked(&b[..]).unwrap().verify_checksum(), "{i}");
        }
    }

    #[test]
    fn every_variant_round_trips() {
        let quoted = &UNREACH[8..];
        let reprs = [
            Icmpv4Repr::EchoReply {
                ident: 7,
                seq_no: 9,
                data: b"abc",
            },
            Icmpv4Repr::DstUnreachable {
                code: 4,
                next_hop_mtu: 1400,
                header: quoted,
            },
            Icmpv4Repr::TimeExceeded {
                code: 1,
                header: quoted,
            },
            Icmpv4Repr::ParamProblem {
                code: 0,
                pointer: 9,
                header: quoted,
            },
            Icmpv4Repr::Redirect {
                code: 1,
                gateway: Ipv4Addr::new(10, 0, 0, 254),
                header: quoted,
            },
            Icmpv4Repr::Other {
                msg_type: Icmpv4Message::TIMESTAMP,
                code: 0,
                rest: [1, 2, 3, 4],
                data: &[0; 12],
            },
            // An echo with a nonzero code is not an echo (RFC 792): kept raw.
            Icmpv4Repr::Other {
                msg_type: Icmpv4Message::ECHO_REQUEST,
                code: 1,
                rest: [1, 2, 3, 4],
                data: &[],
            },
        ];
        for repr in reprs {
            let mut out = vec![0xa5; repr.buffer_len()];
            repr.emit(&mut Packet::new_unchecked(&mut out[..]));
            let p = Packet::new_checked(&out[..]).unwrap();
            assert!(p.verify_checksum(), "{repr:?}");
            assert_eq!(Icmpv4Repr::parse(&p).unwrap(), repr);
            assert_eq!(p.quoted_packet().is_some(), repr.msg_type().is_error());
        }
    }

    #[test]
    fn truncated() {
        for n in 0..HEADER_LEN {
            assert_eq!(
                Packet::new_checked(&ECHO[..n]).unwrap_err(),
                Error::new(Layer::Icmpv4, ErrorKind::Truncated)
            );
        }
        // Exactly a header parses: an error message may quote nothing at all.
        let p = Packet::new_checked(&UNREACH[..8]).unwrap();
        assert_eq!(p.quoted_packet(), Some(&[][..]));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..48)) {
            if let Ok(p) = Packet::new_checked(&bytes[..]) {
                let _ = (p.msg_type(), p.msg_code(), p.checksum(), p.rest_of_header(), p.data());
                let _ = (p.echo_ident(), p.echo_seq_no(), p.verify_checksum(), p.quoted_packet());
                let repr = Icmpv4Repr::parse(&p).unwrap();
                let _ = repr.quoted_packet();
                proptest::prop_assert_eq!(repr.buffer_len(), bytes.len());
            }
        }
    }
}
