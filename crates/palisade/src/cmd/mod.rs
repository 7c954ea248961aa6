//! Subcommands of the `palisade` binary, one module each.

pub mod agent;
pub mod alerts;
pub mod audit;
pub mod audit_export;
pub mod bench;
pub mod ca;
pub mod controller;
pub mod ctl;
pub mod demo;
pub mod ids;
pub mod lab;
pub mod migrate;
pub mod pcap;
pub mod policy;
pub mod replay;
pub mod vnic;
pub mod whatif;

/// Now, Unix nanoseconds: the one clock read the commands share (the
/// libraries are handed time).
pub(crate) fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}
