//! The option list of a rule: `keyword[:value];` pairs, in order.
//!
//! Order matters in the rule language. A sticky buffer (`http.uri;`) makes
//! the payload keywords after it inspect that buffer; a content modifier
//! (`nocase`, `depth`, `http_uri`, …) applies to the content before it; a
//! relative keyword (`distance`, `within`, `isdataat:N,relative`, `pcre`'s
//! `R`) is placed after the previous match in the same buffer. This module
//! walks the options once, keeping that state, and refuses what does not
//! make sense (a modifier with no content, `depth` shorter than its content,
//! relative and absolute placement mixed on one content) with the column of
//! the keyword.

use super::content::{ValueError, decode_content, decode_text, unquote};
use super::{
    Buffer, BufferMatch, Content, FlagsMatch, FlagsMode, Flowbit, PacketCheck, Protocol, Rule, Step, Threshold,
    ThresholdKind, Track, UintMatch, pcre,
};
use crate::classification::Classifications;
use crate::error::{RuleError, RuleErrorKind};

type ErrFn<'a> = &'a dyn Fn(usize, Option<&str>, RuleErrorKind) -> RuleError;

/// Where the last content, and the last content-or-pcre, are: (buffer index, step index).
#[derive(Default)]
struct State {
    sticky: Option<Buffer>,
    last_content: Option<(usize, usize)>,
    last_match: Option<(usize, usize)>,
    seen_sid: bool,
    seen_msg: bool,
}

/// One `keyword[:value]` with offsets into the rule text.
struct Opt<'a> {
    name: &'a str,
    name_at: usize,
    value: Option<&'a str>,
    value_at: usize,
}

fn split_options<'a>(body: &'a str, body_at: usize, err: ErrFn<'_>) -> Result<Vec<Opt<'a>>, RuleError> {
    let mut out = Vec::new();
    let bytes = body.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b';' => {
                push_opt(&mut out, body, start, i, body_at, err)?;
                start = i + 1;
                i += 1;
            }
            _ => i += 1,
        }
    }
    let tail = &body[start.min(body.len())..];
    if !tail.trim().is_empty() {
        let at = body_at + start + (tail.len() - tail.trim_start().len());
        let name = tail.trim().split(':').next().unwrap_or("").trim();
        return Err(err(at, Some(name), RuleErrorKind::MissingSemicolon));
    }
    Ok(out)
}

fn push_opt<'a>(
    out: &mut Vec<Opt<'a>>,
    body: &'a str,
    start: usize,
    end: usize,
    body_at: usize,
    err: ErrFn<'_>,
) -> Result<(), RuleError> {
    let raw = &body[start..end];
    let lead = raw.len() - raw.trim_start().len();
    let opt = raw.trim();
    if opt.is_empty() {
        return Err(err(
            body_at + start,
            None,
            RuleErrorKind::BadValue("empty option (two ';' in a row)".into()),
        ));
    }
    let name_at = body_at + start + lead;
    match opt.find(':') {
        Some(colon) => {
            let name = opt[..colon].trim();
            let value = &opt[colon + 1..];
            out.push(Opt {
                name,
                name_at,
                value: Some(value),
                value_at: name_at + colon + 1,
            });
        }
        None => out.push(Opt {
            name: opt,
            name_at,
            value: None,
            value_at: name_at + opt.len(),
        }),
    }
    Ok(())
}

pub(super) fn parse_options(
    rule: &mut Rule,
    body: &str,
    body_at: usize,
    classes: &Classifications,
    err: ErrFn<'_>,
) -> Result<(), RuleError> {
    let opts = split_options(body, body_at, err)?;
    let mut st = State::default();
    for opt in &opts {
        parse_option(rule, &mut st, opt, classes, err)?;
    }
    if !st.seen_sid {
        return Err(err(body_at, None, RuleErrorKind::MissingSid));
    }
    finish(rule, body_at, err)
}

fn bad(opt: &Opt<'_>, err: ErrFn<'_>, reason: impl Into<String>) -> RuleError {
    err(opt.name_at, Some(opt.name), RuleErrorKind::BadValue(reason.into()))
}

fn value_err(opt: &Opt<'_>, err: ErrFn<'_>, e: ValueError) -> RuleError {
    err(opt.value_at + e.at, Some(opt.name), RuleErrorKind::BadValue(e.reason))
}

fn need_value<'a>(opt: &Opt<'a>, err: ErrFn<'_>) -> Result<&'a str, RuleError> {
    match opt.value {
        Some(v) if !v.trim().is_empty() => Ok(v.trim()),
        _ => Err(bad(opt, err, "needs a value")),
    }
}

fn no_value(opt: &Opt<'_>, err: ErrFn<'_>) -> Result<(), RuleError> {
    match opt.value {
        None => Ok(()),
        Some(_) => Err(bad(opt, err, "takes no value")),
    }
}

fn number<T: std::str::FromStr>(opt: &Opt<'_>, err: ErrFn<'_>, text: &str, what: &str) -> Result<T, RuleError> {
    text.trim()
        .parse::<T>()
        .map_err(|_| bad(opt, err, format!("{:?} is not {what}", text.trim())))
}

fn sticky_buffer(name: &str) -> Option<Buffer> {
    Some(match name {
        "http.uri" => Buffer::HttpUri,
        "http.method" => Buffer::HttpMethod,
        "http.host" => Buffer::HttpHost,
        "http.header" => Buffer::HttpHeader,
        "http.user_agent" => Buffer::HttpUserAgent,
        "http.stat_code" => Buffer::HttpStatCode,
        "tls.sni" | "tls_sni" => Buffer::TlsSni,
        "dns.query" | "dns_query" => Buffer::DnsQuery,
        "pkt_data" => Buffer::Payload,
        _ => return None,
    })
}

fn legacy_modifier(name: &str) -> Option<Buffer> {
    Some(match name {
        "http_uri" => Buffer::HttpUri,
        "http_method" => Buffer::HttpMethod,
        "http_host" => Buffer::HttpHost,
        "http_header" => Buffer::HttpHeader,
        "http_user_agent" => Buffer::HttpUserAgent,
        "http_stat_code" => Buffer::HttpStatCode,
        _ => return None,
    })
}

fn push_step(rule: &mut Rule, buffer: Buffer, step: Step) -> (usize, usize) {
    let bi = match rule.buffers.iter().position(|b| b.buffer == buffer) {
        Some(i) => i,
        None => {
            rule.buffers.push(BufferMatch {
                buffer,
                steps: Vec::new(),
            });
            rule.buffers.len() - 1
        }
    };
    rule.buffers[bi].steps.push(step);
    (bi, rule.buffers[bi].steps.len() - 1)
}

fn last_content<'r>(
    rule: &'r mut Rule,
    st: &State,
    opt: &Opt<'_>,
    err: ErrFn<'_>,
) -> Result<&'r mut Content, RuleError> {
    let Some((bi, si)) = st.last_content else {
        return Err(bad(opt, err, "modifies a content, but no content precedes it"));
    };
    match &mut rule.buffers[bi].steps[si] {
        Step::Content(c) => Ok(c),
        _ => unreachable!("last_content always indexes a content"),
    }
}

fn parse_option(
    rule: &mut Rule,
    st: &mut State,
    opt: &Opt<'_>,
    classes: &Classifications,
    err: ErrFn<'_>,
) -> Result<(), RuleError> {
    let name = opt.name;
    if let Some(buffer) = sticky_buffer(name) {
        no_value(opt, err)?;
        if let Some(proto) = buffer.app_proto() {
            check_app_proto(rule, proto, opt, err)?;
        }
        st.sticky = if buffer == Buffer::Payload { None } else { Some(buffer) };
        return Ok(());
    }
    if let Some(buffer) = legacy_modifier(name) {
        no_value(opt, err)?;
        if st.sticky.is_some() {
            return Err(bad(
                opt,
                err,
                "a content modifier cannot follow a sticky buffer (use one style)",
            ));
        }
        check_app_proto(rule, buffer.app_proto().expect("http buffer"), opt, err)?;
        let Some((bi, si)) = st.last_content else {
            return Err(bad(opt, err, "modifies a content, but no content precedes it"));
        };
        if rule.buffers[bi].buffer != Buffer::Payload {
            return Err(bad(opt, err, "the content before it already has a buffer"));
        }
        if si + 1 != rule.buffers[bi].steps.len() {
            return Err(bad(opt, err, "must directly follow the content it modifies"));
        }
        let step = rule.buffers[bi].steps.pop().expect("checked");
        if rule.buffers[bi].steps.is_empty() {
            rule.buffers.remove(bi);
        }
        let at = push_step(rule, buffer, step);
        st.last_content = Some(at);
        st.last_match = Some(at);
        return Ok(());
    }
    match name {
        "msg" => {
            if st.seen_msg {
                return Err(bad(opt, err, "given twice"));
            }
            st.seen_msg = true;
            rule.msg = decode_text(need_value(opt, err)?).map_err(|e| value_err(opt, err, e))?;
        }
        "sid" => {
            if st.seen_sid {
                return Err(bad(opt, err, "given twice"));
            }
            st.seen_sid = true;
            rule.sid = number(opt, err, need_value(opt, err)?, "a sid (1 to 4294967295)")?;
            if rule.sid == 0 {
                return Err(bad(opt, err, "sid 0 is not allowed"));
            }
        }
        "rev" => rule.rev = number(opt, err, need_value(opt, err)?, "a revision number")?,
        "gid" => rule.gid = number(opt, err, need_value(opt, err)?, "a generator id")?,
        "classtype" => {
            let v = need_value(opt, err)?;
            if classes.get(v).is_none() {
                return Err(bad(opt, err, format!("unknown classtype {v:?}")));
            }
            rule.classtype = Some(v.to_string());
        }
        "priority" => {
            let p: u8 = number(opt, err, need_value(opt, err)?, "a priority (1 to 255)")?;
            if p == 0 {
                return Err(bad(opt, err, "priority 0 is not allowed"));
            }
            rule.priority = Some(p);
        }
        "reference" => rule.references.push(need_value(opt, err)?.to_string()),
        "metadata" => rule.metadata.extend(
            need_value(opt, err)?
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty()),
        ),
        "content" | "uricontent" => {
            let v = opt.value.ok_or_else(|| bad(opt, err, "needs a value"))?;
            let trimmed = v.trim_start();
            let lead = v.len() - trimmed.len();
            let (negated, quoted, neg_len) = match trimmed.strip_prefix('!') {
                Some(rest) => (true, rest, lead + 1 + (rest.len() - rest.trim_start().len())),
                None => (false, trimmed, lead),
            };
            let (inner, inner_at) = unquote(quoted).map_err(|e| {
                value_err(
                    opt,
                    err,
                    ValueError {
                        at: e.at + neg_len,
                        reason: e.reason,
                    },
                )
            })?;
            let pattern = decode_content(inner).map_err(|e| {
                value_err(
                    opt,
                    err,
                    ValueError {
                        at: e.at + neg_len + inner_at,
                        reason: e.reason,
                    },
                )
            })?;
            if pattern.is_empty() {
                return Err(bad(opt, err, "an empty content matches nothing useful"));
            }
            let buffer = if name == "uricontent" {
                if st.sticky.is_some() {
                    return Err(bad(opt, err, "uricontent cannot follow a sticky buffer"));
                }
                check_app_proto(rule, super::AppProto::Http, opt, err)?;
                Buffer::HttpUri
            } else {
                st.sticky.unwrap_or(Buffer::Payload)
            };
            let at = push_step(rule, buffer, Step::Content(Content::new(pattern, negated)));
            st.last_content = Some(at);
            st.last_match = Some(at);
        }
        "nocase" => {
            no_value(opt, err)?;
            last_content(rule, st, opt, err)?.nocase = true;
        }
        "rawbytes" => {
            no_value(opt, err)?;
            last_content(rule, st, opt, err)?;
        }
        "depth" | "offset" => {
            let n: u32 = number(opt, err, need_value(opt, err)?, "a byte count")?;
            let c = last_content(rule, st, opt, err)?;
            if c.startswith {
                return Err(bad(opt, err, "cannot be combined with startswith"));
            }
            if name == "depth" {
                if c.depth.is_some() {
                    return Err(bad(opt, err, "given twice for one content"));
                }
                if (n as usize) < c.pattern.len() {
                    return Err(bad(
                        opt,
                        err,
                        format!("depth {n} is shorter than the content ({} bytes)", c.pattern.len()),
                    ));
                }
                c.depth = Some(n);
            } else {
                c.offset = n;
            }
        }
        "distance" => {
            let n: i32 = number(opt, err, need_value(opt, err)?, "a distance")?;
            let c = last_content(rule, st, opt, err)?;
            if c.startswith {
                return Err(bad(opt, err, "cannot be combined with startswith"));
            }
            c.distance = Some(n);
        }
        "within" => {
            let n: u32 = number(opt, err, need_value(opt, err)?, "a byte count")?;
            let c = last_content(rule, st, opt, err)?;
            if c.startswith {
                return Err(bad(opt, err, "cannot be combined with startswith"));
            }
            if (n as usize) < c.pattern.len() {
                return Err(bad(
                    opt,
                    err,
                    format!("within {n} is shorter than the content ({} bytes)", c.pattern.len()),
                ));
            }
            c.within = Some(n);
        }
        "startswith" => {
            no_value(opt, err)?;
            let c = last_content(rule, st, opt, err)?;
            if c.depth.is_some() || c.offset != 0 || c.is_relative() {
                return Err(bad(
                    opt,
                    err,
                    "cannot be combined with depth, offset, distance or within",
                ));
            }
            c.startswith = true;
            c.depth = Some(c.pattern.len() as u32);
        }
        "endswith" => {
            no_value(opt, err)?;
            last_content(rule, st, opt, err)?.endswith = true;
        }
        "fast_pattern" => {
            let chop = match opt.value.map(str::trim) {
                None | Some("only") => None,
                Some(v) => {
                    let (o, l) = v.split_once(',').ok_or_else(|| {
                        bad(
                            opt,
                            err,
                            "expected fast_pattern, fast_pattern:only or fast_pattern:offset,length",
                        )
                    })?;
                    Some((
                        number::<u16>(opt, err, o, "an offset")?,
                        number::<u16>(opt, err, l, "a length")?,
                    ))
                }
            };
            let c = last_content(rule, st, opt, err)?;
            if c.negated {
                return Err(bad(opt, err, "a negated content cannot be the fast pattern"));
            }
            if let Some((o, l)) = chop
                && (l == 0 || usize::from(o) + usize::from(l) > c.pattern.len())
            {
                return Err(bad(opt, err, "the fast_pattern slice is outside the content"));
            }
            c.fast_pattern = true;
            c.fast_pattern_chop = chop;
        }
        "isdataat" => {
            let v = need_value(opt, err)?;
            let (v, negated) = match v.strip_prefix('!') {
                Some(r) => (r.trim(), true),
                None => (v, false),
            };
            let (num, relative) = match v.split_once(',') {
                Some((n, r)) if r.trim() == "relative" => (n, true),
                Some(_) => return Err(bad(opt, err, "expected isdataat:[!]N[,relative]")),
                None => (v, false),
            };
            let offset: u32 = number(opt, err, num, "a byte count")?;
            let step = Step::IsDataAt {
                negated,
                offset,
                relative,
            };
            // A relative isdataat belongs to the buffer of the match it follows.
            if relative {
                let Some((bi, _)) = st.last_match else {
                    return Err(bad(opt, err, "relative isdataat needs a content or pcre before it"));
                };
                let buffer = rule.buffers[bi].buffer;
                push_step(rule, buffer, step);
            } else {
                push_step(rule, st.sticky.unwrap_or(Buffer::Payload), step);
            }
        }
        "bsize" => {
            let Some(buffer) = st.sticky else {
                return Err(bad(opt, err, "bsize needs a sticky buffer before it"));
            };
            let m = uint_match(opt, err, need_value(opt, err)?, u64::from(u32::MAX))?;
            push_step(rule, buffer, Step::Bsize(m));
        }
        "dsize" => {
            let m = uint_match(opt, err, need_value(opt, err)?, u64::from(u16::MAX))?;
            if rule.packet.iter().any(|c| matches!(c, PacketCheck::Dsize(_))) {
                return Err(bad(opt, err, "given twice"));
            }
            rule.packet.push(PacketCheck::Dsize(m));
        }
        "pcre" => {
            let v = opt.value.ok_or_else(|| bad(opt, err, "needs a value"))?;
            let p = pcre::parse(v).map_err(|e| value_err(opt, err, e))?;
            let buffer = match (p.buffer, st.sticky) {
                (Some(_), Some(_)) => {
                    return Err(bad(opt, err, "a pcre buffer flag cannot follow a sticky buffer"));
                }
                (Some(b), None) => {
                    check_app_proto(rule, b.app_proto().expect("http buffer"), opt, err)?;
                    b
                }
                (None, Some(b)) => b,
                (None, None) if p.relative => match st.last_match {
                    Some((bi, _)) => rule.buffers[bi].buffer,
                    None => Buffer::Payload,
                },
                (None, None) => Buffer::Payload,
            };
            let at = push_step(rule, buffer, Step::Pcre(p));
            st.last_match = Some(at);
        }
        "flow" => {
            let mut f = rule.flow;
            for part in need_value(opt, err)?.split(',') {
                match part.trim() {
                    "established" => f.established = true,
                    "not_established" => f.not_established = true,
                    "stateless" => f.stateless = true,
                    "to_server" | "from_client" => f.to_server = true,
                    "to_client" | "from_server" => f.to_client = true,
                    "only_stream" => f.only_stream = true,
                    "no_stream" => f.no_stream = true,
                    other => return Err(bad(opt, err, format!("unknown or unsupported flow option {other:?}"))),
                }
            }
            if (f.to_server && f.to_client) || (f.established && f.not_established) || (f.only_stream && f.no_stream) {
                return Err(bad(opt, err, "contradictory flow options"));
            }
            rule.flow = f;
        }
        "flowbits" => {
            let v = need_value(opt, err)?;
            let (cmd, names) = match v.split_once(',') {
                Some((c, n)) => (c.trim(), Some(n.trim())),
                None => (v, None),
            };
            let name_list = |multi: bool| -> Result<Vec<String>, RuleError> {
                let n = names.ok_or_else(|| bad(opt, err, format!("flowbits:{cmd} needs a name")))?;
                let list: Vec<String> = n.split('|').map(|s| s.trim().to_string()).collect();
                if list.len() > 1 && !multi {
                    return Err(bad(opt, err, format!("flowbits:{cmd} takes one name")));
                }
                for name in &list {
                    if name.is_empty()
                        || !name
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
                    {
                        return Err(bad(opt, err, format!("{name:?} is not a flowbit name")));
                    }
                }
                Ok(list)
            };
            let fb = match cmd {
                "noalert" => {
                    if names.is_some() {
                        return Err(bad(opt, err, "flowbits:noalert takes no name"));
                    }
                    rule.noalert = true;
                    return Ok(());
                }
                "set" => Flowbit::Set(name_list(false)?.remove(0)),
                "unset" => Flowbit::Unset(name_list(false)?.remove(0)),
                "toggle" => Flowbit::Toggle(name_list(false)?.remove(0)),
                "isset" => Flowbit::IsSet(name_list(true)?),
                "isnotset" => Flowbit::IsNotSet(name_list(true)?),
                other => return Err(bad(opt, err, format!("unknown flowbits command {other:?}"))),
            };
            rule.flowbits.push(fb);
        }
        "flags" => {
            let f = parse_flags(opt, err, need_value(opt, err)?)?;
            rule.packet.push(PacketCheck::Flags(f));
        }
        "itype" => rule
            .packet
            .push(PacketCheck::Itype(uint_match(opt, err, need_value(opt, err)?, 255)?)),
        "icode" => rule
            .packet
            .push(PacketCheck::Icode(uint_match(opt, err, need_value(opt, err)?, 255)?)),
        "ttl" => rule
            .packet
            .push(PacketCheck::Ttl(uint_match(opt, err, need_value(opt, err)?, 255)?)),
        "ip_proto" => {
            let v = need_value(opt, err)?;
            let named = |s: &str| match s.to_ascii_lowercase().as_str() {
                "tcp" => Some(6),
                "udp" => Some(17),
                "icmp" => Some(1),
                "ipv6-icmp" | "icmpv6" => Some(58),
                "igmp" => Some(2),
                "gre" => Some(47),
                "esp" => Some(50),
                "ah" => Some(51),
                "sctp" => Some(132),
                _ => None,
            };
            let m = match (v.strip_prefix('!'), named(v)) {
                (_, Some(n)) => UintMatch::Eq(n),
                (Some(rest), _) if named(rest.trim()).is_some() => UintMatch::Ne(named(rest.trim()).unwrap_or(0)),
                _ => uint_match(opt, err, v, 255)?,
            };
            rule.packet.push(PacketCheck::IpProto(m));
        }
        "threshold" | "detection_filter" => {
            if rule.threshold.is_some() || rule.detection_filter.is_some() {
                return Err(bad(opt, err, "a rule takes one threshold or detection_filter"));
            }
            let t = parse_threshold(opt, err, need_value(opt, err)?, name == "detection_filter")?;
            if name == "threshold" {
                rule.threshold = Some(t);
            } else {
                rule.detection_filter = Some(t);
            }
        }
        _ => return Err(err(opt.name_at, Some(name), RuleErrorKind::UnknownKeyword)),
    }
    Ok(())
}

/// Refuses an application buffer whose protocol the rule cannot carry.
fn check_app_proto(rule: &Rule, proto: super::AppProto, opt: &Opt<'_>, err: ErrFn<'_>) -> Result<(), RuleError> {
    let ok = match rule.protocol {
        Protocol::App(p) => p == proto,
        Protocol::Ip => true,
        Protocol::Tcp | Protocol::TcpPkt | Protocol::TcpStream => true,
        Protocol::Udp => proto == super::AppProto::Dns,
        Protocol::Icmp | Protocol::Icmpv4 | Protocol::Icmpv6 => false,
    };
    if !ok {
        return Err(bad(
            opt,
            err,
            format!("a {} buffer in a rule for another protocol", proto.as_str()),
        ));
    }
    if let Some(other) = rule.buffers.iter().find_map(|b| b.buffer.app_proto())
        && other != proto
    {
        return Err(bad(
            opt,
            err,
            format!("{} and {} buffers in one rule", other.as_str(), proto.as_str()),
        ));
    }
    Ok(())
}

fn uint_match(opt: &Opt<'_>, err: ErrFn<'_>, v: &str, max: u64) -> Result<UintMatch, RuleError> {
    let v = v.trim();
    let num = |s: &str| -> Result<u64, RuleError> {
        let n: u64 = number(opt, err, s, "a number")?;
        if n > max {
            return Err(bad(opt, err, format!("{n} is larger than {max}")));
        }
        Ok(n)
    };
    let m = if let Some((lo, hi)) = v.split_once("<>") {
        UintMatch::Between(num(lo)?, num(hi)?)
    } else if let Some(r) = v.strip_prefix("<=") {
        UintMatch::Le(num(r)?)
    } else if let Some(r) = v.strip_prefix(">=") {
        UintMatch::Ge(num(r)?)
    } else if let Some(r) = v.strip_prefix('<') {
        UintMatch::Lt(num(r)?)
    } else if let Some(r) = v.strip_prefix('>') {
        UintMatch::Gt(num(r)?)
    } else if let Some(r) = v.strip_prefix('!') {
        UintMatch::Ne(num(r)?)
    } else if let Some(r) = v.strip_prefix('=') {
        UintMatch::Eq(num(r)?)
    } else if let Some((lo, hi)) = v.split_once('-') {
        UintMatch::Between(num(lo)?, num(hi)?)
    } else {
        UintMatch::Eq(num(v)?)
    };
    if let UintMatch::Between(lo, hi) = m
        && lo >= hi
    {
        return Err(bad(opt, err, format!("range {v:?} is empty")));
    }
    Ok(m)
}

fn flag_bit(c: char) -> Option<u8> {
    Some(match c.to_ascii_uppercase() {
        'F' => 0x01,
        'S' => 0x02,
        'R' => 0x04,
        'P' => 0x08,
        'A' => 0x10,
        'U' => 0x20,
        'E' | '2' => 0x40,
        'C' | '1' => 0x80,
        _ => return None,
    })
}

fn parse_flags(opt: &Opt<'_>, err: ErrFn<'_>, v: &str) -> Result<FlagsMatch, RuleError> {
    let (test, ignore) = match v.split_once(',') {
        Some((t, i)) => (t.trim(), Some(i.trim())),
        None => (v.trim(), None),
    };
    let mut mode = FlagsMode::Exact;
    let mut flags = 0u8;
    let mut zero = false;
    for c in test.chars() {
        match c {
            '+' | '*' | '!' => {
                if mode != FlagsMode::Exact {
                    return Err(bad(opt, err, "more than one flags modifier"));
                }
                mode = match c {
                    '+' => FlagsMode::All,
                    '*' => FlagsMode::Any,
                    _ => FlagsMode::Not,
                };
            }
            '0' => zero = true,
            c => flags |= flag_bit(c).ok_or_else(|| bad(opt, err, format!("{c:?} is not a TCP flag")))?,
        }
    }
    if zero && flags != 0 {
        return Err(bad(opt, err, "0 (no flags) cannot be combined with flags"));
    }
    if !zero && flags == 0 {
        return Err(bad(opt, err, "no flags given"));
    }
    let mut ignore_bits = 0u8;
    if let Some(i) = ignore {
        for c in i.chars() {
            ignore_bits |= flag_bit(c).ok_or_else(|| bad(opt, err, format!("{c:?} is not a TCP flag")))?;
        }
    }
    Ok(FlagsMatch {
        mode,
        flags,
        ignore: ignore_bits,
    })
}

fn parse_threshold(opt: &Opt<'_>, err: ErrFn<'_>, v: &str, filter: bool) -> Result<Threshold, RuleError> {
    let (mut kind, mut track, mut count, mut seconds) = (None, None, None, None);
    for part in v.split(',') {
        let part = part.trim();
        let (key, val) = part
            .split_once(char::is_whitespace)
            .map(|(k, v)| (k.trim(), v.trim()))
            .ok_or_else(|| bad(opt, err, format!("expected `key value`, found {part:?}")))?;
        match key {
            "type" if !filter => {
                kind = Some(match val {
                    "limit" => ThresholdKind::Limit,
                    "threshold" => ThresholdKind::Threshold,
                    "both" => ThresholdKind::Both,
                    other => return Err(bad(opt, err, format!("unknown threshold type {other:?}"))),
                })
            }
            "track" => {
                track = Some(match val {
                    "by_src" => Track::BySrc,
                    "by_dst" => Track::ByDst,
                    "by_rule" => Track::ByRule,
                    "by_both" => Track::ByBoth,
                    "by_flow" => Track::ByFlow,
                    other => return Err(bad(opt, err, format!("unknown track {other:?}"))),
                })
            }
            "count" => count = Some(number::<u32>(opt, err, val, "a count")?),
            "seconds" => seconds = Some(number::<u32>(opt, err, val, "a number of seconds")?),
            other => return Err(bad(opt, err, format!("unknown threshold setting {other:?}"))),
        }
    }
    let kind = if filter {
        ThresholdKind::DetectionFilter
    } else {
        kind.ok_or_else(|| bad(opt, err, "missing `type`"))?
    };
    let t = Threshold {
        kind,
        track: track.ok_or_else(|| bad(opt, err, "missing `track`"))?,
        count: count.ok_or_else(|| bad(opt, err, "missing `count`"))?,
        seconds: seconds.ok_or_else(|| bad(opt, err, "missing `seconds`"))?,
    };
    if t.count == 0 && kind != ThresholdKind::DetectionFilter {
        return Err(bad(opt, err, "count must be at least 1"));
    }
    if t.seconds == 0 {
        return Err(bad(opt, err, "seconds must be at least 1"));
    }
    Ok(t)
}

/// Checks that need the whole rule.
fn finish(rule: &mut Rule, body_at: usize, err: ErrFn<'_>) -> Result<(), RuleError> {
    let refuse = |reason: String| err(body_at, None, RuleErrorKind::BadValue(reason));
    for b in &rule.buffers {
        for step in &b.steps {
            if let Step::Content(c) = step {
                let absolute = (c.depth.is_some() && !c.startswith) || c.offset != 0;
                if c.is_relative() && absolute && !c.startswith {
                    // Suricata refuses this mix too; its meaning differs between engines.
                    return Err(refuse(format!(
                        "content {:?} mixes relative (distance/within) and absolute (offset/depth) placement",
                        String::from_utf8_lossy(&c.pattern)
                    )));
                }
            }
        }
    }
    let stream_only = matches!(rule.protocol, Protocol::TcpStream);
    if stream_only {
        rule.flow.only_stream = true;
    }
    if matches!(rule.protocol, Protocol::TcpPkt) {
        rule.flow.no_stream = true;
    }
    Ok(())
}
