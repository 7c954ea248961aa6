//! Subcommands of the `palisade` binary, one module each.

pub mod bench;
pub mod pcap;
pub mod policy;
pub mod replay;
