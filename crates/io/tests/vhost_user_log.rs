//! Dirty-page logging for live migration, driven by the `vhost` crate's
//! frontend (the role QEMU plays): with `LOG_SHMFD` the frontend shares a
//! log file (`SET_LOG_BASE`) and turns logging on with `VHOST_F_LOG_ALL`;
//! every guest page the device writes while it is on (the receive buffer a
//! frame went into, the used ring) has its bit set, and no other page does.

mod vhost_frontend;
mod virtio_driver;

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use palisade_io::vhost_user::log::{LOG_PAGE, VHOST_F_LOG_ALL};
use palisade_io::vhost_user::{QueuePair, VhostUserNet, VhostUserNetConfig};
use palisade_wire::virtio_net::VirtioNetRepr;
use vhost::vhost_user::VhostUserFrontend;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::{VhostBackend, VhostUserDirtyLogRegion};
use vhost_frontend::{Guest, MEM_BASE, MEM_LEN, RING_SIZE};
use virtio_driver::tcp4_frame;

/// Bytes of log for the test guest's memory (one bit per page), rounded up.
const LOG_BYTES: u64 = (MEM_BASE + MEM_LEN) / LOG_PAGE / 8 + 64;

fn open(socket: &Path) -> (VhostUserNet, Vec<QueuePair>) {
    let c = VhostUserNetConfig::new(socket);
    VhostUserNet::open(&c).unwrap_or_else(|e| panic!("{e}"))
}

fn log_file() -> File {
    let f = tempfile::tempfile().unwrap();
    f.set_len(LOG_BYTES).unwrap();
    f
}

/// The pages whose bits are set in `log`.
fn marked(log: &File) -> BTreeSet<u64> {
    let mut b = vec![0u8; LOG_BYTES as usize];
    log.read_exact_at(&mut b, 0).unwrap();
    (0..LOG_BYTES * 8)
        .filter(|&p| b[(p / 8) as usize] & (1 << (p % 8)) != 0)
        .collect()
}

fn pages(start: u64, len: u64) -> BTreeSet<u64> {
    (start / LOG_PAGE..=(start + len.max(1) - 1) / LOG_PAGE).collect()
}

fn share(g: &mut Guest, log: &File) {
    g.frontend
        .set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: LOG_BYTES,
                mmap_offset: 0,
                mmap_handle: log.as_raw_fd(),
            }),
        )
        .unwrap();
}

/// Send one frame to the guest on pair 0 into one of `n` fresh buffers of
/// `len` bytes; the buffer it went into and the bytes written there.
fn deliver(g: &mut Guest, pair: &mut QueuePair, n: usize, len: u32) -> ((u64, u32), u64) {
    g.post_rx(0, n, len);
    let before = g.rings[0].used(&g.mem).len();
    assert_eq!(before, 0);
    pair.send(&VirtioNetRepr::PLAIN, &tcp4_frame(100, 7)).unwrap();
    pair.flush();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let used = g.rings[0].used(&g.mem);
        if let Some(&(head, written)) = used.first() {
            return (g.rx_bufs[0][head as usize], u64::from(written));
        }
        assert!(Instant::now() < deadline, "the frame never reached the guest");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn pages_the_device_writes_are_logged_while_logging_is_on_and_no_others() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vu.sock");
    let (device, mut pairs) = open(&socket);
    // Logging off at first: the guest acks everything but VHOST_F_LOG_ALL.
    let mut g = Guest::connect(&socket, 1, !VHOST_F_LOG_ALL);
    assert!(
        g.frontend
            .get_protocol_features()
            .unwrap()
            .contains(VhostUserProtocolFeatures::LOG_SHMFD),
        "LOG_SHMFD is offered (QEMU refuses to migrate without it)"
    );
    let offered = g.frontend.get_features().unwrap();
    assert_ne!(offered & VHOST_F_LOG_ALL, 0, "VHOST_F_LOG_ALL is offered");
    let log = log_file();
    share(&mut g, &log);

    // A log but logging off: nothing is marked.
    deliver(&mut g, &mut pairs[0], 1, 4096);
    assert!(marked(&log).is_empty(), "{:?}", marked(&log));

    // Logging on (as QEMU does when a migration starts: the same features
    // plus LOG_ALL, on running rings, which keep running).
    g.frontend.set_features(offered).unwrap();
    let (buf, written) = deliver(&mut g, &mut pairs[0], 4, 8192);
    let got = marked(&log);
    let used_ring = g.rings[0].layout.used_ring;
    let used_extent = pages(used_ring, 6 + 8 * u64::from(RING_SIZE));
    let frame_pages = pages(buf.0, written);
    assert!(
        frame_pages.is_subset(&got),
        "the pages of the buffer the frame went into are marked: {frame_pages:?} in {got:?}"
    );
    assert!(
        got.contains(&(used_ring / LOG_PAGE)),
        "the used ring's page is marked: {} in {got:?}",
        used_ring / LOG_PAGE
    );
    let allowed: BTreeSet<u64> = frame_pages.union(&used_extent).copied().collect();
    assert!(
        got.is_subset(&allowed),
        "only pages the device wrote are marked: {:?} beyond {allowed:?}",
        got.difference(&allowed).collect::<Vec<_>>()
    );
    // The buffers posted but not written, where they do not share a page
    // with what was written, stay clean: the last one.
    let last = g.rx_bufs[0]
        .iter()
        .copied()
        .filter(|b| b.1 == 8192)
        .max_by_key(|b| b.0)
        .unwrap();
    let untouched: BTreeSet<u64> = pages(last.0, 8192).difference(&allowed).copied().collect();
    assert!(!untouched.is_empty());
    assert!(got.is_disjoint(&untouched), "{untouched:?} in {got:?}");

    // Off again (the migration ended): nothing more is marked.
    log.write_all_at(&vec![0; LOG_BYTES as usize], 0).unwrap();
    g.frontend.set_features(offered & !VHOST_F_LOG_ALL).unwrap();
    g.rings[0].used(&g.mem);
    deliver_again(&mut g, &mut pairs[0]);
    assert!(marked(&log).is_empty(), "{:?}", marked(&log));

    // A new log replaces the old one: writes go there.
    let second = log_file();
    share(&mut g, &second);
    g.frontend.set_features(offered).unwrap();
    deliver_again(&mut g, &mut pairs[0]);
    assert!(!marked(&second).is_empty());
    assert!(marked(&log).is_empty());
    assert_eq!(device.status().sessions, 1, "the session went on throughout");
}

/// [`deliver`] after earlier deliveries (the used ring's entries read already).
fn deliver_again(g: &mut Guest, pair: &mut QueuePair) {
    g.post_rx(0, 1, 4096);
    pair.send(&VirtioNetRepr::PLAIN, &tcp4_frame(100, 9)).unwrap();
    pair.flush();
    let deadline = Instant::now() + Duration::from_secs(5);
    while g.rings[0].used(&g.mem).is_empty() {
        assert!(Instant::now() < deadline, "the frame never reached the guest");
        std::thread::sleep(Duration::from_millis(5));
    }
}

mod property {
    use super::*;
    use palisade_io::vhost_user::log::DirtyLog;
    use proptest::prelude::*;

    proptest! {
        /// Any writes, anywhere (inside the log, across its end, at the top
        /// of the address space): exactly the pages a reference model says
        /// are marked, none past the log's end, and the rest counted.
        #[test]
        fn the_log_marks_exactly_the_pages_written(
            size in 1u64..64,
            writes in proptest::collection::vec((0u64..(1 << 22), 0usize..0x6000), 0..40),
            high in any::<bool>(),
        ) {
            let f = tempfile::tempfile().unwrap();
            f.set_len(size + 4096).unwrap();
            let log = DirtyLog::default();
            log.set_base(&f, size, 0).unwrap();
            log.set_logging(true);
            let mut want = BTreeSet::new();
            let mut outside = 0u64;
            let writes: Vec<(u64, usize)> = writes
                .into_iter()
                .map(|(gpa, len)| if high { (u64::MAX - gpa, len) } else { (gpa, len) })
                .collect();
            for &(gpa, len) in &writes {
                log.mark(gpa, len);
                if len == 0 {
                    continue;
                }
                let last = gpa.saturating_add(len as u64 - 1);
                for page in gpa / LOG_PAGE..=last / LOG_PAGE {
                    if page / 8 < size {
                        want.insert(page);
                    } else {
                        outside += 1;
                    }
                }
            }
            let mut b = vec![0u8; (size + 4096) as usize];
            f.read_exact_at(&mut b, 0).unwrap();
            let got: BTreeSet<u64> = (0..size * 8).filter(|&p| b[(p / 8) as usize] & (1 << (p % 8)) != 0).collect();
            prop_assert_eq!(got, want);
            prop_assert!(b[size as usize..].iter().all(|&x| x == 0), "written past the log");
            prop_assert_eq!(log.outside(), outside);
        }
    }
}
