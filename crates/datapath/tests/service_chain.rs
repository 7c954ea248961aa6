//! Service chains in the engine: frames in, outputs checked. A north-south
//! flow from the edge router's leg to a web VM is redirected through one of
//! two bump-in-the-wire appliance VMs; east-west traffic is not.

#[path = "support/chain_lab.rs"]
mod chain_lab;

use chain_lab::{MS, ROUTER_MAC, WEB1, WEB1_MAC, WEB2, WEB2_MAC, inbound, outbound, tcp};

use palisade_datapath::port::{self, PortId};
use palisade_datapath::{Disposition, DropReason, Engine, OffloadError, OffloadVerdict, PolicyLookup, Results};
use palisade_policy::compile::Compiler;
use palisade_policy::{MemorySource, load};
use palisade_wire::ethernet::{self, EtherType, EthernetAddress, EthernetRepr};
use palisade_wire::flow::{self, FlowKey};
use palisade_wire::tcp::TcpFlags;

fn policy(on_failure: &str) -> String {
    format!(
        r#"
version: 1
datacenter: {{ name: dc1, default: deny }}
zones: [{{ name: web, vlan: 100 }}, {{ name: svc, vlan: 900 }}]
vms:
  - {{ name: web-1, uuid: 00000000-0000-4000-8000-000000000001, tags: {{ tier: web }}, vnics: [{{ name: web-1.0, mac: "02:00:00:00:00:01", ips: [10.0.0.1], zone: web }}] }}
  - {{ name: web-2, uuid: 00000000-0000-4000-8000-000000000002, tags: {{ tier: web }}, vnics: [{{ name: web-2.0, mac: "02:00:00:00:00:02", ips: [10.0.0.2], zone: web }}] }}
  - name: ips-1
    uuid: 00000000-0000-4000-8000-000000000003
    vnics:
      - {{ name: ips-1.in, mac: "02:00:00:00:01:01", ips: [], zone: svc }}
      - {{ name: ips-1.out, mac: "02:00:00:00:01:02", ips: [], zone: svc }}
  - name: ips-2
    uuid: 00000000-0000-4000-8000-000000000004
    vnics:
      - {{ name: ips-2.in, mac: "02:00:00:00:02:01", ips: [], zone: svc }}
      - {{ name: ips-2.out, mac: "02:00:00:00:02:02", ips: [], zone: svc }}
groups:
  web: {{ tags: {{ tier: web }} }}
  internet: external
service_chains:
  ns-ips:
    on_failure: {on_failure}
    appliances:
      - {{ vm: ips-1, in: ips-1.in, out: ips-1.out }}
      - {{ vm: ips-2, in: ips-2.in, out: ips-2.out }}
rules:
  zone:web:
    - {{ id: web-in, from: internet, to: web, service: tcp/80, action: allow, redirect: ns-ips }}
    - {{ id: web-east-west, from: web, to: web, service: tcp/80, action: allow }}
"#
    )
}

struct Lab {
    e: Engine,
    router: PortId,
    web1: PortId,
    web2: PortId,
    /// Each instance's (in, out) ports.
    ips: [(PortId, PortId); 2],
    results: Results,
}

fn lab(on_failure: &str) -> Lab {
    let (mut e, model) = chain_lab::engine(policy(on_failure));
    let mut add = |name: &str| chain_lab::add_vnic(&mut e, &model, name);
    let web1 = add("web-1.0");
    let web2 = add("web-2.0");
    let ips = [(add("ips-1.in"), add("ips-1.out")), (add("ips-2.in"), add("ips-2.out"))];
    // The edge router's leg in the web zone: an appliance port.
    let router = chain_lab::add_router_leg(&mut e, ROUTER_MAC);
    Lab {
        e,
        router,
        web1,
        web2,
        ips,
        results: Results::default(),
    }
}

fn eth(src: [u8; 6], dst: [u8; 6], ethertype: EtherType, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0; 14 + payload.len()];
    EthernetRepr {
        src_addr: EthernetAddress(src),
        dst_addr: EthernetAddress(dst),
        ethertype,
    }
    .emit(&mut ethernet::Frame::new_unchecked(&mut f[..]));
    f[14..].copy_from_slice(payload);
    f
}

impl Lab {
    /// Process `frame` on `port` at `now` ms: its disposition and the ports it goes to.
    fn send(&mut self, now: u64, port: PortId, frame: &[u8]) -> (Disposition, Vec<PortId>) {
        chain_lab::send(&mut self.e, &mut self.results, now, port, frame)
    }

    /// The instance (index) whose in-port a frame was steered to.
    fn instance_of_in(&self, ports: &[PortId]) -> usize {
        assert_eq!(ports.len(), 1, "{ports:?}");
        self.ips
            .iter()
            .position(|(i, _)| *i == ports[0])
            .unwrap_or_else(|| panic!("{ports:?} is no appliance's in-port"))
    }

    /// A full handshake through the chain: returns the instance it met.
    fn handshake(&mut self, now: u64, sport: u16) -> usize {
        let syn = inbound(sport, (100, 0), TcpFlags::SYN);
        let (d, to) = self.send(now, self.router, &syn);
        assert_eq!(d, Disposition::Forward);
        let i = self.instance_of_in(&to);
        let (inp, out) = self.ips[i];
        // The appliance bridges it: it comes back on its out-port, unchanged.
        assert_eq!(self.send(now, out, &syn), (Disposition::Forward, vec![self.web1]));
        // The reply enters the same instance by its out-port, comes back on its in-port.
        let syn_ack = outbound(sport, (500, 101), TcpFlags::SYN | TcpFlags::ACK);
        assert_eq!(self.send(now, self.web1, &syn_ack), (Disposition::Forward, vec![out]));
        assert_eq!(self.send(now, inp, &syn_ack), (Disposition::Forward, vec![self.router]));
        let ack = inbound(sport, (101, 501), TcpFlags::ACK);
        assert_eq!(self.send(now, self.router, &ack), (Disposition::Forward, vec![inp]));
        assert_eq!(self.send(now, out, &ack), (Disposition::Forward, vec![self.web1]));
        i
    }
}

#[test]
fn north_south_goes_through_one_instance_both_ways_and_east_west_does_not() {
    let mut l = lab("closed");
    let before = l.e.counters().classifications;
    let i = l.handshake(1, 40000);
    // Classified once, on the SYN; every other packet, both legs, on the connection.
    assert_eq!(l.e.counters().classifications - before, 1);
    let chain = &l.e.service_chains()[0];
    assert_eq!(&*chain.name, "ns-ips");
    let inst = &chain.instances[i];
    assert_eq!((inst.sent, inst.returned, inst.flows), (3, 3, 1));
    assert_eq!(chain.instances[1 - i].sent, 0);
    // The connection records its appliance.
    let key = flow::extract(&inbound(40000, (0, 0), TcpFlags::ACK)[..])
        .unwrap()
        .unwrap()
        .key;
    let slot = l.e.conntrack().find(&routing(key)).unwrap();
    let steer = l.e.conntrack().get(slot).unwrap().steer.unwrap();
    assert_eq!(
        l.e.appliances_of(&steer),
        Some(("ns-ips", vec![if i == 0 { "ips-1" } else { "ips-2" }]))
    );

    // East-west: web-2 to web-1 goes straight to web-1.
    let syn = tcp((WEB2_MAC, WEB2, 5555), (WEB1_MAC, WEB1, 80), (1, 0), TcpFlags::SYN);
    assert_eq!(l.send(2, l.web2, &syn), (Disposition::Forward, vec![l.web1]));
    let reply = tcp(
        (WEB1_MAC, WEB1, 80),
        (WEB2_MAC, WEB2, 5555),
        (9, 2),
        TcpFlags::SYN | TcpFlags::ACK,
    );
    assert_eq!(l.send(2, l.web1, &reply), (Disposition::Forward, vec![l.web2]));
    let sent: u64 = l.e.service_chains()[0].instances.iter().map(|i| i.sent).sum();
    assert_eq!(sent, 3, "east-west traffic never reaches an appliance");
}

/// The engine keys connections in the routing domain.
fn routing(mut key: FlowKey) -> FlowKey {
    key.segment = palisade_datapath::ROUTING_DOMAIN;
    key
}

#[test]
fn appliances_cannot_inject_or_reflect() {
    let mut l = lab("closed");
    let i = l.handshake(1, 40000);
    let (inp, out) = l.ips[i];
    let (other_in, other_out) = l.ips[1 - i];
    let not_steered = Disposition::Drop(DropReason::ApplianceNotSteered);
    let data = inbound(40000, (101, 501), TcpFlags::ACK);
    // The initiator's packet may only come back on the out-port of its own instance.
    assert_eq!(l.send(2, inp, &data).0, not_steered, "wrong side");
    assert_eq!(l.send(2, other_out, &data).0, not_steered, "another instance");
    assert_eq!(
        l.send(2, other_in, &data).0,
        not_steered,
        "another instance, wrong side"
    );
    // A 5-tuple no connection has: dropped, and no connection is made for it.
    let conns = l.e.conntrack().len();
    let forged = inbound(40001, (1, 0), TcpFlags::SYN);
    assert_eq!(l.send(2, out, &forged).0, not_steered);
    let forged = tcp((WEB2_MAC, WEB2, 6000), (WEB1_MAC, WEB1, 80), (1, 0), TcpFlags::SYN);
    assert_eq!(l.send(2, out, &forged).0, not_steered);
    assert_eq!(l.e.conntrack().len(), conns);
    // A connection that is not steered cannot be entered through an appliance either.
    let syn = tcp((WEB2_MAC, WEB2, 5555), (WEB1_MAC, WEB1, 80), (1, 0), TcpFlags::SYN);
    assert_eq!(l.send(2, l.web2, &syn).0, Disposition::Forward);
    assert_eq!(l.send(2, out, &syn).0, not_steered);
    // Nothing but IP comes back from an appliance (an ARP it would bridge, say).
    let arp = eth(ROUTER_MAC, [0xff; 6], EtherType::ARP, &[0; 28]);
    assert_eq!(l.send(2, out, &arp).0, not_steered);
    assert!(l.e.counters().dropped(DropReason::ApplianceNotSteered) >= 7);
    // The real one still passes.
    assert_eq!(l.send(2, out, &data), (Disposition::Forward, vec![l.web1]));
    // A flood (a broadcast from a VM) never reaches an appliance port.
    let bcast = eth(WEB2_MAC, [0xff; 6], EtherType::ARP, &[0; 28]);
    let (_, to) = l.send(3, l.web2, &bcast);
    assert!(
        to.iter().all(|p| !l.ips.iter().any(|(a, b)| a == p || b == p)),
        "{to:?}"
    );
    // Nor does a frame addressed to an appliance vNIC's own MAC.
    let direct = tcp(
        (WEB2_MAC, WEB2, 5556),
        ([2, 0, 0, 0, 1, 1], WEB1, 80),
        (1, 0),
        TcpFlags::SYN,
    );
    let (_, to) = l.send(3, l.web2, &direct);
    assert!(
        to.iter().all(|p| !l.ips.iter().any(|(a, b)| a == p || b == p)),
        "{to:?}"
    );
}

/// An appliance vNIC in the segment of the traffic: a frame sent to its MAC
/// is not delivered to it.
#[test]
fn an_appliance_port_is_no_l2_destination() {
    let text = policy("closed").replace("zone: svc", "zone: web");
    let (mut e, model) = chain_lab::engine(text);
    let web2 = e
        .add_vnic(port::vnic_from_model(&model, "web-2.0", &[], 10).unwrap())
        .unwrap();
    e.add_vnic(port::vnic_from_model(&model, "ips-1.in", &[], 10).unwrap())
        .unwrap();
    let direct = tcp(
        (WEB2_MAC, WEB2, 5556),
        ([2, 0, 0, 0, 1, 1], WEB1, 80),
        (1, 0),
        TcpFlags::SYN,
    );
    let mut results = Results::default();
    let p = e.process(MS, web2, &direct, &mut chain_lab::NoEvents, &mut results);
    assert_eq!(p.disposition, Disposition::Drop(DropReason::NoRoute));
}

#[test]
fn a_down_instance_hands_its_flows_over_and_closed_chains_drop_when_none_is_left() {
    let mut l = lab("closed");
    let i = l.handshake(1, 40000);
    let (inp, out) = l.ips[i];
    let (other_in, other_out) = l.ips[1 - i];
    l.e.set_port_link(inp, false);
    assert!(!l.e.service_chains()[0].instances[i].up);
    // The flow moves to the other instance, both directions.
    let data = inbound(40000, (101, 501), TcpFlags::ACK);
    assert_eq!(l.send(2, l.router, &data), (Disposition::Forward, vec![other_in]));
    assert_eq!(l.send(2, other_out, &data), (Disposition::Forward, vec![l.web1]));
    let back = outbound(40000, (501, 101), TcpFlags::ACK);
    assert_eq!(l.send(2, l.web1, &back), (Disposition::Forward, vec![other_out]));
    // ... and the old instance may no longer return it.
    assert_eq!(
        l.send(2, out, &data).0,
        Disposition::Drop(DropReason::ApplianceNotSteered)
    );
    assert_eq!(l.e.service_chains()[0].failovers, 1);
    // None left: a closed chain drops, counted.
    l.e.set_port_link(other_out, false);
    assert_eq!(
        l.send(3, l.router, &data).0,
        Disposition::Drop(DropReason::ApplianceDown)
    );
    assert_eq!(l.send(3, l.web1, &back).0, Disposition::Drop(DropReason::ApplianceDown));
    assert_eq!(l.e.service_chains()[0].dropped, 2);
    // One back: the flow goes through it again.
    l.e.set_port_link(inp, true);
    assert_eq!(l.send(4, l.router, &data), (Disposition::Forward, vec![inp]));
    assert_eq!(l.send(4, out, &data), (Disposition::Forward, vec![l.web1]));
}

#[test]
fn an_open_chain_delivers_without_the_appliance_while_none_is_up() {
    let mut l = lab("open");
    for (a, b) in l.ips {
        l.e.set_port_link(a, false);
        l.e.set_port_link(b, false);
    }
    let syn = inbound(40000, (100, 0), TcpFlags::SYN);
    assert_eq!(l.send(1, l.router, &syn), (Disposition::Forward, vec![l.web1]));
    let syn_ack = outbound(40000, (500, 101), TcpFlags::SYN | TcpFlags::ACK);
    assert_eq!(l.send(1, l.web1, &syn_ack), (Disposition::Forward, vec![l.router]));
    assert_eq!(l.e.service_chains()[0].bypassed, 2);
    // An instance comes back: the flow's next packets go through it.
    let (inp, out) = l.ips[1];
    l.e.set_port_link(inp, true);
    l.e.set_port_link(out, true);
    let ack = inbound(40000, (101, 501), TcpFlags::ACK);
    assert_eq!(l.send(2, l.router, &ack), (Disposition::Forward, vec![inp]));
    assert_eq!(l.send(2, out, &ack), (Disposition::Forward, vec![l.web1]));
}

#[test]
fn offload_takes_a_flow_off_the_appliance_or_drops_the_rest() {
    let mut l = lab("closed");
    l.handshake(1, 40000);
    let key = flow::extract(&outbound(40000, (0, 0), TcpFlags::ACK)[..])
        .unwrap()
        .unwrap()
        .key;
    // Either direction's 5-tuple names the connection.
    l.e.offload_flow(&key, OffloadVerdict::Allow).unwrap();
    let before: u64 = l.e.service_chains()[0].instances.iter().map(|i| i.sent).sum();
    let data = inbound(40000, (101, 501), TcpFlags::ACK);
    assert_eq!(l.send(2, l.router, &data), (Disposition::Forward, vec![l.web1]));
    let back = outbound(40000, (501, 101), TcpFlags::ACK);
    assert_eq!(l.send(2, l.web1, &back), (Disposition::Forward, vec![l.router]));
    let after: u64 = l.e.service_chains()[0].instances.iter().map(|i| i.sent).sum();
    assert_eq!(after, before, "an offloaded flow no longer reaches the appliance");
    assert_eq!(l.e.service_chains()[0].offloaded, 1);

    l.handshake(3, 40001);
    let key = flow::extract(&inbound(40001, (0, 0), TcpFlags::ACK)[..])
        .unwrap()
        .unwrap()
        .key;
    l.e.offload_flow(&key, OffloadVerdict::Drop).unwrap();
    let data = inbound(40001, (101, 501), TcpFlags::ACK);
    assert_eq!(
        l.send(4, l.router, &data).0,
        Disposition::Drop(DropReason::ApplianceOffloadDrop)
    );

    // Nothing to offload: no connection, or one that is not steered.
    let none = flow::extract(&inbound(49999, (0, 0), TcpFlags::ACK)[..])
        .unwrap()
        .unwrap()
        .key;
    assert_eq!(
        l.e.offload_flow(&none, OffloadVerdict::Allow),
        Err(OffloadError::NoConnection)
    );
    let syn = tcp((WEB2_MAC, WEB2, 5555), (WEB1_MAC, WEB1, 80), (1, 0), TcpFlags::SYN);
    l.send(5, l.web2, &syn);
    let ew = flow::extract(&syn[..]).unwrap().unwrap().key;
    assert_eq!(
        l.e.offload_flow(&ew, OffloadVerdict::Allow),
        Err(OffloadError::NotSteered)
    );
}

#[test]
fn the_flow_hash_is_symmetric_and_spreads_flows_over_instances() {
    let mut l = lab("closed");
    let mut seen = [0usize; 2];
    for sport in 40000..40064u16 {
        let f = inbound(sport, (0, 0), TcpFlags::ACK);
        let k = flow::extract(&f[..]).unwrap().unwrap().key;
        assert_eq!(k.symmetric_hash(), k.reversed().symmetric_hash());
        let (_, to) = l.send(1, l.router, &inbound(sport, (100, 0), TcpFlags::SYN));
        seen[l.instance_of_in(&to)] += 1;
    }
    assert!(seen[0] > 10 && seen[1] > 10, "64 flows over two instances: {seen:?}");
}

/// A restart (every connection exported, then imported into a new engine
/// under the same policy) keeps a redirected flow on its appliance. (The
/// state blob does not carry the steering: imported as current, the flow
/// went straight to the VM.)
#[test]
fn an_imported_connection_is_still_steered() {
    let mut old = lab("closed");
    let i = old.handshake(1, 40000);
    let blob = old.e.export_all(2 * MS);
    let mut l = lab("closed");
    assert_eq!(l.e.import_all(&blob, 3 * MS, &mut chain_lab::NoEvents).unwrap(), 1);
    let data = inbound(40000, (101, 501), TcpFlags::ACK);
    // The same instance: the appliance keeps seeing the whole connection.
    assert_eq!(l.send(4, l.router, &data), (Disposition::Forward, vec![l.ips[i].0]));
    assert_eq!(l.send(4, l.ips[i].1, &data), (Disposition::Forward, vec![l.web1]));
    let back = outbound(40000, (501, 101), TcpFlags::ACK);
    assert_eq!(l.send(4, l.web1, &back), (Disposition::Forward, vec![l.ips[i].1]));
}

#[test]
fn a_refusing_reset_goes_through_the_appliance_and_ends_the_connection_on_return() {
    let mut l = lab("closed");
    let syn = inbound(40100, (100, 0), TcpFlags::SYN);
    let (d, to) = l.send(1, l.router, &syn);
    assert_eq!(d, Disposition::Forward);
    let i = l.instance_of_in(&to);
    let (inp, out) = l.ips[i];
    assert_eq!(l.send(1, out, &syn), (Disposition::Forward, vec![l.web1]));
    // web-1 refuses: its reset is the connection's last packet, steered like the others.
    let rst = outbound(40100, (0, 101), TcpFlags::RST | TcpFlags::ACK);
    assert_eq!(l.send(2, l.web1, &rst), (Disposition::Forward, vec![out]));
    // Back from the appliance, it is delivered, and the connection is over.
    assert_eq!(l.send(2, inp, &rst), (Disposition::Forward, vec![l.router]));
    assert!(l.e.conntrack().find(&routing(flow_key_of(&syn))).is_none());
    // Nothing of it comes back a second time.
    assert_eq!(
        l.send(3, inp, &rst),
        (Disposition::Drop(DropReason::ApplianceNotSteered), vec![])
    );
}

#[test]
fn a_reset_dropped_by_the_appliance_never_arrives_and_the_connection_ends_soon() {
    let mut l = lab("closed");
    let syn = inbound(40101, (100, 0), TcpFlags::SYN);
    let (_, to) = l.send(1, l.router, &syn);
    let i = l.instance_of_in(&to);
    let (_, out) = l.ips[i];
    assert_eq!(l.send(1, out, &syn), (Disposition::Forward, vec![l.web1]));
    let rst = outbound(40101, (0, 101), TcpFlags::RST | TcpFlags::ACK);
    assert_eq!(l.send(2, l.web1, &rst), (Disposition::Forward, vec![out]));
    // The appliance swallowed it: the connection lingers closed, and expires like one.
    let key = routing(flow_key_of(&syn));
    assert!(l.e.conntrack().find(&key).is_some());
    let mut ev = Vec::new();
    l.e.expire(120_000 * MS, 1 << 16, &mut ev);
    assert!(l.e.conntrack().find(&key).is_none());
}

#[test]
fn an_established_connections_reset_goes_through_the_appliance_both_ways() {
    let mut l = lab("closed");
    let i = l.handshake(1, 40102);
    let (inp, out) = l.ips[i];
    let rst = inbound(40102, (101, 501), TcpFlags::RST | TcpFlags::ACK);
    assert_eq!(l.send(2, l.router, &rst), (Disposition::Forward, vec![inp]));
    assert_eq!(l.send(2, out, &rst), (Disposition::Forward, vec![l.web1]));
}

#[test]
fn an_open_chain_with_no_instance_up_delivers_a_refusing_reset_directly() {
    let mut l = lab("open");
    let syn = inbound(40103, (100, 0), TcpFlags::SYN);
    let (_, to) = l.send(1, l.router, &syn);
    let i = l.instance_of_in(&to);
    let (_, out) = l.ips[i];
    assert_eq!(l.send(1, out, &syn), (Disposition::Forward, vec![l.web1]));
    for (a, b) in l.ips {
        l.e.set_port_link(a, false);
        l.e.set_port_link(b, false);
    }
    let rst = outbound(40103, (0, 101), TcpFlags::RST | TcpFlags::ACK);
    assert_eq!(l.send(2, l.web1, &rst), (Disposition::Forward, vec![l.router]));
    assert!(l.e.conntrack().find(&routing(flow_key_of(&syn))).is_none());
}

/// The flow key of a frame.
fn flow_key_of(frame: &[u8]) -> FlowKey {
    flow::extract(frame).unwrap().unwrap().key
}

/// The probe round driver of these tests: the monitor, the engine's returns,
/// and an appliance that forwards (or not) the probe frames of each instance.
struct Prober {
    monitor: palisade_datapath::probe::ProbeMonitor,
}

impl Prober {
    fn new(l: &mut Lab) -> Prober {
        let key = palisade_datapath::probe::ProbeKey::random();
        l.e.set_probe_key(key.clone());
        Prober {
            monitor: palisade_datapath::probe::ProbeMonitor::new(key),
        }
    }

    /// One round at `now` ms: the frames the last round sent were handled by
    /// the appliances as `forwards(instance)` says; returns the health
    /// changes (already given to the engine) and the new round's frames.
    fn round(
        &mut self,
        l: &mut Lab,
        now: u64,
        frames: &[palisade_datapath::probe::ProbeFrame],
        forwards: impl Fn(usize) -> bool,
    ) -> (
        Vec<palisade_datapath::probe::ProbeChange>,
        Vec<palisade_datapath::probe::ProbeFrame>,
    ) {
        for f in frames {
            let (i, into_in) = l
                .ips
                .iter()
                .enumerate()
                .find_map(|(i, (a, b))| {
                    (f.port == *a)
                        .then_some((i, true))
                        .or((f.port == *b).then_some((i, false)))
                })
                .expect("probes go to appliance ports only");
            if !forwards(i) {
                continue;
            }
            // A bridge: out of the other side, unchanged.
            let other = if into_in { l.ips[i].1 } else { l.ips[i].0 };
            assert_eq!(
                l.send(now, other, &f.frame),
                (Disposition::Drop(DropReason::ApplianceProbe), vec![]),
                "a probe back is consumed, never delivered"
            );
        }
        chain_lab::probe_tick(&mut l.e, &mut self.monitor, now)
    }
}

#[test]
fn probes_cross_each_instance_both_ways_and_are_consumed() {
    let mut l = lab("closed");
    let mut p = Prober::new(&mut l);
    let (changes, frames) = p.round(&mut l, 0, &[], |_| true);
    assert!(changes.is_empty());
    // Two instances, one frame into each side.
    let mut ports: Vec<PortId> = frames.iter().map(|f| f.port).collect();
    ports.sort();
    let mut want: Vec<PortId> = l.ips.iter().flat_map(|(a, b)| [*a, *b]).collect();
    want.sort();
    assert_eq!(ports, want);
    // Not due before the interval (500 ms by default): nothing new.
    let (changes, early) = p.round(&mut l, 100, &frames, |_| true);
    assert!(changes.is_empty() && early.is_empty());
    let (changes, frames) = p.round(&mut l, 500, &[], |_| true);
    assert!(changes.is_empty());
    assert_eq!(frames.len(), 4);
    let chain = &l.e.service_chains()[0];
    assert!(
        chain
            .instances
            .iter()
            .all(|i| i.up && i.probe_up && i.probes_returned == 2)
    );
    assert_eq!(l.e.counters().drops[DropReason::ApplianceProbe.index()], 4);
}

#[test]
fn an_instance_that_keeps_link_but_stops_forwarding_goes_down_and_comes_back() {
    let mut l = lab("closed");
    let mut p = Prober::new(&mut l);
    let i = l.handshake(1, 40200);
    let (_, mut frames) = p.round(&mut l, 0, &[], |_| true);
    // Instance `i` stops forwarding: its link stays up.
    let mut down_at = None;
    for n in 1..=5u64 {
        let (changes, next) = p.round(&mut l, n * 500, &frames, |x| x != i);
        frames = next;
        if !changes.is_empty() {
            assert_eq!(changes.len(), 1);
            assert_eq!((changes[0].instance as usize, changes[0].up), (i, false));
            down_at = Some(n);
            break;
        }
    }
    // The round sent at 0 is closed lost at 500, 1000, 1500: down after 3 (the default).
    assert_eq!(down_at, Some(3));
    let inst = &l.e.service_chains()[0].instances[i];
    assert!(inst.link_up && !inst.probe_up && !inst.up);
    // Its connection moves to the other instance.
    let (inp, _) = l.ips[1 - i];
    let data = inbound(40200, (101, 501), TcpFlags::ACK | TcpFlags::PSH);
    assert_eq!(l.send(2000, l.router, &data), (Disposition::Forward, vec![inp]));
    assert_eq!(l.e.service_chains()[0].failovers, 1);
    // One answered round is not enough; two are (the default up_after).
    let (changes, next) = p.round(&mut l, 2000, &frames, |_| true);
    assert!(changes.is_empty());
    let (changes, _) = p.round(&mut l, 2500, &next, |_| true);
    assert_eq!(changes.len(), 1);
    assert!(changes[0].up);
    assert!(l.e.service_chains()[0].instances[i].up);
    let stats: Vec<_> = p.monitor.instances().filter(|s| s.missed > 0).collect();
    assert_eq!(stats.len(), 1);
    assert_eq!((stats[0].missed, stats[0].downs), (3, 1));
}

#[test]
fn one_lost_round_does_not_take_an_instance_down() {
    let mut l = lab("closed");
    let mut p = Prober::new(&mut l);
    let (_, mut frames) = p.round(&mut l, 0, &[], |_| true);
    for n in 1..=8u64 {
        // Every other round is lost: never three in a row.
        let (changes, next) = p.round(&mut l, n * 500, &frames, |_| n % 2 == 0);
        assert!(changes.is_empty(), "round {n}");
        frames = next;
    }
}

#[test]
fn an_appliance_cannot_answer_for_another_instance_reflect_or_replay() {
    let mut l = lab("closed");
    let mut p = Prober::new(&mut l);
    let (_, frames) = p.round(&mut l, 0, &[], |_| true);
    let into = |l: &Lab, i: usize, side_in: bool| {
        let port = if side_in { l.ips[i].0 } else { l.ips[i].1 };
        frames.iter().find(|f| f.port == port).unwrap().frame.clone()
    };
    let notsteered = (Disposition::Drop(DropReason::ApplianceNotSteered), vec![]);
    // Instance 1 sends out instance 0's forward probe: not its own.
    let f0 = into(&l, 0, true);
    assert_eq!(l.send(1, l.ips[1].1, &f0), notsteered);
    // Instance 0 reflects it back out of the side it came in by.
    assert_eq!(l.send(1, l.ips[0].0, &f0), notsteered);
    // A probe with a tag it made up.
    let mut forged = into(&l, 0, false);
    let last = forged.len() - 1;
    forged[last] ^= 0x5a;
    assert_eq!(l.send(1, l.ips[0].0, &forged), notsteered);
    assert_eq!(l.e.service_chains()[0].probes_rejected, 3);
    let mut returns = Vec::new();
    l.e.take_probe_returns(&mut returns);
    assert!(returns.is_empty());
    // Replaying the first round's answers forever does not keep an instance up.
    let (b0, b0r) = (into(&l, 0, true), into(&l, 0, false));
    let mut frames = frames.clone();
    let mut went_down = false;
    for n in 1..=4u64 {
        assert_eq!(
            l.send(n * 500, l.ips[0].1, &b0).0,
            Disposition::Drop(DropReason::ApplianceProbe)
        );
        assert_eq!(
            l.send(n * 500, l.ips[0].0, &b0r).0,
            Disposition::Drop(DropReason::ApplianceProbe)
        );
        let (changes, next) = p.round(&mut l, n * 500, &frames, |x| x == 1);
        went_down |= changes.iter().any(|c| c.instance == 0 && !c.up);
        frames = next;
    }
    assert!(went_down);
}

#[test]
fn a_chain_with_probes_off_is_healthy_on_link_alone_and_sends_none() {
    let loaded = load(&MemorySource::new().with(
        "p.yaml",
        policy("closed").replace("    on_failure: closed\n", "    on_failure: closed\n    probe: off\n"),
    ))
    .unwrap();
    assert!(!loaded.has_errors(), "{}", loaded.render());
    assert_eq!(loaded.model.policy.service_chains[0].probe, None);
    let mut l = lab("closed");
    l.e.update_policy(Box::new(PolicyLookup::new(Compiler::new(loaded.model).unwrap())));
    let mut p = Prober::new(&mut l);
    let (_, frames) = p.round(&mut l, 0, &[], |_| true);
    assert!(frames.is_empty());
    // A stale "down" from before does not matter to an unprobed chain.
    l.e.set_probe_health(0, 0, false);
    assert!(l.e.service_chains()[0].instances[0].up);
}
