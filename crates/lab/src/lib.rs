//! Palisade's lab: a small virtual datacenter on one machine.
//!
//! From a policy directory's inventory, [`Lab::up`] builds one network
//! namespace per hypervisor host (joined by an underlay bridge), one per VM
//! (or a QEMU guest on a tap), an edge router with one leg per zone and an
//! "internet" namespace behind it, writes each host's agent configuration and
//! optionally starts the agents. Nothing forwards between VMs until an agent
//! runs: Palisade is the switch. [`Lab::down`] removes everything, also after
//! a crash. The `palisade lab` command is a thin layer over this crate; the
//! demo and end-to-end tests use it directly.
//!
//! - [`plan`]: the topology, computed and checked before anything is created.
//! - [`config`]: agent configuration files and generated lab policies.
//! - [`mod@lab`]: up, down, status, exec, and live migration of a QEMU guest
//!   with its firewall state ([`Lab::migrate`]).
//! - [`lab::appliance`]: service-chain appliances (a VM's vNICs bridged, or
//!   an external appliance over the underlay) and their nftables ruleset.
//! - [`qemu`]: the guest initramfs, QEMU command line and serial-console exec.
//! - [`qmp`]: a QMP client and live migration with a switchover step (the
//!   agent's hypervisor driver, re-exported).
//! - [`dns`], [`stream`]: traffic helpers (a `.lab` DNS responder, a TCP line stream).

pub mod config;
pub mod dns;
mod error;
pub mod lab;
pub mod plan;
pub mod qemu;
pub use palisade_agent::qmp;
pub mod stream;
mod sys;

pub use error::LabError;
pub use lab::{
    CONTROLLER_IP, CONTROLLER_PORT, ControllerProc, DownReport, Lab, LabSpec, LabState, LabStatus, MigrateOptions,
    MigrationReport, Spawned, default_state_dir, leftovers,
};
pub use plan::{Plan, QemuMode, QemuNic};
pub use sys::{NetnsThread, spawn_in_netns};
