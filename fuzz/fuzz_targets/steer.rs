//! Fuzz the flow-steering reference: any bytes, as a vNIC frame or a VXLAN
//! payload, get a worker in range, and a frame's IPv4 or IPv6 addresses
//! swapped (the reply direction) get the same worker. (An IPv4 header shorter
//! than 20 bytes may not: its "ICMP type" can be a byte of the destination
//! address. The engine drops such packets as malformed wherever they land.)
#![no_main]

use palisade_io::steer::{frame_worker, vxlan_worker};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&n, frame)) = data.split_first() else { return };
    let workers = u32::from(n % 8) + 1;
    assert!(frame_worker(frame, workers) < workers);
    assert!(vxlan_worker(frame, workers) < workers);
    // An untagged frame: swap the addresses where IPv4 or IPv6 keeps them.
    let (src, dst, len) = match frame.get(12..15) {
        Some([0x08, 0x00, b]) if b & 0x0f >= 5 => (14 + 12, 14 + 16, 4),
        Some([0x08, 0x00, _]) => return,
        Some([0x86, 0xdd, _]) => (14 + 8, 14 + 24, 16),
        _ => return,
    };
    if frame.len() < dst + len {
        return;
    }
    let mut reply = frame.to_vec();
    reply[src..src + len].copy_from_slice(&frame[dst..dst + len]);
    reply[dst..dst + len].copy_from_slice(&frame[src..src + len]);
    assert_eq!(frame_worker(frame, workers), frame_worker(&reply, workers));
});
