//! `palisade controller`: the API, versioned policy and the agents' channel.
//!
//! The store is embedded (a redb file under `--data`) unless `--etcd` names
//! an etcd cluster. HTTPS with client certificates is the normal mode
//! (`--tls-dir` holds `ca.pem`, `controller.pem`, `controller.key`, made with
//! `palisade ca`); `--insecure-http` serves plain HTTP, and only on loopback.
//! At the first start, when the store holds no token, an admin token is made
//! and written to `DATA/admin.token` (mode 0600).
//!
//! Every change record the controller makes is also appended to its audit
//! log (`--audit`, default `DATA/audit`), which also holds the flow records
//! its agents push; `palisade audit verify` and `palisade flows` read it.
//! Its signing key (`--audit-key`, default `DATA/audit.key`) and its last
//! signed head (`--audit-head`, default `DATA/audit.head`) live outside it.
//!
//! Agents report their datapath's health every 3 s; a host silent for
//! `--health-failed-after` seconds (15) is failed, and the evacuation hooks
//! (`--evacuate-command`, `--evacuate-webhook`) run once per failure (see
//! `palisade_controller::health`).

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use palisade_api::roles::Role;
use palisade_controller::core::Controller;
use palisade_controller::health::HealthConfig;
use palisade_controller::server::{self, ServeOptions};
use palisade_controller::store::{EmbeddedStore, EtcdStore, Store};
use palisade_controller::tls;
use palisade_controller::trail::{Trail, TrailError};

/// Arguments of `palisade controller`.
#[derive(clap::Args, Debug)]
pub struct ControllerArgs {
    /// Data directory: the embedded store and the bootstrap admin token.
    #[arg(long, global = true, default_value = "/var/lib/palisade/controller")]
    pub data: PathBuf,
    /// etcd client URLs, comma-separated (default: the embedded store).
    #[arg(long, global = true, value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Key prefix in etcd.
    #[arg(long, global = true, default_value = "/palisade/")]
    pub etcd_prefix: String,
    /// Audit log directory: this controller's change records and its agents' flows [default: DATA/audit].
    #[arg(long, global = true)]
    pub audit: Option<PathBuf>,
    /// The audit log's signing key, outside the log directory (created 0600) [default: DATA/audit.key].
    #[arg(long, global = true)]
    pub audit_key: Option<PathBuf>,
    /// Where the audit log's last signed head is published, outside the log directory [default: DATA/audit.head].
    #[arg(long, global = true)]
    pub audit_head: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub listen: SocketAddr,
    /// Directory with ca.pem, controller.pem and controller.key: serve HTTPS.
    #[arg(long, conflicts_with = "insecure_http")]
    pub tls_dir: Option<PathBuf>,
    /// Serve plain HTTP (development; loopback addresses only).
    #[arg(long)]
    pub insecure_http: bool,
    /// Seconds without a health report after which a host is failed (agents report every 3 s).
    #[arg(long, default_value_t = 15)]
    pub health_failed_after: u64,
    /// Run when a host fails: PATH HOST VM… with the same as JSON on stdin (once per failure).
    #[arg(long)]
    pub evacuate_command: Option<PathBuf>,
    /// POST JSON (host, reason, VMs) to this URL when a host fails (once per failure).
    #[arg(long)]
    pub evacuate_webhook: Option<String>,
    /// Seconds an evacuation hook may run (a command is killed after).
    #[arg(long, default_value_t = 60)]
    pub evacuate_timeout: u64,
    /// Token management instead of serving.
    #[command(subcommand)]
    pub command: Option<ControllerCmd>,
}

/// Subcommands of `palisade controller`.
#[derive(clap::Subcommand, Debug)]
pub enum ControllerCmd {
    /// API tokens.
    #[command(subcommand)]
    Token(TokenCmd),
}

/// `palisade controller token …`.
#[derive(clap::Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a token and print it (once; only its hash is stored).
    Create {
        /// Its name: the actor recorded for its changes.
        name: String,
        /// admin, operator, auditor or read-only.
        #[arg(long)]
        role: Role,
    },
}

fn open_store(args: &ControllerArgs) -> anyhow::Result<Arc<dyn Store>> {
    if !args.etcd.is_empty() {
        let s = EtcdStore::new(args.etcd.clone(), &args.etcd_prefix);
        s.ping()
            .with_context(|| format!("connecting to etcd at {}", args.etcd.join(",")))?;
        return Ok(Arc::new(s));
    }
    std::fs::create_dir_all(&args.data).with_context(|| format!("creating {}", args.data.display()))?;
    let path = args.data.join("store.redb");
    let s = EmbeddedStore::open(&path)
        .with_context(|| format!("opening {} (is a controller running on it?)", path.display()))?;
    Ok(Arc::new(s))
}

fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

fn audit_dir(args: &ControllerArgs) -> PathBuf {
    args.audit.clone().unwrap_or_else(|| args.data.join("audit"))
}

/// Open the audit trail with its key and head outside it, publishing its
/// heads to the head file and to `store`.
fn open_trail(args: &ControllerArgs, store: &Arc<dyn Store>) -> Result<Trail, TrailError> {
    let config = palisade_audit::AuditConfig {
        key_file: Some(args.audit_key.clone().unwrap_or_else(|| args.data.join("audit.key"))),
        head_file: Some(args.audit_head.clone().unwrap_or_else(|| args.data.join("audit.head"))),
        ..palisade_audit::AuditConfig::default()
    };
    Trail::open_publishing(&audit_dir(args), config, store.clone())
}

/// Run the controller.
pub fn run(args: ControllerArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(&args)?;
    let ctl = Controller::new(store.clone());
    let audit = audit_dir(&args);
    if let Some(ControllerCmd::Token(TokenCmd::Create { name, role })) = &args.command {
        // No change without its record in the audit log: while a running
        // controller owns the log, it has to make the token (a change made
        // here would be in the store only).
        let ctl = match open_trail(&args, &store) {
            Ok(t) => ctl.with_trail(Arc::new(t)),
            Err(e @ TrailError::Locked(_)) => {
                return Err(e).with_context(|| {
                    format!(
                        "the controller using the audit log {} is running: create the token through it \
                         (POST /v1/tokens with an admin token), or stop it first",
                        audit.display()
                    )
                });
            }
            Err(e) => return Err(e).with_context(|| format!("opening the audit log {}", audit.display())),
        };
        // Bring the log up to the store first (a crash may have left the last change out).
        ctl.sync_trail().context("bringing the audit log up to the store")?;
        let secret = ctl.create_token("local", name, *role).context("creating the token")?;
        println!("{secret}");
        return Ok(ExitCode::SUCCESS);
    }
    if args.health_failed_after == 0 {
        bail!("--health-failed-after must be at least 1 second");
    }
    if let Some(cmd) = &args.evacuate_command
        && !cmd.is_file()
    {
        bail!("--evacuate-command {}: no such file", cmd.display());
    }
    if let Some(url) = &args.evacuate_webhook
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        bail!("--evacuate-webhook {url}: give an http:// or https:// URL");
    }
    let tls = match (&args.tls_dir, args.insecure_http) {
        (Some(d), _) => Some(
            tls::server_config(&d.join("ca.pem"), &d.join("controller.pem"), &d.join("controller.key"))
                .with_context(|| format!("loading TLS files from {}", d.display()))?,
        ),
        (None, true) if args.listen.ip().is_loopback() => None,
        (None, true) => bail!("--insecure-http is for loopback addresses only, not {}", args.listen),
        (None, false) => {
            bail!("give --tls-dir DIR (see `palisade ca`) or, for development on loopback, --insecure-http")
        }
    };
    let trail = open_trail(&args, &store).with_context(|| format!("opening the audit log {}", audit.display()))?;
    let ctl = ctl.with_trail(Arc::new(trail));
    if !ctl.has_tokens().context("reading tokens")? {
        std::fs::create_dir_all(&args.data).with_context(|| format!("creating {}", args.data.display()))?;
        let path = args.data.join("admin.token");
        let secret = ctl
            .create_token("local", "admin", Role::Admin)
            .context("creating the bootstrap token")?;
        write_secret(&path, &format!("{secret}\n"))?;
        eprintln!(
            "palisade controller: first start: admin token written to {}",
            path.display()
        );
    }
    let opts = ServeOptions {
        listen: args.listen,
        tls,
        poll_interval: Duration::from_millis(if args.etcd.is_empty() { 1000 } else { 250 }),
        health: HealthConfig {
            failed_after: Duration::from_secs(args.health_failed_after),
            evacuate_command: args.evacuate_command.clone(),
            evacuate_webhook: args.evacuate_webhook.clone(),
            hook_timeout: Duration::from_secs(args.evacuate_timeout),
            ..HealthConfig::default()
        },
    };
    let srv = server::spawn(ctl, opts).context("starting the server")?;
    eprintln!(
        "palisade controller: serving {}, audit log {}",
        srv.url(),
        audit.display()
    );
    srv.wait();
    Ok(ExitCode::SUCCESS)
}
