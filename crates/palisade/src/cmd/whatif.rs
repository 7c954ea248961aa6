//! `palisade policy what-if`: recorded flows against a candidate policy.
//!
//! Every recorded flow start in the window is evaluated again with the
//! candidate policy's reference evaluator — the source vNIC's egress chain and
//! the destination vNIC's ingress chain, combined as the engine combines them
//! — and the flows whose verdict would change are listed with the rule that
//! would decide now. A record is turned back into the flow key the engine
//! tracked (addresses as recorded, IPv4-mapped IPv6 as IPv4), and that key
//! into the policy's flow by the engine's own conversion
//! ([`palisade_datapath::policy_flow`]), so what-if evaluates what the engine
//! evaluated. An ICMP record carries its message's type and code
//! ([`FlowRecord::icmp`]), so an echo reply is evaluated as a reply and an
//! error as that error. Records written before the type was kept have only
//! the ports: a non-echo message's are its type and code (the destination
//! port is `type << 8 | code`), an echo's the identifier in both, and such
//! an echo is taken as a request (what starts an echo flow in the engine;
//! its reply cannot be told apart).

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use palisade_audit::record::{FlowRecord, IcmpMessage, Phase, Record, Verdict};
use palisade_audit::{LogReader, Query, RecordKind};
use palisade_policy::eval::{Flow, evaluate};
use palisade_policy::model::{Action, Model};
use palisade_policy::{DirSource, load};
use palisade_wire::flow::FlowKey;
use palisade_wire::ip::IpProtocol;

use super::audit::{endpoint, format_time, now_ns, parse_time};

/// Arguments of `palisade policy what-if`.
#[derive(clap::Args, Debug)]
pub struct WhatIfArgs {
    /// The candidate policy directory.
    #[arg(long)]
    pub policy: PathBuf,
    /// The audit log directory.
    #[arg(long)]
    pub audit: PathBuf,
    /// Flows since: a duration back from now (`24h`), RFC 3339, or Unix nanoseconds.
    #[arg(long, default_value = "24h")]
    pub since: String,
    /// Flows before: same forms as --since (default: now).
    #[arg(long)]
    pub until: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// A flow whose verdict would change.
#[derive(Debug, serde::Serialize)]
struct Changed {
    seq: u64,
    time_ns: u64,
    src: String,
    dst: String,
    protocol: u8,
    old: &'static str,
    old_rules: Vec<String>,
    new: &'static str,
    new_rules: Vec<String>,
}

fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
        Verdict::Reject => "reject",
    }
}

/// An address as a flow key holds it (IPv4-mapped in 16 bytes).
fn key_address(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The flow key the engine tracked a recorded flow under (the agent records
/// a key's addresses and ports; for ICMP see the module documentation).
fn recorded_key(f: &FlowRecord) -> FlowKey {
    let protocol = IpProtocol(f.protocol);
    let icmp = f.protocol == IpProtocol::ICMP.0 || f.protocol == IpProtocol::ICMPV6.0;
    let (icmp_type, icmp_code) = match (icmp, f.icmp) {
        (false, _) => (0, 0),
        (true, Some(IcmpMessage { ty, code })) => (ty, code),
        // An older record. Both ports the echo identifier: an echo (request, see above).
        (true, None) if f.src.port == f.dst.port => (if f.protocol == IpProtocol::ICMP.0 { 8 } else { 128 }, 0),
        (true, None) => ((f.dst.port >> 8) as u8, f.dst.port as u8),
    };
    FlowKey {
        segment: palisade_datapath::ROUTING_DOMAIN,
        src: key_address(f.src.addr),
        dst: key_address(f.dst.addr),
        src_port: f.src.port,
        dst_port: f.dst.port,
        protocol,
        icmp_type,
        icmp_code,
    }
}

/// The policy flow of a recorded flow start: the engine's conversion of the
/// key it tracked.
fn policy_flow(f: &FlowRecord) -> Flow {
    palisade_datapath::policy_flow(&recorded_key(f))
}

/// The candidate verdict of a recorded flow, with the deciding rules and
/// the service chain an allowed flow would be redirected through; `None`
/// when the candidate policy manages neither end.
fn reevaluate(model: &Model, f: &FlowRecord) -> Option<(&'static str, Vec<String>, Option<String>)> {
    let d = evaluate(model, &policy_flow(f))?;
    let verdict = match d.action {
        Action::Allow => "allow",
        Action::Reject => "reject",
        // `pass` never ends a chain; anything else drops.
        Action::Deny | Action::Pass => "deny",
    };
    Some((
        verdict,
        d.provenance.iter().map(ToString::to_string).collect(),
        d.redirect,
    ))
}

/// Run what-if.
pub fn run(args: WhatIfArgs) -> anyhow::Result<ExitCode> {
    let loaded = load(&DirSource::new(&args.policy))
        .with_context(|| format!("loading policy from {}", args.policy.display()))?;
    if loaded.has_errors() {
        eprint!("{}", loaded.render());
        eprintln!("policy has errors; run `palisade policy check` for details");
        return Ok(ExitCode::FAILURE);
    }
    let now = now_ns();
    let q = Query {
        kind: Some(RecordKind::Flow),
        since_ns: Some(parse_time(&args.since, now)?),
        until_ns: args.until.as_deref().map(|s| parse_time(s, now)).transpose()?,
        ..Query::default()
    };
    let reader =
        LogReader::open(&args.audit).with_context(|| format!("opening the audit log in {}", args.audit.display()))?;
    let (mut evaluated, mut unmanaged) = (0u64, 0u64);
    let mut changed = Vec::new();
    // Flows the candidate would steer, by service chain.
    let mut redirected = std::collections::BTreeMap::<String, u64>::new();
    reader.query_each(&q, |seq, rec| {
        let Record::Flow(f) = rec else { return true };
        if f.phase != Phase::Start {
            return true;
        }
        evaluated += 1;
        let candidate = reevaluate(&loaded.model, &f);
        if let Some((_, _, Some(chain))) = &candidate {
            *redirected.entry(chain.clone()).or_default() += 1;
        }
        match candidate {
            None => unmanaged += 1,
            Some((new, new_rules, _)) if new != verdict_name(f.verdict) => changed.push(Changed {
                seq,
                time_ns: f.time_ns,
                src: endpoint(&f.src),
                dst: endpoint(&f.dst),
                protocol: f.protocol,
                old: verdict_name(f.verdict),
                old_rules: f.decided_by.iter().map(|d| format!("{}:{}", d.chain, d.rule)).collect(),
                new,
                new_rules,
            }),
            Some(_) => {}
        }
        true
    })?;
    if args.json {
        let out = serde_json::json!({
            "evaluated": evaluated,
            "unmanaged": unmanaged,
            "changed": changed,
            "redirected": redirected,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for c in &changed {
            println!(
                "{:>8}  {}  {} -> {} proto {}: {} -> {} (now {}; was {})",
                c.seq,
                format_time(c.time_ns),
                c.src,
                c.dst,
                c.protocol,
                c.old,
                c.new,
                c.new_rules.join(", "),
                c.old_rules.join(", ")
            );
        }
        println!(
            "{evaluated} recorded flow(s) re-evaluated, {} would change{}",
            changed.len(),
            if unmanaged > 0 {
                format!(", {unmanaged} involve no VM of the candidate policy")
            } else {
                String::new()
            }
        );
        for (chain, n) in &redirected {
            println!("{n} allowed flow(s) would go through service chain {chain}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use palisade_agent::records::{Clock, Identities, flow_record};
    use palisade_datapath::{Engine, EngineConfig};
    use palisade_datapath::{EventKind, FlowEvent, PolicyLookup, Results, UplinkConfig, port};
    use palisade_policy::compile::Compiler;
    use palisade_policy::{MemorySource, load};
    use palisade_testkit::vm_frame;
    use palisade_wire::ethernet::EthernetAddress;
    use palisade_wire::icmpv4;

    use super::*;

    /// a (10.0.0.10) and b (10.0.0.11); b may ping a; everything else is denied.
    const POLICY: &str = r#"
version: 1
datacenter: { name: dc1, default: deny }
zones: [{ name: web, vlan: 100 }]
vms:
  - { name: a, uuid: 00000000-0000-4000-8000-00000000000a, host: h1, vnics: [{ name: a.0, mac: "02:00:00:00:00:0a", ips: [10.0.0.10], zone: web }] }
  - { name: b, uuid: 00000000-0000-4000-8000-00000000000b, host: h1, vnics: [{ name: b.0, mac: "02:00:00:00:00:0b", ips: [10.0.0.11], zone: web }] }
rules:
  datacenter:
    - { id: b-pings-a, from: 10.0.0.11, to: 10.0.0.10, service: icmp/echo-request, action: allow }
"#;

    fn icmp(from: u8, to: u8, ty: u8, code: u8, rest: [u8; 4], data: &[u8]) -> Vec<u8> {
        let mut m = vec![ty, code, 0, 0];
        m.extend_from_slice(&rest);
        m.extend_from_slice(data);
        icmpv4::Packet::new_unchecked(&mut m[..]).fill_checksum();
        vm_frame(from, to, IpProtocol::ICMP, &m)
    }

    /// The record the agent makes of a denied flow's event.
    fn record(ev: &FlowEvent, e: &Engine, model: &palisade_policy::model::Model) -> FlowRecord {
        let ids = Identities::new(model);
        flow_record(ev, "h1", e, &ids, Clock { unix_at_zero: 0 }).expect("a denied flow is recorded")
    }

    /// What-if, given the agent's records of an ICMP error, an echo request
    /// and an echo reply the engine denied, evaluates the flows the engine
    /// evaluated and reaches its verdicts under the same policy. (It used
    /// to evaluate every ICMP record as an echo request: the error, which b
    /// may not send, came out allowed as a ping; and a record held no ICMP
    /// type, so b's unsolicited echo reply, denied by the engine, came out
    /// allowed as the echo request b may send.)
    #[test]
    fn what_if_and_the_engine_agree_on_icmp() {
        let loaded = load(&MemorySource::new().with("p.yaml", POLICY)).unwrap();
        assert!(!loaded.has_errors(), "{}", loaded.render());
        let model = loaded.model.clone();
        let mut e = Engine::new(
            EngineConfig::new(UplinkConfig {
                local_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 1]),
                local_ip: Ipv4Addr::new(192, 168, 0, 1),
                gateway_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 0xfe]),
                flood: vec![],
            }),
            Box::new(PolicyLookup::new(Compiler::new(loaded.model).unwrap())),
        );
        let a = e
            .add_vnic(port::vnic_from_model(&model, "a.0", &[], 10).unwrap())
            .unwrap();
        let b = e
            .add_vnic(port::vnic_from_model(&model, "b.0", &[], 10).unwrap())
            .unwrap();
        let mut events = Vec::new();
        let mut results = Results::new();
        // b → a: host unreachable, quoting a UDP packet a never sent (unrelated).
        let quoted = vm_frame(10, 11, IpProtocol::UDP, &[0x13, 0x88, 0, 53, 0, 8, 0, 0]);
        let error = icmp(11, 10, 3, 1, [0; 4], &quoted[14..42]);
        assert!(e.process(0, b, &error, &mut events, &mut results) != palisade_datapath::Disposition::Forward);
        // a → b: an echo request, which no rule allows.
        let ping = icmp(10, 11, 8, 0, [0x12, 0x34, 0, 1], b"ping");
        assert!(e.process(1, a, &ping, &mut events, &mut results) != palisade_datapath::Disposition::Forward);
        // b → a: an echo reply to a request a never sent, which no rule allows
        // (b may send echo requests to a, not replies).
        let pong = icmp(11, 10, 0, 0, [0x56, 0x78, 0, 1], b"pong");
        assert!(e.process(2, b, &pong, &mut events, &mut results) != palisade_datapath::Disposition::Forward);
        let denied: Vec<&FlowEvent> = events
            .iter()
            .filter(|ev| matches!(ev.kind, EventKind::Denied(_)))
            .collect();
        assert_eq!(denied.len(), 3, "{events:?}");
        for ev in denied {
            let rec = record(ev, &e, &model);
            assert_eq!(
                policy_flow(&rec),
                palisade_datapath::policy_flow(&ev.key),
                "the flow the engine evaluated, for {:?}",
                ev.key
            );
            let (verdict, _, chain) = reevaluate(&model, &rec).expect("both ends are managed");
            assert_eq!(verdict, "deny", "the engine denied {:?}", ev.key);
            assert_eq!(chain, None, "a denied flow goes through no chain");
        }
        // A candidate that redirects b's pings through a chain says so.
        let appliance = r#"  - { name: ips, uuid: 00000000-0000-4000-8000-00000000000c, vnics: [{ name: ips.0, mac: "02:00:00:00:00:0c", ips: [], zone: web }, { name: ips.1, mac: "02:00:00:00:00:0d", ips: [], zone: web }] }
rules:"#;
        let candidate = format!(
            "{}\nservice_chains:\n  c: {{ appliances: [{{ vm: ips, in: ips.0, out: ips.1 }}] }}\n",
            POLICY
                .replace("action: allow }", "action: allow, redirect: c }")
                .replace("rules:", appliance)
        );
        let loaded = load(&MemorySource::new().with("p.yaml", candidate)).unwrap();
        assert!(!loaded.has_errors(), "{}", loaded.render());
        let ping = icmp(11, 10, 8, 0, [0x12, 0x34, 0, 1], b"ping");
        let mut events = Vec::new();
        assert!(e.process(3, b, &ping, &mut events, &mut results) == palisade_datapath::Disposition::Forward);
        let start = events
            .iter()
            .find(|ev| matches!(ev.kind, EventKind::Start))
            .expect("b's ping starts a flow");
        let rec = record(start, &e, &model);
        let (verdict, _, chain) = reevaluate(&loaded.model, &rec).unwrap();
        assert_eq!((verdict, chain.as_deref()), ("allow", Some("c")));
    }
}
