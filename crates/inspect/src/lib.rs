//! Palisade's signature-inspection engine: a subset of Suricata's rule
//! language over packets, reassembled TCP streams and application-layer
//! buffers, sans-IO.
//!
//! The pieces, in the order a packet meets them:
//! - [`rules`] parses rule text into [`rules::Rule`]s, with positioned
//!   errors; [`RuleSet`] compiles them ([`signature`]) and orders them;
//!   [`ProfileSpec`] selects signatures by priority, classtype or sid, and a
//!   profile compiles into a [`Detector`] with its [`prefilter`]s.
//! - [`Inspector`] is the engine: handed a flow's [`FlowState`], a
//!   [`packet::Packet`] and the time, it returns an [`Outcome`] (pass, alert,
//!   drop, reject) and appends [`Alert`]s. It reassembles TCP ([`stream`]),
//!   detects and parses HTTP/1.x, HTTP/2, TLS and DNS ([`app`]), runs the
//!   prefilter and the full evaluation ([`matcher`]), keeps flowbits and
//!   thresholds.
//! - [`decode`] turns captured frames into packets, [`offline`] replays a
//!   capture through an inspector with a flow table, and [`eve`] writes EVE
//!   JSON records.
//!
//! The engine owns no thread, reads no clock and does no I/O. A caller (the
//! datapath) keeps one `FlowState` beside each connection it inspects, and
//! none for connections the policy does not select, which therefore cost
//! nothing. Memory is bounded per flow (reassembly depth, out-of-order
//! limits, transactions) and per host (a [`stream::MemoryBudget`] shared by
//! the workers' inspectors); what happens at each bound is counted in
//! [`Counters`].
//!
//! ```
//! use std::{sync::Arc, time::Duration};
//! use palisade_inspect::packet::{Packet, Transport};
//! use palisade_inspect::rules::RuleContext;
//! use palisade_inspect::*;
//!
//! let rules = RuleSet::parse(
//!     r#"alert udp any any -> any 53 (msg:"bad"; content:"evil"; sid:1;)"#,
//!     &RuleContext::default(),
//!     LoadOptions::default(),
//! )
//! .unwrap();
//! let mut inspector = Inspector::new(Arc::new(rules), vec![ProfileSpec::full()], Config::default()).unwrap();
//! let full = inspector.profile("full").unwrap();
//! let packet = Packet {
//!     src: "10.0.0.1".parse().unwrap(),
//!     dst: "10.0.0.2".parse().unwrap(),
//!     protocol: 17,
//!     ttl: 64,
//!     transport: Transport::Udp { src_port: 5353, dst_port: 53 },
//!     payload: b"...evil...",
//!     fragment: false,
//!     ip_len: 38,
//!     checksum_ok: true,
//! };
//! let mut flow = FlowState::new(full, &packet);
//! let mut alerts = Vec::new();
//! let outcome = inspector.inspect(&mut flow, &packet, Duration::from_secs(1), &mut alerts);
//! assert_eq!(outcome, Outcome::Alert);
//! assert_eq!(inspector.rules().get(alerts[0].sig).rule.sid, 1);
//! ```
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
pub mod persist;
pub mod prefilter;
pub mod rules;
pub mod ruleset;
pub mod signature;
pub mod stream;
mod tcp;
mod threshold;
#[cfg(not(miri))]
mod vectorscan;

pub use engine::{Alert, AlertAction, Config, Counters, DropReason, Inspector, Mode, Outcome};
pub use error::{LoadError, RuleError};
pub use flow::{Direction, FlowState, FlowVerdict, ProfileId};
pub use rules::{Action, AppProto};
pub use ruleset::{Detector, LoadOptions, ProfileSpec, RuleSet};
pub use tcp::TcpState;
