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

use palisade_datapath::Engine;
use palisade_datapath::state::{self, StateError};
use palisade_io::steer;

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
