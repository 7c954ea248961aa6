//! Verdicts, typed drop reasons and the counters that account for them.
//!
//! Every drop has a [`DropReason`], and every reason a counter, so an operator
//! (and a test) can tell a policy deny from a spoofed frame from a full table
//! without reading logs. Counters are plain integers in preallocated arrays:
//! updating them on the hot path allocates nothing.

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// The frame did not parse (the layer and kind are counted separately in the wire errors).
    Malformed,
    /// The frame arrived on a port the engine does not know.
    UnknownPort,
    /// A VM sent from a MAC address that is not its own.
    SpoofedMac,
    /// A VM sent from an IP address that is not its own.
    SpoofedIp,
    /// A VM sent an ARP packet whose sender MAC or IP is not its own.
    SpoofedArp,
    /// A VM sent neighbour discovery claiming an address or link-layer address not its own.
    SpoofedNd,
    /// A VM sent a frame tagged with a VLAN other than its zone's.
    VlanMismatch,
    /// An EtherType the datapath does not forward (neither IP nor ARP).
    UnsupportedEthertype,
    /// The policy denied the flow.
    PolicyDeny,
    /// The policy rejected the flow (the reject reply is the caller's to send).
    PolicyReject,
    /// An established connection the new policy denies was cut.
    PolicyRevoked,
    /// A TCP segment outside its connection's windows (strict zones only;
    /// also a reset whose sequence number lies before what the other side
    /// acknowledged, in both).
    TcpOutOfWindow,
    /// A TCP segment that cannot start a connection, for a connection the
    /// tracker does not know: anything but a SYN in a strict zone, anything
    /// but a SYN or a plain ACK (a pick-up) in a liberal one.
    TcpNoConnection,
    /// A TCP segment with an impossible flag combination.
    TcpBadFlags,
    /// A TCP segment its connection's state does not allow (data before the
    /// SYN-ACK, a SYN-ACK from the initiator, …), as Linux conntrack marks invalid.
    TcpInvalidState,
    /// An ICMP error that quotes no tracked connection and that the policy
    /// does not allow (errors are never rejected: nothing answers an error).
    IcmpErrorUnrelated,
    /// A non-first fragment: reassembly is not supported yet.
    Fragment,
    /// The connection table is full and its policy is to refuse new connections.
    ConntrackFull,
    /// The vNIC already has as many connections as it may.
    VnicConnLimit,
    /// No port to forward to (unknown destination and nowhere to flood, or the sender's own port).
    NoRoute,
    /// A VXLAN packet for a VNI that maps to no local segment.
    UnknownVni,
    /// A frame whose offload request does not fit its packet: a
    /// segmentation request on anything but a TCP or UDP packet of the
    /// requested kind, with no payload, with SYN, RST or URG, with bytes
    /// after the IP datagram, or a partial checksum starting inside the L2
    /// headers. It cannot be the packets it claims to stand for.
    BadOffload,
    /// Inline inspection dropped (or rejected) the flow: a signature with a
    /// `drop` or `reject` action matched it, or its vNIC's inspection budget
    /// was spent in a zone that fails closed ([`crate::Engine::inspection_drop`]).
    Inspection,
    /// A frame came back from an appliance port that belongs to no flow
    /// steered through that appliance instance in that direction (or is not
    /// an IP packet of a flow at all): an appliance cannot inject traffic.
    ApplianceNotSteered,
    /// A packet of a flow steered through a `closed` service chain none of
    /// whose instances is up.
    ApplianceDown,
    /// A packet of a flow an appliance offloaded with `drop`.
    ApplianceOffloadDrop,
    /// A packet towards a vNIC whose port is quiesced for live migration
    /// ([`crate::Engine::set_port_quiesced`]): its VM is paused or has moved
    /// away, so the packet is dropped before it can open a connection here.
    VnicMigrating,
    /// Not traffic: a health probe back from an appliance, consumed by the
    /// engine (checked and handed to the caller with
    /// [`crate::Engine::take_probe_returns`]); a probe is never delivered.
    ApplianceProbe,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 28] = [
        DropReason::Malformed,
        DropReason::UnknownPort,
        DropReason::SpoofedMac,
        DropReason::SpoofedIp,
        DropReason::SpoofedArp,
        DropReason::SpoofedNd,
        DropReason::VlanMismatch,
        DropReason::UnsupportedEthertype,
        DropReason::PolicyDeny,
        DropReason::PolicyReject,
        DropReason::PolicyRevoked,
        DropReason::TcpOutOfWindow,
        DropReason::TcpNoConnection,
        DropReason::TcpBadFlags,
        DropReason::TcpInvalidState,
        DropReason::IcmpErrorUnrelated,
        DropReason::Fragment,
        DropReason::ConntrackFull,
        DropReason::VnicConnLimit,
        DropReason::NoRoute,
        DropReason::UnknownVni,
        DropReason::BadOffload,
        DropReason::Inspection,
        DropReason::ApplianceNotSteered,
        DropReason::ApplianceDown,
        DropReason::ApplianceOffloadDrop,
        DropReason::VnicMigrating,
        DropReason::ApplianceProbe,
    ];

    /// Number of reasons.
    pub const COUNT: usize = Self::ALL.len();

    /// A short stable name, for metric labels and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnknownPort => "unknown-port",
            DropReason::SpoofedMac => "spoofed-mac",
            DropReason::SpoofedIp => "spoofed-ip",
            DropReason::SpoofedArp => "spoofed-arp",
            DropReason::SpoofedNd => "spoofed-nd",
            DropReason::VlanMismatch => "vlan-mismatch",
            DropReason::UnsupportedEthertype => "unsupported-ethertype",
            DropReason::PolicyDeny => "policy-deny",
            DropReason::PolicyReject => "policy-reject",
            DropReason::PolicyRevoked => "policy-revoked",
            DropReason::TcpOutOfWindow => "tcp-out-of-window",
            DropReason::TcpNoConnection => "tcp-no-connection",
            DropReason::TcpBadFlags => "tcp-bad-flags",
            DropReason::TcpInvalidState => "tcp-invalid-state",
            DropReason::IcmpErrorUnrelated => "icmp-error-unrelated",
            DropReason::Fragment => "fragment",
            DropReason::ConntrackFull => "conntrack-full",
            DropReason::VnicConnLimit => "vnic-conn-limit",
            DropReason::NoRoute => "no-route",
            DropReason::UnknownVni => "unknown-vni",
            DropReason::BadOffload => "bad-offload",
            DropReason::Inspection => "inspection",
            DropReason::ApplianceNotSteered => "appliance-not-steered",
            DropReason::ApplianceDown => "appliance-down",
            DropReason::ApplianceOffloadDrop => "appliance-offload-drop",
            DropReason::VnicMigrating => "vnic-migrating",
            DropReason::ApplianceProbe => "appliance-probe",
        }
    }

    /// The reason's counter index.
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl core::fmt::Display for DropReason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// A flow's inspection profile as the engine numbers it: resolved once when
/// the flow is classified, kept with its connection, and handed with every
/// forwarded packet of the flow ([`crate::Processed::inspection`]). Its name
/// is [`crate::Engine::inspection_profile_name`]. A flow without one (no
/// profile, or one that runs no signatures) carries `None`, and nothing
/// else is done for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InspectProfile(pub(crate) core::num::NonZeroU8);

impl InspectProfile {
    /// The profile's number (1 up), stable for the engine's life unless
    /// more than [`InspectProfile::MAX`] names were seen.
    pub fn get(self) -> u8 {
        self.0.get()
    }

    /// Distinct profile names an engine numbers before it starts over.
    pub const MAX: usize = 255;
}

/// Packets, bytes and hits of one thing (a vNIC, a rule).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Packets.
    pub packets: u64,
    /// Bytes (whole frames as received).
    pub bytes: u64,
    /// Classifications that ended at this rule (for rules), or new connections (for vNICs).
    pub hits: u64,
}

impl Tally {
    /// Count one packet of `len` bytes.
    pub fn add(&mut self, len: usize) {
        self.packets += 1;
        self.bytes += len as u64;
    }

    /// Count `packets` packets of `bytes` bytes together (a super-frame's segments).
    pub fn add_n(&mut self, packets: u64, bytes: u64) {
        self.packets += packets;
        self.bytes += bytes;
    }
}

/// Engine-wide counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets handed to the engine.
    pub packets: u64,
    /// Packets forwarded (to at least one port).
    pub forwarded: u64,
    /// Drops by reason, indexed by [`DropReason::index`].
    pub drops: [u64; DropReason::COUNT],
    /// Flow-cache hits with a current epoch.
    pub cache_hits: u64,
    /// Flow-cache misses.
    pub cache_misses: u64,
    /// Flow-cache entries evicted to make room.
    pub cache_evictions: u64,
    /// Rule evaluations (one per flow: both ends' chains in one evaluation).
    pub classifications: u64,
    /// Re-validations of cached flows after a policy change (each also a classification).
    pub revalidations: u64,
    /// Packets accepted on the verdict of another host (VXLAN-GBP policy-applied bit).
    pub trusted: u64,
    /// Connections created.
    pub conns_created: u64,
    /// Connections ended (any reason).
    pub conns_ended: u64,
    /// Connections evicted because the table was full.
    pub conns_evicted: u64,
    /// TCP segments outside the window accepted because the zone is liberal.
    pub tcp_window_liberal: u64,
    /// ICMP errors accepted as related to a tracked connection.
    pub icmp_related: u64,
    /// Frames flooded within their segment (unknown or broadcast destination).
    pub flooded: u64,
    /// Frames encapsulated towards another host.
    pub encapsulated: u64,
}

impl Counters {
    /// Drops for one reason.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    /// All drops.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// Add `other`'s counts to these (the totals of several workers' engines).
    pub fn merge(&mut self, other: &Counters) {
        let Counters {
            packets,
            forwarded,
            drops,
            cache_hits,
            cache_misses,
            cache_evictions,
            classifications,
            revalidations,
            trusted,
            conns_created,
            conns_ended,
            conns_evicted,
            tcp_window_liberal,
            icmp_related,
            flooded,
            encapsulated,
        } = other;
        self.packets += packets;
        self.forwarded += forwarded;
        for (mine, theirs) in self.drops.iter_mut().zip(drops) {
            *mine += theirs;
        }
        self.cache_hits += cache_hits;
        self.cache_misses += cache_misses;
        self.cache_evictions += cache_evictions;
        self.classifications += classifications;
        self.revalidations += revalidations;
        self.trusted += trusted;
        self.conns_created += conns_created;
        self.conns_ended += conns_ended;
        self.conns_evicted += conns_evicted;
        self.tcp_window_liberal += tcp_window_liberal;
        self.icmp_related += icmp_related;
        self.flooded += flooded;
        self.encapsulated += encapsulated;
    }
}
