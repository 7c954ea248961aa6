//! `palisade policy what-if`: recorded flows against a candidate policy.
//!
//! Every recorded flow start in the window is evaluated again with the
//! candidate policy's reference evaluator — the source vNIC's egress chain and
//! the destination vNIC's ingress chain, combined as the engine combines them
//! — and the flows whose verdict would change are listed with the rule that
//! would decide now. Addresses are taken as recorded (IPv4-mapped IPv6 as
//! IPv4, as the engine keys them); ICMP records carry the echo identifier, not
//! the type, so ICMP flows are evaluated as echo requests, which is what
//! starts an ICMP flow in the engine.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use palisade_audit::record::{FlowRecord, Phase, Record, Verdict};
use palisade_audit::{LogReader, Query, RecordKind};
use palisade_policy::eval::{Flow, evaluate};
use palisade_policy::model::{Action, Model};
use palisade_policy::{DirSource, load};

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

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The policy flow of a recorded flow start.
fn policy_flow(f: &FlowRecord) -> Flow {
    let (src_port, dst_port) = match f.protocol {
        1 => (8, 0),
        58 => (128, 0),
        _ => (f.src.port, f.dst.port),
    };
    Flow {
        src: canonical(f.src.addr),
        dst: canonical(f.dst.addr),
        proto: f.protocol,
        src_port,
        dst_port,
    }
}

/// The candidate verdict of a recorded flow, with the deciding rules; `None`
/// when the candidate policy manages neither end.
fn reevaluate(model: &Model, f: &FlowRecord) -> Option<(&'static str, Vec<String>)> {
    let d = evaluate(model, &policy_flow(f))?;
    let verdict = match d.action {
        Action::Allow => "allow",
        Action::Reject => "reject",
        // `pass` never ends a chain; anything else drops.
        Action::Deny | Action::Pass => "deny",
    };
    Some((verdict, d.provenance.iter().map(ToString::to_string).collect()))
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
    reader.query_each(&q, |seq, rec| {
        let Record::Flow(f) = rec else { return true };
        if f.phase != Phase::Start {
            return true;
        }
        evaluated += 1;
        match reevaluate(&loaded.model, &f) {
            None => unmanaged += 1,
            Some((new, new_rules)) if new != verdict_name(f.verdict) => changed.push(Changed {
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
    }
    Ok(ExitCode::SUCCESS)
}
