//! One vNIC's connection state as it moves between hosts (live migration).
//!
//! Each datapath worker's engine exports the connections of a vNIC it holds
//! as a state blob (`palisade_datapath::state`: versioned, checksummed). A
//! host with several workers answers one migration with one blob, so the
//! workers' blobs are merged into one ([`merge`]); the receiving host hands
//! each connection to the worker its flows are steered to, so the blob is
//! split by the same steering ([`split`]). Both work on the blob's
//! fixed-size records as bytes, after `state::decode` has verified every
//! blob they read (magic, version, lengths, checksum), and both check what
//! they write by decoding it again: a blob from the network is hostile
//! input, refused with a [`StateError`], never trusted half-read.
//!
//! Between agents with the agent-to-agent channel ([`crate::peer`]) the
//! state moves in two steps instead ([`Handover`]): every connection while
//! the guest runs ([`export_changes`] without `since`), which the
//! destination imports into the vNIC's tables at once (staged: nothing
//! reaches the vNIC there before the switchover), then in the guest's pause
//! only what changed since (created, advanced or removed), which the
//! destination applies on top ([`apply_arrival`]): the pause carries the
//! delta's cost, not the table's.

use std::time::{Duration, Instant};

use palisade_datapath::Engine;
use palisade_datapath::state::{self, StateError};
use palisade_datapath::transfer::Transfer;
use palisade_io::steer;

use crate::config::MigrationConfig;
use crate::http::{Control, ControlError};

/// Why a vNIC's state could not be exported or imported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MigrateError {
    /// No vNIC of that name on this host.
    #[error("no vNIC {0:?} on this host")]
    UnknownVnic(String),
    /// The blob was refused (nothing was imported).
    #[error("state blob refused: {0}")]
    Refused(#[from] StateError),
}

/// Export the connections of `vnic` from every worker's engine (`engines`,
/// in worker order) as one blob. The connections stay in the tables.
pub fn export(engines: &mut [&mut Engine], vnic: &str, now: u64) -> Result<Vec<u8>, MigrateError> {
    let mut blobs = Vec::with_capacity(engines.len());
    for engine in engines.iter_mut() {
        let port = engine
            .port_of(vnic)
            .ok_or_else(|| MigrateError::UnknownVnic(vnic.to_string()))?;
        let blob = engine
            .export_vnic(port, now, false, &mut ())
            .ok_or_else(|| MigrateError::UnknownVnic(vnic.to_string()))?;
        blobs.push(blob);
    }
    Ok(merge(&blobs)?)
}

/// Import `blob` into `vnic`, each connection into the engine of the worker
/// its flows are steered to (`engines` in worker order). All or nothing: the
/// blob is verified, named for `vnic` and split, and every engine is checked
/// for the vNIC and for room, before any connection goes in. Returns the
/// connections imported.
pub fn import(engines: &mut [&mut Engine], vnic: &str, blob: &[u8], now: u64) -> Result<usize, MigrateError> {
    let (from, _) = describe(blob)?;
    if from != vnic {
        return Err(StateError::ForeignVnic {
            expected: vnic.to_string(),
            found: from,
        }
        .into());
    }
    let shares = split(blob, engines.len() as u32)?;
    let mut ports = Vec::with_capacity(engines.len());
    for (engine, share) in engines.iter().zip(&shares) {
        let port = engine
            .port_of(vnic)
            .ok_or_else(|| MigrateError::UnknownVnic(vnic.to_string()))?;
        // `split` verified each share as it wrote it: its header's count stands.
        let needed = claimed_count(share).ok_or(StateError::Malformed("a share without a count"))?;
        let free = engine.conntrack().capacity() - engine.conntrack().len();
        if needed > free {
            return Err(StateError::NoRoom { needed, free }.into());
        }
        ports.push(port);
    }
    let mut imported = 0;
    for ((engine, share), port) in engines.iter_mut().zip(&shares).zip(ports) {
        // Migrated connections are not new flows: their start is in the source's trail.
        imported += engine.import_vnic(port, share, now, &mut ())?;
    }
    Ok(imported)
}

/// Largest state blob an agent accepts (10,000 connections of one vNIC are
/// about 1.5 MB; this leaves room and bounds what a client can make it hold).
pub const MAX_BLOB: usize = 16 << 20;

/// Where a verified blob's parts are: its header, its record count, its records.
struct Layout {
    /// End of the header (magic, version, policy version, name).
    header: usize,
    /// Records.
    count: usize,
    /// Bytes per record (depends on the blob's version).
    record_len: usize,
}

/// Decode `blob` (verifying it) and locate its parts.
fn layout(blob: &[u8]) -> Result<(state::Snapshot, Layout), StateError> {
    let snap = state::decode(blob)?;
    // magic (6) | version (2) | policy_version (8) | name_len (2) | name | count (4)
    let name_len = usize::from(u16::from_be_bytes([blob[16], blob[17]]));
    let header = 18 + name_len;
    let records = blob.len() - header - 4 - 4;
    let count = snap.conns.len();
    let record_len = records.checked_div(count).unwrap_or(0);
    Ok((
        snap,
        Layout {
            header,
            count,
            record_len,
        },
    ))
}

/// A blob from `header` (copied) and `records`, with its count and checksum.
fn assemble(header: &[u8], records: &[&[u8]]) -> Result<Vec<u8>, StateError> {
    let count = u32::try_from(records.len()).map_err(|_| StateError::Malformed("too many records"))?;
    let mut out = Vec::with_capacity(header.len() + 8 + records.iter().map(|r| r.len()).sum::<usize>());
    out.extend_from_slice(header);
    out.extend_from_slice(&count.to_be_bytes());
    for r in records {
        out.extend_from_slice(r);
    }
    let crc = state::crc32(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    // What was written must read back: a layout this module got wrong is an error, not a bad import.
    state::decode(&out)?;
    Ok(out)
}

fn records<'a>(blob: &'a [u8], l: &Layout) -> impl Iterator<Item = &'a [u8]> {
    let start = l.header + 4;
    (0..l.count).map(move |i| &blob[start + i * l.record_len..start + (i + 1) * l.record_len])
}

/// Merge the blobs of one vNIC's connections exported by several workers
/// into one. They must agree on the vNIC, the policy version and the format
/// version (one host's workers always do).
pub fn merge(blobs: &[Vec<u8>]) -> Result<Vec<u8>, StateError> {
    let Some(first) = blobs.first() else {
        return Err(StateError::Malformed("no blobs to merge"));
    };
    let (head, head_layout) = layout(first)?;
    let mut all: Vec<&[u8]> = records(first, &head_layout).collect();
    for b in &blobs[1..] {
        let (snap, l) = layout(b)?;
        if snap.vnic != head.vnic {
            return Err(StateError::ForeignVnic {
                expected: head.vnic.clone(),
                found: snap.vnic,
            });
        }
        if snap.policy_version != head.policy_version || b[6..8] != first[6..8] {
            return Err(StateError::Malformed(
                "blobs of one vNIC disagree on policy or format version",
            ));
        }
        all.extend(records(b, &l));
    }
    assemble(&first[..head_layout.header], &all)
}

/// Split `blob` into one blob per worker (`workers` of them), each holding
/// the connections whose flows the kernel steers to that worker.
pub fn split(blob: &[u8], workers: u32) -> Result<Vec<Vec<u8>>, StateError> {
    let (snap, l) = layout(blob)?;
    let workers = workers.max(1);
    let mut shares: Vec<Vec<&[u8]>> = vec![Vec::new(); workers as usize];
    for (conn, record) in snap.conns.iter().zip(records(blob, &l)) {
        let w = steer::addresses_worker(conn.key.src_addr(), conn.key.dst_addr(), workers);
        shares[w as usize].push(record);
    }
    shares.iter().map(|s| assemble(&blob[..l.header], s)).collect()
}

/// The connection count a blob's header claims, without decoding its
/// records: for a blob this module made or verified (`export`'s), where a
/// full decode would only repeat work inside a migration's pause.
pub fn claimed_count(blob: &[u8]) -> Option<usize> {
    let name_len = usize::from(u16::from_be_bytes([*blob.get(16)?, *blob.get(17)?]));
    let at = 18 + name_len;
    let c = blob.get(at..at + 4)?;
    Some(u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
}

/// The vNIC name and connection count of a verified blob.
pub fn describe(blob: &[u8]) -> Result<(String, usize), StateError> {
    let snap = state::decode(blob)?;
    Ok((snap.vnic, snap.conns.len()))
}

/// The connections of `vnic` from every worker's engine (`engines`, in
/// worker order) as one transfer of the agent-to-agent channel: all of them
/// (`since` `None`: a pre-copy) or those changed since the generations a
/// pre-copy returned (`since`, one per worker: a delta). A delta one
/// worker could not tell apart is taken whole from every worker. Returns
/// the transfer and the generations to pass as `since` next.
pub fn export_changes(
    engines: &mut [&mut Engine],
    vnic: &str,
    now: u64,
    since: Option<&[u64]>,
) -> Result<(Transfer, Vec<u64>), MigrateError> {
    if since.is_some_and(|s| s.len() != engines.len()) {
        return Err(StateError::Malformed("a delta's generations do not match the workers").into());
    }
    let unknown = || MigrateError::UnknownVnic(vnic.to_string());
    let mut parts = Vec::with_capacity(engines.len());
    for (i, engine) in engines.iter_mut().enumerate() {
        let port = engine.port_of(vnic).ok_or_else(unknown)?;
        let part = engine
            .export_vnic_changes(port, now, since.map(|s| s[i]))
            .ok_or_else(unknown)?;
        parts.push((port, part));
    }
    if since.is_some() && parts.iter().any(|(_, p)| p.full) {
        for ((port, part), engine) in parts.iter_mut().zip(engines.iter_mut()) {
            *part = engine.export_vnic_changes(*port, now, None).ok_or_else(unknown)?;
        }
    }
    let policy_version = parts.first().map_or(0, |(_, p)| p.policy_version);
    let mut t = Transfer {
        vnic: vnic.to_string(),
        policy_version,
        full: parts.iter().all(|(_, p)| p.full),
        conns: Vec::new(),
        removed: Vec::new(),
    };
    let mut marks = Vec::with_capacity(parts.len());
    for (_, mut p) in parts {
        if p.policy_version != policy_version {
            // A worker between two policies: its verdicts are re-decided there.
            for c in &mut p.conns {
                c.revalidate = true;
            }
        }
        t.conns.append(&mut p.conns);
        t.removed.append(&mut p.removed);
        marks.push(p.mark);
    }
    Ok((t, marks))
}

/// Apply what a peer agent sent (a [`crate::peer::Arrival`]) to `vnic` in
/// every worker's engine (`engines` in worker order), all or nothing: the
/// room for its connections is checked in every engine first; then the
/// removed keys go, the vNIC's connections are marked for re-decision when
/// `revalidate`, and the connections go each to the engine of the worker
/// its flows are steered to. Returns the connections imported.
pub fn apply_arrival(
    engines: &mut [&mut Engine],
    removed: &[palisade_wire::flow::FlowKey],
    revalidate: bool,
    snap: state::Snapshot,
    now: u64,
) -> Result<usize, MigrateError> {
    let workers = u32::try_from(engines.len()).unwrap_or(u32::MAX).max(1);
    let mut shares: Vec<Vec<state::ConnRecord>> = vec![Vec::new(); workers as usize];
    for c in snap.conns {
        let w = steer::addresses_worker(c.key.src_addr(), c.key.dst_addr(), workers);
        shares[w as usize].push(c);
    }
    let mut ports = Vec::with_capacity(engines.len());
    for (engine, share) in engines.iter().zip(&shares) {
        let port = engine
            .port_of(&snap.vnic)
            .ok_or_else(|| MigrateError::UnknownVnic(snap.vnic.clone()))?;
        let free = engine.conntrack().capacity() - engine.conntrack().len();
        if share.len() > free {
            return Err(StateError::NoRoom {
                needed: share.len(),
                free,
            }
            .into());
        }
        ports.push(port);
    }
    let mut imported = 0;
    for ((engine, conns), port) in engines.iter_mut().zip(shares).zip(ports) {
        if !removed.is_empty() {
            engine.remove_vnic_conns(port, removed, now, &mut ());
        }
        if revalidate {
            engine.revalidate_vnic(port);
        }
        let share = state::Snapshot {
            vnic: snap.vnic.clone(),
            policy_version: snap.policy_version,
            conns,
        };
        // Migrated connections are not new flows: their start is in the source's trail.
        imported += engine.import_vnic_conns(port, share, now, &mut ())?;
    }
    Ok(imported)
}

/// The source's state move of one migration over the agent-to-agent
/// channel ([`crate::peer`]): a session with the destination agent, every
/// vNIC's connections pre-copied while the guest runs, the deltas sent in
/// its pause. A handover dropped before its switchover (a cancelled
/// migration) stops the vNICs' change keeping here, resuming them.
pub struct Handover<'a> {
    control: &'a dyn Control,
    session: crate::peer::Session,
    vnics: Vec<String>,
    /// vNICs whose delta was taken (quiesced: resumed by the caller on a failure).
    quiesced: Vec<String>,
    committed: bool,
    /// Connections staged on the destination by the pre-copy.
    pub staged: u64,
    /// The pre-copy's time (connect, export, send, staging).
    pub precopy: Duration,
    /// Per vNIC switched over, where the pause's time went.
    pub phases: Vec<SwitchPhases>,
}

/// Where one vNIC's switchover spent the guest's pause, on the source.
#[derive(Debug, Clone)]
pub struct SwitchPhases {
    /// The vNIC.
    pub vnic: String,
    /// The delta's export (locks, change export, quiesce, encoding).
    pub export: Duration,
    /// The delta's send and the destination's answer (its decode and
    /// apply, and the round trip).
    pub commit: Duration,
    /// The commit's exchange on the host's monotonic clock (the
    /// destination logs its side on the same clock).
    pub exchange: Option<crate::peer::ExchangeTimes>,
}

impl core::fmt::Display for SwitchPhases {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "switchover of {}: delta export {} us, send and destination apply {} us",
            self.vnic,
            self.export.as_micros(),
            self.commit.as_micros()
        )?;
        if let Some(x) = self.exchange {
            write!(
                f,
                " (written in {} us; request begun at {} ns, answer read at {} ns)",
                x.written_ns.saturating_sub(x.started_ns) / 1000,
                x.started_ns,
                x.answered_ns
            )?;
        }
        Ok(())
    }
}

impl<'a> Handover<'a> {
    /// Start the handover of `vnics` to host `to` when the configuration
    /// names `to`'s listener and this agent holds the channel's TLS
    /// settings (`None` otherwise: the state goes whole, in the pause,
    /// through the destination's control socket).
    pub fn start(
        to: &str,
        vnics: &[String],
        config: &MigrationConfig,
        control: &'a dyn Control,
    ) -> Result<Option<Handover<'a>>, String> {
        let (Some(addr), Some(tls)) = (config.peers.get(to), control.peer_tls()) else {
            return Ok(None);
        };
        let t = Instant::now();
        let session = crate::peer::Session::connect(&tls, to, addr, config.timeout()).map_err(|e| e.to_string())?;
        let mut h = Handover {
            control,
            session,
            vnics: Vec::with_capacity(vnics.len()),
            quiesced: Vec::new(),
            committed: false,
            staged: 0,
            precopy: Duration::ZERO,
            phases: Vec::new(),
        };
        for n in vnics {
            let blob = control
                .export_precopy(n, Some(to))
                .map_err(|e| format!("pre-copy of {n}: {}", describe_control(&e)))?;
            h.vnics.push(n.clone());
            h.staged += h.session.stage(n, &blob).map_err(|e| e.to_string())?;
            // Its inspected flows too, so the pause carries only what changes from now on.
            let inspection = control
                .export_inspection_precopy(n, Some(to))
                .map_err(|e| format!("inspection pre-copy of {n}: {}", describe_control(&e)))?;
            if !inspection.is_empty() {
                h.session
                    .inspect(n, &inspection)
                    .map_err(|e| format!("destination agent inspection pre-copy: {e}"))?;
            }
        }
        h.precopy = t.elapsed();
        Ok(Some(h))
    }

    /// In the guest's pause: stop forwarding for each vNIC here, send its
    /// delta, and have the destination apply it (all or nothing per vNIC).
    /// `exported` gets each vNIC whose port was quiesced (to resume on a
    /// failure). Returns the connections the vNICs hold there after it,
    /// the transfer bytes (pre-copy and deltas) and their BLAKE3.
    pub fn switchover(
        &mut self,
        to: &str,
        exported: &std::cell::RefCell<Vec<String>>,
    ) -> Result<(u64, u64, String), String> {
        let mut moved = 0;
        for n in self.vnics.clone() {
            let t = Instant::now();
            let delta = self
                .control
                .export_delta(&n, Some(to))
                .map_err(|e| format!("delta of {n}: {}", describe_control(&e)))?;
            exported.borrow_mut().push(n.clone());
            self.quiesced.push(n.clone());
            let export = t.elapsed();
            // The port is quiesced: its inspected flows' state is final; what
            // changed since the inspection pre-copy goes. A destination
            // refusing it fails the switchover as a refused delta does. Its
            // time counts with the commit's (sent, applied).
            let inspection = self
                .control
                .export_inspection(&n, Some(to))
                .map_err(|e| format!("inspection state of {n}: {}", describe_control(&e)))?;
            if !inspection.is_empty() {
                self.session
                    .inspect(&n, &inspection)
                    .map_err(|e| format!("destination agent inspection import: {e}"))?;
            }
            moved += self
                .session
                .commit(&n, &delta)
                .map_err(|e| format!("destination agent import: {e}"))?;
            self.phases.push(SwitchPhases {
                vnic: n,
                export,
                commit: t.elapsed() - export,
                exchange: self.session.last_exchange(),
            });
        }
        self.committed = true;
        Ok((moved, self.session.bytes(), self.session.blake3()))
    }
}

impl Drop for Handover<'_> {
    fn drop(&mut self) {
        if !self.committed {
            for n in self.vnics.iter().filter(|n| !self.quiesced.contains(n)) {
                // Not quiesced by a pre-copy: this only ends its change keeping.
                let _ = self.control.resume_vnic(n, None);
            }
        }
    }
}

fn describe_control(e: &ControlError) -> String {
    match e {
        ControlError::UnknownVnic(v) => format!("no vNIC {v:?} on this host"),
        ControlError::Refused(why) => why.clone(),
        ControlError::UnknownFlow => "no such connection".into(),
    }
}
