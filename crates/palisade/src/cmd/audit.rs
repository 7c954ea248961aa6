//! `palisade audit …` and `palisade flows`: the tamper-evident trail.
//!
//! `audit verify` checks a log offline and exits 1 with every problem (file,
//! byte offset, sequence number) when anything is wrong; given the last head
//! published outside the trail (`--expect-head FILE`) it also fails when the
//! trail ends before it or differs from it; `--server URL [--host H]` takes
//! the key and head a controller holds for the trail (and fails on the heads
//! it refused as a rollback or fork). `flows` queries a log and says
//! (on stderr, exit 1) when what the answer relies on fails its check; the
//! hidden `audit append-test` appends synthetic records and prints each
//! acknowledged sequence number, for crash tests that kill it mid-write.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use palisade_audit::record::{Endpoint, FlowRecord, Phase, Record, Verdict};
use palisade_audit::{AuditConfig, AuditLog, LogReader, Query, RecordKind, SignedHead, VerifyOptions};

/// Subcommands of `palisade audit`.
#[derive(clap::Subcommand, Debug)]
pub enum AuditCmd {
    /// Export records as IPFIX or JSON lines.
    Export(super::audit_export::ExportArgs),
    /// Verify a log: hash chain, segment continuity, checkpoint signatures.
    Verify(VerifyArgs),
    /// Append synthetic records, printing each acknowledged sequence number (for crash tests).
    #[command(hide = true)]
    AppendTest(AppendTestArgs),
}

/// Arguments of `palisade audit verify`.
#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// The log directory.
    pub dir: PathBuf,
    /// Public key to verify signatures with (default: the expected head's, else DIR/audit.pub, which only shows self-consistency).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// The last head published outside the trail (the file its writer's head_file names): fail if the trail ends before it or differs from it.
    #[arg(long, value_name = "FILE", conflicts_with = "server")]
    pub expect_head: Option<PathBuf>,
    /// Check against the key and head a controller holds for the trail (pinned both): fail if the trail ends before the head, differs from it, or the controller refused a head of it (a rollback or fork). With --token, --ca [env: PALISADE_TOKEN, PALISADE_CA].
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// With --server: the agent host whose trail this is (default: the controller's own trail).
    #[arg(long, requires = "server")]
    pub host: Option<String>,
    /// With --server: API token [env: PALISADE_TOKEN].
    #[arg(long, requires = "server")]
    pub token: Option<String>,
    /// With --server: CA certificate to trust for HTTPS [env: PALISADE_CA].
    #[arg(long, requires = "server")]
    pub ca: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `palisade audit append-test`.
#[derive(clap::Args, Debug)]
pub struct AppendTestArgs {
    /// The log directory (created if missing).
    pub dir: PathBuf,
    /// How many records to append.
    #[arg(long)]
    pub count: u64,
    /// Records per append (each append is one fdatasync).
    #[arg(long, default_value_t = 1)]
    pub batch: u64,
    /// Segment size, to exercise rotation.
    #[arg(long, default_value_t = 64 << 20)]
    pub segment_bytes: u64,
    /// The signing key file (default: DIR.key beside the directory).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Publish each signed head to this file.
    #[arg(long)]
    pub head_file: Option<PathBuf>,
}

/// Arguments of `palisade flows`: a log directory (`--dir`) or a controller
/// (`--server`, else `PALISADE_SERVER` when no `--dir` is given).
#[derive(clap::Args, Debug)]
pub struct FlowsArgs {
    /// The log directory.
    #[arg(long, conflicts_with_all = ["server", "token", "ca"])]
    pub dir: Option<PathBuf>,
    /// With --dir: the public key to check the log with (default: DIR/audit.pub).
    #[arg(long, requires = "dir")]
    pub key: Option<PathBuf>,
    /// Or query a controller's audit log.
    #[command(flatten)]
    pub conn: super::ctl::Conn,
    /// A VM at either end (or the VM a change concerns).
    #[arg(long)]
    pub vm: Option<String>,
    /// A zone at either end.
    #[arg(long)]
    pub zone: Option<String>,
    /// allow, deny or reject.
    #[arg(long, value_parser = parse_verdict)]
    pub verdict: Option<Verdict>,
    /// A deciding rule id.
    #[arg(long)]
    pub rule: Option<String>,
    /// Records since: a duration back from now (`90s`, `15m`, `1h`, `7d`), RFC 3339, or Unix nanoseconds.
    #[arg(long)]
    pub since: Option<String>,
    /// Records before: same forms as --since.
    #[arg(long)]
    pub until: Option<String>,
    /// At most this many records (from a controller: 1000 unless given, 100000 at most).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Include change records too (default: flows only).
    #[arg(long)]
    pub changes: bool,
    /// Only records of this kind: flow, change, or alert (inline inspection's
    /// alerts and the records of alerts shed); with --dir.
    #[arg(long, value_parser = parse_kind, conflicts_with = "changes")]
    pub kind: Option<RecordKind>,
    /// One JSON object per line: {"seq": N, "record": {...}}.
    #[arg(long)]
    pub json: bool,
}

fn parse_kind(s: &str) -> Result<RecordKind, String> {
    match s {
        "flow" => Ok(RecordKind::Flow),
        "change" => Ok(RecordKind::Change),
        "alert" => Ok(RecordKind::Alert),
        _ => Err(format!("`{s}`: expected flow, change or alert")),
    }
}

fn parse_verdict(s: &str) -> Result<Verdict, String> {
    match s {
        "allow" => Ok(Verdict::Allow),
        "deny" => Ok(Verdict::Deny),
        "reject" => Ok(Verdict::Reject),
        _ => Err(format!("`{s}`: expected allow, deny or reject")),
    }
}

/// Run an audit subcommand.
pub fn run(cmd: AuditCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCmd::Export(a) => super::audit_export::run(a),
        AuditCmd::Verify(a) => verify(a),
        AuditCmd::AppendTest(a) => append_test(a),
    }
}

fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let key = match &a.key {
        Some(p) => Some((
            palisade_audit::checkpoint::read_verifying_key(p)?,
            p.display().to_string(),
        )),
        None => None,
    };
    if let Some(server) = &a.server {
        let conn = super::ctl::Conn {
            server: Some(server.clone()),
            token: a.token.clone(),
            ca: a.ca.clone(),
        };
        let published = conn
            .client()?
            .published_heads(a.host.as_deref())
            .with_context(|| format!("fetching the audit key and head from {server}"))?;
        if let Some((k, src)) = &key
            && k.to_bytes() != published.public_key
        {
            bail!(
                "the key {src} is not the one {} pinned for this trail ({})",
                published.source,
                palisade_api::validate::hex(&published.public_key)
            );
        }
        let report = palisade_audit::verify::verify_published(&a.dir, &published)
            .with_context(|| format!("verifying the audit log in {}", a.dir.display()))?;
        return print_report(&a, &report, true);
    }
    let expect_head = match &a.expect_head {
        Some(p) => {
            let head = SignedHead::read(p)?.with_context(|| format!("{}: no head there", p.display()))?;
            Some((head, p.display().to_string()))
        }
        None => None,
    };
    let report = palisade_audit::verify_with(&a.dir, &VerifyOptions { key, expect_head })
        .with_context(|| format!("verifying the audit log in {}", a.dir.display()))?;
    print_report(&a, &report, a.expect_head.is_some())
}

/// Print a verification report; exit 1 unless intact.
fn print_report(a: &VerifyArgs, report: &palisade_audit::VerifyReport, had_head: bool) -> anyhow::Result<ExitCode> {
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if report.is_ok() {
        let head = report
            .head_seq
            .map(|h| format!("; contains the expected head (seq {h})"))
            .unwrap_or_default();
        println!(
            "{}: intact: {} records (seq {}..={}) in {} segments; {} valid checkpoints, signed through seq {} ({} unsigned after it){head}",
            a.dir.display(),
            report.records,
            report.first_seq,
            report.last_seq,
            report.segments,
            report.checkpoints,
            report.signed_through,
            report.unsigned_records,
        );
    } else {
        println!("{}: {} problem(s):", a.dir.display(), report.problems.len());
        for p in &report.problems {
            println!("  {p}");
        }
        if report.only_torn_tail() {
            println!("only a torn tail (an interrupted append): opening the log sets it aside");
        }
    }
    if !a.json {
        for n in &report.notes {
            println!("note: {n}");
        }
        if !had_head {
            println!(
                "note: without --expect-head or --server, a tail cut to a signed checkpoint, a deleted last segment or an older copy of the trail is not detectable"
            );
        }
    }
    Ok(if report.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub(crate) use super::unix_now_ns as now_ns;

fn append_test(a: AppendTestArgs) -> anyhow::Result<ExitCode> {
    let config = AuditConfig {
        segment_bytes: a.segment_bytes,
        key_file: a.key_file.clone(),
        head_file: a.head_file.clone(),
        ..AuditConfig::default()
    };
    let mut log = AuditLog::open(&a.dir, config).with_context(|| format!("opening {}", a.dir.display()))?;
    for t in &log.recovery().torn {
        eprintln!(
            "recovered: {} bytes torn at {} byte {} moved to {}",
            t.bytes,
            t.file.display(),
            t.offset,
            t.moved_to.display()
        );
    }
    let mut stdout = std::io::stdout().lock();
    let mut left = a.count;
    while left > 0 {
        let n = left.min(a.batch.max(1));
        let batch: Vec<Record> = (0..n).map(|i| synthetic(log.last_seq() + i + 1)).collect();
        let seq = log.append(&batch)?;
        writeln!(stdout, "{seq}")?;
        stdout.flush()?;
        left -= n;
    }
    Ok(ExitCode::SUCCESS)
}

/// A synthetic flow record numbered `n`.
fn synthetic(n: u64) -> Record {
    let vm = |i: u64| palisade_audit::record::VmIdentity {
        name: format!("vm-{}", i % 16),
        uuid: format!("00000000-0000-0000-0000-{:012}", i % 16),
        vnic: format!("vm-{}.0", i % 16),
        zone: ["web", "app", "db"][(i % 3) as usize].into(),
        cluster: None,
        host: Some("test".into()),
        tags: Default::default(),
    };
    let t = 1_700_000_000_000_000_000 + n * 1_000_000;
    Record::Flow(FlowRecord {
        appliance: None,
        time_ns: t,
        flow_id: n,
        host: "test".into(),
        phase: Phase::Start,
        src: Endpoint {
            addr: std::net::Ipv4Addr::from(0x0a00_0000 + (n % 200) as u32).into(),
            port: 30000 + (n % 30000) as u16,
            vm: Some(vm(n)),
        },
        dst: Endpoint {
            addr: std::net::Ipv4Addr::from(0x0a00_0100 + (n % 7) as u32).into(),
            port: 443,
            vm: Some(vm(n + 5)),
        },
        protocol: 6,
        icmp: None,
        verdict: if n % 3 == 0 { Verdict::Deny } else { Verdict::Allow },
        decided_by: vec![palisade_audit::record::Decision {
            rule: format!("rule-{}", n % 10),
            level: "zone".into(),
            policy_version: 1,
            chain: "egress".into(),
        }],
        packets_out: n,
        bytes_out: n * 64,
        packets_in: 0,
        bytes_in: 0,
        start_ns: t,
        last_ns: t,
    })
}

/// Parse a time given on the command line (`palisade_audit::time::parse_time`).
pub(crate) fn parse_time(s: &str, now: u64) -> anyhow::Result<u64> {
    Ok(palisade_audit::time::parse_time(s, now)?)
}

/// RFC 3339 (UTC, milliseconds) of Unix nanoseconds.
pub(crate) use palisade_audit::time::format_rfc3339 as format_time;

/// `vm (addr:port)` or `addr:port`.
pub(crate) fn endpoint(e: &Endpoint) -> String {
    let addr = match e.addr {
        std::net::IpAddr::V6(a) => format!("[{a}]:{}", e.port),
        a => format!("{a}:{}", e.port),
    };
    match &e.vm {
        Some(vm) => format!("{}({addr})", vm.name),
        None => addr,
    }
}

/// Where `palisade flows` reads: a log directory, or a controller's answer.
enum Source {
    Log(Box<LogReader>),
    Fetched(Vec<(u64, Record)>),
}

/// Run `palisade flows`.
pub fn flows(a: FlowsArgs) -> anyhow::Result<ExitCode> {
    let now = now_ns();
    let q = Query {
        vm: a.vm,
        zone: a.zone,
        verdict: a.verdict,
        rule: a.rule,
        since_ns: a.since.as_deref().map(|s| parse_time(s, now)).transpose()?,
        until_ns: a.until.as_deref().map(|s| parse_time(s, now)).transpose()?,
        limit: a.limit,
        kind: match a.kind {
            Some(k) => Some(k),
            None => (!a.changes).then_some(RecordKind::Flow),
        },
    };
    if a.dir.is_none() && a.kind.is_some_and(|k| k != RecordKind::Flow) {
        bail!(
            "--kind change or alert reads a log directory (--dir DIR); a controller's alerts: `palisade alerts --server URL`, its changes: --changes"
        );
    }
    // Open or fetch before printing anything, so a failure prints only the error.
    let source = match &a.dir {
        Some(dir) => {
            let reader = match &a.key {
                Some(k) => LogReader::open_with_key(dir, palisade_audit::checkpoint::read_verifying_key(k)?),
                None => LogReader::open(dir),
            };
            Source::Log(Box::new(
                reader.with_context(|| format!("opening the audit log in {}", dir.display()))?,
            ))
        }
        None => {
            let client = a
                .conn
                .client()
                .context("palisade flows reads a log directory (--dir DIR) or asks a controller")?;
            let fq = palisade_api::FlowQuery {
                vm: q.vm.clone(),
                zone: q.zone.clone(),
                verdict: q.verdict,
                rule: q.rule.clone(),
                since_ns: q.since_ns,
                until_ns: q.until_ns,
                limit: q.limit,
                changes: a.changes,
            };
            Source::Fetched(
                client
                    .flows(&fq)
                    .with_context(|| format!("querying flows on {}", client.current_url()))?,
            )
        }
    };
    let mut out = std::io::stdout().lock();
    if !a.json {
        writeln!(
            out,
            "{:>8}  {:24}  {:7}  {:5}  {:32}  {:32}  RULE",
            "SEQ", "TIME", "VERDICT", "PROTO", "SOURCE", "DESTINATION"
        )?;
    }
    let mut err = None;
    let mut each = |seq: u64, rec: Record| {
        let r = if a.json {
            serde_json::to_string(&serde_json::json!({ "seq": seq, "record": rec }))
                .map_err(anyhow::Error::from)
                .and_then(|line| writeln!(out, "{line}").map_err(Into::into))
        } else {
            writeln!(out, "{}", row(seq, &rec)).map_err(Into::into)
        };
        match r {
            Ok(()) => true,
            Err(e) => {
                err = Some(e);
                false
            }
        }
    };
    let mut problems = Vec::new();
    let n = match source {
        Source::Log(reader) => {
            let report = reader.query_report(&q, each)?;
            problems = report.problems;
            report.matches
        }
        Source::Fetched(records) => {
            let n = records.len();
            for (seq, rec) in records {
                if !each(seq, rec) {
                    break;
                }
            }
            n
        }
    };
    if let Some(e) = err {
        return Err(e);
    }
    if !a.json {
        writeln!(out, "{n} record(s)")?;
    }
    if problems.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    // The answer relied on something that fails its check: say so, and fail.
    drop(out);
    eprintln!(
        "palisade flows: WARNING: the audit trail fails verification where this answer relies on it; it may be incomplete or wrong ({} problem(s)):",
        problems.len()
    );
    for p in &problems {
        eprintln!("  {p}");
    }
    eprintln!("run `palisade audit verify` for the whole trail");
    Ok(ExitCode::FAILURE)
}

fn row(seq: u64, rec: &Record) -> String {
    match rec {
        Record::Flow(f) => {
            let verdict = match f.verdict {
                Verdict::Allow => "allow",
                Verdict::Deny => "deny",
                Verdict::Reject => "reject",
            };
            let phase = match f.phase {
                Phase::Start => "",
                Phase::Update => " (update)",
                Phase::End(_) => " (end)",
            };
            let rules: Vec<String> = f.decided_by.iter().map(|d| format!("{}:{}", d.chain, d.rule)).collect();
            format!(
                "{seq:>8}  {:24}  {:7}  {:5}  {:32}  {:32}  {}{phase}",
                format_time(f.time_ns),
                verdict,
                f.protocol,
                endpoint(&f.src),
                endpoint(&f.dst),
                rules.join(",")
            )
        }
        Record::Change(c) => format!(
            "{seq:>8}  {:24}  change   {} {} {} (by {})",
            format_time(c.time_ns),
            c.action,
            c.resource,
            c.diff.lines().next().unwrap_or(""),
            c.actor
        ),
        Record::Alert(al) => {
            let end = |ip: std::net::IpAddr, port: u16, vm: &Option<palisade_audit::record::VmIdentity>| {
                endpoint(&Endpoint {
                    addr: ip,
                    port,
                    vm: vm.clone(),
                })
            };
            let repeated = if al.count > 1 {
                format!(" (x{})", al.count)
            } else {
                String::new()
            };
            format!(
                "{seq:>8}  {:24}  {:7}  {:5}  {:32}  {:32}  sid {}:{} {:?}{repeated} profile {}",
                format_time(al.time_ns),
                if al.blocked() { "blocked" } else { "alert" },
                al.proto,
                end(al.src_ip, al.src_port, &al.src),
                end(al.dest_ip, al.dest_port, &al.dest),
                al.alert.signature_id,
                al.alert.rev,
                al.alert.signature,
                al.profile,
            )
        }
        Record::AlertsNotRecorded(n) => format!(
            "{seq:>8}  {:24}  alerts   {} alert(s) not recorded ({} drop/reject) since {}",
            format_time(n.time_ns),
            n.count,
            n.blocked,
            format_time(n.since_ns),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_and_format() {
        let now = 10_000 * 1_000_000_000;
        assert_eq!(parse_time("1h", now).unwrap(), now - 3_600_000_000_000);
        assert_eq!(parse_time("90s", now).unwrap(), now - 90_000_000_000);
        assert_eq!(parse_time("123", now).unwrap(), 123);
        let t = parse_time("2023-11-14T22:13:20Z", now).unwrap();
        assert_eq!(t, 1_700_000_000_000_000_000);
        assert_eq!(parse_time("2023-11-14T23:13:20.5+01:00", now).unwrap(), t + 500_000_000);
        assert_eq!(format_time(t + 500_000_000), "2023-11-14T22:13:20.500Z");
        assert_eq!(format_time(0), "1970-01-01T00:00:00.000Z");
        for bad in [
            "yesterday",
            "2023-13-01T00:00:00Z",
            "2023-11-14T22:13:20",
            "1969-12-31T23:59:59Z",
        ] {
            assert!(parse_time(bad, now).is_err(), "{bad}");
        }
    }
}
