//! Replays every input the inspect fuzz targets ever failed on
//! (`fuzz/regressions/inspect_*/`, each with a `NAME.txt` saying what it
//! found), and runs the same properties on generated inputs, so they are
//! checked on every test run and not only when fuzzing.

mod props;

use std::path::Path;

fn replay(target: &str, prop: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/regressions")
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else { return 0 };
    let mut n = 0;
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "txt") {
            continue;
        }
        let data = std::fs::read(&p).unwrap();
        let txt = p.with_extension("txt");
        assert!(txt.exists(), "{} has no description ({})", p.display(), txt.display());
        prop(&data);
        n += 1;
    }
    n
}

#[test]
fn committed_crash_inputs_pass() {
    for (target, prop) in [
        ("inspect_rules", props::rules as fn(&[u8])),
        ("inspect_stream", props::stream),
        ("inspect_app", props::app),
        ("inspect_engine", props::engine),
        ("inspect_threshold_config", props::threshold_config),
        ("inspect_persist", props::persist),
    ] {
        replay(target, prop);
    }
}

/// Deterministic pseudo-random inputs: the properties hold beyond the corpus.
#[test]
fn properties_hold_on_generated_inputs() {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let seeds: &[&[u8]] = &[
        b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n",
        b"alert tcp any any -> any any (content:\"a\"; depth:4; pcre:\"/b+/R\"; sid:1;)\n",
        b"\x16\x03\x01\x00\x30\x01\x00\x00\x2c\x03\x03",
        b"\x00\x1d\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x04evil\x03com\x00\x00\x01\x00\x01",
        b"suppress gen_id 1, sig_id 2, track by_either, ip [10.0.0.0/8,!10.1.0.0/16]\nthreshold gen_id 0, sig_id 0, type both, track by_dst, count 2, seconds 9\n",
    ];
    for round in 0..300 {
        let seed = seeds[round % seeds.len()];
        let mut data = seed.to_vec();
        for _ in 0..(next() % 8) {
            let i = (next() as usize) % (data.len() + 1);
            match next() % 3 {
                0 if i < data.len() => data[i] = next() as u8,
                1 => data.insert(i, next() as u8),
                _ if i < data.len() => {
                    data.remove(i);
                }
                _ => {}
            }
        }
        props::app(&data);
        props::rules(&data);
        props::threshold_config(&data);
        let bytes: Vec<u8> = (0..(next() % 400)).map(|_| next() as u8).collect();
        props::stream(&bytes);
        props::engine(&bytes);
        props::persist(&bytes);
    }
}
