//! Palisade's host agent: the datapath engine on a host's real interfaces.
//!
//! - [`config`]: the agent's TOML configuration.
//! - [`attach`]: a VM's vNICs as libvirt `<interface>` XML (vhost-user or tap).
//! - [`AgentError`]: the errors that stop the agent (`error`).
//! - [`agent`]: the runtime's control side: ports attached, policy installed
//!   and reloaded, records taken to the trail, state saved across restarts.
//! - `worker`: one datapath thread per core, each with its own engine and
//!   its own socket on every port (AF_PACKET rings, the VXLAN underlay).
//! - [`records`]: flow events → audit flow records with both ends' identity.
//! - [`trail`]: batched, durable appends to the audit store.
//! - [`metrics`]: Prometheus text.
//! - [`inspection`]: inline inspection of the flows the policy selects
//!   (one signature engine per worker), alert records with both ends' identity.
//! - [`health`]: the datapath health report (`/health`, pushed to the controller).
//! - [`notify`]: systemd's readiness and watchdog notifications (sd_notify).
//! - [`http`]: the metrics/flows/health endpoint (TCP and a Unix socket).
//! - [`migrate`]: one vNIC's connection state merged from the workers and
//!   split between them again (live migration, served by [`http`]).
//! - [`qmp`]: a QMP client and a QEMU live migration with a switchover step
//!   (the hypervisor driver of migrations; the lab uses it too).
//! - [`peer`]: the agent-to-agent state channel of live migration (mutual
//!   TLS; pre-copy staged on the destination, delta applied in the pause).
//! - [`orders`]: migrations the controller orders: picked up from it,
//!   carried out with the hypervisor driver and the state move, reported.
//! - [`hypervisor`]: the drivers of those migrations behind one trait: QMP
//!   (the lab's) and libvirt (`virsh migrate --live --p2p --suspend`).
//! - [`arrivals`]: a guest migrated without the controller, seen by its
//!   announcement on this host's vNIC: reported, held until its state follows.
//! - `vhost`: vNICs attached through vhost-user (QEMU/libvirt guests), one
//!   device per vNIC, its queue pairs served by the workers.
//! - [`upstream`]: policy from the controller, the last good one saved.
//! - [`snapshot`]: connection state on disk, saved at a clean stop and
//!   snapshotted on a timer so a crash loses at most one interval of it.
//! - [`fallback`]: the fail-open fallback for `on_failure: open` zones (a
//!   kernel bridge and VXLAN device per zone), planned by the agent, armed
//!   only while it is gone, disarmed when it starts.
//! - [`supervise`]: a tiny supervisor for hosts without systemd: restarts
//!   the agent and arms the fallback when it dies.
//! - [`takeover`]: the connections a fail-open episode let through, picked
//!   up or cut by the agent that ended it (counted).
#![deny(missing_docs)]

// The integration tests' shared hosts (`tests/migrating_host`) name this
// crate by its name; unit tests include them too.
#[cfg(test)]
extern crate self as palisade_agent;
#[cfg(test)]
#[path = "../tests/migrating_host/mod.rs"]
#[allow(dead_code)]
mod migrating_host;

mod after_ready;
pub mod agent;
pub mod arrivals;
pub mod attach;
pub mod config;
mod error;
pub mod fallback;
mod fastpath;
pub mod health;
pub mod http;
pub mod hypervisor;
pub mod inspection;
pub mod journal;
mod links;
pub mod metrics;
pub mod migrate;
pub mod notify;
pub mod orders;
pub mod peer;
pub mod qmp;
mod quiet;
pub mod records;
pub mod snapshot;
pub mod supervise;
pub mod takeover;
pub mod trail;
pub mod upstream;
mod vhost;
mod worker;

pub use agent::Agent;
pub use config::AgentConfig;
pub use error::AgentError;
