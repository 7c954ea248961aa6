//! The errors that stop the agent.
//!
//! One type for the whole crate, in its own module so that every module that
//! can fail (the control side, the trail, the controller connection) depends
//! on it and none on another for it.

use std::path::PathBuf;

use palisade_api::bundle::BundleError;

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The policy cannot be loaded at start.
    #[error("policy {dir}: {message}")]
    Policy {
        /// The policy directory.
        dir: PathBuf,
        /// What is wrong (diagnostics rendered).
        message: String,
    },
    /// A port from the configuration cannot be attached.
    #[error("{what}: {message}")]
    Port {
        /// The port (vNIC or appliance name and interface).
        what: String,
        /// Why.
        message: String,
    },
    /// An I/O error on a named resource.
    #[error("{what}: {source}")]
    Io {
        /// The resource.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The controller connection.
    #[error("{0}")]
    Controller(String),
    /// The controller's first policy does not compile.
    #[error("policy revision {revision}: {source}")]
    PolicyRefused {
        /// The controller's revision of the policy.
        revision: u64,
        /// Why it does not compile.
        source: BundleError,
    },
    /// A datapath worker stopped (its share of the traffic would stop with it).
    #[error("datapath worker {index}: {message}")]
    Worker {
        /// The worker.
        index: usize,
        /// Why it stopped.
        message: String,
    },
    /// The audit trail failed (records could not be made durable).
    #[error("audit trail {dir}: {message}")]
    Audit {
        /// The audit directory.
        dir: PathBuf,
        /// Why.
        message: String,
    },
    /// The state directory's lock or the fail-open fallback (disarming at start).
    #[error(transparent)]
    Fallback(#[from] crate::fallback::FallbackError),
    /// Inline inspection's signatures did not load.
    #[error("inspection: {0}")]
    Inspect(#[from] crate::inspection::InspectLoadError),
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Io { what, source }
}
