//! Live migration ordered through the controller: the documents of
//! `POST /v1/vms/{name}/migrate`, of the order the source host's agent picks
//! up (`GET /v1/agents/{host}/migrations`) and of the outcome it reports
//! (`POST /v1/agents/{host}/migrations/{vm}`).
//!
//! An order goes `pending` (stored by the controller) → `running` (the
//! source agent took it) → `completed` or `failed` (the source agent's
//! report, or the controller when the order outlives its deadline). One
//! order per VM is active (pending or running) at a time.

use serde::{Deserialize, Serialize};

use crate::validate::{Quoted, RequestError, check_host, check_text};

/// The body of `POST /v1/vms/{name}/migrate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// The host the VM goes to.
    pub to: String,
}

impl MigrateRequest {
    /// The checks the schema cannot make: `to` is a host name.
    pub fn check(&self) -> Result<(), RequestError> {
        check_host(&self.to)
    }
}

/// Where an order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationState {
    /// Stored, not yet taken by the source host's agent.
    Pending,
    /// The source agent is migrating the VM.
    Running,
    /// The VM runs on the destination with its state.
    Completed,
    /// The VM stays on the source (its state intact there); see `reason`.
    Failed,
}

impl MigrationState {
    /// Whether the order is over.
    pub fn is_final(self) -> bool {
        matches!(self, MigrationState::Completed | MigrationState::Failed)
    }

    /// The name used in JSON and records.
    pub fn name(self) -> &'static str {
        match self {
            MigrationState::Pending => "pending",
            MigrationState::Running => "running",
            MigrationState::Completed => "completed",
            MigrationState::Failed => "failed",
        }
    }
}

/// A migration order and, once over, its outcome (the controller's stored
/// form and the API's answer). Fields not known yet are left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationOrder {
    /// Names this order (the VM and the time it was ordered).
    pub id: String,
    /// The VM.
    pub vm: String,
    /// Its vNICs, whose state moves.
    pub vnics: Vec<String>,
    /// The host it runs on when ordered (whose agent drives the migration).
    pub from: String,
    /// The host it goes to.
    pub to: String,
    /// The token that ordered it.
    pub requested_by: String,
    /// When it was ordered (Unix ns).
    pub requested_ns: u64,
    /// After this (Unix ns) an order not over is failed by the controller.
    pub deadline_ns: u64,
    /// Where it stands.
    pub state: MigrationState,
    /// When the source agent started it (Unix ns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ns: Option<u64>,
    /// When it ended (Unix ns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ns: Option<u64>,
    /// Connections moved (imported on the destination).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u64>,
    /// Bytes of state moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_bytes: Option<u64>,
    /// BLAKE3 of the state moved (hex; of the vNICs' blobs in order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_blake3: Option<String>,
    /// The added blackout: the state move while the guest was paused, µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switchover_us: Option<u64>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Longest failure reason an agent may report.
pub const MAX_MIGRATION_REASON: usize = 2048;

/// The body of `POST /v1/agents/{host}/migrations/{vm}`: the source agent
/// took the order (`running`) or finished it (`completed`, `failed`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// The order's id (a report for another order of the VM is refused).
    pub id: String,
    /// `running`, `completed` or `failed`.
    pub state: MigrationState,
    /// Connections moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u64>,
    /// Bytes of state moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_bytes: Option<u64>,
    /// BLAKE3 of the state moved (64 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_blake3: Option<String>,
    /// The state move while the guest was paused, µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switchover_us: Option<u64>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl MigrationReport {
    /// The checks the schema cannot make.
    pub fn check(&self) -> Result<(), RequestError> {
        if self.state == MigrationState::Pending {
            return Err(RequestError::malformed(
                "a report's state is running, completed or failed, not pending".into(),
            ));
        }
        if let Some(h) = &self.state_blake3
            && (h.len() != 64 || !h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        {
            return Err(RequestError::malformed(format!(
                "state_blake3 {} is not 64 lowercase hex digits",
                Quoted(h)
            )));
        }
        if let Some(r) = &self.reason {
            check_text("reason", r, 0, MAX_MIGRATION_REASON)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(state: MigrationState) -> MigrationReport {
        MigrationReport {
            id: "x".into(),
            state,
            connections: None,
            state_bytes: None,
            state_blake3: None,
            switchover_us: None,
            reason: None,
        }
    }

    #[test]
    fn reports_are_checked() {
        assert!(report(MigrationState::Running).check().is_ok());
        assert!(report(MigrationState::Pending).check().is_err());
        let mut r = report(MigrationState::Completed);
        r.state_blake3 = Some("AB".into());
        assert!(r.check().is_err());
        r.state_blake3 = Some("a".repeat(64));
        assert!(r.check().is_ok());
        r.reason = Some("x".repeat(MAX_MIGRATION_REASON + 1));
        assert!(r.check().is_err());
        assert!(MigrateRequest { to: "hv 2".into() }.check().is_err());
        assert!(MigrateRequest { to: "hv2".into() }.check().is_ok());
    }
}
