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
//! 2. The destination agent, which polls the same endpoint for the orders
//!    to its host, pre-stages: it says whether the VM's vNICs are attached
//!    there with their rules (`POST .../migrations/{vm}/staged`,
//!    [`Controller::report_staged`]); not ready fails the order before
//!    anything moves. Only a staged order is handed to the source.
//! 3. The source agent polls `GET /v1/agents/{host}/migrations`
//!    ([`Controller::migration_orders`]), reports the order `running`, drives
//!    its hypervisor (QMP in the lab) with the state move in the guest's
//!    pause, and reports the outcome ([`Controller::report_migration`]):
//!    the order's final state is stored with a migration record in the
//!    controller's trail (`vm.migrate.completed` or `vm.migrate.failed`: the
//!    VM, from, to, start and end, connections moved, the state's BLAKE3).
//! 4. An order still pending or running at its deadline
//!    ([`MIGRATION_DEADLINE`]) is failed by the controller the next time it
//!    is looked at (a source agent that is gone), with its record, so the
//!    VM can be ordered again.
//!
//! 5. A migration the hypervisor made without the controller (libvirt,
//!    virsh, another tool) is reported by the destination's agent, which saw
//!    the guest announce itself on a vNIC the inventory places elsewhere
//!    (`POST /v1/agents/{host}/arrivals`, [`Controller::report_arrival`]):
//!    the controller places the VM there and stores a `follow` order for the
//!    host it left, with the record `vm.migrate.detected`, in one
//!    transaction; that host's agent moves the vNICs' state and reports like
//!    for any order.
//!
//! Where a VM runs is the location overlay ([`palisade_api::CurrentRecord::locations`]
//! of `policy/current`) over the inventory's `host`: a completed order
//! through the controller, or a detected move, places the VM on its
//! destination in the transaction that records it. It bumps the effective
//! revision, so `GET /v1/vms`, the orders' sources and every agent's bundle
//! follow the VM.
//!
//! Store layout: `migrations/<vm>` → the VM's last [`MigrationOrder`]
//! (history is in the change records and the trail);
//! `migration-queues/<host>` → the VMs (a JSON array) whose order is active
//! with that host as source, written with the order: an agent's poll reads
//! its queue and those VMs' orders, not every VM's.

use std::collections::BTreeSet;
use std::time::Duration;

use palisade_api::migration::{
    ArrivalReport, ArrivalResponse, MigrateRequest, MigrationKind, MigrationOrder, MigrationReport, MigrationState,
    StagedReport,
};
use palisade_api::validate::{Quoted, check_host, check_text};
use palisade_audit::record::ChangeRecord;

use crate::core::{CURRENT, Controller, CoreError, now_ns};
use crate::store::{self, Compare};

const MIGRATIONS: &str = "migrations/";
const QUEUES: &str = "migration-queues/";

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
        "kind": o.kind.name(),
        "from": o.from,
        "to": o.to,
        "outcome": o.state.name(),
        "requested_by": o.requested_by,
        "requested_ns": o.requested_ns,
        "staged_ns": o.staged_ns,
        "prestage_us": o.staged_ns.map(|t| t.saturating_sub(o.requested_ns) / 1000),
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

/// The VMs whose orders agent `host` is to look at: `migration-queues/<host>`.
/// A new order, `pending` and without an outcome: named for `vm` and the
/// time it is made (`now`), due by [`MIGRATION_DEADLINE`] from then. A
/// `follow` order is staged from the start (its guest runs on `to` already:
/// nothing to pre-stage); an ordered one waits for its destination's word.
fn pending_order(
    vm: &str,
    vnics: Vec<String>,
    kind: MigrationKind,
    from: &str,
    to: &str,
    requested_by: String,
    now: u64,
) -> MigrationOrder {
    MigrationOrder {
        id: format!("{vm}@{now}"),
        vm: vm.to_string(),
        vnics,
        kind,
        from: from.to_string(),
        to: to.to_string(),
        requested_by,
        requested_ns: now,
        deadline_ns: now.saturating_add(MIGRATION_DEADLINE.as_nanos() as u64),
        staged_ns: (kind == MigrationKind::Follow).then_some(now),
        state: MigrationState::Pending,
        started_ns: None,
        finished_ns: None,
        connections: None,
        state_bytes: None,
        state_blake3: None,
        switchover_us: None,
        reason: None,
    }
}

fn queue_key(host: &str) -> String {
    format!("{QUEUES}{host}")
}

/// The extra conditions and writes a transaction on an order carries.
#[derive(Default)]
struct Extra {
    compares: Vec<Compare>,
    puts: Vec<(String, Vec<u8>)>,
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

    /// Add `vm` to (`add`) or take it off host `host`'s queue, conditional
    /// on the queue being what is read now.
    fn queue_edit(&self, host: &str, vm: &str, add: bool, extra: &mut Extra) -> Result<(), CoreError> {
        let k = queue_key(host);
        let raw = self.store().get(&k)?;
        let mut vms: BTreeSet<String> = match &raw {
            Some(b) => store::decode(&k, b)?,
            None => BTreeSet::new(),
        };
        let changed = if add {
            vms.insert(vm.to_string())
        } else {
            vms.remove(vm)
        };
        extra.compares.push(Compare {
            key: k.clone(),
            value: raw,
        });
        if changed {
            extra.puts.push((k, serde_json::to_vec(&vms).unwrap_or_default()));
        }
        Ok(())
    }

    /// Take an order that is over off its hosts' queues.
    fn dequeue(&self, order: &MigrationOrder, extra: &mut Extra) -> Result<(), CoreError> {
        self.queue_edit(&order.from, &order.vm, false, extra)?;
        if order.kind == MigrationKind::Ordered && order.to != order.from {
            self.queue_edit(&order.to, &order.vm, false, extra)?;
        }
        Ok(())
    }

    /// Place `vm` on `host` in the location overlay: a new effective
    /// revision, so every agent learns where the VM runs.
    fn location_edit(&self, vm: &str, host: &str, extra: &mut Extra) -> Result<(), CoreError> {
        let (cur, raw) = self.current_raw()?;
        if cur.locations.get(vm).map(String::as_str) == Some(host) {
            return Ok(());
        }
        let mut next = cur.clone();
        next.locations.insert(vm.to_string(), host.to_string());
        next.revision = cur.revision + 1;
        extra.compares.push(Compare {
            key: CURRENT.into(),
            value: raw,
        });
        extra
            .puts
            .push((CURRENT.into(), serde_json::to_vec(&next).unwrap_or_default()));
        Ok(())
    }

    /// Replace the VM's order `raw` with `order`, with `change` when given
    /// (else a plain conditional write) and `extra`; `Ok(false)`: something
    /// it depends on changed meanwhile.
    fn put_order(
        &self,
        raw: Option<Vec<u8>>,
        order: &MigrationOrder,
        change: Option<&ChangeRecord>,
        extra: Extra,
    ) -> Result<bool, CoreError> {
        let mut compares = vec![Compare {
            key: key(&order.vm),
            value: raw,
        }];
        compares.extend(extra.compares);
        let mut puts = vec![(key(&order.vm), encode(order))];
        puts.extend(extra.puts);
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
        let mut extra = Extra::default();
        self.dequeue(&failed, &mut extra)?;
        // Lost the race: someone else wrote it meanwhile; the caller reads again.
        self.put_order(raw, &failed, Some(&record(&failed, "controller")), extra)?;
        Ok(failed)
    }

    /// The VM's last order as it stands (one past its deadline failed) and
    /// the stored bytes to compare against.
    fn current_order(&self, vm: &str) -> Result<(Option<MigrationOrder>, Option<Vec<u8>>), CoreError> {
        let (last, raw) = self.stored_order(vm)?;
        let Some(o) = last else { return Ok((None, raw)) };
        let expired = !o.state.is_final();
        let o = self.expire(o, raw.clone(), now_ns())?;
        if expired && o.state.is_final() {
            // The expiry (ours or another's) changed the key: read it again.
            return self.stored_order(vm);
        }
        Ok((Some(o), raw))
    }

    /// Order VM `vm` migrated as `req` says, on behalf of `actor` (see the
    /// module's documentation); the stored order, `pending`.
    pub fn order_migration(&self, actor: &str, vm: &str, req: &MigrateRequest) -> Result<MigrationOrder, CoreError> {
        req.check()?;
        let agents = self.agents()?;
        let registered = |h: &str| agents.iter().any(|a| a.host == h);
        for _ in 0..RETRIES {
            // Where the VM runs: the location overlay over the inventory.
            let vms = self.vms()?;
            let Some(info) = vms.iter().find(|v| v.name == vm) else {
                return Err(CoreError::NotFound(format!(
                    "VM {} is not in the current policy",
                    Quoted(vm)
                )));
            };
            let now = now_ns();
            let (last, raw) = self.current_order(vm)?;
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
            let from = info.host.clone().ok_or_else(|| {
                CoreError::Unprocessable(format!(
                    "VM {} has no host in the inventory, so no agent to migrate it",
                    Quoted(vm)
                ))
            })?;
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
            let order = pending_order(
                vm,
                info.vnics.clone(),
                MigrationKind::Ordered,
                &from,
                &req.to,
                actor.to_string(),
                now,
            );
            let change = ChangeRecord {
                time_ns: now,
                actor: actor.to_string(),
                action: "vm.migrate".into(),
                resource: format!("vm/{vm}"),
                diff: serde_json::json!({ "id": order.id, "from": from, "to": req.to }).to_string(),
                policy_version: None,
            };
            // The destination pre-stages first, then the source carries it out.
            let mut extra = Extra::default();
            self.queue_edit(&from, vm, true, &mut extra)?;
            self.queue_edit(&req.to, vm, true, &mut extra)?;
            if self.put_order(raw, &order, Some(&change), extra)? {
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

    /// The orders agent `host` is to act on, pending and not past their
    /// deadline: those to `host` not yet pre-staged (the agent says whether
    /// it is ready, [`Controller::report_staged`]), and those from `host`
    /// once pre-staged (it carries them out). Reads the host's queue and its
    /// VMs' orders, never another host's.
    pub fn migration_orders(&self, host: &str) -> Result<Vec<MigrationOrder>, CoreError> {
        check_host(host)?;
        let k = queue_key(host);
        let vms: BTreeSet<String> = store::get_json(&**self.store(), &k)?.unwrap_or_default();
        let now = now_ns();
        let mut out = Vec::new();
        for vm in vms {
            let (order, raw) = self.stored_order(&vm)?;
            let Some(o) = order else { continue };
            let to_carry_out = o.from == host && o.staged_ns.is_some();
            let to_stage = o.to == host && o.staged_ns.is_none();
            if o.state != MigrationState::Pending || !(to_carry_out || to_stage) {
                continue;
            }
            if now >= o.deadline_ns {
                self.expire(o, raw, now)?;
                continue;
            }
            out.push(o);
        }
        Ok(out)
    }

    /// Agent `host` reports on the migration of `vm` it carries out: it took
    /// the order (`running`) or finished it (the order's final state and its
    /// migration record; a completed order through the controller also
    /// places the VM on its destination). Refused: another host's order
    /// (422), another order (409), an order already over (409).
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
            if order.staged_ns.is_none() {
                return Err(CoreError::InProgress(format!(
                    "order {} waits for its destination {} to pre-stage the VM",
                    Quoted(&order.id),
                    Quoted(&order.to)
                )));
            }
            let now = now_ns();
            match report.state {
                MigrationState::Running if order.state == MigrationState::Running => return Ok(order),
                MigrationState::Running => {
                    order.state = MigrationState::Running;
                    order.started_ns = Some(now);
                    if self.put_order(raw, &order, None, Extra::default())? {
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
                    let mut extra = Extra::default();
                    self.dequeue(&order, &mut extra)?;
                    // A follow order's VM was placed when its move was detected.
                    if state == MigrationState::Completed && order.kind == MigrationKind::Ordered {
                        self.location_edit(vm, &order.to, &mut extra)?;
                    }
                    if self.put_order(raw, &order, Some(&record(&order, &format!("agent/{host}"))), extra)? {
                        return Ok(order);
                    }
                }
            }
        }
        Err(CoreError::Conflict)
    }

    /// Destination agent `host` says whether it is ready for VM `vm`'s
    /// migration (its vNICs attached, the VM's rules compiled): ready, the
    /// order goes to the source agent; not ready, it fails before anything
    /// moved, with its record. Refused: another order (409), one over or
    /// taken (409), from another host than the order's destination (422).
    pub fn report_staged(&self, host: &str, vm: &str, report: &StagedReport) -> Result<MigrationOrder, CoreError> {
        check_host(host)?;
        report.check()?;
        for _ in 0..RETRIES {
            let (order, raw) = self.current_order(vm)?;
            let Some(mut order) = order else {
                return Err(CoreError::NotFound(format!("VM {} has no migration order", Quoted(vm))));
            };
            if order.id != report.id {
                return Err(CoreError::InProgress(format!(
                    "the report is for order {}; VM {}'s order is {}",
                    Quoted(&report.id),
                    Quoted(vm),
                    Quoted(&order.id)
                )));
            }
            if order.to != host {
                return Err(CoreError::Unprocessable(format!(
                    "the migration of VM {} goes to {}, not {}",
                    Quoted(vm),
                    Quoted(&order.to),
                    Quoted(host)
                )));
            }
            if order.staged_ns.is_some() && report.ready {
                return Ok(order);
            }
            if order.state != MigrationState::Pending || order.staged_ns.is_some() {
                return Err(CoreError::InProgress(format!(
                    "order {} is {} already",
                    Quoted(&order.id),
                    if order.state == MigrationState::Pending {
                        "staged"
                    } else {
                        order.state.name()
                    }
                )));
            }
            let now = now_ns();
            let mut extra = Extra::default();
            let change = if report.ready {
                order.staged_ns = Some(now);
                self.queue_edit(host, vm, false, &mut extra)?;
                None
            } else {
                order.state = MigrationState::Failed;
                order.finished_ns = Some(now);
                order.reason = Some(format!(
                    "the destination {} is not ready: {}; nothing moved",
                    order.to,
                    report.reason.as_deref().unwrap_or("no reason given")
                ));
                self.dequeue(&order, &mut extra)?;
                Some(record(&order, &format!("agent/{host}")))
            };
            if self.put_order(raw, &order, change.as_ref(), extra)? {
                return Ok(order);
            }
        }
        Err(CoreError::Conflict)
    }

    /// Agent `host` saw a guest announce itself on its vNIC `arrival.vnic`
    /// (see the module's documentation). When the VM is placed elsewhere and
    /// no migration of it is under way, the controller places it on `host`
    /// and stores a `follow` order for the host it left, with the record
    /// `vm.migrate.detected`, in one transaction. Refused: a vNIC the policy
    /// does not have (404), a MAC that is not the vNIC's (422: a guest
    /// announcing another's address moves nothing), a migration of the VM
    /// to another host under way (409).
    pub fn report_arrival(&self, host: &str, arrival: &ArrivalReport) -> Result<ArrivalResponse, CoreError> {
        check_host(host)?;
        arrival.check()?;
        for _ in 0..RETRIES {
            let (cur, _) = self.current_raw()?;
            let Some((model, _)) = self.effective(&cur)? else {
                return Err(CoreError::NotFound("no policy applied yet, so no vNIC".into()));
            };
            let Some((vm, nic)) = model.inventory.vnic(&arrival.vnic) else {
                return Err(CoreError::NotFound(format!(
                    "vNIC {} is not in the current policy",
                    Quoted(&arrival.vnic)
                )));
            };
            if !nic.mac.eq_ignore_ascii_case(&arrival.mac) {
                return Err(CoreError::Unprocessable(format!(
                    "vNIC {} has MAC {} in the inventory, not the announced {}; nothing moved",
                    Quoted(&arrival.vnic),
                    nic.mac,
                    Quoted(&arrival.mac)
                )));
            }
            let name = vm.name.clone();
            let (last, raw) = self.current_order(&name)?;
            if let Some(o) = &last
                && !o.state.is_final()
            {
                if o.to == host {
                    // The announcement of a move already known.
                    return Ok(ArrivalResponse {
                        vm: name,
                        moved: false,
                        order: last,
                    });
                }
                return Err(CoreError::InProgress(format!(
                    "VM {} is being migrated from {} to {} (order {}); its announcement on {} is not taken",
                    Quoted(&name),
                    o.from,
                    o.to,
                    o.id,
                    Quoted(host)
                )));
            }
            let Some(from) = vm.host.clone().filter(|h| h != host) else {
                // Placed here already (or nowhere: nothing to follow).
                return Ok(ArrivalResponse {
                    vm: name,
                    moved: false,
                    order: None,
                });
            };
            let now = now_ns();
            let order = pending_order(
                &name,
                vm.vnics.iter().map(|n| n.name.clone()).collect(),
                MigrationKind::Follow,
                &from,
                host,
                format!("agent/{host}"),
                now,
            );
            let change = ChangeRecord {
                time_ns: now,
                actor: format!("agent/{host}"),
                action: "vm.migrate.detected".into(),
                resource: format!("vm/{name}"),
                diff: serde_json::json!({
                    "id": order.id,
                    "from": from,
                    "to": host,
                    "vnic": arrival.vnic,
                    "mac": arrival.mac.to_ascii_lowercase(),
                    "via": arrival.via,
                })
                .to_string(),
                policy_version: None,
            };
            let mut extra = Extra::default();
            self.queue_edit(&from, &name, true, &mut extra)?;
            self.location_edit(&name, host, &mut extra)?;
            if self.put_order(raw, &order, Some(&change), extra)? {
                return Ok(ArrivalResponse {
                    vm: name,
                    moved: true,
                    order: Some(order),
                });
            }
        }
        Err(CoreError::Conflict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_order_is_pending_due_by_the_deadline_and_staged_only_when_it_follows() {
        let o = pending_order("web-1", vec![], MigrationKind::Ordered, "hv1", "hv2", "ops".into(), 7);
        assert_eq!(
            (o.id.as_str(), o.state, o.staged_ns),
            ("web-1@7", MigrationState::Pending, None)
        );
        assert_eq!(o.deadline_ns, 7 + MIGRATION_DEADLINE.as_nanos() as u64);
        let f = pending_order(
            "web-1",
            vec![],
            MigrationKind::Follow,
            "hv1",
            "hv2",
            "agent/hv2".into(),
            7,
        );
        assert_eq!(f.staged_ns, Some(7));
        assert!(f.started_ns.is_none() && f.finished_ns.is_none() && f.reason.is_none());
    }

    #[test]
    fn a_migration_record_names_everything_the_trail_needs() {
        let mut o = pending_order(
            "web-1",
            vec!["web-1.0".into()],
            MigrationKind::Ordered,
            "hv1",
            "hv2",
            "ops".into(),
            5,
        );
        o.staged_ns = Some(5);
        o.state = MigrationState::Completed;
        o.started_ns = Some(6);
        o.finished_ns = Some(9);
        o.connections = Some(3);
        o.state_bytes = Some(400);
        o.state_blake3 = Some("ab".repeat(32));
        o.switchover_us = Some(1500);
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
