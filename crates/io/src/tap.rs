//! TAP devices: a VM's NIC as the hypervisor sees it.
//!
//! A [`Tap`] is the character-device end of a Linux TAP interface
//! (`/dev/net/tun` with `IFF_TAP | IFF_NO_PI`): every Ethernet frame the
//! kernel transmits on the interface is one `read`, every `write` is one frame
//! the kernel receives. QEMU guests attach to TAPs, so the agent forwards a
//! VM's traffic by reading and writing here. The descriptor is non-blocking.
//! The kernel offers no batched read or write for TAPs without virtio-net
//! headers, so `send` writes at once and `flush` has nothing to do.

use std::ffi::CStr;
use std::fmt;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::error::IoError;
use crate::port::{FramePort, PortStats};
use crate::sys;

const KIND: &str = "TAP";

/// Read buffer size: a TAP's MTU is at most 65535, plus the Ethernet header and two tags.
const MAX_FRAME: usize = 65535 + 14 + 8;

/// A TAP interface opened in the current network namespace.
pub struct Tap {
    fd: OwnedFd,
    name: String,
    buf: Vec<u8>,
    stats: PortStats,
}

impl fmt::Debug for Tap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tap")
            .field("name", &self.name)
            .field("fd", &self.fd.as_raw_fd())
            .finish_non_exhaustive()
    }
}

impl Tap {
    /// Attach to TAP `name` in the current network namespace, creating it if it does not exist.
    ///
    /// A TAP created here disappears when the `Tap` is dropped, unless it was made
    /// persistent (`ip tuntap add`) beforehand.
    pub fn open(name: &str) -> Result<Tap, IoError> {
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
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `ifr` is.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if r < 0 {
            return Err(IoError::last_os(KIND, name, "ioctl(TUNSETIFF)"));
        }
        // SAFETY: the kernel writes back a NUL-terminated name of at most IFNAMSIZ - 1 bytes,
        // and the array was zeroed first, so a terminator exists within it.
        let actual = unsafe { CStr::from_ptr(ifr.ifr_name.as_ptr()) };
        Ok(Tap {
            fd,
            name: actual.to_string_lossy().into_owned(),
            buf: vec![0; MAX_FRAME],
            stats: PortStats::default(),
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl FramePort for Tap {
    fn recv(&mut self, max: usize, f: &mut dyn FnMut(&[u8])) -> io::Result<usize> {
        let mut delivered = 0;
        while delivered < max {
            // SAFETY: `buf` is valid for writes of its full length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), self.buf.as_mut_ptr().cast(), self.buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => break,
                    // Report the error now only if it would not hide frames already delivered;
                    // otherwise the next call meets it again.
                    _ if delivered == 0 => return Err(e),
                    _ => break,
                }
            }
            let n = n as usize;
            if n >= self.buf.len() {
                // The kernel cut the frame to the buffer: never forward a partial frame.
                self.stats.truncated += 1;
                continue;
            }
            // `n < buf.len()` was just checked.
            let frame = &self.buf[..n];
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += n as u64;
            f(frame);
            delivered += 1;
        }
        Ok(delivered)
    }

    /// Write `frame` to the kernel at once.
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is valid for reads of its full length.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            self.stats.tx_errors += 1;
            return Err(io::Error::last_os_error());
        }
        if n as usize != frame.len() {
            self.stats.tx_errors += 1;
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("{KIND} {}: short write of {n} of {} bytes", self.name, frame.len()),
            ));
        }
        self.stats.tx_frames += 1;
        self.stats.tx_bytes += frame.len() as u64;
        Ok(())
    }

    /// Nothing is queued: `send` writes at once.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn stats(&self) -> PortStats {
        self.stats
    }
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
