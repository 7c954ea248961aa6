//! `palisade agent`: the datapath on this host's vNIC interfaces.

use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `palisade agent`.
#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// The agent's configuration file.
    #[arg(long)]
    pub config: PathBuf,
}

/// Run the agent.
pub fn run(_args: AgentArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("palisade agent: not built yet")
}
