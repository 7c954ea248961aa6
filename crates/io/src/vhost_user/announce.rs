//! The RARP a vhost-user backend sends on QEMU's behalf after a migration.
//!
//! When a guest resumes on a destination host, QEMU announces its MAC so
//! that switches learn the new port (`qemu_announce_self`): for a tap or a
//! userspace virtio NIC it sends the RARP itself, but for a vhost-user
//! netdev the frames do not pass through QEMU, so it asks the backend with
//! `VHOST_USER_SEND_RARP` (protocol feature `RARP`), five times by default,
//! carrying the NIC's MAC. This backend injects that frame into the path
//! *from* the guest, as if the guest had sent it: the firewall engine sees
//! it like any frame from the vNIC, and its announce detection (a vNIC
//! seen on a host the inventory does not place it on: a migration made
//! without the controller) works for vhost-user guests as for tap ones.
//!
//! The MAC is checked against the vNIC's own before anything is injected
//! ([`super::VhostUserNetConfig::mac`]): QEMU is trusted to drive the
//! device, not to speak for other MACs, and a RARP for someone else's MAC
//! is how a host would be made to claim a VM it does not run. Refusals are
//! counted in [`super::DeviceStatus::announcements_refused`]. Injected
//! frames wait in a short queue on the first queue pair until its worker
//! next receives (they do not need the guest's rings to run: the first
//! announce comes before QEMU starts them); a full queue drops and counts.

use palisade_wire::virtio_net::VirtioNetRepr;

use super::rings::NetRings;

/// Announcements waiting for the worker at most (QEMU sends five per migration).
pub const MAX_PENDING_ANNOUNCEMENTS: usize = 8;

/// Length of the announcement: the minimum Ethernet frame without its FCS, as QEMU pads it.
pub const RARP_FRAME_LEN: usize = 60;

/// The frame QEMU's announce sends for `mac` (net/announce.c): broadcast,
/// EtherType 0x8035 (RARP), an Ethernet/IPv4 request, operation 3
/// (reverse request), sender and target hardware address both `mac`,
/// protocol addresses zero, padded with zeros to 60 bytes.
pub fn rarp_frame(mac: [u8; 6]) -> [u8; RARP_FRAME_LEN] {
    let mut f = [0u8; RARP_FRAME_LEN];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x8035u16.to_be_bytes());
    // Hardware type 1 (Ethernet), protocol 0x0800, lengths 6 and 4, operation 3.
    f[14..22].copy_from_slice(&[0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x03]);
    f[22..28].copy_from_slice(&mac);
    f[32..38].copy_from_slice(&mac);
    f
}

impl NetRings {
    /// Queue a RARP announcement of `mac` to be handed over, ahead of the
    /// guest's own frames, by the next receive call. Returns `false` (and
    /// counts it) when [`MAX_PENDING_ANNOUNCEMENTS`] already wait.
    pub fn announce(&mut self, mac: [u8; 6]) -> bool {
        if self.announcements.len() >= MAX_PENDING_ANNOUNCEMENTS {
            self.stats.announcements_dropped += 1;
            return false;
        }
        self.announcements.push_back(mac);
        true
    }

    /// Whether announcements wait to be handed over.
    pub fn announcements_pending(&self) -> bool {
        !self.announcements.is_empty()
    }

    /// Start a batch: forget the last one and put the waiting announcements
    /// first. Returns the bytes they take in the arena.
    pub(crate) fn begin_batch(&mut self) -> usize {
        self.spans.clear();
        self.headers.clear();
        let mut at = 0;
        while let Some(mac) = self.announcements.pop_front() {
            // The arena holds at least one maximum frame; eight 60-byte frames always fit.
            let Some(dst) = self.arena.get_mut(at..at + RARP_FRAME_LEN) else {
                self.stats.announcements_dropped += 1;
                continue;
            };
            dst.copy_from_slice(&rarp_frame(mac));
            self.spans.push((at, at + RARP_FRAME_LEN));
            self.headers.push(VirtioNetRepr::PLAIN);
            self.stats.announcements_injected += 1;
            at += RARP_FRAME_LEN;
        }
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frame_is_qemus_rarp_request() {
        let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        let f = rarp_frame(mac);
        // Field by field as QEMU's net/announce.c builds it.
        let mut want = vec![0xff; 6];
        want.extend(mac);
        want.extend([0x80, 0x35, 0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x03]);
        want.extend(mac);
        want.extend([0; 4]);
        want.extend(mac);
        want.resize(60, 0);
        assert_eq!(f.to_vec(), want);
    }
}
