//! A guest announcing where it is: the frames a VM sends right after a live
//! migration so that switches learn its MAC's new port.
//!
//! QEMU sends RARP requests (EtherType 0x8035, operation 3, sender and
//! target hardware address both the VM's MAC) for each NIC once the guest
//! runs on the destination (`qemu_announce_self`); a guest with virtio-net's
//! `GUEST_ANNOUNCE` sends gratuitous ARPs instead (sender and target protocol
//! address the same, non-zero). The engine reports either, from a vNIC and
//! only when the sender is the vNIC's own MAC, as an [`Announcement`] to the
//! caller's [`crate::EventSink`]; the agent tells the controller when the
//! inventory places that vNIC on another host (a migration it did not
//! order: libvirt, virsh, another tool), and the connections follow.

use palisade_wire::arp::{ArpRepr, Operation, Packet};
use palisade_wire::ethernet::{EtherType, EthernetAddress};

use crate::port::PortId;

/// How the guest announced itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AnnounceKind {
    /// A RARP request, as QEMU sends after a migration.
    Rarp,
    /// A gratuitous ARP (request or reply for the sender's own address).
    Garp,
}

impl AnnounceKind {
    /// `rarp` or `garp`.
    pub fn name(self) -> &'static str {
        match self {
            AnnounceKind::Rarp => "rarp",
            AnnounceKind::Garp => "garp",
        }
    }
}

/// A vNIC's guest announced its MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announcement {
    /// The vNIC's port.
    pub port: PortId,
    /// The MAC announced (the vNIC's: any other is dropped as spoofed first).
    pub mac: EthernetAddress,
    /// RARP or gratuitous ARP.
    pub kind: AnnounceKind,
}

/// Whether `payload`, the L3 part of a frame of `ethertype`, is a
/// self-announcement, and of which MAC (the sender hardware address).
/// Anything that does not parse as Ethernet/IPv4 ARP or RARP is not.
pub fn classify(ethertype: EtherType, payload: &[u8]) -> Option<(EthernetAddress, AnnounceKind)> {
    let packet = Packet::new_checked(payload).ok()?;
    let repr = ArpRepr::parse(&packet).ok()?;
    match ethertype {
        EtherType::RARP
            if repr.operation == Operation::REVERSE_REQUEST
                && repr.source_hardware_addr == repr.target_hardware_addr =>
        {
            Some((repr.source_hardware_addr, AnnounceKind::Rarp))
        }
        EtherType::ARP
            if matches!(repr.operation, Operation::REQUEST | Operation::REPLY)
                && !repr.source_protocol_addr.is_unspecified()
                && repr.source_protocol_addr == repr.target_protocol_addr =>
        {
            Some((repr.source_hardware_addr, AnnounceKind::Garp))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU's announce as it goes on the wire (net/announce.c): broadcast,
    /// EtherType 0x8035, RARP request for the VM's MAC, padded to 60 bytes.
    pub(crate) fn qemu_rarp(mac: [u8; 6]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend(mac);
        f.extend([0x80, 0x35]);
        f.extend([0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x03]);
        f.extend(mac);
        f.extend([0; 4]);
        f.extend(mac);
        f.extend([0; 4]);
        f.resize(60, 0);
        f
    }

    /// A gratuitous ARP request as Linux's `arping -U` sends it.
    pub(crate) fn garp(mac: [u8; 6], ip: [u8; 4], op: u8) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend(mac);
        f.extend([0x08, 0x06]);
        f.extend([0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, op]);
        f.extend(mac);
        f.extend(ip);
        f.extend([0xff; 6]);
        f.extend(ip);
        f.resize(60, 0);
        f
    }

    fn split(frame: &[u8]) -> (EtherType, &[u8]) {
        (EtherType(u16::from_be_bytes([frame[12], frame[13]])), &frame[14..])
    }

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    #[test]
    fn announcements_are_told_from_other_arp() {
        let mac = EthernetAddress(MAC);
        let request = {
            // "who has 10.0.0.2? tell 10.0.0.1": not an announcement.
            let mut f = garp(MAC, [10, 0, 0, 1], 1);
            f[38..42].copy_from_slice(&[10, 0, 0, 2]);
            f
        };
        let rarp_reply = {
            let mut f = qemu_rarp(MAC);
            f[21] = 4;
            f
        };
        let rarp_other_target = {
            let mut f = qemu_rarp(MAC);
            f[32] = 0x99;
            f
        };
        let arp_as_rarp = {
            let mut f = garp(MAC, [10, 0, 0, 1], 1);
            f[12..14].copy_from_slice(&[0x80, 0x35]);
            f
        };
        let probe = garp(MAC, [0, 0, 0, 0], 1);
        for (name, frame, want) in [
            ("qemu rarp", qemu_rarp(MAC), Some((mac, AnnounceKind::Rarp))),
            (
                "garp request",
                garp(MAC, [10, 0, 0, 1], 1),
                Some((mac, AnnounceKind::Garp)),
            ),
            (
                "garp reply",
                garp(MAC, [10, 0, 0, 1], 2),
                Some((mac, AnnounceKind::Garp)),
            ),
            ("arp request", request, None),
            ("rarp reply", rarp_reply, None),
            ("rarp for another MAC", rarp_other_target, None),
            ("an ARP request under the RARP type", arp_as_rarp, None),
            ("an address probe (sender 0.0.0.0)", probe, None),
            ("truncated rarp", qemu_rarp(MAC)[..30].to_vec(), None),
        ] {
            let (et, payload) = split(&frame);
            assert_eq!(classify(et, payload), want, "{name}");
        }
        // An IPv4 packet is not one, whatever its bytes.
        let f = qemu_rarp(MAC);
        assert_eq!(classify(EtherType::IPV4, &f[14..]), None);
    }
}
