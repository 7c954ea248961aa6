//! ClassBench rule and trace files.
//!
//! ClassBench (Taylor and Turner) is the standard workload for packet
//! classifiers. A rule line reads
//! `@SRC/LEN<TAB>DST/LEN<TAB>SPLO : SPHI<TAB>DPLO : DPHI<TAB>PROTO/MASK<TAB>FLAGS/MASK`,
//! the first line having the best priority; a trace line reads
//! `SRC DST SPORT DPORT PROTO FLAGS FILTER_ID` in decimal. Files come from
//! outside, so every malformed line is reported with its file and line number.

use std::path::Path;

use crate::{Family, Key, Prefix, Rule};

/// What was wrong with a line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseErrorKind {
    /// A rule line does not start with `@`.
    #[error("rule line does not start with '@'")]
    MissingAt,
    /// Fewer fields than the format has.
    #[error("missing field: {0}")]
    MissingField(&'static str),
    /// An address that is not a dotted quad.
    #[error("bad IPv4 address {0:?}")]
    BadAddress(String),
    /// A prefix length over 32.
    #[error("bad prefix length {0}")]
    BadPrefixLength(String),
    /// A port range that is not `LO : HI` with LO <= HI <= 65535.
    #[error("bad port range {0:?}")]
    BadPortRange(String),
    /// A protocol that is not `0xVV/0xFF` or `0xVV/0x00`.
    #[error("bad protocol {0:?}")]
    BadProto(String),
    /// Flags that are not `0xVVVV/0xMMMM`.
    #[error("bad TCP flags {0:?}")]
    BadFlags(String),
    /// A trace field that is not a decimal number in range.
    #[error("bad {field} {text:?}")]
    BadNumber {
        /// Which field.
        field: &'static str,
        /// Its text.
        text: String,
    },
}

/// A ClassBench file could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("{file}:{line}: {kind}")]
    Parse {
        /// The file name as given.
        file: String,
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        kind: ParseErrorKind,
    },
}

/// One trace header and the rule ClassBench generated it from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceEntry {
    /// The header.
    pub key: Key,
    /// The index (from 0) of the rule the header was generated from; not
    /// necessarily the best match.
    pub filter_id: u32,
}

/// Parses a rule file's text; `name` is used in error messages. The rule on
/// (non-empty) line `i` gets priority and action `i`, counting from 0.
pub fn parse_rules(name: &str, text: &str) -> Result<Vec<Rule>, LoadError> {
    let mut rules = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let prio = rules.len() as u32;
        let rule = parse_rule(line, prio).map_err(|kind| LoadError::Parse {
            file: name.to_owned(),
            line: n + 1,
            kind,
        })?;
        rules.push(rule);
    }
    Ok(rules)
}

/// Parses a trace file's text; `name` is used in error messages.
pub fn parse_trace(name: &str, text: &str) -> Result<Vec<TraceEntry>, LoadError> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let entry = parse_trace_line(line).map_err(|kind| LoadError::Parse {
            file: name.to_owned(),
            line: n + 1,
            kind,
        })?;
        out.push(entry);
    }
    Ok(out)
}

/// Reads and parses a rule file.
pub fn load_rules(path: impl AsRef<Path>) -> Result<Vec<Rule>, LoadError> {
    let (name, text) = read(path.as_ref())?;
    parse_rules(&name, &text)
}

/// Reads and parses a trace file.
pub fn load_trace(path: impl AsRef<Path>) -> Result<Vec<TraceEntry>, LoadError> {
    let (name, text) = read(path.as_ref())?;
    parse_trace(&name, &text)
}

fn read(path: &Path) -> Result<(String, String), LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let name = path
        .file_name()
        .map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
    Ok((name, text))
}

fn parse_rule(line: &str, priority: u32) -> Result<Rule, ParseErrorKind> {
    let line = line.strip_prefix('@').ok_or(ParseErrorKind::MissingAt)?;
    let mut f = line.split('\t').map(str::trim);
    let mut next = |what| {
        f.next()
            .filter(|s| !s.is_empty())
            .ok_or(ParseErrorKind::MissingField(what))
    };
    let src = parse_prefix(next("source prefix")?)?;
    let dst = parse_prefix(next("destination prefix")?)?;
    let src_ports = parse_ports(next("source ports")?)?;
    let dst_ports = parse_ports(next("destination ports")?)?;
    let proto_text = next("protocol")?;
    let proto = match parse_hex_pair(proto_text).map(|(v, m)| (u8::try_from(v), m)) {
        Some((Ok(v), 0xFF)) => Some(v),
        Some((Ok(_), 0)) => None,
        _ => return Err(ParseErrorKind::BadProto(proto_text.to_owned())),
    };
    let flags_text = next("TCP flags")?;
    let tcp_flags = match parse_hex_pair(flags_text).map(|(v, m)| (u16::try_from(v), u16::try_from(m))) {
        Some((Ok(v), Ok(m))) => (v, m),
        _ => return Err(ParseErrorKind::BadFlags(flags_text.to_owned())),
    };
    Ok(Rule {
        priority,
        src,
        dst,
        src_ports,
        dst_ports,
        proto,
        tcp_flags,
        meta: (0, 0),
        action: priority,
    })
}

fn parse_prefix(text: &str) -> Result<Prefix, ParseErrorKind> {
    let (addr, len) = text
        .split_once('/')
        .ok_or_else(|| ParseErrorKind::BadAddress(text.to_owned()))?;
    let addr: std::net::Ipv4Addr = addr.parse().map_err(|_| ParseErrorKind::BadAddress(addr.to_owned()))?;
    let len: u8 = len
        .parse()
        .map_err(|_| ParseErrorKind::BadPrefixLength(len.to_owned()))?;
    Prefix::new(Family::V4, u128::from(u32::from(addr)), len)
        .map_err(|_| ParseErrorKind::BadPrefixLength(len.to_string()))
}

fn parse_ports(text: &str) -> Result<(u16, u16), ParseErrorKind> {
    let bad = || ParseErrorKind::BadPortRange(text.to_owned());
    let (lo, hi) = text.split_once(':').ok_or_else(bad)?;
    let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
    let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
    if lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

/// `0xVV/0xMM` as two numbers.
fn parse_hex_pair(text: &str) -> Option<(u32, u32)> {
    let (v, m) = text.split_once('/')?;
    let hex = |s: &str| {
        let s = s.trim();
        let digits = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"))?;
        u32::from_str_radix(digits, 16).ok()
    };
    Some((hex(v)?, hex(m)?))
}

fn parse_trace_line(line: &str) -> Result<TraceEntry, ParseErrorKind> {
    let mut f = line.split_whitespace();
    let mut num = |field: &'static str, max: u32| -> Result<u32, ParseErrorKind> {
        let text = f.next().ok_or(ParseErrorKind::MissingField(field))?;
        match text.parse::<u32>() {
            Ok(v) if v <= max => Ok(v),
            _ => Err(ParseErrorKind::BadNumber {
                field,
                text: text.to_owned(),
            }),
        }
    };
    let src = num("source address", u32::MAX)?;
    let dst = num("destination address", u32::MAX)?;
    // The `max` bounds make the narrowing casts below lossless.
    let sport = num("source port", u32::from(u16::MAX))? as u16;
    let dport = num("destination port", u32::from(u16::MAX))? as u16;
    let proto = num("protocol", u32::from(u8::MAX))? as u8;
    // ClassBench's trace generator writes a 32-bit word with the flags in its
    // high half: so read, every header of the shipped traces matches the rule
    // it was generated from (read as the low half, up to 58% do not).
    let flags = (num("TCP flags", u32::MAX)? >> 16) as u16;
    let filter_id = num("filter id", u32::MAX)?;
    Ok(TraceEntry {
        key: Key::v4(src, dst, sport, dport, proto, flags),
        filter_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse_rules("acl1_1k", text).unwrap_err().to_string()
    }

    #[test]
    fn parses_a_rule_line() {
        let r = parse_rules(
            "x",
            "@50.48.107.224/32\t50.48.109.0/24\t0 : 65535\t1521 : 1521\t0x06/0xFF\t0x0000/0x0200\t\n",
        )
        .unwrap();
        assert_eq!(r.len(), 1);
        let r = r[0];
        assert_eq!(r.src, Prefix::v4(0x32306be0, 32).unwrap());
        assert_eq!(r.dst, Prefix::v4(0x32306d00, 24).unwrap());
        assert_eq!(
            (r.src_ports, r.dst_ports, r.proto, r.tcp_flags),
            ((0, 65535), (1521, 1521), Some(6), (0, 0x200))
        );
        assert_eq!((r.priority, r.action), (0, 0));
    }

    #[test]
    fn any_protocol_and_priorities_follow_lines() {
        let text = "@1.2.3.4/32\t0.0.0.0/0\t0 : 65535\t0 : 65535\t0x00/0x00\t0x0000/0x0000\n\
                    @1.2.3.4/32\t0.0.0.0/0\t0 : 65535\t0 : 65535\t0x11/0xFF\t0x0000/0x0000\n";
        let r = parse_rules("x", text).unwrap();
        assert_eq!(
            (r[0].proto, r[0].priority, r[1].proto, r[1].priority),
            (None, 0, Some(17), 1)
        );
    }

    #[test]
    fn rule_errors_name_file_line_and_cause() {
        let good = "@1.2.3.4/32\t5.6.7.8/32\t0 : 65535\t0 : 65535\t0x06/0xFF\t0x0000/0x0000\n";
        let mut text = good.repeat(16);
        text.push_str("@1.2.3.4/33\t5.6.7.8/32\t0 : 65535\t0 : 65535\t0x06/0xFF\t0x0000/0x0000\n");
        assert_eq!(err(&text), "acl1_1k:17: bad prefix length 33");
        assert_eq!(err("1.2.3.4/32"), "acl1_1k:1: rule line does not start with '@'");
        assert_eq!(err("@1.2.300.4/32\t"), "acl1_1k:1: bad IPv4 address \"1.2.300.4\"");
        assert_eq!(
            err("@1.2.3.4/32\t5.6.7.8/32\t9 : 3\t0 : 1\t0x06/0xFF\t0x0/0x0"),
            "acl1_1k:1: bad port range \"9 : 3\""
        );
        assert_eq!(
            err("@1.2.3.4/32\t5.6.7.8/32\t0 : 3\t0 : 1\t0x06/0x0F\t0x0/0x0"),
            "acl1_1k:1: bad protocol \"0x06/0x0F\""
        );
        assert_eq!(
            err("@1.2.3.4/32\t5.6.7.8/32\t0 : 3\t0 : 1\t0x06/0xFF\tzz"),
            "acl1_1k:1: bad TCP flags \"zz\""
        );
        assert_eq!(
            err("@1.2.3.4/32\t5.6.7.8/32\t0 : 3"),
            "acl1_1k:1: missing field: destination ports"
        );
    }

    #[test]
    fn parses_trace_lines_and_reports_errors() {
        let t = parse_trace(
            "t",
            "842033998\t2820812281\t0\t65535\t255\t0\t805\n\n1 2 3 4 6 131072 1\n",
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].key, Key::v4(842033998, 2820812281, 0, 65535, 255, 0));
        assert_eq!(t[0].filter_id, 805);
        assert_eq!(t[1].key.flags, 2);
        let e = parse_trace("t", "1 2 3 4 6 0 1\n1 2 70000 4 6 0 1\n")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "t:2: bad source port \"70000\"");
        let t = parse_trace("t", "1 2 3 4 6 33559040 1\n").unwrap();
        assert_eq!(t[0].key.flags, 0x0200);
        let e = parse_trace("t", "1 2 3 4 6").unwrap_err().to_string();
        assert_eq!(e, "t:1: missing field: TCP flags");
    }

    #[test]
    fn missing_file_is_an_io_error() {
        let e = load_rules("/nonexistent/classbench/acl1_1k").unwrap_err();
        assert!(matches!(e, LoadError::Io { .. }), "{e}");
    }
}
