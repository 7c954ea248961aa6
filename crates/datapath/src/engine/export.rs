//! The engine's state export and import: a vNIC's connections for live
//! migration, or all of them across an agent restart (handed back to the
//! worker their flows are steered to); the blob format is [`crate::state`]'s.

use palisade_wire::flow::FlowKey;

use crate::conntrack::Conn;
use crate::events::{EndReason, EventSink};
use crate::port::PortId;
use crate::state::{ConnRecord, Snapshot, StateError};
use crate::table::Slot;

use super::Engine;

/// The name a whole-engine state blob carries where a vNIC blob names its vNIC.
const HOST_STATE: &str = "*host*";

/// What [`Engine::export_vnic_changes`] took of one vNIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VnicExport {
    /// The vNIC.
    pub vnic: String,
    /// The policy version in force at the export.
    pub policy_version: u64,
    /// The connections (all, or those changed since the `since` generation).
    pub conns: Vec<ConnRecord>,
    /// Keys of the vNIC's connections removed since (a delta only).
    pub removed: Vec<FlowKey>,
    /// Every connection is here (a pre-copy, or a delta that could not be
    /// told apart from one): the receiver replaces what it holds.
    pub full: bool,
    /// The change generation this export covers: the `since` of the next delta.
    pub mark: u64,
}

impl Engine {
    /// Export (and remove, when `remove`) every connection of `port`'s vNIC as a state blob.
    pub fn export_vnic(&mut self, port: PortId, now: u64, remove: bool, sink: &mut dyn EventSink) -> Option<Vec<u8>> {
        let vnic = self.vnic(port)?.name.clone();
        let slots: Vec<Slot> = self
            .conns
            .iter()
            .filter(|(_, c)| c.owners.contains(&Some(port)))
            .map(|(s, _)| s)
            .collect();
        let epoch = self.epoch;
        let conns: Vec<Conn> = slots
            .iter()
            .filter_map(|&s| self.conns.get(s).cloned())
            .map(|mut c| {
                // A verdict the current policy has not confirmed yet (a
                // policy change since): the importer re-decides it, or a
                // connection the new policy revokes would live on there.
                if c.epoch != epoch {
                    c.epoch = 0;
                }
                c
            })
            .collect();
        let blob = crate::state::encode(&vnic, self.lookup.version(), &conns, now);
        if remove {
            for s in slots {
                self.cut(s, EndReason::Exported, now, sink);
            }
        }
        Some(blob)
    }

    /// The connections of `port`'s vNIC for a live migration's transfer,
    /// the port left forwarding: with `since` `None` all of them (a
    /// pre-copy, which also starts keeping the keys of removed connections);
    /// with `since` the [`VnicExport::mark`] of an earlier export, only those
    /// created or changed after it and the keys of those removed after it
    /// (a delta). A delta whose removals were not all kept (the log is
    /// bounded by the table's capacity) comes back whole, `full` set.
    /// A delta reads the slots the table logged as changed since the
    /// pre-copy armed it, so its cost is the changes', not the table's
    /// (a log past its bound, or a `since` from before it, walks the
    /// table instead: the same answer, slower).
    /// `None` for a port that is not a vNIC.
    pub fn export_vnic_changes(&mut self, port: PortId, now: u64, since: Option<u64>) -> Option<VnicExport> {
        let vnic = self.vnic(port)?.name.clone();
        let tombstones = since.and(self.conns.tombstones());
        let full = tombstones.is_none();
        let removed = tombstones.unwrap_or_default();
        let after = if full { 0 } else { since.unwrap_or(0) };
        let removed: Vec<FlowKey> = removed
            .iter()
            .filter(|t| t.generation > after && t.owners.contains(&Some(port)))
            .map(|t| t.key)
            .collect();
        let epoch = self.epoch;
        let wanted = |c: &Conn| c.changed > after && c.owners.contains(&Some(port));
        let record = |c: &Conn| ConnRecord::of(c, now, c.epoch != epoch);
        // A delta reads the slots the change log kept (what changed, not
        // what the table holds); a pre-copy, or a delta the log cannot
        // answer (not armed, overflowed), walks the table.
        let logged = if full { None } else { self.conns.changed_since(after) };
        let conns = match logged {
            Some(slots) => slots
                .into_iter()
                .filter_map(|s| self.conns.get(s))
                .filter(|c| wanted(c))
                .map(record)
                .collect(),
            None => self
                .conns
                .iter()
                .map(|(_, c)| c)
                .filter(|c| wanted(c))
                .map(record)
                .collect(),
        };
        if since.is_none() {
            self.conns.arm_tombstones();
        }
        let mark = self.conns.next_generation();
        Some(VnicExport {
            vnic,
            policy_version: self.lookup.version(),
            conns,
            removed,
            full,
            mark,
        })
    }

    /// Remove the connections of `port`'s vNIC with these keys (either
    /// direction): a migration's delta removing what its pre-copy staged
    /// here, or a cancelled migration's staged copy. Keys of no connection,
    /// or of another vNIC's, are passed over. Returns how many went.
    pub fn remove_vnic_conns(&mut self, port: PortId, keys: &[FlowKey], now: u64, sink: &mut dyn EventSink) -> usize {
        let mut n = 0;
        for k in keys {
            if let Some(slot) = self.conns.find(k)
                && self.conns.get(slot).is_some_and(|c| c.owners.contains(&Some(port)))
            {
                self.cut(slot, EndReason::Exported, now, sink);
                n += 1;
            }
        }
        n
    }

    /// Have every connection of `port`'s vNIC decided again on its next
    /// packet (a migration's staged copy taken under an older policy than
    /// its delta). Returns how many.
    pub fn revalidate_vnic(&mut self, port: PortId) -> usize {
        let slots: Vec<Slot> = self
            .conns
            .iter()
            .filter(|(_, c)| c.owners.contains(&Some(port)))
            .map(|(s, _)| s)
            .collect();
        for &s in &slots {
            if let Some(c) = self.conns.get_mut(s) {
                c.epoch = 0;
                let key = c.key;
                // A cached verdict would let its packets skip the decision.
                self.flows.remove(&key);
                self.flows.remove(&key.reversed());
            }
        }
        slots.len()
    }

    /// A migration's transfer is over (moved or cancelled): stop keeping
    /// removed connections' keys.
    pub fn end_vnic_changes(&mut self) {
        self.conns.disarm_tombstones();
    }

    /// Import decoded connections into `port`'s vNIC (a live migration's
    /// staged copy with its delta applied), all or nothing: refused when
    /// `snap` names another vNIC or the table has no room. A connection is
    /// re-decided on its next packet unless `snap`'s policy version is this
    /// engine's and the exporter held its verdict current
    /// ([`ConnRecord::revalidate`] clear). Returns how many were imported.
    pub fn import_vnic_conns(
        &mut self,
        port: PortId,
        snap: Snapshot,
        now: u64,
        sink: &mut dyn EventSink,
    ) -> Result<usize, StateError> {
        let vnic = self.vnic(port).ok_or(StateError::UnknownPort)?;
        if snap.vnic != vnic.name {
            return Err(StateError::ForeignVnic {
                expected: vnic.name.clone(),
                found: snap.vnic,
            });
        }
        let free = self.conns.capacity() - self.conns.len();
        if snap.conns.len() > free {
            return Err(StateError::NoRoom {
                needed: snap.conns.len(),
                free,
            });
        }
        let strict = vnic.strict;
        Ok(self.import_snapshot(snap, strict, now, sink))
    }

    /// Import a state blob into `port`'s vNIC. Connections continue without
    /// classification when the blob's policy version is this engine's;
    /// otherwise they are re-validated on their next packet. The import is
    /// all or nothing: a blob that does not verify, or does not fit in the
    /// table, changes nothing. Migrated connections are not refused by the
    /// vNIC's connection limit (they exist already); one with the same key as
    /// a local connection replaces it. Returns how many were imported.
    pub fn import_vnic(
        &mut self,
        port: PortId,
        blob: &[u8],
        now: u64,
        sink: &mut dyn EventSink,
    ) -> Result<usize, crate::state::StateError> {
        let vnic = self.vnic(port).ok_or(crate::state::StateError::UnknownPort)?;
        let snap = crate::state::decode(blob)?;
        if snap.vnic != vnic.name {
            return Err(crate::state::StateError::ForeignVnic {
                expected: vnic.name.clone(),
                found: snap.vnic,
            });
        }
        let free = self.conns.capacity() - self.conns.len();
        if snap.conns.len() > free {
            return Err(crate::state::StateError::NoRoom {
                needed: snap.conns.len(),
                free,
            });
        }
        let strict = vnic.strict;
        Ok(self.import_snapshot(snap, strict, now, sink))
    }

    /// Export every connection of this engine (a restart of the agent on
    /// the same host: the next engine takes them all back with
    /// [`Engine::import_all`]). Unlike [`Engine::export_vnic`] this includes
    /// connections no local vNIC owns: flows in transit through an appliance
    /// port or trusted from another host, whose later packets would otherwise
    /// look like new flows.
    pub fn export_all(&self, now: u64) -> Vec<u8> {
        self.export_all_named(HOST_STATE, now)
    }

    /// [`Engine::export_all`] under a name of the caller's (an agent names
    /// its host and vNIC set, so that a start refuses another's state);
    /// such a blob is imported with [`Engine::import_decoded_where`].
    pub fn export_all_named(&self, name: &str, now: u64) -> Vec<u8> {
        let conns: Vec<Conn> = self.conns.iter().map(|(_, c)| c.clone()).collect();
        crate::state::encode(name, self.lookup.version(), &conns, now)
    }

    /// Import what [`Engine::export_all`] saved. A blob of one vNIC's state is refused.
    pub fn import_all(
        &mut self,
        blob: &[u8],
        now: u64,
        sink: &mut dyn EventSink,
    ) -> Result<usize, crate::state::StateError> {
        self.import_all_where(blob, now, sink, |_| true)
    }

    /// Import the connections of what [`Engine::export_all`] saved whose key
    /// `keep` accepts: a host with several workers hands each saved
    /// connection to the worker its flows are steered to.
    pub fn import_all_where(
        &mut self,
        blob: &[u8],
        now: u64,
        sink: &mut dyn EventSink,
        keep: impl Fn(&FlowKey) -> bool,
    ) -> Result<usize, crate::state::StateError> {
        let snap = crate::state::decode(blob)?;
        if snap.vnic != HOST_STATE {
            return Err(crate::state::StateError::ForeignVnic {
                expected: HOST_STATE.to_string(),
                found: snap.vnic,
            });
        }
        self.import_decoded_where(snap, now, sink, keep)
    }

    /// Import decoded connections whose key `keep` accepts, all or nothing
    /// (none when the table has no room for them): what
    /// [`Engine::import_all_where`] does after decoding, for state put
    /// together from more than one source (the agent's last snapshot and
    /// the crash journal written after it). The name `snap` carries is not
    /// checked.
    pub fn import_decoded_where(
        &mut self,
        mut snap: crate::state::Snapshot,
        now: u64,
        sink: &mut dyn EventSink,
        keep: impl Fn(&FlowKey) -> bool,
    ) -> Result<usize, crate::state::StateError> {
        snap.conns.retain(|c| keep(&c.key));
        let free = self.conns.capacity() - self.conns.len();
        if snap.conns.len() > free {
            return Err(crate::state::StateError::NoRoom {
                needed: snap.conns.len(),
                free,
            });
        }
        Ok(self.import_snapshot(snap, false, now, sink))
    }

    pub(super) fn import_snapshot(
        &mut self,
        snap: crate::state::Snapshot,
        strict: bool,
        now: u64,
        sink: &mut dyn EventSink,
    ) -> usize {
        let current = snap.policy_version == self.lookup.version();
        let mut n = 0;
        for s in snap.conns {
            let mut conn = Conn::new(s.key, now);
            let ends = [s.key.src_addr(), s.key.dst_addr()].map(|ip| self.local_port_of(ip));
            conn.owners = ends;
            conn.state = s.state;
            conn.last_seen = now.saturating_sub(s.idle);
            conn.created = now.saturating_sub(s.age);
            conn.packets = s.packets;
            conn.bytes = s.bytes;
            conn.tcp = s.tcp;
            conn.strict = strict || s.strict;
            conn.trusted = s.trusted;
            conn.policy_version = snap.policy_version;
            // The blob does not carry a connection's service-chain steering:
            // with chains declared, its first packet re-decides it (a
            // revalidation, which picks the instance by the same hash), so
            // a restart or a migration cannot let a redirected flow skip its
            // appliance.
            conn.epoch = if current && !s.revalidate && !self.services.any() {
                self.epoch
            } else {
                0
            };
            if self
                .conns
                .create(conn, [u32::MAX; 2], now, sink, &mut self.counters)
                .is_ok()
            {
                n += 1;
            }
        }
        n
    }
}
