//! Palisade's compliance trail: who accessed what, and who changed what, when.
//!
//! The agent turns the datapath's flow events into [`record::FlowRecord`]s
//! (with both ends' identity and the deciding rule's provenance); the
//! controller writes a [`record::ChangeRecord`] for every change. Records go
//! to a tamper-evident store ([`AuditLog`]: hash-chained segments with signed
//! checkpoints), are queried ([`Query`], [`LogReader`]), verified offline
//! ([`verify()`]), and are exported as IPFIX or JSON lines.
#![deny(missing_docs)]

pub mod ipfix;
pub mod jsonl;
pub mod record;

pub mod checkpoint;
pub mod error;
pub mod export;
pub mod index;
pub mod query;
pub mod segment;
pub mod store;
pub mod verify;

pub use error::AuditError;
pub use query::{LogReader, Query, RecordKind};
pub use store::{AuditConfig, AuditLog, Recovery, Retention, RetentionReport, TornTail};
pub use verify::{Problem, ProblemKind, VerifyReport, verify};
