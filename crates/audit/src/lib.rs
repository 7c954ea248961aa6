//! Palisade's compliance trail: who accessed what, and who changed what, when.
//!
//! The agent turns the datapath's flow events into [`record::FlowRecord`]s
//! (with both ends' identity and the deciding rule's provenance); the
//! controller writes a [`record::ChangeRecord`] for every change. Records go
//! to a tamper-evident store ([`AuditLog`]: hash-chained segments with signed
//! checkpoints), are queried ([`Query`], [`LogReader`]), verified offline
//! ([`verify()`]), and are exported as IPFIX or JSON lines. The signing key
//! lives outside the trail, and each signed checkpoint is published outside
//! it as a [`SignedHead`] ([`HeadPublisher`]), so whoever can write the
//! trail cannot rewrite, cut or roll it back unnoticed; the crate's README
//! has the table of attacks and what detects each. Times are Unix
//! nanoseconds, read and written as RFC 3339 by [`time`].
#![deny(missing_docs)]

pub mod ipfix;
pub mod jsonl;
pub mod record;

pub mod checkpoint;
pub mod error;
pub mod export;
pub mod head;
pub mod index;
pub mod problem;
pub mod query;
pub mod segment;
pub mod store;
pub mod time;
pub mod verify;

pub use error::AuditError;
pub use head::{FileHeadPublisher, HeadPublisher, SignedHead};
pub use query::{LogReader, Query, QueryReport, RecordKind};
pub use store::{AuditConfig, AuditLog, AuditStatus, Recovery, Retention, RetentionReport, TornTail};
pub use verify::{Problem, ProblemKind, VerifyOptions, VerifyReport, verify, verify_with};
