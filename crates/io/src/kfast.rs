//! The kernel fast path: an in-kernel flow cache for established flows.
//!
//! `bpf/kfast.c` (compiled into `bpf/kfast.o`, committed, embedded here so
//! a build needs no clang) holds three programs and a hash map of flow
//! directions ([`FlowKey`] → [`FlowValue`]): a tcx ingress program for a
//! vNIC's host-side netdev, one for the underlay netdev, and a socket
//! filter for the AF_PACKET socket on a vNIC. The engine decides a flow's
//! first packets in user space as always; the agent then installs the
//! flow's directions, and the kernel forwards the rest of its packets
//! (redirect to a local vNIC, or VXLAN-GBP encapsulation towards another
//! host as one tunnel-GSO skb per super-frame, and decapsulation on the
//! other side) without a copy to user space. The programs count each
//! direction's packets and bytes and note its last-seen time and TCP
//! high-water marks in the entry; the agent reads them back into its
//! connection table. `bpf/kfast.c`'s header says which packets the kernel
//! takes (IPv4 TCP/UDP, untagged, no SYN/FIN/RST) and how an entry is
//! removed without a loss window ([`EntryState`]).
//!
//! The loader is minimal on purpose: it reads the one ELF object it ships
//! (program sections, the legacy `maps` section, `R_BPF_64_64` map
//! relocations), creates the maps, loads the programs (the verifier's log in
//! the error when it refuses) and attaches them with `BPF_LINK_CREATE`
//! (tcx, Linux 6.6+) and `SO_ATTACH_BPF`. Links are not pinned: they go
//! with the process, so an agent that dies takes its fast path with it and
//! frames go back to the sockets it no longer reads (the same failure as
//! without the fast path).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The compiled programs (`clang -O2 -g0 -target bpf -c bpf/kfast.c`, see [`CLANG_ARGS`]).
pub const OBJECT: &[u8] = include_bytes!("../bpf/kfast.o");

/// The clang arguments `bpf/kfast.o` is built with (after `clang`, before
/// the source and `-o`; Debian 12's clang 14); a test rebuilds it with them
/// and compares.
pub const CLANG_ARGS: &[&str] = &["-O2", "-g0", "-target", "bpf", "-I/usr/include/x86_64-linux-gnu", "-c"];

/// Entries the flow map holds (`kfast_flows.max_entries`): directions, two per host per connection.
pub const MAX_ENTRIES: usize = 65536;

/// Why the kernel fast path is not available.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KfastError {
    /// The embedded object is not what this loader reads.
    #[error("kernel fast path object: {0}")]
    Object(String),
    /// A `bpf()` or `setsockopt()` call failed.
    #[error("kernel fast path: {step}: {source}")]
    Os {
        /// What was being done.
        step: String,
        /// What the kernel said.
        source: io::Error,
    },
    /// The verifier refused a program.
    #[error("kernel fast path: the verifier refused {program}: {source}; its log ends:\n{log}")]
    Verifier {
        /// The program.
        program: &'static str,
        /// What the kernel said.
        source: io::Error,
        /// The end of the verifier's log.
        log: String,
    },
}

fn os(step: impl Into<String>) -> impl FnOnce(io::Error) -> KfastError {
    let step = step.into();
    move |source| KfastError::Os { step, source }
}

/// Which program reads a direction's packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Frames a vNIC sent, arriving on its host-side netdev (by ifindex).
    Vnic(u32),
    /// VXLAN-GBP datagrams from the underlay, by the VXLAN header's second
    /// word as it is on the wire (the VNI, shifted 8 left, big-endian).
    Underlay(u32),
}

/// One direction of a flow as the kernel looks it up. Addresses and
/// ports in host order here; [`FlowKey::encode`] writes them as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Where its packets arrive.
    pub scope: Scope,
    /// IP protocol (6 TCP, 17 UDP).
    pub protocol: u8,
    /// Source address.
    pub src: std::net::Ipv4Addr,
    /// Destination address.
    pub dst: std::net::Ipv4Addr,
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
}

/// Bytes of an encoded [`FlowKey`] (`struct flow_key`).
pub const KEY_LEN: usize = 20;
/// Bytes of an encoded [`FlowValue`] (`struct flow_val`).
pub const VALUE_LEN: usize = 96;

impl FlowKey {
    /// The key as `struct flow_key`.
    pub fn encode(&self) -> [u8; KEY_LEN] {
        let mut b = [0u8; KEY_LEN];
        let (scope, kind) = match self.scope {
            Scope::Vnic(ifindex) => (ifindex.to_ne_bytes(), 0),
            Scope::Underlay(word) => (word.to_be_bytes(), 1),
        };
        b[0..4].copy_from_slice(&scope);
        b[4] = kind;
        b[5] = self.protocol;
        b[8..12].copy_from_slice(&self.src.octets());
        b[12..16].copy_from_slice(&self.dst.octets());
        b[16..18].copy_from_slice(&self.src_port.to_be_bytes());
        b[18..20].copy_from_slice(&self.dst_port.to_be_bytes());
        b
    }

    /// A key read back from the map; `None` for bytes no [`FlowKey::encode`] writes.
    pub fn decode(b: &[u8]) -> Option<FlowKey> {
        let b: &[u8; KEY_LEN] = b.try_into().ok()?;
        let scope = match b[4] {
            0 => Scope::Vnic(u32::from_ne_bytes(b[0..4].try_into().ok()?)),
            1 => Scope::Underlay(u32::from_be_bytes(b[0..4].try_into().ok()?)),
            _ => return None,
        };
        if b[6..8] != [0, 0] {
            return None;
        }
        let ip = |o: usize| std::net::Ipv4Addr::new(b[o], b[o + 1], b[o + 2], b[o + 3]);
        Some(FlowKey {
            scope,
            protocol: b[5],
            src: ip(8),
            dst: ip(12),
            src_port: u16::from_be_bytes([b[16], b[17]]),
            dst_port: u16::from_be_bytes([b[18], b[19]]),
        })
    }
}

/// An entry's state (see `bpf/kfast.c`): removal goes `Active` → `Dual`,
/// a grace, then the delete, so a packet is never let go by both the
/// socket filter and tc (at worst it is forwarded twice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    /// The kernel forwards; the socket filter keeps it from user space.
    Active,
    /// The kernel still forwards, and user space gets a copy too.
    Dual,
}

/// What the kernel does with a hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Out of a local netdev (by ifindex), unchanged: a vNIC on this host.
    Redirect(u32),
    /// VXLAN-GBP encapsulated with these outer headers (IPv4, UDP, VXLAN;
    /// the kernel fills in the lengths and the IP checksum), out of the
    /// underlay netdev (by ifindex) to the next hop the neighbour table names.
    Encap {
        /// The underlay netdev.
        ifindex: u32,
        /// IPv4 + UDP + VXLAN-GBP header.
        outer: [u8; 36],
    },
    /// Decapsulated, out of a local vNIC's netdev (by ifindex), if the
    /// datagram's VXLAN header begins with this word (flags, policy bit,
    /// group), as on the wire.
    Decap {
        /// The vNIC's netdev.
        ifindex: u32,
        /// The VXLAN header's first 4 bytes a hit must carry.
        vxlan_word0: [u8; 4],
    },
}

/// TCP high-water marks of one direction, as the kernel noted them (host order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpMarks {
    /// Highest sequence number sent plus one.
    pub seq_end: u32,
    /// Highest acknowledgment sent.
    pub ack: u32,
    /// Highest acknowledgment plus scaled window sent.
    pub limit: u32,
    /// Largest scaled window sent.
    pub max_win: u32,
}

/// A flow direction's entry: what the agent writes, and the counters the kernel adds to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowValue {
    /// Its state.
    pub state: EntryState,
    /// What a hit does.
    pub action: Action,
    /// TCP: the window scale shift this direction's sender announced.
    pub wscale: u8,
    /// Packets forwarded (a super-frame counts its segments).
    pub packets: u64,
    /// Bytes forwarded, as the engine counts them (segments together).
    pub bytes: u64,
    /// When the last was forwarded (`CLOCK_MONOTONIC` ns; 0: never).
    pub last_seen: u64,
    /// TCP marks (start them at the tracker's).
    pub tcp: TcpMarks,
}

const ACTION_REDIRECT: u32 = 1;
const ACTION_ENCAP: u32 = 2;
const ACTION_DECAP: u32 = 3;

impl FlowValue {
    /// The value as `struct flow_val` (native byte order, as the kernel reads it).
    pub fn encode(&self) -> [u8; VALUE_LEN] {
        let mut b = [0u8; VALUE_LEN];
        let put32 = |b: &mut [u8; VALUE_LEN], o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_ne_bytes());
        let put64 = |b: &mut [u8; VALUE_LEN], o: usize, v: u64| b[o..o + 8].copy_from_slice(&v.to_ne_bytes());
        put32(
            &mut b,
            0,
            match self.state {
                EntryState::Active => 1,
                EntryState::Dual => 2,
            },
        );
        match self.action {
            Action::Redirect(ifindex) => {
                put32(&mut b, 4, ACTION_REDIRECT);
                put32(&mut b, 8, ifindex);
            }
            Action::Encap { ifindex, outer } => {
                put32(&mut b, 4, ACTION_ENCAP);
                put32(&mut b, 8, ifindex);
                b[16..52].copy_from_slice(&outer);
            }
            Action::Decap { ifindex, vxlan_word0 } => {
                put32(&mut b, 4, ACTION_DECAP);
                put32(&mut b, 8, ifindex);
                b[12..16].copy_from_slice(&vxlan_word0);
            }
        }
        b[52] = self.wscale;
        put64(&mut b, 56, self.packets);
        put64(&mut b, 64, self.bytes);
        put64(&mut b, 72, self.last_seen);
        put32(&mut b, 80, self.tcp.seq_end);
        put32(&mut b, 84, self.tcp.ack);
        put32(&mut b, 88, self.tcp.limit);
        put32(&mut b, 92, self.tcp.max_win);
        b
    }

    /// A value read back from the map; `None` for bytes no [`FlowValue::encode`] writes.
    pub fn decode(b: &[u8]) -> Option<FlowValue> {
        let b: &[u8; VALUE_LEN] = b.try_into().ok()?;
        let get32 = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let get64 = |o: usize| u64::from_ne_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let state = match get32(0) {
            1 => EntryState::Active,
            2 => EntryState::Dual,
            _ => return None,
        };
        let ifindex = get32(8);
        let action = match get32(4) {
            ACTION_REDIRECT => Action::Redirect(ifindex),
            ACTION_ENCAP => Action::Encap {
                ifindex,
                outer: b[16..52].try_into().ok()?,
            },
            ACTION_DECAP => Action::Decap {
                ifindex,
                vxlan_word0: b[12..16].try_into().ok()?,
            },
            _ => return None,
        };
        Some(FlowValue {
            state,
            action,
            wscale: b[52],
            packets: get64(56),
            bytes: get64(64),
            last_seen: get64(72),
            tcp: TcpMarks {
                seq_end: get32(80),
                ack: get32(84),
                limit: get32(88),
                max_win: get32(92),
            },
        })
    }
}

/// The outer headers of an encapsulated copy, for [`Action::Encap`]: IPv4
/// (don't-fragment, TTL 64, identification 0, lengths and checksum left to
/// the kernel) from `local` to `remote`, UDP from `source_port` to
/// `dst_port` (zero checksum, RFC 7348), and the 8-byte VXLAN header.
pub fn outer_headers(
    local: std::net::Ipv4Addr,
    remote: std::net::Ipv4Addr,
    source_port: u16,
    dst_port: u16,
    vxlan: [u8; 8],
) -> [u8; 36] {
    let mut o = [0u8; 36];
    o[0] = 0x45;
    o[6] = 0x40; // don't fragment
    o[8] = 64;
    o[9] = 17;
    o[12..16].copy_from_slice(&local.octets());
    o[16..20].copy_from_slice(&remote.octets());
    o[20..22].copy_from_slice(&source_port.to_be_bytes());
    o[22..24].copy_from_slice(&dst_port.to_be_bytes());
    o[28..36].copy_from_slice(&vxlan);
    o
}

// ---------------------------------------------------------------- bpf() ---

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const SO_ATTACH_BPF: libc::c_int = 50;

/// A `bpf()` call with an attribute block of `attr` (the kernel checks that
/// bytes past what it knows are zero).
fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live 128-byte buffer, the size passed; the pointers inside it (keys,
    // values, instructions, logs) were written by the callers from live buffers that outlive
    // the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as libc::c_uint) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

fn put32(attr: &mut [u8; 128], at: usize, v: u32) {
    attr[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put64(attr: &mut [u8; 128], at: usize, v: u64) {
    attr[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: a successful bpf() call that makes an object returns a new descriptor that
    // nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

/// A map: its descriptor and sizes.
#[derive(Debug)]
struct Map {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
}

impl Map {
    fn create(name: &str, def: MapDef) -> Result<Map, KfastError> {
        let mut attr = [0u8; 128];
        put32(&mut attr, 0, def.kind);
        put32(&mut attr, 4, def.key_size);
        put32(&mut attr, 8, def.value_size);
        put32(&mut attr, 12, def.max_entries);
        put32(&mut attr, 16, def.flags);
        // map_name at 28 (15 bytes and a NUL).
        let n = name.len().min(15);
        attr[28..28 + n].copy_from_slice(&name.as_bytes()[..n]);
        let fd = bpf(BPF_MAP_CREATE, &mut attr).map_err(os(format!("creating map {name}")))?;
        Ok(Map {
            fd: owned(fd),
            key_size: def.key_size as usize,
            value_size: def.value_size as usize,
        })
    }

    fn elem(&self, cmd: libc::c_long, key: &[u8], value: Option<&mut [u8]>, flags: u64) -> io::Result<()> {
        if key.len() != self.key_size || value.as_ref().is_some_and(|v| v.len() != self.value_size) {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let mut attr = [0u8; 128];
        put32(&mut attr, 0, self.fd.as_raw_fd() as u32);
        put64(&mut attr, 8, key.as_ptr() as u64);
        if let Some(v) = value {
            put64(&mut attr, 16, v.as_mut_ptr() as u64);
        }
        put64(&mut attr, 24, flags);
        bpf(cmd, &mut attr).map(|_| ())
    }
}

/// A legacy `struct map_def`.
#[derive(Debug, Clone, Copy)]
struct MapDef {
    kind: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
}

// ---------------------------------------------------------------- ELF ---

/// A program section of the object, with its instructions and map references.
#[derive(Debug)]
struct ProgSection {
    name: String,
    insns: Vec<u8>,
    /// (byte offset of an `ld_imm64`, map symbol).
    relocs: Vec<(usize, String)>,
}

/// What the loader takes from the object.
#[derive(Debug)]
struct Object {
    maps: Vec<(String, MapDef)>,
    progs: Vec<ProgSection>,
    license: CString,
}

fn rd16(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn rd32(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn rd64(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

fn cstr(b: &[u8], o: usize) -> Option<String> {
    let s = b.get(o..)?;
    let end = s.iter().position(|&c| c == 0)?;
    String::from_utf8(s[..end].to_vec()).ok()
}

/// Read the parts of a little-endian ELF64 BPF relocatable object the loader needs.
fn parse_object(elf: &[u8]) -> Result<Object, String> {
    let bad = |what: &str| format!("malformed ELF: {what}");
    if elf.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return Err(bad("not a little-endian ELF64 file"));
    }
    if rd16(elf, 18) != Some(247) {
        return Err(bad("not a BPF object (e_machine)"));
    }
    let shoff = rd64(elf, 40).ok_or_else(|| bad("e_shoff"))? as usize;
    let shentsize = rd16(elf, 58).ok_or_else(|| bad("e_shentsize"))? as usize;
    let shnum = rd16(elf, 60).ok_or_else(|| bad("e_shnum"))? as usize;
    let shstrndx = rd16(elf, 62).ok_or_else(|| bad("e_shstrndx"))? as usize;
    if shentsize != 64 {
        return Err(bad("section header size"));
    }
    struct Sh {
        name: String,
        kind: u32,
        off: usize,
        size: usize,
        link: usize,
        info: usize,
    }
    let raw = |i: usize| -> Option<(u32, u32, usize, usize, usize, usize)> {
        let h = shoff.checked_add(i.checked_mul(64)?)?;
        Some((
            rd32(elf, h)?,
            rd32(elf, h + 4)?,
            rd64(elf, h + 24)? as usize,
            rd64(elf, h + 32)? as usize,
            rd32(elf, h + 40)? as usize,
            rd32(elf, h + 44)? as usize,
        ))
    };
    let (_, _, stroff, _, _, _) = raw(shstrndx).ok_or_else(|| bad("section names"))?;
    let mut sh = Vec::with_capacity(shnum);
    for i in 0..shnum {
        let (name, kind, off, size, link, info) = raw(i).ok_or_else(|| bad("section header"))?;
        if off.checked_add(size).is_none_or(|end| end > elf.len()) && kind != 8 {
            return Err(bad("section outside the file"));
        }
        let name = cstr(elf, stroff + name as usize).ok_or_else(|| bad("section name"))?;
        sh.push(Sh {
            name,
            kind,
            off,
            size,
            link,
            info,
        });
    }
    let data = |s: &Sh| &elf[s.off..s.off + s.size];
    let symtab = sh.iter().find(|s| s.kind == 2).ok_or_else(|| bad("no symbol table"))?;
    let strtab = sh.get(symtab.link).ok_or_else(|| bad("symbol names"))?;
    // (name, section index, value) of each symbol.
    let syms: Vec<(String, usize, usize)> = data(symtab)
        .chunks_exact(24)
        .map(|s| {
            let name = cstr(data(strtab), rd32(s, 0).unwrap_or(0) as usize).unwrap_or_default();
            (name, rd16(s, 6).unwrap_or(0) as usize, rd64(s, 8).unwrap_or(0) as usize)
        })
        .collect();
    let maps_index = sh
        .iter()
        .position(|s| s.name == "maps")
        .ok_or_else(|| bad("no maps section"))?;
    let mut maps = Vec::new();
    for (name, shndx, value) in &syms {
        if *shndx == maps_index && !name.is_empty() {
            let d = data(&sh[maps_index]);
            let f = |i: usize| rd32(d, value + 4 * i).ok_or_else(|| bad("map definition"));
            maps.push((
                name.clone(),
                MapDef {
                    kind: f(0)?,
                    key_size: f(1)?,
                    value_size: f(2)?,
                    max_entries: f(3)?,
                    flags: f(4)?,
                },
            ));
        }
    }
    let mut progs = Vec::new();
    for (i, s) in sh.iter().enumerate() {
        // SHT_PROGBITS with SHF_EXECINSTR and something in it.
        let flags = rd64(elf, shoff + i * 64 + 8).unwrap_or(0);
        if s.kind != 1 || flags & 4 == 0 || s.size == 0 {
            continue;
        }
        let mut relocs = Vec::new();
        for r in sh.iter().filter(|r| r.kind == 9 && r.info == i) {
            for e in data(r).chunks_exact(16) {
                let off = rd64(e, 0).ok_or_else(|| bad("relocation"))? as usize;
                let sym = (rd64(e, 8).ok_or_else(|| bad("relocation"))? >> 32) as usize;
                let (name, _, _) = syms.get(sym).ok_or_else(|| bad("relocation symbol"))?;
                relocs.push((off, name.clone()));
            }
        }
        progs.push(ProgSection {
            name: s.name.clone(),
            insns: data(s).to_vec(),
            relocs,
        });
    }
    let license = sh
        .iter()
        .find(|s| s.name == "license")
        .and_then(|s| CString::new(data(s).split(|&c| c == 0).next().unwrap_or(&[]).to_vec()).ok())
        .ok_or_else(|| bad("no license"))?;
    Ok(Object { maps, progs, license })
}

// ---------------------------------------------------------------- loading ---

/// The loaded programs and maps. Shared by the agent's workers (map
/// operations are system calls on descriptors; no lock is needed).
#[derive(Debug)]
pub struct KernelFastPath {
    flows: Map,
    config: Map,
    vnic: OwnedFd,
    underlay: OwnedFd,
    sockfilt: OwnedFd,
}

/// A tcx attachment: detached when dropped (and when the process ends).
#[derive(Debug)]
pub struct Link(#[allow(dead_code)] OwnedFd);

impl KernelFastPath {
    /// Create the maps and load the programs. `snap` is the AF_PACKET ports'
    /// snap length (the socket filter's accept length), `vxlan_port` the
    /// underlay's UDP port. Needs `CAP_BPF` and `CAP_NET_ADMIN` (root).
    pub fn load(snap: u32, vxlan_port: u16) -> Result<KernelFastPath, KfastError> {
        let obj = parse_object(OBJECT).map_err(KfastError::Object)?;
        let mut maps = Vec::new();
        for (name, def) in &obj.maps {
            maps.push((name.clone(), Map::create(name, *def)?));
        }
        let fd_of = |name: &str| maps.iter().find(|(n, _)| n == name).map(|(_, m)| m.fd.as_raw_fd());
        let load = |section: &str, program: &'static str, kind: u32| -> Result<OwnedFd, KfastError> {
            let p = obj
                .progs
                .iter()
                .find(|p| p.name == section)
                .ok_or_else(|| KfastError::Object(format!("no section {section}")))?;
            let mut insns = p.insns.clone();
            for (off, sym) in &p.relocs {
                let fd = fd_of(sym).ok_or_else(|| KfastError::Object(format!("{section}: unknown map {sym}")))?;
                let insn = insns
                    .get_mut(*off..*off + 8)
                    .ok_or_else(|| KfastError::Object(format!("{section}: relocation past the end")))?;
                if insn[0] != 0x18 {
                    return Err(KfastError::Object(format!("{section}: relocation not at an ld_imm64")));
                }
                insn[1] = (insn[1] & 0x0f) | (BPF_PSEUDO_MAP_FD << 4);
                insn[4..8].copy_from_slice(&fd.to_le_bytes());
            }
            let mut log = vec![0u8; 1 << 20];
            let try_load = |log_level: u32, log: &mut Vec<u8>| {
                let mut attr = [0u8; 128];
                put32(&mut attr, 0, kind);
                put32(&mut attr, 4, (insns.len() / 8) as u32);
                put64(&mut attr, 8, insns.as_ptr() as u64);
                put64(&mut attr, 16, obj.license.as_ptr() as u64);
                put32(&mut attr, 24, log_level);
                put32(&mut attr, 28, if log_level > 0 { log.len() as u32 } else { 0 });
                put64(&mut attr, 32, if log_level > 0 { log.as_mut_ptr() as u64 } else { 0 });
                let n = program.len().min(15);
                attr[48..48 + n].copy_from_slice(&program.as_bytes()[..n]);
                bpf(BPF_PROG_LOAD, &mut attr)
            };
            match try_load(0, &mut log) {
                Ok(fd) => Ok(owned(fd)),
                Err(source) => {
                    // Again with the verifier's log, for the error.
                    let _ = try_load(1, &mut log);
                    let text =
                        String::from_utf8_lossy(&log[..log.iter().position(|&c| c == 0).unwrap_or(0)]).into_owned();
                    let tail: String = text
                        .lines()
                        .rev()
                        .take(20)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n");
                    Err(KfastError::Verifier {
                        program,
                        source,
                        log: tail,
                    })
                }
            }
        };
        let vnic = load("tc/vnic", "kfast_vnic", BPF_PROG_TYPE_SCHED_CLS)?;
        let underlay = load("tc/underlay", "kfast_underlay", BPF_PROG_TYPE_SCHED_CLS)?;
        let sockfilt = load("socket", "kfast_sockfilt", BPF_PROG_TYPE_SOCKET_FILTER)?;
        let take = |maps: &mut Vec<(String, Map)>, name: &str| -> Result<Map, KfastError> {
            let i = maps
                .iter()
                .position(|(n, _)| n == name)
                .ok_or_else(|| KfastError::Object(format!("no map {name}")))?;
            Ok(maps.swap_remove(i).1)
        };
        let flows = take(&mut maps, "kfast_flows")?;
        let config = take(&mut maps, "kfast_cfg")?;
        if flows.key_size != KEY_LEN || flows.value_size != VALUE_LEN {
            return Err(KfastError::Object(
                "kfast_flows has other sizes than this loader's".into(),
            ));
        }
        let k = Self {
            flows,
            config,
            vnic,
            underlay,
            sockfilt,
        };
        k.set_config(0, snap)?;
        k.set_config(1, u32::from(vxlan_port))?;
        Ok(k)
    }

    fn set_config(&self, index: u32, value: u32) -> Result<(), KfastError> {
        let mut v = value.to_ne_bytes();
        self.config
            .elem(BPF_MAP_UPDATE_ELEM, &index.to_ne_bytes(), Some(&mut v), 0)
            .map_err(os("writing kfast_cfg"))
    }

    fn attach(&self, prog: &OwnedFd, ifindex: u32, what: &str) -> Result<Link, KfastError> {
        let mut attr = [0u8; 128];
        put32(&mut attr, 0, prog.as_raw_fd() as u32);
        put32(&mut attr, 4, ifindex);
        put32(&mut attr, 8, BPF_TCX_INGRESS);
        let fd = bpf(BPF_LINK_CREATE, &mut attr).map_err(os(format!("tcx ingress on {what} (ifindex {ifindex})")))?;
        Ok(Link(owned(fd)))
    }

    /// Attach the vNIC program to the tcx ingress of a vNIC's host-side netdev.
    pub fn attach_vnic(&self, ifindex: u32) -> Result<Link, KfastError> {
        self.attach(&self.vnic, ifindex, "a vNIC")
    }

    /// Attach the underlay program to the tcx ingress of the underlay netdev.
    pub fn attach_underlay(&self, ifindex: u32) -> Result<Link, KfastError> {
        self.attach(&self.underlay, ifindex, "the underlay")
    }

    /// Replace the socket filter of an AF_PACKET socket on a vNIC with the
    /// one that keeps kernel-forwarded frames from it (call once the port
    /// has joined: before, its classic filter drops everything).
    pub fn attach_socket_filter(&self, socket: BorrowedFd<'_>) -> Result<(), KfastError> {
        let fd = self.sockfilt.as_raw_fd();
        // SAFETY: `fd` is a live c_int of the length passed, read only during the call.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_ATTACH_BPF,
                (&fd as *const RawFd).cast(),
                std::mem::size_of::<RawFd>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(os("setsockopt(SO_ATTACH_BPF)")(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Write (create or replace) a direction's entry.
    pub fn insert(&self, key: &FlowKey, value: &FlowValue) -> Result<(), KfastError> {
        let mut v = value.encode();
        self.flows
            .elem(BPF_MAP_UPDATE_ELEM, &key.encode(), Some(&mut v), 0)
            .map_err(os("writing a flow entry"))
    }

    /// A direction's entry, if there is one.
    pub fn get(&self, key: &FlowKey) -> Result<Option<FlowValue>, KfastError> {
        let mut v = [0u8; VALUE_LEN];
        match self.flows.elem(BPF_MAP_LOOKUP_ELEM, &key.encode(), Some(&mut v), 0) {
            Ok(()) => Ok(FlowValue::decode(&v)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(os("reading a flow entry")(e)),
        }
    }

    /// Remove a direction's entry (absent already is fine).
    pub fn remove(&self, key: &FlowKey) -> Result<(), KfastError> {
        match self.flows.elem(BPF_MAP_DELETE_ELEM, &key.encode(), None, 0) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(os("removing a flow entry")(e)),
        }
    }

    /// Every key in the flow map (for tests and diagnostics).
    pub fn keys(&self) -> Result<Vec<FlowKey>, KfastError> {
        let mut out = Vec::new();
        let mut prev: Option<[u8; KEY_LEN]> = None;
        loop {
            let mut next = [0u8; KEY_LEN];
            let mut attr = [0u8; 128];
            put32(&mut attr, 0, self.flows.fd.as_raw_fd() as u32);
            put64(&mut attr, 8, prev.as_ref().map_or(0, |p| p.as_ptr() as u64));
            put64(&mut attr, 16, next.as_mut_ptr() as u64);
            match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
                Err(e) => return Err(os("listing flow entries")(e)),
            }
            if let Some(k) = FlowKey::decode(&next) {
                out.push(k);
            }
            prev = Some(next);
            if out.len() > MAX_ENTRIES {
                return Ok(out);
            }
        }
    }
}

/// `CLOCK_MONOTONIC` now, in ns: the clock of [`FlowValue::last_seen`].
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a live timespec the call writes.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn key(scope: Scope) -> FlowKey {
        FlowKey {
            scope,
            protocol: 6,
            src: Ipv4Addr::new(10, 10, 0, 10),
            dst: Ipv4Addr::new(10, 10, 0, 11),
            src_port: 40000,
            dst_port: 5201,
        }
    }

    #[test]
    fn a_key_is_laid_out_as_struct_flow_key_and_reads_back() {
        let k = key(Scope::Vnic(7));
        let b = k.encode();
        assert_eq!(&b[0..4], &7u32.to_ne_bytes());
        assert_eq!(b[4], 0);
        assert_eq!(b[5], 6);
        assert_eq!(&b[8..12], &[10, 10, 0, 10]);
        assert_eq!(&b[12..16], &[10, 10, 0, 11]);
        // Ports as on the wire.
        assert_eq!(&b[16..18], &40000u16.to_be_bytes());
        assert_eq!(&b[18..20], &[0x14, 0x51]);
        assert_eq!(FlowKey::decode(&b), Some(k));
        // The underlay's scope is the VXLAN header's second word as on the wire: VNI 10 is 00 00 0a 00.
        let u = key(Scope::Underlay(10 << 8)).encode();
        assert_eq!(&u[0..4], &[0, 0, 10, 0]);
        assert_eq!(u[4], 1);
        assert_eq!(FlowKey::decode(&u), Some(key(Scope::Underlay(10 << 8))));
    }

    #[test]
    fn bytes_no_encode_writes_are_not_a_key_or_a_value() {
        let mut b = key(Scope::Vnic(1)).encode();
        b[4] = 9;
        assert_eq!(FlowKey::decode(&b), None);
        assert_eq!(FlowKey::decode(&[0; 19]), None);
        assert_eq!(FlowValue::decode(&[0; VALUE_LEN]), None, "state 0");
        let mut v = FlowValue {
            state: EntryState::Active,
            action: Action::Redirect(3),
            wscale: 7,
            packets: 0,
            bytes: 0,
            last_seen: 0,
            tcp: TcpMarks::default(),
        }
        .encode();
        v[4] = 99;
        assert_eq!(FlowValue::decode(&v), None, "unknown action");
    }

    #[test]
    fn a_value_is_laid_out_as_struct_flow_val_and_reads_back() {
        let outer = outer_headers(
            Ipv4Addr::new(192, 168, 100, 1),
            Ipv4Addr::new(192, 168, 100, 2),
            51000,
            4789,
            [0x88, 0x08, 0x00, 0x05, 0, 0, 10, 0],
        );
        let v = FlowValue {
            state: EntryState::Dual,
            action: Action::Encap { ifindex: 4, outer },
            wscale: 7,
            packets: 3,
            bytes: 4500,
            last_seen: 123_456_789,
            tcp: TcpMarks {
                seq_end: 1,
                ack: 2,
                limit: 3,
                max_win: 4,
            },
        };
        let b = v.encode();
        assert_eq!(&b[0..4], &2u32.to_ne_bytes());
        assert_eq!(&b[4..8], &ACTION_ENCAP.to_ne_bytes());
        assert_eq!(&b[8..12], &4u32.to_ne_bytes());
        assert_eq!(&b[16..52], &outer[..]);
        assert_eq!(b[52], 7);
        assert_eq!(&b[56..64], &3u64.to_ne_bytes());
        assert_eq!(&b[88..92], &3u32.to_ne_bytes());
        assert_eq!(FlowValue::decode(&b), Some(v));
        let d = FlowValue {
            action: Action::Decap {
                ifindex: 9,
                vxlan_word0: [0x88, 0x08, 0, 5],
            },
            ..v
        };
        let b = d.encode();
        assert_eq!(&b[12..16], &[0x88, 0x08, 0, 5]);
        assert_eq!(FlowValue::decode(&b), Some(d));
    }

    #[test]
    fn outer_headers_are_ipv4_udp_vxlan_with_lengths_left_to_the_kernel() {
        let o = outer_headers(
            Ipv4Addr::new(1, 2, 3, 4),
            Ipv4Addr::new(5, 6, 7, 8),
            50000,
            4789,
            [1; 8],
        );
        assert_eq!(o[0], 0x45);
        assert_eq!(&o[2..4], &[0, 0], "total length: the kernel's");
        assert_eq!(o[6], 0x40, "don't fragment");
        assert_eq!(o[9], 17);
        assert_eq!(&o[12..20], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&o[20..24], &[0xc3, 0x50, 0x12, 0xb5]);
        assert_eq!(&o[24..28], &[0; 4], "UDP length and checksum");
        assert_eq!(&o[28..36], &[1; 8]);
    }

    #[test]
    fn the_embedded_object_has_the_three_programs_and_two_maps() {
        let obj = parse_object(OBJECT).expect("parse");
        let mut names: Vec<_> = obj.progs.iter().map(|p| p.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["socket", "tc/underlay", "tc/vnic"]);
        let flows = obj.maps.iter().find(|(n, _)| n == "kfast_flows").expect("flows map").1;
        assert_eq!(
            (flows.key_size as usize, flows.value_size as usize),
            (KEY_LEN, VALUE_LEN)
        );
        assert_eq!(flows.max_entries as usize, MAX_ENTRIES);
        assert!(obj.progs.iter().all(|p| !p.relocs.is_empty()));
        assert!(parse_object(&OBJECT[..100]).is_err());
        assert!(parse_object(b"not an elf").is_err());
    }

    /// The committed object is what the committed source compiles to, when
    /// clang is here (CI installs it: scripts/install-deps).
    #[test]
    fn the_committed_object_is_the_source_compiled() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bpf");
        let Ok(version) = std::process::Command::new("clang").arg("--version").output() else {
            eprintln!("skipped: no clang here to rebuild bpf/kfast.o with");
            return;
        };
        // Another clang emits other (equally valid) bytes: the object is Debian 12's clang 14's.
        let version = String::from_utf8_lossy(&version.stdout).into_owned();
        if !version.contains("clang version 14.") {
            eprintln!("skipped: bpf/kfast.o is built with clang 14 (Debian 12), this is {version}");
            return;
        }
        let out = tempfile::tempdir().expect("tempdir");
        let obj = out.path().join("kfast.o");
        let status = std::process::Command::new("clang")
            .args(CLANG_ARGS)
            .arg(dir.join("kfast.c"))
            .arg("-o")
            .arg(&obj)
            .status()
            .expect("clang");
        assert!(status.success(), "clang failed on bpf/kfast.c");
        let built = std::fs::read(&obj).expect("read");
        assert!(
            built == OBJECT,
            "bpf/kfast.o is not what bpf/kfast.c compiles to: rebuild it with `clang {} bpf/kfast.c -o bpf/kfast.o`",
            CLANG_ARGS.join(" ")
        );
    }

    /// Loading needs root (CAP_BPF, CAP_NET_ADMIN): CI's tests run as root.
    #[test]
    fn the_programs_pass_the_verifier_and_the_map_round_trips() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: loading BPF programs needs root");
            return;
        }
        let k = KernelFastPath::load(9216, 4789).unwrap_or_else(|e| panic!("{e}"));
        let key = key(Scope::Vnic(1));
        let v = FlowValue {
            state: EntryState::Active,
            action: Action::Redirect(2),
            wscale: 0,
            packets: 0,
            bytes: 0,
            last_seen: 0,
            tcp: TcpMarks::default(),
        };
        assert_eq!(k.get(&key).expect("get"), None);
        k.insert(&key, &v).expect("insert");
        assert_eq!(k.get(&key).expect("get"), Some(v));
        assert_eq!(k.keys().expect("keys"), vec![key]);
        k.remove(&key).expect("remove");
        k.remove(&key).expect("remove again");
        assert_eq!(k.get(&key).expect("get"), None);
        // The socket filter takes on an AF_PACKET socket.
        // SAFETY: plain socket(2) call; the descriptor is owned right away.
        let s = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(s >= 0);
        // SAFETY: `s` is a new descriptor nothing else owns.
        let s = unsafe { OwnedFd::from_raw_fd(s) };
        k.attach_socket_filter(s.as_fd_borrowed()).expect("SO_ATTACH_BPF");
        // tcx on the loopback device of a network namespace of its own (this
        // thread's, not the machine's): attaches, and detaches with the link.
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: unshare has no memory preconditions; it moves this thread only.
                assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare(CLONE_NEWNET)");
                let lo = k.attach_underlay(1).expect("tcx on lo");
                let vnic = k.attach_vnic(1).expect("a second tcx program on lo");
                drop((lo, vnic));
            });
        });
    }

    trait Borrow {
        fn as_fd_borrowed(&self) -> BorrowedFd<'_>;
    }
    impl Borrow for OwnedFd {
        fn as_fd_borrowed(&self) -> BorrowedFd<'_> {
            std::os::fd::AsFd::as_fd(self)
        }
    }
}
