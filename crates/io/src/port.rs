//! The interface every live packet port implements, and a way to wait on several.
//!
//! The agent owns a handful of ports (one per vNIC, AF_PACKET or TAP) and
//! drives them from one loop: wait until some are readable
//! ([`wait_readable`]), drain each with [`FramePort::recv_batch`], queue
//! the forwarded frames with [`FramePort::send`] and push them out with one
//! [`FramePort::flush`] per port per batch. Ports never block: `recv` returns 0
//! when nothing is ready. The trait is object-safe so ports of different kinds
//! sit in one `Vec<Box<dyn FramePort>>`.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

/// A bidirectional Ethernet frame port (an AF_PACKET socket, a TAP device).
pub trait FramePort: Send {
    /// Receive up to `max` frames without blocking; call `f` with each. Returns how many were delivered (0 when none ready).
    fn recv(&mut self, max: usize, f: &mut dyn FnMut(&[u8])) -> io::Result<usize>;
    /// Receive up to `max` frames without blocking, as `recv` does, but hand
    /// them to `f` several at a time: each call gets a non-empty batch of
    /// frames in arrival order, valid for that call. Returns how many were
    /// delivered.
    ///
    /// A batch lets the caller work on several frames together (the
    /// datapath engine's `process_batch` prefetches the memory of their
    /// flows ahead). A port that reads frames straight from shared memory
    /// (AF_PACKET's ring) hands them over without copying; this default
    /// copies what `recv` delivers into one buffer and hands it over once.
    fn recv_batch(&mut self, max: usize, f: &mut dyn FnMut(&[&[u8]])) -> io::Result<usize> {
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        let n = self.recv(max, &mut |frame| {
            bytes.extend_from_slice(frame);
            ends.push(bytes.len());
        })?;
        if n > 0 {
            let mut start = 0;
            let frames: Vec<&[u8]> = ends
                .iter()
                .map(|&end| {
                    let frame = &bytes[start..end];
                    start = end;
                    frame
                })
                .collect();
            f(&frames);
        }
        Ok(n)
    }
    /// Queue one frame (copied) for transmission; may transmit at once.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Transmit everything queued (one syscall per batch where the kernel allows).
    fn flush(&mut self) -> io::Result<()>;
    /// The file descriptor to poll for readability.
    fn fd(&self) -> RawFd;
    /// Counters (received, sent, dropped-by-kernel, truncated, checksum-completed, send errors).
    fn stats(&self) -> PortStats;
}

/// Counters of one port since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Frames delivered to the caller by `recv`.
    pub rx_frames: u64,
    /// Bytes of the frames delivered by `recv`.
    pub rx_bytes: u64,
    /// Frames handed to the kernel for transmission.
    pub tx_frames: u64,
    /// Bytes of the frames handed to the kernel.
    pub tx_bytes: u64,
    /// Frames the kernel dropped before the port could read them (ring or socket buffer full).
    pub kernel_drops: u64,
    /// Frames received but not delivered because they did not fit the port's frame size.
    pub truncated: u64,
    /// Received frames whose partial TCP/UDP checksum (sender's TX offload) was completed.
    pub csum_completed: u64,
    /// Frames that could not be transmitted (refused by the kernel, or too large).
    pub tx_errors: u64,
}

impl PortStats {
    /// Add `other`'s counts to these (one interface's sockets in several workers).
    pub fn merge(&mut self, other: &PortStats) {
        let PortStats {
            rx_frames,
            rx_bytes,
            tx_frames,
            tx_bytes,
            kernel_drops,
            truncated,
            csum_completed,
            tx_errors,
        } = other;
        self.rx_frames += rx_frames;
        self.rx_bytes += rx_bytes;
        self.tx_frames += tx_frames;
        self.tx_bytes += tx_bytes;
        self.kernel_drops += kernel_drops;
        self.truncated += truncated;
        self.csum_completed += csum_completed;
        self.tx_errors += tx_errors;
    }
}

/// Block until one of `fds` is readable or `timeout` passes; returns the indices that are readable.
///
/// An error or hang-up condition on a descriptor counts as readable, so the
/// caller's next `recv` reports it instead of the loop spinning silently. An
/// interrupted wait (a signal) returns an empty list.
pub fn wait_readable(fds: &[RawFd], timeout: Duration) -> io::Result<Vec<usize>> {
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // Round up so a sub-millisecond timeout still waits instead of spinning.
    let ms = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int;
    let nfds = pollfds.len() as libc::nfds_t;
    // SAFETY: `pollfds` is a valid, exclusively borrowed array of `nfds` pollfd structs
    // that outlives the call.
    let n = unsafe { libc::poll(pollfds.as_mut_ptr(), nfds, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(Vec::new())
        } else {
            Err(e)
        };
    }
    let ready = libc::POLLIN | libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;
    Ok(pollfds
        .iter()
        .enumerate()
        .filter(|(_, p)| p.revents & ready != 0)
        .map(|(i, _)| i)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn wait_readable_reports_only_ready_sockets() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let fds = [a.as_raw_fd(), b.as_raw_fd()];
        assert!(wait_readable(&fds, Duration::from_millis(10)).unwrap().is_empty());
        a.send_to(b"x", b.local_addr().unwrap()).unwrap();
        assert_eq!(wait_readable(&fds, Duration::from_secs(2)).unwrap(), vec![1]);
    }
}
