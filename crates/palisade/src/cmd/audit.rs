//! `palisade audit …` and `palisade flows`: the tamper-evident trail.

use std::process::ExitCode;

/// Subcommands of `palisade audit`.
#[derive(clap::Subcommand, Debug)]
pub enum AuditCmd {
    /// Export records as IPFIX or JSON lines.
    Export(super::audit_export::ExportArgs),
}

/// Arguments of `palisade flows`.
#[derive(clap::Args, Debug)]
pub struct FlowsArgs {}

/// Run an audit subcommand.
pub fn run(cmd: AuditCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCmd::Export(a) => super::audit_export::run(a),
    }
}

/// Run `palisade flows`.
pub fn flows(_args: FlowsArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("palisade flows: not built yet")
}
