//! Export of stored records: JSON lines ([`crate::jsonl`]) or IPFIX
//! ([`crate::ipfix`]), streaming from a [`LogReader`] query so that an export
//! of the whole log never holds more than one segment's index in memory.
//!
//! These are what `palisade audit export` runs; the command only parses its
//! arguments and opens the output.

use std::io::{self, Write};

use crate::error::AuditError;
use crate::ipfix::{ExportError, IpfixExporter};
use crate::jsonl::JsonLinesWriter;
use crate::query::{LogReader, Query};
use crate::record::Record;

/// Why an export stopped.
#[derive(Debug, thiserror::Error)]
pub enum ExportFailure {
    /// Reading the log failed.
    #[error(transparent)]
    Store(#[from] AuditError),
    /// Writing JSON lines failed.
    #[error("writing JSON lines: {0}")]
    Io(#[source] io::Error),
    /// Sending IPFIX failed.
    #[error(transparent)]
    Ipfix(ExportError),
}

/// Write every record matching `q` to `w` as JSON lines, then flush; the
/// number written.
pub fn to_json_lines<W: Write>(reader: &LogReader, q: &Query, w: W) -> Result<u64, ExportFailure> {
    let mut out = JsonLinesWriter::new(w);
    let mut err = None;
    let mut n = 0u64;
    reader.query_each(q, |_, rec| match out.write(&rec) {
        Ok(()) => {
            n += 1;
            true
        }
        Err(e) => {
            err = Some(e);
            false
        }
    })?;
    if let Some(e) = err {
        return Err(ExportFailure::Io(e));
    }
    out.into_inner().flush().map_err(ExportFailure::Io)?;
    Ok(n)
}

/// What [`to_ipfix`] did (the exporter's own counters are in its stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IpfixExport {
    /// Flow records handed to the exporter.
    pub flows: u64,
    /// Flow records the exporter's rate limit dropped.
    pub rate_limited: u64,
    /// Records other than flows skipped (change and alert records: IPFIX carries flows only).
    pub changes_skipped: u64,
}

/// Export every flow record matching `q` through `exporter`, then flush it;
/// `now_unix_s` is the export clock (IPFIX export time and rate limit).
pub fn to_ipfix(
    reader: &LogReader,
    q: &Query,
    exporter: &mut IpfixExporter,
    mut now_unix_s: impl FnMut() -> u32,
) -> Result<IpfixExport, ExportFailure> {
    let mut done = IpfixExport::default();
    let mut err = None;
    reader.query_each(q, |_, rec| {
        let Record::Flow(f) = rec else {
            done.changes_skipped += 1;
            return true;
        };
        done.flows += 1;
        match exporter.export(&f, now_unix_s()) {
            Ok(()) => true,
            Err(ExportError::RateLimited) => {
                done.rate_limited += 1;
                true
            }
            Err(e) => {
                err = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = err {
        return Err(ExportFailure::Ipfix(e));
    }
    exporter.flush(now_unix_s()).map_err(ExportFailure::Ipfix)?;
    Ok(done)
}
