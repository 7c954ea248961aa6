//! Palisade's packet sources and sinks.
//!
//! Everything above this crate is sans-IO: the datapath is handed packets and
//! the current time. This crate is where packets come from and go to:
//! capture files ([`capture`]); live Ethernet ports behind one object-safe
//! trait, [`FramePort`] ([`port`]), implemented by AF_PACKET sockets with a
//! TPACKET_V3 receive ring and batched transmission ([`afpacket`]) and by TAP
//! devices ([`tap`]); and the VXLAN underlay UDP socket ([`overlay`]). Frames
//! keep their offload state ([`Offload`], from the virtio-net header that
//! AF_PACKET and TAP ports read and write): a guest's TSO super-frame
//! arrives whole and a partial checksum stays partial, until a destination
//! that cannot take them needs them cut ([`gso::segment`]) or completed
//! ([`csum`]); the underlay sends super-frames with UDP segmentation offload
//! and merges what it receives back ([`gso::Coalescer`]). Callers that want
//! only plain frames get them ([`FramePort::recv_batch`]).
//! Errors opening a port name the interface and the failed step
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
pub mod gso;
pub mod kfast;
pub mod overlay;
#[doc(hidden)]
pub mod packets;
pub mod port;
pub mod steer;
mod sys;
pub mod tap;
pub mod vhost_user;

pub use afpacket::{AfPacket, AfPacketConfig, Fanout, RxMode};
pub use error::IoError;
pub use gso::Coalescer;
pub use overlay::UdpOverlay;
pub use port::{FramePort, Offload, PlainFrames, PortOffloads, PortStats, RxFrame, wait_readable};
pub use tap::{Tap, TapConfig};
