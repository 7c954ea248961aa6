//! What the agent's tests share: a policy with VMs on one host, its engine,
//! and hand-built frames between the VMs.
#![allow(dead_code)]

use std::net::Ipv4Addr;

use palisade_datapath::host::{self, HostEngine, HostPorts};
use palisade_datapath::port::UplinkConfig;
use palisade_datapath::{EngineConfig, PolicyLookup};
use palisade_policy::compile::Compiler;
use palisade_policy::{MemorySource, load};
use palisade_wire::ethernet::EthernetAddress;
use palisade_wire::tcp::TcpFlags;

/// The policy's version.
pub const VERSION: u64 = 3;

/// A policy with `vms` VMs on host `hv1` (`vm-0` … in zone `web`; even ones
/// tagged `tier: web`, odd ones `tier: db`) and one VM, `far`, on `hv2`.
/// Web-tier VMs may open tcp/5432 to db-tier ones (a zone rule); telnet is
/// denied everywhere (a datacenter rule); the rest is denied by default.
pub fn policy(vms: usize) -> String {
    let mut text = format!(
        "version: {VERSION}\n\
         datacenter: {{ name: dc1, default: deny }}\n\
         zones: [{{ name: web, vlan: 100 }}]\n\
         groups: {{ web-tier: {{ tags: {{ tier: web }} }}, db-tier: {{ tags: {{ tier: db }} }} }}\n\
         rules:\n  datacenter:\n    - {{ id: no-telnet, from: any, to: any, service: tcp/23, action: deny }}\n  \
         zone:web:\n    - {{ id: web-to-db, from: web-tier, to: db-tier, service: tcp/5432, action: allow }}\n\
         vms:\n"
    );
    for i in 0..vms {
        let tier = if i % 2 == 0 { "web" } else { "db" };
        text += &format!(
            "  - {{ name: vm-{i}, uuid: 00000000-0000-4000-8000-{:012}, host: hv1, tags: {{ tier: {tier} }}, \
             vnics: [{{ name: vm-{i}.0, mac: \"{}\", ips: [{}], zone: web }}] }}\n",
            i,
            mac(i),
            ip(i)
        );
    }
    text += "  - { name: far, uuid: 00000000-0000-4000-8000-0000000000ff, host: hv2, tags: { tier: db }, \
             vnics: [{ name: far.0, mac: \"02:00:00:00:00:ff\", ips: [10.0.1.1], zone: web }] }\n";
    text
}

/// The compiled [`policy`].
pub fn compiler(vms: usize) -> Compiler {
    let loaded = load(&MemorySource::new().with("p.yaml", policy(vms))).unwrap();
    assert!(!loaded.has_errors(), "{}", loaded.render());
    Compiler::new(loaded.model).unwrap()
}

/// VM `i`'s MAC.
pub fn mac(i: usize) -> EthernetAddress {
    EthernetAddress([2, 0, 0, 0, 1, i as u8])
}

/// VM `i`'s address.
pub fn ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, 10 + i as u8)
}

/// An engine for `hv1` with its VMs' vNICs (vNIC `i` is port `ports[i]`).
pub fn engine(compiler: &Compiler) -> HostEngine {
    let ports = HostPorts {
        host: "hv1".into(),
        vnics: None,
        appliances: Vec::new(),
        extra_macs: Vec::new(),
        strict_zones: Vec::new(),
        max_conns: 1000,
    };
    let uplink = UplinkConfig {
        local_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 1]),
        local_ip: Ipv4Addr::new(192, 168, 0, 1),
        gateway_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 0xfe]),
        flood: Vec::new(),
    };
    host::build(
        &ports,
        EngineConfig::new(uplink),
        compiler.model(),
        Box::new(PolicyLookup::new(compiler.clone())),
    )
    .unwrap()
}

/// A TCP segment from VM `from` to VM `to` (no payload, window 64000).
pub fn tcp_frame(from: usize, to: usize, sport: u16, dport: u16, flags: TcpFlags, seq: u32, ack: u32) -> Vec<u8> {
    tcp_between((mac(from), ip(from), sport), (mac(to), ip(to), dport), flags, seq, ack)
}

/// A TCP segment between two (MAC, address, port) ends.
pub fn tcp_between(
    (src_mac, src, sport): (EthernetAddress, Ipv4Addr, u16),
    (dst_mac, dst, dport): (EthernetAddress, Ipv4Addr, u16),
    flags: TcpFlags,
    seq: u32,
    ack: u32,
) -> Vec<u8> {
    palisade_testkit::engine::tcp_v4_frame((src_mac.0, src, sport), (dst_mac.0, dst, dport), (seq, ack), flags, &[])
}

/// A SYN from VM `from` to VM `to`.
pub fn syn(from: usize, to: usize, sport: u16, dport: u16) -> Vec<u8> {
    tcp_frame(from, to, sport, dport, TcpFlags::SYN, 1000, 0)
}

/// A free UDP port on 127.0.0.1 (the agent's underlay socket binds it).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An agent configuration for host `hv1` with one worker, its policy in
/// `dir/policy`, its state in `dir/state`, no ports, and its underlay on a
/// free local UDP port.
pub fn agent_config(dir: &std::path::Path) -> palisade_agent::AgentConfig {
    let text = format!(
        "host = \"hv1\"\npolicy = \"{}\"\nstate_dir = \"{}\"\nworkers = 1\n\
         [underlay]\nlocal = \"127.0.0.1\"\nport = {}\n",
        dir.join("policy").display(),
        dir.join("state").display(),
        free_udp_port()
    );
    palisade_agent::AgentConfig::parse(&text, std::path::Path::new("hv1.toml")).unwrap()
}
