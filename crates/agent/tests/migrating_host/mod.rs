//! A host for the inspection-migration tests and the pause benchmark: an
//! engine with two vNICs of one zone (a.0 10.0.0.10, b.0 10.0.0.11) and one
//! worker's [`Inline`] under a few signatures (a drop marker, a flowbit
//! pair, a once-per-flow alert), with TCP connections a → b:8080 driven
//! frame by frame. Shared by `tests/inspection_migration.rs` and
//! `benches/inspection_pause.rs` so both drive the same hosts.

use core::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

use palisade_agent::inspection::{Inline, InlineSetup, InlineVerdict, Signatures};
use palisade_agent::records::{Clock, Identities};
use palisade_datapath::port::{self, PortId, UplinkConfig};
use palisade_datapath::{Disposition, Engine, EngineConfig, FlowEvent, PolicyLookup, Results};
use palisade_inspect::classification::Classifications;
use palisade_policy::compile::Compiler;
use palisade_policy::model::Model;
use palisade_policy::{MemorySource, load};
use palisade_testkit::engine::tcp_v4_frame;
use palisade_wire::ethernet::EthernetAddress;
use palisade_wire::tcp::TcpFlags;
use palisade_wire::virtio_net::Offload;

pub const POLICY: &str = r#"
version: 1
datacenter: { name: dc1, default: deny }
zones: [{ name: web, vlan: 100 }]
vms:
  - { name: a, uuid: 00000000-0000-4000-8000-00000000000a, host: h1, vnics: [{ name: a.0, mac: "02:00:00:00:00:0a", ips: [10.0.0.10], zone: web }] }
  - { name: b, uuid: 00000000-0000-4000-8000-00000000000b, host: h1, vnics: [{ name: b.0, mac: "02:00:00:00:00:0b", ips: [10.0.0.11], zone: web }] }
groups: { web: { zone: web } }
profiles:
  full: { signatures: [all] }
inspection_defaults: { intra_zone: full }
rules:
  datacenter:
    - { id: full-8080, from: web, to: web, service: tcp/8080, action: allow, inspect: full }
"#;

pub const RULES: &str = r#"
drop tcp any any -> any any (msg:"marker"; flow:to_server,established; content:"evil-7f3a"; sid:1; rev:1;)
alert tcp any any -> any any (msg:"login"; flow:to_server; content:"LOGIN"; flowbits:set,logged; flowbits:noalert; sid:2; rev:1;)
alert tcp any any -> any any (msg:"secret after login"; flow:to_server; content:"SECRET"; flowbits:isset,logged; sid:3; rev:1;)
alert tcp any any -> any any (msg:"once per flow"; flow:to_server; content:"ONCE"; threshold:type limit, track by_flow, count 1, seconds 600; sid:4; rev:1;)
"#;

pub const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
pub const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
pub const MS: u64 = 1_000_000;

/// One host: its engine and one worker's inline inspection.
pub struct Host {
    pub engine: Engine,
    pub inline: Inline,
    pub identities: Identities,
    pub events: Vec<FlowEvent>,
}

pub fn host(model: &Model, name: &str) -> Host {
    host_with(model, name, None)
}

/// [`host`] whose connection table holds at most `conns` (`None`: the default).
pub fn host_with(model: &Model, name: &str, conns: Option<usize>) -> Host {
    let sigs = Signatures::compile(RULES, Path::new("test.rules"), Classifications::default(), false, model).unwrap();
    let compiler = Compiler::new(model.clone()).unwrap();
    let mut config = EngineConfig::new(UplinkConfig {
        local_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 1]),
        local_ip: Ipv4Addr::new(192, 168, 0, 1),
        gateway_mac: EthernetAddress([0x0e, 0, 0, 0, 0, 0xfe]),
        flood: vec![],
    });
    if let Some(n) = conns {
        config.conn_capacity = n;
    }
    let mut engine = Engine::new(config, Box::new(PolicyLookup::new(compiler)));
    for nic in ["a.0", "b.0"] {
        engine
            .add_vnic(port::vnic_from_model(model, nic, &[], 4096).unwrap())
            .unwrap();
    }
    let setup = InlineSetup {
        signatures: Arc::new(sigs),
        budget_bytes_per_s: None,
        stream_memory: 64 << 20,
        max_flows: 4096,
        fail_closed: vec![true; 3].into(),
        host: name.into(),
        clock: Clock { unix_at_zero: 0 },
    };
    Host {
        identities: Identities::new(model),
        engine,
        inline: Inline::new(setup),
        events: Vec::new(),
    }
}

pub fn model() -> Model {
    let loaded = load(&MemorySource::new().with("p.yaml", POLICY.to_string())).unwrap();
    assert!(!loaded.has_errors(), "{}", loaded.render());
    loaded.model
}

pub fn tcp_frame(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    seq: u32,
    ack: u32,
    flags: TcpFlags,
    data: &[u8],
) -> Vec<u8> {
    let end = |(ip, port): (Ipv4Addr, u16)| ([2, 0, 0, 0, 0, ip.octets()[3]], ip, port);
    tcp_v4_frame(end(src), end(dst), (seq, ack), flags, data)
}

/// What became of a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Fate {
    /// The engine dropped it.
    Dropped,
    /// Forwarded by the engine; inline inspection's verdict.
    Inspected(InlineVerdict),
    /// Forwarded, not inspected.
    Uninspected,
}

impl Host {
    pub fn send(&mut self, from: Ipv4Addr, frame: &[u8], now: u64) -> Fate {
        let name = if from == A { "a.0" } else { "b.0" };
        let port: PortId = self.engine.port_of(name).unwrap();
        let mut results = Results::new();
        let p = self
            .engine
            .process_offloaded(now, port, frame, Offload::NONE, &mut self.events, &mut results);
        match p.disposition {
            Disposition::Drop(_) => Fate::Dropped,
            Disposition::Forward if p.inspection().is_some() => {
                Fate::Inspected(
                    self.inline
                        .frame(&mut self.engine, &p, port, now, &self.identities, &mut self.events),
                )
            }
            Disposition::Forward => Fate::Uninspected,
        }
    }

    /// Signature ids of the alert records raised since the last call.
    pub fn alerts(&mut self) -> Vec<u32> {
        self.inline
            .take_records()
            .records
            .iter()
            .map(|r| r.alert.signature_id)
            .collect()
    }
}

/// A connection a:`cport` → b:8080 and its client's next data segment.
#[derive(Debug, Clone)]
pub struct Conn {
    pub cport: u16,
    pub seq: u32,
    pub ack: u32,
}

impl Conn {
    pub fn open(h: &mut Host, cport: u16, now: u64) -> Conn {
        let (c, s) = ((A, cport), (B, 8080));
        for (from, frame) in [
            (A, tcp_frame(c, s, 1000, 0, TcpFlags::SYN, &[])),
            (B, tcp_frame(s, c, 5000, 1001, TcpFlags::SYN | TcpFlags::ACK, &[])),
            (A, tcp_frame(c, s, 1001, 5001, TcpFlags::ACK, &[])),
        ] {
            assert_eq!(h.send(from, &frame, now), Fate::Inspected(InlineVerdict::Forward));
        }
        Conn {
            cport,
            seq: 1001,
            ack: 5001,
        }
    }

    /// The client sends `data` through `h`.
    pub fn send(&mut self, h: &mut Host, data: &[u8], now: u64) -> Fate {
        let f = tcp_frame(
            (A, self.cport),
            (B, 8080),
            self.seq,
            self.ack,
            TcpFlags::ACK | TcpFlags::PSH,
            data,
        );
        self.seq += data.len() as u32;
        h.send(A, &f, now)
    }
}
