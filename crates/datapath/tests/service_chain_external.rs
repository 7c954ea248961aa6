//! External appliances in the engine: a north-south flow from the edge
//! router's leg to a web VM is redirected through one of two appliances
//! reached over the underlay (VXLAN to their address, in the VNI of the side
//! the packet enters); what they send back is matched by (address, VNI),
//! checked as a packet back from an appliance VM, and delivered. The tests
//! play the appliance: they take the encapsulated output, move it to the
//! other side's VNI (a bridge between two VXLAN interfaces) and hand it
//! back as the underlay socket would.

#[path = "support/chain_lab.rs"]
mod chain_lab;

use chain_lab::{MS, ROUTER_MAC, WEB1, WEB1_MAC, WEB2, WEB2_MAC, inbound, inbound_to, outbound, tcp};

use core::net::Ipv4Addr;

use palisade_datapath::port::PortId;
use palisade_datapath::probe::{ProbeChange, ProbeFrame, ProbeKey, ProbeMonitor};
use palisade_datapath::{Disposition, DropReason, Encap, Engine, OffloadVerdict, Output, Results, UPLINK};
use palisade_wire::flow;
use palisade_wire::tcp::TcpFlags;

/// The two instances' underlay addresses; both use VNIs 7001 (in) and 7002 (out).
const APPLIANCES: [Ipv4Addr; 2] = [Ipv4Addr::new(192, 0, 2, 10), Ipv4Addr::new(192, 0, 2, 11)];
const VNI_IN: u32 = 7001;
const VNI_OUT: u32 = 7002;
/// Another host, where web-2 runs.
const H2: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);

fn policy(on_failure: &str) -> String {
    format!(
        r#"
version: 1
datacenter: {{ name: dc1, default: deny }}
zones: [{{ name: web, vlan: 100 }}]
vms:
  - {{ name: web-1, uuid: 00000000-0000-4000-8000-000000000001, tags: {{ tier: web }}, vnics: [{{ name: web-1.0, mac: "02:00:00:00:00:01", ips: [10.0.0.1], zone: web }}] }}
  - {{ name: web-2, uuid: 00000000-0000-4000-8000-000000000002, tags: {{ tier: web }}, vnics: [{{ name: web-2.0, mac: "02:00:00:00:00:02", ips: [10.0.0.2], zone: web }}] }}
groups:
  web: {{ tags: {{ tier: web }} }}
  internet: external
service_chains:
  ns-ext:
    on_failure: {on_failure}
    appliances:
      - {{ external: {{ address: 192.0.2.10, vni_in: 7001, vni_out: 7002 }} }}
      - {{ external: {{ address: 192.0.2.11, vni_in: 7001, vni_out: 7002 }} }}
rules:
  zone:web:
    - {{ id: web-in, from: internet, to: web, service: tcp/80, action: allow, redirect: ns-ext }}
    - {{ id: web-east-west, from: web, to: web, service: tcp/80, action: allow }}
"#
    )
}

/// What the engine did with one frame: its disposition, its outputs, and
/// for each output the bytes it sends (an encapsulated one: the underlay
/// datagram's payload, VXLAN header first).
#[derive(Debug)]
struct Sent {
    disposition: Disposition,
    outputs: Vec<Output>,
    payloads: Vec<Vec<u8>>,
}

impl Sent {
    fn ports(&self) -> Vec<PortId> {
        self.outputs.iter().map(|o| o.port).collect()
    }

    /// The one output, which must be into an external appliance: its
    /// encapsulation and payload.
    fn tunnel(&self) -> (Encap, Vec<u8>) {
        assert_eq!(self.disposition, Disposition::Forward, "{self:?}");
        assert_eq!(self.outputs.len(), 1, "{self:?}");
        let encap = self.outputs[0].encap.expect("encapsulated");
        assert_eq!(self.outputs[0].port, UPLINK);
        (encap, self.payloads[0].clone())
    }
}

struct Lab {
    e: Engine,
    router: PortId,
    web1: PortId,
    results: Results,
}

fn lab(on_failure: &str) -> Lab {
    let (mut e, model) = chain_lab::engine(policy(on_failure));
    let web1 = chain_lab::add_vnic(&mut e, &model, "web-1.0");
    let router = chain_lab::add_router_leg(&mut e, ROUTER_MAC);
    Lab {
        e,
        router,
        web1,
        results: Results::default(),
    }
}

/// The VNI of an underlay payload (VXLAN header first).
fn vni_of(payload: &[u8]) -> u32 {
    u32::from_be_bytes([0, payload[4], payload[5], payload[6]])
}

/// `payload` with its VNI set to `vni`.
fn with_vni(payload: &[u8], vni: u32) -> Vec<u8> {
    let mut p = payload.to_vec();
    p[4..7].copy_from_slice(&vni.to_be_bytes()[1..]);
    p
}

/// The appliance's bridge: what entered in one side's VNI leaves in the other's.
fn bridged(payload: &[u8]) -> Vec<u8> {
    let other = if vni_of(payload) == VNI_IN { VNI_OUT } else { VNI_IN };
    with_vni(payload, other)
}

/// An underlay payload for `frame` in `vni` (a plain VXLAN header).
fn vxlan(vni: u32, frame: &[u8]) -> Vec<u8> {
    let mut p = vec![0x08, 0, 0, 0, 0, 0, 0, 0];
    p.extend_from_slice(frame);
    with_vni(&p, vni)
}

impl Lab {
    fn sent(&mut self, p: palisade_datapath::Processed<'_>) -> Sent {
        let mut payloads = Vec::new();
        for o in p.outputs {
            let mut buf = vec![0u8; 2048];
            let n = match &o.encap {
                Some(encap) => palisade_datapath::render_overlay(&p, encap, &mut buf).unwrap(),
                None => palisade_datapath::render(&p, o, &mut buf).unwrap(),
            };
            buf.truncate(n);
            payloads.push(buf);
        }
        Sent {
            disposition: p.disposition,
            outputs: p.outputs.to_vec(),
            payloads,
        }
    }

    /// Process `frame` from vNIC port `port` at `now` ms.
    fn send(&mut self, now: u64, port: PortId, frame: &[u8]) -> Sent {
        let mut results = std::mem::take(&mut self.results);
        let p = self
            .e
            .process(now * MS, port, frame, &mut chain_lab::NoEvents, &mut results);
        let s = self.sent(p);
        self.results = results;
        s
    }

    /// Process an underlay payload from `remote` at `now` ms.
    fn receive_underlay(&mut self, now: u64, remote: Ipv4Addr, payload: &[u8]) -> Sent {
        let mut results = std::mem::take(&mut self.results);
        let p = self
            .e
            .process_overlay(now * MS, remote, payload, &mut chain_lab::NoEvents, &mut results);
        let s = self.sent(p);
        self.results = results;
        s
    }

    /// The instance (index) whose address an encapsulation goes to.
    fn instance_of(encap: &Encap) -> usize {
        APPLIANCES
            .iter()
            .position(|a| *a == encap.remote)
            .unwrap_or_else(|| panic!("{encap:?} goes to no appliance"))
    }

    /// A full handshake from the client to web-1 through the chain; returns
    /// the instance it met (both directions, every packet).
    fn handshake(&mut self, now: u64, sport: u16) -> usize {
        let syn = inbound(sport, (100, 0), TcpFlags::SYN);
        let (encap, payload) = self.send(now, self.router, &syn).tunnel();
        let i = Lab::instance_of(&encap);
        // Into the `in` side, as a plain data packet: no policy claims.
        assert_eq!((encap.vni, encap.policy_applied, encap.group_id), (VNI_IN, false, 0));
        let back = self.receive_underlay(now, APPLIANCES[i], &bridged(&payload));
        assert_eq!(
            (back.disposition, back.ports()),
            (Disposition::Forward, vec![self.web1])
        );
        assert_eq!(back.payloads[0], syn, "delivered as it was sent");
        let syn_ack = outbound(sport, (500, 101), TcpFlags::SYN | TcpFlags::ACK);
        let (encap, payload) = self.send(now, self.web1, &syn_ack).tunnel();
        assert_eq!(
            (encap.remote, encap.vni),
            (APPLIANCES[i], VNI_OUT),
            "the same instance, its out side"
        );
        let back = self.receive_underlay(now, APPLIANCES[i], &bridged(&payload));
        assert_eq!(
            (back.disposition, back.ports()),
            (Disposition::Forward, vec![self.router])
        );
        let ack = inbound(sport, (101, 501), TcpFlags::ACK);
        let (encap, payload) = self.send(now, self.router, &ack).tunnel();
        assert_eq!((encap.remote, encap.vni), (APPLIANCES[i], VNI_IN));
        let back = self.receive_underlay(now, APPLIANCES[i], &bridged(&payload));
        assert_eq!(back.ports(), vec![self.web1]);
        i
    }
}

fn routing(mut key: flow::FlowKey) -> flow::FlowKey {
    key.segment = palisade_datapath::ROUTING_DOMAIN;
    key
}

#[test]
fn north_south_crosses_one_external_instance_both_ways_and_east_west_does_not() {
    let mut l = lab("closed");
    let before = l.e.counters().classifications;
    let i = l.handshake(1, 40000);
    assert_eq!(
        l.e.counters().classifications - before,
        1,
        "classified once, on the SYN"
    );
    let chain = &l.e.service_chains()[0];
    let inst = &chain.instances[i];
    assert_eq!((inst.sent, inst.returned, inst.flows), (3, 3, 1));
    assert_eq!(chain.instances[1 - i].sent, 0);
    assert!(inst.up && inst.link_up, "an external instance has no link to lose");
    assert_eq!(inst.external.unwrap().address, APPLIANCES[i]);
    // The connection (and so its flow record) names the appliance by address.
    let key = flow::extract(&inbound(40000, (0, 0), TcpFlags::ACK)[..])
        .unwrap()
        .unwrap()
        .key;
    let slot = l.e.conntrack().find(&routing(key)).unwrap();
    let steer = l.e.conntrack().get(slot).unwrap().steer.unwrap();
    let address = APPLIANCES[i].to_string();
    assert_eq!(l.e.appliances_of(&steer), Some(("ns-ext", vec![address.as_str()])));

    // East-west (web-2, attached here too, to web-1) is allowed without a
    // redirect: straight to web-1, never into a tunnel.
    let web2 = chain_lab::add_vnic(&mut l.e, &model_of_lab(), "web-2.0");
    let sent_before: u64 = l.e.service_chains()[0].instances.iter().map(|i| i.sent).sum();
    let ew = tcp((WEB2_MAC, WEB2, 5555), (WEB1_MAC, WEB1, 80), (1, 0), TcpFlags::SYN);
    let s = l.send(2, web2, &ew);
    assert_eq!((s.disposition, s.ports()), (Disposition::Forward, vec![l.web1]));
    let reply = tcp(
        (WEB1_MAC, WEB1, 80),
        (WEB2_MAC, WEB2, 5555),
        (9, 2),
        TcpFlags::SYN | TcpFlags::ACK,
    );
    let s = l.send(2, l.web1, &reply);
    assert_eq!((s.disposition, s.ports()), (Disposition::Forward, vec![web2]));
    let sent_after: u64 = l.e.service_chains()[0].instances.iter().map(|i| i.sent).sum();
    assert_eq!(sent_before, sent_after, "east-west traffic never reaches an appliance");
}

/// The model the lab's engine runs (to attach more of its vNICs).
fn model_of_lab() -> palisade_policy::model::Model {
    chain_lab::engine(policy("closed")).1
}

#[test]
fn both_directions_of_every_connection_meet_the_same_instance_and_flows_spread() {
    let mut l = lab("closed");
    let mut met = [0usize; 2];
    for sport in 41000..41032 {
        met[l.handshake(1, sport)] += 1;
    }
    assert!(met[0] > 0 && met[1] > 0, "the hash spreads connections: {met:?}");
    let flows: Vec<u64> = l.e.service_chains()[0].instances.iter().map(|i| i.flows).collect();
    assert_eq!(flows, [met[0] as u64, met[1] as u64]);
}

#[test]
fn what_comes_back_is_checked_as_from_an_appliance_vm() {
    let mut l = lab("closed");
    let i = l.handshake(1, 40100);
    let notsteered = Disposition::Drop(DropReason::ApplianceNotSteered);
    let data = inbound(40100, (101, 501), TcpFlags::ACK | TcpFlags::PSH);
    let (_, payload) = l.send(2, l.router, &data).tunnel();
    // Back on the side it entered by (reflected): refused.
    assert_eq!(l.receive_underlay(2, APPLIANCES[i], &payload).disposition, notsteered);
    // From the other instance, which the flow is not steered through: refused.
    assert_eq!(
        l.receive_underlay(2, APPLIANCES[1 - i], &bridged(&payload)).disposition,
        notsteered
    );
    // A flow it made up: refused, and it opens nothing.
    let conns = l.e.conntrack().len();
    let made_up = inbound(40999, (7, 0), TcpFlags::SYN);
    assert_eq!(
        l.receive_underlay(2, APPLIANCES[i], &vxlan(VNI_OUT, &made_up))
            .disposition,
        notsteered
    );
    assert_eq!(l.e.conntrack().len(), conns);
    // Not IP (its bridge's ARP): refused.
    let mut arp = made_up.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    assert_eq!(
        l.receive_underlay(2, APPLIANCES[i], &vxlan(VNI_OUT, &arp)).disposition,
        notsteered
    );
    // The appliance's VNI from an address that is not the appliance's: not
    // taken for it (and it is no segment's VNI either).
    assert_eq!(
        l.receive_underlay(2, Ipv4Addr::new(192, 0, 2, 99), &bridged(&payload))
            .disposition,
        Disposition::Drop(DropReason::UnknownVni)
    );
    // The genuine return still goes on.
    assert_eq!(
        l.receive_underlay(2, APPLIANCES[i], &bridged(&payload)).ports(),
        vec![l.web1]
    );
    // Offloaded (allow): later packets go straight to web-1, and the
    // appliance can no longer send the flow's packets back.
    let key = flow::extract(&data[..]).unwrap().unwrap().key;
    l.e.offload_flow(&key, OffloadVerdict::Allow).unwrap();
    let s = l.send(3, l.router, &data);
    assert_eq!((s.disposition, s.ports()), (Disposition::Forward, vec![l.web1]));
    assert_eq!(
        l.receive_underlay(3, APPLIANCES[i], &bridged(&payload)).disposition,
        notsteered
    );
}

#[test]
fn a_destination_on_another_host_is_reached_after_the_appliance() {
    let mut l = lab("closed");
    // web-2 lives on host h2: the switch learns its MAC from h2's frame (an
    // ARP request in web's VNI, 100).
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&WEB2_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&WEB2_MAC);
    arp.extend_from_slice(&WEB2.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&[10, 0, 0, 254]);
    let s = l.receive_underlay(1, H2, &vxlan(100, &arp));
    assert_eq!(s.disposition, Disposition::Forward, "{s:?}");
    let syn = inbound_to((WEB2_MAC, WEB2), 42000, (100, 0), TcpFlags::SYN);
    let (encap, payload) = l.send(2, l.router, &syn).tunnel();
    let i = Lab::instance_of(&encap);
    let back = l.receive_underlay(2, APPLIANCES[i], &bridged(&payload));
    assert_eq!(back.disposition, Disposition::Forward, "{back:?}");
    let to = back.outputs[0].encap.expect("to h2, encapsulated");
    // To h2 in web's VNI, with the policy-applied bit: classified here.
    assert_eq!((to.remote, to.vni, to.policy_applied), (H2, 100, true));
}

/// The probe monitor and the appliances' behaviour towards probes.
struct Prober {
    monitor: ProbeMonitor,
}

impl Prober {
    fn new(l: &mut Lab) -> Prober {
        let key = ProbeKey::random();
        l.e.set_probe_key(key.clone());
        Prober {
            monitor: ProbeMonitor::new(key),
        }
    }

    /// One round at `now` ms: the appliances forward the last round's
    /// frames as `forwards(instance)` says; returns the health changes
    /// (given to the engine) and the new round's frames.
    fn round(
        &mut self,
        l: &mut Lab,
        now: u64,
        frames: &[ProbeFrame],
        forwards: impl Fn(usize) -> bool,
    ) -> (Vec<ProbeChange>, Vec<ProbeFrame>) {
        for f in frames {
            let remote = f.remote.expect("probes to an external appliance go over the underlay");
            assert_eq!(f.port, UPLINK);
            let i = APPLIANCES.iter().position(|a| *a == remote).unwrap();
            if !forwards(i) {
                continue;
            }
            let s = l.receive_underlay(now, remote, &bridged(&f.frame));
            assert_eq!(
                (s.disposition, s.outputs.len()),
                (Disposition::Drop(DropReason::ApplianceProbe), 0),
                "a probe back is consumed, never delivered"
            );
        }
        chain_lab::probe_tick(&mut l.e, &mut self.monitor, now)
    }
}

#[test]
fn probes_go_through_each_tunnel_both_ways_and_are_consumed() {
    let mut l = lab("closed");
    let mut p = Prober::new(&mut l);
    let (changes, frames) = p.round(&mut l, 0, &[], |_| true);
    assert!(changes.is_empty());
    // Two instances, one probe into each side: VXLAN in that side's VNI, to its address.
    let mut into: Vec<(Ipv4Addr, u32)> = frames.iter().map(|f| (f.remote.unwrap(), vni_of(&f.frame))).collect();
    into.sort();
    assert_eq!(
        into,
        [
            (APPLIANCES[0], VNI_IN),
            (APPLIANCES[0], VNI_OUT),
            (APPLIANCES[1], VNI_IN),
            (APPLIANCES[1], VNI_OUT)
        ]
    );
    // A plain VXLAN header (flags: I only), then the probe frame.
    assert!(frames.iter().all(|f| f.frame[0] == 0x08 && f.frame.len() == 8 + 74));
    let (changes, _) = p.round(&mut l, 500, &frames, |_| true);
    assert!(changes.is_empty());
    let chain = &l.e.service_chains()[0];
    assert!(
        chain
            .instances
            .iter()
            .all(|i| i.up && i.probe_up && i.probes_returned == 2)
    );
}

#[test]
fn a_probe_reflected_forged_or_from_elsewhere_does_not_count() {
    let mut l = lab("closed");
    let mut p = Prober::new(&mut l);
    let (_, frames) = p.round(&mut l, 0, &[], |_| true);
    let forward0 = frames
        .iter()
        .find(|f| f.remote == Some(APPLIANCES[0]) && vni_of(&f.frame) == VNI_IN)
        .unwrap()
        .frame
        .clone();
    let notsteered = Disposition::Drop(DropReason::ApplianceNotSteered);
    // Reflected: back in the VNI it entered by.
    assert_eq!(l.receive_underlay(1, APPLIANCES[0], &forward0).disposition, notsteered);
    // Out of the other instance: not its probe.
    assert_eq!(
        l.receive_underlay(1, APPLIANCES[1], &bridged(&forward0)).disposition,
        notsteered
    );
    // A tag made up.
    let mut forged = bridged(&forward0);
    let last = forged.len() - 1;
    forged[last] ^= 0x5a;
    assert_eq!(l.receive_underlay(1, APPLIANCES[0], &forged).disposition, notsteered);
    assert_eq!(l.e.service_chains()[0].probes_rejected, 3);
    // From an address that is no appliance's: not even matched.
    assert_eq!(
        l.receive_underlay(1, Ipv4Addr::new(192, 0, 2, 99), &bridged(&forward0))
            .disposition,
        Disposition::Drop(DropReason::UnknownVni)
    );
    let mut returns = Vec::new();
    l.e.take_probe_returns(&mut returns);
    assert!(returns.is_empty());
}

/// Both instances stop forwarding: their flows follow `on_failure`; when
/// they answer again, the flow goes through them again.
fn both_down_then_back(on_failure: &str) {
    let mut l = lab(on_failure);
    let mut p = Prober::new(&mut l);
    let i = l.handshake(1, 40300);
    let (_, mut frames) = p.round(&mut l, 0, &[], |_| true);
    // Instance i alone stops: after 3 lost rounds (the default) it is down
    // and its connection fails over to the other.
    for n in 1..=3u64 {
        let (changes, next) = p.round(&mut l, n * 500, &frames, |x| x != i);
        frames = next;
        assert_eq!(changes.len(), usize::from(n == 3), "round {n}: {changes:?}");
    }
    assert!(!l.e.service_chains()[0].instances[i].up);
    let data = inbound(40300, (101, 501), TcpFlags::ACK | TcpFlags::PSH);
    let (encap, _) = l.send(1600, l.router, &data).tunnel();
    assert_eq!(encap.remote, APPLIANCES[1 - i], "failed over");
    assert_eq!(l.e.service_chains()[0].failovers, 1);
    // Now neither forwards.
    for n in 4..=6u64 {
        let (_, next) = p.round(&mut l, n * 500, &frames, |_| false);
        frames = next;
    }
    assert!(l.e.service_chains()[0].instances.iter().all(|x| !x.up));
    let s = l.send(3100, l.router, &data);
    match on_failure {
        "closed" => {
            assert_eq!(s.disposition, Disposition::Drop(DropReason::ApplianceDown));
            assert_eq!(l.e.service_chains()[0].dropped, 1);
        }
        _ => {
            assert_eq!(
                (s.disposition, s.ports()),
                (Disposition::Forward, vec![l.web1]),
                "bypassed"
            );
            assert_eq!(l.e.service_chains()[0].bypassed, 1);
        }
    }
    // Both answer again: up after 2 answered rounds, and the flow goes
    // through an appliance again.
    for n in 7..=8u64 {
        let (_, next) = p.round(&mut l, n * 500, &frames, |_| true);
        frames = next;
    }
    assert!(l.e.service_chains()[0].instances.iter().all(|x| x.up));
    let (encap, payload) = l.send(4100, l.router, &data).tunnel();
    assert!(APPLIANCES.contains(&encap.remote));
    let remote = encap.remote;
    assert_eq!(
        l.receive_underlay(4100, remote, &bridged(&payload)).ports(),
        vec![l.web1]
    );
}

#[test]
fn with_its_appliances_silent_a_closed_chain_blocks_and_traffic_resumes_through_them() {
    both_down_then_back("closed");
}

#[test]
fn with_its_appliances_silent_an_open_chain_passes_and_traffic_resumes_through_them() {
    both_down_then_back("open");
}

#[test]
fn a_chain_mixing_a_vm_stage_and_an_external_stage_crosses_both_in_order_and_back_in_reverse() {
    let yaml = policy("closed")
        .replace(
            "groups:",
            "  - name: fw-1\n    uuid: 00000000-0000-4000-8000-000000000009\n    vnics:\n      - { name: fw-1.in, mac: \"02:00:00:00:09:01\", ips: [], zone: web }\n      - { name: fw-1.out, mac: \"02:00:00:00:09:02\", ips: [], zone: web }\ngroups:",
        )
        .replace(
            "    appliances:\n      - { external: { address: 192.0.2.10, vni_in: 7001, vni_out: 7002 } }\n      - { external: { address: 192.0.2.11, vni_in: 7001, vni_out: 7002 } }\n",
            "    stages:\n      - appliances: [{ vm: fw-1, in: fw-1.in, out: fw-1.out }]\n      - appliances: [{ external: { address: 192.0.2.10, vni_in: 7001, vni_out: 7002 } }]\n",
        );
    let (mut e, model) = chain_lab::engine(yaml);
    let web1 = chain_lab::add_vnic(&mut e, &model, "web-1.0");
    let fw_in = chain_lab::add_vnic(&mut e, &model, "fw-1.in");
    let fw_out = chain_lab::add_vnic(&mut e, &model, "fw-1.out");
    let router = chain_lab::add_router_leg(&mut e, ROUTER_MAC);
    let mut l = Lab {
        e,
        router,
        web1,
        results: Results::default(),
    };
    let syn = inbound(43000, (100, 0), TcpFlags::SYN);
    // Stage 1, the VM; then stage 2, the external appliance; then web-1.
    assert_eq!(l.send(1, router, &syn).ports(), vec![fw_in]);
    let (encap, payload) = l.send(1, fw_out, &syn).tunnel();
    assert_eq!((encap.remote, encap.vni), (APPLIANCES[0], VNI_IN));
    assert_eq!(
        l.receive_underlay(1, APPLIANCES[0], &bridged(&payload)).ports(),
        vec![web1]
    );
    // The reply: the external appliance first (its out side), then the VM.
    let syn_ack = outbound(43000, (500, 101), TcpFlags::SYN | TcpFlags::ACK);
    let (encap, payload) = l.send(1, web1, &syn_ack).tunnel();
    assert_eq!(encap.vni, VNI_OUT);
    assert_eq!(
        l.receive_underlay(1, APPLIANCES[0], &bridged(&payload)).ports(),
        vec![fw_out]
    );
    assert_eq!(l.send(1, fw_in, &syn_ack).ports(), vec![router]);
}
