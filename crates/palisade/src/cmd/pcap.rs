//! `palisade pcap`: look inside capture files with Palisade's own dissector.
//!
//! `stats` runs every packet through the wire layer twice, as the datapath
//! would see it: the full [`Dissection`] (per-protocol and malformed counts)
//! and the fast-path [`flow::extract`] (the flow table). Damaged capture files
//! are reported and counted, never fatal for the other files.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use palisade_io::capture::{CaptureReader, LinkPayload, LinkType, PacketMeta, strip_link_header};
use palisade_wire::ethernet::EtherType;
use palisade_wire::flow::{self, FlowInfo, FlowKey, Segment};
use palisade_wire::frame::{Dissection, Network, Transport};
use palisade_wire::{Error, ErrorKind};
use serde::Serialize;

/// `palisade pcap` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum PcapCmd {
    /// Packets, bytes, per-protocol counts, malformed packets by reason, and flows.
    ///
    /// Reads pcap and pcapng files, gzip-compressed or not. Exits 1 when a file
    /// could not be read to its end (the packets before the damage are counted).
    Stats {
        /// Capture files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write each distinct Ethernet frame of the captures to its own file in DIR
    /// (a seed corpus for the fuzz targets).
    ExportFrames {
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// At most this many frames per capture file.
        #[arg(long, default_value_t = 50)]
        per_file: usize,
        /// Capture files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// Run a `palisade pcap` subcommand.
pub fn run(cmd: PcapCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        PcapCmd::Stats { files, json } => {
            let mut stats = Stats::default();
            for file in &files {
                stats.add_file(file);
            }
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &stats)?;
                writeln!(out)?;
            } else {
                stats.render(&mut out)?;
            }
            Ok(if stats.capture_errors.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        PcapCmd::ExportFrames { out, per_file, files } => export_frames(&out, per_file, &files),
    }
}

/// A packet's bytes as the link layer gave them, reduced to what the wire layer reads.
enum Link<'a> {
    /// An Ethernet frame.
    Ethernet(&'a [u8]),
    /// A network-layer packet with its EtherType (cooked and loopback captures).
    Network(EtherType, &'a [u8]),
    /// A link type Palisade does not decode.
    Unsupported,
    /// A link header shorter than its fixed size.
    Truncated,
}

/// Strip the capture's link-layer header (the logic lives in palisade-io, shared with the corpus tests).
fn link(linktype: LinkType, data: &[u8]) -> Link<'_> {
    match strip_link_header(linktype, data) {
        LinkPayload::Ethernet(frame) => Link::Ethernet(frame),
        LinkPayload::Network { ethertype, packet } => Link::Network(EtherType(ethertype), packet),
        LinkPayload::Unsupported => Link::Unsupported,
        LinkPayload::Truncated => Link::Truncated,
    }
}

/// The counters `pcap stats` prints.
#[derive(Debug, Default, Serialize)]
struct Stats {
    /// Capture files given.
    files: u64,
    /// Packets read.
    packets: u64,
    /// Captured bytes.
    bytes: u64,
    /// Bytes on the wire (more than captured when the snap length cut packets).
    bytes_on_wire: u64,
    /// Packets per link-layer type.
    link_types: BTreeMap<String, u64>,
    /// Packets in which each protocol was found.
    protocols: BTreeMap<&'static str, u64>,
    /// Malformed packets by "layer: reason".
    malformed: BTreeMap<String, u64>,
    /// Total malformed packets.
    malformed_packets: u64,
    /// Packets the capture's snap length cut short (not counted as malformed).
    truncated_by_snaplen: u64,
    /// Well-formed packets whose IPv4, TCP, UDP or ICMP checksum does not verify
    /// (often checksum offload on the capturing host).
    bad_checksums: u64,
    /// Distinct flows (both directions count once).
    flows: u64,
    /// Distinct one-direction flow keys.
    flow_keys: u64,
    /// Files that could not be read to their end, with the error.
    capture_errors: Vec<String>,
    #[serde(skip)]
    keys: HashSet<FlowKey>,
    #[serde(skip)]
    connections: HashSet<FlowKey>,
}

impl Stats {
    fn add_file(&mut self, file: &std::path::Path) {
        self.files += 1;
        let mut reader = match CaptureReader::open(file) {
            Ok(r) => r,
            Err(e) => return self.capture_errors.push(e.to_string()),
        };
        let mut buf = Vec::with_capacity(65536);
        while let Some(next) = reader.next_into(&mut buf) {
            match next {
                Ok(meta) => self.add_packet(&meta, &buf),
                Err(e) => self.capture_errors.push(e.to_string()),
            }
        }
        self.flows = self.connections.len() as u64;
        self.flow_keys = self.keys.len() as u64;
    }

    fn bump(&mut self, protocol: &'static str) {
        *self.protocols.entry(protocol).or_default() += 1;
    }

    fn add_packet(&mut self, meta: &PacketMeta, data: &[u8]) {
        self.packets += 1;
        self.bytes += data.len() as u64;
        self.bytes_on_wire += u64::from(meta.orig_len.max(data.len() as u32));
        let snapped = (meta.orig_len as usize) > data.len();
        let (dissection, flow) = match link(meta.linktype, data) {
            Link::Ethernet(frame) => {
                *self.link_types.entry("ethernet".into()).or_default() += 1;
                (Dissection::ethernet(frame), flow::extract(frame))
            }
            Link::Network(ethertype, packet) => {
                *self.link_types.entry(link_name(meta.linktype)).or_default() += 1;
                let flow = match ethertype {
                    EtherType::IPV4 | EtherType::IPV6 => flow::extract_ip(packet, Segment::UNTAGGED),
                    _ => Ok(None),
                };
                (Dissection::from_ethertype(ethertype, packet), flow)
            }
            Link::Unsupported => {
                *self
                    .link_types
                    .entry(format!("unsupported ({})", meta.linktype.0))
                    .or_default() += 1;
                return;
            }
            Link::Truncated => {
                *self.link_types.entry(link_name(meta.linktype)).or_default() += 1;
                *self.malformed.entry("link: truncated".into()).or_default() += 1;
                self.malformed_packets += 1;
                return;
            }
        };
        self.count_layers(&dissection);
        match dissection.error {
            Some(e) if snapped && looks_snapped(e) => self.truncated_by_snaplen += 1,
            Some(e) => {
                *self.malformed.entry(e.to_string()).or_default() += 1;
                self.malformed_packets += 1;
            }
            None if !snapped && !dissection.checksums_valid() => self.bad_checksums += 1,
            None => {}
        }
        if let Ok(Some(FlowInfo { key, .. })) = flow {
            self.keys.insert(key);
            self.connections.insert(key.canonical().0);
        }
    }

    fn count_layers(&mut self, d: &Dissection<'_>) {
        if d.ethernet.is_some() {
            self.bump("ethernet");
        }
        match d.tags().count() {
            0 => {}
            1 => self.bump("vlan"),
            _ => self.bump("qinq"),
        }
        match d.network {
            Network::None => {}
            Network::Arp(_) => self.bump("arp"),
            Network::Ipv4(_) => self.bump("ipv4"),
            Network::Ipv6(_) => {
                self.bump("ipv6");
                if !d.ext_headers.is_empty() {
                    self.bump("ipv6-ext");
                }
            }
            Network::Other(t, _) if t.is_length() => self.bump("llc"),
            Network::Other(..) => self.bump("other-ethertype"),
        }
        match d.transport {
            Transport::None => {}
            Transport::Tcp(_) => self.bump("tcp"),
            Transport::Udp(_) => self.bump("udp"),
            Transport::Sctp(_) => self.bump("sctp"),
            Transport::Icmpv4(_) => self.bump("icmpv4"),
            Transport::Icmpv6(_) => self.bump("icmpv6"),
            Transport::Fragment { .. } => self.bump("ip-fragment"),
            Transport::Other(..) => self.bump("other-ip-protocol"),
        }
        if let Some(v) = d.vxlan {
            self.bump(if v.gbp.is_some() { "vxlan-gbp" } else { "vxlan" });
        }
    }

    fn render(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(out, "files            {}", self.files)?;
        writeln!(out, "packets          {}", self.packets)?;
        writeln!(
            out,
            "bytes            {} captured, {} on the wire",
            self.bytes, self.bytes_on_wire
        )?;
        writeln!(out, "flows            {} ({} one-way keys)", self.flows, self.flow_keys)?;
        writeln!(out, "malformed        {}", self.malformed_packets)?;
        writeln!(
            out,
            "snapped          {} (cut by the capture's snap length)",
            self.truncated_by_snaplen
        )?;
        writeln!(out, "bad checksums    {}", self.bad_checksums)?;
        writeln!(out, "\nlink types")?;
        for (k, v) in &self.link_types {
            writeln!(out, "  {k:<24} {v:>10}")?;
        }
        writeln!(out, "\nprotocols (packets containing each)")?;
        for (k, v) in &self.protocols {
            writeln!(out, "  {k:<24} {v:>10}")?;
        }
        if !self.malformed.is_empty() {
            writeln!(out, "\nmalformed packets by reason")?;
            for (k, v) in &self.malformed {
                writeln!(out, "  {k:<24} {v:>10}")?;
            }
        }
        if !self.capture_errors.is_empty() {
            writeln!(out, "\ncapture files with errors")?;
            for e in &self.capture_errors {
                writeln!(out, "  {e}")?;
            }
        }
        Ok(())
    }
}

/// Whether an error is what a snapped packet looks like: the bytes end early, or
/// a length field points past the captured bytes.
fn looks_snapped(e: Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Truncated | ErrorKind::BadLength | ErrorKind::BadHeaderLength
    )
}

fn link_name(linktype: LinkType) -> String {
    match linktype {
        LinkType::ETHERNET => "ethernet".into(),
        LinkType::RAW | LinkType::IPV4 | LinkType::IPV6 | LinkType(12) | LinkType(14) => "raw-ip".into(),
        LinkType::NULL | LinkType::LOOP => "loopback".into(),
        LinkType::LINUX_SLL => "linux-sll".into(),
        LinkType::LINUX_SLL2 => "linux-sll2".into(),
        LinkType(n) => format!("linktype-{n}"),
    }
}

fn export_frames(out: &std::path::Path, per_file: usize, files: &[PathBuf]) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut seen = HashSet::new();
    let mut buf = Vec::new();
    for file in files {
        let mut reader = match CaptureReader::open(file) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("palisade: skipping {e}");
                continue;
            }
        };
        let mut taken = 0;
        while let Some(Ok(meta)) = reader.next_into(&mut buf) {
            if taken == per_file {
                break;
            }
            if meta.linktype != LinkType::ETHERNET || !seen.insert(buf.clone()) {
                continue;
            }
            taken += 1;
            let name = format!("{:016x}", fnv1a(&buf));
            std::fs::write(out.join(name), &buf).with_context(|| format!("writing into {}", out.display()))?;
        }
    }
    println!("{} frames written to {}", seen.len(), out.display());
    Ok(ExitCode::SUCCESS)
}

/// A stable content hash for file names (FNV-1a, 64 bits).
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
