//! Reading and writing capture files: pcap and pcapng, optionally gzip-compressed.
//!
//! The file formats are handled by the maintained `pcap-file` crate; this module
//! adds format sniffing (pcap vs pcapng vs gzip), per-interface link types for
//! pcapng, buffer reuse so a replay loop allocates nothing per packet, and
//! errors that say which file and which packet were bad. A damaged capture
//! (torn last record, bad block) ends the iteration with an error; the packets
//! read before it stay valid.

use std::borrow::Cow;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use pcap_file::pcap::{PcapHeader, PcapPacket, PcapReader, PcapWriter};
use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketBlock;
use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionBlock;
use pcap_file::pcapng::{Block, PcapNgReader, PcapNgWriter};
use pcap_file::{DataLink, TsResolution};

/// A link-layer header type (tcpdump.org LINKTYPE_ registry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkType(pub u32);

impl LinkType {
    /// BSD loopback: a 4-byte host-order address family, then IP.
    pub const NULL: LinkType = LinkType(0);
    /// Ethernet II (and 802.3).
    pub const ETHERNET: LinkType = LinkType(1);
    /// Raw IPv4 or IPv6, version nibble first (LINKTYPE_RAW).
    pub const RAW: LinkType = LinkType(101);
    /// OpenBSD loopback: a 4-byte network-order address family, then IP.
    pub const LOOP: LinkType = LinkType(108);
    /// Linux "cooked" capture, version 1 (16-byte header).
    pub const LINUX_SLL: LinkType = LinkType(113);
    /// Raw IPv4 only.
    pub const IPV4: LinkType = LinkType(228);
    /// Raw IPv6 only.
    pub const IPV6: LinkType = LinkType(229);
    /// Linux "cooked" capture, version 2 (20-byte header).
    pub const LINUX_SLL2: LinkType = LinkType(276);
}

impl From<DataLink> for LinkType {
    fn from(d: DataLink) -> Self {
        LinkType(u32::from(d))
    }
}

/// What a capture operation failed on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaptureError {
    /// The file could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        /// The capture file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The file starts with bytes that are neither pcap, pcapng nor gzip.
    #[error("{path}: not a pcap or pcapng file (magic {magic:02x?})")]
    UnknownFormat {
        /// The capture file.
        path: PathBuf,
        /// The first bytes found.
        magic: [u8; 4],
    },
    /// The file header is damaged.
    #[error("{path}: bad file header: {reason}")]
    BadHeader {
        /// The capture file.
        path: PathBuf,
        /// What the format parser said.
        reason: String,
    },
    /// A record after `index` good packets is damaged or torn.
    #[error("{path}: bad record after packet {index}: {reason}")]
    BadRecord {
        /// The capture file.
        path: PathBuf,
        /// Number of packets read successfully before the bad record.
        index: u64,
        /// What the format parser said.
        reason: String,
    },
    /// A pcapng packet names an interface that has no description block.
    #[error("{path}: packet {index} refers to undeclared interface {interface}")]
    UnknownInterface {
        /// The capture file.
        path: PathBuf,
        /// The packet's index in the file.
        index: u64,
        /// The interface id it carries.
        interface: u32,
    },
}

/// Metadata of one packet read into a caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketMeta {
    /// Capture time since the Unix epoch.
    pub timestamp: Duration,
    /// Link-layer type of the packet's bytes.
    pub linktype: LinkType,
    /// Length on the wire; more than the captured length when the snap length cut it.
    pub orig_len: u32,
}

enum Format {
    Pcap(PcapReader<Box<dyn Read>>),
    PcapNg(PcapNgReader<Box<dyn Read>>),
}

/// A reader over a pcap or pcapng file, gzip-compressed or not.
pub struct CaptureReader {
    path: PathBuf,
    format: Format,
    index: u64,
    done: bool,
}

impl std::fmt::Debug for CaptureReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureReader")
            .field("path", &self.path)
            .field("index", &self.index)
            .finish()
    }
}

/// The largest record libpcap accepts for any link type (`MAXIMUM_SNAPLEN`).
const MAX_RECORD_LEN: u32 = 262_144;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const PCAPNG_MAGIC: [u8; 4] = [0x0a, 0x0d, 0x0d, 0x0a];
const PCAP_MAGICS: [[u8; 4]; 4] = [
    [0xa1, 0xb2, 0xc3, 0xd4],
    [0xd4, 0xc3, 0xb2, 0xa1],
    [0xa1, 0xb2, 0x3c, 0x4d],
    [0x4d, 0x3c, 0xb2, 0xa1],
];

/// Read the first four bytes of `reader`, returning them and a reader that still yields them.
fn sniff(mut reader: Box<dyn Read>) -> io::Result<([u8; 4], Box<dyn Read>)> {
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = reader.read(&mut magic[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let prefix = io::Cursor::new(magic[..got].to_vec());
    Ok((magic, Box::new(prefix.chain(reader))))
}

impl CaptureReader {
    /// Open a capture file, detecting pcap, pcapng and gzip by their magic numbers.
    pub fn open(path: impl AsRef<Path>) -> Result<CaptureReader, CaptureError> {
        let path = path.as_ref().to_path_buf();
        let io_err = |source| CaptureError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io_err)?;
        Self::from_reader(path.clone(), Box::new(BufReader::new(file)))
    }

    /// Read a capture from any reader; `path` is used only in error messages.
    pub fn from_reader(path: PathBuf, reader: Box<dyn Read>) -> Result<CaptureReader, CaptureError> {
        let io_err = |source| CaptureError::Io {
            path: path.clone(),
            source,
        };
        let (mut magic, mut reader) = sniff(reader).map_err(io_err)?;
        if magic[..2] == GZIP_MAGIC {
            let decoder: Box<dyn Read> = Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(reader)));
            (magic, reader) = sniff(decoder).map_err(io_err)?;
        }
        let bad_header = |e: pcap_file::PcapError| CaptureError::BadHeader {
            path: path.clone(),
            reason: e.to_string(),
        };
        let format = if magic == PCAPNG_MAGIC {
            Format::PcapNg(PcapNgReader::new(reader).map_err(bad_header)?)
        } else if PCAP_MAGICS.contains(&magic) {
            Format::Pcap(PcapReader::new(reader).map_err(bad_header)?)
        } else {
            return Err(CaptureError::UnknownFormat { path, magic });
        };
        Ok(CaptureReader {
            path,
            format,
            index: 0,
            done: false,
        })
    }

    /// The file this reader reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of packets returned so far.
    pub fn packets_read(&self) -> u64 {
        self.index
    }

    /// Read the next packet into `buf` (cleared first), reusing its allocation.
    ///
    /// Returns `None` at the end of the file. After an error the reader is
    /// finished: later calls return `None`.
    pub fn next_into(&mut self, buf: &mut Vec<u8>) -> Option<Result<PacketMeta, CaptureError>> {
        if self.done {
            return None;
        }
        let result = self.read_one(buf);
        match &result {
            Some(Ok(_)) => self.index += 1,
            Some(Err(_)) | None => self.done = true,
        }
        result
    }

    fn read_one(&mut self, buf: &mut Vec<u8>) -> Option<Result<PacketMeta, CaptureError>> {
        buf.clear();
        let bad_record = |e: pcap_file::PcapError, index| CaptureError::BadRecord {
            path: self.path.clone(),
            index,
            reason: e.to_string(),
        };
        match &mut self.format {
            Format::Pcap(r) => {
                let header = r.header();
                let linktype = LinkType::from(header.datalink);
                // Raw records, validated the way libpcap does: pcap-file's own checks refuse
                // `orig_len > snaplen`, which every snapped capture has, and captures whose
                // records exceed the header's snap length, which tcpdump still reads.
                match r.next_raw_packet()? {
                    Ok(p) if p.incl_len > MAX_RECORD_LEN => Some(Err(CaptureError::BadRecord {
                        path: self.path.clone(),
                        index: self.index,
                        reason: format!("record length {} exceeds {MAX_RECORD_LEN}", p.incl_len),
                    })),
                    Ok(p) => {
                        buf.extend_from_slice(&p.data);
                        let nanos = match header.ts_resolution {
                            TsResolution::MicroSecond => u64::from(p.ts_frac) * 1000,
                            TsResolution::NanoSecond => u64::from(p.ts_frac),
                        };
                        // An out-of-range fraction (a damaged record) carries into the seconds.
                        let timestamp = Duration::from_secs(u64::from(p.ts_sec)) + Duration::from_nanos(nanos);
                        Some(Ok(PacketMeta {
                            timestamp,
                            linktype,
                            orig_len: p.orig_len,
                        }))
                    }
                    Err(e) => Some(Err(bad_record(e, self.index))),
                }
            }
            Format::PcapNg(r) => loop {
                let block = match r.next_block()? {
                    Ok(b) => b,
                    Err(e) => return Some(Err(bad_record(e, self.index))),
                };
                let (interface, timestamp, orig_len, data) = match block {
                    Block::EnhancedPacket(p) => (p.interface_id, p.timestamp, p.original_len, p.data),
                    // A simple packet block always belongs to the first interface.
                    Block::SimplePacket(p) => (0, Duration::ZERO, p.original_len, p.data),
                    // The obsolete packet block has a raw timestamp in the interface's units; the
                    // default resolution is microseconds.
                    Block::Packet(p) => (
                        u32::from(p.interface_id),
                        Duration::from_micros(p.timestamp),
                        p.original_len,
                        p.data,
                    ),
                    _ => continue,
                };
                buf.extend_from_slice(&data);
                drop(data);
                let Some(idb) = r.interfaces().get(interface as usize) else {
                    buf.clear();
                    return Some(Err(CaptureError::UnknownInterface {
                        path: self.path.clone(),
                        index: self.index,
                        interface,
                    }));
                };
                let linktype = LinkType::from(idb.linktype);
                return Some(Ok(PacketMeta {
                    timestamp,
                    linktype,
                    orig_len,
                }));
            },
        }
    }
}

/// The file format a [`CaptureWriter`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureFormat {
    /// Classic pcap, microsecond timestamps.
    Pcap,
    /// pcapng: one section, one interface, enhanced packet blocks.
    PcapNg,
}

enum Sink {
    Pcap(PcapWriter<BufWriter<File>>),
    PcapNg(PcapNgWriter<BufWriter<File>>),
}

/// Writes a capture file of one link type, as pcap or pcapng.
pub struct CaptureWriter {
    path: PathBuf,
    sink: Sink,
}

impl std::fmt::Debug for CaptureWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureWriter").field("path", &self.path).finish()
    }
}

impl CaptureWriter {
    /// Create (or truncate) `path` as a pcap file of `linktype` packets.
    pub fn create(path: impl AsRef<Path>, linktype: LinkType) -> Result<CaptureWriter, CaptureError> {
        Self::create_as(path, linktype, CaptureFormat::Pcap)
    }

    /// Create (or truncate) `path` as a capture file of `linktype` packets in `format`.
    pub fn create_as(
        path: impl AsRef<Path>,
        linktype: LinkType,
        format: CaptureFormat,
    ) -> Result<CaptureWriter, CaptureError> {
        let path = path.as_ref().to_path_buf();
        let file = File::create(&path).map_err(|source| CaptureError::Io {
            path: path.clone(),
            source,
        })?;
        let bad_header = |e: pcap_file::PcapError| CaptureError::BadHeader {
            path: path.clone(),
            reason: e.to_string(),
        };
        let datalink = DataLink::from(linktype.0);
        let sink = match format {
            CaptureFormat::Pcap => {
                let header = PcapHeader {
                    datalink,
                    ..PcapHeader::default()
                };
                Sink::Pcap(PcapWriter::with_header(BufWriter::new(file), header).map_err(bad_header)?)
            }
            CaptureFormat::PcapNg => {
                let mut w = PcapNgWriter::new(BufWriter::new(file)).map_err(bad_header)?;
                let interface = InterfaceDescriptionBlock {
                    linktype: datalink,
                    snaplen: 0,
                    options: vec![],
                };
                w.write_pcapng_block(interface).map_err(bad_header)?;
                Sink::PcapNg(w)
            }
        };
        Ok(CaptureWriter { path, sink })
    }

    /// Append one packet.
    pub fn write(&mut self, timestamp: Duration, data: &[u8]) -> Result<(), CaptureError> {
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let written = match &mut self.sink {
            Sink::Pcap(w) => w.write_packet(&PcapPacket::new(timestamp, len, data)),
            Sink::PcapNg(w) => w.write_pcapng_block(EnhancedPacketBlock {
                interface_id: 0,
                timestamp,
                original_len: len,
                data: Cow::Borrowed(data),
                options: vec![],
            }),
        };
        written.map(|_| ()).map_err(|e| CaptureError::Io {
            path: self.path.clone(),
            source: io::Error::other(e.to_string()),
        })
    }

    /// Flush buffered packets to the file.
    pub fn finish(self) -> Result<(), CaptureError> {
        let path = self.path;
        let mut inner = match self.sink {
            Sink::Pcap(w) => w.into_writer(),
            Sink::PcapNg(w) => w.into_inner(),
        };
        inner.flush().map_err(|source| CaptureError::Io { path, source })
    }
}

/// A packet's bytes as the link layer gave them, reduced to what a network
/// dissector reads: `pcap stats` and the corpus tests share this so both see
/// the same packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkPayload<'a> {
    /// An Ethernet frame, link header included.
    Ethernet(&'a [u8]),
    /// A network-layer packet (cooked, loopback and raw-IP captures) with its
    /// EtherType; for link types that carry none, the IP version nibble decides.
    Network {
        /// The EtherType of `packet`.
        ethertype: u16,
        /// The bytes after the link header.
        packet: &'a [u8],
    },
    /// A link type this function does not strip.
    Unsupported,
    /// A link header shorter than its fixed size.
    Truncated,
}

/// Strip the link-layer header of a captured packet of type `linktype`.
pub fn strip_link_header(linktype: LinkType, data: &[u8]) -> LinkPayload<'_> {
    let (skip, ethertype_bytes) = match linktype {
        LinkType::ETHERNET => return LinkPayload::Ethernet(data),
        // Raw IP: LINKTYPE_RAW and the DLT_RAW values some platforms write (12, 14).
        LinkType::RAW | LinkType::IPV4 | LinkType::IPV6 | LinkType(12) | LinkType(14) => (0, None),
        // A 4-byte address family (host or network order) precedes IP: the version nibble decides.
        LinkType::NULL | LinkType::LOOP => (4, None),
        LinkType::LINUX_SLL => (16, data.get(14..16)),
        LinkType::LINUX_SLL2 => (20, data.get(0..2)),
        _ => return LinkPayload::Unsupported,
    };
    let Some(packet) = data.get(skip..) else {
        return LinkPayload::Truncated;
    };
    let ethertype = match (ethertype_bytes, packet.first().map(|b| b >> 4)) {
        (Some(b), _) => u16::from_be_bytes([b[0], b[1]]),
        (None, Some(6)) => 0x86dd,
        (None, _) => 0x0800,
    };
    LinkPayload::Network { ethertype, packet }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_sample(path: &Path) {
        let mut w = CaptureWriter::create(path, LinkType::ETHERNET).unwrap();
        w.write(Duration::from_micros(1_500_000), &[1, 2, 3, 4]).unwrap();
        w.write(Duration::from_micros(2_000_001), &[5; 60]).unwrap();
        w.finish().unwrap();
    }

    fn read_all(path: &Path) -> (Vec<(PacketMeta, Vec<u8>)>, Option<CaptureError>) {
        let mut r = CaptureReader::open(path).unwrap();
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while let Some(p) = r.next_into(&mut buf) {
            match p {
                Ok(meta) => out.push((meta, buf.clone())),
                Err(e) => return (out, Some(e)),
            }
        }
        (out, None)
    }

    #[test]
    fn pcap_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.pcap");
        write_sample(&path);
        let (packets, err) = read_all(&path);
        assert!(err.is_none());
        assert_eq!(packets.len(), 2);
        assert_eq!(packets[0].0.linktype, LinkType::ETHERNET);
        assert_eq!(packets[0].0.timestamp, Duration::from_micros(1_500_000));
        assert_eq!(packets[0].1, vec![1, 2, 3, 4]);
        assert_eq!(packets[1].1, vec![5; 60]);
    }

    #[test]
    fn pcapng_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.pcapng");
        let mut w = CaptureWriter::create_as(&path, LinkType::RAW, CaptureFormat::PcapNg).unwrap();
        w.write(Duration::from_micros(7), &[0x45, 0, 0, 20]).unwrap();
        w.write(Duration::from_nanos(1_000_000_123), &[0x60; 40]).unwrap();
        w.finish().unwrap();
        let (packets, err) = read_all(&path);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(packets.len(), 2);
        assert_eq!(packets[0].0.linktype, LinkType::RAW);
        assert_eq!(packets[0].1, vec![0x45, 0, 0, 20]);
        assert_eq!(packets[1].1, vec![0x60; 40]);
    }

    #[test]
    fn gzip_is_transparent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.pcap");
        write_sample(&path);
        let raw = std::fs::read(&path).unwrap();
        let gz_path = dir.path().join("a.pcap.gz");
        let mut enc = flate2::write::GzEncoder::new(File::create(&gz_path).unwrap(), flate2::Compression::fast());
        enc.write_all(&raw).unwrap();
        enc.finish().unwrap();
        let (packets, err) = read_all(&gz_path);
        assert!(err.is_none());
        assert_eq!(packets.len(), 2);
    }

    #[test]
    fn torn_tail_is_an_error_after_the_good_packets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.pcap");
        write_sample(&path);
        let raw = std::fs::read(&path).unwrap();
        std::fs::write(&path, &raw[..raw.len() - 10]).unwrap();
        let (packets, err) = read_all(&path);
        assert_eq!(packets.len(), 1);
        match err {
            Some(CaptureError::BadRecord { index: 1, .. }) => {}
            other => panic!("expected a bad record after packet 1, got {other:?}"),
        }
    }

    #[test]
    fn garbage_is_unknown_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        std::fs::write(&path, b"hello world").unwrap();
        let err = CaptureReader::open(&path).unwrap_err();
        assert!(matches!(err, CaptureError::UnknownFormat { .. }), "{err}");
        assert!(err.to_string().contains("not a pcap"), "{err}");
        std::fs::write(&path, b"").unwrap();
        assert!(CaptureReader::open(&path).is_err());
    }

    #[test]
    fn every_shared_capture_opens_or_fails_cleanly() {
        // The whole corpus must either read to the end or stop with a typed error: no panic.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/pcaps");
        assert!(root.is_dir(), "shared captures missing at {}", root.display());
        let mut stack = vec![root];
        let (mut files, mut packets) = (0u32, 0u64);
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let Ok(mut r) = CaptureReader::open(&path) else {
                    continue;
                };
                files += 1;
                let mut buf = Vec::new();
                while let Some(Ok(_)) = r.next_into(&mut buf) {
                    packets += 1;
                }
            }
        }
        assert!(files > 800, "only {files} captures opened");
        assert!(packets > 10_000, "only {packets} packets read");
    }
}
