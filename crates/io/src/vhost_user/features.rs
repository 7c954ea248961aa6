//! The virtio feature bits the device offers, and what a guest negotiated.
//!
//! QEMU forwards the guest driver's choice (a subset of what we offer,
//! filtered by its own command line) in `SET_FEATURES`. Every data-path
//! decision that depends on it reads [`GuestFeatures`]: the header length,
//! mergeable receive buffers, event-index notification, indirect
//! descriptors, and which offloads a frame may carry in each direction.

use palisade_wire::virtio_net::{GsoKind, VirtioNetRepr};
use vhost::vhost_user::VhostUserVirtioFeatures;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

const fn bit(n: u32) -> u64 {
    1 << n
}

/// Feature bits as masks (bit *n* of the negotiated `u64`), for callers and tests.
pub mod mask {
    use super::bit;
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_net as n;
    use virtio_bindings::virtio_ring as r;

    /// `VIRTIO_NET_F_CSUM` (0).
    pub const CSUM: u64 = bit(n::VIRTIO_NET_F_CSUM);
    /// `VIRTIO_NET_F_GUEST_CSUM` (1).
    pub const GUEST_CSUM: u64 = bit(n::VIRTIO_NET_F_GUEST_CSUM);
    /// `VIRTIO_NET_F_GUEST_TSO4` (7).
    pub const GUEST_TSO4: u64 = bit(n::VIRTIO_NET_F_GUEST_TSO4);
    /// `VIRTIO_NET_F_GUEST_TSO6` (8).
    pub const GUEST_TSO6: u64 = bit(n::VIRTIO_NET_F_GUEST_TSO6);
    /// `VIRTIO_NET_F_GUEST_ECN` (9).
    pub const GUEST_ECN: u64 = bit(n::VIRTIO_NET_F_GUEST_ECN);
    /// `VIRTIO_NET_F_HOST_TSO4` (11).
    pub const HOST_TSO4: u64 = bit(n::VIRTIO_NET_F_HOST_TSO4);
    /// `VIRTIO_NET_F_HOST_TSO6` (12).
    pub const HOST_TSO6: u64 = bit(n::VIRTIO_NET_F_HOST_TSO6);
    /// `VIRTIO_NET_F_HOST_ECN` (13).
    pub const HOST_ECN: u64 = bit(n::VIRTIO_NET_F_HOST_ECN);
    /// `VIRTIO_NET_F_MRG_RXBUF` (15).
    pub const MRG_RXBUF: u64 = bit(n::VIRTIO_NET_F_MRG_RXBUF);
    /// `VIRTIO_NET_F_STATUS` (16).
    pub const STATUS: u64 = bit(n::VIRTIO_NET_F_STATUS);
    /// `VIRTIO_NET_F_MQ` (22).
    pub const MQ: u64 = bit(n::VIRTIO_NET_F_MQ);
    /// `VIRTIO_RING_F_INDIRECT_DESC` (28).
    pub const INDIRECT_DESC: u64 = bit(r::VIRTIO_RING_F_INDIRECT_DESC);
    /// `VIRTIO_RING_F_EVENT_IDX` (29).
    pub const EVENT_IDX: u64 = bit(r::VIRTIO_RING_F_EVENT_IDX);
    /// `VHOST_USER_F_PROTOCOL_FEATURES` (30): vhost-user's, not the guest's.
    pub const PROTOCOL_FEATURES: u64 = bit(30);
    /// `VIRTIO_F_VERSION_1` (32).
    pub const VERSION_1: u64 = bit(VIRTIO_F_VERSION_1);
}

/// Which offloads the device offers the guest. Each is negotiated only if the guest's driver wants it too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offloads {
    /// Frames from the guest may carry partial checksums (`VIRTIO_NET_F_CSUM`).
    pub checksum_from_guest: bool,
    /// Frames to the guest may carry partial checksums, and a verified one
    /// may say so (`VIRTIO_NET_F_GUEST_CSUM`).
    pub checksum_to_guest: bool,
    /// The guest may send TCP super-frames (`HOST_TSO4`, `HOST_TSO6`, `HOST_ECN`);
    /// needs `checksum_from_guest`.
    pub tso_from_guest: bool,
    /// The guest takes TCP super-frames (`GUEST_TSO4`, `GUEST_TSO6`, `GUEST_ECN`);
    /// needs `checksum_to_guest`.
    pub tso_to_guest: bool,
}

impl Offloads {
    /// Everything: what a real guest runs with, and what the data path is built for.
    pub const ALL: Offloads = Offloads {
        checksum_from_guest: true,
        checksum_to_guest: true,
        tso_from_guest: true,
        tso_to_guest: true,
    };

    /// Nothing: every frame is complete, as on a plain Ethernet port.
    pub const NONE: Offloads = Offloads {
        checksum_from_guest: false,
        checksum_to_guest: false,
        tso_from_guest: false,
        tso_to_guest: false,
    };

    /// Partial checksums both ways but no super-frames: for a caller that
    /// handles frames one MTU at a time (the [`crate::FramePort`] view).
    pub const CHECKSUM_ONLY: Offloads = Offloads {
        checksum_from_guest: true,
        checksum_to_guest: true,
        tso_from_guest: false,
        tso_to_guest: false,
    };
}

impl Default for Offloads {
    fn default() -> Self {
        Offloads::ALL
    }
}

/// The virtio feature bits offered for `offloads` and `queue_pairs`.
///
/// Always: `VERSION_1`, `MRG_RXBUF`, `STATUS`, `EVENT_IDX`, `INDIRECT_DESC`,
/// vhost-user's `PROTOCOL_FEATURES` and `VHOST_F_LOG_ALL` (dirty-page
/// logging for live migration); `MQ` with more than one queue pair.
pub fn offered(offloads: Offloads, queue_pairs: u16) -> u64 {
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_NET_F_STATUS)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | super::log::VHOST_F_LOG_ALL;
    if queue_pairs > 1 {
        f |= bit(VIRTIO_NET_F_MQ);
    }
    if offloads.checksum_from_guest {
        f |= bit(VIRTIO_NET_F_CSUM);
        if offloads.tso_from_guest {
            f |= bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_HOST_TSO6) | bit(VIRTIO_NET_F_HOST_ECN);
        }
    }
    if offloads.checksum_to_guest {
        f |= bit(VIRTIO_NET_F_GUEST_CSUM);
        if offloads.tso_to_guest {
            f |= bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6) | bit(VIRTIO_NET_F_GUEST_ECN);
        }
    }
    f
}

/// The feature bits a guest negotiated (`SET_FEATURES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestFeatures(u64);

/// Why a frame's header asks for something the other side did not negotiate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unsupported {
    /// A partial checksum.
    Checksum,
    /// A super-frame of this kind (or with ECN).
    Segmentation,
}

impl GuestFeatures {
    /// Wrap negotiated bits.
    pub const fn from_bits(bits: u64) -> GuestFeatures {
        GuestFeatures(bits)
    }

    /// The raw bits (bit *n* is feature *n*, as in the guest's `/sys/bus/virtio/devices/*/features`).
    pub const fn bits(self) -> u64 {
        self.0
    }

    const fn has(self, n: u32) -> bool {
        self.0 & bit(n) != 0
    }

    /// `VIRTIO_F_VERSION_1`: a modern (virtio 1.x) driver.
    pub const fn version_1(self) -> bool {
        self.has(VIRTIO_F_VERSION_1)
    }

    /// `VIRTIO_NET_F_MRG_RXBUF`: a received frame may span several receive buffers.
    pub const fn mergeable_rx_buffers(self) -> bool {
        self.has(VIRTIO_NET_F_MRG_RXBUF)
    }

    /// `VIRTIO_RING_F_EVENT_IDX`: notifications in both directions are suppressed by ring indices.
    pub const fn event_idx(self) -> bool {
        self.has(VIRTIO_RING_F_EVENT_IDX)
    }

    /// `VIRTIO_RING_F_INDIRECT_DESC`: a descriptor may point at a table of descriptors.
    pub const fn indirect_descriptors(self) -> bool {
        self.has(VIRTIO_RING_F_INDIRECT_DESC)
    }

    /// `VIRTIO_NET_F_MQ`: several queue pairs.
    pub const fn multiqueue(self) -> bool {
        self.has(VIRTIO_NET_F_MQ)
    }

    /// `VIRTIO_NET_F_CSUM`: the guest may send partial checksums.
    pub const fn checksum_from_guest(self) -> bool {
        self.has(VIRTIO_NET_F_CSUM)
    }

    /// `VIRTIO_NET_F_GUEST_CSUM`: the guest takes partial checksums and `DATA_VALID`.
    pub const fn checksum_to_guest(self) -> bool {
        self.has(VIRTIO_NET_F_GUEST_CSUM)
    }

    /// `HOST_TSO4` and `HOST_TSO6` as a pair: whether the guest may send TCP super-frames of each family.
    pub const fn tso_from_guest(self) -> (bool, bool) {
        (self.has(VIRTIO_NET_F_HOST_TSO4), self.has(VIRTIO_NET_F_HOST_TSO6))
    }

    /// `GUEST_TSO4` and `GUEST_TSO6`: whether the guest takes TCP super-frames of each family.
    pub const fn tso_to_guest(self) -> (bool, bool) {
        (self.has(VIRTIO_NET_F_GUEST_TSO4), self.has(VIRTIO_NET_F_GUEST_TSO6))
    }

    /// Length of the virtio-net header in front of every frame: 12 bytes with
    /// `VERSION_1` or `MRG_RXBUF`, else 10 (virtio 1.x §5.1.6).
    pub const fn header_len(self) -> usize {
        if self.version_1() || self.mergeable_rx_buffers() {
            palisade_wire::virtio_net::HEADER_LEN
        } else {
            palisade_wire::virtio_net::HEADER_LEN_NO_NUM_BUFFERS
        }
    }

    /// Whether the guest was allowed to send a frame with `header`.
    pub(crate) fn check_from_guest(self, header: &VirtioNetRepr) -> Result<(), Unsupported> {
        if header.csum.is_some() && !self.checksum_from_guest() {
            return Err(Unsupported::Checksum);
        }
        if let Some(gso) = header.gso {
            let ok = match gso.kind {
                GsoKind::TcpV4 => self.has(VIRTIO_NET_F_HOST_TSO4),
                GsoKind::TcpV6 => self.has(VIRTIO_NET_F_HOST_TSO6),
                // Never offered: UDP segmentation and fragmentation offload.
                GsoKind::UdpL4 | GsoKind::Ufo => false,
            };
            if !ok || (gso.ecn && !self.has(VIRTIO_NET_F_HOST_ECN)) {
                return Err(Unsupported::Segmentation);
            }
        }
        Ok(())
    }

    /// Whether the guest takes a frame with `header` as it is. A partial
    /// checksum the guest cannot take can be completed by the sender; a
    /// super-frame it cannot take has to be segmented.
    pub(crate) fn check_to_guest(self, header: &VirtioNetRepr) -> Result<(), Unsupported> {
        if let Some(gso) = header.gso {
            let ok = match gso.kind {
                GsoKind::TcpV4 => self.has(VIRTIO_NET_F_GUEST_TSO4),
                GsoKind::TcpV6 => self.has(VIRTIO_NET_F_GUEST_TSO6),
                GsoKind::UdpL4 | GsoKind::Ufo => false,
            };
            if !ok || (gso.ecn && !self.has(VIRTIO_NET_F_GUEST_ECN)) {
                return Err(Unsupported::Segmentation);
            }
        }
        if header.csum.is_some() && !self.checksum_to_guest() {
            return Err(Unsupported::Checksum);
        }
        Ok(())
    }

    /// Whether the guest takes TCP super-frames of IPv4 (`v6 = false`) or IPv6.
    pub fn takes_tso(self, v6: bool) -> bool {
        let (v4ok, v6ok) = self.tso_to_guest();
        if v6 { v6ok } else { v4ok }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_wire::virtio_net::{Gso, PartialChecksum};

    fn tso(kind: GsoKind, ecn: bool) -> VirtioNetRepr {
        VirtioNetRepr {
            csum: Some(PartialChecksum { start: 34, offset: 16 }),
            gso: Some(Gso {
                kind,
                ecn,
                size: 1448,
                header_len: 66,
            }),
            ..VirtioNetRepr::PLAIN
        }
    }

    #[test]
    fn offered_bits_follow_the_offloads() {
        let all = GuestFeatures::from_bits(offered(Offloads::ALL, 2));
        assert!(all.version_1() && all.mergeable_rx_buffers() && all.event_idx() && all.indirect_descriptors());
        assert!(all.multiqueue() && all.checksum_from_guest() && all.checksum_to_guest());
        assert_eq!(all.tso_from_guest(), (true, true));
        assert_eq!(all.tso_to_guest(), (true, true));
        let none = GuestFeatures::from_bits(offered(Offloads::NONE, 1));
        assert!(!none.multiqueue() && !none.checksum_from_guest() && !none.checksum_to_guest());
        assert_eq!(none.tso_to_guest(), (false, false));
        // TSO without checksum offload would be a contradiction (virtio 1.x §5.1.3.1): not offered.
        let odd = Offloads {
            checksum_from_guest: false,
            tso_from_guest: true,
            ..Offloads::NONE
        };
        assert_eq!(
            GuestFeatures::from_bits(offered(odd, 1)).tso_from_guest(),
            (false, false)
        );
    }

    #[test]
    fn header_length_follows_version_and_mergeable_buffers() {
        assert_eq!(GuestFeatures::from_bits(bit(VIRTIO_F_VERSION_1)).header_len(), 12);
        assert_eq!(GuestFeatures::from_bits(bit(VIRTIO_NET_F_MRG_RXBUF)).header_len(), 12);
        assert_eq!(GuestFeatures::from_bits(0).header_len(), 10);
    }

    #[test]
    fn offloads_are_checked_per_direction() {
        let f = GuestFeatures::from_bits(
            bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_GUEST_CSUM),
        );
        assert_eq!(f.check_from_guest(&tso(GsoKind::TcpV4, false)), Ok(()));
        assert_eq!(
            f.check_from_guest(&tso(GsoKind::TcpV6, false)),
            Err(Unsupported::Segmentation)
        );
        assert_eq!(
            f.check_from_guest(&tso(GsoKind::TcpV4, true)),
            Err(Unsupported::Segmentation)
        );
        assert_eq!(
            f.check_from_guest(&tso(GsoKind::UdpL4, false)),
            Err(Unsupported::Segmentation)
        );
        assert_eq!(
            f.check_to_guest(&tso(GsoKind::TcpV4, false)),
            Err(Unsupported::Segmentation)
        );
        let partial = VirtioNetRepr {
            gso: None,
            ..tso(GsoKind::TcpV4, false)
        };
        assert_eq!(f.check_to_guest(&partial), Ok(()));
        assert_eq!(
            GuestFeatures::from_bits(0).check_to_guest(&partial),
            Err(Unsupported::Checksum)
        );
        assert_eq!(
            GuestFeatures::from_bits(0).check_from_guest(&partial),
            Err(Unsupported::Checksum)
        );
        assert_eq!(
            GuestFeatures::from_bits(0).check_from_guest(&VirtioNetRepr::PLAIN),
            Ok(())
        );
    }
}
