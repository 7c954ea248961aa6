//! The `palisade` binary: one CLI for every Palisade role.
fn main() {}
