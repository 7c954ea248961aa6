//! IPFIX (RFC 7011/7012) export of flow records over UDP.
//!
//! [`IpfixExporter`] buffers [`FlowRecord`]s into IPFIX messages of at most
//! [`MAX_MESSAGE_LEN`] bytes (so a message never needs IP fragmentation on a
//! 1500-byte path) and sends each message as one UDP datagram when it is full or
//! on [`IpfixExporter::flush`]. [`encode_message`] and [`Decoder`] are the same
//! codec without a socket, for tests and fuzzing.
//!
//! # Templates
//!
//! Two data templates, sent in a template set (set id 2) in the first message,
//! then again every [`DEFAULT_TEMPLATE_REFRESH_MESSAGES`] messages or
//! [`DEFAULT_TEMPLATE_REFRESH_SECS`] seconds, whichever comes first (UDP carries
//! no template state, RFC 7011 §8.4), and again after a message carrying them
//! failed to send:
//!
//! | id | for | fields |
//! |----|-----|--------|
//! | [`TEMPLATE_IPV4`] 256 | IPv4 flows | sourceIPv4Address(8), destinationIPv4Address(12), icmpTypeCodeIPv4(32), then the common fields |
//! | [`TEMPLATE_IPV6`] 257 | IPv6 flows | sourceIPv6Address(27), destinationIPv6Address(28), icmpTypeCodeIPv6(139), then the common fields |
//!
//! Common fields, in order: sourceTransportPort(7), destinationTransportPort(11),
//! protocolIdentifier(4), packetTotalCount(86, 8 bytes), octetTotalCount(85,
//! 8 bytes), flowStartMilliseconds(152), flowEndMilliseconds(153),
//! flowEndReason(136), firewallEvent(233), forwardingStatus(89, 1 byte),
//! biflowDirection(239), flowId(148), then the enterprise elements below.
//!
//! Counts are *total* counts (85/86), not delta counts, because a
//! [`FlowRecord`]'s counters are cumulative ("so far"): an update record repeats
//! what earlier records of the flow already counted. nfdump reads both kinds into
//! the same packets/bytes columns.
//!
//! # Enterprise elements
//!
//! Palisade's own elements use enterprise number [`PALISADE_PEN`] = 32473, the
//! number IANA reserves for documentation and examples (RFC 5612); it is not a
//! registered Palisade number, and a deployment that needs collectors to tell
//! Palisade's elements from another vendor's should register a PEN and change the
//! constant. The elements ([`ent`]): source VM name (1), destination VM name (2),
//! source zone (3), destination zone (4), rule id (5), rule level (6), rule chain
//! (7), all variable-length UTF-8 strings (RFC 7011 §7), and policy version (8,
//! unsigned64). An external end (no VM) has empty name and zone. The deciding
//! rules of a record ([`FlowRecord::decided_by`], one or two) are joined with `,`
//! in rule id, level and chain, in the same order; policy version is the highest
//! of their versions (both chains of one verdict come from one policy). Each
//! string is cut to [`MAX_STRING_LEN`] bytes (at a character boundary) so that
//! any single record fits a message with templates.
//!
//! # Direction
//!
//! IPFIX records here are uniflows. A [`FlowRecord`] becomes:
//! - one record initiator → responder (source = [`FlowRecord::src`]) with
//!   `packets_out`/`bytes_out`, biflowDirection 1 (initiator), always;
//! - one record responder → initiator (addresses, ports, VM names and zones
//!   swapped) with `packets_in`/`bytes_in`, biflowDirection 2 (reverseInitiator),
//!   only when `packets_in` or `bytes_in` is non-zero (a denied flow, or one
//!   never answered, has no reverse traffic to report).
//!
//! Both share flowId ([`FlowRecord::flow_id`]), times and provenance. RFC 5103
//! reverse counters (PEN 29305) were the alternative: nfdump 1.7 reads them into
//! its output counters (opkt/obyt) of one bidirectional flow, but its default
//! line output, and collectors without RFC 5103 support, show only the forward
//! counts. Per-direction records put the reverse traffic in the ordinary
//! packets/bytes columns of a flow with the right addresses and ports, in any
//! collector (the interop test `tests/ipfix_nfcapd.rs` checks this with nfcapd).
//!
//! ICMP records carry the [`FlowRecord`]'s ports as they are (the echo
//! identifier, or 0), and its ICMP type and code ([`FlowRecord::icmp`]) in
//! icmpTypeCodeIPv4 or icmpTypeCodeIPv6 as `type << 8 | code` (an echo's
//! reverse record the reply's type: a request's replies, a reply's requests);
//! the element is 0 for other protocols and for records written before the
//! type was kept. nfdump shows ICMP flows with source port 0 and its own
//! type/code reading of the destination port, which therefore does not match
//! Palisade's ports (addresses, protocol and counts do).
//!
//! # Value mappings
//!
//! - firewallEvent: deny/reject → 3 (denied); allow → 1 (created) on start,
//!   5 (updated) on update, 2 (deleted) on end.
//! - flowEndReason: idle timeout 1; update 2 (active timeout); fin/rst 3 (end of
//!   flow); policy revoked, migrated, shutdown 4 (forced end); evicted 5 (lack of
//!   resources); start 0 (the flow has not ended).
//! - forwardingStatus (RFC 7270): allow 64 (forwarded), deny 130 (dropped: ACL
//!   drop, silent), reject 129 (dropped: ACL deny, answered with a reset or ICMP).
//!
//! # Rate limit
//!
//! [`IpfixExporter::with_rate_limit`] is a token bucket on the caller's clock
//! (the `now_unix_s` passed to [`IpfixExporter::export`]), holding at most one
//! second of records. A record over the limit is not exported: it is counted in
//! [`ExportStats::records_dropped_rate_limit`] and reported as
//! [`ExportError::RateLimited`].
//!
//! # Sequence numbers
//!
//! The header's sequence number counts data records sent before the message
//! (RFC 7011 §3.1). Records in a message that failed to send still advance it, so
//! the collector sees the loss as a sequence gap.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use crate::record::{EndReason, FlowRecord, Phase, Verdict};

/// IPFIX version number in the message header.
pub const VERSION: u16 = 10;
/// Largest message the exporter sends: fits a 1500-byte MTU with IPv6 and UDP
/// headers and room for tunnel encapsulation.
pub const MAX_MESSAGE_LEN: usize = 1400;
/// Template id of IPv4 flow records.
pub const TEMPLATE_IPV4: u16 = 256;
/// Template id of IPv6 flow records.
pub const TEMPLATE_IPV6: u16 = 257;
/// Enterprise number of Palisade's elements: 32473, IANA's documentation PEN
/// (RFC 5612). See the module documentation.
pub const PALISADE_PEN: u32 = 32473;
/// Longest string element, in bytes; longer strings are cut.
pub const MAX_STRING_LEN: usize = 128;
/// Templates are re-sent after this many messages without them.
pub const DEFAULT_TEMPLATE_REFRESH_MESSAGES: u32 = 16;
/// Templates are re-sent when the last were sent this many seconds ago.
pub const DEFAULT_TEMPLATE_REFRESH_SECS: u32 = 30;

const HEADER_LEN: usize = 16;
const SET_HEADER_LEN: usize = 4;
const TEMPLATE_SET_ID: u16 = 2;
const OPTIONS_TEMPLATE_SET_ID: u16 = 3;
/// Field length meaning "variable length" in a template (RFC 7011 §7).
const VARLEN: u16 = 0xffff;
const ENTERPRISE_BIT: u16 = 0x8000;

/// IANA information element ids (RFC 7012 registry).
mod ie {
    pub const OCTET_DELTA_COUNT: u16 = 1;
    pub const PACKET_DELTA_COUNT: u16 = 2;
    pub const PROTOCOL_IDENTIFIER: u16 = 4;
    pub const SOURCE_TRANSPORT_PORT: u16 = 7;
    pub const SOURCE_IPV4_ADDRESS: u16 = 8;
    pub const ICMP_TYPE_CODE_IPV4: u16 = 32;
    pub const ICMP_TYPE_CODE_IPV6: u16 = 139;
    pub const DESTINATION_TRANSPORT_PORT: u16 = 11;
    pub const DESTINATION_IPV4_ADDRESS: u16 = 12;
    pub const SOURCE_IPV6_ADDRESS: u16 = 27;
    pub const DESTINATION_IPV6_ADDRESS: u16 = 28;
    pub const OCTET_TOTAL_COUNT: u16 = 85;
    pub const PACKET_TOTAL_COUNT: u16 = 86;
    pub const FORWARDING_STATUS: u16 = 89;
    pub const FLOW_END_REASON: u16 = 136;
    pub const FLOW_ID: u16 = 148;
    pub const FLOW_START_MILLISECONDS: u16 = 152;
    pub const FLOW_END_MILLISECONDS: u16 = 153;
    pub const FIREWALL_EVENT: u16 = 233;
    pub const BIFLOW_DIRECTION: u16 = 239;
}

/// Palisade's enterprise element ids, under [`PALISADE_PEN`].
pub mod ent {
    /// Source VM name (string).
    pub const SOURCE_VM_NAME: u16 = 1;
    /// Destination VM name (string).
    pub const DESTINATION_VM_NAME: u16 = 2;
    /// Source zone (string).
    pub const SOURCE_ZONE: u16 = 3;
    /// Destination zone (string).
    pub const DESTINATION_ZONE: u16 = 4;
    /// Deciding rule ids, `,`-joined (string).
    pub const RULE_ID: u16 = 5;
    /// Deciding rules' levels, `,`-joined (string).
    pub const RULE_LEVEL: u16 = 6;
    /// Deciding rules' chains, `,`-joined (string).
    pub const RULE_CHAIN: u16 = 7;
    /// Policy version (unsigned64).
    pub const POLICY_VERSION: u16 = 8;
}

/// One field specifier of a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FieldSpec {
    /// 0 for IANA elements.
    pen: u32,
    id: u16,
    /// Encoded length, or [`VARLEN`].
    len: u16,
}

const fn iana(id: u16, len: u16) -> FieldSpec {
    FieldSpec { pen: 0, id, len }
}

const fn palisade(id: u16, len: u16) -> FieldSpec {
    FieldSpec {
        pen: PALISADE_PEN,
        id,
        len,
    }
}

/// The fields after the two addresses, in template order; `put_common` writes
/// them in this order.
const COMMON_FIELDS: [FieldSpec; 20] = [
    iana(ie::SOURCE_TRANSPORT_PORT, 2),
    iana(ie::DESTINATION_TRANSPORT_PORT, 2),
    iana(ie::PROTOCOL_IDENTIFIER, 1),
    iana(ie::PACKET_TOTAL_COUNT, 8),
    iana(ie::OCTET_TOTAL_COUNT, 8),
    iana(ie::FLOW_START_MILLISECONDS, 8),
    iana(ie::FLOW_END_MILLISECONDS, 8),
    iana(ie::FLOW_END_REASON, 1),
    iana(ie::FIREWALL_EVENT, 1),
    iana(ie::FORWARDING_STATUS, 1),
    iana(ie::BIFLOW_DIRECTION, 1),
    iana(ie::FLOW_ID, 8),
    palisade(ent::SOURCE_VM_NAME, VARLEN),
    palisade(ent::DESTINATION_VM_NAME, VARLEN),
    palisade(ent::SOURCE_ZONE, VARLEN),
    palisade(ent::DESTINATION_ZONE, VARLEN),
    palisade(ent::RULE_ID, VARLEN),
    palisade(ent::RULE_LEVEL, VARLEN),
    palisade(ent::RULE_CHAIN, VARLEN),
    palisade(ent::POLICY_VERSION, 8),
];

/// Bytes of a data record's fixed-length fields after the addresses.
const COMMON_FIXED_LEN: usize = 2 + 2 + 1 + 8 + 8 + 8 + 8 + 1 + 1 + 1 + 1 + 8 + 8;
/// Number of string fields in a data record.
#[cfg(test)]
const STRING_FIELDS: usize = 7;

fn template_fields(id: u16) -> impl Iterator<Item = FieldSpec> {
    let addrs = if id == TEMPLATE_IPV4 {
        [
            iana(ie::SOURCE_IPV4_ADDRESS, 4),
            iana(ie::DESTINATION_IPV4_ADDRESS, 4),
            iana(ie::ICMP_TYPE_CODE_IPV4, 2),
        ]
    } else {
        [
            iana(ie::SOURCE_IPV6_ADDRESS, 16),
            iana(ie::DESTINATION_IPV6_ADDRESS, 16),
            iana(ie::ICMP_TYPE_CODE_IPV6, 2),
        ]
    };
    addrs.into_iter().chain(COMMON_FIELDS)
}

/// Length of the template set carrying both templates.
#[cfg(test)]
fn template_set_len() -> usize {
    let template_len = |id| {
        4 + template_fields(id)
            .map(|f| if f.pen == 0 { 4 } else { 8 })
            .sum::<usize>()
    };
    SET_HEADER_LEN + template_len(TEMPLATE_IPV4) + template_len(TEMPLATE_IPV6)
}

fn put_u16(buf: &mut Vec<u8>, v: u16) {
    buf.extend_from_slice(&v.to_be_bytes());
}

fn put_u32(buf: &mut Vec<u8>, v: u32) {
    buf.extend_from_slice(&v.to_be_bytes());
}

fn put_u64(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(&v.to_be_bytes());
}

fn put_template_set(buf: &mut Vec<u8>) {
    let start = buf.len();
    put_u16(buf, TEMPLATE_SET_ID);
    put_u16(buf, 0); // length, patched below
    for id in [TEMPLATE_IPV4, TEMPLATE_IPV6] {
        put_u16(buf, id);
        put_u16(buf, template_fields(id).count() as u16);
        for f in template_fields(id) {
            if f.pen == 0 {
                put_u16(buf, f.id);
                put_u16(buf, f.len);
            } else {
                put_u16(buf, f.id | ENTERPRISE_BIT);
                put_u16(buf, f.len);
                put_u32(buf, f.pen);
            }
        }
    }
    let len = (buf.len() - start) as u16;
    buf[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Cut `s` to at most [`MAX_STRING_LEN`] bytes at a character boundary.
fn cap(s: &str) -> &str {
    if s.len() <= MAX_STRING_LEN {
        return s;
    }
    let mut end = MAX_STRING_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn varlen_len(s: &str) -> usize {
    // Strings are capped below 255 bytes, so the one-byte length form always applies.
    1 + cap(s).len()
}

fn put_string(buf: &mut Vec<u8>, s: &str) {
    let s = cap(s);
    buf.push(s.len() as u8);
    buf.extend_from_slice(s.as_bytes());
}

/// One IPFIX data record (one direction of a flow), borrowing from its [`FlowRecord`].
struct DataRecord<'a> {
    src: IpAddr,
    dst: IpAddr,
    /// icmpTypeCodeIPv4 or icmpTypeCodeIPv6 (with the addresses' family):
    /// `type << 8 | code`, 0 for other protocols.
    icmp_type_code: u16,
    src_port: u16,
    dst_port: u16,
    protocol: u8,
    packets: u64,
    octets: u64,
    start_ms: u64,
    end_ms: u64,
    end_reason: u8,
    firewall_event: u8,
    forwarding_status: u8,
    biflow_direction: u8,
    flow_id: u64,
    src_vm: &'a str,
    dst_vm: &'a str,
    src_zone: &'a str,
    dst_zone: &'a str,
    rule_id: Cow<'a, str>,
    rule_level: Cow<'a, str>,
    rule_chain: Cow<'a, str>,
    policy_version: u64,
}

/// The template a record uses: IPv4 only when both ends are IPv4.
fn template_for(src: IpAddr, dst: IpAddr) -> u16 {
    match (src, dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) => TEMPLATE_IPV4,
        _ => TEMPLATE_IPV6,
    }
}

fn v6(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

impl DataRecord<'_> {
    fn template(&self) -> u16 {
        template_for(self.src, self.dst)
    }

    fn encoded_len(&self) -> usize {
        // The addresses and the ICMP type and code.
        let addrs = if self.template() == TEMPLATE_IPV4 {
            4 + 4 + 2
        } else {
            16 + 16 + 2
        };
        addrs
            + COMMON_FIXED_LEN
            + [
                self.src_vm,
                self.dst_vm,
                self.src_zone,
                self.dst_zone,
                &self.rule_id,
                &self.rule_level,
                &self.rule_chain,
            ]
            .iter()
            .map(|s| varlen_len(s))
            .sum::<usize>()
    }

    fn emit(&self, buf: &mut Vec<u8>) {
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                buf.extend_from_slice(&s.octets());
                buf.extend_from_slice(&d.octets());
            }
            (s, d) => {
                buf.extend_from_slice(&v6(s).octets());
                buf.extend_from_slice(&v6(d).octets());
            }
        }
        put_u16(buf, self.icmp_type_code);
        put_u16(buf, self.src_port);
        put_u16(buf, self.dst_port);
        buf.push(self.protocol);
        put_u64(buf, self.packets);
        put_u64(buf, self.octets);
        put_u64(buf, self.start_ms);
        put_u64(buf, self.end_ms);
        buf.push(self.end_reason);
        buf.push(self.firewall_event);
        buf.push(self.forwarding_status);
        buf.push(self.biflow_direction);
        put_u64(buf, self.flow_id);
        for s in [
            self.src_vm,
            self.dst_vm,
            self.src_zone,
            self.dst_zone,
            &self.rule_id,
            &self.rule_level,
            &self.rule_chain,
        ] {
            put_string(buf, s);
        }
        put_u64(buf, self.policy_version);
    }
}

fn joined<'a>(rec: &'a FlowRecord, part: impl Fn(&'a crate::record::Decision) -> &'a str) -> Cow<'a, str> {
    match rec.decided_by.as_slice() {
        [] => Cow::Borrowed(""),
        [one] => Cow::Borrowed(part(one)),
        many => Cow::Owned(many.iter().map(part).collect::<Vec<_>>().join(",")),
    }
}

/// flowEndReason of a record (0 while the flow has not ended).
fn end_reason(phase: Phase) -> u8 {
    match phase {
        Phase::Start => 0,
        Phase::Update => 2,
        Phase::End(EndReason::Timeout) => 1,
        Phase::End(EndReason::Fin | EndReason::Rst) => 3,
        Phase::End(EndReason::PolicyRevoked | EndReason::Migrated | EndReason::Shutdown | EndReason::Inspection) => 4,
        Phase::End(EndReason::Evicted) => 5,
    }
}

fn firewall_event(verdict: Verdict, phase: Phase) -> u8 {
    match (verdict, phase) {
        (Verdict::Deny | Verdict::Reject, _) => 3,
        (Verdict::Allow, Phase::Start) => 1,
        (Verdict::Allow, Phase::Update) => 5,
        (Verdict::Allow, Phase::End(_)) => 2,
    }
}

fn forwarding_status(verdict: Verdict) -> u8 {
    match verdict {
        Verdict::Allow => 64,
        Verdict::Reject => 129,
        Verdict::Deny => 130,
    }
}

/// The icmpTypeCode value of a record's forward or `reverse` direction:
/// `type << 8 | code` of its ICMP message, the reply's type for an echo's
/// reverse direction (a request's replies, a reply's requests); 0 for other
/// protocols and for records without an ICMP message.
fn icmp_type_code(rec: &FlowRecord, reverse: bool) -> u16 {
    let Some(m) = rec.icmp else { return 0 };
    let ty = match (reverse, rec.protocol, m.ty) {
        (true, 1, 8) => 0,
        (true, 1, 0) => 8,
        (true, 58, 128) => 129,
        (true, 58, 129) => 128,
        _ => m.ty,
    };
    u16::from(ty) << 8 | u16::from(m.code)
}

/// The IPFIX records of one flow record: initiator → responder, and the reverse
/// direction when it carried traffic.
fn data_records(rec: &FlowRecord) -> (DataRecord<'_>, Option<DataRecord<'_>>) {
    fn vm_name(e: &crate::record::Endpoint) -> &str {
        e.vm.as_ref().map_or("", |v| v.name.as_str())
    }
    fn zone(e: &crate::record::Endpoint) -> &str {
        e.vm.as_ref().map_or("", |v| v.zone.as_str())
    }
    let (src_vm, dst_vm) = (vm_name(&rec.src), vm_name(&rec.dst));
    let (src_zone, dst_zone) = (zone(&rec.src), zone(&rec.dst));
    let forward = DataRecord {
        src: rec.src.addr,
        dst: rec.dst.addr,
        icmp_type_code: icmp_type_code(rec, false),
        src_port: rec.src.port,
        dst_port: rec.dst.port,
        protocol: rec.protocol,
        packets: rec.packets_out,
        octets: rec.bytes_out,
        start_ms: rec.start_ns / 1_000_000,
        end_ms: rec.last_ns / 1_000_000,
        end_reason: end_reason(rec.phase),
        firewall_event: firewall_event(rec.verdict, rec.phase),
        forwarding_status: forwarding_status(rec.verdict),
        biflow_direction: 1,
        flow_id: rec.flow_id,
        src_vm,
        dst_vm,
        src_zone,
        dst_zone,
        rule_id: joined(rec, |d| &d.rule),
        rule_level: joined(rec, |d| &d.level),
        rule_chain: joined(rec, |d| &d.chain),
        policy_version: rec.decided_by.iter().map(|d| d.policy_version).max().unwrap_or(0),
    };
    let reverse = (rec.packets_in != 0 || rec.bytes_in != 0).then(|| DataRecord {
        src: rec.dst.addr,
        dst: rec.src.addr,
        icmp_type_code: icmp_type_code(rec, true),
        src_port: rec.dst.port,
        dst_port: rec.src.port,
        packets: rec.packets_in,
        octets: rec.bytes_in,
        biflow_direction: 2,
        src_vm: dst_vm,
        dst_vm: src_vm,
        src_zone: dst_zone,
        dst_zone: src_zone,
        rule_id: forward.rule_id.clone(),
        rule_level: forward.rule_level.clone(),
        rule_chain: forward.rule_chain.clone(),
        ..forward
    });
    (forward, reverse)
}

/// A message being built in a reusable buffer.
#[derive(Debug, Default)]
struct MessageBuilder {
    buf: Vec<u8>,
    /// Start offset and template id of the open data set.
    set: Option<(usize, u16)>,
    data_records: u32,
    with_templates: bool,
}

impl MessageBuilder {
    fn start(&mut self, with_templates: bool) {
        self.buf.clear();
        self.buf.resize(HEADER_LEN, 0);
        self.set = None;
        self.data_records = 0;
        self.with_templates = with_templates;
        if with_templates {
            put_template_set(&mut self.buf);
        }
    }

    /// Append `rec` if the message stays within `limit` bytes; a message with no
    /// data record yet always takes it, so a record is never refused forever.
    fn push(&mut self, rec: &DataRecord<'_>, limit: usize) -> bool {
        let tid = rec.template();
        let new_set = !matches!(self.set, Some((_, t)) if t == tid);
        let need = rec.encoded_len() + if new_set { SET_HEADER_LEN } else { 0 };
        if self.data_records > 0 && self.buf.len() + need > limit {
            return false;
        }
        if new_set {
            self.close_set();
            self.set = Some((self.buf.len(), tid));
            put_u16(&mut self.buf, tid);
            put_u16(&mut self.buf, 0); // length, patched by close_set
        }
        rec.emit(&mut self.buf);
        self.data_records += 1;
        true
    }

    fn close_set(&mut self) {
        if let Some((start, _)) = self.set.take() {
            let len = (self.buf.len() - start) as u16;
            self.buf[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
        }
    }

    /// Close the message and write its header; returns the finished bytes.
    fn finish(&mut self, seq: u32, domain: u32, export_time: u32) -> &[u8] {
        self.close_set();
        assert!(
            self.buf.len() <= usize::from(u16::MAX),
            "IPFIX message over 65535 bytes"
        );
        let len = self.buf.len() as u16;
        let header = &mut self.buf[..HEADER_LEN];
        header[0..2].copy_from_slice(&VERSION.to_be_bytes());
        header[2..4].copy_from_slice(&len.to_be_bytes());
        header[4..8].copy_from_slice(&export_time.to_be_bytes());
        header[8..12].copy_from_slice(&seq.to_be_bytes());
        header[12..16].copy_from_slice(&domain.to_be_bytes());
        &self.buf
    }
}

/// Encode `records` as one IPFIX message (with no size budget), its header
/// carrying `seq`, `domain` and `export_time`, preceded by the template set when
/// `with_templates`. For tests and fuzzing; the exporter splits at
/// [`MAX_MESSAGE_LEN`].
///
/// # Panics
/// If the records do not fit one message (65,535 bytes, roughly 60 records).
pub fn encode_message(
    records: &[FlowRecord],
    seq: u32,
    domain: u32,
    export_time: u32,
    with_templates: bool,
) -> Vec<u8> {
    let mut m = MessageBuilder::default();
    m.start(with_templates);
    for rec in records {
        let (fwd, rev) = data_records(rec);
        m.push(&fwd, usize::MAX);
        if let Some(rev) = rev {
            m.push(&rev, usize::MAX);
        }
    }
    m.finish(seq, domain, export_time);
    m.buf
}

/// Why a buffer is not a valid IPFIX message (or uses a template this decoder
/// cannot read).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IpfixError {
    /// The buffer ends inside a structure.
    #[error("truncated {what} at offset {offset}: need {needed} bytes, {available} left")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Where it starts.
        offset: usize,
        /// Bytes it needs.
        needed: usize,
        /// Bytes there are.
        available: usize,
    },
    /// The version is not 10.
    #[error("IPFIX version {0}, expected 10")]
    BadVersion(u16),
    /// The header's length disagrees with the buffer.
    #[error("message length {header} in the header, but the buffer has {actual} bytes")]
    BadMessageLength {
        /// Length in the header.
        header: u16,
        /// Buffer length.
        actual: usize,
    },
    /// A set's length is below its header or past the message end.
    #[error("set at offset {offset} has length {length}, out of bounds")]
    BadSetLength {
        /// Where the set starts.
        offset: usize,
        /// Its length field.
        length: u16,
    },
    /// A set id that RFC 7011 reserves (0, 1, 4..=255).
    #[error("reserved set id {id} at offset {offset}")]
    ReservedSetId {
        /// The set id.
        id: u16,
        /// Where the set starts.
        offset: usize,
    },
    /// A template record is malformed.
    #[error("bad template at offset {offset}: {reason}")]
    BadTemplate {
        /// Where the template record starts.
        offset: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// A data set refers to a template not (yet) received.
    #[error("data set uses template {0}, which was not received")]
    UnknownTemplate(u16),
    /// A known element has a length this decoder cannot read.
    #[error("element {pen}/{id} has unsupported length {length}")]
    BadFieldLength {
        /// Enterprise number (0 for IANA).
        pen: u32,
        /// Element id.
        id: u16,
        /// Its length.
        length: usize,
    },
    /// A string element is not UTF-8.
    #[error("string element {pen}/{id} is not UTF-8")]
    InvalidUtf8 {
        /// Enterprise number.
        pen: u32,
        /// Element id.
        id: u16,
    },
    /// A data record lacks its addresses.
    #[error("template {0} has no source and destination address")]
    MissingAddresses(u16),
}

/// An IPFIX message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageHeader {
    /// Message length in bytes.
    pub length: u16,
    /// Export time (Unix seconds).
    pub export_time: u32,
    /// Data records sent before this message.
    pub sequence: u32,
    /// Observation domain id.
    pub domain: u32,
}

/// One decoded data record: the fields Palisade's templates carry. Elements the
/// template lacks keep their default (zero, empty). An IPv4-mapped IPv6 address
/// decodes as IPv4, since that is how the encoder carries a mixed-family pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedRecord {
    /// The template it was decoded with.
    pub template_id: u16,
    /// Source address.
    pub src_addr: IpAddr,
    /// Destination address.
    pub dst_addr: IpAddr,
    /// icmpTypeCodeIPv4 or icmpTypeCodeIPv6: `type << 8 | code` (0 when not ICMP).
    pub icmp_type_code: u16,
    /// sourceTransportPort.
    pub src_port: u16,
    /// destinationTransportPort.
    pub dst_port: u16,
    /// protocolIdentifier.
    pub protocol: u8,
    /// packetTotalCount (or packetDeltaCount).
    pub packets: u64,
    /// octetTotalCount (or octetDeltaCount).
    pub octets: u64,
    /// flowStartMilliseconds.
    pub flow_start_ms: u64,
    /// flowEndMilliseconds.
    pub flow_end_ms: u64,
    /// flowEndReason.
    pub flow_end_reason: u8,
    /// firewallEvent.
    pub firewall_event: u8,
    /// forwardingStatus.
    pub forwarding_status: u8,
    /// biflowDirection (1 initiator, 2 reverse initiator).
    pub biflow_direction: u8,
    /// flowId.
    pub flow_id: u64,
    /// Source VM name.
    pub src_vm_name: String,
    /// Destination VM name.
    pub dst_vm_name: String,
    /// Source zone.
    pub src_zone: String,
    /// Destination zone.
    pub dst_zone: String,
    /// Deciding rule ids, `,`-joined.
    pub rule_id: String,
    /// Their levels, `,`-joined.
    pub rule_level: String,
    /// Their chains, `,`-joined.
    pub rule_chain: String,
    /// Policy version.
    pub policy_version: u64,
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedMessage {
    /// Its header.
    pub header: MessageHeader,
    /// Ids of the templates it defined, in order.
    pub templates: Vec<u16>,
    /// Its data records, in order.
    pub records: Vec<DecodedRecord>,
}

/// A bounds-checked reader over a byte slice, naming what it reads in errors.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Offset of `buf` within the message, for error messages.
    base: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], base: usize) -> Self {
        Reader { buf, pos: 0, base }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], IpfixError> {
        if self.remaining() < n {
            return Err(IpfixError::Truncated {
                what,
                offset: self.base + self.pos,
                needed: n,
                available: self.remaining(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, IpfixError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, IpfixError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// An unsigned integer in reduced-size encoding (RFC 7011 §6.2): 1 to 8 bytes.
fn uint(f: FieldSpec, b: &[u8]) -> Result<u64, IpfixError> {
    if b.is_empty() || b.len() > 8 {
        return Err(IpfixError::BadFieldLength {
            pen: f.pen,
            id: f.id,
            length: b.len(),
        });
    }
    Ok(b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
}

fn string(f: FieldSpec, b: &[u8]) -> Result<String, IpfixError> {
    String::from_utf8(b.to_vec()).map_err(|_| IpfixError::InvalidUtf8 { pen: f.pen, id: f.id })
}

fn addr(f: FieldSpec, b: &[u8], want: usize) -> Result<IpAddr, IpfixError> {
    match (want, <[u8; 4]>::try_from(b), <[u8; 16]>::try_from(b)) {
        (4, Ok(a), _) => Ok(IpAddr::V4(Ipv4Addr::from(a))),
        (16, _, Ok(a)) => {
            let a = Ipv6Addr::from(a);
            // The encoder carries a mixed-family pair as IPv4-mapped IPv6.
            Ok(a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4))
        }
        _ => Err(IpfixError::BadFieldLength {
            pen: f.pen,
            id: f.id,
            length: b.len(),
        }),
    }
}

/// A stateful IPFIX decoder: remembers templates across messages, per
/// observation domain, as a collector must over UDP.
#[derive(Debug, Default)]
pub struct Decoder {
    templates: HashMap<(u32, u16), Vec<FieldSpec>>,
}

impl Decoder {
    /// A decoder that knows no templates.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decode one message. Never panics; on error nothing is decoded, though
    /// templates defined earlier in the same message are kept.
    pub fn decode(&mut self, buf: &[u8]) -> Result<DecodedMessage, IpfixError> {
        let mut r = Reader::new(buf, 0);
        let version = r.u16("message header")?;
        if version != VERSION {
            return Err(IpfixError::BadVersion(version));
        }
        let length = r.u16("message header")?;
        let export_time = r.u32("message header")?;
        let sequence = r.u32("message header")?;
        let domain = r.u32("message header")?;
        if usize::from(length) != buf.len() {
            return Err(IpfixError::BadMessageLength {
                header: length,
                actual: buf.len(),
            });
        }
        let header = MessageHeader {
            length,
            export_time,
            sequence,
            domain,
        };
        let mut msg = DecodedMessage {
            header,
            templates: Vec::new(),
            records: Vec::new(),
        };
        while r.remaining() > 0 {
            let offset = r.pos;
            let set_id = r.u16("set header")?;
            let set_len = r.u16("set header")?;
            if usize::from(set_len) < SET_HEADER_LEN || usize::from(set_len) - SET_HEADER_LEN > r.remaining() {
                return Err(IpfixError::BadSetLength {
                    offset,
                    length: set_len,
                });
            }
            let body = r.take(usize::from(set_len) - SET_HEADER_LEN, "set body")?;
            let base = offset + SET_HEADER_LEN;
            match set_id {
                TEMPLATE_SET_ID => self.templates_set(domain, body, base, &mut msg.templates)?,
                // Options templates describe exporter metadata, which this decoder does not use.
                OPTIONS_TEMPLATE_SET_ID => {}
                256.. => {
                    let fields = self
                        .templates
                        .get(&(domain, set_id))
                        .ok_or(IpfixError::UnknownTemplate(set_id))?;
                    data_set(set_id, fields, body, base, &mut msg.records)?;
                }
                id => return Err(IpfixError::ReservedSetId { id, offset }),
            }
        }
        Ok(msg)
    }

    fn templates_set(
        &mut self,
        domain: u32,
        body: &[u8],
        base: usize,
        defined: &mut Vec<u16>,
    ) -> Result<(), IpfixError> {
        let mut r = Reader::new(body, base);
        // Fewer than 4 bytes left is padding (RFC 7011 §3.3.1).
        while r.remaining() >= 4 {
            let offset = base + r.pos;
            let id = r.u16("template header")?;
            let count = r.u16("template header")?;
            if id < 256 {
                return Err(IpfixError::BadTemplate {
                    offset,
                    reason: "template id below 256",
                });
            }
            if count == 0 {
                // A withdrawal (RFC 7011 §8.1).
                self.templates.remove(&(domain, id));
                continue;
            }
            let mut fields = Vec::with_capacity(usize::from(count));
            for _ in 0..count {
                let raw_id = r.u16("field specifier")?;
                let len = r.u16("field specifier")?;
                let (id, pen) = if raw_id & ENTERPRISE_BIT != 0 {
                    (raw_id & !ENTERPRISE_BIT, r.u32("enterprise number")?)
                } else {
                    (raw_id, 0)
                };
                if len == 0 {
                    return Err(IpfixError::BadTemplate {
                        offset,
                        reason: "field of length 0",
                    });
                }
                fields.push(FieldSpec { pen, id, len });
            }
            self.templates.insert((domain, id), fields);
            defined.push(id);
        }
        Ok(())
    }
}

/// Decode the records of one data set.
fn data_set(
    template_id: u16,
    fields: &[FieldSpec],
    body: &[u8],
    base: usize,
    out: &mut Vec<DecodedRecord>,
) -> Result<(), IpfixError> {
    // The shortest possible record (a variable-length field takes at least its
    // length byte); anything shorter at the end of the set is padding. Never 0,
    // because templates with a zero-length field are refused.
    let min_len: usize = fields
        .iter()
        .map(|f| if f.len == VARLEN { 1 } else { usize::from(f.len) })
        .sum();
    let mut r = Reader::new(body, base);
    while r.remaining() >= min_len {
        out.push(data_record(template_id, fields, &mut r)?);
    }
    Ok(())
}

fn data_record(template_id: u16, fields: &[FieldSpec], r: &mut Reader<'_>) -> Result<DecodedRecord, IpfixError> {
    let mut src = None;
    let mut dst = None;
    let mut d = DecodedRecord {
        template_id,
        src_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        dst_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        icmp_type_code: 0,
        src_port: 0,
        dst_port: 0,
        protocol: 0,
        packets: 0,
        octets: 0,
        flow_start_ms: 0,
        flow_end_ms: 0,
        flow_end_reason: 0,
        firewall_event: 0,
        forwarding_status: 0,
        biflow_direction: 0,
        flow_id: 0,
        src_vm_name: String::new(),
        dst_vm_name: String::new(),
        src_zone: String::new(),
        dst_zone: String::new(),
        rule_id: String::new(),
        rule_level: String::new(),
        rule_chain: String::new(),
        policy_version: 0,
    };
    for &f in fields {
        let len = if f.len == VARLEN {
            let first = r.take(1, "variable-length field")?[0];
            if first == 255 {
                usize::from(r.u16("variable-length field")?)
            } else {
                usize::from(first)
            }
        } else {
            usize::from(f.len)
        };
        let b = r.take(len, "data record field")?;
        match (f.pen, f.id) {
            (0, ie::SOURCE_IPV4_ADDRESS) => src = Some(addr(f, b, 4)?),
            (0, ie::DESTINATION_IPV4_ADDRESS) => dst = Some(addr(f, b, 4)?),
            (0, ie::SOURCE_IPV6_ADDRESS) => src = Some(addr(f, b, 16)?),
            (0, ie::DESTINATION_IPV6_ADDRESS) => dst = Some(addr(f, b, 16)?),
            (0, ie::ICMP_TYPE_CODE_IPV4 | ie::ICMP_TYPE_CODE_IPV6) => d.icmp_type_code = narrow(f, b)?,
            (0, ie::SOURCE_TRANSPORT_PORT) => d.src_port = narrow(f, b)?,
            (0, ie::DESTINATION_TRANSPORT_PORT) => d.dst_port = narrow(f, b)?,
            (0, ie::PROTOCOL_IDENTIFIER) => d.protocol = narrow(f, b)?,
            (0, ie::PACKET_TOTAL_COUNT | ie::PACKET_DELTA_COUNT) => d.packets = uint(f, b)?,
            (0, ie::OCTET_TOTAL_COUNT | ie::OCTET_DELTA_COUNT) => d.octets = uint(f, b)?,
            (0, ie::FLOW_START_MILLISECONDS) => d.flow_start_ms = uint(f, b)?,
            (0, ie::FLOW_END_MILLISECONDS) => d.flow_end_ms = uint(f, b)?,
            (0, ie::FLOW_END_REASON) => d.flow_end_reason = narrow(f, b)?,
            (0, ie::FIREWALL_EVENT) => d.firewall_event = narrow(f, b)?,
            (0, ie::FORWARDING_STATUS) => d.forwarding_status = narrow(f, b)?,
            (0, ie::BIFLOW_DIRECTION) => d.biflow_direction = narrow(f, b)?,
            (0, ie::FLOW_ID) => d.flow_id = uint(f, b)?,
            (PALISADE_PEN, ent::SOURCE_VM_NAME) => d.src_vm_name = string(f, b)?,
            (PALISADE_PEN, ent::DESTINATION_VM_NAME) => d.dst_vm_name = string(f, b)?,
            (PALISADE_PEN, ent::SOURCE_ZONE) => d.src_zone = string(f, b)?,
            (PALISADE_PEN, ent::DESTINATION_ZONE) => d.dst_zone = string(f, b)?,
            (PALISADE_PEN, ent::RULE_ID) => d.rule_id = string(f, b)?,
            (PALISADE_PEN, ent::RULE_LEVEL) => d.rule_level = string(f, b)?,
            (PALISADE_PEN, ent::RULE_CHAIN) => d.rule_chain = string(f, b)?,
            (PALISADE_PEN, ent::POLICY_VERSION) => d.policy_version = uint(f, b)?,
            // Elements this decoder does not know are skipped, as a collector must.
            _ => {}
        }
    }
    match (src, dst) {
        (Some(s), Some(t)) => {
            d.src_addr = s;
            d.dst_addr = t;
            Ok(d)
        }
        _ => Err(IpfixError::MissingAddresses(template_id)),
    }
}

/// An unsigned element that must fit the narrower Rust type.
fn narrow<T: TryFrom<u64>>(f: FieldSpec, b: &[u8]) -> Result<T, IpfixError> {
    T::try_from(uint(f, b)?).map_err(|_| IpfixError::BadFieldLength {
        pen: f.pen,
        id: f.id,
        length: b.len(),
    })
}

/// Decode one self-contained message (its data sets' templates must be in it)
/// into its data records.
pub fn decode_message(buf: &[u8]) -> Result<Vec<DecodedRecord>, IpfixError> {
    Decoder::new().decode(buf).map(|m| m.records)
}

/// Why [`IpfixExporter::export`] or [`IpfixExporter::flush`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// Sending a message failed; its records are lost (counted in
    /// [`ExportStats::send_errors`] and [`ExportStats::data_records_lost`]).
    #[error("sending an IPFIX message: {0}")]
    Io(#[from] io::Error),
    /// The record was over the rate limit and dropped (counted in
    /// [`ExportStats::records_dropped_rate_limit`]).
    #[error("IPFIX export rate limit reached, record dropped")]
    RateLimited,
}

/// Counters of an exporter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Flow records accepted (within the rate limit) and encoded for sending.
    pub records_exported: u64,
    /// Messages sent.
    pub messages_sent: u64,
    /// Flow records dropped by the rate limit.
    pub records_dropped_rate_limit: u64,
    /// Messages whose send failed.
    pub send_errors: u64,
    /// Template records sent (two per template refresh).
    pub templates_sent: u64,
    /// IPFIX data records sent (one or two per flow record).
    pub data_records_sent: u64,
    /// IPFIX data records lost in messages whose send failed.
    pub data_records_lost: u64,
}

/// A token bucket holding at most one second of tokens, on the caller's clock.
#[derive(Debug)]
struct TokenBucket {
    rate: u32,
    tokens: u64,
    last: Option<u32>,
}

impl TokenBucket {
    fn take(&mut self, now: u32) -> bool {
        match self.last {
            None => self.tokens = u64::from(self.rate),
            Some(last) if now > last => {
                let refill = u64::from(now - last) * u64::from(self.rate);
                self.tokens = (self.tokens + refill).min(u64::from(self.rate));
            }
            // A clock that goes backwards refills nothing.
            Some(_) => {}
        }
        self.last = Some(self.last.map_or(now, |l| l.max(now)));
        if self.tokens > 0 {
            self.tokens -= 1;
            true
        } else {
            false
        }
    }
}

/// Exports flow records as IPFIX over UDP to one collector.
#[derive(Debug)]
pub struct IpfixExporter {
    socket: UdpSocket,
    domain: u32,
    message: MessageBuilder,
    open: bool,
    /// Data records sent (or lost) so far: the next message's sequence number.
    sequence: u32,
    messages_since_templates: u32,
    templates_at: Option<u32>,
    refresh_messages: u32,
    refresh_secs: u32,
    rate: Option<TokenBucket>,
    stats: ExportStats,
}

impl IpfixExporter {
    /// A UDP socket connected to `collector`, exporting as `observation_domain`.
    pub fn connect(collector: SocketAddr, observation_domain: u32) -> io::Result<IpfixExporter> {
        let local: SocketAddr = match collector {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(local)?;
        socket.connect(collector)?;
        Ok(IpfixExporter {
            socket,
            domain: observation_domain,
            message: MessageBuilder::default(),
            open: false,
            sequence: 0,
            messages_since_templates: 0,
            templates_at: None,
            refresh_messages: DEFAULT_TEMPLATE_REFRESH_MESSAGES,
            refresh_secs: DEFAULT_TEMPLATE_REFRESH_SECS,
            rate: None,
            stats: ExportStats::default(),
        })
    }

    /// Export at most `records_per_sec` flow records per second of the caller's
    /// clock (bursts up to one second's worth); 0 drops every record.
    pub fn with_rate_limit(mut self, records_per_sec: u32) -> Self {
        self.rate = Some(TokenBucket {
            rate: records_per_sec,
            tokens: 0,
            last: None,
        });
        self
    }

    /// Re-send templates after `messages` messages without them or `secs`
    /// seconds since they were last sent (each at least 1).
    pub fn with_template_refresh(mut self, messages: u32, secs: u32) -> Self {
        self.refresh_messages = messages.max(1);
        self.refresh_secs = secs.max(1);
        self
    }

    /// Buffer `rec`; when the message is full, send it and start the next. An
    /// error from sending a full message is returned after `rec` was buffered.
    pub fn export(&mut self, rec: &FlowRecord, now_unix_s: u32) -> Result<(), ExportError> {
        if let Some(bucket) = &mut self.rate
            && !bucket.take(now_unix_s)
        {
            self.stats.records_dropped_rate_limit += 1;
            return Err(ExportError::RateLimited);
        }
        self.stats.records_exported += 1;
        let (fwd, rev) = data_records(rec);
        let mut result = self.push(&fwd, now_unix_s);
        if let Some(rev) = rev {
            let r = self.push(&rev, now_unix_s);
            result = result.and(r);
        }
        result
    }

    fn push(&mut self, rec: &DataRecord<'_>, now: u32) -> Result<(), ExportError> {
        if !self.open {
            self.open_message(now);
        }
        if self.message.push(rec, MAX_MESSAGE_LEN) {
            return Ok(());
        }
        let sent = self.send(now);
        self.open_message(now);
        // An empty message always takes a record (see MessageBuilder::push).
        let pushed = self.message.push(rec, MAX_MESSAGE_LEN);
        debug_assert!(pushed);
        sent
    }

    fn open_message(&mut self, now: u32) {
        let due = match self.templates_at {
            None => true,
            Some(at) => {
                self.messages_since_templates >= self.refresh_messages || now.saturating_sub(at) >= self.refresh_secs
            }
        };
        self.message.start(due);
        self.open = true;
    }

    /// Send the open message, if it has records.
    fn send(&mut self, now: u32) -> Result<(), ExportError> {
        if !self.open || self.message.data_records == 0 {
            return Ok(());
        }
        self.open = false;
        let n = self.message.data_records;
        let with_templates = self.message.with_templates;
        let bytes = self.message.finish(self.sequence, self.domain, now);
        let result = self.socket.send(bytes);
        self.sequence = self.sequence.wrapping_add(n);
        match result {
            Ok(sent) if sent == bytes.len() => {
                self.stats.messages_sent += 1;
                self.stats.data_records_sent += u64::from(n);
                if with_templates {
                    self.stats.templates_sent += 2;
                    self.templates_at = Some(now);
                    self.messages_since_templates = 0;
                } else {
                    self.messages_since_templates += 1;
                }
                Ok(())
            }
            other => {
                self.stats.send_errors += 1;
                self.stats.data_records_lost += u64::from(n);
                if with_templates {
                    // The collector may not have them: send them again in the next message.
                    self.templates_at = None;
                }
                Err(match other {
                    Err(e) => ExportError::Io(e),
                    Ok(_) => ExportError::Io(io::Error::new(io::ErrorKind::WriteZero, "short UDP send")),
                })
            }
        }
    }

    /// Send the buffered records now (call it periodically, so records do not
    /// wait for a full message).
    pub fn flush(&mut self, now_unix_s: u32) -> Result<(), ExportError> {
        self.send(now_unix_s)
    }

    /// The counters.
    pub fn stats(&self) -> ExportStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Decision, Endpoint, IcmpMessage, VmIdentity};
    use std::time::Duration;

    fn vm(name: &str, zone: &str) -> Option<VmIdentity> {
        Some(VmIdentity {
            name: name.into(),
            uuid: format!("uuid-{name}"),
            vnic: format!("{name}.0"),
            zone: zone.into(),
            cluster: None,
            host: None,
            tags: Default::default(),
        })
    }

    fn decision(rule: &str, level: &str, version: u64, chain: &str) -> Decision {
        Decision {
            rule: rule.into(),
            level: level.into(),
            policy_version: version,
            chain: chain.into(),
        }
    }

    fn flow(i: u64) -> FlowRecord {
        FlowRecord {
            appliance: None,
            time_ns: 1_700_000_000_000_000_000 + i,
            flow_id: i,
            host: "hv1".into(),
            phase: Phase::End(EndReason::Fin),
            src: Endpoint {
                addr: IpAddr::V4(Ipv4Addr::new(10, 0, 1, (i % 250) as u8 + 1)),
                port: 40000 + i as u16,
                vm: vm("web-1", "web"),
            },
            dst: Endpoint {
                addr: "203.0.113.10".parse().unwrap(),
                port: 443,
                vm: None,
            },
            protocol: 6,
            icmp: None,
            verdict: Verdict::Allow,
            decided_by: vec![
                decision("web-out", "zone", 3, "egress"),
                decision("db-in", "vm", 3, "ingress"),
            ],
            packets_out: 10 + i,
            bytes_out: 1000 + i,
            packets_in: 8,
            bytes_in: 9000,
            start_ns: 1_700_000_000_123_456_789,
            last_ns: 1_700_000_005_987_654_321,
        }
    }

    fn v6_flow() -> FlowRecord {
        let mut f = flow(1);
        f.src.addr = "2001:db8::1".parse().unwrap();
        f.dst.addr = "2001:db8:1::53".parse().unwrap();
        f.dst.port = 53;
        f.protocol = 17;
        f.dst.vm = vm("dns-1", "infra");
        f.phase = Phase::Start;
        f.verdict = Verdict::Deny;
        f.decided_by = vec![decision("no-dns", "datacenter", 9, "egress")];
        f.packets_in = 0;
        f.bytes_in = 0;
        f
    }

    /// The expected IPFIX records of `f`, written from the module documentation
    /// independently of `data_records`.
    fn expected(f: &FlowRecord) -> Vec<DecodedRecord> {
        let name = |e: &Endpoint| e.vm.as_ref().map(|v| cap(&v.name).to_string()).unwrap_or_default();
        let zone = |e: &Endpoint| e.vm.as_ref().map(|v| cap(&v.zone).to_string()).unwrap_or_default();
        let join =
            |g: fn(&Decision) -> &str| cap(&f.decided_by.iter().map(g).collect::<Vec<_>>().join(",")).to_string();
        // type << 8 | code; an echo's reverse direction carries the other echo type.
        let type_code = |reverse: bool| {
            f.icmp.map_or(0, |m| {
                let ty = match (reverse, m.ty) {
                    (true, 8) => 0,
                    (true, 0) => 8,
                    (true, 128) => 129,
                    (true, 129) => 128,
                    (_, t) => t,
                };
                u16::from(ty) * 256 + u16::from(m.code)
            })
        };
        let fwd = DecodedRecord {
            template_id: if f.src.addr.is_ipv4() && f.dst.addr.is_ipv4() {
                TEMPLATE_IPV4
            } else {
                TEMPLATE_IPV6
            },
            src_addr: f.src.addr,
            dst_addr: f.dst.addr,
            icmp_type_code: type_code(false),
            src_port: f.src.port,
            dst_port: f.dst.port,
            protocol: f.protocol,
            packets: f.packets_out,
            octets: f.bytes_out,
            flow_start_ms: f.start_ns / 1_000_000,
            flow_end_ms: f.last_ns / 1_000_000,
            flow_end_reason: end_reason(f.phase),
            firewall_event: firewall_event(f.verdict, f.phase),
            forwarding_status: forwarding_status(f.verdict),
            biflow_direction: 1,
            flow_id: f.flow_id,
            src_vm_name: name(&f.src),
            dst_vm_name: name(&f.dst),
            src_zone: zone(&f.src),
            dst_zone: zone(&f.dst),
            rule_id: join(|d| &d.rule),
            rule_level: join(|d| &d.level),
            rule_chain: join(|d| &d.chain),
            policy_version: f.decided_by.iter().map(|d| d.policy_version).max().unwrap_or(0),
        };
        let mut out = vec![fwd.clone()];
        if f.packets_in != 0 || f.bytes_in != 0 {
            out.push(DecodedRecord {
                src_addr: f.dst.addr,
                dst_addr: f.src.addr,
                icmp_type_code: type_code(true),
                src_port: f.dst.port,
                dst_port: f.src.port,
                packets: f.packets_in,
                octets: f.bytes_in,
                biflow_direction: 2,
                src_vm_name: fwd.dst_vm_name.clone(),
                dst_vm_name: fwd.src_vm_name.clone(),
                src_zone: fwd.dst_zone.clone(),
                dst_zone: fwd.src_zone.clone(),
                ..fwd
            });
        }
        out
    }

    #[test]
    fn value_mappings_follow_the_documented_tables() {
        assert_eq!(end_reason(Phase::Start), 0);
        assert_eq!(end_reason(Phase::Update), 2);
        assert_eq!(end_reason(Phase::End(EndReason::Timeout)), 1);
        assert_eq!(end_reason(Phase::End(EndReason::Rst)), 3);
        assert_eq!(end_reason(Phase::End(EndReason::Migrated)), 4);
        assert_eq!(end_reason(Phase::End(EndReason::Evicted)), 5);
        assert_eq!(firewall_event(Verdict::Reject, Phase::Start), 3);
        assert_eq!(firewall_event(Verdict::Allow, Phase::Update), 5);
        assert_eq!(firewall_event(Verdict::Allow, Phase::End(EndReason::Fin)), 2);
        assert_eq!(forwarding_status(Verdict::Deny), 130);
        assert_eq!(forwarding_status(Verdict::Allow) >> 6, 1, "forwarded");
        assert_eq!(forwarding_status(Verdict::Reject) >> 6, 2, "dropped");
    }

    #[test]
    fn round_trip_table() {
        let mut long = flow(2);
        let long_name = "x".repeat(300);
        long.src.vm = vm(&long_name, "z");
        long.dst.vm = vm(&"é".repeat(100), &"q".repeat(128)); // 200 bytes, cut at a char boundary
        let mut exact = flow(3);
        exact.src.vm = vm(&"n".repeat(MAX_STRING_LEN), "");
        let mut empty = flow(4);
        empty.src.vm = vm("", "");
        empty.decided_by.clear();
        let mut icmp = flow(5);
        icmp.protocol = 1;
        icmp.dst.port = 0;
        icmp.src.port = 0x1234;
        icmp.bytes_out = u64::MAX;
        icmp.packets_out = u64::MAX - 1;
        let mut echo = flow(9);
        echo.protocol = 1;
        (echo.src.port, echo.dst.port) = (0x4242, 0x4242);
        echo.icmp = Some(IcmpMessage { ty: 8, code: 0 });
        let mut unreachable = flow(10);
        unreachable.protocol = 1;
        (unreachable.src.port, unreachable.dst.port) = (0, 0x0301);
        unreachable.icmp = Some(IcmpMessage { ty: 3, code: 1 });
        unreachable.packets_in = 0;
        unreachable.bytes_in = 0;
        let mut echo6 = v6_flow();
        echo6.protocol = 58;
        (echo6.src.port, echo6.dst.port) = (7, 7);
        echo6.icmp = Some(IcmpMessage { ty: 129, code: 0 });
        echo6.packets_in = 1;
        let mut mixed = flow(6);
        mixed.dst.addr = "2001:db8::7".parse().unwrap();
        let cases: Vec<(&str, Vec<FlowRecord>)> = vec![
            ("v4", vec![flow(1)]),
            ("v6 denied", vec![v6_flow()]),
            ("long names", vec![long.clone()]),
            ("names at the cap", vec![exact]),
            ("empty strings", vec![empty]),
            ("icmp, huge counts", vec![icmp]),
            ("icmp echo request and its replies", vec![echo]),
            ("icmp unreachable", vec![unreachable]),
            ("icmpv6 echo reply and its requests", vec![echo6]),
            ("mixed families", vec![mixed]),
            ("interleaved", vec![flow(7), v6_flow(), flow(8), v6_flow(), long]),
            ("none", vec![]),
        ];
        for (name, records) in cases {
            let buf = encode_message(&records, 77, 5, 1_700_000_000, true);
            let msg = Decoder::new().decode(&buf).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(msg.header.sequence, 77, "{name}");
            assert_eq!(msg.header.domain, 5, "{name}");
            assert_eq!(msg.header.export_time, 1_700_000_000, "{name}");
            assert_eq!(msg.templates, vec![TEMPLATE_IPV4, TEMPLATE_IPV6], "{name}");
            let want: Vec<_> = records.iter().flat_map(expected).collect();
            assert_eq!(msg.records, want, "{name}");
        }
    }

    /// The ICMP element holds `type << 8 | code` (icmpTypeCodeIPv4 in the
    /// IPv4 template, icmpTypeCodeIPv6 in the IPv6 one), the reply's type in
    /// an echo request's reverse record, and 0 without an ICMP message.
    #[test]
    fn icmp_type_and_code_are_exported() {
        let mut echo = flow(1);
        echo.protocol = 1;
        echo.icmp = Some(IcmpMessage { ty: 8, code: 0 });
        let mut unreachable6 = v6_flow();
        unreachable6.protocol = 58;
        unreachable6.icmp = Some(IcmpMessage { ty: 1, code: 4 });
        let recs = decode_message(&encode_message(&[echo, unreachable6, flow(2)], 0, 0, 0, true)).unwrap();
        let got: Vec<(u16, u8, u16)> = recs
            .iter()
            .map(|r| (r.template_id, r.biflow_direction, r.icmp_type_code))
            .collect();
        assert_eq!(
            got,
            [
                (TEMPLATE_IPV4, 1, 0x0800),
                (TEMPLATE_IPV4, 2, 0x0000),
                (TEMPLATE_IPV6, 1, 0x0104),
                (TEMPLATE_IPV4, 1, 0),
                (TEMPLATE_IPV4, 2, 0),
            ]
        );
        let fields: Vec<u16> = template_fields(TEMPLATE_IPV4).map(|f| f.id).take(3).collect();
        assert_eq!(fields, [8, 12, 32]);
        let fields: Vec<u16> = template_fields(TEMPLATE_IPV6).map(|f| f.id).take(3).collect();
        assert_eq!(fields, [27, 28, 139]);
    }

    #[test]
    fn long_strings_are_cut_at_a_char_boundary() {
        let mut f = flow(1);
        f.src.vm = vm(&"é".repeat(100), "z");
        let recs = decode_message(&encode_message(&[f], 0, 0, 0, true)).unwrap();
        assert_eq!(recs[0].src_vm_name, "é".repeat(64));
        assert_eq!(recs[1].dst_vm_name, "é".repeat(64));
    }

    #[test]
    fn data_without_templates_needs_earlier_templates() {
        let buf = encode_message(&[flow(1)], 0, 9, 0, false);
        assert_eq!(decode_message(&buf), Err(IpfixError::UnknownTemplate(TEMPLATE_IPV4)));
        let mut d = Decoder::new();
        d.decode(&encode_message(&[], 0, 9, 0, true)).unwrap();
        assert_eq!(d.decode(&buf).unwrap().records, expected(&flow(1)));
        // Templates belong to their observation domain.
        let other = encode_message(&[flow(1)], 0, 10, 0, false);
        assert_eq!(d.decode(&other), Err(IpfixError::UnknownTemplate(TEMPLATE_IPV4)));
    }

    #[test]
    fn worst_case_record_fits_a_message_with_templates() {
        let mut f = v6_flow();
        let big = "w".repeat(1000);
        f.src.vm = vm(&big, &big);
        f.dst.vm = vm(&big, &big);
        f.decided_by = vec![decision(&big, &big, 1, &big)];
        let (fwd, _) = data_records(&f);
        assert_eq!(
            fwd.encoded_len(),
            32 + 2 + COMMON_FIXED_LEN + STRING_FIELDS * (1 + MAX_STRING_LEN)
        );
        assert!(HEADER_LEN + template_set_len() + SET_HEADER_LEN + fwd.encoded_len() <= MAX_MESSAGE_LEN);
        let buf = encode_message(&[f], 0, 0, 0, true);
        assert!(buf.len() <= MAX_MESSAGE_LEN, "{}", buf.len());
        assert_eq!(decode_message(&buf).unwrap().len(), 1);
    }

    #[test]
    fn template_set_length_matches_the_encoding() {
        let mut buf = Vec::new();
        put_template_set(&mut buf);
        assert_eq!(buf.len(), template_set_len());
    }

    fn corrupt(buf: &[u8], at: usize, bytes: &[u8]) -> Vec<u8> {
        let mut b = buf.to_vec();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        b
    }

    #[test]
    fn decoder_rejects_bad_buffers_with_clear_errors() {
        let good = encode_message(&[flow(1), v6_flow()], 0, 1, 0, true);
        let len = good.len();
        let short = &good[..10];
        assert!(matches!(
            decode_message(short),
            Err(IpfixError::Truncated {
                what: "message header",
                ..
            })
        ));
        assert_eq!(
            decode_message(&good[..len - 3]),
            Err(IpfixError::BadMessageLength {
                header: len as u16,
                actual: len - 3
            })
        );
        assert_eq!(
            decode_message(&corrupt(&good, 0, &[0, 9])),
            Err(IpfixError::BadVersion(9))
        );
        // A truncated message whose header length was fixed up: the last set overruns.
        let mut cut = good[..len - 3].to_vec();
        cut[2..4].copy_from_slice(&((len - 3) as u16).to_be_bytes());
        assert!(
            matches!(decode_message(&cut), Err(IpfixError::BadSetLength { .. })),
            "{:?}",
            decode_message(&cut)
        );
        // First set's length below its header.
        assert_eq!(
            decode_message(&corrupt(&good, 18, &[0, 2])),
            Err(IpfixError::BadSetLength { offset: 16, length: 2 })
        );
        assert_eq!(
            decode_message(&corrupt(&good, 16, &[0, 7])),
            Err(IpfixError::ReservedSetId { id: 7, offset: 16 })
        );
        // Template id below 256.
        assert!(matches!(
            decode_message(&corrupt(&good, 20, &[0, 5])),
            Err(IpfixError::BadTemplate { offset: 20, .. })
        ));
        // The first field (source IPv4 address) declared as 5 bytes long.
        assert!(matches!(
            decode_message(&corrupt(&good, 26, &[0, 5])),
            Err(IpfixError::BadFieldLength {
                pen: 0,
                id: 8,
                length: 5
            })
        ));
        // Garbage.
        let garbage: Vec<u8> = (0..500u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        assert!(decode_message(&garbage).is_err());
        assert!(decode_message(&[]).is_err());
    }

    #[test]
    fn decoder_never_panics_on_mutations() {
        let good = encode_message(&[flow(1), v6_flow(), flow(2)], 0, 1, 0, true);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mut b = good.clone();
            for k in 0..(state % 4 + 1) {
                let at = ((state >> (8 * k)) as usize) % b.len();
                b[at] = (state >> (16 + k)) as u8;
            }
            let cut = (state >> 40) as usize % (b.len() + 1);
            let _ = decode_message(&b);
            let _ = decode_message(&b[..cut]);
        }
    }

    struct Collector(UdpSocket);

    impl Collector {
        fn new() -> Self {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            Collector(s)
        }

        fn addr(&self) -> SocketAddr {
            self.0.local_addr().unwrap()
        }

        fn recv(&self, n: usize) -> Vec<Vec<u8>> {
            let mut buf = [0u8; 65536];
            (0..n)
                .map(|_| {
                    let len = self.0.recv(&mut buf).unwrap();
                    buf[..len].to_vec()
                })
                .collect()
        }
    }

    #[test]
    fn exporter_splits_into_mtu_sized_messages_with_templates() {
        let c = Collector::new();
        let mut e = IpfixExporter::connect(c.addr(), 42).unwrap();
        let records: Vec<FlowRecord> = (0..100).map(|i| if i % 3 == 0 { v6_flow() } else { flow(i) }).collect();
        for r in &records {
            e.export(r, 1000).unwrap();
        }
        e.flush(1000).unwrap();
        let stats = e.stats();
        assert_eq!(stats.records_exported, 100);
        assert!(stats.messages_sent > 5, "{stats:?}");
        let msgs = c.recv(stats.messages_sent as usize);
        let mut d = Decoder::new();
        let mut got = Vec::new();
        let mut seq = 0u32;
        for (i, m) in msgs.iter().enumerate() {
            assert!(m.len() <= MAX_MESSAGE_LEN, "message {i}: {} bytes", m.len());
            let msg = d.decode(m).unwrap();
            assert_eq!(msg.header.domain, 42);
            assert_eq!(msg.header.sequence, seq, "message {i}");
            seq += msg.records.len() as u32;
            // Templates in the first message, then every 16th (default refresh).
            let want_templates = i % DEFAULT_TEMPLATE_REFRESH_MESSAGES as usize == 0;
            assert_eq!(!msg.templates.is_empty(), want_templates, "message {i}");
            got.extend(msg.records);
        }
        let want: Vec<_> = records.iter().flat_map(expected).collect();
        assert_eq!(got, want);
        assert_eq!(stats.data_records_sent, want.len() as u64);
        assert_eq!(stats.templates_sent, 2 * msgs.len().div_ceil(16) as u64);
    }

    #[test]
    fn templates_are_resent_after_the_refresh_time() {
        let c = Collector::new();
        let mut e = IpfixExporter::connect(c.addr(), 1)
            .unwrap()
            .with_template_refresh(1000, 10);
        let mut with_templates = Vec::new();
        for now in [100, 105, 109, 110, 111, 125] {
            e.export(&flow(1), now).unwrap();
            e.flush(now).unwrap();
            let m = Decoder::new().decode(&c.recv(1)[0]);
            // A message without templates cannot be decoded by a fresh decoder.
            with_templates.push(m.is_ok());
        }
        assert_eq!(with_templates, [true, false, false, true, false, true]);
        assert_eq!(e.stats().templates_sent, 6);
    }

    #[test]
    fn rate_limit_counts_every_drop() {
        let c = Collector::new();
        let mut e = IpfixExporter::connect(c.addr(), 1).unwrap().with_rate_limit(10);
        let run = |e: &mut IpfixExporter, now: u32, n: usize| {
            (0..n)
                .map(|_| e.export(&v6_flow(), now))
                .filter(|r| matches!(r, Err(ExportError::RateLimited)))
                .count()
        };
        assert_eq!(run(&mut e, 100, 25), 15);
        assert_eq!(run(&mut e, 100, 3), 3);
        assert_eq!(run(&mut e, 101, 12), 2);
        // Two idle seconds refill one second's worth, not two.
        assert_eq!(run(&mut e, 103, 30), 20);
        // A clock going backwards refills nothing.
        assert_eq!(run(&mut e, 90, 1), 1);
        let s = e.stats();
        assert_eq!(s.records_dropped_rate_limit, 15 + 3 + 2 + 20 + 1);
        assert_eq!(s.records_exported, 10 + 10 + 10);
        e.flush(103).unwrap();
        let mut got = 0;
        let mut d = Decoder::new();
        for m in c.recv(e.stats().messages_sent as usize) {
            got += d.decode(&m).unwrap().records.len();
        }
        assert_eq!(got, 30, "denied v6 flows: one IPFIX record each");
    }

    #[test]
    fn send_errors_are_counted_and_templates_resent() {
        // A collector that went away: the connected socket gets ECONNREFUSED.
        let c = Collector::new();
        let addr = c.addr();
        drop(c);
        let mut e = IpfixExporter::connect(addr, 1).unwrap();
        let mut errors = 0;
        for now in 0..4 {
            e.export(&flow(1), now).unwrap();
            if e.flush(now).is_err() {
                errors += 1;
            }
        }
        let s = e.stats();
        assert!(errors >= 1, "{s:?}");
        assert_eq!(s.send_errors, errors);
        assert_eq!(s.messages_sent + s.send_errors, 4);
        assert_eq!(s.data_records_sent + s.data_records_lost, 8);
    }
}
