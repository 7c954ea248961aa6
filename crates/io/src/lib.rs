//! Palisade's packet sources and sinks.
//!
//! Everything above this crate is sans-IO: the datapath is handed packets and
//! the current time. This crate is where packets come from and go to:
//! capture files ([`capture`]); live Ethernet ports behind one object-safe
//! trait, [`FramePort`] ([`port`]), implemented by AF_PACKET sockets with a
//! TPACKET_V3 receive ring and batched transmission ([`afpacket`]) and by TAP
//! devices ([`tap`]); and the VXLAN underlay UDP socket ([`overlay`]). Frames
//! a sender left with a partial TCP/UDP checksum (TX offload on veth and TAP)
//! are completed on receipt ([`csum`]), so forwarded frames are always valid
//! on the wire. Errors opening a port name the interface and the failed step
//! ([`IoError`]). With several workers, each opening its own ports, the kernel
//! steers every connection to one worker ([`steer`]). QEMU/libvirt guests
//! attach through vhost-user ([`vhost_user`]): the guest's virtio-net
//! queues are served from its own memory by the workers, frames arriving
//! with their virtio-net offload header (partial checksums, super-frames).
#![deny(missing_docs)]

pub mod afpacket;
pub mod capture;
pub mod csum;
mod error;
pub mod overlay;
#[doc(hidden)]
pub mod packets;
pub mod port;
pub mod steer;
mod sys;
pub mod tap;
pub mod vhost_user;

pub use afpacket::{AfPacket, AfPacketConfig, Fanout};
pub use error::IoError;
pub use overlay::UdpOverlay;
pub use port::{FramePort, PortStats, wait_readable};
pub use tap::Tap;
