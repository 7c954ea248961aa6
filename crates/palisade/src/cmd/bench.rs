//! `palisade bench` (being written).

use std::process::ExitCode;

/// `palisade bench` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum BenchCmd {
    /// Placeholder.
    Todo,
}

/// Run a `palisade bench` subcommand.
pub fn run(cmd: BenchCmd) -> anyhow::Result<ExitCode> {
    let _ = cmd;
    anyhow::bail!("not yet implemented")
}
