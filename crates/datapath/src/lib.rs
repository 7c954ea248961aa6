//! Palisade's per-host datapath engine, sans-IO.
//!
//! The [`Engine`] is handed a frame, the port it arrived on and the current
//! time (nanoseconds from any fixed origin, supplied by the caller) and
//! returns what to do with it (a [`Processed`], recorded in the caller's
//! [`Results`]): forward to one or more ports, each with its encapsulation,
//! or drop it with a typed [`DropReason`], and for a rejected packet the
//! reply to its sender. [`render()`] and its siblings write those frames from
//! that value alone. The engine owns no clock, socket or thread, so every
//! behaviour is testable deterministically.
//!
//! Modules, one per concept (after Oxide OPTE's `engine/`):
//! - [`port`]: vNIC ports bound to a VM's identity, MAC, addresses and zone, and the uplink.
//! - [`switch`]: L2 forwarding per segment with MAC learning and anti-spoofing.
//! - [`engine`]: the engine and its pipeline, one module per stage.
//! - [`decision`]: what processing returns: disposition, outputs, reply.
//! - [`render`](mod@render): the frames a decision sends, as free functions over it.
//! - [`conntrack`]: the connection table (TCP, UDP/SCTP/ICMP echo pseudo-connections).
//! - [`tcptrack`]: TCP's state machine and window checks, as Linux netfilter's.
//! - [`flow_table`]: the epoch-stamped exact-match flow cache.
//! - [`table`]: the bounded, preallocated key → slot map the connection table is built on.
//! - [`verdict`]: drop reasons and counters.
//! - [`events`]: flow start/update/end events.
//! - [`lookup`]: the rule-lookup trait the classifier plugs into.
//! - [`classified`]: that trait answered by the classify layer's decision trees.
//! - [`state`]: export/import of a vNIC's connection state (live migration).

pub mod classified;
pub mod conntrack;
pub mod decision;
pub mod engine;
pub mod events;
pub mod flow_table;
#[doc(hidden)]
pub mod fuzzing;
pub mod lookup;
pub mod port;
pub mod render;
pub mod state;
pub mod switch;
pub mod table;
pub mod tcptrack;
pub mod verdict;

pub use decision::{Disposition, Encap, Output, Processed, Reply, Results};
pub use engine::{Engine, EngineConfig, RuleInfo};
pub use events::{EventSink, FlowEvent};
pub use lookup::{ChainLookup, ChainVerdict, PolicyLookup};
pub use port::PortId;
pub use render::{RenderError, render, render_overlay, render_reply};
pub use verdict::{Counters, DropReason};
