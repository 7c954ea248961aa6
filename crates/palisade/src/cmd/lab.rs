//! `palisade lab up|down|status`: a small virtual datacenter on this machine.

use std::process::ExitCode;

/// Subcommands of `palisade lab`.
#[derive(clap::Subcommand, Debug)]
pub enum LabCmd {
    /// Build the lab.
    Up,
}

/// Run a lab subcommand.
pub fn run(_cmd: LabCmd) -> anyhow::Result<ExitCode> {
    anyhow::bail!("palisade lab: not built yet")
}
