//! Palisade's controller: the API, versioned policy, stores (embedded and
//! etcd) and the secure channel to the agents.
//!
//! - [`store`]: the key-value interface and its two implementations.
//! - [`core`]: the logic (apply, diff, rollback, tags, agents, tokens, change
//!   records), synchronous and independent of HTTP.
//! - [`server`]: the HTTP API on axum, plain or TLS with client certificates.
//! - [`health`]: agents' datapath health, host states, the evacuation hook.
//! - [`migration`]: live migrations ordered here, carried out by the
//!   source host's agent.
//! - [`tls`]: the private CA and the server's rustls settings.
//! - [`auth`]: tokens (the roles are `palisade_api::roles`).
//! - [`trail`]: the controller's audit log of its changes and its agents' flows.
//! - [`alerts`]: inline inspection's alerts the agents push, per host, in memory.
//!
//! The documents both ends exchange, the client the CLI and the agents use,
//! and the compilation of a policy bundle are in `palisade-api`, which the
//! agent depends on instead of this crate.
//!
//! High availability needs no leader: every controller serves the whole API
//! from the shared etcd, every change is one conditional transaction on the
//! current-policy pointer (so concurrent changes serialize), and every
//! controller notices changes made through another by polling that pointer.
#![deny(missing_docs)]

pub mod alerts;
pub mod auth;
pub mod core;
pub mod health;
pub mod migration;
mod openapi;
pub mod server;
pub mod store;
pub mod tls;
pub mod trail;

pub use openapi::document as openapi_document;
