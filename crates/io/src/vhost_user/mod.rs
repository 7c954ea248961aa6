//! vhost-user virtio-net backend: a guest's NIC served straight from its memory.
//!
//! This is the device side of QEMU's `-netdev vhost-user` (libvirt's
//! `<interface type='vhostuser'>`): QEMU connects to a Unix socket, shares
//! the guest's RAM and the virtqueues' eventfds, and from then on frames
//! move between the guest's virtio-net driver and this process through the
//! rings in guest memory, without QEMU and without the kernel's network
//! stack. See [`libvirt`] for the domain XML and the QEMU command line.
//!
//! # Threads and ownership
//!
//! The protocol (socket, feature negotiation, memory table, ring setup,
//! guest reboots, reconnects) runs on one control thread per device
//! ([`VhostUserNet`]). The data queues are served by threads the caller
//! owns: the agent runs one datapath worker per core, and each worker
//! serves one queue pair of the guest in its own poll loop. [`VhostUserNet::open`]
//! returns one [`QueuePair`] per pair; a worker adds [`QueuePair::fd`] to
//! its poll set and, when it is readable, takes the guest's frames with
//! [`QueuePair::recv_batch`], delivers frames with [`QueuePair::send`] and
//! publishes them with one [`QueuePair::flush`] per round (or does all of
//! it under one lock with a [`Session`]). [`SteeredVhostUser`] shares a
//! device out between workers that must each see whole connections: it
//! passes every frame from the guest to the worker the steering hash names.
//!
//! **Why not the `vhost-user-backend` crate's daemon.** Its
//! `VhostUserDaemon` owns the data path too: it spawns its own epoll
//! threads, registers every ring's kick eventfd with them, and calls the
//! backend's `handle_event` there, with the rings behind its own
//! `VringRwLock`. A Palisade worker must instead poll its vNICs' queues
//! together with its other ports and hand their frames to its own engine in
//! batches; running the daemon would mean a second thread per queue and a
//! hand-off between it and the worker for every batch. So this module uses
//! the `vhost` crate's protocol layer (`BackendReqHandler`, which parses
//! and checks the messages) with its own request handler (`device`), and
//! keeps each queue pair's state behind a lock the worker takes once per
//! call and the control thread only to reconfigure ([`pair`]). The rings
//! themselves use `virtio-queue` for configuration, the available side and
//! notification suppression ([`virtqueue`]), and guest memory is only ever
//! touched through `vm-memory`'s checked accessors.
//!
//! # Features
//!
//! Offered (each taken only if the guest wants it): `VIRTIO_F_VERSION_1`,
//! `VIRTIO_NET_F_CSUM`, `GUEST_CSUM`, `HOST_TSO4/6`, `HOST_ECN`,
//! `GUEST_TSO4/6`, `GUEST_ECN`, `MRG_RXBUF`, `STATUS`, `MQ` (with more than
//! one pair), `VIRTIO_RING_F_EVENT_IDX`, `VIRTIO_RING_F_INDIRECT_DESC`; the
//! offloads can be narrowed ([`Offloads`]). Protocol features: `MQ`,
//! `REPLY_ACK`, `RESET_DEVICE`, `LOG_SHMFD` with the feature `VHOST_F_LOG_ALL`:
//! dirty-page logging, so QEMU can live-migrate the guest ([`log`]: every
//! page this backend writes is marked in the log QEMU shares while it
//! migrates), and `RARP`: after a migration QEMU asks the backend to
//! announce the guest's MAC (`SEND_RARP`), and the announcement is handed
//! to the workers as a frame from the guest ([`announce`]). Not offered: UDP segmentation/fragmentation offloads, packed
//! rings, in-flight tracking.
//!
//! A guest that negotiated less gets frames it can take: a partial
//! checksum for a guest without `GUEST_CSUM` is completed by the port; a
//! super-frame of a kind the guest does not take is **not** segmented here:
//! [`QueuePair::send`] refuses it with [`SendError::NeedsSegmentation`] and
//! the caller, which parses frames anyway, segments it (the engine's GSO
//! work owns segmentation, so there is one segmenter).
//!
//! # Hostile guests
//!
//! The guest writes the rings and descriptors; each chain is validated
//! before use (`chain`: indices, loops, lengths, directions, indirect
//! tables, buffers inside guest memory, a 64 KiB + header cap on
//! transmitted frames), refused chains are handed back empty and counted by
//! [`Refusal`], a ring whose indices go wrong stops ([`QueueStats::ring_faults`]),
//! and every call is bounded ([`Limits`]) so one guest cannot starve the
//! other ports of its worker. Frames are copied out of guest memory once
//! before anything judges them, so the guest cannot change a frame after
//! its verdict ([`rings`]).
//!
//! # Example
//!
//! ```no_run
//! use palisade_io::vhost_user::{VhostUserNet, VhostUserNetConfig};
//! use palisade_wire::virtio_net::VirtioNetRepr;
//!
//! let mut config = VhostUserNetConfig::new("/run/palisade/vhost/web-1.sock");
//! config.queue_pairs = 2;
//! let (device, mut pairs) = VhostUserNet::open(&config)?;
//! // Each worker takes one pair; here, one loop round of pair 0 echoing frames back.
//! let pair = &mut pairs[0];
//! let mut echo: Vec<(VirtioNetRepr, Vec<u8>)> = Vec::new();
//! pair.recv_batch(64, &mut |batch| {
//!     echo.extend(batch.iter().map(|(h, f)| (*h, f.to_vec())));
//! });
//! for (header, frame) in &echo {
//!     let _ = pair.send(header, frame);
//! }
//! pair.flush();
//! # drop(device);
//! # Ok::<(), palisade_io::IoError>(())
//! ```

pub mod announce;
pub(crate) mod chain;
pub(crate) mod device;
pub mod features;
mod from_guest;
pub mod libvirt;
pub mod log;
pub(crate) mod memory;
pub mod pair;
pub mod rings;
mod server;
pub mod stats;
pub mod steered;
mod to_guest;
pub mod virtqueue;

pub use features::{GuestFeatures, Offloads};
pub use memory::GuestMem;
pub use pair::{QueuePair, Session};
pub use rings::{Delivery, FromGuest, Limits, MAX_BATCH, NetRings, RecvOutcome};
pub use server::{DeviceStatus, MAX_QUEUE_PAIRS, VhostUserNet, VhostUserNetConfig};
pub use stats::{QueueStats, Refusal, RefusalCounts, SendError};
pub use steered::{HandoffStats, SteeredVhostUser, WorkerPort};
pub use virtqueue::{MAX_QUEUE_SIZE, RingFault, RingLayout};
