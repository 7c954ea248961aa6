//! `palisade policy` (being written).

use std::process::ExitCode;

/// `palisade policy` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum PolicyCmd {
    /// Placeholder.
    Todo,
}

/// Run a `palisade policy` subcommand.
pub fn run(cmd: PolicyCmd) -> anyhow::Result<ExitCode> {
    let _ = cmd;
    anyhow::bail!("not yet implemented")
}
