//! `palisade replay`: run a capture through the datapath engine, offline.
//!
//! A topology file says which host the capture was taken on and which of the
//! policy's vNICs are local to it (its format, and the engine built from it,
//! are `palisade_datapath::host`'s); a frame enters on the vNIC whose MAC is
//! its source MAC, else on the uplink. Time comes from the capture's timestamps, so
//! a replay is deterministic: the same capture and policy always give the same
//! verdicts, which is what the golden tests rely on.
//!
//! The verdict of each packet is the engine's; the provenance printed next to
//! it (level, rule, policy version) is the compiled policy's decision for the
//! connection's initiating direction, which is what the engine evaluated (for
//! an ICMP error related to a connection, the rules naming its type). Rows
//! are the flows the engine decided: a VXLAN packet from another host is
//! reported by the frame inside the tunnel. `--packets` adds every packet's
//! verdict in capture order, for comparisons packet by packet.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use palisade_datapath::host::{HostEngine, Topology};
use palisade_datapath::port::{PortId, UPLINK};
use palisade_datapath::{Counters, Disposition, DropReason, Engine, PolicyLookup, Results, policy_flow};
use palisade_io::capture::{CaptureReader, LinkType};
use palisade_policy::compile::Compiler;
use palisade_policy::eval::{ChainVerdict, Direction};
use palisade_policy::{DirSource, load};
use palisade_wire::ethernet::EthernetAddress;
use palisade_wire::flow::{self, FlowKey, Segment};
use palisade_wire::ip::IpProtocol;
use serde::Serialize;

/// Arguments of `palisade replay`.
#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// Policy directory (inventory and rules).
    #[arg(long)]
    pub policy: PathBuf,
    /// Topology file (JSON): the host, its local vNICs, MAC overrides and the uplink.
    #[arg(long)]
    pub topology: PathBuf,
    /// Capture file (pcap or pcapng, Ethernet link type).
    #[arg(long)]
    pub pcap: PathBuf,
    /// After packet N (counting from 1), swap to the policy in DIR. Repeatable.
    #[arg(long = "policy-change", value_name = "N:DIR")]
    pub policy_change: Vec<String>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Also report every packet's verdict, in capture order (a table, or
    /// `per_packet` in the JSON).
    #[arg(long)]
    pub packets: bool,
}

/// One policy swap requested with `--policy-change`.
struct Change {
    after: u64,
    dir: PathBuf,
}

fn parse_change(s: &str) -> anyhow::Result<Change> {
    let (n, dir) = s
        .split_once(':')
        .with_context(|| format!("--policy-change {s:?}: expected N:DIR"))?;
    let after = n
        .parse()
        .with_context(|| format!("--policy-change {s:?}: {n:?} is not a packet number"))?;
    Ok(Change {
        after,
        dir: PathBuf::from(dir),
    })
}

/// Load and compile the policy in `dir`, printing its diagnostics when invalid.
fn compile(dir: &Path) -> anyhow::Result<Compiler> {
    let loaded = load(&DirSource::new(dir)).with_context(|| format!("loading policy from {}", dir.display()))?;
    if loaded.has_errors() {
        eprint!("{}", loaded.render());
        bail!("policy in {} has errors", dir.display());
    }
    Compiler::new(loaded.model).with_context(|| format!("compiling policy from {}", dir.display()))
}

fn read_topology(path: &Path) -> anyhow::Result<Topology> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading topology {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing topology {}", path.display()))
}

/// What a flow row is about.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum FlowId {
    /// An IP flow, directional; for an ICMP error, with the flow it quotes.
    Ip(FlowKey, Option<FlowKey>),
    /// A non-IP frame (ARP and others), by addresses and EtherType.
    L2 {
        src: EthernetAddress,
        dst: EthernetAddress,
        ethertype: u16,
    },
    /// Frames that did not parse.
    Unparsed,
}

/// One chain's verdict in a flow's provenance.
#[derive(Serialize, Clone, PartialEq, Eq)]
struct ChainOut {
    vnic: String,
    direction: &'static str,
    action: String,
    level: String,
    rule: String,
    scope: Option<String>,
}

/// The policy's decision for a flow under one policy version.
#[derive(Serialize, Clone, PartialEq, Eq)]
struct DecisionOut {
    policy_version: u64,
    action: String,
    /// The flow the decision is about, when it is not this row's own (replies, ICMP errors).
    #[serde(skip_serializing_if = "Option::is_none")]
    via: Option<String>,
    chains: Vec<ChainOut>,
}

#[derive(Serialize)]
struct FlowOut {
    src: String,
    dst: String,
    segment: String,
    proto: String,
    /// The flow an ICMP error quotes.
    #[serde(skip_serializing_if = "Option::is_none")]
    quotes: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    src_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dst_port: Option<u16>,
    packets: u64,
    bytes: u64,
    forwarded: u64,
    drops: BTreeMap<&'static str, u64>,
    /// The verdict of the flow's last packet.
    verdict: String,
    decided_by: Vec<DecisionOut>,
}

/// One packet's verdict (`--packets`).
#[derive(Serialize)]
struct PacketOut {
    /// Its number in the capture, from 1.
    n: u64,
    /// The port it arrived on (a vNIC name, or `uplink`).
    port: String,
    /// Its row in `flows` (index from 0).
    flow: usize,
    /// `forward` or `drop`.
    verdict: &'static str,
    /// Why it was dropped.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
}

#[derive(Serialize)]
struct ChangeOut {
    after_packet: u64,
    policy_version: u64,
}

#[derive(Serialize)]
struct Report {
    host: String,
    policy_version: u64,
    packets: u64,
    policy_changes: Vec<ChangeOut>,
    flows: Vec<FlowOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    per_packet: Option<Vec<PacketOut>>,
    drops: BTreeMap<&'static str, u64>,
    counters: BTreeMap<&'static str, u64>,
}

fn segment_name(s: Segment) -> String {
    if let Some(v) = s.vlan_id() {
        format!("vlan {v}")
    } else if let Some(v) = s.vni_id() {
        format!("vni {v}")
    } else if s == Segment::UNTAGGED {
        "untagged".into()
    } else {
        format!("segment {:#x}", s.raw())
    }
}

fn proto_name(p: IpProtocol) -> String {
    match p {
        IpProtocol::TCP => "tcp".into(),
        IpProtocol::UDP => "udp".into(),
        IpProtocol::SCTP => "sctp".into(),
        IpProtocol::ICMP => "icmp".into(),
        IpProtocol::ICMPV6 => "icmpv6".into(),
        other => format!("ip/{}", other.0),
    }
}

fn key_text(k: &FlowKey) -> String {
    format!(
        "{} {}:{} -> {}:{}",
        proto_name(k.protocol),
        k.src_addr(),
        k.src_port,
        k.dst_addr(),
        k.dst_port
    )
}

fn new_row(id: &FlowId) -> FlowOut {
    let (src, dst, segment, proto, src_port, dst_port) = match id {
        FlowId::Ip(k, _) => {
            let ports = matches!(k.protocol, IpProtocol::TCP | IpProtocol::UDP | IpProtocol::SCTP);
            (
                k.src_addr().to_string(),
                k.dst_addr().to_string(),
                segment_name(k.segment),
                proto_name(k.protocol),
                ports.then_some(k.src_port),
                ports.then_some(k.dst_port),
            )
        }
        FlowId::L2 { src, dst, ethertype } => (
            src.to_string(),
            dst.to_string(),
            String::new(),
            if *ethertype == 0x0806 {
                "arp".into()
            } else {
                format!("ethertype {ethertype:#06x}")
            },
            None,
            None,
        ),
        FlowId::Unparsed => ("?".into(), "?".into(), String::new(), "unparsed".into(), None, None),
    };
    FlowOut {
        src,
        dst,
        segment,
        proto,
        quotes: match id {
            FlowId::Ip(_, q) => q.as_ref().map(key_text),
            _ => None,
        },
        src_port,
        dst_port,
        packets: 0,
        bytes: 0,
        forwarded: 0,
        drops: BTreeMap::new(),
        verdict: String::new(),
        decided_by: Vec::new(),
    }
}

fn chain_out(c: ChainVerdict) -> ChainOut {
    ChainOut {
        vnic: c.vnic,
        direction: match c.direction {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        },
        action: c.action.to_string(),
        level: c.provenance.level.to_string(),
        rule: c.provenance.rule_id.to_string(),
        scope: c.provenance.scope.map(|s| s.to_string()),
    }
}

/// The policy's decision for `key` (the connection's initiating direction).
fn decision(compiler: &Compiler, key: &FlowKey, via: Option<String>) -> DecisionOut {
    let flow = policy_flow(key);
    let version = compiler.model().policy.version;
    let Some(d) = compiler.decide(&flow) else {
        return DecisionOut {
            policy_version: version,
            action: "unmanaged".into(),
            via,
            chains: Vec::new(),
        };
    };
    DecisionOut {
        policy_version: version,
        action: d.action.to_string(),
        via,
        chains: [d.egress, d.ingress].into_iter().flatten().map(chain_out).collect(),
    }
}

/// The policy's decision for the ICMP error `key`, related to the
/// connection `via` names: only rules naming its type decide; with none, no
/// chain is listed.
fn related_decision(compiler: &Compiler, key: &FlowKey, via: String) -> DecisionOut {
    let flow = policy_flow(key);
    let version = compiler.model().policy.version;
    match compiler.decide_related(&flow) {
        Some(d) => DecisionOut {
            policy_version: version,
            action: d.action.to_string(),
            via: Some(via),
            chains: [d.egress, d.ingress]
                .into_iter()
                .flatten()
                .filter_map(|t| t.verdict)
                .map(chain_out)
                .collect(),
        },
        None => DecisionOut {
            policy_version: version,
            action: "unmanaged".into(),
            via: Some(via),
            chains: Vec::new(),
        },
    }
}

/// The name `--packets` gives a port: its vNIC's, or `uplink`.
fn port_name(engine: &Engine, port: PortId) -> String {
    match engine.vnic(port) {
        Some(v) => v.name.clone(),
        None => "uplink".into(),
    }
}

fn counters_map(c: &Counters) -> BTreeMap<&'static str, u64> {
    BTreeMap::from([
        ("packets", c.packets),
        ("forwarded", c.forwarded),
        ("dropped", c.total_drops()),
        ("cache_hits", c.cache_hits),
        ("cache_misses", c.cache_misses),
        ("cache_evictions", c.cache_evictions),
        ("classifications", c.classifications),
        ("revalidations", c.revalidations),
        ("trusted", c.trusted),
        ("conns_created", c.conns_created),
        ("conns_ended", c.conns_ended),
        ("conns_evicted", c.conns_evicted),
        ("tcp_window_liberal", c.tcp_window_liberal),
        ("icmp_related", c.icmp_related),
        ("flooded", c.flooded),
        ("encapsulated", c.encapsulated),
    ])
}

/// Run `palisade replay`.
pub fn run(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let mut changes = args
        .policy_change
        .iter()
        .map(|s| parse_change(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    changes.sort_by_key(|c| c.after);
    let topo = read_topology(&args.topology)?;
    let mut compiler = compile(&args.policy)?;
    // Every policy is loaded up front: a bad one fails the replay before it starts.
    let mut pending = Vec::new();
    for c in changes {
        pending.push((c.after, compile(&c.dir)?));
    }
    let HostEngine { mut engine, macs, .. } = topo
        .build(compiler.model(), Box::new(PolicyLookup::new(compiler.clone())))
        .with_context(|| format!("topology {}", args.topology.display()))?;
    let mut reader = CaptureReader::open(&args.pcap).with_context(|| format!("opening {}", args.pcap.display()))?;

    let mut report = Report {
        host: topo.host.clone(),
        policy_version: compiler.model().policy.version,
        packets: 0,
        policy_changes: Vec::new(),
        flows: Vec::new(),
        per_packet: None,
        drops: BTreeMap::new(),
        counters: BTreeMap::new(),
    };
    let mut rows: HashMap<FlowId, usize> = HashMap::new();
    let mut per_packet = args.packets.then(Vec::new);
    // The first direction seen of each connection (canonical key → key): its initiator.
    let mut initiators: HashMap<FlowKey, FlowKey> = HashMap::new();
    let mut pending = pending.into_iter().peekable();
    let mut buf = Vec::new();
    let mut results = Results::new();
    let mut n = 0u64;
    while let Some(meta) = reader.next_into(&mut buf) {
        let meta = meta.with_context(|| format!("reading {} after packet {n}", args.pcap.display()))?;
        n += 1;
        if meta.linktype != LinkType::ETHERNET {
            bail!(
                "{}: packet {n} has link type {}; replay needs Ethernet frames",
                args.pcap.display(),
                meta.linktype.0
            );
        }
        let now = u64::try_from(meta.timestamp.as_nanos()).unwrap_or(u64::MAX);
        let frame = buf.as_slice();
        let in_port = frame
            .get(6..12)
            .and_then(|m| <[u8; 6]>::try_from(m).ok())
            .and_then(|m| macs.get(&EthernetAddress(m)).copied())
            .unwrap_or(UPLINK);
        engine.expire(now, 64, &mut ());
        let disposition = engine.process(now, in_port, frame, &mut (), &mut results).disposition;

        // The row: the flow the engine decided, inside the tunnel for a
        // VXLAN arrival, per L2 segment (the engine keys connections without it).
        let own = engine.dispatch_key(in_port, frame);
        let (inner, segment) = engine.inner_frame(in_port, frame).unwrap_or((frame, Segment::UNTAGGED));
        let in_segment = |k: FlowKey| FlowKey { segment, ..k };
        let id = match flow::extract(inner) {
            Ok(Some(info)) => {
                let error = info
                    .icmp
                    .is_some_and(|(ty, _)| flow::is_icmp_error(info.key.protocol == IpProtocol::ICMPV6, ty));
                // An ICMP error's row is its own, with the packet it quotes.
                let quoted = if error { own.map(in_segment) } else { None };
                FlowId::Ip(in_segment(info.key), quoted)
            }
            Ok(None) => {
                let eth = |r: core::ops::Range<usize>| {
                    inner
                        .get(r)
                        .and_then(|m| <[u8; 6]>::try_from(m).ok())
                        .map_or(EthernetAddress([0; 6]), EthernetAddress)
                };
                // `get(12..14)` yields exactly two bytes when it yields anything.
                let ethertype = inner.get(12..14).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
                FlowId::L2 {
                    src: eth(6..12),
                    dst: eth(0..6),
                    ethertype,
                }
            }
            Err(_) => FlowId::Unparsed,
        };
        let idx = *rows.entry(id).or_insert_with(|| {
            report.flows.push(new_row(&id));
            report.flows.len() - 1
        });
        if let Some(list) = per_packet.as_mut() {
            list.push(PacketOut {
                n,
                port: port_name(&engine, in_port),
                flow: idx,
                verdict: match disposition {
                    Disposition::Forward => "forward",
                    Disposition::Drop(_) => "drop",
                },
                reason: match disposition {
                    Disposition::Forward => None,
                    Disposition::Drop(r) => Some(r.name()),
                },
            });
        }
        // `idx` was just inserted or found in `rows`, which only holds indices of `report.flows`.
        let row = &mut report.flows[idx];
        row.packets += 1;
        row.bytes += frame.len() as u64;
        // Which decision the row shows. A forwarded or revoked packet belongs
        // to a connection, decided for its initiator's direction; a denied one
        // was classified on its own key as a new flow. An ICMP error related
        // to a connection was decided by the rules naming its type.
        let error_of = match id {
            FlowId::Ip(k, Some(q)) => Some((k, q)),
            _ => None,
        };
        // An error is related when it quotes a packet of a tracked connection
        // and travels back to that packet's sender (as the engine checks).
        let related = error_of.is_some_and(|(k, q)| {
            k.dst_addr() == q.src_addr() && own.is_some_and(|q| engine.conntrack().find(&q).is_some())
        });
        let decided = match (disposition, error_of) {
            (Disposition::Forward, Some((k, q))) if related => Some(related_decision(&compiler, &k, key_text(&q))),
            (Disposition::Drop(DropReason::PolicyDeny), Some((k, q))) => {
                Some(related_decision(&compiler, &k, key_text(&q)))
            }
            (Disposition::Forward | Disposition::Drop(DropReason::IcmpErrorUnrelated), Some((k, _))) => {
                Some(decision(&compiler, &k, None))
            }
            (Disposition::Forward, None) => own
                .map(|k| *initiators.entry(k.canonical().0).or_insert(k))
                .map(|init| {
                    decision(
                        &compiler,
                        &init,
                        (FlowId::Ip(in_segment(init), None) != id).then(|| key_text(&init)),
                    )
                }),
            (Disposition::Drop(r), None) => match r {
                DropReason::PolicyDeny | DropReason::PolicyReject => own.map(|k| decision(&compiler, &k, None)),
                // The connection is gone: a later packet starts a new one.
                DropReason::PolicyRevoked => own.and_then(|k| initiators.remove(&k.canonical().0)).map(|init| {
                    decision(
                        &compiler,
                        &init,
                        (FlowId::Ip(in_segment(init), None) != id).then(|| key_text(&init)),
                    )
                }),
                _ => None,
            },
            (Disposition::Drop(_), Some(_)) => None,
        };
        match disposition {
            Disposition::Forward => {
                row.forwarded += 1;
                row.verdict = "forward".into();
            }
            Disposition::Drop(r) => {
                *row.drops.entry(r.name()).or_default() += 1;
                row.verdict = format!("drop: {r}");
            }
        }
        if let Some(d) = decided
            && row.decided_by.last() != Some(&d)
        {
            row.decided_by.push(d);
        }

        while let Some((_, next)) = pending.next_if(|(after, _)| *after <= n) {
            engine.update_policy(Box::new(PolicyLookup::new(next.clone())));
            compiler = next;
            report.policy_changes.push(ChangeOut {
                after_packet: n,
                policy_version: compiler.model().policy.version,
            });
        }
    }
    if let Some((after, _)) = pending.next() {
        bail!("--policy-change after packet {after}, but the capture has only {n} packets");
    }
    report.packets = n;
    report.per_packet = per_packet;
    let c = engine.counters();
    report.drops = DropReason::ALL
        .iter()
        .filter(|r| c.dropped(**r) > 0)
        .map(|r| (r.name(), c.dropped(*r)))
        .collect();
    report.counters = counters_map(c);

    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        render(&report, &mut out)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A row's endpoints as the tables show them.
fn flow_ends(f: &FlowOut) -> String {
    let ends = match (f.src_port, f.dst_port) {
        (Some(s), Some(d)) => format!("{}:{s} -> {}:{d}", f.src, f.dst),
        _ => format!("{} -> {}", f.src, f.dst),
    };
    match &f.quotes {
        Some(q) => format!("{ends} (error re {q})"),
        None => ends,
    }
}

fn render(r: &Report, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "host {}, policy version {}, {} packets",
        r.host, r.policy_version, r.packets
    )?;
    for c in &r.policy_changes {
        writeln!(
            out,
            "policy changed to version {} after packet {}",
            c.policy_version, c.after_packet
        )?;
    }
    writeln!(out)?;
    let ends: Vec<String> = r.flows.iter().map(flow_ends).collect();
    if let Some(packets) = &r.per_packet {
        writeln!(
            out,
            "{:>7}  {:<14} {:<26} {:<6} FLOW",
            "PACKET", "PORT", "VERDICT", "PROTO"
        )?;
        for p in packets {
            let verdict = match p.reason {
                Some(reason) => format!("drop: {reason}"),
                None => p.verdict.to_string(),
            };
            let flow = &r.flows[p.flow];
            writeln!(
                out,
                "{:>7}  {:<14} {:<26} {:<6} {}",
                p.n, p.port, verdict, flow.proto, ends[p.flow]
            )?;
        }
        writeln!(out)?;
    }
    writeln!(
        out,
        "{:<46} {:<10} {:<6} {:<26} {:>5} {:>7}  DECIDED BY",
        "FLOW", "SEGMENT", "PROTO", "VERDICT", "PKTS", "BYTES"
    )?;
    for (f, ends) in r.flows.iter().zip(&ends) {
        let verdict = if f.drops.is_empty() || f.forwarded == 0 {
            f.verdict.clone()
        } else {
            format!("{} ({} fwd)", f.verdict, f.forwarded)
        };
        let by: Vec<String> = f
            .decided_by
            .iter()
            .map(|d| {
                let chains: Vec<String> = d
                    .chains
                    .iter()
                    .map(|c| format!("{} {} {}/{}", c.vnic, c.direction, c.level, c.rule))
                    .collect();
                let via = d.via.as_deref().map(|v| format!(" via {v}")).unwrap_or_default();
                let chains = if chains.is_empty() && d.action != "unmanaged" {
                    // Only a related ICMP error is decided without a rule.
                    "related error, no rule names its type".to_string()
                } else {
                    chains.join(", ")
                };
                format!("v{} {}: {chains}{via}", d.policy_version, d.action)
            })
            .collect();
        writeln!(
            out,
            "{:<46} {:<10} {:<6} {:<26} {:>5} {:>7}  {}",
            ends,
            f.segment,
            f.proto,
            verdict,
            f.packets,
            f.bytes,
            if by.is_empty() { "-".into() } else { by.join("; ") }
        )?;
    }
    writeln!(out)?;
    writeln!(out, "DROP REASON                COUNT")?;
    if r.drops.is_empty() {
        writeln!(out, "(none)")?;
    }
    for (reason, count) in &r.drops {
        writeln!(out, "{reason:<26} {count:>5}")?;
    }
    writeln!(out)?;
    writeln!(out, "COUNTER                    VALUE")?;
    for (name, value) in &r.counters {
        writeln!(out, "{name:<26} {value:>5}")?;
    }
    Ok(())
}
