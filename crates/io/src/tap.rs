//! TAP devices: a VM's NIC as the hypervisor sees it.
//!
//! A [`Tap`] is the character-device end of a Linux TAP interface
//! (`/dev/net/tun` with `IFF_TAP | IFF_NO_PI`): every Ethernet frame the
//! kernel transmits on the interface is one `read`, every `write` is one frame
//! the kernel receives. QEMU guests attach to TAPs, so the agent forwards a
//! VM's traffic by reading and writing here. The descriptor is non-blocking.
//!
//! **Offloads** ([`TapConfig::vnet_hdr`], on by default). The TAP is opened
//! with `IFF_VNET_HDR` and a 12-byte header (`TUNSETVNETHDRSZ`: `struct
//! virtio_net_hdr_v1`, with `num_buffers`, what virtio 1.0 and vhost use), and
//! `TUNSETOFFLOAD` tells the kernel what the reader takes: partial checksums
//! (`TUN_F_CSUM`), TCP segmentation for IPv4 and IPv6 with ECN
//! (`TUN_F_TSO4|TSO6|TSO_ECN`) and, where the kernel has it (6.2+), UDP
//! segmentation (`TUN_F_USO4|USO6`; refused by older kernels, then left out).
//! The interface then advertises those features, so the stack on the kernel
//! side sends TSO super-frames of up to 64 KiB and leaves checksums partial;
//! each read is one header and one frame, handed over as a frame and its
//! [`Offload`] ([`FramePort::recv_frames`]). Writes take the same header, so a
//! super-frame written whole reaches the kernel as one GSO packet. For plain
//! receivers ([`FramePort::recv_batch`]) partial checksums are completed and
//! super-frames cut up ([`PlainFrames`]); without `vnet_hdr` the port reads
//! and writes bare frames, and a super-frame given to
//! [`FramePort::send_frame`] is cut in user space.
//!
//! The kernel offers no batched read or write for TAPs, so `send` writes at
//! once (one `writev`: header and frame) and `flush` has nothing to do;
//! receives read frame after frame into one buffer and hand them over as a
//! batch.

use std::ffi::CStr;
use std::fmt;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use palisade_wire::virtio_net::{self, Header, VirtioNetRepr};

use crate::csum::complete_checksum;
use crate::error::IoError;
use crate::gso;
use crate::port::{FramePort, Offload, PlainFrames, PortOffloads, PortStats, RxFrame};
use crate::sys;

const KIND: &str = "TAP";

/// Largest frame: a TAP's MTU is at most 65535, plus the Ethernet header and two tags.
const MAX_FRAME: usize = 65535 + 14 + 8;
/// Bytes of the virtio-net header the TAP is set to (`struct virtio_net_hdr_v1`).
pub const VNET_LEN: usize = virtio_net::HEADER_LEN;
/// Most frames in one batch of [`FramePort::recv_frames`].
const RX_BATCH: usize = 64;
/// Bytes of the receive buffer: room for a batch of 1500-byte frames, and at least two largest ones.
const RX_BUFFER: usize = 2 * (VNET_LEN + MAX_FRAME + 1) + RX_BATCH * 1536;

/// `TUN_F_*` offload flags for `TUNSETOFFLOAD` (`include/uapi/linux/if_tun.h`).
pub mod tun_f {
    /// The reader takes partial checksums.
    pub const CSUM: u32 = 0x01;
    /// The reader takes TCP/IPv4 super-frames.
    pub const TSO4: u32 = 0x02;
    /// The reader takes TCP/IPv6 super-frames.
    pub const TSO6: u32 = 0x04;
    /// The reader takes TCP super-frames with ECN (CWR on the first segment).
    pub const TSO_ECN: u32 = 0x08;
    /// The reader takes UDP/IPv4 segmentation (Linux 6.2+).
    pub const USO4: u32 = 0x20;
    /// The reader takes UDP/IPv6 segmentation (Linux 6.2+).
    pub const USO6: u32 = 0x40;
    /// The reader takes super-frames inside a UDP tunnel (Linux 6.17+; needs
    /// the 24-byte tunnel header).
    pub const UDP_TUNNEL_GSO: u32 = 0x80;
    /// ... with the outer UDP checksum partial too (Linux 6.17+).
    pub const UDP_TUNNEL_GSO_CSUM: u32 = 0x100;
}

/// How to open a TAP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapConfig {
    /// Read and write 12-byte virtio-net headers and take offloads (see the module documentation).
    pub vnet_hdr: bool,
}

impl Default for TapConfig {
    /// Virtio-net headers on.
    fn default() -> Self {
        TapConfig { vnet_hdr: true }
    }
}

/// A TAP interface opened in the current network namespace.
pub struct Tap {
    fd: OwnedFd,
    name: String,
    vnet: bool,
    /// The `TUN_F_*` flags the kernel accepted (0 without `vnet`).
    offload_flags: u32,
    buf: Vec<u8>,
    /// Frames cut up or completed for sending without offloads.
    tx_scratch: Vec<u8>,
    plain: PlainFrames,
    stats: PortStats,
}

impl fmt::Debug for Tap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tap")
            .field("name", &self.name)
            .field("fd", &self.fd.as_raw_fd())
            .field("vnet_hdr", &self.vnet)
            .field("offload_flags", &self.offload_flags)
            .finish_non_exhaustive()
    }
}

impl Tap {
    /// Attach to TAP `name` with virtio-net headers and offloads ([`TapConfig::default`]).
    ///
    /// A TAP created here disappears when the `Tap` is dropped, unless it was made
    /// persistent (`ip tuntap add`) beforehand.
    pub fn open(name: &str) -> Result<Tap, IoError> {
        Tap::open_with(name, &TapConfig::default())
    }

    /// Attach to TAP `name` in the current network namespace, creating it if it does not exist.
    pub fn open_with(name: &str, config: &TapConfig) -> Result<Tap, IoError> {
        let cname = sys::ifname(KIND, name)?;
        // SAFETY: the path is a valid NUL-terminated string.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(IoError::last_os(KIND, name, "open(/dev/net/tun)"));
        }
        // SAFETY: `raw` is a freshly opened descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ifreq is a plain C struct; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { mem::zeroed() };
        for (dst, &src) in ifr.ifr_name.iter_mut().zip(cname.as_bytes()) {
            *dst = src as libc::c_char;
        }
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
        if config.vnet_hdr {
            flags |= libc::IFF_VNET_HDR;
        }
        ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `ifr` is.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if r < 0 {
            return Err(IoError::last_os(KIND, name, "ioctl(TUNSETIFF)"));
        }
        let mut offload_flags = 0;
        if config.vnet_hdr {
            let size = VNET_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points at `size`.
            let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
            if r < 0 {
                return Err(IoError::last_os(KIND, name, "ioctl(TUNSETVNETHDRSZ)"));
            }
            let tso = tun_f::CSUM | tun_f::TSO4 | tun_f::TSO6 | tun_f::TSO_ECN;
            // USO first; a kernel without it refuses the whole set (EINVAL).
            for wanted in [tso | tun_f::USO4 | tun_f::USO6, tso] {
                // SAFETY: TUNSETOFFLOAD takes its flags by value; no memory is passed.
                let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, wanted as libc::c_ulong) };
                if r == 0 {
                    offload_flags = wanted;
                    break;
                }
            }
            if offload_flags == 0 {
                return Err(IoError::last_os(KIND, name, "ioctl(TUNSETOFFLOAD)"));
            }
        }
        // SAFETY: the kernel writes back a NUL-terminated name of at most IFNAMSIZ - 1 bytes,
        // and the array was zeroed first, so a terminator exists within it.
        let actual = unsafe { CStr::from_ptr(ifr.ifr_name.as_ptr()) };
        Ok(Tap {
            fd,
            name: actual.to_string_lossy().into_owned(),
            vnet: config.vnet_hdr,
            offload_flags,
            buf: vec![0; RX_BUFFER],
            tx_scratch: Vec::new(),
            plain: PlainFrames::default(),
            stats: PortStats::default(),
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `TUN_F_*` offload flags ([`tun_f`]) the kernel accepted; 0 without virtio-net headers.
    pub fn offload_flags(&self) -> u32 {
        self.offload_flags
    }

    /// Write one message (header and frame with `vnet`, else the frame) to the kernel.
    fn write(&mut self, header: Option<&[u8]>, frame: &[u8]) -> io::Result<()> {
        let iov = |b: &[u8]| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        };
        let parts: [libc::iovec; 2] = [iov(header.unwrap_or_default()), iov(frame)];
        let want = header.map_or(0, <[u8]>::len) + frame.len();
        // SAFETY: both iovecs point at live buffers of the lengths given, which the kernel
        // only reads during the call.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), parts.as_ptr(), 2) };
        if n < 0 {
            self.stats.tx_errors += 1;
            return Err(io::Error::last_os_error());
        }
        if n as usize != want {
            self.stats.tx_errors += 1;
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("{KIND} {}: short write of {n} of {want} bytes", self.name),
            ));
        }
        self.stats.tx_frames += 1;
        self.stats.tx_bytes += frame.len() as u64;
        Ok(())
    }

    fn bad_offload(&mut self, what: String) -> io::Error {
        self.stats.offload_errors += 1;
        io::Error::new(io::ErrorKind::InvalidInput, format!("{KIND} on {}: {what}", self.name))
    }
}

impl FramePort for Tap {
    fn recv_frames(&mut self, max: usize, f: &mut dyn FnMut(&[RxFrame<'_>])) -> io::Result<usize> {
        let slot = if self.vnet { VNET_LEN } else { 0 } + MAX_FRAME + 1;
        let mut delivered = 0;
        // (offset of the frame in `buf`, its length, its offload state)
        let mut spans = [(0usize, 0usize, Offload::NONE); RX_BATCH];
        let mut n = 0;
        let mut used = 0;
        let mut result = Ok(());
        while delivered + n < max {
            if n == RX_BATCH || self.buf.len() - used < slot {
                hand_over(&self.buf, &spans[..n], f);
                delivered += n;
                n = 0;
                used = 0;
                continue;
            }
            let room = &mut self.buf[used..used + slot];
            // SAFETY: `room` is valid for writes of its full length.
            let r = unsafe { libc::read(self.fd.as_raw_fd(), room.as_mut_ptr().cast(), room.len()) };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => break,
                    // Report the error now only if it would not hide frames already delivered;
                    // otherwise the next call meets it again.
                    _ if delivered + n == 0 => {
                        result = Err(e);
                        break;
                    }
                    _ => break,
                }
            }
            let r = r as usize;
            if r >= slot {
                // The kernel cut the frame to the buffer: never forward a partial frame.
                self.stats.truncated += 1;
                continue;
            }
            let (hlen, offload) = if self.vnet {
                if r < VNET_LEN {
                    self.stats.offload_errors += 1;
                    continue;
                }
                let header = Header::new_unchecked(&self.buf[used..used + VNET_LEN]);
                match VirtioNetRepr::parse(&header, r - VNET_LEN) {
                    Ok(repr) => (VNET_LEN, Offload::from(repr)),
                    Err(_) => {
                        self.stats.offload_errors += 1;
                        continue;
                    }
                }
            } else {
                (0, Offload::NONE)
            };
            let len = r - hlen;
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += len as u64;
            self.stats.rx_super_frames += u64::from(offload.gso.is_some());
            spans[n] = (used + hlen, len, offload);
            n += 1;
            used += r;
        }
        if n > 0 {
            hand_over(&self.buf, &spans[..n], f);
            delivered += n;
        }
        result.map(|()| delivered)
    }

    /// Plain frames ([`PlainFrames`]): partial checksums completed, super-frames cut up.
    fn recv_batch(&mut self, max: usize, f: &mut dyn FnMut(&[&[u8]])) -> io::Result<usize> {
        let mut plain = mem::take(&mut self.plain);
        let mut stats = PortStats::default();
        let mut handed = 0;
        let r = self.recv_frames(max, &mut |frames| {
            handed += plain.deliver(frames, &mut stats, f);
        });
        self.plain = plain;
        self.stats.sw_segmented += stats.sw_segmented;
        self.stats.offload_errors += stats.offload_errors;
        self.stats.csum_completed += stats.csum_completed;
        r.map(|_| handed)
    }

    /// Write `frame` to the kernel at once (with its header; or, without
    /// virtio-net headers, cut up or completed first).
    fn send_frame(&mut self, frame: &[u8], offload: &Offload) -> io::Result<()> {
        if self.vnet {
            let mut header = [0u8; VNET_LEN];
            offload.to_repr().emit(&mut Header::new_unchecked(&mut header[..]));
            if let Err(e) = VirtioNetRepr::parse(&Header::new_unchecked(&header[..]), frame.len()) {
                return Err(self.bad_offload(format!("offload state does not fit a {}-byte frame: {e}", frame.len())));
            }
            self.write(Some(&header), frame)?;
            self.stats.tx_super_frames += u64::from(offload.gso.is_some());
            return Ok(());
        }
        if offload.is_plain() {
            return self.write(None, frame);
        }
        let mut scratch = mem::take(&mut self.tx_scratch);
        scratch.clear();
        let r = if offload.gso.is_some() {
            match gso::segment(frame, offload, &[], &mut scratch, 1 << 20) {
                Ok(segs) => {
                    self.stats.sw_segmented += 1;
                    let mut r = Ok(());
                    for seg in segs.iter(&scratch) {
                        if let Err(e) = self.write(None, seg) {
                            r = Err(e);
                            break;
                        }
                    }
                    r
                }
                Err(e) => Err(self.bad_offload(format!("cannot segment: {e}"))),
            }
        } else {
            scratch.extend_from_slice(frame);
            if complete_checksum(&mut scratch).is_ok() {
                self.stats.csum_completed += 1;
            } else {
                self.stats.offload_errors += 1;
            }
            self.write(None, &scratch)
        };
        self.tx_scratch = scratch;
        r
    }

    /// Nothing is queued: `send` writes at once.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn offloads(&self) -> PortOffloads {
        PortOffloads {
            rx: self.vnet,
            tx: self.vnet,
        }
    }

    fn stats(&self) -> PortStats {
        self.stats
    }
}

/// Call `f` with the frames `spans` name in `buf`.
fn hand_over(buf: &[u8], spans: &[(usize, usize, Offload)], f: &mut dyn FnMut(&[RxFrame<'_>])) {
    if spans.is_empty() {
        return;
    }
    let mut frames = [RxFrame {
        bytes: &[],
        offload: Offload::NONE,
    }; RX_BATCH];
    for (slot, &(at, len, offload)) in frames.iter_mut().zip(spans) {
        *slot = RxFrame {
            bytes: &buf[at..at + len],
            offload,
        };
    }
    f(&frames[..spans.len()]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_config_errors() {
        for name in ["", "sixteen-chars-xx", "a/b", "a b"] {
            let e = Tap::open(name).unwrap_err();
            assert!(matches!(e, IoError::Config { .. }), "{name:?}: {e}");
            assert!(e.to_string().starts_with(&format!("TAP on {name}: ")), "{e}");
        }
    }
}
