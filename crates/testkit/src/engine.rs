//! Properties the engine fuzz target checks (`fuzz/fuzz_targets/engine.rs`),
//! shared with the test that runs them over generated inputs.
//!
//! The input is read as a program, not as one frame: a sequence of
//! operations (a TCP, UDP or ICMP frame between the VMs of a small policy,
//! a byte of the last frame changed, the last frame VLAN-tagged or arriving
//! from another host in VXLAN-GBP, time passing with expiry, a policy
//! change, a batch boundary), so that the fuzzer spends its time in the
//! connection tracker, the flow cache and the tables' churn instead of in
//! the first length check.
//!
//! [`vm_frame`] is also how the datapath's tests and benches build their
//! frames between VMs.

use core::net::Ipv4Addr;
use std::sync::OnceLock;

use palisade_policy::compile::Compiler;
use palisade_policy::{MemorySource, load};
use palisade_wire::ethernet::{self, EtherType, EthernetAddress, EthernetRepr};
use palisade_wire::icmpv4;
use palisade_wire::ip::IpProtocol;
use palisade_wire::ipv4::{self, Ipv4Repr};
use palisade_wire::tcp::{self, TcpFlags, TcpRepr};
use palisade_wire::udp::{self, UdpRepr};
use palisade_wire::vxlan;

use palisade_datapath::port::{self, PortId, UPLINK, UplinkConfig};
use palisade_datapath::{
    Counters, Disposition, Engine, EngineConfig, FlowEvent, Output, PolicyLookup, Processed, Results, render,
    render_reply,
};

/// Two VMs on this host (a, b), one on another (c); `ssh` toggles one rule.
fn policy(ssh: bool) -> String {
    let ssh_rule = if ssh {
        "- { id: ssh, from: web, to: web, service: tcp/22, action: allow }"
    } else {
        ""
    };
    format!(
        r#"
version: {version}
datacenter: {{ name: dc1, default: deny }}
zones: [{{ name: web, vlan: 100 }}]
vms:
  - {{ name: a, uuid: 00000000-0000-4000-8000-00000000000a, host: h1, vnics: [{{ name: a.0, mac: "02:00:00:00:00:0a", ips: [10.0.0.10], zone: web }}] }}
  - {{ name: b, uuid: 00000000-0000-4000-8000-00000000000b, host: h1, vnics: [{{ name: b.0, mac: "02:00:00:00:00:0b", ips: [10.0.0.11], zone: web }}] }}
  - {{ name: c, uuid: 00000000-0000-4000-8000-00000000000c, host: h2, vnics: [{{ name: c.0, mac: "02:00:00:00:00:0c", ips: [10.0.0.12], zone: web }}] }}
groups: {{ web: {{ zone: web }} }}
rules:
  datacenter:
    - {{ id: https, from: web, to: web, service: tcp/443, action: allow }}
    - {{ id: dns, from: web, to: web, service: udp/53, action: allow }}
    - {{ id: ping, from: web, to: web, service: icmp/echo-request, action: allow }}
    - {{ id: telnet, from: web, to: web, service: [tcp/23, udp/69], action: reject }}
    {ssh_rule}
"#,
        version = if ssh { 1 } else { 2 },
    )
}

/// The two policies, compiled once per process.
fn compilers() -> &'static [Compiler; 2] {
    static COMPILERS: OnceLock<[Compiler; 2]> = OnceLock::new();
    COMPILERS.get_or_init(|| {
        [true, false].map(|ssh| {
            let loaded = load(&MemorySource::new().with("p.yaml", policy(ssh))).expect("the fuzz policy loads");
            Compiler::new(loaded.model).expect("the fuzz policy compiles")
        })
    })
}

/// An engine for host h1 with small connection limits, so that the fuzzer
/// reaches the full table and the per-vNIC limit; the flow cache is large
/// enough that `process_batch` looks ahead.
fn engine() -> Engine {
    let mut cfg = EngineConfig::new(UplinkConfig {
        local_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 1]),
        local_ip: Ipv4Addr::new(192, 168, 0, 1),
        gateway_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 0xfe]),
        flood: vec![Ipv4Addr::new(192, 168, 0, 2)],
    });
    cfg.conn_capacity = 8;
    cfg.flow_capacity = 8192;
    let compiler = compilers()[0].clone();
    let model = compiler.model().clone();
    let mut e = Engine::new(cfg, Box::new(PolicyLookup::new(compiler)));
    for nic in ["a.0", "b.0"] {
        let vnic = port::vnic_from_model(&model, nic, &[], 6).expect("the fuzz policy's vNIC");
        e.add_vnic(vnic).expect("a port for it");
    }
    e
}

/// A VM of the policy by a byte: a, b, c, or a stranger.
fn vm(b: u8) -> u8 {
    [10, 11, 12, 99][usize::from(b % 4)]
}

/// An untagged IPv4 frame from VM `from` to VM `to` carrying `l4`: each VM
/// named by the last octet of its address 10.0.0.x, which is also the last
/// byte of its MAC 02:00:00:00:00:x.
pub fn vm_frame(from: u8, to: u8, protocol: IpProtocol, l4: &[u8]) -> Vec<u8> {
    let (src, dst) = (Ipv4Addr::new(10, 0, 0, from), Ipv4Addr::new(10, 0, 0, to));
    ipv4_frame(([2, 0, 0, 0, 0, from], src), ([2, 0, 0, 0, 0, to], dst), protocol, l4)
}

/// An untagged IPv4 frame between two (MAC, address) ends carrying `l4`
/// (TTL 64, DF, ident 1, no options).
fn ipv4_frame(
    (src_mac, src): ([u8; 6], Ipv4Addr),
    (dst_mac, dst): ([u8; 6], Ipv4Addr),
    protocol: IpProtocol,
    l4: &[u8],
) -> Vec<u8> {
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        protocol,
        payload_len: l4.len(),
        ttl: 64,
        dscp: 0,
        ecn: 0,
        ident: 1,
        dont_frag: true,
        more_frags: false,
        frag_offset: 0,
        options: &[],
    };
    let mut f = vec![0; 14 + 20 + l4.len()];
    EthernetRepr {
        src_addr: EthernetAddress(src_mac),
        dst_addr: EthernetAddress(dst_mac),
        ethertype: EtherType::IPV4,
    }
    .emit(&mut ethernet::Frame::new_unchecked(&mut f[..]));
    ip.emit(&mut ipv4::Packet::new_unchecked(&mut f[14..34]));
    f[34..].copy_from_slice(l4);
    f
}

/// An untagged IPv4 TCP segment between two (MAC, address, port) ends,
/// carrying `payload`, with correct checksums (window 64,000, no options,
/// TTL 64, DF): the frame tests and benches send between VMs, routers and
/// appliances when [`vm_frame`]'s addressing does not fit.
pub fn tcp_v4_frame(
    (src_mac, src, sport): ([u8; 6], Ipv4Addr, u16),
    (dst_mac, dst, dport): ([u8; 6], Ipv4Addr, u16),
    (seq, ack): (u32, u32),
    flags: TcpFlags,
    payload: &[u8],
) -> Vec<u8> {
    let repr = TcpRepr {
        src_port: sport,
        dst_port: dport,
        seq_number: seq,
        ack_number: ack,
        flags,
        window_len: 64_000,
        urgent_pointer: 0,
        options: &[],
        payload,
    };
    let mut l4 = vec![0; repr.buffer_len()];
    repr.emit(&mut tcp::Packet::new_unchecked(&mut l4[..]), src.into(), dst.into());
    ipv4_frame((src_mac, src), (dst_mac, dst), IpProtocol::TCP, &l4)
}

/// The TCP header fields a program chooses.
struct Segment {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: TcpFlags,
    len: usize,
}

fn tcp_frame(from: u8, to: u8, s: &Segment) -> Vec<u8> {
    let payload = vec![0x61; s.len];
    let repr = TcpRepr {
        src_port: s.sport,
        dst_port: s.dport,
        seq_number: s.seq,
        ack_number: s.ack,
        flags: s.flags,
        window_len: 8192,
        urgent_pointer: 0,
        options: &[],
        payload: &payload,
    };
    let mut t = vec![0; repr.buffer_len()];
    let (src, dst) = (Ipv4Addr::new(10, 0, 0, from), Ipv4Addr::new(10, 0, 0, to));
    repr.emit(&mut tcp::Packet::new_unchecked(&mut t[..]), src.into(), dst.into());
    vm_frame(from, to, IpProtocol::TCP, &t)
}

fn udp_frame(from: u8, to: u8, sport: u16, dport: u16) -> Vec<u8> {
    let repr = UdpRepr {
        src_port: sport,
        dst_port: dport,
        payload: b"fuzz",
    };
    let mut u = vec![0; repr.buffer_len()];
    let (src, dst) = (Ipv4Addr::new(10, 0, 0, from), Ipv4Addr::new(10, 0, 0, to));
    repr.emit(&mut udp::Packet::new_unchecked(&mut u[..]), src.into(), dst.into());
    vm_frame(from, to, IpProtocol::UDP, &u)
}

/// An ICMP message; an error quotes the IP header and 8 bytes of `quoted`
/// (the last frame made), as a router would.
fn icmp_frame(from: u8, to: u8, ty: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0, 0, 1, 0, 1];
    if matches!(ty, 3 | 11) {
        m.extend_from_slice(quoted.get(14..14 + 28).unwrap_or(&[]));
    }
    icmpv4::Packet::new_unchecked(&mut m[..]).fill_checksum();
    vm_frame(from, to, IpProtocol::ICMP, &m)
}

/// The port a frame from VM `from` arrives on: its own vNIC for a and b;
/// for c and the stranger, the uplink or (impersonating) a's vNIC.
fn arrival(e: &Engine, from: u8, choice: u8) -> PortId {
    let own = match from {
        10 => e.port_of("a.0"),
        11 => e.port_of("b.0"),
        _ => None,
    };
    match own {
        Some(p) => p,
        None if choice & 0x80 == 0 => UPLINK,
        None => e.port_of("a.0").unwrap_or(UPLINK),
    }
}

/// What processing one frame gave: its disposition, its outputs rendered
/// and its reply (for a rejected frame) rendered.
type Seen = (Disposition, Vec<(Output, Option<Vec<u8>>)>, Option<Vec<u8>>);

fn seen(p: &Processed<'_>) -> Seen {
    let frame = p.frame();
    let outs = p
        .outputs
        .iter()
        .map(|o| {
            let mut buf = vec![0; frame.len() + 128];
            let rendered = render(p, o, &mut buf).ok().map(|n| buf[..n].to_vec());
            (*o, rendered)
        })
        .collect();
    let reply = p.reply().and_then(|r| {
        let mut buf = vec![0; 256];
        render_reply(&r, &mut buf).ok().map(|n| buf[..n].to_vec())
    });
    (p.disposition, outs, reply)
}

/// Two engines fed the same program: one frame by frame, one in batches.
struct Pair {
    single: Engine,
    batched: Engine,
    single_events: Vec<FlowEvent>,
    batched_events: Vec<FlowEvent>,
    single_results: Results,
    batched_results: Results,
    /// Frames not yet given to `batched`: one port's, in order.
    pending: Vec<Vec<u8>>,
    pending_port: PortId,
    /// What `single` did with the pending frames.
    expected: Vec<Seen>,
    now: u64,
    policy: usize,
}

impl Pair {
    fn frame(&mut self, port: PortId, f: Vec<u8>) -> Result<(), String> {
        if port != self.pending_port {
            self.flush()?;
            self.pending_port = port;
        }
        let p = self
            .single
            .process(self.now, port, &f, &mut self.single_events, &mut self.single_results);
        self.expected.push(seen(&p));
        self.pending.push(f);
        Ok(())
    }

    /// Give the pending frames to the batched engine and compare.
    fn flush(&mut self) -> Result<(), String> {
        let frames = std::mem::take(&mut self.pending);
        self.batched.process_batch(
            self.now,
            self.pending_port,
            &frames,
            &mut self.batched_events,
            &mut self.batched_results,
        );
        let got: Vec<Seen> = self.batched_results.iter(&frames).map(|p| seen(&p)).collect();
        let expected = std::mem::take(&mut self.expected);
        if let Some(i) = (0..frames.len()).find(|&i| got.get(i) != expected.get(i)) {
            return Err(format!(
                "frame {i} of a batch of {}: batched {:?}, one at a time {:?}",
                frames.len(),
                got.get(i),
                expected.get(i)
            ));
        }
        Ok(())
    }

    fn both(&mut self, f: impl Fn(&mut Engine, u64, &mut Vec<FlowEvent>)) -> Result<(), String> {
        self.flush()?;
        f(&mut self.single, self.now, &mut self.single_events);
        f(&mut self.batched, self.now, &mut self.batched_events);
        Ok(())
    }
}

/// Run the program `data` encodes through two engines of one host, one fed
/// frame by frame ([`Engine::process`]) and one the same frames in batches
/// ([`Engine::process_batch`]), and check:
/// - nothing panics;
/// - both give every frame the same disposition and outputs (rendered to
///   the same bytes), emit the same flow events and end with the same
///   counters: batching is an optimisation only;
/// - every packet is counted once: forwarded plus dropped equals received;
/// - the connection table holds at most its capacity, each vNIC at most its
///   limit, and every connection it holds is found again by its key in
///   both directions (its index and its slots agree).
///
/// Returns the counters the program ended with (what it reached), or a
/// description of the first property that fails.
pub fn check_engine(data: &[u8]) -> Result<Counters, String> {
    let mut pair = Pair {
        single: engine(),
        batched: engine(),
        single_results: Results::new(),
        batched_results: Results::new(),
        single_events: Vec::new(),
        batched_events: Vec::new(),
        pending: Vec::new(),
        pending_port: UPLINK,
        expected: Vec::new(),
        now: 0,
        policy: 0,
    };
    let mut last = udp_frame(10, 11, 5000, 53);
    let mut bytes = data.iter().copied();
    let mut next = move || bytes.next();
    while let Some(op) = next() {
        let mut arg = || next().unwrap_or(0);
        match op % 10 {
            0 | 1 => {
                let (from, to, choice) = (vm(arg()), vm(arg()), arg());
                let segment = Segment {
                    sport: 40_000 + u16::from(arg() % 16),
                    dport: [443, 22, 23, 80][usize::from(arg() % 4)],
                    flags: TcpFlags(u16::from(arg())),
                    seq: u32::from(arg()) << 12,
                    ack: u32::from(arg()) << 12,
                    len: usize::from(arg() % 48),
                };
                last = tcp_frame(from, to, &segment);
                let port = arrival(&pair.single, from, choice);
                pair.frame(port, last.clone())?;
            }
            2 => {
                let (from, to, choice) = (vm(arg()), vm(arg()), arg());
                let sport = 5000 + u16::from(arg() % 16);
                let dport = [53, 69, 123][usize::from(arg() % 3)];
                last = udp_frame(from, to, sport, dport);
                let port = arrival(&pair.single, from, choice);
                pair.frame(port, last.clone())?;
            }
            3 => {
                let (from, to, choice) = (vm(arg()), vm(arg()), arg());
                let (ty, code) = ([8, 0, 3, 11][usize::from(arg() % 4)], arg() % 4);
                let f = icmp_frame(from, to, ty, code, &last);
                let port = arrival(&pair.single, from, choice);
                pair.frame(port, f)?;
            }
            4 => {
                // The last frame again, one byte changed, from where it came.
                let (at, value) = (usize::from(arg()), arg());
                let mut f = last.clone();
                if let Some(b) = f.get_mut(at % last.len().max(1)) {
                    *b = value;
                }
                let from = last.get(11).copied().unwrap_or(10);
                let port = arrival(&pair.single, from, 0);
                pair.frame(port, f)?;
            }
            5 => {
                // The frames so far were processed at the old time.
                pair.flush()?;
                pair.now += u64::from(arg()) * 250_000_000;
                let budget = usize::from(arg() % 16);
                pair.both(|e, now, ev| {
                    e.expire(now, budget, ev);
                })?;
            }
            6 => {
                pair.policy ^= 1;
                let c = compilers()[pair.policy].clone();
                pair.both(|e, _, _| e.update_policy(Box::new(PolicyLookup::new(c.clone()))))?;
            }
            7 => pair.flush()?,
            8 => {
                // The last frame from another host's tunnel endpoint, in
                // VXLAN-GBP, with or without the policy-applied bit.
                let (remote, flags, vni) = (arg(), arg(), [100, 101, 0][usize::from(arg() % 3)]);
                let header = vxlan::VxlanRepr {
                    vni,
                    gbp: (flags & 4 != 0).then_some(vxlan::GbpRepr {
                        policy_applied: flags & 1 != 0,
                        dont_learn: flags & 2 != 0,
                        group_id: u16::from(flags >> 3),
                    }),
                };
                let mut payload = vec![0; header.buffer_len()];
                header.emit(&mut vxlan::Packet::new_unchecked(&mut payload[..]));
                payload.extend_from_slice(&last);
                let remote = Ipv4Addr::new(192, 168, 0, 2 + remote % 2);
                pair.both(|e, now, ev| {
                    e.process_overlay(now, remote, &payload, ev, &mut Results::new());
                })?;
            }
            _ => {
                // The last frame again, with an 802.1Q tag (its own VLAN or another).
                let vid = [100u16, 101][usize::from(arg() % 2)];
                let mut f = last.clone();
                if f.len() >= 14 {
                    f.splice(12..12, [0x81, 0x00, (vid >> 8) as u8, vid as u8]);
                }
                let from = last.get(11).copied().unwrap_or(10);
                let port = arrival(&pair.single, from, 0);
                pair.frame(port, f)?;
            }
        }
    }
    pair.flush()?;
    let (single, batched) = (&pair.single, &pair.batched);
    if pair.single_events != pair.batched_events {
        return Err("batched and one-at-a-time processing emitted different flow events".into());
    }
    if single.counters() != batched.counters() {
        return Err(format!(
            "counters differ: batched {:?}, one at a time {:?}",
            batched.counters(),
            single.counters()
        ));
    }
    let c = single.counters();
    let dropped: u64 = c.drops.iter().sum();
    if c.forwarded + dropped != c.packets {
        return Err(format!(
            "{} forwarded + {dropped} dropped != {} packets",
            c.forwarded, c.packets
        ));
    }
    for e in [single, batched] {
        let ct = e.conntrack();
        if ct.len() > ct.capacity() {
            return Err(format!("{} connections in a table of {}", ct.len(), ct.capacity()));
        }
        for nic in ["a.0", "b.0"] {
            let p = e.port_of(nic).ok_or("a fuzz vNIC is missing")?;
            if ct.port_conns(p) > 6 {
                let held: Vec<_> = ct
                    .iter()
                    .filter(|(_, c)| c.owners.contains(&Some(p)))
                    .map(|(_, c)| (c.key, c.owners, c.state))
                    .collect();
                return Err(format!(
                    "{nic} holds {} connections, past its limit of 6: {held:?}",
                    ct.port_conns(p)
                ));
            }
        }
        for (slot, conn) in ct.iter() {
            for key in [conn.key, conn.key.reversed()] {
                if ct.find(&key) != Some(slot) {
                    return Err(format!("connection {key:?} in slot {slot} is not found by its key"));
                }
            }
        }
    }
    Ok(c.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_datapath::DropReason;

    /// Programs from a fixed generator: every property holds, and together
    /// they reach what the target is for (hits, new, revalidated, related,
    /// evicted and refused connections), so it is known not to stop short.
    #[test]
    fn generated_programs_hold_every_property_and_reach_the_tracker() {
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let mut reached = Counters::default();
        for len in [0usize, 1, 7, 64, 300, 2000, 6000] {
            for _ in 0..8 {
                let program: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        (x >> 24) as u8
                    })
                    .collect();
                match check_engine(&program) {
                    Ok(c) => reached.merge(&c),
                    Err(e) => panic!("{e}\nprogram: {program:?}"),
                }
            }
        }
        assert!(reached.cache_hits > 0, "{reached:?}");
        assert!(reached.conns_created > 0, "{reached:?}");
        assert!(reached.revalidations > 0, "{reached:?}");
        assert!(reached.icmp_related > 0, "{reached:?}");
        assert!(reached.conns_evicted > 0, "{reached:?}");
        for r in [
            DropReason::VnicConnLimit,
            DropReason::SpoofedMac,
            DropReason::PolicyDeny,
        ] {
            assert!(reached.drops[r.index()] > 0, "no {r:?}: {reached:?}");
        }
    }
}
