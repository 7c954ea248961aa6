//! Palisade's controller: the API, versioned policy, stores (embedded and
//! etcd) and the secure channel to the agents.
//!
//! - [`store`]: the key-value interface and its two implementations.
//! - [`core`]: the logic (apply, diff, rollback, tags, agents, tokens, change
//!   records), synchronous and independent of HTTP.
//! - [`server`]: the HTTP API on axum, plain or TLS with client certificates.
//! - [`client`]: the blocking client the CLI and the agent use, with failover
//!   over several controllers.
//! - [`tls`]: the private CA and the rustls settings of both ends.
//! - [`api`]: the JSON documents both ends exchange; [`auth`]: tokens and roles.
//! - [`delta`]: a new policy version sent as edits of the one an agent holds.
//! - [`trail`]: the controller's audit log of its changes and its agents' flows.
//!
//! High availability needs no leader: every controller serves the whole API
//! from the shared etcd, every change is one conditional transaction on the
//! current-policy pointer (so concurrent changes serialize), and every
//! controller notices changes made through another by polling that pointer.
#![deny(missing_docs)]

pub mod api;
pub mod auth;
pub mod client;
pub mod core;
pub mod delta;
mod openapi;
pub mod server;
pub mod store;
pub mod tls;
pub mod trail;

pub use openapi::document as openapi_document;
