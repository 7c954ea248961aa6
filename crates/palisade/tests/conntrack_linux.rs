//! Palisade's TCP connection tracking against Linux netfilter's, packet by
//! packet, on the TCP traffic of the shared captures (`../shared/pcaps`).
//!
//! Each capture's TCP packets (complete, unfragmented, over IPv4 or IPv6,
//! whatever the link layer) are replayed through both, in two modes:
//! - **strict**: a Palisade zone listed in `strict_zones`, against Linux with
//!   `nf_conntrack_tcp_loose=0` and `nf_conntrack_tcp_be_liberal=0`;
//! - **liberal**: a Palisade zone by default, against `loose=1` and `be_liberal=1`.
//!
//! The policy is the same on both sides: the capture's *client* (the sender
//! of its first SYN, else of its first TCP packet) may open TCP connections
//! to anyone; nothing else may open one. For Palisade that is a policy whose
//! only vNIC is the client's (`palisade replay --packets`, the other hosts
//! behind the uplink); for Linux, nftables in a network namespace that routes
//! every packet from one TAP to another:
//!
//! ```text
//! ct state established,related accept; ct state invalid drop;
//! ip saddr CLIENT ct state new accept; (policy drop)
//! ```
//!
//! Linux's verdict on a packet is whether it comes out of the second TAP;
//! after each packet a marker datagram (untracked, always forwarded) says
//! when everything before it has come through. Those sysctls, and
//! `nf_conntrack_checksum=0` (captures taken on hosts with checksum offload
//! carry bad TCP checksums; Palisade does not verify them either), are per
//! network namespace: each capture and mode gets a fresh namespace, so no
//! connection survives from one to the next, and the host's settings are
//! never touched. (`nf_conntrack_max` and `nf_conntrack_buckets` are global,
//! read-only in a namespace; their defaults are far above what one capture
//! needs.) The packets are the same bytes on both sides, with the IP TTL set
//! to 64 so that Linux forwards them, and timestamps 1 µs apart on Palisade's
//! side (Linux sees them within milliseconds): timeouts never decide.
//!
//! The test prints the agreement of each mode and every difference, and
//! requires 99.9% in each. To stay short in CI it leaves out the captures
//! with more than [`CI_MAX_PACKETS`] TCP packets (one Zeek capture holds
//! 82,000 of the corpus's 115,000); `PALISADE_CT_FULL=1` takes them all, as
//! `bench/conntrack-vs-linux.sh` does, which keeps the report;
//! `bench/README.md` explains each remaining difference. Needs root,
//! iproute2 and nftables; outside CI it is skipped when they are missing, in
//! CI it must run. `PALISADE_CT_CAPTURES=SUBSTRING` limits it to the
//! captures whose path contains the substring (the agreement is then
//! printed, not required); `PALISADE_CT_REPORT=FILE` also writes the report
//! there.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use palisade_io::capture::{CaptureReader, CaptureWriter, LinkPayload, LinkType, strip_link_header};
use palisade_io::port::{FramePort, wait_readable};
use palisade_io::tap::Tap;
use palisade_wire::ethernet::{self, EtherType};
use palisade_wire::flow::{self, Fragment, Segment};
use palisade_wire::ip::IpProtocol;
use palisade_wire::tcp::{self, TcpFlags};
use palisade_wire::{ipv4, vlan};

const EXE: &str = env!("CARGO_BIN_EXE_palisade");
const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/pcaps");

/// The client's vNIC MAC on Palisade's side; the rest of the world's MAC.
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const WORLD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
/// The zone's VLAN: frames from the uplink carry it.
const ZONE_VLAN: u16 = 10;

/// The router namespace's interfaces' MACs and the next hop's.
const IN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xaa, 0x01];
const OUT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xaa, 0x02];
const NEXT_HOP_MAC: &str = "02:00:00:00:aa:fe";
/// The marker datagrams' addresses: untracked, always forwarded.
const MARKER_SRC: [u8; 4] = [198, 18, 255, 1];
const MARKER_DST: [u8; 4] = [198, 18, 255, 2];

/// Captures with more TCP packets than this are left out unless `PALISADE_CT_FULL=1`.
const CI_MAX_PACKETS: usize = 5_000;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Mode {
    Strict,
    Liberal,
}

impl Mode {
    const ALL: [Mode; 2] = [Mode::Strict, Mode::Liberal];

    fn name(self) -> &'static str {
        match self {
            Mode::Strict => "strict",
            Mode::Liberal => "liberal",
        }
    }

    /// nf_conntrack_tcp_loose and nf_conntrack_tcp_be_liberal.
    fn sysctls(self) -> (u8, u8) {
        match self {
            Mode::Strict => (0, 0),
            Mode::Liberal => (1, 1),
        }
    }
}

/// One TCP packet of a capture, as both sides see it.
struct Packet {
    /// The IP packet (TTL 64).
    ip: Vec<u8>,
    /// Where its TCP header starts in `ip`.
    l4: usize,
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    flags: TcpFlags,
    seq: u32,
    ack: u32,
    len: usize,
    /// Its number in the capture file, from 1.
    number: u64,
}

impl Packet {
    fn v6(&self) -> bool {
        self.src.is_ipv6()
    }

    fn describe(&self) -> String {
        format!(
            "#{} {}:{} -> {}:{} {:?} seq {} ack {} len {}",
            self.number, self.src, self.sport, self.dst, self.dport, self.flags, self.seq, self.ack, self.len
        )
    }
}

struct Capture {
    name: String,
    client: IpAddr,
    packets: Vec<Packet>,
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether this machine can run the comparison; panics in CI when it cannot.
fn possible() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let missing: Vec<_> = ["ip", "nft", "sysctl"].into_iter().filter(|t| !have(t)).collect();
    let corpus = Path::new(CORPUS).is_dir();
    if root && missing.is_empty() && corpus {
        return true;
    }
    let why = format!("root: {root}, missing tools: {missing:?}, corpus present: {corpus}");
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run the conntrack comparison: {why}"
    );
    eprintln!("skipping: {why}");
    false
}

/// Every capture file under `root`, sorted.
fn files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p
                .extension()
                .is_some_and(|x| matches!(x.to_str(), Some("pcap" | "pcapng" | "cap" | "gz")))
            {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The IP packet a captured frame carries, after its link header and any VLAN tags.
fn ip_packet(linktype: LinkType, data: &[u8]) -> Option<&[u8]> {
    match strip_link_header(linktype, data) {
        LinkPayload::Ethernet(frame) => {
            let mut ethertype = EtherType(u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]));
            let mut at = ethernet::HEADER_LEN;
            while ethertype.is_vlan_tag() {
                let tag = frame.get(at..at + vlan::HEADER_LEN)?;
                ethertype = EtherType(u16::from_be_bytes([tag[2], tag[3]]));
                at += vlan::HEADER_LEN;
            }
            matches!(ethertype, EtherType::IPV4 | EtherType::IPV6).then(|| &frame[at..])
        }
        LinkPayload::Network {
            ethertype: 0x0800 | 0x86dd,
            packet,
        } => Some(packet),
        _ => None,
    }
}

/// The address a capture's address `a` is replayed with: the `n`th distinct
/// address of the capture, in 10.64.0.0/10 or fd00:ca::/96, so that Linux
/// forwards it whatever it was (loopback, link-local, multicast: many
/// captures were taken on a host's loopback, where client and server share
/// 127.0.0.1) and the two families stay apart.
fn replayed_address(a: IpAddr, seen: &mut BTreeMap<IpAddr, IpAddr>) -> IpAddr {
    let n = seen.len() as u32 + 1;
    *seen.entry(a).or_insert_with(|| match a {
        IpAddr::V4(_) => IpAddr::from((10u32 << 24 | 64 << 16 | n).to_be_bytes()),
        IpAddr::V6(_) => IpAddr::from((0xfd00_00ca_u128 << 96 | u128::from(n)).to_be_bytes()),
    })
}

/// A capture's complete, unfragmented TCP packets, with TTL 64 and
/// addresses mapped by [`replayed_address`].
fn read_capture(path: &Path) -> Option<Capture> {
    let mut reader = CaptureReader::open(path).ok()?;
    let mut buf = Vec::new();
    let mut packets = Vec::new();
    let mut number = 0;
    let mut addresses = BTreeMap::new();
    while let Some(meta) = reader.next_into(&mut buf) {
        let Ok(meta) = meta else { break };
        number += 1;
        let Some(ip) = ip_packet(meta.linktype, &buf) else {
            continue;
        };
        let Ok(Some(info)) = flow::extract_ip(ip, Segment::UNTAGGED) else {
            continue;
        };
        if info.key.protocol != IpProtocol::TCP || info.fragment != Fragment::None {
            continue;
        }
        // The IP packet as its length field bounds it (the extractor checked it).
        let v6 = ip[0] >> 4 == 6;
        let total = if v6 {
            40 + usize::from(u16::from_be_bytes([ip[4], ip[5]]))
        } else {
            usize::from(u16::from_be_bytes([ip[2], ip[3]]))
        };
        let mut bytes = ip[..total].to_vec();
        let src = replayed_address(info.key.src_addr(), &mut addresses);
        let dst = replayed_address(info.key.dst_addr(), &mut addresses);
        match (src, dst) {
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                bytes[7] = 64;
                bytes[8..24].copy_from_slice(&s.octets());
                bytes[24..40].copy_from_slice(&d.octets());
            }
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                bytes[8] = 64;
                bytes[12..16].copy_from_slice(&s.octets());
                bytes[16..20].copy_from_slice(&d.octets());
                // The TCP checksum is left as it was: neither side checks it.
                ipv4::Packet::new_unchecked(&mut bytes[..]).fill_checksum();
            }
            _ => continue,
        }
        let l4 = usize::from(info.l4_offset - info.l3_offset);
        let Ok(t) = tcp::Packet::new_checked(&bytes[l4..]) else {
            continue;
        };
        packets.push(Packet {
            src,
            dst,
            sport: t.src_port(),
            dport: t.dst_port(),
            flags: t.flags(),
            seq: t.seq_number(),
            ack: t.ack_number(),
            len: total - l4 - t.header_len(),
            number,
            l4,
            ip: bytes,
        });
    }
    let first_syn = packets
        .iter()
        .find(|p| p.flags.contains(TcpFlags::SYN) && !p.flags.contains(TcpFlags::ACK));
    let client = first_syn.or(packets.first())?.src;
    let name = path
        .strip_prefix(CORPUS)
        .unwrap_or(path)
        .to_string_lossy()
        .trim_start_matches('/')
        .to_string();
    Some(Capture { name, client, packets })
}

fn ethertype_of(p: &Packet) -> [u8; 2] {
    if p.v6() { [0x86, 0xdd] } else { [0x08, 0x00] }
}

/// An Ethernet frame around `ip`, with an optional VLAN tag.
fn frame(dst: [u8; 6], src: [u8; 6], tag: Option<u16>, ethertype: [u8; 2], ip: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(18 + ip.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    if let Some(vid) = tag {
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ethertype);
    f.extend_from_slice(ip);
    f
}

// ---------------------------------------------------------------------------
// Palisade's side: `palisade replay --packets`.
// ---------------------------------------------------------------------------

/// Palisade's verdict on each packet (true: forwarded) and its drop reasons.
fn palisade(capture: &Capture, mode: Mode, dir: &Path) -> Vec<(bool, Option<String>)> {
    let policy = dir.join("policy");
    std::fs::create_dir_all(&policy).unwrap();
    let client = capture.client;
    std::fs::write(
        policy.join("policy.yaml"),
        format!(
            r#"version: 1
datacenter: {{ name: dc, default: deny }}
zones: [{{ name: z, vlan: {ZONE_VLAN} }}]
vms:
  - name: client
    uuid: 00000000-0000-4000-8000-000000000001
    host: h
    vnics: [{{ name: client.0, mac: "02:00:00:00:00:01", ips: ["{client}"], zone: z }}]
rules:
  datacenter:
    - {{ id: client-opens-tcp, from: "{client}", to: any, service: ip/6, action: allow }}
"#
        ),
    )
    .unwrap();
    let strict = if mode == Mode::Strict { r#"["z"]"# } else { "[]" };
    let topology = dir.join("topology.json");
    std::fs::write(
        &topology,
        format!(
            r#"{{ "host": "h", "strict_zones": {strict}, "max_conns": 1000000,
  "uplink": {{ "underlay_ip": "192.168.0.1", "mac": "0e:00:00:00:00:01",
              "gateway_mac": "0e:00:00:00:00:fe", "flood": ["192.168.0.2"] }} }}"#
        ),
    )
    .unwrap();
    let pcap = dir.join("capture.pcap");
    let mut w = CaptureWriter::create(&pcap, LinkType::ETHERNET).unwrap();
    for (i, p) in capture.packets.iter().enumerate() {
        let f = if p.src == client {
            frame(WORLD_MAC, CLIENT_MAC, None, ethertype_of(p), &p.ip)
        } else {
            frame(CLIENT_MAC, WORLD_MAC, Some(ZONE_VLAN), ethertype_of(p), &p.ip)
        };
        w.write(Duration::from_secs(1_000_000) + Duration::from_micros(i as u64), &f)
            .unwrap();
    }
    w.finish().unwrap();
    let out = Command::new(EXE)
        .arg("replay")
        .arg("--policy")
        .arg(&policy)
        .arg("--topology")
        .arg(&topology)
        .arg("--pcap")
        .arg(&pcap)
        .args(["--json", "--packets"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: palisade replay failed: {}",
        capture.name,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let verdicts: Vec<_> = report["per_packet"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["verdict"] == "forward", p["reason"].as_str().map(str::to_string)))
        .collect();
    assert_eq!(verdicts.len(), capture.packets.len(), "{}", capture.name);
    verdicts
}

// ---------------------------------------------------------------------------
// Linux's side: nftables in a router namespace between two TAPs.
// ---------------------------------------------------------------------------

fn run(what: &str, cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip(args: &[&str]) {
    run(&format!("ip {}", args.join(" ")), Command::new("ip").args(args));
}

/// A network namespace routing every packet from its `in` TAP to its `out`
/// TAP through nftables' forward hook; removed when dropped. Each capture
/// is replayed in a conntrack zone of its own (`ct zone set`, before
/// conntrack sees the packet), so no connection of one capture meets
/// another's packets.
struct Router {
    ns: String,
    input: Tap,
    output: Tap,
    marker: u64,
}

static ROUTERS: AtomicU32 = AtomicU32::new(0);

/// Load an nftables script into namespace `ns`.
fn nft(ns: &str, script: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nft: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Router {
    fn new(mode: Mode) -> Router {
        let n = ROUTERS.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}x{n}", std::process::id() % 100_000);
        let ns = format!("pcc{id}");
        ip(&["netns", "add", &ns]);
        let router = Router {
            input: Tap::open(&format!("pcci{id}")).unwrap(),
            output: Tap::open(&format!("pcco{id}")).unwrap(),
            ns,
            marker: 0,
        };
        let ns = router.ns.as_str();
        let (loose, liberal) = mode.sysctls();
        let sysctl = |kv: &str| run(kv, Command::new("ip").args(["netns", "exec", ns, "sysctl", "-qw", kv]));
        for kv in [
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv6.conf.default.accept_ra=0",
        ] {
            sysctl(kv);
        }
        for (tap, mac) in [(router.input.name(), IN_MAC), (router.output.name(), OUT_MAC)] {
            ip(&["link", "set", tap, "netns", ns]);
            let mac: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
            // A TAP's largest MTU: 65535 less its Ethernet header.
            ip(&[
                "-n",
                ns,
                "link",
                "set",
                tap,
                "address",
                &mac.join(":"),
                "mtu",
                "65521",
                "up",
            ]);
        }
        let out = router.output.name();
        ip(&["-n", ns, "addr", "add", "198.18.2.1/24", "dev", out]);
        ip(&["-n", ns, "addr", "add", "fd5e::1/64", "dev", out, "nodad"]);
        ip(&[
            "-n",
            ns,
            "neigh",
            "add",
            "198.18.2.2",
            "lladdr",
            NEXT_HOP_MAC,
            "dev",
            out,
            "nud",
            "permanent",
        ]);
        ip(&[
            "-n",
            ns,
            "neigh",
            "add",
            "fd5e::2",
            "lladdr",
            NEXT_HOP_MAC,
            "dev",
            out,
            "nud",
            "permanent",
        ]);
        ip(&["-n", ns, "route", "add", "default", "via", "198.18.2.2", "dev", out]);
        ip(&["-n", ns, "-6", "route", "add", "default", "via", "fd5e::2", "dev", out]);
        nft(
            ns,
            "table inet cmp {
  chain raw { type filter hook prerouting priority raw; }
  chain forward_filter { type filter hook forward priority filter; policy drop; }
}
",
        );
        // The ruleset loaded conntrack: its sysctls exist in the namespace now.
        for kv in [
            format!("net.netfilter.nf_conntrack_tcp_loose={loose}"),
            format!("net.netfilter.nf_conntrack_tcp_be_liberal={liberal}"),
            "net.netfilter.nf_conntrack_checksum=0".to_string(),
        ] {
            sysctl(&kv);
        }
        router
    }

    /// The policy for a capture: its own conntrack zone, its client.
    fn policy(&self, zone: usize, client: IpAddr) {
        let family = if client.is_ipv6() { "ip6" } else { "ip" };
        nft(
            &self.ns,
            &format!(
                "flush chain inet cmp raw
flush chain inet cmp forward_filter
add rule inet cmp raw ip saddr 198.18.255.1 notrack accept
add rule inet cmp raw ct zone set {zone}
add rule inet cmp forward_filter ip saddr 198.18.255.1 accept
add rule inet cmp forward_filter ct state established,related accept
add rule inet cmp forward_filter ct state invalid drop
add rule inet cmp forward_filter {family} saddr {client} ct state new accept
"
            ),
        );
    }

    /// Send `p` through; whether it came out.
    fn forwards(&mut self, p: &Packet) -> bool {
        let f = frame(IN_MAC, WORLD_MAC, None, ethertype_of(p), &p.ip);
        self.input
            .send(&f)
            .unwrap_or_else(|e| panic!("writing {}: {e}", p.describe()));
        self.marker += 1;
        let mut m = vec![0x45, 0, 0, 36, 0, 0, 0x40, 0, 64, 17, 0, 0];
        m.extend_from_slice(&MARKER_SRC);
        m.extend_from_slice(&MARKER_DST);
        m.extend_from_slice(&[0, 9, 0, 9, 0, 16, 0, 0]);
        m.extend_from_slice(&self.marker.to_be_bytes());
        ipv4::Packet::new_unchecked(&mut m[..]).fill_checksum();
        self.input.send(&frame(IN_MAC, WORLD_MAC, None, [0x08, 0], &m)).unwrap();
        // The TCP segment: Linux forwards an IPv6 atomic fragment (RFC 6946)
        // without its fragment header, having reassembled it.
        let segment = &p.ip[p.l4..];
        let (mut seen, mut done) = (false, false);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done {
            assert!(
                Instant::now() < deadline,
                "marker {} lost after {}",
                self.marker,
                p.describe()
            );
            wait_readable(&[self.output.fd()], Duration::from_millis(100)).unwrap();
            let marker = self.marker;
            self.output
                .recv(64, &mut |f| {
                    let Some(pkt) = f.get(14..) else { return };
                    if f[12..14] == [0x08, 0] && pkt.get(12..16) == Some(&MARKER_SRC[..]) {
                        done |= pkt.get(28..36) == Some(&marker.to_be_bytes()[..]);
                    } else if pkt.ends_with(segment) {
                        seen = true;
                    }
                })
                .unwrap();
        }
        seen
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

// ---------------------------------------------------------------------------
// The comparison.
// ---------------------------------------------------------------------------

/// One packet the two disagree on.
struct Difference {
    mode: Mode,
    capture: String,
    packet: String,
    palisade: String,
    linux: bool,
}

#[test]
fn tcp_tracking_agrees_with_linux_conntrack() {
    if !possible() {
        return;
    }
    let filter = std::env::var("PALISADE_CT_CAPTURES").ok();
    let full = std::env::var_os("PALISADE_CT_FULL").is_some_and(|v| v == "1");
    let started = Instant::now();
    let (captures, left_out): (Vec<Capture>, Vec<Capture>) = files(Path::new(CORPUS))
        .iter()
        .filter(|p| filter.as_deref().is_none_or(|f| p.to_string_lossy().contains(f)))
        .filter_map(|p| read_capture(p))
        .filter(|c| !c.packets.is_empty())
        .partition(|c| full || c.packets.len() <= CI_MAX_PACKETS);
    let total: usize = captures.iter().map(|c| c.packets.len()).sum();
    assert!(!captures.is_empty(), "no capture with TCP under {CORPUS}");
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("conntrack-linux");
    let mut agree: BTreeMap<Mode, usize> = BTreeMap::new();
    let mut dropped: BTreeMap<(Mode, &str), usize> = BTreeMap::new();
    let mut differences = Vec::new();
    let mut routers = Mode::ALL.map(Router::new);
    for (i, c) in captures.iter().enumerate() {
        for (mode, router) in Mode::ALL.into_iter().zip(&mut routers) {
            let dir = tmp.join(format!("{i}-{}", mode.name()));
            std::fs::create_dir_all(&dir).unwrap();
            let ours = palisade(c, mode, &dir);
            // Zones are 16 bits; 0 is everyone's.
            router.policy(1 + i % 65_000, c.client);
            for (p, (forwarded, reason)) in c.packets.iter().zip(ours) {
                let linux = router.forwards(p);
                *dropped.entry((mode, "linux")).or_default() += usize::from(!linux);
                *dropped.entry((mode, "palisade")).or_default() += usize::from(!forwarded);
                if linux == forwarded {
                    *agree.entry(mode).or_default() += 1;
                } else {
                    differences.push(Difference {
                        mode,
                        capture: c.name.clone(),
                        packet: p.describe(),
                        palisade: reason.map_or("forward".into(), |r| format!("drop ({r})")),
                        linux,
                    });
                }
            }
        }
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut report = String::new();
    let _ = writeln!(
        report,
        "Palisade vs Linux {} conntrack: {} captures, {total} TCP packets ({:.0} s)",
        kernel.trim(),
        captures.len(),
        started.elapsed().as_secs_f64()
    );
    for mode in Mode::ALL {
        let (loose, liberal) = mode.sysctls();
        let n = agree.get(&mode).copied().unwrap_or(0);
        let _ = writeln!(
            report,
            "{:<8} (nf_conntrack_tcp_loose={loose}, be_liberal={liberal}): {n} of {total} agree, {:.3}% \
             (dropped: linux {}, palisade {})",
            mode.name(),
            100.0 * n as f64 / total as f64,
            dropped.get(&(mode, "linux")).copied().unwrap_or(0),
            dropped.get(&(mode, "palisade")).copied().unwrap_or(0),
        );
    }
    for c in &left_out {
        let _ = writeln!(
            report,
            "left out (PALISADE_CT_FULL=1 takes it): {}, {} TCP packets",
            c.name,
            c.packets.len()
        );
    }
    let _ = writeln!(report, "differences:");
    for d in &differences {
        let _ = writeln!(
            report,
            "  {:<7} {} {}: palisade {}, linux {}",
            d.mode.name(),
            d.capture,
            d.packet,
            d.palisade,
            if d.linux { "forward" } else { "drop" }
        );
    }
    print!("{report}");
    if let Ok(path) = std::env::var("PALISADE_CT_REPORT") {
        std::fs::write(path, &report).unwrap();
    }
    if filter.is_none() {
        for mode in Mode::ALL {
            let n = agree.get(&mode).copied().unwrap_or(0);
            assert!(
                n as f64 >= 0.999 * total as f64,
                "{}: {n} of {total} packets agree, below 99.9%",
                mode.name()
            );
        }
    }
}
