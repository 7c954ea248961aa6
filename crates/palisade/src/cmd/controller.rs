//! `palisade controller`: the API, versioned policy and the agents' channel.

use std::process::ExitCode;

/// Arguments of `palisade controller`.
#[derive(clap::Args, Debug)]
pub struct ControllerArgs {}

/// Run the controller.
pub fn run(_args: ControllerArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("palisade controller: not built yet")
}
