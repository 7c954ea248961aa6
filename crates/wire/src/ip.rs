//! IP protocol numbers shared by IPv4, IPv6 and the IPv6 extension-header walker.
//!
//! The same IANA "Assigned Internet Protocol Numbers" registry names both the
//! IPv4 `protocol` field and the IPv6 `next_header` field, so one newtype,
//! [`IpProtocol`], serves both. Addresses are `core::net::{Ipv4Addr, Ipv6Addr,
//! IpAddr}`; this module defines no address types of its own.

use core::fmt;

/// An IANA IP protocol number (IPv4 `protocol`, IPv6 `next_header`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct IpProtocol(pub u8);

impl IpProtocol {
    /// IPv6 Hop-by-Hop Options (RFC 8200).
    pub const HOPOPT: IpProtocol = IpProtocol(0);
    /// ICMP for IPv4 (RFC 792).
    pub const ICMP: IpProtocol = IpProtocol(1);
    /// IGMP (RFC 1112).
    pub const IGMP: IpProtocol = IpProtocol(2);
    /// TCP (RFC 9293).
    pub const TCP: IpProtocol = IpProtocol(6);
    /// UDP (RFC 768).
    pub const UDP: IpProtocol = IpProtocol(17);
    /// IPv6 Routing header (RFC 8200).
    pub const IPV6_ROUTE: IpProtocol = IpProtocol(43);
    /// IPv6 Fragment header (RFC 8200).
    pub const IPV6_FRAG: IpProtocol = IpProtocol(44);
    /// Generic Routing Encapsulation (RFC 2784).
    pub const GRE: IpProtocol = IpProtocol(47);
    /// Encapsulating Security Payload (RFC 4303).
    pub const ESP: IpProtocol = IpProtocol(50);
    /// Authentication Header (RFC 4302).
    pub const AH: IpProtocol = IpProtocol(51);
    /// ICMP for IPv6 (RFC 4443).
    pub const ICMPV6: IpProtocol = IpProtocol(58);
    /// IPv6 "No Next Header" (RFC 8200): nothing follows.
    pub const IPV6_NONXT: IpProtocol = IpProtocol(59);
    /// IPv6 Destination Options (RFC 8200).
    pub const IPV6_OPTS: IpProtocol = IpProtocol(60);
    /// Mobility Header (RFC 6275), an IPv6 extension header.
    pub const MOBILITY: IpProtocol = IpProtocol(135);
    /// Host Identity Protocol (RFC 7401), an IPv6 extension header.
    pub const HIP: IpProtocol = IpProtocol(139);
    /// Shim6 (RFC 5533), an IPv6 extension header.
    pub const SHIM6: IpProtocol = IpProtocol(140);
    /// SCTP (RFC 9260).
    pub const SCTP: IpProtocol = IpProtocol(132);

    /// Whether this number names an IPv6 extension header that may sit between
    /// the fixed header and the upper-layer header (the IANA "IPv6 Extension
    /// Header Types" registry, less ESP, whose payload is encrypted and so ends
    /// any header walk).
    ///
    /// All of these use the RFC 6564 layout (next header, then a length in
    /// 8-octet units not counting the first 8) except the Fragment header
    /// (fixed 8 bytes) and AH, whose length counts 4-octet units minus 2 (RFC
    /// 4302); [`crate::ipv6ext`] knows the difference.
    pub const fn is_ipv6_extension_header(self) -> bool {
        matches!(self.0, 0 | 43 | 44 | 60 | 51 | 135 | 139 | 140)
    }

    /// A short lowercase name for well-known protocols, `None` otherwise.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0 => "hopopt",
            1 => "icmp",
            2 => "igmp",
            6 => "tcp",
            17 => "udp",
            43 => "ipv6-route",
            44 => "ipv6-frag",
            47 => "gre",
            50 => "esp",
            51 => "ah",
            58 => "ipv6-icmp",
            59 => "ipv6-nonxt",
            60 => "ipv6-opts",
            132 => "sctp",
            135 => "mobility",
            139 => "hip",
            140 => "shim6",
            _ => return None,
        })
    }
}

impl From<u8> for IpProtocol {
    fn from(value: u8) -> Self {
        IpProtocol(value)
    }
}

impl From<IpProtocol> for u8 {
    fn from(value: IpProtocol) -> Self {
        value.0
    }
}

impl fmt::Display for IpProtocol {
    /// The well-known name (`tcp`), or the decimal number for anything else.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "{}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extension_header_set() {
        let ext: Vec<u8> = (0..=255u8)
            .filter(|&p| IpProtocol(p).is_ipv6_extension_header())
            .collect();
        assert_eq!(ext, [0, 43, 44, 51, 60, 135, 139, 140]);
        assert!(!IpProtocol::ESP.is_ipv6_extension_header());
        assert!(!IpProtocol::IPV6_NONXT.is_ipv6_extension_header());
    }

    #[test]
    fn display_names_and_numbers() {
        for (p, s) in [
            (IpProtocol::TCP, "tcp"),
            (IpProtocol::UDP, "udp"),
            (IpProtocol::ICMPV6, "ipv6-icmp"),
            (IpProtocol::SCTP, "sctp"),
            (IpProtocol(253), "253"),
        ] {
            assert_eq!(p.to_string(), s);
        }
        assert_eq!(u8::from(IpProtocol::from(17)), 17);
    }
}
