//! `ClassifiedLookup` against `PolicyLookup`: the same answer for every chain
//! and flow of the three-tier example, and the engine runs on it unchanged.

use core::net::{IpAddr, Ipv4Addr};
use std::collections::BTreeMap;

use palisade_datapath::ClassifiedLookup;
use palisade_datapath::DropReason;
use palisade_datapath::FlowEvent;
use palisade_datapath::port::{self, PortId, UplinkConfig};
use palisade_datapath::{ChainLookup, PolicyLookup};
use palisade_datapath::{Disposition, Engine, EngineConfig, Results};
use palisade_policy::compile::{Compiler, EntryAction};
use palisade_policy::eval::{Direction, Flow};
use palisade_policy::{DirSource, MemorySource, load};
use palisade_testkit::vm_frame;
use palisade_wire::ethernet::EthernetAddress;
use palisade_wire::ip::IpProtocol;
use palisade_wire::tcp::{self, TcpFlags, TcpRepr};

const THREE_TIER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/three-tier");

fn three_tier() -> Compiler {
    let loaded = load(&DirSource::new(THREE_TIER)).unwrap();
    assert!(!loaded.has_errors(), "{}", loaded.render());
    Compiler::new(loaded.model).unwrap()
}

/// The example with web-1 quarantined, so that `pass` entries take effect.
fn three_tier_quarantined() -> Compiler {
    let mut c = three_tier();
    let mut tags: BTreeMap<String, String> = c
        .model()
        .inventory
        .vms
        .iter()
        .find(|v| v.name == "web-1")
        .unwrap()
        .tags
        .clone();
    tags.insert("quarantine".into(), "true".into());
    c.retag("web-1", tags).unwrap();
    c
}

fn vnics(c: &Compiler) -> Vec<String> {
    c.model().inventory.vnics().map(|(_, n)| n.name.clone()).collect()
}

fn addresses(c: &Compiler) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = c.model().inventory.vnics().flat_map(|(_, n)| n.ips.clone()).collect();
    // Outside: the admin VPN, the internet (both families), an unmanaged lab address.
    for s in ["10.255.0.7", "8.8.8.8", "2001:db8::1", "10.0.1.99", "fd00:1::12"] {
        ips.push(s.parse().unwrap());
    }
    ips
}

/// Every (source, destination) pair × a spread of protocols and ports.
fn flows(c: &Compiler) -> Vec<Flow> {
    let ips = addresses(c);
    let ports = [0u16, 1, 22, 23, 53, 80, 443, 1023, 5432, 8080, 8081, 49152, 65535];
    let sports = [0u16, 53, 40000, 65535];
    let icmp = [(8u16, 0u16), (0, 0), (3, 4), (8, 1), (11, 0)];
    let mut out = Vec::new();
    for &src in &ips {
        for &dst in &ips {
            for proto in [6u8, 17] {
                for &sp in &sports {
                    for &dp in &ports {
                        out.push(Flow {
                            src,
                            dst,
                            proto,
                            src_port: sp,
                            dst_port: dp,
                        });
                    }
                }
            }
            for proto in [1u8, 58] {
                for &(t, code) in &icmp {
                    out.push(Flow {
                        src,
                        dst,
                        proto,
                        src_port: t,
                        dst_port: code,
                    });
                }
            }
            for proto in [0u8, 47, 132] {
                out.push(Flow {
                    src,
                    dst,
                    proto,
                    src_port: 0,
                    dst_port: 0,
                });
            }
        }
    }
    out
}

/// xorshift64*: deterministic pseudo-random flows without a dev-dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[(self.next() % v.len() as u64) as usize]
    }
}

/// Compare both lookups on every vNIC × direction × flow; returns how many
/// decisions came from a rule rather than the default.
fn compare(c: &Compiler, flows: &[Flow]) -> usize {
    let linear = PolicyLookup::new(c.clone());
    let fast = ClassifiedLookup::new(c.clone());
    assert_eq!(fast.fallback_chains(), 0, "every three-tier chain classifies");
    assert_eq!(fast.version(), linear.version());
    let mut by_rule = 0;
    for vnic in vnics(c) {
        for dir in [Direction::Egress, Direction::Ingress] {
            for f in flows {
                let want = linear.decide(&vnic, dir, f);
                let got = fast.decide(&vnic, dir, f);
                assert_eq!(got, want, "{vnic} {dir:?} {f:?}");
                if want.is_some_and(|v| &*v.rule != "default") {
                    by_rule += 1;
                }
            }
        }
    }
    for ip in addresses(c) {
        assert_eq!(fast.vnic_of(ip), linear.vnic_of(ip));
    }
    assert_eq!(fast.decide("no-such-vnic", Direction::Egress, &flows[0]), None);
    by_rule
}

#[test]
fn same_answers_as_the_linear_walk_on_three_tier() {
    let c = three_tier();
    let flows = flows(&c);
    let by_rule = compare(&c, &flows);
    // The grid must reach rules, not only defaults, for the comparison to mean anything.
    assert!(by_rule > 1000, "{by_rule} decisions by a rule");
}

#[test]
fn same_answers_with_pass_jumps_in_effect() {
    let c = three_tier_quarantined();
    let passes = c
        .chains()
        .flat_map(|ch| &ch.entries)
        .filter(|e| matches!(e.action, EntryAction::Pass { .. }))
        .count();
    assert!(passes > 0, "the quarantine makes dc-forensics-ssh a pass entry");
    let flows = flows(&c);
    compare(&c, &flows);
    // The forensic SSH reaches the cluster level through the pass.
    let fast = ClassifiedLookup::new(c);
    let ssh = Flow {
        src: "10.0.9.10".parse().unwrap(),
        dst: "10.0.1.11".parse().unwrap(),
        proto: 6,
        src_port: 40000,
        dst_port: 22,
    };
    let v = fast.decide("web-1.0", Direction::Ingress, &ssh).unwrap();
    assert_eq!(&*v.rule, "prod-forensics-ssh");
}

#[test]
fn same_answers_on_random_flows() {
    let c = three_tier_quarantined();
    let linear = PolicyLookup::new(c.clone());
    let fast = ClassifiedLookup::new(c.clone());
    let ips = addresses(&c);
    let names = vnics(&c);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..50_000 {
        let r = rng.next();
        let f = Flow {
            src: rng.pick(&ips),
            dst: rng.pick(&ips),
            proto: rng.pick(&[1u8, 6, 17, 58, 0, 47]),
            // Small ports half the time, so ICMP types and service ports come up.
            src_port: if r & 1 == 0 {
                (r >> 8) as u16
            } else {
                (r >> 8) as u16 % 64
            },
            dst_port: if r & 2 == 0 {
                (r >> 24) as u16
            } else {
                rng.pick(&[0, 4, 22, 23, 53, 80, 443, 5432, 8080])
            },
        };
        let vnic = names[(rng.next() % names.len() as u64) as usize].as_str();
        let dir = if r & 4 == 0 {
            Direction::Egress
        } else {
            Direction::Ingress
        };
        assert_eq!(
            fast.decide(vnic, dir, &f),
            linear.decide(vnic, dir, &f),
            "{vnic} {dir:?} {f:?}"
        );
    }
}

// ---- The engine on a ClassifiedLookup ----

const POLICY: &str = r#"
version: 3
datacenter: { name: dc1, default: deny }
zones: [{ name: web, vlan: 100 }]
vms:
  - { name: a, uuid: 00000000-0000-4000-8000-00000000000a, host: h1, vnics: [{ name: a.0, mac: "02:00:00:00:00:0a", ips: [10.0.0.10], zone: web }] }
  - { name: b, uuid: 00000000-0000-4000-8000-00000000000b, host: h1, vnics: [{ name: b.0, mac: "02:00:00:00:00:0b", ips: [10.0.0.11], zone: web }] }
groups: { web: { zone: web } }
rules:
  datacenter:
    - { id: web-https, from: web, to: web, service: tcp/443, action: allow }
"#;

fn engine() -> Engine {
    let loaded = load(&MemorySource::new().with("p.yaml", POLICY.to_string())).unwrap();
    assert!(!loaded.has_errors(), "{}", loaded.render());
    let compiler = Compiler::new(loaded.model).unwrap();
    let model = compiler.model().clone();
    let uplink = UplinkConfig {
        local_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 1]),
        local_ip: Ipv4Addr::new(192, 168, 0, 1),
        gateway_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 0xfe]),
        flood: vec![Ipv4Addr::new(192, 168, 0, 2)],
    };
    let mut e = Engine::new(EngineConfig::new(uplink), Box::new(ClassifiedLookup::new(compiler)));
    for nic in model.inventory.vms.iter().flat_map(|v| &v.vnics) {
        e.add_vnic(port::vnic_from_model(&model, &nic.name, &[], 1000).unwrap())
            .unwrap();
    }
    e
}

/// A TCP frame between the two VMs (by last octet, which is also the MAC's last byte).
fn tcp_frame(from: u8, to: u8, sport: u16, dport: u16, seq: u32, ack: u32, flags: TcpFlags) -> Vec<u8> {
    let (src, dst) = (Ipv4Addr::new(10, 0, 0, from), Ipv4Addr::new(10, 0, 0, to));
    let t = TcpRepr {
        src_port: sport,
        dst_port: dport,
        seq_number: seq,
        ack_number: ack,
        flags,
        window_len: 64000,
        urgent_pointer: 0,
        options: &[],
        payload: b"",
    };
    let mut l4 = vec![0; t.buffer_len()];
    t.emit(&mut tcp::Packet::new_unchecked(&mut l4[..]), src.into(), dst.into());
    vm_frame(from, to, IpProtocol::TCP, &l4)
}

fn forwards_to(e: &mut Engine, now: u64, from: PortId, frame: &[u8], ev: &mut Vec<FlowEvent>) -> Vec<PortId> {
    let mut results = Results::new();
    let p = e.process(now, from, frame, ev, &mut results);
    assert_eq!(p, Disposition::Forward);
    p.outputs.iter().map(|o| o.port).collect()
}

#[test]
fn engine_runs_a_tcp_exchange_on_the_classified_lookup() {
    let mut e = engine();
    let mut ev = Vec::new();
    let (a, b) = (e.port_of("a.0").unwrap(), e.port_of("b.0").unwrap());
    let syn = tcp_frame(10, 11, 40000, 443, 1000, 0, TcpFlags::SYN);
    assert_eq!(forwards_to(&mut e, 0, a, &syn, &mut ev), vec![b]);
    let synack = tcp_frame(11, 10, 443, 40000, 9000, 1001, TcpFlags::SYN | TcpFlags::ACK);
    assert_eq!(forwards_to(&mut e, 1, b, &synack, &mut ev), vec![a]);
    let ack = tcp_frame(10, 11, 40000, 443, 1001, 9001, TcpFlags::ACK);
    assert_eq!(forwards_to(&mut e, 2, a, &ack, &mut ev), vec![b]);
    assert_eq!(e.counters().classifications, 1);
    assert_eq!(e.rule_tally("web-https").hits, 2, "egress and ingress chains");
    // Anything else falls to the datacenter default.
    let other = tcp_frame(10, 11, 40001, 25, 5000, 0, TcpFlags::SYN);
    assert_eq!(
        e.process(3, a, &other, &mut ev, &mut Results::new()),
        Disposition::Drop(DropReason::PolicyDeny)
    );
}
