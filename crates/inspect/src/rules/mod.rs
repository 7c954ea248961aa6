//! The rule language: a subset of Suricata's, parsed with positions.
//!
//! A rule is `action protocol source ports direction destination ports
//! (options)`, for example
//!
//! ```text
//! alert http $HOME_NET any -> $EXTERNAL_NET any (msg:"x"; http.uri; content:"/a"; sid:1;)
//! ```
//!
//! [`parse_rule`] turns one rule's text into a [`Rule`]; [`parse_rules`] reads
//! a rules file (comments, blank lines, rules continued over lines ending in
//! `\`). Every refusal is a [`RuleError`] that names the line, the column and,
//! for an option, the keyword, so a ruleset author can fix it without
//! guessing. What is accepted is listed in the crate's README; anything else
//! (an unknown keyword, a pcre construct the engine cannot run in linear
//! time, a modifier without the content it modifies) is refused rather than
//! ignored, because a rule that silently means less than it says is worse
//! than one that does not load.

mod address;
mod content;
mod options;
pub mod pcre;
pub mod threshold_config;

use core::fmt;

pub use address::{AddressSet, PortSet, Vars};
pub use pcre::Pcre;

use crate::classification::Classifications;
use crate::error::{RuleError, RuleErrorKind};

/// What a rule does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Stop inspecting the packet (an IP-only pass rule: the whole flow).
    Pass,
    /// Raise an alert; in IPS mode also drop the packet and the flow.
    Drop,
    /// Raise an alert, drop, and answer with a TCP reset or ICMP unreachable.
    Reject,
    /// Raise an alert.
    Alert,
}

impl Action {
    /// The keyword.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pass => "pass",
            Action::Drop => "drop",
            Action::Reject => "reject",
            Action::Alert => "alert",
        }
    }
}

/// An application-layer protocol the engine parses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AppProto {
    /// HTTP/1.x.
    Http,
    /// TLS (the ClientHello's server name).
    Tls,
    /// DNS queries, over UDP or TCP.
    Dns,
}

impl AppProto {
    /// The name EVE's `app_proto` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            AppProto::Http => "http",
            AppProto::Tls => "tls",
            AppProto::Dns => "dns",
        }
    }
}

/// The protocol field of a rule header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Any IP packet.
    Ip,
    /// TCP (packet and stream).
    Tcp,
    /// TCP packets only (`tcp-pkt`).
    TcpPkt,
    /// TCP stream only (`tcp-stream`).
    TcpStream,
    /// UDP.
    Udp,
    /// ICMP for IPv4 and IPv6.
    Icmp,
    /// ICMP for IPv4.
    Icmpv4,
    /// ICMP for IPv6.
    Icmpv6,
    /// An application protocol over its transport(s).
    App(AppProto),
}

impl Protocol {
    /// Whether a packet of IP protocol `proto` can match.
    pub fn admits(self, proto: u8) -> bool {
        match self {
            Protocol::Ip => true,
            Protocol::Tcp | Protocol::TcpPkt | Protocol::TcpStream => proto == 6,
            Protocol::Udp => proto == 17,
            Protocol::Icmp => proto == 1 || proto == 58,
            Protocol::Icmpv4 => proto == 1,
            Protocol::Icmpv6 => proto == 58,
            Protocol::App(AppProto::Http) | Protocol::App(AppProto::Tls) => proto == 6,
            Protocol::App(AppProto::Dns) => proto == 6 || proto == 17,
        }
    }
}

/// The data a payload keyword inspects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Buffer {
    /// The packet payload, or the reassembled TCP stream.
    Payload,
    /// The normalized request URI (`http.uri`, `http_uri`, `uricontent`).
    HttpUri,
    /// The request method (`http.method`).
    HttpMethod,
    /// The Host header's value, lowercased (`http.host`).
    HttpHost,
    /// The request or response header lines, Cookie and Set-Cookie left out (`http.header`).
    HttpHeader,
    /// The User-Agent header's value (`http.user_agent`).
    HttpUserAgent,
    /// The response status code (`http.stat_code`).
    HttpStatCode,
    /// The TLS ClientHello's server name (`tls.sni`).
    TlsSni,
    /// A DNS query name (`dns.query`), one buffer per question.
    DnsQuery,
}

/// Number of [`Buffer`] kinds.
pub const BUFFER_KINDS: usize = 9;

/// Which way data must flow for a buffer to exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferDirection {
    /// Client to server.
    ToServer,
    /// Server to client.
    ToClient,
    /// Either.
    Both,
}

impl Buffer {
    /// All kinds, in index order.
    pub const ALL: [Buffer; BUFFER_KINDS] = [
        Buffer::Payload,
        Buffer::HttpUri,
        Buffer::HttpMethod,
        Buffer::HttpHost,
        Buffer::HttpHeader,
        Buffer::HttpUserAgent,
        Buffer::HttpStatCode,
        Buffer::TlsSni,
        Buffer::DnsQuery,
    ];

    /// A dense index, for tables over buffer kinds.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The application protocol the buffer belongs to (`None` for the payload).
    pub fn app_proto(self) -> Option<AppProto> {
        match self {
            Buffer::Payload => None,
            Buffer::HttpUri
            | Buffer::HttpMethod
            | Buffer::HttpHost
            | Buffer::HttpHeader
            | Buffer::HttpUserAgent
            | Buffer::HttpStatCode => Some(AppProto::Http),
            Buffer::TlsSni => Some(AppProto::Tls),
            Buffer::DnsQuery => Some(AppProto::Dns),
        }
    }

    /// Which direction's data the buffer comes from.
    pub fn direction(self) -> BufferDirection {
        match self {
            Buffer::Payload | Buffer::HttpHeader => BufferDirection::Both,
            Buffer::HttpStatCode => BufferDirection::ToClient,
            _ => BufferDirection::ToServer,
        }
    }

    /// The sticky-buffer keyword.
    pub fn keyword(self) -> &'static str {
        match self {
            Buffer::Payload => "pkt_data",
            Buffer::HttpUri => "http.uri",
            Buffer::HttpMethod => "http.method",
            Buffer::HttpHost => "http.host",
            Buffer::HttpHeader => "http.header",
            Buffer::HttpUserAgent => "http.user_agent",
            Buffer::HttpStatCode => "http.stat_code",
            Buffer::TlsSni => "tls.sni",
            Buffer::DnsQuery => "dns.query",
        }
    }
}

/// A comparison on an unsigned number (`dsize`, `bsize`, `itype`, `ttl`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UintMatch {
    /// `N`.
    Eq(u64),
    /// `!N`.
    Ne(u64),
    /// `<N`.
    Lt(u64),
    /// `<=N`.
    Le(u64),
    /// `>N`.
    Gt(u64),
    /// `>=N`.
    Ge(u64),
    /// `N<>M` or `N-M`: strictly between.
    Between(u64, u64),
}

impl UintMatch {
    /// Whether `x` satisfies the comparison.
    pub fn matches(self, x: u64) -> bool {
        match self {
            UintMatch::Eq(n) => x == n,
            UintMatch::Ne(n) => x != n,
            UintMatch::Lt(n) => x < n,
            UintMatch::Le(n) => x <= n,
            UintMatch::Gt(n) => x > n,
            UintMatch::Ge(n) => x >= n,
            UintMatch::Between(lo, hi) => x > lo && x < hi,
        }
    }
}

/// A `content` keyword with its modifiers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    /// The bytes to find.
    pub pattern: Vec<u8>,
    /// `content:!"…"`: matches when the bytes are absent.
    pub negated: bool,
    /// ASCII case-insensitive.
    pub nocase: bool,
    /// Where the search starts (absolute).
    pub offset: u32,
    /// How far from the start (or from the previous match, when relative) the match must end.
    pub depth: Option<u32>,
    /// Start at least this far after the previous match (may be negative).
    pub distance: Option<i32>,
    /// End within this many bytes of the previous match (plus `distance`).
    pub within: Option<u32>,
    /// The match must end at the end of the buffer.
    pub endswith: bool,
    /// `startswith` was given (depth and offset were set from it).
    pub startswith: bool,
    /// The rule chose this content as its fast pattern.
    pub fast_pattern: bool,
    /// `fast_pattern:offset,length`: only this part feeds the prefilter.
    pub fast_pattern_chop: Option<(u16, u16)>,
}

impl Content {
    fn new(pattern: Vec<u8>, negated: bool) -> Self {
        Content {
            pattern,
            negated,
            nocase: false,
            offset: 0,
            depth: None,
            distance: None,
            within: None,
            endswith: false,
            startswith: false,
            fast_pattern: false,
            fast_pattern_chop: None,
        }
    }

    /// Whether the content is placed relative to the previous match.
    pub fn is_relative(&self) -> bool {
        self.distance.is_some() || self.within.is_some()
    }

    /// The bytes the prefilter looks for.
    pub fn fast_bytes(&self) -> &[u8] {
        match self.fast_pattern_chop {
            Some((off, len)) => {
                let off = usize::from(off).min(self.pattern.len());
                let end = (off + usize::from(len)).min(self.pattern.len());
                &self.pattern[off..end]
            }
            None => &self.pattern,
        }
    }
}

/// One payload keyword, in the order written, within its buffer.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// `content`.
    Content(Content),
    /// `pcre`.
    Pcre(Pcre),
    /// `isdataat:[!]N[,relative]`.
    IsDataAt {
        /// Matches when there is no data there.
        negated: bool,
        /// The position that must hold data.
        offset: u32,
        /// Counted from the end of the previous match.
        relative: bool,
    },
    /// `bsize`: the whole buffer's length.
    Bsize(UintMatch),
}

impl Step {
    /// Whether this step is placed relative to the previous one.
    pub fn is_relative(&self) -> bool {
        match self {
            Step::Content(c) => c.is_relative(),
            Step::Pcre(p) => p.relative,
            Step::IsDataAt { relative, .. } => *relative,
            Step::Bsize(_) => false,
        }
    }
}

/// The payload keywords of one buffer, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct BufferMatch {
    /// What they inspect.
    pub buffer: Buffer,
    /// The keywords.
    pub steps: Vec<Step>,
}

/// `flow:` options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowOptions {
    /// `established`.
    pub established: bool,
    /// `not_established`.
    pub not_established: bool,
    /// `stateless`.
    pub stateless: bool,
    /// `to_server` / `from_client`.
    pub to_server: bool,
    /// `to_client` / `from_server`.
    pub to_client: bool,
    /// `only_stream`: match reassembled stream data only.
    pub only_stream: bool,
    /// `no_stream`: match packets only.
    pub no_stream: bool,
}

/// `flags:` on TCP packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlagsMatch {
    /// How the listed flags are compared.
    pub mode: FlagsMode,
    /// The listed flags, as the header's low byte (FIN = 0x01 … CWR = 0x80).
    pub flags: u8,
    /// Flags left out of the comparison (the part after the comma).
    pub ignore: u8,
}

/// The comparison of [`FlagsMatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagsMode {
    /// Exactly these (apart from the ignored ones).
    Exact,
    /// At least these (`+`).
    All,
    /// Any of these (`*`).
    Any,
    /// None of these (`!`).
    Not,
}

impl FlagsMatch {
    /// Whether a packet's flags byte satisfies this.
    pub fn matches(self, flags: u8) -> bool {
        let f = flags & !self.ignore;
        match self.mode {
            FlagsMode::Exact => f == self.flags,
            FlagsMode::All => f & self.flags == self.flags,
            FlagsMode::Any => f & self.flags != 0,
            FlagsMode::Not => f & self.flags == 0,
        }
    }
}

/// A check on a packet's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketCheck {
    /// `dsize`: the payload's length.
    Dsize(UintMatch),
    /// `flags`.
    Flags(FlagsMatch),
    /// `itype`.
    Itype(UintMatch),
    /// `icode`.
    Icode(UintMatch),
    /// `ttl` (IPv6: hop limit).
    Ttl(UintMatch),
    /// `ip_proto`.
    IpProto(UintMatch),
}

/// A `flowbits` keyword.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flowbit {
    /// `set,name`.
    Set(String),
    /// `unset,name`.
    Unset(String),
    /// `toggle,name`.
    Toggle(String),
    /// `isset,a|b`: any of the names is set.
    IsSet(Vec<String>),
    /// `isnotset,a|b`: any of the names is not set.
    IsNotSet(Vec<String>),
}

/// What a threshold counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Track {
    /// Source address.
    BySrc,
    /// Destination address.
    ByDst,
    /// The rule, across all traffic.
    ByRule,
    /// Source and destination pair.
    ByBoth,
    /// The flow.
    ByFlow,
}

/// What a threshold does with the matches it counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThresholdKind {
    /// `type limit`: alert on the first `count` matches of each window.
    Limit,
    /// `type threshold`: alert on every `count`th match within a window.
    Threshold,
    /// `type both`: alert once per window, on the `count`th match.
    Both,
    /// `detection_filter`: alert on every match after the first `count` of a window.
    DetectionFilter,
}

/// `threshold` or `detection_filter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threshold {
    /// What it does.
    pub kind: ThresholdKind,
    /// What it counts by.
    pub track: Track,
    /// The count.
    pub count: u32,
    /// The window, in seconds.
    pub seconds: u32,
}

/// A parsed rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The action.
    pub action: Action,
    /// The protocol field.
    pub protocol: Protocol,
    /// Source addresses.
    pub src: AddressSet,
    /// Source ports.
    pub src_ports: PortSet,
    /// Destination addresses.
    pub dst: AddressSet,
    /// Destination ports.
    pub dst_ports: PortSet,
    /// `<>`: the header also matches with source and destination swapped.
    pub bidirectional: bool,
    /// Whether either address field held a negation or a range (such rules
    /// are checked on every packet, never as IP-only).
    pub header_has_negation: bool,
    /// `sid`.
    pub sid: u32,
    /// `gid` (default 1).
    pub gid: u32,
    /// `rev` (default 0).
    pub rev: u32,
    /// `msg`.
    pub msg: String,
    /// `classtype`.
    pub classtype: Option<String>,
    /// `priority`, when given.
    pub priority: Option<u8>,
    /// `metadata` entries.
    pub metadata: Vec<String>,
    /// `reference` entries.
    pub references: Vec<String>,
    /// `flow`.
    pub flow: FlowOptions,
    /// Header checks.
    pub packet: Vec<PacketCheck>,
    /// Payload keywords, grouped by buffer, buffers in order of first use.
    pub buffers: Vec<BufferMatch>,
    /// `flowbits` conditions and actions, in order.
    pub flowbits: Vec<Flowbit>,
    /// `flowbits:noalert`.
    pub noalert: bool,
    /// `threshold`.
    pub threshold: Option<Threshold>,
    /// `detection_filter`.
    pub detection_filter: Option<Threshold>,
    /// The line the rule starts on (1-based; 1 for a rule parsed alone).
    pub line: usize,
}

impl Rule {
    /// The application protocol the rule requires: from its protocol field or its buffers.
    pub fn app_proto(&self) -> Option<AppProto> {
        match self.protocol {
            Protocol::App(p) => Some(p),
            _ => self.buffers.iter().find_map(|b| b.buffer.app_proto()),
        }
    }

    /// The payload keywords of `buffer`, if any.
    pub fn buffer(&self, buffer: Buffer) -> Option<&BufferMatch> {
        self.buffers.iter().find(|b| b.buffer == buffer)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{} {}", self.gid, self.sid, self.rev, self.msg)
    }
}

/// A rule file's text after comments and continuations are handled: the
/// rule's text and, for each byte, where it came from.
struct Joined {
    text: String,
    /// (offset in `text`, line, column of that offset), ascending.
    origins: Vec<(usize, usize, usize)>,
}

impl Joined {
    fn position(&self, offset: usize) -> (usize, usize) {
        let i = self.origins.partition_point(|&(o, _, _)| o <= offset).max(1) - 1;
        let (o, line, col) = self.origins[i];
        (line, col + (offset - o))
    }
}

/// What rules are parsed against: the address and port variables and the classification table.
#[derive(Debug, Clone, Default)]
pub struct RuleContext {
    /// `$NAME` variables.
    pub vars: Vars,
    /// Classtypes.
    pub classifications: Classifications,
}

/// Parses one rule.
pub fn parse_rule(text: &str, ctx: &RuleContext) -> Result<Rule, RuleError> {
    let joined = Joined {
        text: text.to_string(),
        origins: vec![(0, 1, 1)],
    };
    parse_joined(&joined, ctx)
}

/// The outcome of reading a rules file: the rules that parsed and the errors
/// of those that did not, in file order.
#[derive(Debug, Default)]
pub struct ParsedRules {
    /// Accepted rules.
    pub rules: Vec<Rule>,
    /// Refused rules.
    pub errors: Vec<RuleError>,
}

/// Longest rule accepted, in bytes (Suricata's limit is 8 KiB; rules longer
/// than this are almost certainly not rules).
pub const MAX_RULE_LEN: usize = 64 * 1024;

/// Reads a rules file: one rule per line, `#` comments and blank lines
/// ignored, a line ending in `\` continued on the next. Each rule is parsed
/// on its own, so one bad rule does not hide the others.
pub fn parse_rules(text: &str, ctx: &RuleContext) -> ParsedRules {
    let mut out = ParsedRules::default();
    let mut current: Option<Joined> = None;
    for (idx, raw) in text.split('\n').enumerate() {
        let line_no = idx + 1;
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let (body, col0) = match &current {
            Some(_) => (line, 1),
            None => {
                let trimmed = line.trim_start();
                if trimmed.is_empty() || trimmed.starts_with('#') {
                    continue;
                }
                (trimmed, 1 + line.len() - trimmed.len())
            }
        };
        let (body, continued) = match body.trim_end().strip_suffix('\\') {
            Some(b) => (b, true),
            None => (body, false),
        };
        let joined = current.get_or_insert_with(|| Joined {
            text: String::new(),
            origins: Vec::new(),
        });
        if joined.text.len() + body.len() > MAX_RULE_LEN {
            out.errors.push(RuleError::new(
                joined.origins.first().map_or(line_no, |o| o.1),
                1,
                None,
                RuleErrorKind::TooLong(MAX_RULE_LEN),
            ));
            current = None;
            continue;
        }
        joined.origins.push((joined.text.len(), line_no, col0));
        joined.text.push_str(body);
        if continued {
            continue;
        }
        let joined = current.take().expect("set above");
        match parse_joined(&joined, ctx) {
            Ok(rule) => out.rules.push(rule),
            Err(e) => out.errors.push(e),
        }
    }
    if let Some(joined) = current {
        let (line, col) = joined.position(joined.text.len());
        out.errors
            .push(RuleError::new(line, col, None, RuleErrorKind::Unterminated));
    }
    out
}

fn parse_joined(joined: &Joined, ctx: &RuleContext) -> Result<Rule, RuleError> {
    let vars = &ctx.vars;
    let text = joined.text.as_str();
    let err = |offset: usize, keyword: Option<&str>, kind: RuleErrorKind| {
        let (line, col) = joined.position(offset);
        RuleError::new(line, col, keyword.map(str::to_string), kind)
    };
    let open = text
        .find('(')
        .ok_or_else(|| err(text.len(), None, RuleErrorKind::MissingOptions))?;
    let header = &text[..open];
    let fields: Vec<(usize, &str)> = split_whitespace_with_offsets(header);
    if fields.len() != 7 {
        let at = fields.get(7).map_or(open, |f| f.0);
        return Err(err(at, None, RuleErrorKind::BadHeader(fields.len())));
    }
    let (a_at, action) = fields[0];
    let action = match action {
        "alert" => Action::Alert,
        "drop" => Action::Drop,
        "reject" | "rejectsrc" | "rejectdst" | "rejectboth" => Action::Reject,
        "pass" => Action::Pass,
        other => return Err(err(a_at, None, RuleErrorKind::UnknownAction(other.to_string()))),
    };
    let (p_at, proto) = fields[1];
    let protocol = match proto.to_ascii_lowercase().as_str() {
        "ip" | "pkthdr" => Protocol::Ip,
        "tcp" => Protocol::Tcp,
        "tcp-pkt" => Protocol::TcpPkt,
        "tcp-stream" => Protocol::TcpStream,
        "udp" => Protocol::Udp,
        "icmp" => Protocol::Icmp,
        "icmpv4" => Protocol::Icmpv4,
        "icmpv6" => Protocol::Icmpv6,
        "http" | "http1" => Protocol::App(AppProto::Http),
        "tls" | "ssl" => Protocol::App(AppProto::Tls),
        "dns" => Protocol::App(AppProto::Dns),
        _ => return Err(err(p_at, None, RuleErrorKind::UnknownProtocol(proto.to_string()))),
    };
    let group_err = |at: usize, e: address::GroupError| err(at, None, RuleErrorKind::BadGroup(e.0));
    let (s_at, src_text) = fields[2];
    let src = address::parse_addresses(src_text, vars).map_err(|e| group_err(s_at, e))?;
    let (sp_at, sp_text) = fields[3];
    let src_ports = address::parse_ports(sp_text, vars).map_err(|e| group_err(sp_at, e))?;
    let (d_at, dir) = fields[4];
    let bidirectional = match dir {
        "->" => false,
        "<>" => true,
        other => return Err(err(d_at, None, RuleErrorKind::BadDirection(other.to_string()))),
    };
    let (t_at, dst_text) = fields[5];
    let dst = address::parse_addresses(dst_text, vars).map_err(|e| group_err(t_at, e))?;
    let (dp_at, dp_text) = fields[6];
    let dst_ports = address::parse_ports(dp_text, vars).map_err(|e| group_err(dp_at, e))?;
    let header_has_negation = resolves_with_negation(src_text, vars) || resolves_with_negation(dst_text, vars);

    let rest = &text[open + 1..];
    let close = rest.trim_end();
    let Some(body) = close.strip_suffix(')') else {
        return Err(err(text.len(), None, RuleErrorKind::Unterminated));
    };
    let body_at = open + 1;
    let mut rule = Rule {
        action,
        protocol,
        src,
        src_ports,
        dst,
        dst_ports,
        bidirectional,
        header_has_negation,
        sid: 0,
        gid: 1,
        rev: 0,
        msg: String::new(),
        classtype: None,
        priority: None,
        metadata: Vec::new(),
        references: Vec::new(),
        flow: FlowOptions::default(),
        packet: Vec::new(),
        buffers: Vec::new(),
        flowbits: Vec::new(),
        noalert: false,
        threshold: None,
        detection_filter: None,
        line: joined.position(0).0,
    };
    options::parse_options(
        &mut rule,
        body,
        body_at,
        &ctx.classifications,
        &|offset, keyword, kind| err(offset, keyword, kind),
    )?;
    Ok(rule)
}

/// Whether an address group written with variables expands to text holding a
/// negation or a range (`$EXTERNAL_NET` is `!$HOME_NET`).
fn resolves_with_negation(text: &str, vars: &Vars) -> bool {
    fn walk(text: &str, vars: &Vars, depth: usize) -> bool {
        if depth > 16 {
            return false;
        }
        if text.contains('!') || text.contains('-') {
            return true;
        }
        let mut rest = text;
        while let Some(i) = rest.find('$') {
            let name: String = rest[i + 1..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if let Some(v) = vars.address(&name)
                && walk(v, vars, depth + 1)
            {
                return true;
            }
            rest = &rest[i + 1 + name.len()..];
        }
        false
    }
    walk(text, vars, 0)
}

fn split_whitespace_with_offsets(s: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in s.char_indices() {
        match (c.is_whitespace(), start) {
            (true, Some(st)) => {
                out.push((st, &s[st..i]));
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(st) = start {
        out.push((st, &s[st..]));
    }
    out
}

#[cfg(test)]
mod tests;
