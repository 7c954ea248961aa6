//! The CLI against the controller: `apply`, `get`, `diff`, `rollback`, `tag`.

use std::process::ExitCode;

/// Arguments of `palisade apply`.
#[derive(clap::Args, Debug)]
pub struct ApplyArgs {}
/// Arguments of `palisade get`.
#[derive(clap::Args, Debug)]
pub struct GetArgs {}
/// Arguments of `palisade diff`.
#[derive(clap::Args, Debug)]
pub struct DiffArgs {}
/// Arguments of `palisade rollback`.
#[derive(clap::Args, Debug)]
pub struct RollbackArgs {}
/// Arguments of `palisade tag`.
#[derive(clap::Args, Debug)]
pub struct TagArgs {}

/// `palisade apply`.
pub fn apply(_a: ApplyArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("palisade apply: not built yet")
}
/// `palisade get`.
pub fn get(_a: GetArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("palisade get: not built yet")
}
/// `palisade diff`.
pub fn diff(_a: DiffArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("palisade diff: not built yet")
}
/// `palisade rollback`.
pub fn rollback(_a: RollbackArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("palisade rollback: not built yet")
}
/// `palisade tag`.
pub fn tag(_a: TagArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("palisade tag: not built yet")
}
