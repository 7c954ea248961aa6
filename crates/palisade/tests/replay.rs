//! Golden tests of `palisade replay`: committed captures, policies and
//! topology, replayed through the real binary, compared with committed JSON.
//!
//! `UPDATE_GOLDEN=1 cargo test -p palisade --test replay` rewrites the
//! captures (from the generator in `replay_gen`) and the expected outputs;
//! review the diff by hand before committing it.

mod replay_gen;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn three_tier() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/three-tier")
}

fn update() -> bool {
    std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1")
}

fn replay(pcap: &Path, extra: &[&str]) -> Output {
    let g = golden();
    Command::new(env!("CARGO_BIN_EXE_palisade"))
        .arg("replay")
        .arg("--policy")
        .arg(three_tier())
        .arg("--topology")
        .arg(g.join("hv1.json"))
        .arg("--pcap")
        .arg(pcap)
        .args(extra)
        .output()
        .unwrap()
}

fn extra_args(name: &str) -> Vec<String> {
    match name {
        "policy-change" => vec![
            "--policy-change".into(),
            format!("7:{}", golden().join("three-tier-v2").display()),
        ],
        _ => Vec::new(),
    }
}

#[test]
fn regenerating_the_captures_gives_the_committed_bytes() {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("replay-gen");
    std::fs::create_dir_all(&tmp).unwrap();
    for (name, frames) in replay_gen::scenarios() {
        let committed = golden().join(format!("{name}.pcap"));
        if update() {
            replay_gen::write_pcap(&committed, &frames);
        }
        let fresh = tmp.join(format!("{name}.pcap"));
        replay_gen::write_pcap(&fresh, &frames);
        assert_eq!(
            std::fs::read(&fresh).unwrap(),
            std::fs::read(&committed).unwrap(),
            "{name}.pcap differs from the generator's output (UPDATE_GOLDEN=1 rewrites it)"
        );
    }
}

#[test]
fn replays_match_the_golden_outputs() {
    for (name, _) in replay_gen::scenarios() {
        let extra = extra_args(name);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let mut args = vec!["--json"];
        args.extend(extra);
        let out = replay(&golden().join(format!("{name}.pcap")), &args);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let expected = golden().join(format!("{name}.json"));
        if update() {
            std::fs::write(&expected, &out.stdout).unwrap();
        }
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let want: serde_json::Value = serde_json::from_slice(&std::fs::read(&expected).unwrap()).unwrap();
        assert_eq!(got, want, "{name}: output differs from {}", expected.display());
    }
}

#[test]
fn the_table_shows_flows_drop_reasons_and_counters() {
    let out = replay(&golden().join("tcp.pcap"), &[]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("host hv1, policy version 1, 17 packets"), "{text}");
    assert!(
        text.contains("10.0.9.10:40000 -> 10.0.9.53:53"),
        "the DNS-over-TCP flow: {text}"
    );
    assert!(text.contains("datacenter/dc-dns"), "{text}");
    assert!(text.contains("tcp-out-of-window"), "{text}");
    assert!(text.contains("classifications"), "{text}");
}

/// Frames that arrive over VXLAN are reported by their inner flow (the
/// one the engine decided), never by the outer tunnel packet.
#[test]
fn overlay_arrivals_are_reported_by_their_inner_flow() {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("replay-overlay");
    std::fs::create_dir_all(&tmp).unwrap();
    let pcap = tmp.join("overlay.pcap");
    replay_gen::write_pcap(&pcap, &replay_gen::overlay_scenario());
    let out = replay(&pcap, &["--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let flows = report["flows"].as_array().unwrap();
    let row = |src: &str, dst: &str, proto: &str| {
        flows
            .iter()
            .find(|f| f["src"] == src && f["dst"] == dst && f["proto"] == proto)
            .unwrap_or_else(|| panic!("no {proto} row {src} -> {dst} in {flows:#?}"))
    };
    assert!(
        flows.iter().all(|f| f["src"] != "192.168.0.2"),
        "a row shows the tunnel: {flows:#?}"
    );
    let answer = row("10.0.9.53", "10.0.9.10", "udp");
    assert_eq!(
        (answer["src_port"].as_u64(), answer["dst_port"].as_u64()),
        (Some(53), Some(44000))
    );
    assert_eq!(answer["segment"], "vlan 900", "{answer:#}");
    let error = row("10.0.9.53", "10.0.9.10", "icmp");
    assert_eq!(error["quotes"], "udp 10.0.9.10:44001 -> 10.0.9.53:53", "{error:#}");
    assert_eq!(error["verdict"], "forward");
}

/// `--packets` reports every packet's verdict in capture order, with the
/// row it belongs to.
#[test]
fn packets_lists_every_verdict_in_order() {
    let out = replay(&golden().join("tcp.pcap"), &["--json", "--packets"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packets = report["per_packet"].as_array().unwrap();
    assert_eq!(packets.len() as u64, report["packets"].as_u64().unwrap());
    for (i, p) in packets.iter().enumerate() {
        assert_eq!(p["n"].as_u64(), Some(i as u64 + 1));
        let row = &report["flows"][p["flow"].as_u64().unwrap() as usize];
        assert!(row.is_object(), "packet {i} names no row");
        assert!(matches!(p["verdict"].as_str(), Some("forward" | "drop")));
        assert_eq!(p["reason"].is_string(), p["verdict"] == "drop", "{p}");
    }
    assert_eq!(packets[0]["port"], "bastion-1.0");
    assert_eq!(packets[1]["port"], "uplink");
    let reasons: Vec<&str> = packets.iter().filter_map(|p| p["reason"].as_str()).collect();
    assert_eq!(reasons, ["tcp-out-of-window", "policy-deny"]);
    // Without the flag, no per-packet list; as a table, one line per packet.
    let out = replay(&golden().join("tcp.pcap"), &["--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report.get("per_packet").is_none());
    let out = replay(&golden().join("tcp.pcap"), &["--packets"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("PACKET  PORT"), "{text}");
    assert!(
        text.contains("     16  bastion-1.0    drop: tcp-out-of-window"),
        "{text}"
    );
}

fn fails_with(args: &[&str], needle: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_palisade"))
        .arg("replay")
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: expected {needle:?} in {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_inputs_are_clear_errors() {
    let g = golden();
    let tt = three_tier();
    let (tt, topo, pcap) = (tt.to_str().unwrap(), g.join("hv1.json"), g.join("tcp.pcap"));
    let (topo, pcap) = (topo.to_str().unwrap(), pcap.to_str().unwrap());
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("replay-bad");
    std::fs::create_dir_all(&tmp).unwrap();

    fails_with(
        &["--policy", tt, "--topology", topo, "--pcap", "/nonexistent.pcap"],
        "/nonexistent.pcap",
    );
    fails_with(
        &["--policy", "/nonexistent", "--topology", topo, "--pcap", pcap],
        "/nonexistent",
    );

    // An invalid policy: its diagnostics are printed.
    let bad_policy = tmp.join("bad-policy");
    std::fs::create_dir_all(&bad_policy).unwrap();
    std::fs::write(
        bad_policy.join("policy.yaml"),
        "datacenter: { name: dc1, default: maybe }\n",
    )
    .unwrap();
    fails_with(
        &[
            "--policy",
            bad_policy.to_str().unwrap(),
            "--topology",
            topo,
            "--pcap",
            pcap,
        ],
        "policy.yaml",
    );

    // A topology naming a vNIC the inventory does not have.
    let bad_topo = tmp.join("bad-topo.json");
    let text = std::fs::read_to_string(g.join("hv1.json"))
        .unwrap()
        .replace("\"bastion-1.0\"", "\"nope-1.0\"");
    std::fs::write(&bad_topo, text).unwrap();
    fails_with(
        &["--policy", tt, "--topology", bad_topo.to_str().unwrap(), "--pcap", pcap],
        "nope-1.0",
    );

    // A capture cut in the middle of a packet.
    let cut = tmp.join("cut.pcap");
    let bytes = std::fs::read(pcap).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    fails_with(
        &["--policy", tt, "--topology", topo, "--pcap", cut.to_str().unwrap()],
        "cut.pcap",
    );

    // A policy change beyond the end of the capture.
    let v2 = format!("99:{}", g.join("three-tier-v2").display());
    fails_with(
        &[
            "--policy",
            tt,
            "--topology",
            topo,
            "--pcap",
            pcap,
            "--policy-change",
            &v2,
        ],
        "only 17 packets",
    );
}
