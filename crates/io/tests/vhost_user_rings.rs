//! The vhost-user data path (`NetRings`) over an in-process guest memory,
//! driven by the driver model: frames both ways, mergeable buffers,
//! offload decisions, notifications, budgets, and hostile chains.
//!
//! No system calls beyond `mmap`: these run under Miri too
//! (`cargo +nightly miri test -p palisade-io --test vhost_user_rings`).

mod virtio_driver;

use palisade_io::vhost_user::features::{mask, offered};
use palisade_io::vhost_user::{Delivery, GuestFeatures, Limits, NetRings, Offloads, Refusal, SendError};
use palisade_wire::virtio_net::{Gso, GsoKind, Header, PartialChecksum, VirtioNetRepr};
use virtio_driver::{Bump, DriverRing, F_INDIRECT, F_NEXT, F_WRITE, align, tcp4_frame};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_BASE: u64 = 0x10000;
const MEM_LEN: u64 = if cfg!(miri) { 0x20_0000 } else { 0x80_0000 };

/// A guest memory with both rings of one queue pair, a driver for each, and buffer space.
struct Rig {
    mem: GuestMemoryMmap,
    rings: NetRings,
    rx: DriverRing,
    tx: DriverRing,
    bump: Bump,
    /// Receive buffers posted: head → (address, length).
    rx_bufs: Vec<(u64, u32)>,
}

fn all_features() -> u64 {
    offered(Offloads::ALL, 1) & !mask::PROTOCOL_FEATURES
}

fn tso4(payload: usize) -> VirtioNetRepr {
    VirtioNetRepr {
        csum: Some(PartialChecksum { start: 34, offset: 16 }),
        gso: Some(Gso {
            kind: GsoKind::TcpV4,
            ecn: false,
            size: 1448,
            header_len: 54,
        }),
        ..VirtioNetRepr::PLAIN
    }
    .with_frame_checked(54 + payload)
}

trait Checked {
    fn with_frame_checked(self, len: usize) -> Self;
}

impl Checked for VirtioNetRepr {
    /// The header must describe a frame of `len` bytes (the tests build only valid ones on purpose).
    fn with_frame_checked(self, len: usize) -> Self {
        VirtioNetRepr::parse(&Header::new_checked(&self.to_bytes()[..]).unwrap(), len).unwrap()
    }
}

fn partial() -> VirtioNetRepr {
    VirtioNetRepr {
        csum: Some(PartialChecksum { start: 34, offset: 16 }),
        ..VirtioNetRepr::PLAIN
    }
}

impl Rig {
    fn new(features: u64, limits: Limits, size: u16) -> Rig {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(MEM_BASE), MEM_LEN as usize)]).unwrap();
        let rx = DriverRing::new(MEM_BASE, size);
        let tx = DriverRing::new(align(rx.end(), 4096), size);
        rx.init(&mem);
        tx.init(&mem);
        let bump = Bump::new(align(tx.end(), 4096), MEM_BASE + MEM_LEN);
        let mut rings = NetRings::new(GuestFeatures::from_bits(features), limits);
        rings.start_rx(&mem, rx.layout, 0).unwrap();
        rings.start_tx(&mem, tx.layout, 0).unwrap();
        Rig {
            mem,
            rings,
            rx,
            tx,
            bump,
            rx_bufs: vec![(0, 0); usize::from(size)],
        }
    }

    fn header_len(&self) -> usize {
        self.rings.features().header_len()
    }

    /// Write header + frame into buffers of the given sizes (the last takes the rest) and make them
    /// available as one transmit chain.
    fn put_tx(&mut self, header: &VirtioNetRepr, frame: &[u8], split: &[usize]) -> u16 {
        let mut bytes = header.to_bytes()[..self.header_len()].to_vec();
        bytes.extend_from_slice(frame);
        let mut bufs = Vec::new();
        let mut rest = &bytes[..];
        for (i, &n) in split.iter().chain(std::iter::once(&usize::MAX)).enumerate() {
            if rest.is_empty() && i > 0 {
                break;
            }
            let n = n.min(rest.len());
            let at = self.bump.alloc(n.max(1) as u64);
            self.mem.write_slice(&rest[..n], GuestAddress(at)).unwrap();
            bufs.push((at, n as u32, false));
            rest = &rest[n..];
        }
        let head = self.tx.add(&self.mem, &bufs).expect("free descriptors");
        self.tx.publish(&self.mem);
        head
    }

    /// Post `n` receive chains of one `len`-byte buffer each.
    fn post_rx(&mut self, n: usize, len: u32) {
        for _ in 0..n {
            let at = self.bump.alloc(u64::from(len));
            let head = self.rx.add(&self.mem, &[(at, len, true)]).expect("free descriptors");
            self.rx_bufs[usize::from(head)] = (at, len);
        }
        self.rx.publish(&self.mem);
    }

    /// Frames the device published into the receive queue, reassembled from
    /// their buffers by `num_buffers` (as Linux's `receive_mergeable` does).
    fn take_rx(&mut self) -> Vec<(VirtioNetRepr, Vec<u8>)> {
        let hl = self.header_len();
        let used = self.rx.used(&self.mem);
        let mut out = Vec::new();
        let mut i = 0;
        while i < used.len() {
            let (head, len) = used[i];
            let (at, cap) = self.rx_bufs[head as usize];
            assert!(len <= cap, "used length {len} > buffer {cap}");
            let mut bytes = vec![0u8; len as usize];
            self.mem.read_slice(&mut bytes, GuestAddress(at)).unwrap();
            let h = Header::new_checked(&bytes[..hl]).unwrap();
            let n = h.num_buffers().unwrap_or(1).max(1) as usize;
            for &(head, len) in &used[i + 1..i + n] {
                let (at, _) = self.rx_bufs[head as usize];
                let mut more = vec![0u8; len as usize];
                self.mem.read_slice(&mut more, GuestAddress(at)).unwrap();
                bytes.extend_from_slice(&more);
            }
            let frame = bytes[hl..].to_vec();
            let repr = VirtioNetRepr::parse(&Header::new_checked(&bytes[..hl]).unwrap(), frame.len()).unwrap();
            out.push((repr, frame));
            i += n;
        }
        out
    }

    fn recv(&mut self, max: usize, delivery: Delivery) -> (Vec<(VirtioNetRepr, Vec<u8>)>, bool, bool) {
        let mut got = Vec::new();
        let o = self.rings.recv_batch(&self.mem, max, delivery, &mut |batch| {
            assert!(!batch.is_empty());
            got.extend(batch.iter().map(|(h, f)| (*h, f.to_vec())));
        });
        assert_eq!(o.frames, got.len());
        (got, o.more, o.notify)
    }
}

#[test]
fn transmitted_frames_arrive_with_their_headers_whatever_the_layout() {
    let mut r = Rig::new(all_features(), Limits::default(), 64);
    let small = tcp4_frame(100, 1);
    let big = tcp4_frame(if cfg!(miri) { 6000 } else { 60_000 }, 2);
    // Header and frame in one buffer; header alone then frame; header split mid-way across three.
    r.put_tx(&partial(), &small, &[]);
    r.put_tx(&partial(), &small, &[12]);
    r.put_tx(&tso4(big.len() - 54), &big, &[5, 700, 3000]);
    // Through an indirect table.
    let mut bytes = partial().to_bytes().to_vec();
    bytes.extend_from_slice(&small);
    let at = r.bump.alloc(bytes.len() as u64);
    r.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
    let table = r.bump.alloc(32);
    r.tx.add_indirect(
        &r.mem,
        table,
        &[(at, 20, false), (at + 20, bytes.len() as u32 - 20, false)],
    );
    r.tx.publish(&r.mem);

    let (got, more, notify) = r.recv(64, Delivery::Offloaded);
    assert!(!more);
    assert!(notify, "no interrupt suppression asked for: the guest is notified");
    assert_eq!(got.len(), 4);
    for (i, (h, f)) in got.iter().enumerate() {
        let want = if i == 2 { &big } else { &small };
        assert_eq!(f, want, "frame {i}");
        assert_eq!(h.csum, Some(PartialChecksum { start: 34, offset: 16 }), "frame {i}");
    }
    assert_eq!(got[2].0.gso.map(|g| g.kind), Some(GsoKind::TcpV4));
    // Every chain is back in the used ring, with length 0 (the device wrote nothing).
    let used = r.tx.used(&r.mem);
    assert_eq!(used.len(), 4);
    assert!(used.iter().all(|&(_, len)| len == 0));
    let s = r.rings.stats();
    assert_eq!(
        (s.from_guest_frames, s.from_guest_gso_frames, s.from_guest_partial_csum),
        (4, 1, 4)
    );
    assert_eq!(s.from_guest_bytes, 3 * small.len() as u64 + big.len() as u64);
    assert_eq!(s.refused.total(), 0);
}

#[test]
fn plain_delivery_completes_checksums_and_holds_back_super_frames() {
    let mut r = Rig::new(all_features(), Limits::default(), 16);
    let f = tcp4_frame(200, 7);
    r.put_tx(&partial(), &f, &[]);
    r.put_tx(&tso4(3000), &tcp4_frame(3000, 8), &[]);
    let (got, _, _) = r.recv(16, Delivery::Plain);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, VirtioNetRepr::PLAIN);
    // The TCP checksum now verifies: pseudo-header + segment sums to 0xffff.
    let frame = &got[0].1;
    let pseudo = palisade_wire::checksum::pseudo_header_v4([10, 0, 0, 1], [10, 0, 0, 2], 6, 220);
    let sum = palisade_wire::checksum::combine(&[pseudo, palisade_wire::checksum::sum(&frame[34..])]);
    assert_eq!(palisade_wire::checksum::fold(sum), 0xffff);
    assert_eq!(frame[..50], f[..50]);
    let s = r.rings.stats();
    assert_eq!((s.csum_completed, s.gso_undeliverable, s.from_guest_frames), (1, 1, 1));
    assert_eq!(
        r.tx.used(&r.mem).len(),
        2,
        "the held-back super-frame's chain is returned too"
    );
}

#[test]
fn hostile_transmit_chains_are_refused_counted_and_returned() {
    let mut r = Rig::new(all_features() & !mask::HOST_TSO6, Limits::default(), 64);
    let good = tcp4_frame(64, 1);
    let table = r.tx.layout.desc_table;
    let size = r.tx.layout.size;
    // Each hostile chain sits in its own descriptor slot from 40 up (the driver uses 63 down..).
    let buf = r.bump.alloc(4096);
    let mut hdr_frame = partial().to_bytes().to_vec();
    hdr_frame.extend_from_slice(&good);
    r.mem.write_slice(&hdr_frame, GuestAddress(buf)).unwrap();
    let n = hdr_frame.len() as u32;
    // (descriptors to write as (index, address, length, flags, next), head, expected refusal)
    type Case = (Vec<(u16, u64, u32, u16, u16)>, u16, Refusal);
    let cases: Vec<Case> = vec![
        (vec![], size + 3, Refusal::HeadOutOfRange),
        (vec![(40, buf, 10, F_NEXT, size)], 40, Refusal::NextOutOfRange),
        (
            vec![(41, buf, 10, F_NEXT, 42), (42, buf, 10, F_NEXT, 41)],
            41,
            Refusal::ChainTooLong,
        ),
        (vec![(43, 0x7000_0000, 100, 0, 0)], 43, Refusal::BufferOutsideMemory),
        (vec![(44, buf, n, F_WRITE, 0)], 44, Refusal::WrongDirection),
        (
            vec![(45, table + 16 * 45, 16, F_INDIRECT | F_NEXT, 0)],
            45,
            Refusal::IndirectWithNext,
        ),
        (vec![(46, buf, 13, 0, 0)], 46, Refusal::FrameTooShort),
        (vec![(47, buf, 70_000, 0, 0)], 47, Refusal::FrameTooLarge),
    ];
    let mut expected = Vec::new();
    for (descs, head, refusal) in &cases {
        for &(i, a, l, f, nx) in descs {
            r.tx.write_raw(&r.mem, i, a, l, f, nx);
        }
        r.tx.push_head(&r.mem, *head);
        expected.push(*refusal);
        // A good frame after each, which must still arrive.
        r.put_tx(&partial(), &good, &[]);
    }
    // A header the guest may not send: a TCPv6 super-frame without HOST_TSO6.
    let tso6 = VirtioNetRepr {
        gso: Some(Gso {
            kind: GsoKind::TcpV6,
            ecn: false,
            size: 1000,
            header_len: 54,
        }),
        ..partial()
    };
    r.put_tx(&tso6, &tcp4_frame(3000, 1), &[]);
    expected.push(Refusal::OffloadNotNegotiated);
    // A header the specification forbids: gso_size 0.
    let mut raw = tso4(3000).to_bytes();
    raw[4] = 0;
    raw[5] = 0;
    let at = r.bump.alloc(12 + 3054);
    r.mem.write_slice(&raw, GuestAddress(at)).unwrap();
    r.mem.write_slice(&tcp4_frame(3000, 1), GuestAddress(at + 12)).unwrap();
    r.tx.add(&r.mem, &[(at, 12 + 3054, false)]);
    r.tx.publish(&r.mem);
    expected.push(Refusal::HeaderBadValue);

    let (got, _, _) = r.recv(256, Delivery::Offloaded);
    assert_eq!(got.len(), cases.len(), "every good frame between the bad ones arrives");
    assert!(got.iter().all(|(_, f)| *f == good));
    let s = r.rings.stats();
    for want in &expected {
        assert_eq!(s.refused.get(*want), 1, "{want}: {:?}", s.refused);
    }
    assert_eq!(s.refused.total(), expected.len() as u64);
    // Every chain, refused or not, went back to the guest.
    assert_eq!(r.tx.used(&r.mem).len(), cases.len() * 2 + 2);
}

#[test]
fn a_call_stops_at_its_budget_and_says_so() {
    let limits = Limits {
        frames_per_call: 8,
        ..Limits::default()
    };
    let mut r = Rig::new(all_features(), limits, 32);
    for i in 0..20 {
        r.put_tx(&VirtioNetRepr::PLAIN, &tcp4_frame(10, i), &[]);
    }
    let (a, more_a, _) = r.recv(100, Delivery::Offloaded);
    let (b, more_b, _) = r.recv(100, Delivery::Offloaded);
    let (c, more_c, _) = r.recv(100, Delivery::Offloaded);
    let (d, more_d, _) = r.recv(100, Delivery::Offloaded);
    assert_eq!((a.len(), b.len(), c.len(), d.len()), (8, 8, 4, 0));
    assert_eq!((more_a, more_b, more_c, more_d), (true, true, false, false));
    // In order.
    let seqs: Vec<u32> = [a, b, c]
        .concat()
        .iter()
        .map(|(_, f)| u32::from_be_bytes(f[38..42].try_into().unwrap()))
        .collect();
    assert_eq!(seqs, (0..20).collect::<Vec<_>>());
    assert_eq!(r.rings.stats().budget_exhausted, 2);

    // A byte budget: 64 KiB frames, 100 KiB per call → two frames per call.
    let limits = Limits {
        bytes_per_call: 100_000,
        ..Limits::default()
    };
    let mut r = Rig::new(all_features(), limits, 32);
    let payload = if cfg!(miri) { 20_000 } else { 60_000 };
    for i in 0..5 {
        r.put_tx(&tso4(payload), &tcp4_frame(payload, i), &[]);
    }
    let sizes: Vec<usize> = (0..4).map(|_| r.recv(100, Delivery::Offloaded).0.len()).collect();
    let expect = if cfg!(miri) { vec![5, 0, 0, 0] } else { vec![2, 2, 1, 0] };
    assert_eq!(sizes, expect);
}

#[test]
fn a_guest_with_only_invalid_chains_costs_a_bounded_amount_per_call() {
    let limits = Limits {
        chains_per_call: 10,
        ..Limits::default()
    };
    let mut r = Rig::new(all_features(), limits, 64);
    for _ in 0..50 {
        r.tx.push_head(&r.mem, 999);
    }
    r.tx.publish(&r.mem);
    let mut calls = 0;
    loop {
        let (got, more, _) = r.recv(256, Delivery::Offloaded);
        assert!(got.is_empty());
        calls += 1;
        if !more {
            break;
        }
    }
    assert_eq!(calls, 5);
    assert_eq!(r.rings.stats().refused.get(Refusal::HeadOutOfRange), 50);
}

#[test]
fn an_available_index_running_ahead_stops_the_ring() {
    let mut r = Rig::new(all_features(), Limits::default(), 16);
    r.put_tx(&VirtioNetRepr::PLAIN, &tcp4_frame(10, 0), &[]);
    r.tx.publish_raw(&r.mem, 1000);
    let (got, _, _) = r.recv(16, Delivery::Offloaded);
    assert!(got.is_empty());
    assert_eq!(r.rings.stats().ring_faults, 1);
    assert!(!r.rings.tx_running());
    // Restarting (QEMU setting the ring up again) brings it back.
    r.tx.publish_raw(&r.mem, 1);
    let layout = r.tx.layout;
    r.rings.start_tx(&r.mem, layout, 0).unwrap();
    assert_eq!(r.recv(16, Delivery::Offloaded).0.len(), 1);
}

#[test]
fn a_super_frame_spans_mergeable_buffers_and_appears_at_flush() {
    let mut r = Rig::new(all_features(), Limits::default(), 128);
    r.post_rx(100, 1536);
    let payload = if cfg!(miri) { 5000 } else { 60_000 };
    let frame = tcp4_frame(payload, 3);
    let hdr = tso4(payload);
    r.rings.send(&r.mem, &hdr, &frame).unwrap();
    let small = tcp4_frame(10, 4);
    r.rings.send(&r.mem, &VirtioNetRepr::PLAIN, &small).unwrap();
    assert_eq!(r.rx.used_idx(&r.mem), 0, "nothing visible before flush");
    assert!(r.rings.flush(&r.mem), "the guest is notified");
    let got = r.take_rx();
    assert_eq!(got.len(), 2);
    let buffers = (12 + frame.len()).div_ceil(1536) as u16;
    assert_eq!(
        got[0].0,
        VirtioNetRepr {
            num_buffers: buffers,
            ..hdr
        }
    );
    assert_eq!(got[0].1, frame);
    assert_eq!(got[1].0.num_buffers, 1);
    assert_eq!(got[1].1, small);
    let s = r.rings.stats();
    assert_eq!(
        (s.to_guest_frames, s.to_guest_gso_frames, s.to_guest_buffers),
        (2, 1, u64::from(buffers) + 1)
    );
}

#[test]
fn without_enough_buffers_the_frame_is_dropped_and_the_buffers_kept_for_the_next() {
    let mut r = Rig::new(all_features(), Limits::default(), 64);
    r.post_rx(3, 1536);
    let big = tcp4_frame(if cfg!(miri) { 5000 } else { 9000 }, 1);
    let hdr = tso4(big.len() - 54);
    assert_eq!(r.rings.send(&r.mem, &hdr, &big), Err(SendError::NoBuffers));
    // The three popped buffers serve the next frames.
    for i in 0..3 {
        r.rings
            .send(&r.mem, &VirtioNetRepr::PLAIN, &tcp4_frame(100, i))
            .unwrap();
    }
    assert_eq!(
        r.rings.send(&r.mem, &VirtioNetRepr::PLAIN, &tcp4_frame(100, 9)),
        Err(SendError::NoBuffers)
    );
    r.rings.flush(&r.mem);
    let got = r.take_rx();
    assert_eq!(got.len(), 3);
    assert_eq!(r.rings.stats().to_guest_no_buffers, 2);
    // Enough buffers later: the super-frame goes through.
    r.post_rx(10, 1536);
    r.rings.send(&r.mem, &hdr, &big).unwrap();
    r.rings.flush(&r.mem);
    assert_eq!(r.take_rx()[0].1, big);
}

#[test]
fn an_invalid_receive_chain_between_good_ones_is_returned_once() {
    let mut r = Rig::new(all_features(), Limits::default(), 32);
    r.post_rx(1, 1536);
    r.rx.write_raw(&r.mem, 20, 0x7000_0000, 1536, F_WRITE, 0);
    r.rx.push_head(&r.mem, 20);
    r.rx.publish(&r.mem);
    r.post_rx(1, 1536);
    let frame = tcp4_frame(2000, 1);
    r.rings.send(&r.mem, &VirtioNetRepr::PLAIN, &frame).unwrap();
    r.rings.flush(&r.mem);
    let used = r.rx.used(&r.mem);
    // The bad chain first (returned empty as soon as seen), then the frame's two buffers.
    assert_eq!(used.len(), 3);
    assert_eq!(used[0], (20, 0));
    assert_eq!(used[1].1 + used[2].1, (12 + frame.len()) as u32);
    assert_eq!(r.rings.stats().refused.get(Refusal::BufferOutsideMemory), 1);
}

#[test]
fn offloads_the_guest_did_not_negotiate_are_not_sent_to_it() {
    // No GUEST_TSO, no GUEST_CSUM, no mergeable buffers (10-byte header with VERSION_1 off).
    let features =
        all_features() & !(mask::GUEST_TSO4 | mask::GUEST_TSO6 | mask::GUEST_CSUM | mask::MRG_RXBUF | mask::VERSION_1);
    let mut r = Rig::new(features, Limits::default(), 16);
    assert_eq!(r.header_len(), 10);
    r.post_rx(4, 2048);
    let big = tcp4_frame(3000, 1);
    assert_eq!(
        r.rings.send(&r.mem, &tso4(3000), &big),
        Err(SendError::NeedsSegmentation)
    );
    let f = tcp4_frame(300, 2);
    r.rings.send(&r.mem, &partial(), &f).unwrap();
    // Without mergeable buffers one chain must hold it all.
    assert_eq!(
        r.rings.send(&r.mem, &VirtioNetRepr::PLAIN, &tcp4_frame(2100, 3)),
        Err(SendError::TooBig)
    );
    r.rings.flush(&r.mem);
    let got = r.take_rx();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].0,
        VirtioNetRepr::PLAIN,
        "checksum completed, header says nothing"
    );
    let pseudo = palisade_wire::checksum::pseudo_header_v4([10, 0, 0, 1], [10, 0, 0, 2], 6, 320);
    let sum = palisade_wire::checksum::combine(&[pseudo, palisade_wire::checksum::sum(&got[0].1[34..])]);
    assert_eq!(palisade_wire::checksum::fold(sum), 0xffff);
    let s = r.rings.stats();
    assert_eq!(
        (s.to_guest_needs_segmentation, s.to_guest_too_big, s.csum_completed),
        (1, 1, 1)
    );
}

#[test]
fn a_header_that_does_not_fit_its_frame_is_refused_before_any_buffer_is_used() {
    let mut r = Rig::new(all_features(), Limits::default(), 16);
    r.post_rx(2, 1536);
    let bad = VirtioNetRepr {
        csum: Some(PartialChecksum { start: 60, offset: 16 }),
        ..VirtioNetRepr::PLAIN
    };
    assert!(matches!(
        r.rings.send(&r.mem, &bad, &tcp4_frame(0, 1)),
        Err(SendError::BadHeader(_))
    ));
    r.rings.send(&r.mem, &VirtioNetRepr::PLAIN, &tcp4_frame(0, 1)).unwrap();
    r.rings.flush(&r.mem);
    assert_eq!(r.take_rx().len(), 1);
}

#[test]
fn event_index_notifications_follow_the_guests_marks() {
    let mut r = Rig::new(all_features(), Limits::default(), 32);
    assert!(r.rings.features().event_idx());
    // The guest wants an interrupt once the used index passes 2 (used_event = 2).
    r.tx.set_used_event(&r.mem, 2);
    for i in 0..2 {
        r.put_tx(&VirtioNetRepr::PLAIN, &tcp4_frame(10, i), &[]);
    }
    let (_, _, notify) = r.recv(32, Delivery::Offloaded);
    assert!(!notify, "used index 2 has not passed used_event 2");
    r.put_tx(&VirtioNetRepr::PLAIN, &tcp4_frame(10, 2), &[]);
    let (_, _, notify) = r.recv(32, Delivery::Offloaded);
    assert!(notify, "used index 3 passed used_event 2");
    // Having drained the ring, the device asks to be kicked at the next available entry.
    assert_eq!(r.tx.avail_event(&r.mem), 3);

    // Without EVENT_IDX the guest's NO_INTERRUPT flag decides, and the device
    // suppresses kicks on its receive queue.
    let mut r = Rig::new(all_features() & !mask::EVENT_IDX, Limits::default(), 32);
    assert_eq!(
        r.rx.used_flags(&r.mem),
        1,
        "VRING_USED_F_NO_NOTIFY on the receive queue"
    );
    r.tx.set_avail_flags(&r.mem, 1);
    r.put_tx(&VirtioNetRepr::PLAIN, &tcp4_frame(10, 0), &[]);
    assert!(!r.recv(32, Delivery::Offloaded).2);
    r.tx.set_avail_flags(&r.mem, 0);
    r.put_tx(&VirtioNetRepr::PLAIN, &tcp4_frame(10, 1), &[]);
    assert!(r.recv(32, Delivery::Offloaded).2);
    assert_eq!(r.tx.used_flags(&r.mem), 0, "kicks re-enabled after draining");
}

#[test]
fn stopping_the_receive_queue_returns_held_buffers_and_the_index() {
    let mut r = Rig::new(all_features(), Limits::default(), 16);
    r.post_rx(2, 1536);
    let big = tcp4_frame(5000, 1);
    assert_eq!(r.rings.send(&r.mem, &tso4(5000), &big), Err(SendError::NoBuffers));
    let (base, _) = r.rings.stop_rx(&r.mem);
    assert_eq!(base, 2, "both chains were consumed");
    let used = r.rx.used(&r.mem);
    assert_eq!(used.len(), 2);
    assert!(used.iter().all(|&(_, len)| len == 0));
    assert_eq!(
        r.rings.send(&r.mem, &VirtioNetRepr::PLAIN, &big[..100]),
        Err(SendError::NotRunning)
    );
    // Restarted where it stopped (a guest driver reset would instead start from 0 with new rings).
    let layout = r.rx.layout;
    r.rings.start_rx(&r.mem, layout, base).unwrap();
    r.post_rx(1, 1536);
    r.rings.send(&r.mem, &VirtioNetRepr::PLAIN, &big[..100]).unwrap();
    r.rings.flush(&r.mem);
    assert_eq!(r.take_rx().len(), 1);
}

#[test]
fn a_receive_queue_of_tiny_buffers_cannot_hold_a_frame_and_is_not_drained_forever() {
    let limits = Limits {
        max_buffers_per_frame: 8,
        ..Limits::default()
    };
    let mut r = Rig::new(all_features(), limits, 64);
    r.post_rx(60, 16);
    let f = tcp4_frame(1000, 1);
    assert_eq!(r.rings.send(&r.mem, &VirtioNetRepr::PLAIN, &f), Err(SendError::TooBig));
    assert_eq!(r.rings.send(&r.mem, &VirtioNetRepr::PLAIN, &f), Err(SendError::TooBig));
    // A small frame still fits in what is held.
    r.rings.send(&r.mem, &VirtioNetRepr::PLAIN, &f[..40]).unwrap();
    r.rings.flush(&r.mem);
    let got = r.take_rx();
    assert_eq!(got[0].1, f[..40]);
    assert_eq!(r.rings.stats().to_guest_too_big, 2);

    // With mergeable buffers, a buffer shorter than the header is refused (and returned empty).
    let mut r = Rig::new(all_features(), Limits::default(), 16);
    r.post_rx(1, 8);
    r.post_rx(1, 1536);
    r.rings.send(&r.mem, &VirtioNetRepr::PLAIN, &f).unwrap();
    r.rings.flush(&r.mem);
    let used = r.rx.used(&r.mem);
    assert_eq!(used.len(), 2);
    assert_eq!(used[0].1, 0);
    assert_eq!(used[1].1, 12 + f.len() as u32);
    assert_eq!(r.rings.stats().refused.get(Refusal::BufferTooSmall), 1);
}

#[test]
fn a_guest_that_reposts_chains_it_does_not_own_stops_its_ring() {
    // Found by the fuzzer: chains made available again before they were
    // returned let unpublished used elements outnumber the ring's slots.
    let mut r = Rig::new(all_features(), Limits::default(), 8);
    let at = r.bump.alloc(2048);
    r.rx.write_raw(&r.mem, 0, at, 2048, F_WRITE, 0);
    let f = tcp4_frame(100, 1);
    for round in 0..2 {
        for _ in 0..8 {
            r.rx.push_head(&r.mem, 0);
        }
        r.rx.publish(&r.mem);
        for i in 0..8 {
            let sent = r.rings.send(&r.mem, &VirtioNetRepr::PLAIN, &f);
            if round == 0 {
                sent.unwrap();
            } else if i == 0 {
                // The ninth unpublished element would overwrite the first.
                assert_eq!(sent, Err(SendError::NotRunning));
            }
        }
    }
    assert_eq!(r.rings.stats().ring_faults, 1);
    assert!(!r.rings.rx_running());
    assert_eq!(r.rx.used_idx(&r.mem), 0, "nothing was published past the ring's size");
}
