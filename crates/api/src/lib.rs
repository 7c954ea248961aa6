//! The contract between Palisade's controller and its clients (agents, the
//! CLI): the JSON documents of the HTTP API, what each may hold, the roles,
//! the policy bundle an agent fetches and how it is compiled, and the
//! blocking client with its TLS settings.
//!
//! Both daemons depend on this crate and neither on the other: the agent's
//! dependency tree holds no HTTP server, store or certificate authority.
//!
//! - [`documents`]: the request and response documents (also the stored
//!   form of versions and the current-policy pointer), and the checks each
//!   request document passes.
//! - [`validate`]: the limits, and the checks of single fields, those
//!   checks are made of.
//! - [`health`]: an agent's datapath health report and the controller's
//!   view of a host (healthy, degraded, failed).
//! - [`migration`]: live migration ordered through the controller.
//! - [`roles`]: roles and the permissions they grant.
//! - [`bundle`]: the policy bundle an agent compiles, incrementally when
//!   only tags changed.
//! - [`delta`]: a new policy version sent as edits of the one held.
//! - [`sources`]: the policy files and tag overlay a bundle is compiled from.
//! - [`client`]: the blocking client with failover over several controllers.
//! - [`tls`]: the client half of the mutual-TLS channel.
#![deny(missing_docs)]

pub mod bundle;
pub mod client;
pub mod delta;
pub mod documents;
pub mod health;
pub mod migration;
pub mod roles;
pub mod sources;
pub mod tls;
pub mod validate;

pub use bundle::{BundleError, PolicyBundle};
pub use documents::*;
