//! Palisade's signature-inspection engine: a subset of Suricata's rule
//! language over packets, reassembled TCP streams and application-layer
//! buffers, sans-IO.
#![deny(missing_docs)]

pub mod app;
pub mod classification;
pub mod decode;
mod engine;
mod error;
pub mod eve;
pub mod flow;
pub mod matcher;
pub mod offline;
pub mod packet;
pub mod prefilter;
pub mod rules;
pub mod ruleset;
pub mod signature;
pub mod stream;
mod tcp;
mod threshold;
#[cfg(not(miri))]
mod vectorscan;

pub use error::{LoadError, RuleError};

pub use engine::{Alert, AlertAction, Config, Counters, DropReason, Inspector, Mode, Outcome};
pub use flow::{Direction, FlowState, FlowVerdict, ProfileId};
pub use rules::{Action, AppProto};
pub use ruleset::{Detector, LoadOptions, ProfileSpec, RuleSet};
pub use tcp::TcpState;
