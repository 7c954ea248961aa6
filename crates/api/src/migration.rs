//! Live migration ordered through the controller: the documents of
//! `POST /v1/vms/{name}/migrate`, of the order the source host's agent picks
//! up (`GET /v1/agents/{host}/migrations`) and of the outcome it reports
//! (`POST /v1/agents/{host}/migrations/{vm}`).
//!
//! A migration the hypervisor made without the controller (libvirt, virsh,
//! another tool) is detected by the destination host's agent, which sees the
//! guest announce itself (RARP or gratuitous ARP) on a vNIC the inventory
//! places elsewhere, and reports it (`POST /v1/agents/{host}/arrivals`,
//! [`ArrivalReport`]): the controller then records where the VM is and
//! stores a `follow` order ([`MigrationKind::Follow`]) for the old host's
//! agent, which moves the vNICs' state to the new host without touching the
//! hypervisor.
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

/// What the source agent does for an order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationKind {
    /// Ordered through the controller: the source agent drives the
    /// hypervisor and moves the state in the guest's pause.
    #[default]
    Ordered,
    /// Detected after the fact (the guest already runs on `to`): the source
    /// agent only moves the vNICs' state to `to` and releases it here.
    Follow,
}

impl MigrationKind {
    /// The name used in JSON and records.
    pub fn name(self) -> &'static str {
        match self {
            MigrationKind::Ordered => "ordered",
            MigrationKind::Follow => "follow",
        }
    }
}

/// The body of `POST /v1/agents/{host}/arrivals`: a guest announced itself
/// (RARP or gratuitous ARP) on a vNIC of this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrivalReport {
    /// The vNIC the announcement came in on.
    pub vnic: String,
    /// The MAC it announced (`aa:bb:cc:dd:ee:ff`).
    pub mac: String,
    /// `rarp` or `garp`.
    pub via: String,
}

impl ArrivalReport {
    /// The checks the schema cannot make.
    pub fn check(&self) -> Result<(), RequestError> {
        check_text("vnic", &self.vnic, 1, 255)?;
        let mac_ok = self.mac.len() == 17
            && self.mac.split(':').count() == 6
            && self
                .mac
                .split(':')
                .all(|b| b.len() == 2 && b.bytes().all(|c| c.is_ascii_hexdigit()));
        if !mac_ok {
            return Err(RequestError::malformed(format!(
                "mac {} is not six hex bytes separated by colons",
                Quoted(&self.mac)
            )));
        }
        if self.via != "rarp" && self.via != "garp" {
            return Err(RequestError::malformed(format!(
                "via {} is neither rarp nor garp",
                Quoted(&self.via)
            )));
        }
        Ok(())
    }
}

/// The answer to an [`ArrivalReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrivalResponse {
    /// The VM whose vNIC it is.
    pub vm: String,
    /// Whether this report moved the VM here (a `follow` order was stored
    /// for the host it left); false when it was placed here already or its
    /// move here is under way.
    pub moved: bool,
    /// The VM's order the report concerns: the new `follow` order, or the
    /// migration to this host under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<MigrationOrder>,
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
    /// Ordered through the controller, or a detected move whose state follows.
    #[serde(default)]
    pub kind: MigrationKind,
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
    /// When the destination agent said it is ready (Unix ns): the VM's
    /// vNICs attached there with the current policy's rules. The source
    /// agent is handed the order only then. A `follow` order has it from
    /// the start (its guest is there already).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged_ns: Option<u64>,
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

/// The body of `POST /v1/agents/{host}/migrations/{vm}/staged`: the
/// destination agent is ready for the VM (its vNICs attached, its rules
/// compiled), or says why not (the order then fails before anything moves).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedReport {
    /// The order's id.
    pub id: String,
    /// Whether this host is ready for the VM.
    pub ready: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl StagedReport {
    /// The checks the schema cannot make.
    pub fn check(&self) -> Result<(), RequestError> {
        if let Some(r) = &self.reason {
            check_text("reason", r, 0, MAX_MIGRATION_REASON)?;
        }
        Ok(())
    }
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
    fn arrivals_are_checked() {
        let ok = ArrivalReport {
            vnic: "web-1.0".into(),
            mac: "52:54:00:aa:bb:0c".into(),
            via: "rarp".into(),
        };
        assert!(ok.check().is_ok());
        for (mac, via) in [
            ("52:54:00:aa:bb", "rarp"),
            ("52:54:00:aa:bb:0g", "rarp"),
            ("52-54-00-aa-bb-0c", "rarp"),
            ("52:54:00:aa:bb:0c:", "rarp"),
            ("52:54:00:aa:bb:0c", "arp"),
        ] {
            let r = ArrivalReport {
                mac: mac.into(),
                via: via.into(),
                ..ok.clone()
            };
            assert!(r.check().is_err(), "{mac} {via}");
        }
        // Orders stored before `kind` existed are orders through the controller.
        let old = r#"{"id":"a@1","vm":"a","vnics":["a.0"],"from":"h1","to":"h2","requested_by":"x",
            "requested_ns":1,"deadline_ns":2,"state":"pending"}"#;
        let o: MigrationOrder = serde_json::from_str(old).unwrap();
        assert_eq!(o.kind, MigrationKind::Ordered);
        assert_eq!(o.staged_ns, None);
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
