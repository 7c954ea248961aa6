//! `palisade demo`: the lab, the three-tier policy, real traffic, live verdicts.

use std::process::ExitCode;

/// Arguments of `palisade demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Run the traffic script once, print the flow table, tear everything down and exit.
    #[arg(long)]
    pub once: bool,
}

/// Run the demo.
pub fn run(_args: DemoArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("palisade demo: not built yet")
}
