//! `palisade policy what-if`: recorded flows against a candidate policy.

use std::process::ExitCode;

/// Arguments of `palisade policy what-if`.
#[derive(clap::Args, Debug)]
pub struct WhatIfArgs {}

/// Run what-if.
pub fn run(_args: WhatIfArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("palisade policy what-if: not built yet")
}
