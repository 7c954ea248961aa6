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
//! The API is re-exported here at the crate root; the modules behind it,
//! one per concept (after Oxide OPTE's `engine/`), are private except
//! [`port`], whose constructors build the vNICs an engine serves:
//! - [`port`]: vNIC ports bound to a VM's identity, MAC, addresses and zone, and the uplink.
//! - [`host`]: a host's ports named against the inventory, and the engine built from them.
//! - `switch`: L2 forwarding per segment with MAC learning and anti-spoofing.
//! - `engine`: the [`Engine`] and its pipeline, one module per stage.
//! - `decision`: what processing returns: [`Disposition`], [`Output`]s, [`Reply`].
//! - `render`: the frames a decision sends, as free functions over it.
//! - `conntrack`, `conn_state`: the connection table (TCP, UDP/SCTP/ICMP echo
//!   pseudo-connections) and its states.
//! - `tcptrack`: TCP's state machine and window checks, as Linux netfilter's.
//! - `flow_table`: the epoch-stamped exact-match flow cache.
//! - `table`: the bounded, preallocated key → slot map the connection table is built on.
//! - `verdict`: drop reasons and counters.
//! - `events`: flow start/update/end events.
//! - `lookup`: the rule-lookup trait ([`ChainLookup`]) and the compiled chains behind it.
//! - `classified`: that trait answered by the classify layer's decision trees.
//! - `service`: service chains: steering redirected flows through appliance VMs, their health and counters.
//! - [`probe`]: health probes through service-chain appliances, and the monitor that runs their rounds.
//! - [`state`]: the blob format of exported connection state (live migration, restarts).
//! - [`transfer`]: the compact encoding of a vNIC's connections (pre-copy or
//!   delta) on a live migration's agent-to-agent channel.

pub mod announce;
mod classified;
mod conn_state;
mod conntrack;
mod decision;
mod engine;
mod events;
mod flow_table;
pub mod host;
mod lookup;
pub mod port;
pub mod probe;
mod render;
mod service;
pub mod state;
mod sweep;
mod switch;
mod table;
mod tcptrack;
pub mod transfer;
mod verdict;

pub use classified::{ClassifiedLookup, MAX_RULES_PER_CHAIN};
pub use conn_state::ConnState;
pub use conntrack::{Conn, Conntrack, FullPolicy, Timeouts};
pub use decision::{Disposition, Encap, Output, Processed, Reply, Results};
pub use engine::{
    Engine, EngineConfig, KernelForwarded, KernelTcpMarks, ROUTING_DOMAIN, RuleInfo, VnicExport, policy_flow,
};
pub use events::{EndReason, EventKind, EventSink, FlowEvent};
pub use flow_table::{CachedVerdict, FlowEntry, FlowHash, FlowTable};
pub use lookup::{ChainLookup, ChainVerdict, PolicyLookup};
pub use port::{PortError, PortId, UPLINK, UplinkConfig, VnicPort};
pub use render::{
    RenderError, render, render_in_place, render_offload, render_overlay, render_overlay_header,
    render_overlay_in_place, render_overlay_offload, render_reply,
};
pub use service::{ChainStats, InstanceStats, OffloadError, OffloadVerdict, Steer};
pub use state::{StateError, relax_tcp_windows};
pub use sweep::{Sweep, SweepStep};
pub use tcptrack::{TcpIndex, TcpLast, TcpPeer, TcpTrack, last_flags, peer_flags};
pub use verdict::{Counters, DropReason, InspectProfile, Tally};
