//! `palisade alerts`: inline inspection's recent alerts, from an agent or
//! from the controller.
//!
//! By default reads the agent's `/alerts` over its Unix socket (the state
//! directory's `agent.sock`: this host's last 4,096); with `--server URL`
//! (and `--token`, `--ca`, as the other controller commands) asks the
//! controller's `GET /v1/alerts`, which holds every host's recent alerts and
//! filters them there. Either way it prints one line each, both ends named
//! by their VM, vNIC and zone, or the records as JSON lines. The durable
//! record is each host's audit trail: `palisade flows --dir DIR --kind alert`.

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
    /// Only the last N (after filtering; from a controller: 1000 unless given, 20000 at most).
    #[arg(long)]
    last: Option<usize>,
    /// Only alerts raised since: a duration back from now (`90s`, `15m`, `1h`, `7d`), RFC 3339, or Unix nanoseconds.
    #[arg(long)]
    since: Option<String>,
    /// Only alerts raised before: same forms as --since.
    #[arg(long)]
    until: Option<String>,
    /// With --server: only alerts this host raised.
    #[arg(long, requires = "server")]
    host: Option<String>,
    /// Ask a controller instead of the local agent.
    #[command(flatten)]
    conn: super::ctl::Conn,
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
    let now = super::unix_now_ns();
    let since = args
        .since
        .as_deref()
        .map(|s| super::audit::parse_time(s, now))
        .transpose()?;
    let until = args
        .until
        .as_deref()
        .map(|s| super::audit::parse_time(s, now))
        .transpose()?;
    if args.conn.server.is_some() {
        if args.socket.is_some() {
            anyhow::bail!("give --server (the controller) or --socket (an agent), not both");
        }
        let client = args.conn.client()?;
        let q = palisade_api::AlertQuery {
            host: args.host.clone(),
            vm: args.vm.clone(),
            sid: args.sid,
            action: args.action.clone(),
            since_ns: since,
            until_ns: until,
            limit: args.last,
        };
        let list = client
            .alerts(&q)
            .with_context(|| format!("querying alerts on {}", client.current_url()))?;
        for a in &list.alerts {
            print(a, args.json)?;
        }
        if list.truncated && !args.json {
            eprintln!(
                "palisade alerts: more alerts matched; these are the newest {} (--last N for more)",
                list.alerts.len()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let socket = args.socket.clone().unwrap_or_else(|| args.state_dir.join("agent.sock"));
    let body = palisade_agent::http::get_unix(&socket, "/alerts")
        .with_context(|| format!("reading /alerts from the agent at {}", socket.display()))?;
    let alerts: Vec<AlertRecord> =
        serde_json::from_str(&body).with_context(|| format!("the agent at {} sent no alert list", socket.display()))?;
    let kept: Vec<&AlertRecord> = alerts
        .iter()
        .filter(|a| args.sid.is_none_or(|s| a.alert.signature_id == s))
        .filter(|a| args.action.as_ref().is_none_or(|x| a.alert.action == *x))
        .filter(|a| args.vm.as_ref().is_none_or(|vm| a.names_vm(vm)))
        .filter(|a| since.is_none_or(|t| a.last_ns.max(a.time_ns) >= t))
        .filter(|a| until.is_none_or(|t| a.time_ns < t))
        .collect();
    let skip = args.last.map_or(0, |n| kept.len().saturating_sub(n));
    for a in &kept[skip..] {
        print(a, args.json)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print(a: &AlertRecord, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(a)?);
    } else {
        println!("{}", line(a));
    }
    Ok(())
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
    let repeated = if a.count > 1 {
        format!(" (x{})", a.count)
    } else {
        String::new()
    };
    format!(
        "{} {} {} {} [{}:{}] {}{repeated} {} profile {} {} -> {}",
        a.timestamp,
        a.host,
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
