//! The CLI against the controller: `apply`, `get`, `diff`, `rollback`, `tag`, `revoke`.
//!
//! The controller URL and token come from `--server`/`--token`, else from
//! `PALISADE_SERVER`/`PALISADE_TOKEN`; for HTTPS, `--ca` (or `PALISADE_CA`)
//! names the CA certificate to trust. `--server` may list several URLs,
//! comma-separated: the client fails over between them.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, anyhow, bail};
use palisade_api::client::{Client, ClientAuth};
use palisade_api::{Files, TagRequest};
use palisade_policy::PolicySource as _;

/// How to reach the controller.
#[derive(clap::Args, Debug)]
pub struct Conn {
    /// Controller URL(s), comma-separated [env: PALISADE_SERVER].
    #[arg(long)]
    pub server: Option<String>,
    /// API token [env: PALISADE_TOKEN].
    #[arg(long)]
    pub token: Option<String>,
    /// CA certificate to trust for HTTPS [env: PALISADE_CA].
    #[arg(long)]
    pub ca: Option<PathBuf>,
}

impl Conn {
    /// A client of the controller(s) these options (or the environment) name.
    pub(crate) fn client(&self) -> anyhow::Result<Client> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let server = self
            .server
            .clone()
            .or_else(|| env("PALISADE_SERVER"))
            .ok_or_else(|| anyhow!("no controller: give --server URL or set PALISADE_SERVER"))?;
        let token = self
            .token
            .clone()
            .or_else(|| env("PALISADE_TOKEN"))
            .ok_or_else(|| anyhow!("no token: give --token or set PALISADE_TOKEN"))?;
        let urls = server
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let mut c = Client::with_failover(urls, ClientAuth::Token(token)).context("controller client")?;
        if let Some(ca) = self.ca.clone().or_else(|| env("PALISADE_CA").map(PathBuf::from)) {
            c = c.with_ca(&ca).with_context(|| format!("loading CA {}", ca.display()))?;
        }
        Ok(c)
    }
}

/// Arguments of `palisade apply`.
#[derive(clap::Args, Debug)]
pub struct ApplyArgs {
    /// Policy directory (or one file).
    #[arg(short = 'f', long = "file")]
    pub dir: PathBuf,
    /// Why (kept with the version).
    #[arg(short, long, default_value = "")]
    pub message: String,
    /// Only validate on the controller; store nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Connection.
    #[command(flatten)]
    pub conn: Conn,
}

/// What `palisade get` shows.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum GetWhat {
    /// VMs with effective tags.
    Vms,
    /// Hosts, their agents and their datapath health (state, last report, why).
    Hosts,
    /// The current policy files.
    Policy,
    /// Version history.
    Versions,
    /// Registered agents.
    Agents,
    /// Change records.
    Changes,
    /// API tokens (admin only; never their secrets).
    Tokens,
}

/// Arguments of `palisade get`.
#[derive(clap::Args, Debug)]
pub struct GetArgs {
    /// What to show.
    pub what: GetWhat,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Connection.
    #[command(flatten)]
    pub conn: Conn,
}

/// Arguments of `palisade diff`.
#[derive(clap::Args, Debug)]
pub struct DiffArgs {
    /// Policy directory (or one file).
    #[arg(short = 'f', long = "file")]
    pub dir: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Connection.
    #[command(flatten)]
    pub conn: Conn,
}

/// Arguments of `palisade rollback`.
#[derive(clap::Args, Debug)]
pub struct RollbackArgs {
    /// The version to make current again.
    #[arg(value_name = "VERSION")]
    pub target: u64,
    /// Connection.
    #[command(flatten)]
    pub conn: Conn,
}

/// What `palisade tag` tags.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum TagKind {
    /// A VM.
    Vm,
}

/// Arguments of `palisade tag`.
#[derive(clap::Args, Debug)]
pub struct TagArgs {
    /// What to tag (`vm`).
    pub kind: TagKind,
    /// Its name.
    pub name: String,
    /// Tags to set, as key=value.
    pub tags: Vec<String>,
    /// Tag keys to remove (repeatable).
    #[arg(long = "remove")]
    pub remove: Vec<String>,
    /// Connection.
    #[command(flatten)]
    pub conn: Conn,
}

fn read_files(dir: &std::path::Path) -> anyhow::Result<Files> {
    let files = palisade_policy::DirSource::new(dir)
        .files()
        .with_context(|| format!("reading {}", dir.display()))?;
    files
        .into_iter()
        .map(|(p, text)| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| anyhow!("{} has no file name", p.display()))?;
            Ok((name, text))
        })
        .collect()
}

/// A value from the controller as one line of a table: control and invisible
/// characters escaped, so nothing it holds can move the cursor, clear the
/// screen or reorder what an operator reads.
fn esc(s: &str) -> String {
    palisade_api::validate::Escaped(s).to_string()
}

/// Text from the controller of several lines (policy files, diffs): every
/// line [`esc`]aped, tabs kept.
fn esc_text(s: &str) -> String {
    s.split('\n')
        .map(|line| line.split('\t').map(esc).collect::<Vec<_>>().join("\t"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `palisade apply`.
pub fn apply(a: ApplyArgs) -> anyhow::Result<ExitCode> {
    let files = read_files(&a.dir)?;
    let r = a.conn.client()?.apply(&files, &a.message, a.dry_run).context("apply")?;
    if !r.warnings.is_empty() {
        eprint!("{}", esc_text(&r.warnings));
    }
    if r.dry_run {
        println!("valid: would become version {} (revision {})", r.version, r.revision);
    } else {
        println!("applied: version {} (revision {})", r.version, r.revision);
    }
    Ok(ExitCode::SUCCESS)
}

/// `palisade get`.
pub fn get(a: GetArgs) -> anyhow::Result<ExitCode> {
    let c = a.conn.client()?;
    match a.what {
        GetWhat::Vms => {
            let vms = c.vms()?;
            if a.json {
                return print_json(&vms).map(|_| ExitCode::SUCCESS);
            }
            println!("{:<20} {:<10} {:<8} {:<30} TAGS", "NAME", "CLUSTER", "HOST", "VNICS");
            for v in vms {
                let tags: Vec<String> = v.tags.iter().map(|(k, v)| format!("{}={}", esc(k), esc(v))).collect();
                let dash = || "-".to_string();
                println!(
                    "{:<20} {:<10} {:<8} {:<30} {}",
                    esc(&v.name),
                    esc(&v.cluster.unwrap_or_else(dash)),
                    esc(&v.host.unwrap_or_else(dash)),
                    esc(&v.vnics.join(",")),
                    tags.join(",")
                );
            }
        }
        GetWhat::Hosts => {
            let hosts = c.hosts()?;
            if a.json {
                return print_json(&hosts).map(|_| ExitCode::SUCCESS);
            }
            println!(
                "{:<16} {:<10} {:<10} {:<9} {:<12} {:<20} REASON",
                "HOST", "CLUSTER", "INSTALLED", "STATE", "LAST REPORT", "VMS"
            );
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            for h in hosts {
                let rev = h
                    .agent
                    .map_or("-".to_string(), |a| format!("rev {}", a.installed_revision));
                let (state, last, reason) = match &h.health {
                    None => ("-".to_string(), "-".to_string(), String::new()),
                    Some(hh) => {
                        let mut reason = hh.reason.clone();
                        if let Some(ev) = &hh.evacuation {
                            let what = format!(
                                "evacuation {}{}{}",
                                serde_json::to_value(ev.status)?.as_str().unwrap_or("?"),
                                if ev.outcome.is_empty() { "" } else { ": " },
                                ev.outcome
                            );
                            reason = if reason.is_empty() {
                                what
                            } else {
                                format!("{reason}; {what}")
                            };
                        }
                        if let Some(e) = hh.report.as_ref().and_then(|r| r.last_fail_open.as_ref()) {
                            let what = format!(
                                "last fail-open: {} for {:.1} s",
                                e.zones.join(","),
                                e.active_ms() as f64 / 1000.0
                            );
                            reason = if reason.is_empty() {
                                what
                            } else {
                                format!("{reason}; {what}")
                            };
                        }
                        let last = match hh.last_report_ns {
                            0 => "never".to_string(),
                            t => format!("{:.0}s ago", now.saturating_sub(t) as f64 / 1e9),
                        };
                        (hh.state.as_str().to_string(), last, reason)
                    }
                };
                println!(
                    "{:<16} {:<10} {:<10} {:<9} {:<12} {:<20} {}",
                    esc(&h.name),
                    esc(&h.cluster.unwrap_or_default()),
                    rev,
                    state,
                    last,
                    esc(&h.vms.join(",")),
                    esc(&reason)
                );
            }
        }
        GetWhat::Policy => {
            let p = c.policy()?;
            if a.json {
                return print_json(&p).map(|_| ExitCode::SUCCESS);
            }
            println!("# version {} (revision {})", p.version, p.revision);
            for (name, text) in &p.files {
                println!("# --- {}\n{}", esc(name), esc_text(text));
            }
            if !p.tags.is_empty() {
                println!("# tag overlay: {}", esc(&serde_json::to_string(&p.tags)?));
            }
        }
        GetWhat::Versions => {
            let vs = c.versions()?;
            if a.json {
                return print_json(&vs).map(|_| ExitCode::SUCCESS);
            }
            println!("{:<8} {:<12} {:<20} MESSAGE", "VERSION", "AUTHOR", "TIME_NS");
            for v in vs {
                println!(
                    "{:<8} {:<12} {:<20} {}",
                    v.version,
                    esc(&v.author),
                    v.time_ns,
                    esc(&v.message)
                );
            }
        }
        GetWhat::Agents => {
            let ags = c.agents()?;
            if a.json {
                return print_json(&ags).map(|_| ExitCode::SUCCESS);
            }
            println!("{:<16} {:<10} {:<22} VERSION", "HOST", "INSTALLED", "LAST_SEEN_NS");
            for g in ags {
                println!(
                    "{:<16} {:<10} {:<22} {}",
                    esc(&g.host),
                    g.installed_revision,
                    g.last_seen_ns,
                    esc(&g.agent_version)
                );
            }
        }
        GetWhat::Changes => {
            let ch = c.changes()?;
            if a.json {
                return print_json(&ch).map(|_| ExitCode::SUCCESS);
            }
            for r in ch {
                let v = r.policy_version.map(|v| format!(" -> v{v}")).unwrap_or_default();
                println!(
                    "{} {} {} {}{v}",
                    r.time_ns,
                    esc(&r.actor),
                    esc(&r.action),
                    esc(&r.resource)
                );
            }
        }
        GetWhat::Tokens => {
            let ts = c.tokens()?;
            if a.json {
                return print_json(&ts).map(|_| ExitCode::SUCCESS);
            }
            println!(
                "{:<12} {:<16} {:<10} {:<20} REVOKED",
                "ID", "NAME", "ROLE", "CREATED_NS"
            );
            for t in ts {
                let revoked = t
                    .revoked
                    .map_or("-".to_string(), |r| format!("{} by {}", r.time_ns, esc(&r.by)));
                println!(
                    "{:<12} {:<16} {:<10} {:<20} {revoked}",
                    esc(&t.id),
                    esc(&t.name),
                    t.role.name(),
                    t.created_ns
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `palisade revoke` revokes.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum RevokeKind {
    /// An API token.
    Token,
}

/// Arguments of `palisade revoke`.
#[derive(clap::Args, Debug)]
pub struct RevokeArgs {
    /// What to revoke (`token`).
    pub kind: RevokeKind,
    /// The token's name (every live token of that name) or its id (`palisade get tokens`).
    pub name: String,
    /// Connection.
    #[command(flatten)]
    pub conn: Conn,
}

/// `palisade revoke`.
pub fn revoke(a: RevokeArgs) -> anyhow::Result<ExitCode> {
    let RevokeKind::Token = a.kind;
    let gone = a.conn.client()?.revoke_token(&a.name).context("revoke")?;
    for t in gone {
        println!("revoked: token {} ({}, {})", esc(&t.name), esc(&t.id), t.role.name());
    }
    Ok(ExitCode::SUCCESS)
}

/// `palisade diff`.
pub fn diff(a: DiffArgs) -> anyhow::Result<ExitCode> {
    let files = read_files(&a.dir)?;
    let d = a.conn.client()?.diff(&files).context("diff")?;
    if a.json {
        return print_json(&d).map(|_| ExitCode::SUCCESS);
    }
    print!("{}", esc_text(&d.diff));
    if d.chains.is_empty() {
        println!("# no compiled chain changes (against version {})", d.base_version);
    } else {
        println!("# chains that change (against version {}):", d.base_version);
        for ch in &d.chains {
            println!("#   {} {} {}", esc(&ch.vnic), esc(&ch.direction), esc(&ch.change));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `palisade rollback`.
pub fn rollback(a: RollbackArgs) -> anyhow::Result<ExitCode> {
    let r = a.conn.client()?.rollback(a.target).context("rollback")?;
    println!(
        "rolled back to version {}: now version {} (revision {})",
        a.target, r.version, r.revision
    );
    Ok(ExitCode::SUCCESS)
}

/// `palisade tag`.
pub fn tag(a: TagArgs) -> anyhow::Result<ExitCode> {
    let TagKind::Vm = a.kind;
    let mut req = TagRequest {
        set: Default::default(),
        remove: a.remove.clone(),
    };
    for t in &a.tags {
        let Some((k, v)) = t.split_once('=') else {
            bail!("tag \"{t}\" is not key=value");
        };
        req.set.insert(k.to_string(), v.to_string());
    }
    let r = a.conn.client()?.tag(&a.name, &req).context("tag")?;
    let tags: Vec<String> = r.tags.iter().map(|(k, v)| format!("{}={}", esc(k), esc(v))).collect();
    println!("{}: {} (revision {})", esc(&r.vm), tags.join(","), r.revision);
    if !r.chains.is_empty() {
        println!("chains changed: {}", esc(&r.chains.join(", ")));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser};

    /// What the controller sends is printed with control and invisible
    /// characters escaped: a tag cannot clear an operator's screen.
    #[test]
    fn printed_values_cannot_drive_the_terminal() {
        for hostile in ["\u{1b}[2J", "a\u{0}b", "\u{202e}evil", "zero\u{200b}w", "\u{7}", "\r"] {
            let shown = super::esc(hostile);
            assert!(!shown.chars().any(palisade_api::validate::hidden), "{shown:?}");
        }
        assert_eq!(super::esc("tier=web é"), "tier=web é");
        assert_eq!(super::esc_text("a:\n\t- \u{1b}x\n"), "a:\n\t- \\u{1b}x\n");
    }

    /// The controller-facing commands as main.rs mounts them (with a propagated `--version`).
    #[derive(Parser, Debug)]
    #[command(name = "palisade", version, propagate_version = true)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(clap::Subcommand, Debug)]
    enum Command {
        Controller(super::super::controller::ControllerArgs),
        #[command(subcommand)]
        Ca(super::super::ca::CaCmd),
        Apply(super::ApplyArgs),
        Get(super::GetArgs),
        Diff(super::DiffArgs),
        Rollback(super::RollbackArgs),
        Tag(super::TagArgs),
        Revoke(super::RevokeArgs),
        Flows(super::super::audit::FlowsArgs),
    }

    #[test]
    fn arguments_are_consistent_and_parse() {
        Cli::command().debug_assert();
        let c = Cli::try_parse_from([
            "palisade", "tag", "vm", "web-1", "a=b", "--remove", "c", "--server", "http://x",
        ])
        .unwrap();
        let Command::Tag(t) = c.command else { panic!() };
        assert_eq!(
            (t.name.as_str(), t.tags.as_slice(), t.remove.as_slice()),
            ("web-1", &["a=b".to_string()][..], &["c".to_string()][..])
        );
        let c = Cli::try_parse_from(["palisade", "revoke", "token", "ci", "--server", "http://x"]).unwrap();
        assert!(matches!(c.command, Command::Revoke(super::RevokeArgs { ref name, .. }) if name == "ci"));
        assert!(Cli::try_parse_from(["palisade", "revoke", "vm", "web-1"]).is_err());
        let c = Cli::try_parse_from(["palisade", "rollback", "3"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Rollback(super::RollbackArgs { target: 3, .. })
        ));
        let c = Cli::try_parse_from([
            "palisade",
            "controller",
            "token",
            "create",
            "bob",
            "--role",
            "auditor",
            "--data",
            "/d",
        ])
        .unwrap();
        let Command::Controller(a) = c.command else { panic!() };
        assert_eq!(a.data, std::path::PathBuf::from("/d"));
        assert!(Cli::try_parse_from(["palisade", "controller", "--tls-dir", "d", "--insecure-http"]).is_err());
        assert!(Cli::try_parse_from(["palisade", "get", "nonsense"]).is_err());
        // `flows` reads a directory or asks a controller, never both.
        let c = Cli::try_parse_from(["palisade", "flows", "--dir", "/a", "--vm", "web-1"]).unwrap();
        let Command::Flows(f) = c.command else { panic!() };
        assert_eq!(
            (f.dir.as_deref(), f.conn.server.as_deref()),
            (Some(std::path::Path::new("/a")), None)
        );
        let c = Cli::try_parse_from(["palisade", "flows", "--server", "https://c:7443", "--since", "1h"]).unwrap();
        let Command::Flows(f) = c.command else { panic!() };
        assert_eq!((f.dir, f.conn.server.as_deref()), (None, Some("https://c:7443")));
        for both in [["--server", "http://x"], ["--token", "t"], ["--ca", "ca.pem"]] {
            let mut argv = vec!["palisade", "flows", "--dir", "/a"];
            argv.extend(both);
            assert!(Cli::try_parse_from(argv).is_err(), "{both:?}");
        }
    }
}
