//! The lab's one error type.
//!
//! Most failures come from an external tool (`ip`, `qemu-system-x86_64`,
//! `ethtool`) refusing something; those keep the command line and its stderr
//! so the operator sees what the kernel said, not a paraphrase.

use std::path::PathBuf;

/// Everything that can go wrong building, using or removing a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// An I/O operation on a lab file or socket failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An external command could not be started or exited with a failure.
    #[error("command `{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status, or why it did not run.
        status: String,
        /// Its standard error (trimmed).
        stderr: String,
    },
    /// The policy directory could not be read or has errors.
    #[error("policy {}: {message}", dir.display())]
    Policy {
        /// The directory.
        dir: PathBuf,
        /// The loader's error or the rendered diagnostics.
        message: String,
    },
    /// The inventory or the lab specification cannot be turned into a lab.
    #[error("invalid lab: {0}")]
    Invalid(String),
    /// A VM, host or interface name is not part of this lab.
    #[error("no {kind} named {name:?} in this lab")]
    Unknown {
        /// `vm`, `host`, ...
        kind: &'static str,
        /// The name asked for.
        name: String,
    },
    /// Something did not happen within its time limit.
    #[error("timed out after {secs:.1} s: {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long we waited.
        secs: f64,
    },
    /// An agent exited or never reported `agent ready`.
    #[error("agent on host {host} did not become ready: {reason}\n--- last lines of {} ---\n{tail}", log.display())]
    Agent {
        /// The host.
        host: String,
        /// Why.
        reason: String,
        /// Its log file.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// A QEMU guest failed to start or its console misbehaved.
    #[error("QEMU guest {vm}: {reason}")]
    Qemu {
        /// The VM.
        vm: String,
        /// Why.
        reason: String,
    },
    /// A live migration did not happen; `reason` says where it stopped and
    /// what was done about it (the guest keeps running on the source).
    #[error("migrating {vm} from {from} to {to}: {reason}")]
    Migration {
        /// The VM.
        vm: String,
        /// Its host.
        from: String,
        /// The destination.
        to: String,
        /// Why, and the state it was left in.
        reason: String,
    },
    /// The state file is missing or unreadable.
    #[error("lab state {}: {reason}", path.display())]
    State {
        /// The state file.
        path: PathBuf,
        /// Why it could not be used.
        reason: String,
    },
}

impl LabError {
    /// Wrap an I/O error with what was being done.
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
        let what = what.into();
        move |source| LabError::Io { what, source }
    }
}
