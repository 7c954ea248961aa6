//! Palisade's compliance trail: who accessed what, and who changed what, when.
//!
//! The agent turns the datapath's flow events into [`record::FlowRecord`]s
//! (with both ends' identity and the deciding rule's provenance); the
//! controller writes a [`record::ChangeRecord`] for every change. Records go
//! to a tamper-evident store, are queried, and are exported as IPFIX or JSON
//! lines.
#![deny(missing_docs)]

pub mod record;
pub mod ipfix;
pub mod jsonl;
