//! A vhost-user frontend for the tests: the role QEMU plays, driven by the
//! `vhost` crate's `Frontend`, with guest memory in a shared file and the
//! virtio driver model standing in for the guest's virtio-net driver.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use palisade_wire::virtio_net::VirtioNetRepr;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::virtio_driver::{Bump, DriverRing, align};

pub const MEM_BASE: u64 = 0x10_0000;
pub const MEM_LEN: u64 = 0x40_0000;
/// Where the "QEMU" process pretends to have mapped guest memory.
pub const USER_BASE: u64 = 0x7f00_0000_0000;
pub const RING_SIZE: u16 = 64;

/// The guest side: its memory (a shared file, mapped here too), the frontend
/// connection, and per ring a driver model and two eventfds.
pub struct Guest {
    pub file: File,
    pub mem: GuestMemoryMmap,
    pub frontend: Frontend,
    pub rings: Vec<DriverRing>,
    pub kicks: Vec<EventFd>,
    pub calls: Vec<EventFd>,
    pub bump: Bump,
    pub rx_bufs: Vec<Vec<(u64, u32)>>,
    /// The frontend's socket, for requests the `vhost` crate's frontend cannot send (`SEND_RARP`).
    pub raw: UnixStream,
}

pub fn memory_file() -> File {
    let f = tempfile::tempfile().unwrap();
    f.set_len(MEM_LEN).unwrap();
    f
}

impl Guest {
    /// Connect to `socket` and set up `pairs` queue pairs with the features `keep` selects from those offered.
    pub fn connect(socket: &Path, pairs: usize, keep: u64) -> Guest {
        Guest::connect_with(socket, pairs, keep, memory_file(), 0)
    }

    pub fn connect_with(socket: &Path, pairs: usize, keep: u64, file: File, base: u16) -> Guest {
        let (frontend, raw) = connect_retrying(socket, 2 * pairs as u64);
        let mem = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(MEM_BASE),
            MEM_LEN as usize,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        let mut g = Guest {
            file,
            mem,
            frontend,
            rings: Vec::new(),
            kicks: Vec::new(),
            calls: Vec::new(),
            bump: Bump::new(0, 0),
            rx_bufs: Vec::new(),
            raw,
        };
        g.negotiate(keep);
        g.set_memory();
        g.setup_rings(pairs, MEM_BASE, base);
        g
    }

    pub fn negotiate(&mut self, keep: u64) {
        let fe = &mut self.frontend;
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        fe.set_features(offered & keep).unwrap();
        let pf = fe.get_protocol_features().unwrap();
        assert!(pf.contains(VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK));
        fe.set_protocol_features(pf).unwrap();
    }

    pub fn set_memory(&mut self) {
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: MEM_BASE,
            memory_size: MEM_LEN,
            userspace_addr: USER_BASE,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        };
        self.frontend.set_mem_table(&[region]).unwrap();
    }

    /// Lay out and start two rings per pair from `start` (receive, transmit, receive…).
    pub fn setup_rings(&mut self, pairs: usize, start: u64, base: u16) {
        self.rings.clear();
        self.kicks.clear();
        self.calls.clear();
        let mut at = start;
        for q in 0..2 * pairs {
            let ring = DriverRing::new(at, RING_SIZE);
            ring.init(&self.mem);
            at = align(ring.end(), 4096);
            let user = |gpa: u64| USER_BASE + (gpa - MEM_BASE);
            let config = VringConfigData {
                queue_max_size: RING_SIZE,
                queue_size: RING_SIZE,
                flags: 0,
                desc_table_addr: user(ring.layout.desc_table),
                used_ring_addr: user(ring.layout.used_ring),
                avail_ring_addr: user(ring.layout.avail_ring),
                log_addr: None,
            };
            let kick = EventFd::new(EFD_NONBLOCK).unwrap();
            let call = EventFd::new(EFD_NONBLOCK).unwrap();
            let fe = &mut self.frontend;
            fe.set_vring_num(q, RING_SIZE).unwrap();
            fe.set_vring_addr(q, &config).unwrap();
            fe.set_vring_base(q, base).unwrap();
            fe.set_vring_call(q, &call).unwrap();
            fe.set_vring_kick(q, &kick).unwrap();
            fe.set_vring_enable(q, true).unwrap();
            self.rings.push(ring);
            self.kicks.push(kick);
            self.calls.push(call);
        }
        self.bump = Bump::new(at, MEM_BASE + MEM_LEN);
        self.rx_bufs = vec![vec![(0, 0); usize::from(RING_SIZE)]; pairs];
    }

    /// Transmit `frame` with `header` on pair `pair` and kick.
    pub fn transmit(&mut self, pair: usize, header: &VirtioNetRepr, frame: &[u8]) {
        let mut bytes = header.to_bytes().to_vec();
        bytes.extend_from_slice(frame);
        let at = self.bump.alloc(bytes.len() as u64);
        self.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        let ring = &mut self.rings[2 * pair + 1];
        ring.add(&self.mem, &[(at, bytes.len() as u32, false)]).unwrap();
        ring.publish(&self.mem);
        self.kicks[2 * pair + 1].write(1).unwrap();
    }

    pub fn post_rx(&mut self, pair: usize, n: usize, len: u32) {
        for _ in 0..n {
            let at = self.bump.alloc(u64::from(len));
            let head = self.rings[2 * pair].add(&self.mem, &[(at, len, true)]).unwrap();
            self.rx_bufs[pair][usize::from(head)] = (at, len);
        }
        self.rings[2 * pair].publish(&self.mem);
    }

    /// Frames in pair `pair`'s receive queue (one buffer each: they are small).
    pub fn received(&mut self, pair: usize) -> Vec<Vec<u8>> {
        let used = self.rings[2 * pair].used(&self.mem);
        used.iter()
            .map(|&(head, len)| {
                let (at, _) = self.rx_bufs[pair][head as usize];
                let mut b = vec![0u8; len as usize];
                self.mem.read_slice(&mut b, GuestAddress(at)).unwrap();
                b[12..].to_vec()
            })
            .collect()
    }
}

pub fn connect_retrying(socket: &Path, queues: u64) -> (Frontend, UnixStream) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match UnixStream::connect(socket) {
            Ok(stream) => {
                let raw = stream.try_clone().unwrap();
                let f = Frontend::from_stream(stream, queues);
                f.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
                return (f, raw);
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("connecting to {}: {e}", socket.display()),
        }
    }
}
