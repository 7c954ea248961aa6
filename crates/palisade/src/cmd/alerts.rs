//! `palisade alerts`: inline inspection's recent alerts, from an agent.
//!
//! Reads the agent's `/alerts` over its Unix socket (the state directory's
//! `agent.sock`), filters and prints them: one line each, both ends named by
//! their VM, vNIC and zone, or the records as JSON lines.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use palisade_agent::inspection::AlertRecord;

/// `palisade alerts` arguments.
#[derive(Args, Debug)]
pub struct AlertsArgs {
    /// The agent's Unix socket (default: STATE_DIR/agent.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The agent's state directory.
    #[arg(long, default_value = "/var/lib/palisade")]
    state_dir: PathBuf,
    /// Only this signature.
    #[arg(long)]
    sid: Option<u32>,
    /// Only alerts whose packet was `allowed` or `blocked`.
    #[arg(long)]
    action: Option<String>,
    /// Only alerts with this VM at either end.
    #[arg(long)]
    vm: Option<String>,
    /// Only the last N (after filtering).
    #[arg(long)]
    last: Option<usize>,
    /// Print the records as JSON lines.
    #[arg(long)]
    json: bool,
}

/// Runs `palisade alerts`.
pub fn run(args: AlertsArgs) -> anyhow::Result<ExitCode> {
    if let Some(a) = &args.action
        && a != "allowed"
        && a != "blocked"
    {
        anyhow::bail!("--action {a:?}: give allowed or blocked");
    }
    let socket = args.socket.clone().unwrap_or_else(|| args.state_dir.join("agent.sock"));
    let body = palisade_agent::http::get_unix(&socket, "/alerts")
        .with_context(|| format!("reading /alerts from the agent at {}", socket.display()))?;
    let alerts: Vec<AlertRecord> =
        serde_json::from_str(&body).with_context(|| format!("the agent at {} sent no alert list", socket.display()))?;
    let names_vm = |a: &AlertRecord, vm: &str| {
        [&a.src, &a.dest]
            .iter()
            .any(|e| e.as_ref().is_some_and(|i| i.name == vm))
    };
    let kept: Vec<&AlertRecord> = alerts
        .iter()
        .filter(|a| args.sid.is_none_or(|s| a.alert.signature_id == s))
        .filter(|a| args.action.as_ref().is_none_or(|x| a.alert.action == *x))
        .filter(|a| args.vm.as_ref().is_none_or(|vm| names_vm(a, vm)))
        .collect();
    let skip = args.last.map_or(0, |n| kept.len().saturating_sub(n));
    for a in &kept[skip..] {
        if args.json {
            println!("{}", serde_json::to_string(a)?);
        } else {
            println!("{}", line(a));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One alert for people: when, what was done, the signature, both ends.
fn line(a: &AlertRecord) -> String {
    let end = |ip: std::net::IpAddr, port: u16, id: &Option<palisade_audit::record::VmIdentity>| {
        let addr = if ip.is_ipv6() {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        };
        match id {
            Some(i) => format!("{addr} ({} {} zone {})", i.name, i.vnic, i.zone),
            None => format!("{addr} (external)"),
        }
    };
    format!(
        "{} {} {} [{}:{}] {} {} profile {} {} -> {}",
        a.timestamp,
        a.alert.action,
        a.alert.rule_action,
        a.alert.signature_id,
        a.alert.rev,
        printable(&a.alert.signature),
        a.proto,
        a.profile,
        end(a.src_ip, a.src_port, &a.src),
        end(a.dest_ip, a.dest_port, &a.dest),
    )
}

/// Rule text shown on a terminal: control characters escaped.
fn printable(s: &str) -> String {
    format!("{:?}", s)
}
