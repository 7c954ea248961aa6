//! The one error type of the wire layer.
//!
//! Every parse failure names the protocol whose header was bad and what was
//! wrong with it, so a caller (the datapath's drop counters, `palisade pcap
//! stats`) can count malformed packets by reason without string matching.

use core::fmt;

/// The protocol layer at which a packet was found malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Layer {
    /// Ethernet II header.
    Ethernet,
    /// IEEE 802.1Q / 802.1ad VLAN tag.
    Vlan,
    /// ARP over Ethernet/IPv4.
    Arp,
    /// IPv4 header and options.
    Ipv4,
    /// IPv6 fixed header.
    Ipv6,
    /// An IPv6 extension header (hop-by-hop, routing, fragment, destination options, AH).
    Ipv6Ext,
    /// TCP header and options.
    Tcp,
    /// UDP header.
    Udp,
    /// SCTP common header or chunk.
    Sctp,
    /// ICMPv4 message.
    Icmpv4,
    /// ICMPv6 message (including neighbour discovery).
    Icmpv6,
    /// VXLAN header (with or without the Group Based Policy extension).
    Vxlan,
    /// virtio-net header (offload metadata in front of a frame).
    VirtioNet,
}

impl Layer {
    /// A short lowercase name, stable for use as a metric label or JSON key.
    pub const fn name(self) -> &'static str {
        match self {
            Layer::Ethernet => "ethernet",
            Layer::Vlan => "vlan",
            Layer::Arp => "arp",
            Layer::Ipv4 => "ipv4",
            Layer::Ipv6 => "ipv6",
            Layer::Ipv6Ext => "ipv6-ext",
            Layer::Tcp => "tcp",
            Layer::Udp => "udp",
            Layer::Sctp => "sctp",
            Layer::Icmpv4 => "icmpv4",
            Layer::Icmpv6 => "icmpv6",
            Layer::Vxlan => "vxlan",
            Layer::VirtioNet => "virtio-net",
        }
    }
}

/// What was wrong with a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The buffer ends before the fixed part of the header does.
    Truncated,
    /// A header-length field is smaller than the minimum header or points past the buffer.
    BadHeaderLength,
    /// A total/payload length field disagrees with the buffer.
    BadLength,
    /// The version field is not the one this parser handles.
    BadVersion,
    /// An option or extension-header TLV is malformed.
    BadOption,
    /// The checksum does not verify.
    BadChecksum,
    /// A field holds a value the protocol forbids (e.g. a reserved flag set, a zero VNI flag).
    BadValue,
    /// The header nests deeper than this parser allows (e.g. too many VLAN tags or extension headers).
    TooDeep,
}

impl ErrorKind {
    /// A short lowercase name, stable for use as a metric label or JSON key.
    pub const fn name(self) -> &'static str {
        match self {
            ErrorKind::Truncated => "truncated",
            ErrorKind::BadHeaderLength => "bad-header-length",
            ErrorKind::BadLength => "bad-length",
            ErrorKind::BadVersion => "bad-version",
            ErrorKind::BadOption => "bad-option",
            ErrorKind::BadChecksum => "bad-checksum",
            ErrorKind::BadValue => "bad-value",
            ErrorKind::TooDeep => "too-deep",
        }
    }
}

/// A malformed packet: which layer, and what was wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Error {
    layer: Layer,
    kind: ErrorKind,
}

impl Error {
    /// Make an error for `layer`.
    pub const fn new(layer: Layer, kind: ErrorKind) -> Self {
        Error { layer, kind }
    }

    /// The layer whose header was malformed.
    pub const fn layer(&self) -> Layer {
        self.layer
    }

    /// What was wrong.
    pub const fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.layer.name(), self.kind.name())
    }
}

impl std::error::Error for Error {}

/// The result type of every fallible wire operation.
pub type Result<T> = core::result::Result<T, Error>;
