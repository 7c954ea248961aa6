//! Service chains of several stages in the engine: frames in, outputs
//! checked. A north-south flow from the edge router's leg to a web VM is
//! redirected through a chain of two stages, a firewall stage (`fw-1`,
//! `fw-2`) then an IPS stage (`ips-1`, `ips-2`): the initiator's packets
//! cross them in that order, the responder's in reverse, each stage through
//! the same instance both ways.

#[path = "support/chain_lab.rs"]
mod chain_lab;

use chain_lab::{ROUTER_MAC, inbound, outbound};

use palisade_datapath::port::PortId;
use palisade_datapath::{Disposition, DropReason, Engine, OffloadVerdict, Results};
use palisade_wire::flow::{self, FlowKey};
use palisade_wire::tcp::TcpFlags;

fn appliance_vm(name: &str, n: u8) -> String {
    format!(
        r#"  - name: {name}
    uuid: 00000000-0000-4000-8000-0000000001{n:02x}
    vnics:
      - {{ name: {name}.in, mac: "02:00:00:00:{n:02x}:01", ips: [], zone: svc }}
      - {{ name: {name}.out, mac: "02:00:00:00:{n:02x}:02", ips: [], zone: svc }}
"#
    )
}

fn policy(on_failure: &str) -> String {
    let vms: String = ["fw-1", "fw-2", "ips-1", "ips-2"]
        .iter()
        .zip(1u8..)
        .map(|(name, n)| appliance_vm(name, n))
        .collect();
    format!(
        r#"
version: 1
datacenter: {{ name: dc1, default: deny }}
zones: [{{ name: web, vlan: 100 }}, {{ name: svc, vlan: 900 }}]
vms:
  - {{ name: web-1, uuid: 00000000-0000-4000-8000-000000000001, tags: {{ tier: web }}, vnics: [{{ name: web-1.0, mac: "02:00:00:00:00:01", ips: [10.0.0.1], zone: web }}] }}
{vms}groups:
  web: {{ tags: {{ tier: web }} }}
  internet: external
service_chains:
  ns:
    on_failure: {on_failure}
    stages:
      - appliances:
          - {{ vm: fw-1, in: fw-1.in, out: fw-1.out }}
          - {{ vm: fw-2, in: fw-2.in, out: fw-2.out }}
      - appliances:
          - {{ vm: ips-1, in: ips-1.in, out: ips-1.out }}
          - {{ vm: ips-2, in: ips-2.in, out: ips-2.out }}
rules:
  zone:web:
    - {{ id: web-in, from: internet, to: web, service: tcp/80, action: allow, redirect: ns }}
"#
    )
}

/// One appliance instance's (in, out) ports.
type Sides = (PortId, PortId);

struct Lab {
    e: Engine,
    router: PortId,
    web1: PortId,
    /// By stage, each instance's ports.
    stages: [[Sides; 2]; 2],
    results: Results,
}

fn lab(on_failure: &str) -> Lab {
    let (mut e, model) = chain_lab::engine(policy(on_failure));
    let mut add = |name: &str| chain_lab::add_vnic(&mut e, &model, name);
    let web1 = add("web-1.0");
    let mut pair = |vm: &str| (add(&format!("{vm}.in")), add(&format!("{vm}.out")));
    let stages = [[pair("fw-1"), pair("fw-2")], [pair("ips-1"), pair("ips-2")]];
    let router = chain_lab::add_router_leg(&mut e, ROUTER_MAC);
    Lab {
        e,
        router,
        web1,
        stages,
        results: Results::default(),
    }
}

/// The engine's key of the connection a frame belongs to.
fn conn_key(frame: &[u8]) -> FlowKey {
    let mut key = flow::extract(frame).unwrap().unwrap().key;
    key.segment = palisade_datapath::ROUTING_DOMAIN;
    key
}

const FWD: Disposition = Disposition::Forward;

impl Lab {
    /// Process `frame` on `port` at `now` ms: its disposition and the ports it goes to.
    fn send(&mut self, now: u64, port: PortId, frame: &[u8]) -> (Disposition, Vec<PortId>) {
        chain_lab::send(&mut self.e, &mut self.results, now, port, frame)
    }

    /// The instance of `stage` whose in-port (`reply`: out-port) `ports` is.
    fn instance(&self, stage: usize, reply: bool, ports: &[PortId]) -> usize {
        assert_eq!(ports.len(), 1, "{ports:?}");
        self.stages[stage]
            .iter()
            .position(|&(i, o)| ports[0] == if reply { o } else { i })
            .unwrap_or_else(|| panic!("{ports:?} is no port of stage {stage} (reply: {reply})"))
    }

    /// `frame` from the router through both stages to web-1: the instance
    /// of each stage it met.
    fn through_forward(&mut self, now: u64, frame: &[u8]) -> [usize; 2] {
        let (d, to) = self.send(now, self.router, frame);
        assert_eq!(d, FWD);
        let a = self.instance(0, false, &to);
        let (d, to) = self.send(now, self.stages[0][a].1, frame);
        assert_eq!(d, FWD, "back from stage 1");
        let b = self.instance(1, false, &to);
        assert_eq!(
            self.send(now, self.stages[1][b].1, frame),
            (FWD, vec![self.web1]),
            "back from stage 2: delivered"
        );
        [a, b]
    }

    /// `frame` from web-1 through both stages, in reverse, to the router.
    fn through_reply(&mut self, now: u64, frame: &[u8], met: [usize; 2]) {
        let [a, b] = met;
        let (ips, fw) = (self.stages[1][b], self.stages[0][a]);
        assert_eq!(self.send(now, self.web1, frame), (FWD, vec![ips.1]), "stage 2 first");
        assert_eq!(self.send(now, ips.0, frame), (FWD, vec![fw.1]), "then stage 1");
        assert_eq!(self.send(now, fw.0, frame), (FWD, vec![self.router]), "then delivered");
    }

    /// A full handshake through the chain: the instance of each stage it met.
    fn handshake(&mut self, now: u64, sport: u16) -> [usize; 2] {
        let met = self.through_forward(now, &inbound(sport, (100, 0), TcpFlags::SYN));
        self.through_reply(now, &outbound(sport, (500, 101), TcpFlags::SYN | TcpFlags::ACK), met);
        assert_eq!(
            self.through_forward(now, &inbound(sport, (101, 501), TcpFlags::ACK)),
            met,
            "the same instances for the connection's life"
        );
        met
    }
}

#[test]
fn a_two_stage_chain_is_crossed_in_order_then_in_reverse_through_the_same_instances() {
    let mut l = lab("closed");
    let before = l.e.counters().classifications;
    let [a, b] = l.handshake(1, 40000);
    assert_eq!(
        l.e.counters().classifications - before,
        1,
        "classified once, on the SYN"
    );
    let chain = &l.e.service_chains()[0];
    assert_eq!(chain.stages, 2);
    // Flat instance indices: fw-1, fw-2 (stage 0), ips-1, ips-2 (stage 1).
    let stage_of: Vec<u16> = chain.instances.iter().map(|i| i.stage).collect();
    assert_eq!(stage_of, [0, 0, 1, 1]);
    for (n, inst) in chain.instances.iter().enumerate() {
        let met = n == a || n == 2 + b;
        let expect = if met { (3, 3, 1) } else { (0, 0, 0) };
        assert_eq!((inst.sent, inst.returned, inst.flows), expect, "{}", inst.vm);
    }
    let slot =
        l.e.conntrack()
            .find(&conn_key(&inbound(40000, (0, 0), TcpFlags::ACK)))
            .unwrap();
    let steer = l.e.conntrack().get(slot).unwrap().steer.unwrap();
    let (fw, ips) = (["fw-1", "fw-2"][a], ["ips-1", "ips-2"][b]);
    assert_eq!(l.e.appliances_of(&steer), Some(("ns", vec![fw, ips])));
}

#[test]
fn the_stages_pick_their_instances_independently() {
    let mut l = lab("closed");
    let mut seen = [[0usize; 2]; 2];
    for sport in 41000..41064u16 {
        let [a, b] = l.through_forward(1, &inbound(sport, (100, 0), TcpFlags::SYN));
        seen[a][b] += 1;
    }
    assert!(
        seen.iter().flatten().all(|&n| n > 4),
        "64 flows over 2x2 instances: {seen:?}"
    );
}

#[test]
fn a_packet_may_only_come_back_from_its_own_instance_of_the_stage_on_the_side_it_leaves_by() {
    let mut l = lab("closed");
    let [a, b] = l.handshake(1, 40000);
    let not_steered = Disposition::Drop(DropReason::ApplianceNotSteered);
    let data = inbound(40000, (101, 501), TcpFlags::ACK);
    let back = outbound(40000, (501, 101), TcpFlags::ACK);
    let (fw, other_fw) = (l.stages[0][a], l.stages[0][1 - a]);
    let (ips, other_ips) = (l.stages[1][b], l.stages[1][1 - b]);
    let refused = [
        (other_fw.1, &data, "the other instance of stage 1"),
        (other_ips.1, &data, "the other instance of stage 2"),
        (fw.0, &data, "stage 1's instance, wrong side"),
        (ips.0, &data, "stage 2's instance, wrong side"),
        (other_fw.0, &back, "a reply from the other instance of stage 1"),
        (other_ips.0, &back, "a reply from the other instance of stage 2"),
        (fw.1, &back, "a reply from stage 1's instance, wrong side"),
        (ips.1, &back, "a reply from stage 2's instance, wrong side"),
    ];
    let drops = l.e.counters().dropped(DropReason::ApplianceNotSteered);
    for (port, frame, what) in refused {
        assert_eq!(l.send(2, port, frame).0, not_steered, "{what}");
    }
    assert_eq!(
        l.e.counters().dropped(DropReason::ApplianceNotSteered) - drops,
        refused.len() as u64
    );
    // The real ones still pass, each to the next stage.
    assert_eq!(l.send(3, fw.1, &data), (FWD, vec![ips.0]));
    assert_eq!(l.send(3, ips.1, &data), (FWD, vec![l.web1]));
    assert_eq!(l.send(3, ips.0, &back), (FWD, vec![fw.1]));
    assert_eq!(l.send(3, fw.0, &back), (FWD, vec![l.router]));
}

#[test]
fn a_down_instance_fails_over_within_its_stage_only() {
    let mut l = lab("closed");
    let [a, b] = l.handshake(1, 40000);
    let (ips, other_ips) = (l.stages[1][b], l.stages[1][1 - b]);
    l.e.set_port_link(ips.0, false);
    let fw = l.stages[0][a];
    let data = inbound(40000, (101, 501), TcpFlags::ACK);
    assert_eq!(
        l.send(2, l.router, &data),
        (FWD, vec![fw.0]),
        "stage 1 keeps its instance"
    );
    assert_eq!(l.send(2, fw.1, &data), (FWD, vec![other_ips.0]), "stage 2 moves");
    assert_eq!(l.send(2, other_ips.1, &data), (FWD, vec![l.web1]));
    assert_eq!(l.e.service_chains()[0].failovers, 1);
    // The old stage-2 instance may no longer return it.
    assert_eq!(
        l.send(2, ips.1, &data).0,
        Disposition::Drop(DropReason::ApplianceNotSteered)
    );
    l.through_reply(3, &outbound(40000, (501, 101), TcpFlags::ACK), [a, 1 - b]);
}

/// Take every instance of `stage` out of service.
fn stage_down(l: &mut Lab, stage: usize) {
    for (i, o) in l.stages[stage] {
        l.e.set_port_link(i, false);
        l.e.set_port_link(o, false);
    }
}

#[test]
fn an_open_chain_skips_a_stage_with_no_instance_up_and_keeps_the_others() {
    // The second stage down: after the first, straight to the destination.
    let mut l = lab("open");
    stage_down(&mut l, 1);
    let syn = inbound(40000, (100, 0), TcpFlags::SYN);
    let (_, to) = l.send(1, l.router, &syn);
    let a = l.instance(0, false, &to);
    let fw = l.stages[0][a];
    assert_eq!(l.send(1, fw.1, &syn), (FWD, vec![l.web1]));
    // The reply skips it too: straight into the first stage.
    let syn_ack = outbound(40000, (500, 101), TcpFlags::SYN | TcpFlags::ACK);
    assert_eq!(l.send(1, l.web1, &syn_ack), (FWD, vec![fw.1]));
    assert_eq!(l.send(1, fw.0, &syn_ack), (FWD, vec![l.router]));
    assert_eq!(l.e.service_chains()[0].bypassed, 2);
    // It comes back: the flow's next packets cross it again.
    let ips = l.stages[1][1];
    l.e.set_port_link(ips.0, true);
    l.e.set_port_link(ips.1, true);
    assert_eq!(l.through_forward(2, &inbound(40000, (101, 501), TcpFlags::ACK)), [a, 1]);

    // The first stage down: from the router straight into the second.
    let mut l = lab("open");
    stage_down(&mut l, 0);
    let (_, to) = l.send(1, l.router, &syn);
    let b = l.instance(1, false, &to);
    let ips = l.stages[1][b];
    assert_eq!(l.send(1, ips.1, &syn), (FWD, vec![l.web1]));
    assert_eq!(l.send(1, l.web1, &syn_ack), (FWD, vec![ips.1]));
    assert_eq!(l.send(1, ips.0, &syn_ack), (FWD, vec![l.router]), "no stage left");

    // Both down: around the chain.
    let mut l = lab("open");
    stage_down(&mut l, 0);
    stage_down(&mut l, 1);
    assert_eq!(l.send(1, l.router, &syn), (FWD, vec![l.web1]));
    assert_eq!(l.e.service_chains()[0].bypassed, 2, "one per stage skipped");
}

#[test]
fn a_closed_chain_drops_at_a_stage_with_no_instance_up_even_after_earlier_stages() {
    let mut l = lab("closed");
    let [a, _] = l.handshake(1, 40000);
    stage_down(&mut l, 1);
    let fw = l.stages[0][a];
    let data = inbound(40000, (101, 501), TcpFlags::ACK);
    // Stage 1 is up: the packet goes there; coming back, stage 2 has nobody.
    assert_eq!(l.send(2, l.router, &data), (FWD, vec![fw.0]));
    assert_eq!(l.send(2, fw.1, &data).0, Disposition::Drop(DropReason::ApplianceDown));
    // The reply meets stage 2 first: dropped at once.
    let back = outbound(40000, (501, 101), TcpFlags::ACK);
    assert_eq!(l.send(2, l.web1, &back).0, Disposition::Drop(DropReason::ApplianceDown));
    assert_eq!(l.e.service_chains()[0].dropped, 2);
}

#[test]
fn offload_ends_steering_through_every_stage() {
    let mut l = lab("closed");
    let [_, b] = l.handshake(1, 40000);
    let data = inbound(40000, (101, 501), TcpFlags::ACK);
    l.e.offload_flow(&flow::extract(&data[..]).unwrap().unwrap().key, OffloadVerdict::Allow)
        .unwrap();
    let sent = |l: &Lab| -> u64 { l.e.service_chains()[0].instances.iter().map(|i| i.sent).sum() };
    let before = sent(&l);
    assert_eq!(l.send(2, l.router, &data), (FWD, vec![l.web1]));
    let back = outbound(40000, (501, 101), TcpFlags::ACK);
    assert_eq!(l.send(2, l.web1, &back), (FWD, vec![l.router]));
    assert_eq!(sent(&l), before, "no stage sees it");
    // A packet still in an appliance when the offload came is not taken back.
    assert_eq!(
        l.send(2, l.stages[1][b].1, &data).0,
        Disposition::Drop(DropReason::ApplianceNotSteered)
    );
}

#[test]
fn a_refusing_reset_crosses_every_stage_and_ends_the_connection_after_the_last() {
    let mut l = lab("closed");
    let syn = inbound(40100, (100, 0), TcpFlags::SYN);
    let met = l.through_forward(1, &syn);
    let [a, b] = met;
    let key = conn_key(&syn);
    let rst = outbound(40100, (0, 101), TcpFlags::RST | TcpFlags::ACK);
    let (ips, fw) = (l.stages[1][b], l.stages[0][a]);
    assert_eq!(l.send(2, l.web1, &rst), (FWD, vec![ips.1]));
    assert!(
        l.e.conntrack().find(&key).is_some(),
        "kept for its way through the chain"
    );
    assert_eq!(l.send(2, ips.0, &rst), (FWD, vec![fw.1]), "on to stage 1");
    assert!(
        l.e.conntrack().find(&key).is_some(),
        "kept until it is back from the last stage"
    );
    assert_eq!(l.send(2, fw.0, &rst), (FWD, vec![l.router]));
    assert!(l.e.conntrack().find(&key).is_none(), "over once delivered");
}

/// Where a frame may go in a chain of two stages: random frames of a few
/// connections from the router, web-1 and every appliance port, with links
/// going down and up at random. In a `closed` chain nothing skips a stage:
/// the router's packets go only into stage 1, web-1's only into stage 2,
/// each stage's returns only to the next stage in their direction or,
/// after the last, to their destination. In an `open` one a stage may be
/// skipped but never crossed backwards. Nothing from an appliance port
/// opens a connection.
#[test]
fn random_traffic_and_link_changes_never_skip_a_closed_stage_or_go_backwards() {
    for (seed, on_failure) in [(1u64, "closed"), (2, "closed"), (3, "open"), (4, "open")] {
        let mut l = lab(on_failure);
        let closed = on_failure == "closed";
        let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let ins = |st: usize, l: &Lab| -> Vec<PortId> { l.stages[st].iter().map(|p| p.0).collect() };
        let outs = |st: usize, l: &Lab| -> Vec<PortId> { l.stages[st].iter().map(|p| p.1).collect() };
        let mut forwarded = 0;
        for step in 0..4000u64 {
            let sport = 40000 + (next() % 4) as u16;
            let r = next() % 16;
            if r == 0 {
                let (st, i) = ((next() % 2) as usize, (next() % 2) as usize);
                let port = if next() % 2 == 0 {
                    l.stages[st][i].0
                } else {
                    l.stages[st][i].1
                };
                l.e.set_port_link(port, next() % 3 != 0);
                continue;
            }
            let inbound_frame = if next() % 4 == 0 {
                inbound(sport, (100, 0), TcpFlags::SYN)
            } else {
                inbound(sport, (101, 501), TcpFlags::ACK)
            };
            let outbound_frame = if next() % 4 == 0 {
                outbound(sport, (500, 101), TcpFlags::SYN | TcpFlags::ACK)
            } else {
                outbound(sport, (501, 101), TcpFlags::ACK)
            };
            // (port, frame, where it may go)
            let (port, frame, allowed): (PortId, &[u8], Vec<PortId>) = match r {
                1..=4 => {
                    let mut ok = ins(0, &l);
                    if !closed {
                        ok.extend(ins(1, &l));
                        ok.push(l.web1);
                    }
                    (l.router, &inbound_frame, ok)
                }
                5..=8 => {
                    let mut ok = outs(1, &l);
                    if !closed {
                        ok.extend(outs(0, &l));
                        ok.push(l.router);
                    }
                    (l.web1, &outbound_frame, ok)
                }
                _ => {
                    let (st, i) = ((next() % 2) as usize, (next() % 2) as usize);
                    let (pin, pout) = l.stages[st][i];
                    match (next() % 4, st) {
                        // The initiator's packets leave a stage by `out`.
                        (0, 0) => {
                            let mut ok = ins(1, &l);
                            if !closed {
                                ok.push(l.web1);
                            }
                            (pout, &inbound_frame, ok)
                        }
                        (0, _) => (pout, &inbound_frame, vec![l.web1]),
                        // The responder's by `in`.
                        (1, 1) => {
                            let mut ok = outs(0, &l);
                            if !closed {
                                ok.push(l.router);
                            }
                            (pin, &outbound_frame, ok)
                        }
                        (1, _) => (pin, &outbound_frame, vec![l.router]),
                        // The wrong side: never forwarded.
                        (2, _) => (pin, &inbound_frame, vec![]),
                        _ => (pout, &outbound_frame, vec![]),
                    }
                }
            };
            let conns = l.e.conntrack().len();
            let from_appliance = port != l.router && port != l.web1;
            let (d, to) = l.send(1 + step / 100, port, frame);
            if from_appliance {
                assert!(
                    l.e.conntrack().len() <= conns,
                    "seed {seed} step {step}: a return opened a connection"
                );
            }
            if d == Disposition::Forward {
                forwarded += 1;
                assert_eq!(to.len(), 1, "seed {seed} step {step}: {to:?}");
                assert!(
                    allowed.contains(&to[0]),
                    "seed {seed} ({on_failure}) step {step}: from {port:?} to {to:?}, allowed {allowed:?}"
                );
            }
        }
        assert!(forwarded > 500, "seed {seed}: the walk forwards ({forwarded})");
    }
}
