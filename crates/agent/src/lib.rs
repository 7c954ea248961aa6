//! Palisade's host agent: the datapath engine on a host's real interfaces.
//!
//! - [`config`]: the agent's TOML configuration.
//! - [`agent`]: the runtime: ports (AF_PACKET rings) and the VXLAN underlay
//!   socket around the sans-IO engine, policy reload, state saved across restarts.
//! - [`records`]: flow events → audit flow records with both ends' identity.
//! - [`trail`]: batched, durable appends to the audit store.
//! - [`metrics`]: Prometheus text.
//! - [`http`]: the metrics/flows/health endpoint (TCP and a Unix socket).
//! - [`upstream`]: policy from the controller, the last good one saved.
#![deny(missing_docs)]

pub mod agent;
pub mod config;
pub mod http;
pub mod metrics;
pub mod records;
pub mod trail;
pub mod upstream;

pub use agent::{Agent, AgentError};
pub use config::AgentConfig;
