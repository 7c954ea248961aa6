//! The properties the `vhost_engine` fuzz target checks (also replayed by
//! `tests/vhost_engine_fuzz_regressions.rs`): a hostile guest's vhost-user
//! queue pair wired to a real firewall engine, as an agent's worker wires them.
//!
//! The input is a program. The guest's side transmits frames (to a local VM,
//! a remote one or a stranger, on allowed and denied services, with any
//! virtio-net header) through descriptor chains it splits as it likes, and
//! also writes raw descriptors, raw ring indices and raw bytes anywhere in
//! its memory (two regions with a hole between them); it posts receive
//! buffers of any size. The device's side drains the transmit queue into
//! the engine ([`Engine::process_batch_offloaded`], the guest's vNIC as the
//! arrival port), and frames from the network (the local VM's vNIC, the
//! uplink) go through the engine too; every frame the engine outputs to the
//! guest's vNIC, and every reply it makes to the guest (a reject), is sent
//! into the guest's receive queue. Rings are stopped and restarted, time
//! passes, QEMU's announcement is injected. After every device step:
//!
//! - nothing panicked, every call returned;
//! - the device wrote guest memory only in the two used rings and in
//!   buffers that a receive descriptor (direct or in an indirect table)
//!   marked device-writable at some point before the step;
//! - each used element of the transmit ring has length 0 (its id is the
//!   head the guest made available, whatever it was); each used element of the receive ring has a
//!   length within what the chain it names could hold when it was made
//!   available (its writable buffers);
//! - every frame the guest finds in its receive buffers is, byte for byte
//!   and in order, a frame the engine forwarded to its vNIC (or a reply it
//!   made), while the guest has not scribbled over its own receive side;
//! - no frame the engine passes from the guest to the local VM, or to the
//!   guest from anywhere, belongs to a service the policy does not allow
//!   (an independent oracle: TCP only with port 443 on one side, or a reset
//!   for the rejected tcp/23; UDP only with port 53; ICMP echo, echo reply,
//!   and errors).
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::OnceLock;

use palisade_datapath::port::{self, PortId, UPLINK, UplinkConfig};
use palisade_datapath::{Disposition, Engine, EngineConfig, FlowEvent, PolicyLookup, Results, render, render_reply};
use palisade_io::vhost_user::features::mask;
use palisade_io::vhost_user::{Delivery, GuestFeatures, Limits, NetRings, RingLayout};
use palisade_policy::compile::Compiler;
use palisade_policy::{MemorySource, load};
use palisade_wire::virtio_net::{Gso, GsoKind, Offload, PartialChecksum, VirtioNetRepr};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

#[path = "../../../io/tests/virtio_driver/mod.rs"]
mod virtio_driver;

use virtio_driver::{DriverRing, F_INDIRECT, F_NEXT, F_WRITE, align};

/// Region 0 holds both rings and the transmit buffers; region 1 the receive buffers.
const REGIONS: [(u64, u64); 2] = [(0x1000, 0x1_0000), (0x2_0000, 0x4000)];
const TX_BUFS: (u64, u64) = (0x4000, 0x1_1000);
const RX_BUFS: (u64, u64) = REGIONS[1];
const HEADER_LEN: usize = 12;
const MAX_STEPS: usize = 128;
const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 10];

const POLICY: &str = r#"
version: 1
datacenter: { name: dc1, default: deny }
zones: [{ name: web, vlan: 100 }]
vms:
  - { name: a, uuid: 00000000-0000-4000-8000-00000000000a, host: h1, vnics: [{ name: a.0, mac: "02:00:00:00:00:0a", ips: [10.0.0.10], zone: web }] }
  - { name: b, uuid: 00000000-0000-4000-8000-00000000000b, host: h1, vnics: [{ name: b.0, mac: "02:00:00:00:00:0b", ips: [10.0.0.11], zone: web }] }
  - { name: c, uuid: 00000000-0000-4000-8000-00000000000c, host: h2, vnics: [{ name: c.0, mac: "02:00:00:00:00:0c", ips: [10.0.0.12], zone: web }] }
groups: { web: { zone: web } }
rules:
  datacenter:
    - { id: https, from: web, to: web, service: tcp/443, action: allow }
    - { id: dns, from: web, to: web, service: udp/53, action: allow }
    - { id: ping, from: web, to: web, service: icmp/echo-request, action: allow }
    - { id: telnet, from: web, to: web, service: [tcp/23, udp/69], action: reject }
"#;

fn compiler() -> &'static Compiler {
    static C: OnceLock<Compiler> = OnceLock::new();
    C.get_or_init(|| {
        let loaded = load(&MemorySource::new().with("p.yaml", POLICY.to_string())).expect("the fuzz policy loads");
        Compiler::new(loaded.model).expect("the fuzz policy compiles")
    })
}

/// Host h1's engine with the guest (a.0) and a local VM (b.0).
fn engine() -> (Engine, PortId, PortId) {
    let cfg = EngineConfig::new(UplinkConfig {
        local_mac: palisade_wire::ethernet::EthernetAddress([0x0e, 0, 0, 0, 0, 1]),
        local_ip: Ipv4Addr::new(192, 168, 0, 1),
        gateway_mac: palisade_wire::ethernet::EthernetAddress([0x0e, 0, 0, 0, 0, 0xfe]),
        flood: vec![Ipv4Addr::new(192, 168, 0, 2)],
    });
    let c = compiler().clone();
    let model = c.model().clone();
    let mut e = Engine::new(cfg, Box::new(PolicyLookup::new(c)));
    let mut add = |name: &str| {
        let vnic = port::vnic_from_model(&model, name, &[], 64).expect("the fuzz policy's vNIC");
        e.add_vnic(vnic).expect("a port for it")
    };
    let (a, b) = (add("a.0"), add("b.0"));
    (e, a, b)
}

/// Reads the program; past its end everything is zero.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

/// A guest address from 16 input bits: mostly in a region, sometimes at its
/// edge, in the hole, or at the ends of the address space.
fn hostile_addr(v: u16) -> u64 {
    match v >> 14 {
        0 | 1 => REGIONS[0].0 + u64::from(v & 0x7fff) * 2,
        2 => REGIONS[1].0 + u64::from(v & 0x3fff),
        _ => match v & 3 {
            0 => 0,
            1 => REGIONS[0].0 + REGIONS[0].1 - u64::from(v >> 2 & 0xff),
            2 => REGIONS[1].0 - 8,
            _ => u64::MAX - u64::from(v >> 2 & 0xff),
        },
    }
}

/// Which region byte `at` is, and its offset there.
fn locate(at: u64) -> Option<(usize, usize)> {
    REGIONS
        .iter()
        .enumerate()
        .find_map(|(i, &(base, len))| (at >= base && at < base + len).then(|| (i, (at - base) as usize)))
}

fn snapshot(mem: &GuestMemoryMmap) -> Vec<Vec<u8>> {
    REGIONS
        .iter()
        .map(|&(base, len)| {
            let mut v = vec![0u8; len as usize];
            mem.read_slice(&mut v, GuestAddress(base)).expect("region");
            v
        })
        .collect()
}

fn read(snap: &[Vec<u8>], at: u64, len: u64) -> Option<&[u8]> {
    REGIONS.iter().zip(snap).find_map(|(&(base, size), bytes)| {
        let off = at.checked_sub(base)?;
        let end = off.checked_add(len)?;
        (end <= size).then(|| &bytes[off as usize..end as usize])
    })
}

/// Descriptor `i` of the table at `table`: (address, length, flags, next).
fn desc(snap: &[Vec<u8>], table: u64, i: u64) -> Option<(u64, u32, u16, u16)> {
    let b = read(snap, table.checked_add(16 * i)?, 16)?;
    Some((
        u64::from_le_bytes(b[0..8].try_into().ok()?),
        u32::from_le_bytes(b[8..12].try_into().ok()?),
        u16::from_le_bytes([b[12], b[13]]),
        u16::from_le_bytes([b[14], b[15]]),
    ))
}

/// The device-writable buffers of the chain at `head` (direct and in
/// indirect tables, followed loosely: every writable buffer the device could
/// reach by any reading of the chain), and their total length.
fn writable(snap: &[Vec<u8>], layout: &RingLayout, head: u16) -> (Vec<(u64, u64)>, u64) {
    let mut out = Vec::new();
    let mut total = 0u64;
    let size = u64::from(layout.size);
    let mut walk = |table: u64, entries: u64, first: u64, out: &mut Vec<(u64, u64)>, nested: bool| {
        let mut i = first;
        let mut indirect = Vec::new();
        for _ in 0..entries {
            let Some((addr, len, flags, next)) = desc(snap, table, i) else {
                break;
            };
            if flags & F_INDIRECT != 0 && !nested {
                indirect.push((addr, u64::from(len) / 16));
            } else if flags & F_WRITE != 0 {
                out.push((addr, u64::from(len)));
                total += u64::from(len);
            }
            if flags & F_NEXT == 0 {
                break;
            }
            i = u64::from(next) % entries.max(1);
        }
        indirect
    };
    for (table, entries) in walk(layout.desc_table, size, u64::from(head) % size.max(1), &mut out, false) {
        walk(table, entries.min(256), 0, &mut out, true);
    }
    (out, total)
}

/// Whether a frame the engine passed between the guest and the local VM is
/// of a service the policy allows (see the module documentation).
fn allowed_by_policy(frame: &[u8]) -> Result<(), String> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return Ok(());
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let (proto, l4) = (frame[23], frame.get(14 + ihl..).unwrap_or(&[]));
    let ports = (l4.len() >= 4).then(|| (u16::from_be_bytes([l4[0], l4[1]]), u16::from_be_bytes([l4[2], l4[3]])));
    let ok = match (proto, ports) {
        (6, Some((s, d))) => {
            s == 443 || d == 443 || ((s == 23 || d == 23) && l4.get(13).is_some_and(|f| f & 0x04 != 0))
        }
        (17, Some((s, d))) => s == 53 || d == 53,
        (1, _) => l4.first().is_some_and(|t| matches!(t, 0 | 3 | 8 | 11)),
        (6 | 17, None) => false,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "the engine passed a frame the policy denies: protocol {proto}, ports {ports:?}"
        ))
    }
}

/// The frames the guest transmits and the network sends: a TCP, UDP or ICMP
/// frame between two of a (10, the guest), b (11), c (12) and a stranger (99).
fn frame(input: &mut Input<'_>, from: u8, to: u8) -> Vec<u8> {
    use palisade_testkit::vm_frame;
    use palisade_wire::ip::IpProtocol;
    let kind = input.u8();
    let port = |b: u8| [443u16, 22, 23, 80, 53, 69, 40_000, 40_001][usize::from(b % 8)];
    match kind % 3 {
        0 => {
            let (sport, dport, flags, seq) = (port(input.u8()), port(input.u8()), input.u8(), input.u16());
            let mut t = vec![0u8; 20 + usize::from(input.u8() % 64)];
            t[0..2].copy_from_slice(&sport.to_be_bytes());
            t[2..4].copy_from_slice(&dport.to_be_bytes());
            t[4..6].copy_from_slice(&seq.to_be_bytes());
            t[12] = 0x50;
            t[13] = flags;
            t[14] = 0x20;
            vm_frame(from, to, IpProtocol::TCP, &t)
        }
        1 => {
            let (sport, dport) = (port(input.u8()), port(input.u8()));
            let mut u = vec![0u8; 8 + usize::from(input.u8() % 64)];
            u[0..2].copy_from_slice(&sport.to_be_bytes());
            u[2..4].copy_from_slice(&dport.to_be_bytes());
            let len = u.len() as u16;
            u[4..6].copy_from_slice(&len.to_be_bytes());
            vm_frame(from, to, IpProtocol::UDP, &u)
        }
        _ => {
            let ty = [8u8, 0, 3, 11, 13][usize::from(input.u8() % 5)];
            vm_frame(from, to, IpProtocol::ICMP, &[ty, 0, 0, 0, 0, 1, 0, 1])
        }
    }
}

fn peer(b: u8) -> u8 {
    [11, 12, 99, 10][usize::from(b % 4)]
}

/// A virtio-net header from the guest: mostly plain or a valid partial
/// checksum, sometimes any flags, checksum fields and segmentation.
fn hostile_header(input: &mut Input<'_>) -> [u8; HEADER_LEN] {
    let choice = input.u8();
    let repr = match choice % 4 {
        0 => VirtioNetRepr::PLAIN,
        1 => VirtioNetRepr {
            csum: Some(PartialChecksum { start: 34, offset: 16 }),
            ..VirtioNetRepr::PLAIN
        },
        2 => VirtioNetRepr {
            csum: Some(PartialChecksum { start: 34, offset: 16 }),
            gso: Some(Gso {
                kind: GsoKind::TcpV4,
                header_len: 54,
                size: u16::from(input.u8()).max(1),
                ecn: false,
            }),
            ..VirtioNetRepr::PLAIN
        },
        _ => {
            let mut raw = [0u8; HEADER_LEN];
            for b in &mut raw {
                *b = input.u8();
            }
            return raw;
        }
    };
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&repr.to_bytes()[..HEADER_LEN]);
    h
}

/// The whole harness: guest memory and driver rings, the device's rings, the engine.
struct Harness {
    mem: GuestMemoryMmap,
    tx: DriverRing,
    rx: DriverRing,
    rings: NetRings,
    features: GuestFeatures,
    engine: Engine,
    guest_port: PortId,
    local_port: PortId,
    results: Results,
    events: Vec<FlowEvent>,
    now: u64,
    tx_bump: u64,
    rx_bump: u64,
    /// Bytes the device may write: device-writable receive buffers seen so far, the used rings.
    may_write: [Vec<bool>; 2],
    /// Per receive head: the largest capacity any chain it named had.
    capacity: Vec<u64>,
    /// Per receive head: its buffers as the driver posted them (for reading frames back).
    posted: Vec<Vec<(u64, u32)>>,
    /// Frames sent into the guest, in order, not yet found in its buffers.
    expected: VecDeque<Vec<u8>>,
    /// The guest wrote over its own receive side: frames are no longer compared.
    rx_tainted: bool,
    /// The guest wrote over the transmit used ring: its elements are not the device's.
    tx_used_tainted: bool,
    /// A frame being gathered from mergeable buffers: bytes and buffers still to come.
    partial: Option<(Vec<u8>, u16)>,
    /// Frames the guest got that were compared.
    pub compared: usize,
}

impl Harness {
    fn new(input: &mut Input<'_>) -> Harness {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(REGIONS[0].0), REGIONS[0].1 as usize),
            (GuestAddress(REGIONS[1].0), REGIONS[1].1 as usize),
        ])
        .expect("guest memory");
        let size = [8u16, 16, 32, 64][usize::from(input.u8() % 4)];
        let pick = input.u8();
        let mut bits = mask::VERSION_1;
        for (i, m) in [
            mask::MRG_RXBUF,
            mask::CSUM,
            mask::GUEST_CSUM,
            mask::HOST_TSO4,
            mask::INDIRECT_DESC,
            mask::EVENT_IDX,
            mask::GUEST_TSO4,
        ]
        .into_iter()
        .enumerate()
        {
            if pick & (1 << i) != 0 {
                bits |= m;
            }
        }
        let features = GuestFeatures::from_bits(bits);
        let tx = DriverRing::new(REGIONS[0].0, size);
        let rx = DriverRing::new(align(tx.end(), 4096), size);
        tx.init(&mem);
        rx.init(&mem);
        let limits = Limits {
            frames_per_call: usize::from(input.u8() % 16).max(1),
            ..Limits::default()
        };
        let mut rings = NetRings::new(features, limits);
        let _ = rings.start_tx(&mem, tx.layout, 0);
        let _ = rings.start_rx(&mem, rx.layout, 0);
        let (engine, guest_port, local_port) = engine();
        let mut may_write = [vec![false; REGIONS[0].1 as usize], vec![false; REGIONS[1].1 as usize]];
        for r in [&tx, &rx] {
            let used = r.layout.used_ring;
            for at in used..used + 6 + 8 * u64::from(size) {
                if let Some((i, off)) = locate(at) {
                    may_write[i][off] = true;
                }
            }
        }
        Harness {
            mem,
            tx,
            rx,
            rings,
            features,
            engine,
            guest_port,
            local_port,
            results: Results::new(),
            events: Vec::new(),
            now: 1,
            tx_bump: TX_BUFS.0,
            rx_bump: RX_BUFS.0,
            may_write,
            capacity: vec![0; usize::from(size)],
            posted: vec![Vec::new(); usize::from(size)],
            expected: VecDeque::new(),
            rx_tainted: false,
            tx_used_tainted: false,
            partial: None,
            compared: 0,
        }
    }

    fn mark(&mut self, addr: u64, len: u64) {
        for at in addr..addr.saturating_add(len).min(addr.saturating_add(0x2_0000)) {
            if let Some((i, off)) = locate(at) {
                self.may_write[i][off] = true;
            }
        }
    }

    /// Before a device step: what the receive ring's chains let the device write.
    fn note_rx_chains(&mut self, snap: &[Vec<u8>]) {
        let layout = self.rx.layout;
        for head in 0..layout.size {
            let (bufs, total) = writable(snap, &layout, head);
            let c = &mut self.capacity[usize::from(head)];
            *c = (*c).max(total);
            for (addr, len) in bufs {
                self.mark(addr, len);
            }
        }
    }

    /// A raw guest write at `[at, at + len)`: the receive side is no longer the driver's.
    fn guest_wrote(&mut self, at: u64, len: u64) {
        let rx_ring = (self.rx.layout.desc_table, self.rx.end());
        let end = at.saturating_add(len);
        let overlaps = |(a, b): (u64, u64)| at < b && end > a;
        if overlaps(rx_ring) || overlaps((RX_BUFS.0, RX_BUFS.0 + RX_BUFS.1)) {
            self.rx_tainted = true;
        }
        if overlaps((self.tx.layout.used_ring, self.tx.end())) {
            self.tx_used_tainted = true;
        }
    }

    /// Run one device step and check what it wrote and published.
    fn device(&mut self, step: impl FnOnce(&mut Harness) -> Result<(), String>) -> Result<(), String> {
        let before = snapshot(&self.mem);
        self.note_rx_chains(&before);
        step(self)?;
        let after = snapshot(&self.mem);
        for (i, (a, b)) in before.iter().zip(&after).enumerate() {
            for (k, (x, y)) in a.chunks(64).zip(b.chunks(64)).enumerate() {
                if x == y {
                    continue;
                }
                for (j, (p, q)) in x.iter().zip(y).enumerate() {
                    let off = k * 64 + j;
                    if p != q && !self.may_write[i][off] {
                        return Err(format!(
                            "the device wrote guest byte {:#x}, in no writable buffer or used ring",
                            REGIONS[i].0 + off as u64
                        ));
                    }
                }
            }
        }
        self.check_used()
    }

    fn check_used(&mut self) -> Result<(), String> {
        let size = u32::from(self.tx.layout.size);
        // A head the guest made available is returned as it was, even one
        // outside the table (refused and counted; the `virtqueue` target
        // checks each comes back once): only the length is the device's.
        for (id, len) in self.tx.used(&self.mem) {
            if !self.tx_used_tainted && len != 0 {
                return Err(format!("transmit used element ({id}, {len}) in a ring of {size}"));
            }
        }
        for (id, len) in self.rx.used(&self.mem) {
            if self.rx_tainted {
                continue;
            }
            if id >= size {
                return Err(format!("receive used element names descriptor {id} of {size}"));
            }
            let cap = self.capacity[id as usize];
            if u64::from(len) > cap {
                return Err(format!(
                    "receive used element ({id}, {len}) beyond its chain's {cap} bytes"
                ));
            }
            let bufs = std::mem::take(&mut self.posted[id as usize]);
            if len == 0 {
                continue;
            }
            // What the device wrote into the buffers, in order.
            let mut got = Vec::new();
            for (addr, blen) in bufs {
                let take = (len as usize - got.len()).min(blen as usize);
                let mut b = vec![0u8; take];
                self.mem
                    .read_slice(&mut b, GuestAddress(addr))
                    .map_err(|e| e.to_string())?;
                got.extend(b);
                if got.len() == len as usize {
                    break;
                }
            }
            self.take_frame_bytes(got)?;
        }
        Ok(())
    }

    /// Bytes of one used receive element: a frame, or part of one (mergeable buffers).
    fn take_frame_bytes(&mut self, got: Vec<u8>) -> Result<(), String> {
        let (mut bytes, left) = match self.partial.take() {
            Some((mut bytes, left)) => {
                bytes.extend(got);
                (bytes, left - 1)
            }
            None => {
                if got.len() < HEADER_LEN {
                    return Err(format!(
                        "a received buffer of {} bytes, shorter than the header",
                        got.len()
                    ));
                }
                let buffers = if self.features.mergeable_rx_buffers() {
                    u16::from_le_bytes([got[10], got[11]]).max(1)
                } else {
                    1
                };
                (got, buffers - 1)
            }
        };
        if left > 0 {
            self.partial = Some((bytes, left));
            return Ok(());
        }
        let frame = bytes.split_off(HEADER_LEN);
        let Some(want) = self.expected.pop_front() else {
            return Err(format!(
                "the guest received a frame nobody sent ({} bytes)",
                frame.len()
            ));
        };
        if frame != want {
            let at = frame.iter().zip(&want).position(|(a, b)| a != b);
            return Err(format!(
                "the guest received {} bytes, not the {} bytes the engine forwarded (first difference at {at:?}: {:02x?} vs {:02x?})",
                frame.len(),
                want.len(),
                at.map(|i| &frame[i..(i + 8).min(frame.len())]),
                at.map(|i| &want[i..(i + 8).min(want.len())]),
            ));
        }
        self.compared += 1;
        Ok(())
    }

    /// The engine's decision on `frames` arriving on `port`: what goes to
    /// the guest is sent into its receive queue, what passes between the
    /// guest and the local VM is checked against the policy.
    fn through_engine(&mut self, port: PortId, frames: &[Vec<u8>], offloads: &[Offload]) -> Result<(), String> {
        self.engine
            .process_batch_offloaded(self.now, port, frames, offloads, &mut self.events, &mut self.results);
        let mut to_guest = Vec::new();
        for p in self.results.iter(frames) {
            if let Disposition::Forward = p.disposition {
                for out in p.outputs {
                    let mut buf = vec![0u8; p.frame().len() + 128];
                    let Ok(n) = render(&p, out, &mut buf) else { continue };
                    buf.truncate(n);
                    let between = (port == self.guest_port && out.port == self.local_port)
                        || (port != self.guest_port && out.port == self.guest_port);
                    if between {
                        allowed_by_policy(&buf)?;
                    }
                    if out.port == self.guest_port {
                        to_guest.push(buf);
                    }
                }
            }
            if port != self.guest_port && p.reply().is_some() {
                continue;
            }
            if let Some(r) = p.reply() {
                let mut buf = vec![0u8; 256];
                if let Ok(n) = render_reply(&r, &mut buf) {
                    buf.truncate(n);
                    allowed_by_policy(&buf)?;
                    to_guest.push(buf);
                }
            }
        }
        for f in to_guest {
            self.device(|h| {
                if h.rings.send(&h.mem, &VirtioNetRepr::PLAIN, &f).is_ok() {
                    h.expected.push_back(f.clone());
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// The guest transmits `frame` with `header` in a chain split as the input says.
    fn transmit(&mut self, input: &mut Input<'_>, frame: &[u8]) {
        let header = hostile_header(input);
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(frame);
        if self.tx_bump + bytes.len() as u64 > TX_BUFS.1 {
            self.tx_bump = TX_BUFS.0;
        }
        let at = self.tx_bump;
        self.tx_bump = align(at + bytes.len() as u64, 16);
        let _ = self.mem.write_slice(&bytes, GuestAddress(at));
        let split = input.u8();
        let cut = |n: u8| (usize::from(n) % (bytes.len() + 1)) as u32;
        let bufs: Vec<(u64, u32, bool)> = match split % 4 {
            0 | 1 => vec![(at, bytes.len() as u32, false)],
            2 => {
                let c = cut(input.u8());
                vec![(at, c, false), (at + u64::from(c), bytes.len() as u32 - c, false)]
            }
            // Lengths that do not match the frame, a buffer marked writable.
            _ => vec![(at, u32::from(input.u16()), input.u8() & 1 == 0)],
        };
        if self.tx.add(&self.mem, &bufs).is_some() {
            self.tx.publish(&self.mem);
        }
    }

    /// The guest posts `n` receive buffers of `len` bytes (each chain one or two buffers).
    fn post_rx(&mut self, n: u8, len: u16, two: bool) {
        for _ in 0..n {
            let len = u64::from(len.clamp(1, 0x800));
            let need = if two { 2 * len } else { len };
            if self.rx_bump + need > RX_BUFS.0 + RX_BUFS.1 {
                self.rx_bump = RX_BUFS.0;
            }
            let at = self.rx_bump;
            // A driver never hands out a buffer it has already posted and not
            // got back: no overlap with an outstanding chain's buffers.
            let outstanding = self.posted.iter().flatten();
            if outstanding
                .clone()
                .any(|&(a, l)| at < a + u64::from(l) && at + need > a)
            {
                break;
            }
            self.rx_bump = align(at + need, 16);
            let bufs: Vec<(u64, u32, bool)> = if two {
                vec![(at, len as u32, true), (at + len, len as u32, true)]
            } else {
                vec![(at, len as u32, true)]
            };
            let Some(head) = self.rx.add(&self.mem, &bufs) else {
                break;
            };
            self.posted[usize::from(head)] = bufs.iter().map(|&(a, l, _)| (a, l)).collect();
        }
        self.rx.publish(&self.mem);
    }
}

/// Run the program `data` (see the module documentation); the number of
/// frames compared byte for byte in the guest's buffers, or the first
/// property that fails.
pub fn check(data: &[u8]) -> Result<usize, String> {
    let mut input = Input(data);
    let mut h = Harness::new(&mut input);
    for _ in 0..MAX_STEPS {
        if input.done() {
            break;
        }
        match input.u8() % 12 {
            0 | 1 => {
                let to = peer(input.u8());
                let f = frame(&mut input, 10, to);
                h.transmit(&mut input, &f);
            }
            2 => {
                // A hostile descriptor in the transmit table, made available.
                let (i, addr, len, flags, next) = (input.u8(), input.u16(), input.u16(), input.u8(), input.u8());
                let size = h.tx.layout.size;
                h.tx.write_raw(
                    &h.mem,
                    u16::from(i) % size,
                    hostile_addr(addr),
                    u32::from(len),
                    u16::from(flags & 7),
                    u16::from(next),
                );
                if input.u8() & 1 == 0 {
                    h.tx.push_head(&h.mem, u16::from(i) % size);
                    h.tx.publish(&h.mem);
                }
            }
            3 => {
                // Any available index on either ring.
                let (which, idx) = (input.u8(), input.u16());
                if which & 1 == 0 {
                    h.tx.publish_raw(&h.mem, idx);
                } else {
                    h.guest_wrote(h.rx.layout.avail_ring, 4);
                    h.rx.publish_raw(&h.mem, idx);
                }
            }
            4 => {
                // Raw bytes anywhere.
                let (at, n) = (hostile_addr(input.u16()), usize::from(input.u8() % 16) + 1);
                let bytes: Vec<u8> = (0..n).map(|_| input.u8()).collect();
                h.guest_wrote(at, n as u64);
                let _ = h.mem.write_slice(&bytes, GuestAddress(at));
            }
            5 => {
                let (n, len, two) = (input.u8() % 8 + 1, input.u16() % 0x900, input.u8() & 1 == 0);
                h.post_rx(n, len, two);
            }
            6 | 7 => {
                // The worker's round: the guest's frames through the engine.
                let max = usize::from(input.u8() % 32) + 1;
                let mut frames: Vec<Vec<u8>> = Vec::new();
                let mut offloads = Vec::new();
                h.device(|h| {
                    h.rings.recv_batch(&h.mem, max, Delivery::Offloaded, &mut |b| {
                        for (hdr, f) in b.iter() {
                            frames.push(f.to_vec());
                            offloads.push(Offload::from(*hdr));
                        }
                    });
                    Ok(())
                })?;
                let port = h.guest_port;
                h.through_engine(port, &frames, &offloads)?;
            }
            8 => {
                // From the network: the local VM's vNIC or the uplink, to the guest mostly.
                let from = [11u8, 12, 99][usize::from(input.u8() % 3)];
                let to = if input.u8() % 4 == 0 { 11 } else { 10 };
                let f = frame(&mut input, from, to);
                let port = if from == 11 { h.local_port } else { UPLINK };
                h.through_engine(port, &[f], &[])?;
            }
            9 => h.device(|h| {
                h.rings.flush(&h.mem);
                Ok(())
            })?,
            10 => {
                // Rings stopped and restarted where they stopped (a guest reset, QEMU reconnecting).
                let which = input.u8();
                h.device(|h| {
                    if which & 1 == 0 {
                        let (base, _) = h.rings.stop_rx(&h.mem);
                        let _ = h.rings.start_rx(&h.mem, h.rx.layout, base);
                    } else {
                        let base = h.rings.stop_tx();
                        let _ = h.rings.start_tx(&h.mem, h.tx.layout, base);
                    }
                    Ok(())
                })?;
                // A receive chain the stop handed back empty ends a frame in progress.
                h.partial = None;
            }
            _ => {
                // Time passes; QEMU asks for the guest's announcement.
                h.now += u64::from(input.u8()) * 100_000_000;
                let budget = usize::from(input.u8() % 8);
                h.engine.expire(h.now, budget, &mut h.events);
                if input.u8() & 1 == 0 {
                    h.rings.announce(GUEST_MAC);
                }
            }
        }
        h.events.clear();
    }
    h.device(|h| {
        h.rings.flush(&h.mem);
        Ok(())
    })?;
    Ok(h.compared)
}
