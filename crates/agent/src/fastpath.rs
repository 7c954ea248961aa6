//! The agent's side of the kernel fast path (`fast_path = "kernel"`).
//!
//! The engine decides every flow's first packets, as without it. A worker
//! notes, for each frame it forwards, whether the frame's direction could
//! be forwarded by the kernel instead ([`FastPath::observe`]: one copy,
//! untagged IPv4 TCP (no SYN/FIN/RST) or UDP, no inspection, from an
//! AF_PACKET vNIC or the underlay to an AF_PACKET vNIC or another host).
//! A few times a second ([`FastPath::sync`], under the worker's engine
//! lock) it installs those directions whose connection is established (TCP)
//! or answered (UDP) with an allow verdict of the current policy epoch and
//! no service chain, into `palisade_io::kfast`'s flow map, one entry per
//! direction per host, and from then on the kernel forwards them: a vNIC's
//! frames straight to a local vNIC or VXLAN-GBP encapsulated to the other
//! host, whose kernel decapsulates them to its vNIC; neither agent copies
//! them. Each sync folds what the kernel counted (packets, bytes, last seen,
//! TCP high-water marks) into the connection, its rules' and its port's
//! tallies ([`palisade_datapath::Engine::fold_kernel_forwarded`]), so
//! expiry, `/metrics`, flow records, exports and snapshots count
//! kernel-forwarded traffic, and removes the entries of connections that
//! are no longer eligible: closed (a FIN or RST always reaches user space),
//! expired, judged under an older policy epoch (a policy change pulls every
//! flow back, to be judged again in user space), or on a port that is
//! migrating away. Removal goes through the kernel's two phases
//! (`palisade_io::kfast::EntryState`): forwarded at least once, at worst twice.
//!
//! Not done by the kernel: a TCP window check of forwarded segments (it
//! only records high-water marks), IPv6, VLAN-tagged frames, ICMP, IPv4
//! options and fragments, TAP and vhost-user vNICs (only AF_PACKET ports
//! take the socket filter). Those stay in user space.
//!
//! Failure semantics: the tcx links are not pinned, so they are detached
//! when the agent exits or dies; the flow map goes with them, and frames go
//! back to the AF_PACKET sockets, which nobody reads until the agent is back:
//! the same as without the fast path. A restarted agent starts with an
//! empty map and installs again from its restored connections.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use palisade_datapath::port::{PortId, UPLINK};
use palisade_datapath::{ConnState, Disposition, Engine, KernelForwarded, KernelTcpMarks, Processed};
use palisade_io::kfast::{self, Action, EntryState, FlowKey, FlowValue, KernelFastPath, Link, Scope};
use palisade_wire::flow;

/// Directions noted as candidates between two syncs, at most.
const MAX_CANDIDATES: usize = 4096;
/// How often a worker syncs with the flow map.
pub(crate) const SYNC_INTERVAL: Duration = Duration::from_millis(250);
/// Between an entry's `Dual` and its delete: far longer than a packet takes
/// from the AF_PACKET tap to tc ingress, which it walks in one softirq.
const REMOVAL_GRACE: Duration = Duration::from_millis(1);

/// The loaded programs, their attachments and what the workers share.
#[derive(Debug)]
pub(crate) struct KernelPath {
    kfast: KernelFastPath,
    local: Ipv4Addr,
    vxlan_port: u16,
    underlay_ifindex: u32,
    /// The vNIC ports the fast path serves (their tcx program and every
    /// worker's socket filter attached): port → its netdev's ifindex.
    ports: HashMap<PortId, u32>,
    _links: Vec<Link>,
}

/// What `/health` says of the fast path.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct Status {
    /// `off` or `kernel` (as configured).
    pub mode: &'static str,
    /// Whether it runs.
    pub active: bool,
    /// Why not, when configured and not running.
    pub error: Option<String>,
    /// The vNIC interfaces it serves.
    pub interfaces: Vec<String>,
    /// vNIC interfaces it does not serve, and why.
    pub skipped: Vec<String>,
}

fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a live NUL-terminated string for the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// The netdev that holds `addr`, by ifindex.
fn ifindex_of_address(addr: Ipv4Addr) -> Option<u32> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list it allocates into `list`; freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs made, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: a non-null ifa_addr points to a sockaddr of its family.
            let family = unsafe { (*ifa.ifa_addr).sa_family };
            if i32::from(family) == libc::AF_INET {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                if Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)) == addr {
                    // SAFETY: ifa_name is a NUL-terminated string of the list.
                    let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
                    found = name.to_str().ok().and_then(ifindex);
                    break;
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    found
}

impl KernelPath {
    /// Load the programs, attach the underlay's to the netdev holding
    /// `local`, and each vNIC's program and socket filter: `vnics` lists each
    /// vNIC port's interface and every worker's socket descriptor on it (a
    /// port whose socket filter does not take, a TAP or vhost-user one, is
    /// left to user space and listed in `Status::skipped`).
    pub fn set_up(
        local: Ipv4Addr,
        vxlan_port: u16,
        snap: u32,
        vnics: &[(PortId, String, Vec<BorrowedFd<'_>>)],
    ) -> Result<(KernelPath, Status), String> {
        let kfast = KernelFastPath::load(snap, vxlan_port).map_err(|e| e.to_string())?;
        let underlay_ifindex =
            ifindex_of_address(local).ok_or_else(|| format!("no interface holds the underlay address {local}"))?;
        let mut links = vec![kfast.attach_underlay(underlay_ifindex).map_err(|e| e.to_string())?];
        let mut status = Status {
            mode: "kernel",
            active: true,
            ..Status::default()
        };
        let mut ports = HashMap::new();
        for (port, interface, fds) in vnics {
            let Some(index) = ifindex(interface) else {
                status.skipped.push(format!("{interface}: no such interface"));
                continue;
            };
            if fds.is_empty() {
                status.skipped.push(format!("{interface}: not an AF_PACKET port"));
                continue;
            }
            // Every worker's socket first: a socket without the filter would
            // copy what the kernel forwards.
            if let Err(e) = fds.iter().try_for_each(|fd| kfast.attach_socket_filter(*fd)) {
                status.skipped.push(format!("{interface}: {e}"));
                continue;
            }
            match kfast.attach_vnic(index) {
                Ok(l) => {
                    links.push(l);
                    ports.insert(*port, index);
                    status.interfaces.push(interface.clone());
                }
                Err(e) => status.skipped.push(format!("{interface}: {e}")),
            }
        }
        Ok((
            KernelPath {
                kfast,
                local,
                vxlan_port,
                underlay_ifindex,
                ports,
                _links: links,
            },
            status,
        ))
    }
}

/// A direction noted in a forwarded frame, to install at the next sync.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    flow: flow::FlowKey,
    in_port: PortId,
    action: Action,
}

/// A direction in the flow map, and what of its counts was folded already.
#[derive(Debug, Clone, Copy)]
struct Installed {
    flow: flow::FlowKey,
    in_port: PortId,
    action: Action,
    packets: u64,
    bytes: u64,
    last_seen: u64,
}

/// A worker's counts (for `/health`).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(crate) struct FastStats {
    /// Directions in the flow map now.
    pub installed: usize,
    /// Directions installed so far.
    pub installs: u64,
    /// Directions removed so far.
    pub removals: u64,
    /// Packets the kernel forwarded (folded so far).
    pub kernel_packets: u64,
    /// Bytes the kernel forwarded (folded so far).
    pub kernel_bytes: u64,
    /// Map operations that failed.
    pub errors: u64,
}

/// One worker's part: its candidates and the directions it installed.
#[derive(Debug)]
pub(crate) struct FastPath {
    shared: Arc<KernelPath>,
    candidates: HashMap<FlowKey, Candidate>,
    installed: HashMap<FlowKey, Installed>,
    last_sync: Instant,
    /// Its counts.
    pub stats: FastStats,
}

/// Whether a connection may be forwarded by the kernel under `epoch`.
fn eligible(conn: &palisade_datapath::Conn, epoch: u64) -> bool {
    let state_ok = match conn.key.protocol.0 {
        6 => conn.state == ConnState::Established,
        17 => conn.state == ConnState::Replied,
        _ => false,
    };
    state_ok && !conn.ended && conn.epoch == epoch && conn.steer.is_none()
}

fn ipv4(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

impl FastPath {
    /// A worker's part of `shared`.
    pub fn new(shared: Arc<KernelPath>) -> FastPath {
        FastPath {
            shared,
            candidates: HashMap::new(),
            installed: HashMap::new(),
            last_sync: Instant::now(),
            stats: FastStats::default(),
        }
    }

    /// Note a processed frame's direction if the kernel could forward it
    /// (cheap tests first: this runs for every forwarded frame).
    pub fn observe(&mut self, p: &Processed<'_>, in_port: PortId) {
        if p.disposition != Disposition::Forward || p.outputs.len() != 1 || p.inspection().is_some() {
            return;
        }
        let out = p.outputs[0];
        let inner = p.inner_frame();
        // Untagged IPv4 without options, not a fragment, TCP or UDP.
        if inner.len() < 54 || inner[12..14] != [8, 0] || inner[14] != 0x45 || inner[20] & 0x3f != 0 || inner[21] != 0 {
            return;
        }
        let protocol = inner[23];
        if !(protocol == 6 || protocol == 17) || (protocol == 6 && inner[47] & 0x07 != 0) {
            return;
        }
        let shared = &self.shared;
        let (scope, action) = if in_port == UPLINK {
            let frame = p.frame();
            let (Some(vx), None, Some(&ifindex)) = (frame.get(..8), out.encap, shared.ports.get(&out.port)) else {
                return;
            };
            if frame.len() != inner.len() + 8 {
                return;
            }
            let word1 = u32::from_be_bytes([vx[4], vx[5], vx[6], vx[7]]);
            let word0 = [vx[0], vx[1], vx[2], vx[3]];
            (
                Scope::Underlay(word1),
                Action::Decap {
                    ifindex,
                    vxlan_word0: word0,
                },
            )
        } else {
            let Some(&in_ifindex) = shared.ports.get(&in_port) else {
                return;
            };
            if p.frame().len() != inner.len() {
                return;
            }
            let action = match out.encap {
                Some(e) => {
                    let mut vx = [0u8; 8];
                    if palisade_datapath::render_overlay_header(&e, &mut vx).is_err() {
                        return;
                    }
                    Action::Encap {
                        ifindex: shared.underlay_ifindex,
                        outer: kfast::outer_headers(shared.local, e.remote, e.source_port, shared.vxlan_port, vx),
                    }
                }
                None => match shared.ports.get(&out.port) {
                    Some(&i) => Action::Redirect(i),
                    None => return,
                },
            };
            (Scope::Vnic(in_ifindex), action)
        };
        let key = FlowKey {
            scope,
            protocol,
            src: ipv4(&inner[26..30]),
            dst: ipv4(&inner[30..34]),
            src_port: u16::from_be_bytes([inner[34], inner[35]]),
            dst_port: u16::from_be_bytes([inner[36], inner[37]]),
        };
        // Installed with this action already (a frame the kernel passed up
        // during an insertion, or one of its SYN/FIN): nothing new.
        if self.installed.get(&key).is_some_and(|i| i.action == action) {
            return;
        }
        if self.candidates.len() >= MAX_CANDIDATES || self.candidates.contains_key(&key) {
            return;
        }
        let Some(info) = flow::extract(inner).ok().flatten() else {
            return;
        };
        self.candidates.insert(
            key,
            Candidate {
                flow: info.key,
                in_port,
                action,
            },
        );
    }

    /// Whether a sync is due.
    pub fn due(&self) -> bool {
        self.last_sync.elapsed() >= SYNC_INTERVAL
    }

    /// Fold the kernel's counts into `engine`, remove what is no longer
    /// eligible (or whose ports are in `quiesced`), install the candidates
    /// that are. `now` is the engine's clock.
    pub fn sync(&mut self, engine: &mut Engine, now: u64, quiesced: &[PortId]) {
        self.last_sync = Instant::now();
        // Engine time = CLOCK_MONOTONIC - offset.
        let offset = kfast::monotonic_ns().saturating_sub(now);
        let epoch = engine.epoch();
        let kfast = &self.shared.kfast;
        let ports = &self.shared.ports;
        let out_port = |a: &Action| -> Option<PortId> {
            let ifindex = match a {
                Action::Redirect(i) | Action::Decap { ifindex: i, .. } => *i,
                Action::Encap { .. } => return None,
            };
            ports.iter().find(|(_, i)| **i == ifindex).map(|(p, _)| *p)
        };
        let mut removals = Vec::new();
        let keys: Vec<FlowKey> = self.installed.keys().copied().collect();
        for key in keys {
            let value = match kfast.get(&key) {
                Ok(v) => v,
                Err(_) => {
                    self.stats.errors += 1;
                    continue;
                }
            };
            let Some(inst) = self.installed.get_mut(&key) else {
                continue;
            };
            let Some(v) = value else {
                // Gone from the map (not by us): forget it.
                self.installed.remove(&key);
                continue;
            };
            fold(engine, inst, &v, offset, &mut self.stats);
            let conn = engine
                .conntrack()
                .find(&with_domain(&inst.flow))
                .and_then(|s| engine.conntrack().get(s));
            let stale = self.candidates.get(&key).is_some_and(|c| c.action != inst.action);
            let parked =
                quiesced.contains(&inst.in_port) || out_port(&inst.action).is_some_and(|p| quiesced.contains(&p));
            if stale || parked || !conn.is_some_and(|c| eligible(c, epoch)) {
                removals.push(key);
            }
        }
        if !removals.is_empty() {
            // Phase one: both the kernel and user space forward...
            for key in &removals {
                if let Ok(Some(mut v)) = kfast.get(key) {
                    v.state = EntryState::Dual;
                    // The counters written back are the kernel's as read: a
                    // packet counted between the read and this write is lost
                    // from the count (not from the wire).
                    if kfast.insert(key, &v).is_err() {
                        self.stats.errors += 1;
                    }
                }
            }
            // ...for longer than a packet takes from the tap to tc, then user space alone.
            std::thread::sleep(REMOVAL_GRACE);
            for key in &removals {
                let last = kfast.get(key).ok().flatten();
                if kfast.remove(key).is_err() {
                    self.stats.errors += 1;
                    continue;
                }
                if let Some(mut inst) = self.installed.remove(key) {
                    if let Some(v) = last {
                        fold(engine, &mut inst, &v, offset, &mut self.stats);
                    }
                    self.stats.removals += 1;
                }
            }
        }
        let candidates: Vec<(FlowKey, Candidate)> = self.candidates.drain().collect();
        for (key, c) in candidates {
            if self.installed.contains_key(&key) && !removals.contains(&key) {
                continue;
            }
            if quiesced.contains(&c.in_port) || out_port(&c.action).is_some_and(|p| quiesced.contains(&p)) {
                continue;
            }
            let flow = with_domain(&c.flow);
            let Some(conn) = engine.conntrack().find(&flow).and_then(|s| engine.conntrack().get(s)) else {
                continue;
            };
            if !eligible(conn, epoch) {
                continue;
            }
            let (me, other) = if conn.key != flow { (1, 0) } else { (0, 1) };
            let peers = &conn.tcp.peers;
            let tcp = if c.flow.protocol.0 == 6 {
                kfast::TcpMarks {
                    seq_end: peers[me].end,
                    ack: peers[me].max_ack,
                    limit: peers[other].limit,
                    max_win: peers[me].max_win,
                }
            } else {
                kfast::TcpMarks::default()
            };
            let value = FlowValue {
                state: EntryState::Active,
                action: c.action,
                wscale: if c.flow.protocol.0 == 6 { peers[me].wscale } else { 0 },
                packets: 0,
                bytes: 0,
                last_seen: 0,
                tcp,
            };
            if kfast.insert(&key, &value).is_err() {
                self.stats.errors += 1;
                continue;
            }
            self.installed.insert(
                key,
                Installed {
                    flow: c.flow,
                    in_port: c.in_port,
                    action: c.action,
                    packets: 0,
                    bytes: 0,
                    last_seen: 0,
                },
            );
            self.stats.installs += 1;
        }
        self.stats.installed = self.installed.len();
    }
}

fn with_domain(k: &flow::FlowKey) -> flow::FlowKey {
    let mut k = *k;
    k.segment = palisade_datapath::ROUTING_DOMAIN;
    k
}

/// Fold what the kernel counted for `inst` since the last fold.
fn fold(engine: &mut Engine, inst: &mut Installed, v: &FlowValue, offset: u64, stats: &mut FastStats) {
    let packets = v.packets.saturating_sub(inst.packets);
    let bytes = v.bytes.saturating_sub(inst.bytes);
    let last_seen = if v.last_seen > inst.last_seen {
        v.last_seen.saturating_sub(offset)
    } else {
        0
    };
    if packets == 0 && last_seen == 0 {
        return;
    }
    let tcp = (inst.flow.protocol.0 == 6).then_some(KernelTcpMarks {
        seq_end: v.tcp.seq_end,
        ack: v.tcp.ack,
        limit: v.tcp.limit,
        max_win: v.tcp.max_win,
    });
    engine.fold_kernel_forwarded(
        inst.in_port,
        &inst.flow,
        &KernelForwarded {
            packets,
            bytes,
            last_seen,
            tcp,
        },
    );
    inst.packets = v.packets;
    inst.bytes = v.bytes;
    inst.last_seen = inst.last_seen.max(v.last_seen);
    stats.kernel_packets += packets;
    stats.kernel_bytes += bytes;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(protocol: u8, state: ConnState, epoch: u64) -> palisade_datapath::Conn {
        let mut key = palisade_wire::flow::extract(&frame(protocol)).unwrap().unwrap().key;
        key.segment = palisade_datapath::ROUTING_DOMAIN;
        let mut c = palisade_datapath::Conn::new(key, 0);
        c.state = state;
        c.epoch = epoch;
        c
    }

    /// An untagged IPv4 frame of `protocol` (TCP or UDP), 10.0.0.1:1000 → 10.0.0.2:2000.
    fn frame(protocol: u8) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[12] = 8;
        f[14] = 0x45;
        f[16..18].copy_from_slice(&40u16.to_be_bytes());
        f[22] = 64;
        f[23] = protocol;
        f[26..30].copy_from_slice(&[10, 0, 0, 1]);
        f[30..34].copy_from_slice(&[10, 0, 0, 2]);
        f[34..36].copy_from_slice(&1000u16.to_be_bytes());
        f[36..38].copy_from_slice(&2000u16.to_be_bytes());
        if protocol == 6 {
            f[46] = 0x50;
            f[47] = 0x10;
        } else {
            f[38..40].copy_from_slice(&20u16.to_be_bytes());
        }
        f
    }

    #[test]
    fn only_established_tcp_and_answered_udp_of_the_current_epoch_are_eligible() {
        assert!(eligible(&conn(6, ConnState::Established, 3), 3));
        assert!(
            !eligible(&conn(6, ConnState::Established, 2), 3),
            "judged under an older policy"
        );
        for state in [
            ConnState::SynSent,
            ConnState::FinWait,
            ConnState::CloseWait,
            ConnState::TimeWait,
            ConnState::Close,
        ] {
            assert!(!eligible(&conn(6, state, 3), 3), "{state:?}");
        }
        assert!(eligible(&conn(17, ConnState::Replied, 3), 3));
        assert!(!eligible(&conn(17, ConnState::New, 3), 3), "unanswered");
        let mut ended = conn(6, ConnState::Established, 3);
        ended.ended = true;
        assert!(!eligible(&ended, 3));
    }

    /// Without a netdev holding the underlay address (or, not root, without
    /// the kernel's consent) the set-up fails with a reason, which the agent
    /// logs and shows in `/health` before running without the fast path.
    #[test]
    fn set_up_says_why_it_cannot_run() {
        // 192.0.2.0/24 is TEST-NET-1: no interface here holds it.
        let e = KernelPath::set_up(Ipv4Addr::new(192, 0, 2, 77), 4789, 9216, &[]).unwrap_err();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(e.contains("no interface holds the underlay address 192.0.2.77"), "{e}");
        } else {
            assert!(!e.is_empty());
        }
    }
}
