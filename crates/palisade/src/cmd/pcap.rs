//! `palisade pcap` (being written).

use std::process::ExitCode;

/// `palisade pcap` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum PcapCmd {
    /// Placeholder.
    Todo,
}

/// Run a `palisade pcap` subcommand.
pub fn run(cmd: PcapCmd) -> anyhow::Result<ExitCode> {
    let _ = cmd;
    anyhow::bail!("not yet implemented")
}
