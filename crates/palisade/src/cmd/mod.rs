//! Subcommands of the `palisade` binary, one module each.

pub mod agent;
pub mod audit;
pub mod audit_export;
pub mod bench;
pub mod ca;
pub mod controller;
pub mod ctl;
pub mod demo;
pub mod ids;
pub mod lab;
pub mod pcap;
pub mod policy;
pub mod replay;
pub mod whatif;
