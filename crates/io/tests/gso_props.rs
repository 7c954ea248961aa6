//! Software segmentation and coalescing: table cases and properties
//! (`tests/support/gso_props.rs` holds the checks, shared with the fuzz target).

#[path = "support/gso_props.rs"]
mod props;

use palisade_io::Offload;
use palisade_io::gso::{self, Coalescer, GsoError};
use props::{
    ACK, CWR, ECE, FIN, PSH, SYN, Spec, build, check_coalesce, check_round_trip, check_segment, coalesce, fix_checksums,
};
use proptest::prelude::*;

/// Segments of a spec, with their VXLAN prefix.
fn segments(spec: &Spec) -> Vec<Vec<u8>> {
    let (f, o) = build(spec);
    check_segment(&f, &o, &spec.prefix).unwrap()
}

#[test]
fn a_64k_tso_frame_round_trips_v4_and_v6_with_tags_and_ecn() {
    let cases = [
        ("v4", Spec::default()),
        (
            "v6",
            Spec {
                v6: true,
                ..Spec::default()
            },
        ),
        (
            "v4, two tags",
            Spec {
                tags: 2,
                ..Spec::default()
            },
        ),
        (
            "v4, CWR+ECE+PSH",
            Spec {
                flags: ACK | CWR | ECE | PSH,
                ..Spec::default()
            },
        ),
        (
            "v6, no options, odd segment",
            Spec {
                v6: true,
                tcp_option_words: 0,
                segment_size: 1001,
                ..Spec::default()
            },
        ),
        (
            "exactly 45 full segments",
            Spec {
                payload_len: 45 * 1448,
                ..Spec::default()
            },
        ),
        (
            "ip id wraps",
            Spec {
                ident: 0xfffe,
                ..Spec::default()
            },
        ),
        (
            "seq wraps",
            Spec {
                seq: u32::MAX - 3000,
                ..Spec::default()
            },
        ),
        (
            "one segment",
            Spec {
                payload_len: 100,
                ..Spec::default()
            },
        ),
    ];
    for (what, spec) in cases {
        check_round_trip(&spec).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
}

#[test]
fn segment_flags_follow_the_kernel() {
    // FIN and PSH on the last segment only, CWR on the first only, ECE on all.
    let spec = Spec {
        flags: ACK | FIN | PSH | CWR | ECE,
        payload_len: 3000,
        segment_size: 1000,
        ..Spec::default()
    };
    let segs = segments(&spec);
    let flags: Vec<u8> = segs.iter().map(|s| s[8 + 14 + 20 + 13]).collect();
    assert_eq!(flags, [ACK | CWR | ECE, ACK | ECE, ACK | FIN | PSH | ECE]);
}

#[test]
fn udp_segmentation_gives_datagrams() {
    for v6 in [false, true] {
        let spec = Spec {
            udp: true,
            v6,
            payload_len: 5000,
            segment_size: 1200,
            ..Spec::default()
        };
        let segs = segments(&spec);
        assert_eq!(segs.len(), 5);
        // UDP segments are never merged back: each comes out as it went in.
        let out = check_coalesce(&segs, 8).unwrap();
        assert!(out.iter().all(|(_, o)| o.is_plain()));
    }
}

#[test]
fn ip_options_are_repeated_but_not_merged() {
    let spec = Spec {
        ip_option_words: 2,
        payload_len: 4000,
        ..Spec::default()
    };
    let segs = segments(&spec);
    let out = check_coalesce(&segs, 8).unwrap();
    assert_eq!(out.len(), segs.len(), "IPv4 options: nothing merged");
}

/// Table of what the coalescer must not merge: (what, change to the second
/// of three segments (checksums fixed afterwards), segments out).
#[test]
fn merging_refuses_what_would_change_meaning() {
    let spec = Spec {
        payload_len: 3 * 1448,
        ..Spec::default()
    };
    let base = segments(&spec);
    assert_eq!(coalesce(&base, 8).len(), 1, "three plain segments merge");
    let l3 = 8 + 14;
    let l4 = l3 + 20;
    type Change = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Change, usize)> = vec![
        ("other VXLAN group", Box::new(|p: &mut Vec<u8>| p[3] ^= 1), 3),
        ("other VNI", Box::new(|p: &mut Vec<u8>| p[6] ^= 1), 3),
        ("other source MAC", Box::new(|p: &mut Vec<u8>| p[8 + 11] ^= 1), 3),
        ("other TOS (ECN CE)", Box::new(move |p: &mut Vec<u8>| p[l3 + 1] |= 3), 3),
        ("other TTL", Box::new(move |p: &mut Vec<u8>| p[l3 + 8] -= 1), 3),
        ("DF cleared", Box::new(move |p: &mut Vec<u8>| p[l3 + 6] &= !0x40), 3),
        (
            "IP id not consecutive",
            Box::new(move |p: &mut Vec<u8>| p[l3 + 5] ^= 0x10),
            3,
        ),
        ("other ack", Box::new(move |p: &mut Vec<u8>| p[l4 + 11] ^= 1), 3),
        ("other window", Box::new(move |p: &mut Vec<u8>| p[l4 + 15] ^= 1), 3),
        ("other timestamp", Box::new(move |p: &mut Vec<u8>| p[l4 + 27] ^= 1), 3),
        ("sequence gap", Box::new(move |p: &mut Vec<u8>| p[l4 + 7] ^= 0x40), 3),
        ("FIN", Box::new(move |p: &mut Vec<u8>| p[l4 + 13] |= FIN), 3),
        ("SYN", Box::new(move |p: &mut Vec<u8>| p[l4 + 13] |= SYN), 3),
        ("URG", Box::new(move |p: &mut Vec<u8>| p[l4 + 13] |= 0x20), 3),
        ("RST", Box::new(move |p: &mut Vec<u8>| p[l4 + 13] |= 0x04), 3),
        ("ECE only here", Box::new(move |p: &mut Vec<u8>| p[l4 + 13] |= ECE), 3),
        ("CWR not first", Box::new(move |p: &mut Vec<u8>| p[l4 + 13] |= CWR), 2),
        (
            "PSH ends the run",
            Box::new(move |p: &mut Vec<u8>| p[l4 + 13] |= PSH),
            2,
        ),
        (
            "shorter segment ends the run",
            Box::new(|p: &mut Vec<u8>| p.truncate(p.len() - 100)),
            2,
        ),
    ];
    for (what, change, want) in cases {
        let mut pkts = base.clone();
        change(&mut pkts[1]);
        if what == "shorter segment ends the run" {
            // The IP length must follow the shorter payload.
            let total = (pkts[1].len() - l3) as u16;
            pkts[1][l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
        }
        if what == "sequence gap" || what == "IP id not consecutive" {
            // The third must not follow the second either: restore nothing, expect 3.
        }
        fix_checksums(&mut pkts[1], 8);
        let out = check_coalesce(&pkts, 8).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(out.len(), want, "{what}: {} frames out", out.len());
    }
}

#[test]
fn corrupt_segments_are_not_merged_and_keep_their_bad_checksum() {
    let spec = Spec {
        payload_len: 3 * 1448,
        ..Spec::default()
    };
    let mut pkts = segments(&spec);
    let n = pkts[1].len();
    pkts[1][n - 1] ^= 0xff;
    let mut c = Coalescer::new(8);
    let mut out = Vec::new();
    for p in &pkts {
        c.push(p, &mut |b, o| out.push((b.to_vec(), *o)));
    }
    c.flush(&mut |b, o| out.push((b.to_vec(), *o)));
    assert_eq!(out.len(), 3);
    assert_eq!(out[1].0, pkts[1], "the corrupt segment goes on unchanged");
    assert!(out.iter().all(|(_, o)| o.gso.is_none()));
    assert_eq!(c.stats().bad_checksums, 1);
    check_coalesce(&pkts, 8).unwrap();
}

#[test]
fn interleaved_flows_merge_separately_and_keep_their_order() {
    let a = segments(&Spec {
        flow: 1,
        payload_len: 10 * 1448,
        ..Spec::default()
    });
    let b = segments(&Spec {
        flow: 2,
        payload_len: 7 * 1448,
        v6: true,
        ..Spec::default()
    });
    let mut mixed = Vec::new();
    for i in 0..10 {
        mixed.push(a[i].clone());
        if i < b.len() {
            mixed.push(b[i].clone());
        }
    }
    let out = check_coalesce(&mixed, 8).unwrap();
    assert_eq!(out.len(), 2, "one super-frame per flow");
    // More flows than runs: still correct, less merged.
    let many: Vec<Vec<u8>> = (0..12u8)
        .map(|f| {
            segments(&Spec {
                flow: f,
                payload_len: 2 * 1448,
                ..Spec::default()
            })
        })
        .flat_map(|s| s.into_iter())
        .collect();
    check_coalesce(&many, 8).unwrap();
}

#[test]
fn segmenting_refuses_with_a_reason() {
    let (frame, offload) = build(&Spec {
        flags: ACK | SYN,
        ..Spec::default()
    });
    assert!(matches!(
        gso::segment(&frame, &offload, &[], &mut Vec::new(), 1 << 22),
        Err(GsoError::Flags(_))
    ));
    let (frame, _) = build(&Spec::default());
    let ufo = Offload {
        gso: Some(palisade_wire::virtio_net::Gso {
            kind: palisade_wire::virtio_net::GsoKind::Ufo,
            ecn: false,
            size: 1000,
            header_len: 0,
        }),
        ..Offload::NONE
    };
    assert!(matches!(
        gso::segment(&frame, &ufo, &[], &mut Vec::new(), 1 << 22),
        Err(GsoError::Unsupported(_))
    ));
    // A one-byte segment size on 64 KB: 65k packets, more than a caller's limit.
    let (frame, offload) = build(&Spec {
        segment_size: 1,
        ..Spec::default()
    });
    assert!(matches!(
        gso::segment(&frame, &offload, &[0; 8], &mut Vec::new(), 1 << 20),
        Err(GsoError::TooLarge { .. })
    ));
    // Cut short: the IP length no longer matches.
    let (mut frame, offload) = build(&Spec::default());
    frame.truncate(frame.len() - 1);
    assert!(gso::segment(&frame, &offload, &[], &mut Vec::new(), 1 << 22).is_err());
}

fn spec_strategy() -> impl Strategy<Value = Spec> {
    (
        (any::<bool>(), any::<bool>(), 0u8..3, 0u8..11, 0u8..11),
        prop_oneof![
            Just(ACK),
            Just(ACK | PSH),
            Just(ACK | CWR),
            Just(ACK | ECE | CWR | PSH),
            Just(ACK | FIN),
            Just(ACK | FIN | PSH)
        ],
        (1u16..3000, 1usize..70_000),
        (
            any::<u32>(),
            any::<u32>(),
            any::<u16>(),
            any::<u8>(),
            any::<u8>(),
            any::<u16>(),
            0u8..4,
            any::<u8>(),
        ),
    )
        .prop_map(
            |(
                (v6, udp, tags, ipo, tcpo),
                flags,
                (segment_size, payload_len),
                (seq, ack, ident, tos, ttl, window, flow, seed),
            )| {
                Spec {
                    v6,
                    udp: udp && !v6 && ipo == 0,
                    tags,
                    ip_option_words: ipo,
                    tcp_option_words: tcpo,
                    flags,
                    segment_size,
                    payload_len,
                    seq,
                    ack,
                    ident,
                    tos,
                    ttl,
                    window,
                    flow,
                    prefix: [0x88, 0, 0, 1, 0, 0, 0x0a, 0],
                    seed,
                }
                .clamp()
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Cut then merged: every segment valid, the super-frame back when mergeable.
    #[test]
    fn segment_then_coalesce_gives_the_super_frame_back(spec in spec_strategy()) {
        if let Err(e) = check_round_trip(&spec) {
            prop_assert!(false, "{e}\n{spec:?}");
        }
    }

    /// Any damage to a stream of segments: the coalescer keeps every packet, per-flow order,
    /// and only merges what cuts back into the same packets.
    #[test]
    fn coalescing_never_changes_the_packets(program in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Err(e) = props::run_program(&program) {
            prop_assert!(false, "{e}");
        }
    }
}

#[test]
fn fuzz_regressions_replay() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/gso");
    let Ok(entries) = std::fs::read_dir(&dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "txt") {
            continue;
        }
        let data = std::fs::read(&p).unwrap();
        props::run_program(&data).unwrap_or_else(|err| panic!("{}: {err}", p.display()));
    }
}
