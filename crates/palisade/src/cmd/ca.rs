//! `palisade ca init|issue`: certificates for the agent↔controller channel.

use std::process::ExitCode;

/// Subcommands of `palisade ca`.
#[derive(clap::Subcommand, Debug)]
pub enum CaCmd {
    /// Create a certificate authority.
    Init,
}

/// Run a CA subcommand.
pub fn run(_cmd: CaCmd) -> anyhow::Result<ExitCode> {
    anyhow::bail!("palisade ca: not built yet")
}
