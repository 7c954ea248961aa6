//! Small wrappers over the system calls the live ports share.
//!
//! Kept in one place so every `unsafe` block that touches a socket option or
//! a `sendmmsg` batch is written (and reviewed) once.

use std::ffi::CString;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use crate::error::IoError;
use crate::port::PortStats;

/// Longest interface name the kernel accepts (IFNAMSIZ less the terminating NUL).
pub(crate) const MAX_IFNAME: usize = libc::IFNAMSIZ - 1;

/// How long a full socket buffer may hold up a flush before the batch's rest is dropped.
const TX_STALL: Duration = Duration::from_millis(5);

/// Check that `name` can be an interface name, and make it a C string.
pub(crate) fn ifname(kind: &'static str, name: &str) -> Result<CString, IoError> {
    let bad = |reason: &str| IoError::Config {
        kind,
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    if name.is_empty() || name.len() > MAX_IFNAME {
        return Err(bad("interface names are 1 to 15 bytes long"));
    }
    if name.contains('/') || name.chars().any(char::is_whitespace) {
        return Err(bad("interface names cannot contain '/' or whitespace"));
    }
    CString::new(name).map_err(|_| bad("interface names cannot contain NUL"))
}

/// Set socket option `name` at `level` to `value`.
pub(crate) fn setsockopt<T>(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live, initialised `T` of exactly the length passed; the kernel
    // only reads it during the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// What one message of a batch carries, for the counters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TxMsg {
    /// Bytes of frames or datagrams (headers the kernel consumes not counted).
    pub bytes: usize,
    /// Frames or datagrams the message stands for (a `UDP_SEGMENT` send: several).
    pub frames: u32,
    /// A super-frame, or a `UDP_SEGMENT` send, handed to the kernel whole.
    pub super_frame: bool,
}

/// Transmit the first `lens.len()` messages of `msgs` with as few `sendmmsg` calls as the kernel allows.
///
/// Every message is attempted. One the kernel refuses (too large for the
/// MTU, malformed) is dropped and counted in `tx_errors`, and the batch goes
/// on. When the socket buffer stays full for [`TX_STALL`], the rest of the
/// batch is dropped and counted. Returns the first error met, after trying all.
pub(crate) fn send_batch(
    fd: BorrowedFd<'_>,
    msgs: &mut [libc::mmsghdr],
    lens: &[TxMsg],
    stats: &mut PortStats,
) -> io::Result<()> {
    send_batch_from(fd, msgs, lens, stats, 0, &|_, _| false)
        .map(drop)
        .map_err(|(_, e)| e)
}

/// As [`send_batch`], from message `first` on, with the index of the message
/// the returned error was for. When `retry(message, error)` says so, the
/// batch stops at that message without counting it, so that the caller can
/// send it (and the rest) differently. Returns the number of messages sent.
pub(crate) fn send_batch_from(
    fd: BorrowedFd<'_>,
    msgs: &mut [libc::mmsghdr],
    lens: &[TxMsg],
    stats: &mut PortStats,
    first: usize,
    retry: &dyn Fn(&TxMsg, &io::Error) -> bool,
) -> Result<usize, (usize, io::Error)> {
    let n = lens.len().min(msgs.len());
    let mut sent = first;
    let mut first_err: Option<(usize, io::Error)> = None;
    let mut waited = false;
    while sent < n {
        let rest = &mut msgs[sent..n];
        // SAFETY: `rest` is a valid array of `rest.len()` message headers whose iovecs and
        // addresses the caller pointed at live buffers it owns for the duration of this call.
        let r = unsafe { libc::sendmmsg(fd.as_raw_fd(), rest.as_mut_ptr(), rest.len() as libc::c_uint, 0) };
        if r > 0 {
            let r = r as usize;
            for m in &lens[sent..sent + r] {
                stats.tx_frames += u64::from(m.frames);
                stats.tx_bytes += m.bytes as u64;
                stats.tx_super_frames += u64::from(m.super_frame);
            }
            sent += r;
            waited = false;
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock if !waited => {
                waited = true;
                wait_writable(fd, TX_STALL);
            }
            io::ErrorKind::WouldBlock => {
                stats.tx_errors += lens[sent..n].iter().map(|m| u64::from(m.frames)).sum::<u64>();
                first_err.get_or_insert((sent, e));
                break;
            }
            _ if retry(&lens[sent], &e) => return Err((sent, e)),
            _ => {
                // sendmmsg reports the error of the first message it could not send: drop that one.
                stats.tx_errors += u64::from(lens[sent].frames);
                first_err.get_or_insert((sent, e));
                sent += 1;
            }
        }
    }
    first_err.map_or(Ok(sent), Err)
}

/// Wait up to `timeout` for `fd` to accept more data; errors only shorten the wait.
fn wait_writable(fd: BorrowedFd<'_>, timeout: Duration) {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd, exclusively borrowed for the call.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis().max(1) as libc::c_int) };
}

/// Take the socket's pending error (`SO_ERROR`, which reading clears), if any.
pub(crate) fn take_socket_error(fd: BorrowedFd<'_>) -> Option<io::Error> {
    let mut err: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `err` and `len` are valid for writes and `len` holds the size of `err`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        Some(io::Error::last_os_error())
    } else if err != 0 {
        Some(io::Error::from_raw_os_error(err))
    } else {
        None
    }
}

/// Set `O_NONBLOCK` on `fd`.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument and reads nothing from our memory; the fd is borrowed, so open.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK != 0 {
        return Ok(());
    }
    // SAFETY: F_SETFL takes an int argument by value; the fd is borrowed, so open.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Copy the next `buf.len()` bytes waiting on stream socket `fd` into `buf`
/// without consuming them, waiting until that many have arrived; fewer only
/// when the peer closed. Returns how many.
pub(crate) fn peek_exact(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
        let r = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | libc::MSG_WAITALL,
            )
        };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
