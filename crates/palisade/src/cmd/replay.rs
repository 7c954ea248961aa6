//! `palisade replay` (being written).

use std::process::ExitCode;

/// Arguments of `palisade replay`.
#[derive(clap::Args, Debug)]
pub struct ReplayArgs {}

/// Run `palisade replay`.
pub fn run(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let _ = args;
    anyhow::bail!("not yet implemented")
}
