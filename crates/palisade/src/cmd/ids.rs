//! `palisade ids`: the signature engine offline.
//!
//! `run` reads a capture with the capture reader, feeds every frame to the
//! same engine the datapath uses (through `palisade_inspect::offline`), and
//! writes EVE JSON lines. `check` loads a rules file and lists what it
//! refuses. The options are Suricata's settings of the same meaning: IPS
//! mode, checksum validation off, midstream pickup, inline stream
//! inspection, and a suricata.yaml read for its `eve-log` types (alert,
//! flow, drop, http, dns, tls) and drop logging.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use palisade_inspect::decode::LinkType;
use palisade_inspect::eve::{DropLog, EveOptions, Identity};
use palisade_inspect::offline::{Replay, ReplayOptions};
use palisade_inspect::rules::RuleContext;
use palisade_inspect::{Config, Inspector, LoadOptions, Mode, ProfileSpec, RuleSet};
use palisade_io::capture::CaptureReader;
use palisade_policy::yaml::{Node, NodeKind};

/// `palisade ids` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum IdsCmd {
    /// Inspect a capture with a rules file and write EVE JSON.
    Run(RunArgs),
    /// Load a rules file and report the rules it refuses, with line and column.
    Check {
        /// Rules file (Suricata rule language subset).
        #[arg(long)]
        rules: PathBuf,
    },
}

/// Arguments of `palisade ids run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Rules file (Suricata rule language subset).
    #[arg(long)]
    rules: PathBuf,
    /// Capture to inspect (pcap or pcapng, gzip-compressed or not).
    #[arg(long)]
    pcap: PathBuf,
    /// Where to write EVE JSON lines.
    #[arg(long)]
    eve: PathBuf,
    /// IPS mode: drop and reject rules act; stream data is inspected as it arrives.
    #[arg(long)]
    ips: bool,
    /// Accept packets whose checksums are wrong (captures taken with checksum offload).
    #[arg(long)]
    checksum_off: bool,
    /// Take up TCP connections first seen after their handshake.
    #[arg(long)]
    midstream: bool,
    /// Inspect TCP data as it arrives rather than once acknowledged.
    #[arg(long)]
    inline_stream: bool,
    /// A suricata.yaml to read the eve-log record types and drop logging from.
    #[arg(long)]
    suricata_yaml: Option<PathBuf>,
    /// Inspection profile: full, standard or critical.
    #[arg(long, default_value = "full")]
    profile: String,
    /// Load the rules that parse even when others are refused (they are listed).
    #[arg(long)]
    skip_invalid: bool,
    /// A threshold.config: threshold, event_filter and suppress entries.
    #[arg(long, value_name = "FILE")]
    threshold: Option<PathBuf>,
    /// VM name to add to every record.
    #[arg(long)]
    vm: Option<String>,
    /// Zone name to add to every record.
    #[arg(long)]
    zone: Option<String>,
}

/// Runs a `palisade ids` subcommand.
pub fn run(cmd: IdsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        IdsCmd::Run(args) => run_capture(args),
        IdsCmd::Check { rules } => check(&rules),
    }
}

fn load_rules(path: &Path, skip_invalid: bool) -> anyhow::Result<RuleSet> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading rules {}", path.display()))?;
    match RuleSet::parse(&text, &RuleContext::default(), LoadOptions { skip_invalid }) {
        Ok(set) => {
            for e in set.refused() {
                eprintln!("{}: {e}", path.display());
            }
            if !set.refused().is_empty() {
                eprintln!(
                    "{}: {} rule(s) loaded, {} refused",
                    path.display(),
                    set.len(),
                    set.refused().len()
                );
            }
            Ok(set)
        }
        Err(palisade_inspect::LoadError::Refused(errors)) => {
            for e in &errors {
                eprintln!("{}: {e}", path.display());
            }
            bail!(
                "{}: {} rule(s) refused (use --skip-invalid to load the others)",
                path.display(),
                errors.len()
            )
        }
        Err(e) => Err(e).with_context(|| format!("loading {}", path.display())),
    }
}

fn check(path: &Path) -> anyhow::Result<ExitCode> {
    let set = load_rules(path, true)?;
    println!(
        "{}: {} rule(s) loaded, {} refused",
        path.display(),
        set.len(),
        set.refused().len()
    );
    Ok(if set.refused().is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Apply the threshold.config at `path` to `set`: refused with its line and
/// column; entries naming no loaded signature are reported.
fn apply_thresholds(set: &mut RuleSet, path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let cfg = palisade_inspect::rules::threshold_config::ThresholdConfig::parse(&text, &RuleContext::default().vars)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    for line in set.apply_threshold_config(&cfg) {
        eprintln!(
            "{}: line {line}: names no loaded signature; it changes nothing",
            path.display()
        );
    }
    Ok(())
}

fn run_capture(args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut rules = load_rules(&args.rules, args.skip_invalid)?;
    if let Some(t) = &args.threshold {
        apply_thresholds(&mut rules, t)?;
    }
    let rules = Arc::new(rules);
    let profile = ProfileSpec::builtin(&args.profile).with_context(|| format!("unknown profile {:?}", args.profile))?;
    let eve = match &args.suricata_yaml {
        Some(p) => eve_options(p)?,
        None => EveOptions::default(),
    };
    let config = Config {
        mode: if args.ips { Mode::Ips } else { Mode::Ids },
        inline_stream: args.inline_stream,
        midstream: args.midstream,
        app_logs: eve.http || eve.dns || eve.tls,
        ..Config::default()
    };
    let inspector = Inspector::new(rules.clone(), vec![profile], config).context("compiling the profile")?;
    let profile_id = inspector.profile(&args.profile).context("profile compiled")?;
    let identity = (args.vm.is_some() || args.zone.is_some()).then(|| Identity {
        vm: args.vm.clone(),
        zone: args.zone.clone(),
        rule: None,
        profile: Some(args.profile.clone()),
    });
    let mut replay = Replay::new(
        inspector,
        profile_id,
        ReplayOptions {
            validate_checksums: !args.checksum_off,
            eve,
            identity,
        },
    );
    let mut reader = CaptureReader::open(&args.pcap).with_context(|| format!("opening {}", args.pcap.display()))?;
    let file = std::fs::File::create(&args.eve).with_context(|| format!("creating {}", args.eve.display()))?;
    let mut w = BufWriter::new(file);
    let mut buf = Vec::new();
    let mut lines = Vec::new();
    let started = Instant::now();
    let mut damaged = None;
    while let Some(next) = reader.next_into(&mut buf) {
        let meta = match next {
            Ok(m) => m,
            Err(e) => {
                damaged = Some(e);
                break;
            }
        };
        replay.frame(LinkType(meta.linktype.0), meta.timestamp, &buf, &mut lines);
        for l in lines.drain(..) {
            writeln!(w, "{l}")?;
        }
    }
    replay.finish(&mut lines);
    for l in lines.drain(..) {
        writeln!(w, "{l}")?;
    }
    w.flush()?;
    let s = replay.stats();
    let c = replay.inspector().counters();
    eprintln!(
        "{}: {} frames, {} packets inspected, {} flows, {} alerts, {} drops, {} rejects in {:.3} s ({} not IP, {} malformed, {} bad checksum, {} unsupported link)",
        args.pcap.display(),
        s.frames,
        s.packets,
        s.flows,
        c.alerts,
        c.drops,
        c.rejects,
        started.elapsed().as_secs_f64(),
        s.not_ip,
        s.malformed,
        s.bad_checksum,
        s.bad_link,
    );
    if let Some(e) = damaged {
        eprintln!("palisade: {e} (the packets before it were inspected)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads the first `eve-log` output of a suricata.yaml: its record types,
/// and the `drop` type's `alerts` and `flows` settings.
fn eve_options(path: &Path) -> anyhow::Result<EveOptions> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: Arc<str> = Arc::from(path.display().to_string());
    let docs = palisade_policy::yaml::parse(&file, &text).map_err(|e| anyhow::anyhow!("{}: {}", e.span, e.message))?;
    let Some(root) = docs.first() else {
        return Ok(EveOptions::default());
    };
    let Some(outputs) = get(root, "outputs") else {
        return Ok(EveOptions::default());
    };
    let NodeKind::Seq(items) = &outputs.kind else {
        bail!("{}: `outputs` is not a list", path.display());
    };
    for item in items {
        let Some(eve) = get(item, "eve-log") else { continue };
        if get(eve, "enabled").and_then(Node::as_str).is_some_and(|v| !truthy(v)) {
            continue;
        }
        let mut opts = EveOptions {
            alert: false,
            flow: false,
            drop: None,
            http: false,
            dns: false,
            tls: false,
        };
        let Some(types) = get(eve, "types") else {
            return Ok(EveOptions::default());
        };
        let NodeKind::Seq(types) = &types.kind else {
            bail!("{}: eve-log `types` is not a list", path.display());
        };
        for t in types {
            let (name, settings) = match &t.kind {
                NodeKind::Scalar { value, .. } => (&**value, None),
                NodeKind::Map(entries) if !entries.is_empty() => {
                    (entries[0].0.as_str().unwrap_or(""), Some(&entries[0].1))
                }
                _ => continue,
            };
            match name {
                "alert" => opts.alert = true,
                "flow" => opts.flow = true,
                "http" => opts.http = true,
                "dns" => opts.dns = true,
                "tls" => opts.tls = true,
                "drop" => {
                    let setting = |k: &str| settings.and_then(|s| get(s, k)).and_then(Node::as_str);
                    opts.drop = Some(DropLog {
                        alerts: setting("alerts").is_some_and(truthy),
                        flows_start: setting("flows") != Some("all"),
                    });
                }
                _ => {}
            }
        }
        return Ok(opts);
    }
    Ok(EveOptions::default())
}

fn get<'a>(node: &'a Node, key: &str) -> Option<&'a Node> {
    match &node.kind {
        NodeKind::Map(entries) => entries.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v),
        _ => None,
    }
}

fn truthy(v: &str) -> bool {
    matches!(v, "yes" | "true" | "on" | "1")
}
