//! Fuzz software segmentation and coalescing (`palisade_io::gso`): the
//! input is a program (`crates/io/tests/support/gso_props.rs`): one or two
//! super-frames (IPv4/IPv6, tags, options, flags, segment sizes, lengths)
//! cut into VXLAN datagrams, interleaved, then reordered, dropped,
//! duplicated, corrupted, re-flagged, cut short or mixed with other packets,
//! and fed to the coalescer. No panic; every segment a valid packet; every
//! merged super-frame well formed and cutting back into exactly the packets
//! it was made of; per flow, the same packets out as in, in order. Raw
//! bytes are also segmented as a frame with a TSO request and coalesced as
//! packets (no panic; typed refusals).
#![no_main]

#[path = "../../crates/io/tests/support/gso_props.rs"]
mod gso_props;

use palisade_io::Offload;
use palisade_io::gso::{self, Coalescer};
use palisade_wire::virtio_net::{Gso, GsoKind};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(e) = gso_props::run_program(data) {
        panic!("{e}");
    }
    // The same bytes as a frame that claims to be a super-frame, and as a packet.
    if let Some((&k, frame)) = data.split_first() {
        let kind = [GsoKind::TcpV4, GsoKind::TcpV6, GsoKind::UdpL4, GsoKind::Ufo][usize::from(k % 4)];
        let offload = Offload {
            gso: Some(Gso { kind, ecn: k & 4 != 0, size: u16::from(k >> 3) + 1, header_len: 0 }),
            ..Offload::NONE
        };
        let mut out = Vec::new();
        if let Ok(segs) = gso::segment(frame, &offload, &[], &mut out, 1 << 22) {
            assert_eq!(out.len(), segs.total_len());
            for s in segs.iter(&out) {
                // What the dissector accepts must carry valid checksums (malformed TCP
                // options, say, are copied as they came, as the kernel's GSO does).
                let d = palisade_wire::frame::Dissection::ethernet(s);
                assert!(d.error.is_some() || d.checksums_valid(), "segment of raw input with a bad checksum");
            }
        }
        let mut c = Coalescer::new(usize::from(k % 9));
        let mut n = 0;
        c.push(frame, &mut |_, _| n += 1);
        c.push(frame, &mut |_, _| n += 1);
        c.flush(&mut |_, _| n += 1);
        assert!(n >= 1 && n <= 2);
    }
});
