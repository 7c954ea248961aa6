//! Palisade's wire layer: zero-copy packet views and owned representations.
//!
//! Every protocol module follows one pattern (after smoltcp's `wire`):
//! - a view `Packet<T: AsRef<[u8]>>` (named `Frame` for Ethernet) with
//!   `new_unchecked`, `new_checked` and `check_len`, field getters, and setters
//!   when `T: AsMut<[u8]>`; field offsets are named ranges in a private `field`
//!   module;
//! - an owned `…Repr` with `parse(&Packet<&T>) -> Result<Repr>`,
//!   `buffer_len()` and `emit(&mut Packet<T>)`.
//!
//! **Byte order:** every header field is in network byte order (big-endian)
//! on the wire; accessors take and return host values and convert, through
//! one set of functions (the private `field` module). The two exceptions are
//! the fields their specifications store least significant byte first: SCTP's
//! CRC32c and the virtio-net offload header. Addresses are byte arrays, in
//! the order they are sent.
//!
//! **Contract:** once `new_checked` (or `Repr::parse`) has accepted a buffer,
//! no accessor panics on it, whatever its contents. Parsing allocates nothing.
//!
//! The [`frame`] module dissects a whole Ethernet frame (tags, network and
//! transport headers) and [`flow`] extracts the exact-match key the datapath's
//! flow cache is indexed by. [`virtio_net`] is the offload header (partial
//! checksums, segmentation super-frames) in front of frames from virtio-net
//! devices, TAPs and AF_PACKET sockets.
#![deny(missing_docs)]

pub mod arp;
pub mod checksum;
mod error;
pub mod ethernet;
mod field;
pub mod flow;
pub mod frame;
pub mod icmpv4;
pub mod icmpv6;
pub mod ip;
pub mod ipv4;
pub mod ipv6;
pub mod ipv6ext;
pub mod sctp;
pub mod tcp;
pub mod udp;
pub mod virtio_net;
pub mod vlan;
pub mod vxlan;

pub use error::{Error, ErrorKind, Layer, Result};
