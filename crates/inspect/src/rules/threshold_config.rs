//! Suricata's `threshold.config`: thresholds and suppressions set outside
//! the rules.
//!
//! One entry a line (`#` starts a comment):
//! - `threshold gen_id G, sig_id S, type limit|threshold|both, track by_src|by_dst|by_rule|by_both, count N, seconds T`
//! - `event_filter …` with the same fields (Suricata's newer name for it);
//! - `suppress gen_id G, sig_id S[, track by_src|by_dst|by_either, ip ADDRESSES]`
//!   (`ip` takes what a rule header takes: an address, a CIDR block, a
//!   `[…]` group, a `$VARIABLE`).
//!
//! `sig_id 0` (with `gen_id 0` or `1`) means every signature. How the
//! entries apply ([`crate::RuleSet::apply_threshold_config`]), as Suricata
//! does: a threshold for one signature replaces the rule's own `threshold`
//! or `detection_filter`; a threshold for every signature applies to those
//! without one of their own; a suppression keeps a signature from alerting
//! (for every packet, or those from/to the addresses given), while its
//! action (a `drop`) and side effects (flowbits) still happen.
//! `rate_filter` (which changes a rule's action) is refused, as is anything
//! else this parser does not know, with its line and column.

use core::net::IpAddr;

use super::address::{AddressSet, Vars, parse_addresses};
use super::{Threshold, ThresholdKind, Track};

/// Which end a suppression's addresses are compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuppressTrack {
    /// The source of the packet.
    BySrc,
    /// Its destination.
    ByDst,
    /// Either.
    ByEither,
}

/// A suppression: the signature does not alert for these packets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suppress {
    /// Only packets whose tracked end is in these addresses (`None`: all).
    pub only: Option<(SuppressTrack, AddressSet)>,
}

impl Suppress {
    /// Whether a match from `src` to `dst` is suppressed.
    pub fn covers(&self, src: IpAddr, dst: IpAddr) -> bool {
        match &self.only {
            None => true,
            Some((SuppressTrack::BySrc, a)) => a.contains(src),
            Some((SuppressTrack::ByDst, a)) => a.contains(dst),
            Some((SuppressTrack::ByEither, a)) => a.contains(src) || a.contains(dst),
        }
    }
}

/// What an entry does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// `threshold` or `event_filter`.
    Threshold(Threshold),
    /// `suppress`.
    Suppress(Suppress),
}

/// One line of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its line (1-based).
    pub line: usize,
    /// `gen_id`: 1 (rules) or 0 (with `sig_id 0`: everything).
    pub gid: u32,
    /// `sig_id`; 0 for every signature.
    pub sid: u32,
    /// What it does.
    pub kind: EntryKind,
}

/// A parsed `threshold.config`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ThresholdConfig {
    /// The entries, in file order.
    pub entries: Vec<Entry>,
}

/// Why a `threshold.config` was refused: where, and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct ThresholdConfigError {
    /// Line (1-based).
    pub line: usize,
    /// Column (1-based, in bytes).
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

/// Longest file accepted, in lines (a bigger one is refused, not truncated).
pub const MAX_LINES: usize = 1_000_000;

impl ThresholdConfig {
    /// Parse the text of a `threshold.config`, resolving `ip` groups with `vars`.
    pub fn parse(text: &str, vars: &Vars) -> Result<ThresholdConfig, ThresholdConfigError> {
        let mut entries = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            if line > MAX_LINES {
                return Err(ThresholdConfigError {
                    line,
                    column: 1,
                    message: format!("more than {MAX_LINES} lines"),
                });
            }
            let body = raw.split('#').next().unwrap_or("");
            if body.trim().is_empty() {
                continue;
            }
            entries.push(parse_line(body, line, vars)?);
        }
        Ok(ThresholdConfig { entries })
    }
}

fn parse_line(text: &str, line: usize, vars: &Vars) -> Result<Entry, ThresholdConfigError> {
    let err = |at: usize, message: String| ThresholdConfigError {
        line,
        column: at + 1,
        message,
    };
    let start = text.len() - text.trim_start().len();
    let word_end = text[start..]
        .find(char::is_whitespace)
        .map_or(text.len(), |n| start + n);
    let keyword = &text[start..word_end];
    let is_threshold = match keyword {
        "threshold" | "event_filter" => true,
        "suppress" => false,
        "rate_filter" => {
            return Err(err(
                start,
                "rate_filter is not supported (it changes a rule's action)".into(),
            ));
        }
        other => {
            return Err(err(
                start,
                format!("`{other}`: expected threshold, event_filter or suppress"),
            ));
        }
    };
    // `key value` pairs, comma-separated; an `ip` group may hold commas inside brackets.
    let mut fields: Vec<(usize, &str, usize, &str)> = Vec::new();
    for (at, item) in split_top_level(text, word_end) {
        let trimmed = item.trim();
        if trimmed.is_empty() {
            return Err(err(at, "an empty field (two commas, or a comma at the end)".into()));
        }
        let lead = at + (item.len() - item.trim_start().len());
        let (key, value) = match trimmed.split_once(char::is_whitespace) {
            Some((k, v)) => (k, v.trim()),
            None => return Err(err(lead, format!("`{trimmed}`: a field is a name and a value"))),
        };
        let value_at = lead + trimmed.len() - value.len();
        if fields.iter().any(|f| f.1 == key) {
            return Err(err(lead, format!("`{key}` is given twice")));
        }
        fields.push((lead, key, value_at, value));
    }
    let get = |key: &str| fields.iter().find(|f| f.1 == key);
    let number = |key: &str| -> Result<Option<u32>, ThresholdConfigError> {
        match get(key) {
            None => Ok(None),
            Some(&(_, _, at, v)) => v
                .parse::<u32>()
                .map(Some)
                .map_err(|_| err(at, format!("{key} `{v}`: expected a number from 0 to {}", u32::MAX))),
        }
    };
    let known: &[&str] = if is_threshold {
        &["gen_id", "sig_id", "type", "track", "count", "seconds"]
    } else {
        &["gen_id", "sig_id", "track", "ip"]
    };
    if let Some(&(at, key, _, _)) = fields.iter().find(|f| !known.contains(&f.1)) {
        return Err(err(
            at,
            format!("`{key}` is not a field of {keyword} (fields: {})", known.join(", ")),
        ));
    }
    let require = |key: &str| {
        get(key)
            .map(|_| ())
            .ok_or_else(|| err(text.trim_end().len(), format!("{keyword} needs `{key}`")))
    };
    require("gen_id")?;
    require("sig_id")?;
    let gid = number("gen_id")?.unwrap_or(0);
    let sid = number("sig_id")?.unwrap_or(0);
    if gid > 1 || (gid == 0 && sid != 0) {
        let at = get("gen_id").map_or(0, |f| f.2);
        return Err(err(
            at,
            format!("gen_id {gid}: rules have gen_id 1 (gen_id 0 only with sig_id 0, for every signature)"),
        ));
    }
    let kind = if is_threshold {
        for key in ["type", "track", "count", "seconds"] {
            require(key)?;
        }
        let &(_, _, type_at, ty) = get("type").expect("required");
        let kind = match ty {
            "limit" => ThresholdKind::Limit,
            "threshold" => ThresholdKind::Threshold,
            "both" => ThresholdKind::Both,
            other => {
                return Err(err(
                    type_at,
                    format!("type `{other}`: expected limit, threshold or both"),
                ));
            }
        };
        let &(_, _, track_at, tr) = get("track").expect("required");
        let track = match tr {
            "by_src" => Track::BySrc,
            "by_dst" => Track::ByDst,
            "by_rule" => Track::ByRule,
            "by_both" => Track::ByBoth,
            other => {
                return Err(err(
                    track_at,
                    format!("track `{other}`: expected by_src, by_dst, by_rule or by_both"),
                ));
            }
        };
        let count = number("count")?.unwrap_or(0);
        let seconds = number("seconds")?.unwrap_or(0);
        if count == 0 || seconds == 0 {
            let at = get(if count == 0 { "count" } else { "seconds" }).map_or(0, |f| f.2);
            return Err(err(at, "count and seconds must be at least 1".into()));
        }
        EntryKind::Threshold(Threshold {
            kind,
            track,
            count,
            seconds,
        })
    } else {
        let only = match (get("track"), get("ip")) {
            (None, None) => None,
            (Some(&(_, _, track_at, tr)), Some(&(_, _, ip_at, ip))) => {
                let track = match tr {
                    "by_src" => SuppressTrack::BySrc,
                    "by_dst" => SuppressTrack::ByDst,
                    "by_either" => SuppressTrack::ByEither,
                    other => {
                        return Err(err(
                            track_at,
                            format!("track `{other}`: expected by_src, by_dst or by_either"),
                        ));
                    }
                };
                let set = parse_addresses(ip, vars).map_err(|e| err(ip_at, format!("ip `{ip}`: {}", e.0)))?;
                Some((track, set))
            }
            (Some(&(at, ..)), None) | (None, Some(&(at, ..))) => {
                return Err(err(at, "a suppression takes both track and ip, or neither".into()));
            }
        };
        EntryKind::Suppress(Suppress { only })
    };
    Ok(Entry { line, gid, sid, kind })
}

/// The comma-separated items of `text` after byte `from`, each with its
/// byte offset; commas inside `[…]` do not separate.
fn split_top_level(text: &str, from: usize) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = from;
    for (i, c) in text[from..].char_indices() {
        let i = from + i;
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                out.push((start, &text[start..i]));
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push((start, &text[start..]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ThresholdConfig, ThresholdConfigError> {
        let mut vars = Vars::empty();
        vars.set_address("HOME_NET", "[10.0.0.0/8]");
        ThresholdConfig::parse(text, &vars)
    }

    #[test]
    fn entries_parse() {
        let cfg = parse(
            "# comment\n\
             threshold gen_id 1, sig_id 10, type limit, track by_src, count 1, seconds 60\n\
             \n\
             event_filter gen_id 1, sig_id 11, type both, track by_rule, count 3, seconds 10  # trailing\n\
             suppress gen_id 1, sig_id 12\n\
             suppress gen_id 1, sig_id 13, track by_either, ip [192.0.2.0/24, $HOME_NET]\n\
             threshold gen_id 0, sig_id 0, type threshold, track by_dst, count 5, seconds 1\n",
        )
        .unwrap();
        let e = &cfg.entries;
        assert_eq!(e.len(), 5);
        assert_eq!((e[0].line, e[0].gid, e[0].sid), (2, 1, 10));
        assert_eq!(
            e[0].kind,
            EntryKind::Threshold(Threshold {
                kind: ThresholdKind::Limit,
                track: Track::BySrc,
                count: 1,
                seconds: 60
            })
        );
        assert!(
            matches!(&e[1].kind, EntryKind::Threshold(t) if t.kind == ThresholdKind::Both && t.track == Track::ByRule)
        );
        assert_eq!(e[2].kind, EntryKind::Suppress(Suppress { only: None }));
        let EntryKind::Suppress(s) = &e[3].kind else { panic!() };
        let (a, b, c) = (
            "192.0.2.7".parse().unwrap(),
            "10.1.2.3".parse().unwrap(),
            "198.51.100.1".parse().unwrap(),
        );
        assert!(s.covers(a, c) && s.covers(c, b) && !s.covers(c, c));
        assert_eq!((e[4].gid, e[4].sid), (0, 0));
    }

    /// Each refusal names its line and the column of what is wrong.
    #[test]
    fn refusals_are_positioned() {
        let cases: &[(&str, usize, &str)] = &[
            ("rate_filter gen_id 1, sig_id 1", 1, "rate_filter"),
            ("  tresh gen_id 1, sig_id 1", 3, "expected threshold"),
            ("suppress gen_id 1, sig_id x", 27, "sig_id `x`"),
            ("suppress gen_id 1", 18, "needs `sig_id`"),
            ("suppress gen_id 1, sig_id 1, track by_src", 30, "both track and ip"),
            (
                "suppress gen_id 1, sig_id 1, track by_src, ip 300.1.1.1",
                47,
                "ip `300.1.1.1`",
            ),
            (
                "suppress gen_id 1, sig_id 1, track by_rule, ip 1.2.3.4",
                36,
                "track `by_rule`",
            ),
            (
                "threshold gen_id 1, sig_id 1, type limit, track by_src, count 1",
                64,
                "needs `seconds`",
            ),
            (
                "threshold gen_id 1, sig_id 1, type some, track by_src, count 1, seconds 1",
                36,
                "type `some`",
            ),
            (
                "threshold gen_id 1, sig_id 1, type limit, track by_src, count 0, seconds 1",
                63,
                "at least 1",
            ),
            (
                "threshold gen_id 1, sig_id 1, type limit, track by_src, count 1, seconds 1, ip 1.2.3.4",
                77,
                "`ip` is not a field",
            ),
            ("suppress gen_id 3, sig_id 1", 17, "gen_id 3"),
            ("suppress gen_id 0, sig_id 5", 17, "gen_id 0"),
            ("suppress gen_id 1, gen_id 1, sig_id 5", 20, "twice"),
            ("suppress gen_id 1,, sig_id 5", 19, "empty field"),
            ("suppress gen_id", 10, "a name and a value"),
        ];
        for (text, column, what) in cases {
            let e = parse(&format!("# first\n{text}\n")).unwrap_err();
            assert_eq!((e.line, e.column), (2, *column), "{text}: {e}");
            assert!(e.message.contains(what), "{text}: {e}");
        }
    }
}
