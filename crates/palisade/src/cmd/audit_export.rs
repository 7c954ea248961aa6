//! `palisade audit export`: records as IPFIX over UDP or JSON lines.
//!
//! Reads the log without writing to it (a running agent may be appending),
//! applies the same filters as `palisade flows`, and sends flow records to an
//! IPFIX collector (RFC 7011; templates and Palisade's enterprise elements in
//! `palisade_audit::ipfix`) or writes every record as one JSON object per line.
//! Records the exporter's rate limit drops are counted and reported: nothing
//! is dropped silently.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use palisade_audit::export;
use palisade_audit::ipfix::IpfixExporter;
use palisade_audit::{LogReader, Query, RecordKind};

use palisade_audit::time::parse_time;

use super::unix_now_ns;

/// Arguments of `palisade audit export`.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// The log directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// Write JSON lines to this file (`-` for standard output).
    #[arg(long, conflicts_with = "ipfix", required_unless_present = "ipfix")]
    pub json: Option<String>,
    /// Send flow records to this IPFIX collector (UDP).
    #[arg(long)]
    pub ipfix: Option<SocketAddr>,
    /// IPFIX observation domain id.
    #[arg(long, default_value_t = 1)]
    pub domain: u32,
    /// At most this many flow records per second to the collector (the rest are counted as dropped).
    #[arg(long)]
    pub rate: Option<u32>,
    /// Only records of this VM (either end).
    #[arg(long)]
    pub vm: Option<String>,
    /// Records since: a duration back from now (`1h`, `7d`), RFC 3339, or Unix nanoseconds.
    #[arg(long)]
    pub since: Option<String>,
    /// Records before: same forms as --since.
    #[arg(long)]
    pub until: Option<String>,
}

/// Run the export.
pub fn run(a: ExportArgs) -> anyhow::Result<ExitCode> {
    let now = unix_now_ns();
    let mut q = Query {
        vm: a.vm.clone(),
        since_ns: a.since.as_deref().map(|s| parse_time(s, now)).transpose()?,
        until_ns: a.until.as_deref().map(|s| parse_time(s, now)).transpose()?,
        ..Query::default()
    };
    let reader = LogReader::open(&a.dir).with_context(|| format!("opening the audit log in {}", a.dir.display()))?;
    match (&a.json, a.ipfix) {
        (Some(path), _) => {
            let n = if path == "-" {
                export::to_json_lines(&reader, &q, std::io::BufWriter::new(std::io::stdout().lock()))?
            } else {
                let f = std::fs::File::create(path).with_context(|| format!("creating {path}"))?;
                let mut w = std::io::BufWriter::new(f);
                let n = export::to_json_lines(&reader, &q, &mut w)?;
                w.flush().with_context(|| format!("writing {path}"))?;
                n
            };
            eprintln!("exported {n} records as JSON lines");
        }
        (None, Some(collector)) => {
            q.kind = Some(RecordKind::Flow);
            let mut exporter = IpfixExporter::connect(collector, a.domain)
                .with_context(|| format!("opening a UDP socket towards {collector}"))?;
            if let Some(r) = a.rate {
                exporter = exporter.with_rate_limit(r);
            }
            let clock = || (unix_now_ns() / 1_000_000_000) as u32;
            let done = export::to_ipfix(&reader, &q, &mut exporter, clock)?;
            exporter.flush(clock()).context("sending the last IPFIX message")?;
            let s = exporter.stats();
            eprintln!(
                "exported {} flow records to {collector} in {} IPFIX messages; {} dropped by the rate limit, {} send errors",
                done.flows, s.messages_sent, done.rate_limited, s.send_errors
            );
            if done.rate_limited > 0 || s.send_errors > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        (None, None) => bail!("say where to: --json FILE or --ipfix HOST:PORT"),
    }
    Ok(ExitCode::SUCCESS)
}
