//! The error type of the live packet ports.
//!
//! Opening a port is a sequence of system calls (socket, setsockopt, mmap,
//! bind, ioctl); when one fails the operator needs to know which interface and
//! which step, not just "Invalid argument". [`IoError`] carries both, e.g.
//! `AF_PACKET on vn-web-1: setsockopt(PACKET_RX_RING): Invalid argument`.

use std::io;

/// A live port could not be opened or configured.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IoError {
    /// A system call failed.
    #[error("{kind} on {name}: {step}: {source}")]
    Os {
        /// The kind of port ("AF_PACKET", "TAP", "UDP overlay").
        kind: &'static str,
        /// The interface name or socket address.
        name: String,
        /// The failed step, e.g. `setsockopt(PACKET_RX_RING)`.
        step: &'static str,
        /// What the kernel said.
        source: io::Error,
    },
    /// The requested configuration cannot work, before any system call was made.
    #[error("{kind} on {name}: {reason}")]
    Config {
        /// The kind of port.
        kind: &'static str,
        /// The interface name or socket address.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl IoError {
    /// The last OS error, attributed to `step` on `kind` port `name`.
    pub(crate) fn last_os(kind: &'static str, name: &str, step: &'static str) -> IoError {
        IoError::Os {
            kind,
            name: name.to_owned(),
            step,
            source: io::Error::last_os_error(),
        }
    }
}
