//! Palisade's signature-inspection engine: a subset of Suricata's rule
//! language over packets, reassembled TCP streams and application-layer
//! buffers, sans-IO.
#![deny(missing_docs)]

pub mod app;
pub mod classification;
mod error;
pub mod decode;
pub mod matcher;
pub mod packet;
pub mod prefilter;
pub mod stream;
pub mod rules;
pub mod ruleset;
pub mod signature;

pub use error::{LoadError, RuleError};
