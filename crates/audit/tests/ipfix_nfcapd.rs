//! Interop: nfdump's collector (`nfcapd`) receives Palisade's IPFIX export, and
//! `nfdump` shows the same addresses, ports, protocols, packets and bytes as
//! the flow records sent, one nfdump flow per direction (see the mapping in
//! `palisade_audit::ipfix`).
//!
//! Needs `nfcapd` and `nfdump` (Debian package `nfdump`); without them the test
//! is skipped with a message, unless `CI` is set, where it fails.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use palisade_audit::ipfix::IpfixExporter;
use palisade_audit::record::{Decision, EndReason, Endpoint, FlowRecord, Phase, Verdict, VmIdentity};

/// The nfdump view of one direction: source, destination, ports, protocol,
/// packets, bytes, duration in milliseconds.
type View = (IpAddr, IpAddr, u16, u16, u8, u64, u64, u64);

fn is_icmp(protocol: u8) -> bool {
    protocol == 1 || protocol == 58
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// A running nfcapd and its temporary directory, both removed on drop (also when
/// the test fails).
struct Nfcapd {
    child: Option<Child>,
    dir: PathBuf,
}

impl Nfcapd {
    fn flows(&self) -> PathBuf {
        self.dir.join("flows")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nfcapd.log")).unwrap_or_default()
    }

    /// Stop with SIGTERM, so nfcapd writes and closes its current file.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        // The shell's builtin kill: no signal crate needed, and `sh` is always there.
        let status = Command::new("sh")
            .args(["-c", "kill -TERM \"$1\"", "sh", &child.id().to_string()])
            .status()
            .expect("running sh -c kill");
        assert!(status.success(), "kill -TERM nfcapd failed");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match child.try_wait().expect("waiting for nfcapd") {
                Some(_) => return,
                None if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("nfcapd did not stop on SIGTERM; log:\n{}", self.log());
                }
                None => sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for Nfcapd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_nfcapd(port: u16) -> Nfcapd {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    let dir = std::env::temp_dir().join(format!("palisade-ipfix-nfcapd-{}-{nanos}", std::process::id()));
    let mut cap = Nfcapd { child: None, dir };
    std::fs::create_dir_all(cap.flows()).unwrap();
    let log = std::fs::File::create(cap.dir.join("nfcapd.log")).unwrap();
    let child = Command::new("nfcapd")
        .arg("-w")
        .arg(cap.flows())
        .args(["-b", "127.0.0.1", "-p", &port.to_string(), "-t", "3600"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting nfcapd");
    cap.child = Some(child);
    // nfcapd creates its current file once its socket is bound.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !has_file(&cap.flows(), "nfcapd.current") {
        assert!(Instant::now() < deadline, "nfcapd did not start; log:\n{}", cap.log());
        sleep(Duration::from_millis(50));
    }
    cap
}

fn has_file(dir: &Path, prefix: &str) -> bool {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(prefix))
        })
        .unwrap_or(false)
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn vm(name: &str, zone: &str) -> Option<VmIdentity> {
    Some(VmIdentity {
        name: name.into(),
        uuid: format!("uuid-{name}"),
        vnic: format!("{name}.0"),
        zone: zone.into(),
        cluster: Some("prod".into()),
        host: Some("hv1".into()),
        tags: Default::default(),
    })
}

/// ~50 varied records: IPv4 and IPv6; TCP, UDP, ICMP; allowed with reverse
/// traffic and denied without; counts up to terabytes; long VM names.
fn records(now_ns: u64) -> Vec<FlowRecord> {
    let mut out = Vec::new();
    for i in 0..50u64 {
        let v6 = i % 3 == 0;
        let (src, dst): (IpAddr, IpAddr) = if v6 {
            (
                Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, i as u16 + 1).into(),
                Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0xabcd, i as u16).into(),
            )
        } else {
            (
                Ipv4Addr::new(10, 0, (i / 7) as u8, i as u8 + 1).into(),
                Ipv4Addr::new(198, 51, 100, 200 - i as u8).into(),
            )
        };
        let protocol = match i % 5 {
            0 | 1 => 6,
            2 | 3 => 17,
            _ => {
                if v6 {
                    58
                } else {
                    1
                }
            }
        };
        let (sport, dport) = if protocol == 1 || protocol == 58 {
            // Echo: both ends carry the identifier.
            (0x1200 + i as u16, 0x1200 + i as u16)
        } else {
            (32768 + i as u16 * 97, [443, 53, 22, 8080, 5432][i as usize % 5])
        };
        let denied = i % 4 == 3;
        let big = i % 6 == 1;
        let scale = if big { 1_000_000_000 } else { 1 };
        let start_ns = now_ns - 60_000_000_000 + i * 1_000_000;
        out.push(FlowRecord {
            appliance: None,
            time_ns: now_ns,
            flow_id: 1000 + i,
            host: "hv1".into(),
            phase: if denied {
                Phase::Start
            } else {
                [Phase::Start, Phase::Update, Phase::End(EndReason::Fin)][i as usize % 3]
            },
            src: Endpoint {
                addr: src,
                port: sport,
                vm: vm(&format!("web-{i}-{}", "n".repeat(i as usize * 3)), "web"),
            },
            dst: Endpoint {
                addr: dst,
                port: dport,
                vm: if i % 2 == 0 { vm(&format!("db-{i}"), "db") } else { None },
            },
            protocol,
            icmp: None,
            verdict: if denied { Verdict::Deny } else { Verdict::Allow },
            decided_by: vec![Decision {
                rule: format!("rule-{i}"),
                level: "zone".into(),
                policy_version: 7,
                chain: "egress".into(),
            }],
            packets_out: (i + 1) * 3 * scale,
            bytes_out: (i + 1) * 1500 * scale + 17,
            packets_in: if denied { 0 } else { (i + 1) * 2 },
            bytes_in: if denied { 0 } else { (i + 1) * 4000 * scale + 3 },
            start_ns,
            last_ns: start_ns + (i + 1) * 123_456_789,
        });
    }
    out
}

/// The nfdump view of `r` under the documented mapping: one flow initiator →
/// responder with the out counts, one responder → initiator with the in counts
/// when there were any.
fn expected_views(r: &FlowRecord) -> Vec<View> {
    let duration_ms = r.last_ns / 1_000_000 - r.start_ns / 1_000_000;
    // nfdump shows ICMP's type and code in the port columns (source port 0), and
    // a FlowRecord has no type or code: ICMP ports are not compared (see `normalize`).
    let ports = |a: u16, b: u16| if is_icmp(r.protocol) { (0, 0) } else { (a, b) };
    let (sp, dp) = ports(r.src.port, r.dst.port);
    let mut v = vec![(
        r.src.addr,
        r.dst.addr,
        sp,
        dp,
        r.protocol,
        r.packets_out,
        r.bytes_out,
        duration_ms,
    )];
    if r.packets_in != 0 || r.bytes_in != 0 {
        let (sp, dp) = ports(r.dst.port, r.src.port);
        v.push((
            r.dst.addr,
            r.src.addr,
            sp,
            dp,
            r.protocol,
            r.packets_in,
            r.bytes_in,
            duration_ms,
        ));
    }
    v
}

/// nfdump prints the protocol by name for the common ones.
fn protocol(s: &str) -> Option<u8> {
    match s {
        "TCP" => Some(6),
        "UDP" => Some(17),
        "ICMP" => Some(1),
        "ICMP6" => Some(58),
        n => n.parse().ok(),
    }
}

/// One `nfdump -o csv -q -N` line (nfdump 1.7 columns: ts, te, td, sa, da, sp,
/// dp, pr, flg, fwd, stos, ipkt, ibyt, ...) as a view; ICMP's destination port
/// (nfdump's type/code) is zeroed, its source port kept (nfdump shows 0).
fn parse_view(l: &str) -> View {
    let f: Vec<&str> = l.split(',').map(str::trim).collect();
    assert!(f.len() > 12, "unexpected nfdump line {l:?}");
    let num = |s: &str| s.parse::<u64>().unwrap_or_else(|e| panic!("{s:?} in {l:?}: {e}"));
    let addr = |s: &str| s.parse::<IpAddr>().unwrap_or_else(|e| panic!("{s:?} in {l:?}: {e}"));
    let td: f64 = f[2].parse().unwrap_or_else(|e| panic!("{:?} in {l:?}: {e}", f[2]));
    let pr = protocol(f[7]).unwrap_or_else(|| panic!("protocol {:?} in {l:?}", f[7]));
    let dp = if is_icmp(pr) { 0 } else { num(f[6]) as u16 };
    (
        addr(f[3]),
        addr(f[4]),
        num(f[5]) as u16,
        dp,
        pr,
        num(f[11]),
        num(f[12]),
        (td * 1000.0).round() as u64,
    )
}

fn parse_views(text: &str) -> Vec<View> {
    text.lines().filter(|l| !l.trim().is_empty()).map(parse_view).collect()
}

fn counted(views: impl IntoIterator<Item = View>) -> BTreeMap<View, usize> {
    let mut m = BTreeMap::new();
    for v in views {
        *m.entry(v).or_insert(0) += 1;
    }
    m
}

#[test]
fn nfdump_reads_what_palisade_exports() {
    if !have("nfcapd") || !have("nfdump") {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but nfcapd/nfdump are missing (install the nfdump package)"
        );
        eprintln!("skipping nfdump interop test: nfcapd/nfdump not installed (Debian package nfdump)");
        return;
    }
    let port = free_udp_port();
    let mut cap = start_nfcapd(port);

    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let now_s = now.as_secs() as u32;
    let records = records(now.as_nanos() as u64);
    let mut exporter = IpfixExporter::connect(([127, 0, 0, 1], port).into(), 7).unwrap();
    for r in &records {
        exporter.export(r, now_s).unwrap();
    }
    exporter.flush(now_s).unwrap();
    let stats = exporter.stats();
    assert_eq!(stats.records_exported, records.len() as u64);
    assert_eq!(stats.send_errors, 0);
    // UDP has no acknowledgement: give nfcapd a moment to read its socket.
    sleep(Duration::from_millis(500));
    cap.stop();

    let out = Command::new("nfdump")
        .arg("-R")
        .arg(cap.flows())
        .args(["-q", "-N", "-o", "csv"])
        .output()
        .expect("running nfdump");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "nfdump failed: {}\n{stdout}\nnfcapd log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        cap.log()
    );
    let got = counted(parse_views(&stdout));
    let want = counted(records.iter().flat_map(expected_views));
    assert_eq!(
        stats.data_records_sent,
        want.values().sum::<usize>() as u64,
        "exporter sent one IPFIX record per direction"
    );
    if got != want {
        let missing: Vec<_> = want.iter().filter(|(k, n)| got.get(*k) != Some(n)).collect();
        let extra: Vec<_> = got.iter().filter(|(k, n)| want.get(*k) != Some(n)).collect();
        panic!(
            "nfdump's view differs.\nexpected but not seen: {missing:#?}\nseen but not expected: {extra:#?}\n\
             nfdump output:\n{stdout}\nnfcapd log:\n{}",
            cap.log()
        );
    }
}
