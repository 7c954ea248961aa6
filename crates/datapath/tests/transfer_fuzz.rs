//! The transfer decoder's fuzz property (`support/transfer_check.rs`) over
//! every input the `transfer_decode` target ever failed on
//! (`fuzz/regressions/transfer_decode/`, each `NAME` described in
//! `NAME.txt`), and over mutations of a real transfer: every cut, every
//! byte changed to each of a few values, and seeded random damage with the
//! checksum made right again (so that the decoder behind it is reached).

#[path = "support/transfer_check.rs"]
mod transfer_check;

use palisade_datapath::state::{ConnRecord, crc32};
use palisade_datapath::transfer::{self, Transfer};
use palisade_datapath::{ConnState, TcpTrack};
use palisade_wire::flow::{FlowKey, Segment};
use palisade_wire::ip::IpProtocol;
use transfer_check::check_transfer;

fn sample() -> Vec<u8> {
    let mut src = [0u8; 16];
    src[10..].copy_from_slice(&[0xff, 0xff, 10, 0, 0, 10]);
    let mut dst = src;
    dst[15] = 11;
    let conn = |sport: u16, protocol: IpProtocol| {
        let mut tcp = TcpTrack::default();
        tcp.peers[0].end = 1_000_000;
        tcp.peers[0].limit = 1_064_000;
        tcp.peers[1].end = 77;
        ConnRecord {
            key: FlowKey {
                segment: Segment::vlan(100),
                src,
                dst,
                src_port: sport,
                dst_port: 443,
                protocol,
                icmp_type: 0,
                icmp_code: 0,
            },
            state: ConnState::Established,
            strict: true,
            trusted: false,
            revalidate: false,
            age: 5_000_000_000,
            idle: 3_000_000,
            packets: 10,
            bytes: 1_000,
            tcp,
        }
    };
    let t = Transfer {
        vnic: "a.0".into(),
        policy_version: 4,
        full: false,
        conns: vec![conn(40_000, IpProtocol::TCP), conn(5353, IpProtocol::UDP)],
        removed: vec![conn(40_001, IpProtocol::TCP).key],
    };
    transfer::encode(&t)
}

/// `b` with its checksum made right.
fn reseal(mut b: Vec<u8>) -> Vec<u8> {
    if b.len() >= 4 {
        let at = b.len() - 4;
        let crc = crc32(&b[..at]);
        b[at..].copy_from_slice(&crc.to_be_bytes());
    }
    b
}

#[test]
fn every_committed_transfer_decode_input_passes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/transfer_decode");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return; // none found so far
    };
    for e in entries {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "txt") {
            continue;
        }
        let described = std::path::PathBuf::from(format!("{}.txt", path.display()));
        assert!(described.is_file(), "{} has no description", path.display());
        check_transfer(&std::fs::read(&path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[test]
fn mutations_of_a_transfer_keep_the_property() {
    let b = sample();
    check_transfer(&b).unwrap();
    assert!(transfer::decode(&b).is_ok());
    for n in 0..b.len() {
        check_transfer(&b[..n]).unwrap();
        check_transfer(&reseal(b[..n].to_vec())).unwrap();
    }
    for i in 0..b.len() - 4 {
        for v in [0x00, 0x01, 0x7f, 0x80, 0xff] {
            let mut x = b.clone();
            x[i] = v;
            check_transfer(&reseal(x)).unwrap_or_else(|e| panic!("byte {i} = {v:#x}: {e}"));
        }
    }
    // Seeded damage: several bytes at once, inserted and removed bytes.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..20_000 {
        let mut x = b[..b.len() - 4].to_vec();
        for _ in 0..1 + next() % 4 {
            let at = (next() % x.len() as u64) as usize;
            match next() % 3 {
                0 => x[at] = next() as u8,
                1 => x.insert(at, next() as u8),
                _ => {
                    x.remove(at);
                }
            }
        }
        x.extend_from_slice(&[0; 4]);
        check_transfer(&reseal(x)).unwrap();
    }
}
