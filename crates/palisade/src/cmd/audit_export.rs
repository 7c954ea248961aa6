//! `palisade audit export`: records as IPFIX over UDP or JSON lines.

use std::process::ExitCode;

/// Arguments of `palisade audit export`.
#[derive(clap::Args, Debug)]
pub struct ExportArgs {}

/// Run the export.
pub fn run(_args: ExportArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("palisade audit export: not built yet")
}
