//! Live migrations ordered through the controller.
//!
//! The controller cannot reach the agents (they pull from it), so an order
//! is a document the source host's agent picks up:
//!
//! 1. `POST /v1/vms/{name}/migrate` ([`Controller::order_migration`]): the
//!    caller holds the change permission (operator, admin); the VM is in the
//!    current policy, `to` is a host with a registered agent, and so is the
//!    host the VM runs on (the `to` of its last order if that completed, its
//!    `from` if it failed, else its inventory host). The order is stored
//!    as `migrations/<vm>` in one transaction with its change record
//!    (`vm.migrate`), conditional on the VM's previous order being what was
//!    read: two orders for one VM cannot both be taken, and one is refused
//!    (409) while another is pending or running.
//! 2. The source agent polls `GET /v1/agents/{host}/migrations`
//!    ([`Controller::migration_orders`]), reports the order `running`, drives
//!    its hypervisor (QMP in the lab) with the state move in the guest's
//!    pause, and reports the outcome ([`Controller::report_migration`]):
//!    the order's final state is stored with a migration record in the
//!    controller's trail (`vm.migrate.completed` or `vm.migrate.failed`: the
//!    VM, from, to, start and end, connections moved, the state's BLAKE3).
//! 3. An order still pending or running at its deadline
//!    ([`MIGRATION_DEADLINE`]) is failed by the controller the next time it
//!    is looked at (a source agent that is gone), with its record, so the
//!    VM can be ordered again.
//!
//! Store layout: `migrations/<vm>` → the VM's last [`MigrationOrder`]
//! (history is in the change records and the trail).

use std::time::Duration;

use palisade_api::migration::{MigrateRequest, MigrationOrder, MigrationReport, MigrationState};
use palisade_api::validate::{Quoted, check_host, check_text};
use palisade_audit::record::ChangeRecord;

use crate::core::{Controller, CoreError, now_ns};
use crate::store::{self, Compare};

const MIGRATIONS: &str = "migrations/";

/// How long an order may stay pending or running: the source agent's
/// migration timeout (QEMU's RAM copy under TCG included) and its poll, with room.
pub const MIGRATION_DEADLINE: Duration = Duration::from_secs(600);

/// How often an order is tried again after losing a race on its key.
const RETRIES: usize = 8;

fn key(vm: &str) -> String {
    format!("{MIGRATIONS}{vm}")
}

fn encode(o: &MigrationOrder) -> Vec<u8> {
    // A plain struct with string keys: serializing cannot fail.
    serde_json::to_vec(o).unwrap_or_default()
}

/// The migration record of an order that is over: what the trail keeps.
fn record(o: &MigrationOrder, actor: &str) -> ChangeRecord {
    let diff = serde_json::json!({
        "id": o.id,
        "vm": o.vm,
        "from": o.from,
        "to": o.to,
        "outcome": o.state.name(),
        "requested_by": o.requested_by,
        "requested_ns": o.requested_ns,
        "started_ns": o.started_ns,
        "finished_ns": o.finished_ns,
        "connections": o.connections,
        "state_bytes": o.state_bytes,
        "state_blake3": o.state_blake3,
        "switchover_us": o.switchover_us,
        "reason": o.reason,
    });
    ChangeRecord {
        time_ns: o.finished_ns.unwrap_or_else(now_ns),
        actor: actor.to_string(),
        action: format!("vm.migrate.{}", o.state.name()),
        resource: format!("vm/{}", o.vm),
        diff: diff.to_string(),
        policy_version: None,
    }
}

impl Controller {
    /// The VM's last order and its stored bytes (for a conditional write).
    fn stored_order(&self, vm: &str) -> Result<(Option<MigrationOrder>, Option<Vec<u8>>), CoreError> {
        let raw = self.store().get(&key(vm))?;
        let order = match &raw {
            Some(b) => Some(store::decode::<MigrationOrder>(&key(vm), b)?),
            None => None,
        };
        Ok((order, raw))
    }

    /// Replace the VM's order `raw` with `order`, with `change` when given
    /// (else a plain conditional write); `Ok(false)`: it changed meanwhile.
    fn put_order(
        &self,
        raw: Option<Vec<u8>>,
        order: &MigrationOrder,
        change: Option<&ChangeRecord>,
    ) -> Result<bool, CoreError> {
        let compares = [Compare {
            key: key(&order.vm),
            value: raw,
        }];
        let puts = vec![(key(&order.vm), encode(order))];
        match change {
            Some(c) => self.commit_change(&compares, puts, c),
            None => Ok(self.store().txn(&compares, &puts)?),
        }
    }

    /// Fail `order` (read as `raw`) if it is not over and its deadline
    /// passed; the order as it now stands.
    fn expire(&self, order: MigrationOrder, raw: Option<Vec<u8>>, now: u64) -> Result<MigrationOrder, CoreError> {
        if order.state.is_final() || now < order.deadline_ns {
            return Ok(order);
        }
        let mut failed = order;
        failed.state = MigrationState::Failed;
        failed.finished_ns = Some(now);
        failed.reason = Some(format!(
            "no outcome from {}'s agent by the order's deadline; the controller gave it up \
             (the VM is where that agent left it)",
            failed.from
        ));
        // Lost the race: someone else wrote it meanwhile; the caller reads again.
        self.put_order(raw, &failed, Some(&record(&failed, "controller")))?;
        Ok(failed)
    }

    /// Order VM `vm` migrated as `req` says, on behalf of `actor` (see the
    /// module's documentation); the stored order, `pending`.
    pub fn order_migration(&self, actor: &str, vm: &str, req: &MigrateRequest) -> Result<MigrationOrder, CoreError> {
        req.check()?;
        let vms = self.vms()?;
        let Some(info) = vms.iter().find(|v| v.name == vm) else {
            return Err(CoreError::NotFound(format!(
                "VM {} is not in the current policy",
                Quoted(vm)
            )));
        };
        let agents = self.agents()?;
        let registered = |h: &str| agents.iter().any(|a| a.host == h);
        for _ in 0..RETRIES {
            let now = now_ns();
            let (last, raw) = self.stored_order(vm)?;
            let last = match last {
                Some(o) => Some(self.expire(o, raw.clone(), now)?),
                None => None,
            };
            // An expiry just written changed the key: read it again.
            let raw = if last.as_ref().is_some_and(|o| o.state.is_final()) {
                self.store().get(&key(vm))?
            } else {
                raw
            };
            if let Some(o) = &last
                && !o.state.is_final()
            {
                return Err(CoreError::InProgress(format!(
                    "VM {} is being migrated from {} to {} (order {}, {}); one migration per VM at a time",
                    Quoted(vm),
                    o.from,
                    o.to,
                    o.id,
                    o.state.name()
                )));
            }
            // Where the VM runs: where its last order left it, else where the inventory puts it.
            let from = match &last {
                Some(o) if o.state == MigrationState::Completed => o.to.clone(),
                Some(o) => o.from.clone(),
                None => info.host.clone().ok_or_else(|| {
                    CoreError::Unprocessable(format!(
                        "VM {} has no host in the inventory, so no agent to migrate it",
                        Quoted(vm)
                    ))
                })?,
            };
            if from == req.to {
                return Err(CoreError::Unprocessable(format!(
                    "VM {} runs on {} already",
                    Quoted(vm),
                    Quoted(&req.to)
                )));
            }
            for (role, h) in [("source", &from), ("destination", &req.to)] {
                if !registered(h) {
                    return Err(CoreError::Unprocessable(format!(
                        "no agent is registered on {} (the migration's {role})",
                        Quoted(h)
                    )));
                }
            }
            let order = MigrationOrder {
                id: format!("{vm}@{now}"),
                vm: vm.to_string(),
                vnics: info.vnics.clone(),
                from: from.clone(),
                to: req.to.clone(),
                requested_by: actor.to_string(),
                requested_ns: now,
                deadline_ns: now.saturating_add(MIGRATION_DEADLINE.as_nanos() as u64),
                state: MigrationState::Pending,
                started_ns: None,
                finished_ns: None,
                connections: None,
                state_bytes: None,
                state_blake3: None,
                switchover_us: None,
                reason: None,
            };
            let change = ChangeRecord {
                time_ns: now,
                actor: actor.to_string(),
                action: "vm.migrate".into(),
                resource: format!("vm/{vm}"),
                diff: serde_json::json!({ "id": order.id, "from": from, "to": req.to }).to_string(),
                policy_version: None,
            };
            if self.put_order(raw, &order, Some(&change))? {
                return Ok(order);
            }
        }
        Err(CoreError::Conflict)
    }

    /// VM `vm`'s last migration order, as it stands (one past its deadline failed).
    pub fn migration(&self, vm: &str) -> Result<MigrationOrder, CoreError> {
        check_text("VM name", vm, 1, usize::MAX)?;
        let (order, raw) = self.stored_order(vm)?;
        let order =
            order.ok_or_else(|| CoreError::NotFound(format!("VM {} was never ordered to migrate", Quoted(vm))))?;
        self.expire(order, raw, now_ns())
    }

    /// The orders agent `host` is to carry out: pending, from `host`, not past their deadline.
    pub fn migration_orders(&self, host: &str) -> Result<Vec<MigrationOrder>, CoreError> {
        check_host(host)?;
        let now = now_ns();
        let mut out = Vec::new();
        for (k, b) in self.store().list_prefix(MIGRATIONS)? {
            let o: MigrationOrder = store::decode(&k, &b)?;
            if o.state == MigrationState::Pending && o.from == host && now < o.deadline_ns {
                out.push(o);
            }
        }
        Ok(out)
    }

    /// Agent `host` reports on the migration of `vm` it carries out: it took
    /// the order (`running`) or finished it (the order's final state and its
    /// migration record). Refused: another host's order (422), another order
    /// (409), an order already over (409).
    pub fn report_migration(
        &self,
        host: &str,
        vm: &str,
        report: &MigrationReport,
    ) -> Result<MigrationOrder, CoreError> {
        check_host(host)?;
        report.check()?;
        for _ in 0..RETRIES {
            let (order, raw) = self.stored_order(vm)?;
            let Some(mut order) = order else {
                return Err(CoreError::NotFound(format!("VM {} has no migration order", Quoted(vm))));
            };
            if order.from != host {
                return Err(CoreError::Unprocessable(format!(
                    "the migration of VM {} is carried out by {}, not {}",
                    Quoted(vm),
                    Quoted(&order.from),
                    Quoted(host)
                )));
            }
            if order.id != report.id {
                return Err(CoreError::InProgress(format!(
                    "the report is for order {}; VM {}'s order is {}",
                    Quoted(&report.id),
                    Quoted(vm),
                    Quoted(&order.id)
                )));
            }
            if order.state.is_final() {
                return Err(CoreError::InProgress(format!(
                    "order {} is over already ({})",
                    Quoted(&order.id),
                    order.state.name()
                )));
            }
            let now = now_ns();
            match report.state {
                MigrationState::Running if order.state == MigrationState::Running => return Ok(order),
                MigrationState::Running => {
                    order.state = MigrationState::Running;
                    order.started_ns = Some(now);
                    if self.put_order(raw, &order, None)? {
                        return Ok(order);
                    }
                }
                state => {
                    order.state = state;
                    order.started_ns.get_or_insert(now);
                    order.finished_ns = Some(now);
                    order.connections = report.connections;
                    order.state_bytes = report.state_bytes;
                    order.state_blake3 = report.state_blake3.clone();
                    order.switchover_us = report.switchover_us;
                    order.reason = report.reason.clone();
                    if self.put_order(raw, &order, Some(&record(&order, &format!("agent/{host}"))))? {
                        return Ok(order);
                    }
                }
            }
        }
        Err(CoreError::Conflict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_migration_record_names_everything_the_trail_needs() {
        let o = MigrationOrder {
            id: "web-1@5".into(),
            vm: "web-1".into(),
            vnics: vec!["web-1.0".into()],
            from: "hv1".into(),
            to: "hv2".into(),
            requested_by: "ops".into(),
            requested_ns: 5,
            deadline_ns: 10,
            state: MigrationState::Completed,
            started_ns: Some(6),
            finished_ns: Some(9),
            connections: Some(3),
            state_bytes: Some(400),
            state_blake3: Some("ab".repeat(32)),
            switchover_us: Some(1500),
            reason: None,
        };
        let r = record(&o, "agent/hv1");
        assert_eq!(r.action, "vm.migrate.completed");
        assert_eq!(r.resource, "vm/web-1");
        assert_eq!(r.time_ns, 9);
        let d: serde_json::Value = serde_json::from_str(&r.diff).unwrap();
        for (k, v) in [
            ("vm", serde_json::json!("web-1")),
            ("from", serde_json::json!("hv1")),
            ("to", serde_json::json!("hv2")),
            ("started_ns", serde_json::json!(6)),
            ("finished_ns", serde_json::json!(9)),
            ("connections", serde_json::json!(3)),
            ("outcome", serde_json::json!("completed")),
            ("state_blake3", serde_json::json!("ab".repeat(32))),
        ] {
            assert_eq!(d[k], v, "{k}");
        }
    }
}
