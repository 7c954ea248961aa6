//! `palisade ca init|issue`: certificates for the agent↔controller channel.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use palisade_controller::tls;

/// Subcommands of `palisade ca`.
#[derive(clap::Subcommand, Debug)]
pub enum CaCmd {
    /// Create a certificate authority (`ca.pem`, `ca.key`) in a directory.
    Init {
        /// The CA directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a certificate signed by the CA: `NAME.pem` and `NAME.key` in the CA directory.
    Issue {
        /// The CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// The common name: the host name for an agent, e.g. `hv1`.
        #[arg(long)]
        name: String,
        /// Also valid as a server certificate (the controller's).
        #[arg(long)]
        server: bool,
        /// IP addresses the server certificate is valid for (repeatable).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
    },
}

/// Run a CA subcommand.
pub fn run(cmd: CaCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        CaCmd::Init { dir } => {
            let cert = tls::init_ca(&dir).with_context(|| format!("creating a CA in {}", dir.display()))?;
            println!("created {} and {}", cert.display(), dir.join("ca.key").display());
        }
        CaCmd::Issue { dir, name, server, ips } => {
            let (cert, key) = tls::issue(&dir, &name, server, &ips)
                .with_context(|| format!("issuing {name} from {}", dir.display()))?;
            println!("issued {} and {}", cert.display(), key.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
