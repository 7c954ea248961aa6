//! Diagnostics: what is wrong in a policy, where, and what to do about it.
//!
//! Loading and validation never stop at the first problem: every check pushes
//! a [`Diagnostic`] and carries on, so one `palisade policy check` run lists
//! everything. [`render`] prints them the way rustc does, with the source line
//! and a caret under the offending column.

use std::fmt::{self, Write as _};

use serde::Serialize;

use crate::chars;
use crate::limits::MAX_CONTEXT_CHARS;
use crate::model::Span;
use crate::source::SourceMap;

/// How bad a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The policy is usable, but probably not what was meant.
    Warning,
    /// The policy cannot be used.
    Error,
}

/// What kind of problem a diagnostic reports (stable codes for tooling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum DiagnosticKind {
    /// The file is not well-formed YAML.
    YamlSyntax,
    /// A mapping key the format does not know.
    UnknownKey,
    /// A required field is absent.
    MissingField,
    /// A value has the wrong shape (a list where a string was expected, …).
    WrongType,
    /// A value has the right shape but is not valid (bad MAC, bad UUID, …).
    InvalidValue,
    /// Reference to an undefined group.
    UnknownGroup,
    /// Reference to an undefined service.
    UnknownService,
    /// Reference to an undefined zone.
    UnknownZone,
    /// Reference to an undefined cluster.
    UnknownCluster,
    /// Reference to an undefined VM.
    UnknownVm,
    /// Reference to an undefined inspection profile.
    UnknownProfile,
    /// A port outside 0..=65535, or a range whose low end exceeds its high end.
    PortOutOfRange,
    /// An address or CIDR that does not parse.
    BadCidr,
    /// Two blocks of one IP set overlap.
    OverlappingCidr,
    /// Two rules share an id.
    DuplicateRuleId,
    /// Two definitions share a name (VM, zone, vNIC, cluster, group, service, profile).
    DuplicateName,
    /// Two vNICs share an IP address.
    DuplicateIp,
    /// Two vNICs share a MAC address.
    DuplicateMac,
    /// A VLAN id outside 1..=4094.
    VlanOutOfRange,
    /// A VNI wider than 24 bits.
    VniOutOfRange,
    /// A selector group that matches no vNIC (warning).
    EmptySelector,
    /// An action keyword that is not `allow | deny | reject | pass` (or not allowed here).
    InvalidAction,
    /// A bound of [`crate::limits`] crossed: file size, nesting depth, nodes
    /// copied by aliases, number of diagnostics.
    LimitExceeded,
    /// A character the file or a name may not hold (see [`crate::chars`]).
    BadCharacter,
    /// A YAML tag other than `!!str`, `!!seq` or `!!map`.
    UnsupportedTag,
    /// An address block written with host bits set (`10.9.0.77/16`), read
    /// as its network (warning).
    HostBitsSet,
    /// A `redirect` naming an undefined service chain.
    UnknownServiceChain,
}

impl DiagnosticKind {
    /// The stable code shown as `error[code]`.
    pub const fn code(self) -> &'static str {
        match self {
            DiagnosticKind::YamlSyntax => "yaml-syntax",
            DiagnosticKind::UnknownKey => "unknown-key",
            DiagnosticKind::MissingField => "missing-field",
            DiagnosticKind::WrongType => "wrong-type",
            DiagnosticKind::InvalidValue => "invalid-value",
            DiagnosticKind::UnknownGroup => "unknown-group",
            DiagnosticKind::UnknownService => "unknown-service",
            DiagnosticKind::UnknownZone => "unknown-zone",
            DiagnosticKind::UnknownCluster => "unknown-cluster",
            DiagnosticKind::UnknownVm => "unknown-vm",
            DiagnosticKind::UnknownProfile => "unknown-profile",
            DiagnosticKind::PortOutOfRange => "port-out-of-range",
            DiagnosticKind::BadCidr => "bad-cidr",
            DiagnosticKind::OverlappingCidr => "overlapping-cidr",
            DiagnosticKind::DuplicateRuleId => "duplicate-rule-id",
            DiagnosticKind::DuplicateName => "duplicate-name",
            DiagnosticKind::DuplicateIp => "duplicate-ip",
            DiagnosticKind::DuplicateMac => "duplicate-mac",
            DiagnosticKind::VlanOutOfRange => "vlan-out-of-range",
            DiagnosticKind::VniOutOfRange => "vni-out-of-range",
            DiagnosticKind::EmptySelector => "empty-selector",
            DiagnosticKind::InvalidAction => "invalid-action",
            DiagnosticKind::LimitExceeded => "limit-exceeded",
            DiagnosticKind::BadCharacter => "bad-character",
            DiagnosticKind::UnsupportedTag => "unsupported-tag",
            DiagnosticKind::HostBitsSet => "host-bits-set",
            DiagnosticKind::UnknownServiceChain => "unknown-service-chain",
        }
    }
}

impl fmt::Display for DiagnosticKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// One finding about a policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// What kind of problem.
    pub kind: DiagnosticKind,
    /// File the problem is in.
    pub file: String,
    /// 1-based line.
    pub line: u32,
    /// 1-based column.
    pub column: u32,
    /// What is wrong.
    pub message: String,
    /// What to do about it, when there is something to suggest.
    pub hint: Option<String>,
}

impl Diagnostic {
    /// An error at `span`.
    pub fn error(kind: DiagnosticKind, span: &Span, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            kind,
            file: span.file.to_string(),
            line: span.line,
            column: span.column,
            message: message.into(),
            hint: None,
        }
    }

    /// A warning at `span`.
    pub fn warning(kind: DiagnosticKind, span: &Span, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(kind, span, message)
        }
    }

    /// The same diagnostic with a hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Diagnostic {
        self.hint = Some(hint.into());
        self
    }

    /// Whether it is an error.
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        // The file name is input too (an API upload names it).
        let (file, _) = chars::escape_line(&self.file);
        write!(
            f,
            "{file}:{}:{}: {sev}[{}]: {}",
            self.line, self.column, self.kind, self.message
        )
    }
}

/// Render diagnostics rustc-style: header, source line with a caret, hint.
///
/// The source line is shown escaped (see [`chars::escape_line`]) and, when
/// long, as a window of [`MAX_CONTEXT_CHARS`] characters around the column,
/// so a diagnostic is a few lines however long its line is. Diagnostics in
/// file order (as [`crate::load()`] returns them) render in one pass over
/// each file.
pub fn render(diags: &[Diagnostic], sources: &SourceMap) -> String {
    let mut out = String::new();
    let mut cursors: Vec<(&str, LineCursor<'_>)> = Vec::new();
    for d in diags {
        let _ = writeln!(out, "{d}");
        let cursor = match cursors.iter_mut().position(|(f, _)| *f == d.file) {
            Some(i) => Some(&mut cursors[i].1),
            None => sources.text(&d.file).map(|text| {
                cursors.push((d.file.as_str(), LineCursor::new(text)));
                &mut cursors.last_mut().expect("just pushed").1
            }),
        };
        if let Some((shown, caret_pad)) = cursor.and_then(|c| c.context(d.line, d.column)) {
            let num = d.line.to_string();
            let pad = " ".repeat(num.len());
            let _ = writeln!(out, "{pad} |");
            let _ = writeln!(out, "{num} | {shown}");
            let _ = writeln!(out, "{pad} | {caret_pad}^");
        }
        if let Some(h) = &d.hint {
            let _ = writeln!(out, "  = hint: {h}");
        }
    }
    out
}

/// A position in a file's text that moves forward to each diagnostic's
/// line and column (and starts over for one before it).
struct LineCursor<'t> {
    text: &'t str,
    /// The line it is on (1-based) and the byte it starts at.
    line: u32,
    line_start: usize,
    /// The column it is at (1-based) and its byte.
    column: u32,
    byte: usize,
}

impl<'t> LineCursor<'t> {
    fn new(text: &'t str) -> LineCursor<'t> {
        LineCursor {
            text,
            line: 1,
            line_start: 0,
            column: 1,
            byte: 0,
        }
    }

    /// Move to `line`, `column` (or the line's end, if it is shorter);
    /// `false` if the text has no such line.
    fn seek(&mut self, line: u32, column: u32) -> bool {
        if line < self.line || (line == self.line && column < self.column) {
            *self = LineCursor::new(self.text);
        }
        let bytes = self.text.as_bytes();
        while self.line < line {
            match memchr::memchr(b'\n', &bytes[self.line_start..]) {
                Some(n) => {
                    self.line += 1;
                    self.line_start += n + 1;
                    self.column = 1;
                    self.byte = self.line_start;
                }
                None => return false,
            }
        }
        while self.column < column {
            match self.text[self.byte..].chars().next() {
                Some('\n') | None => break,
                Some(c) => {
                    self.byte += c.len_utf8();
                    self.column += 1;
                }
            }
        }
        true
    }

    /// The window of `line` shown for `column`, escaped, and the padding
    /// that puts a caret under the column.
    fn context(&mut self, line: u32, column: u32) -> Option<(String, String)> {
        if !self.seek(line, column) {
            return None;
        }
        let half = MAX_CONTEXT_CHARS / 2;
        let before_text = &self.text[self.line_start..self.byte];
        let mut start = self.byte;
        for (taken, c) in before_text.chars().rev().enumerate() {
            if taken == half {
                break;
            }
            start -= c.len_utf8();
        }
        let mut end = self.byte;
        let mut cut_end = false;
        for (taken, c) in self.text[self.byte..].chars().enumerate() {
            if c == '\n' {
                break;
            }
            if taken == MAX_CONTEXT_CHARS - half {
                cut_end = true;
                break;
            }
            end += c.len_utf8();
        }
        let window = &self.text[start..end];
        let window = if cut_end {
            window
        } else {
            window.strip_suffix('\r').unwrap_or(window)
        };
        let (escaped, widths) = chars::escape_line(window);
        let cut_start = start > self.line_start;
        let mut shown = String::new();
        let mut caret_pad = String::new();
        if cut_start {
            shown.push('…');
            caret_pad.push(' ');
        }
        shown.push_str(&escaped);
        if cut_end {
            shown.push('…');
        }
        let before = self.text[start..self.byte].chars().count();
        for (c, w) in window.chars().zip(&widths).take(before) {
            if c == '\t' {
                caret_pad.push('\t');
            } else {
                caret_pad.extend(std::iter::repeat_n(' ', *w));
            }
        }
        Some((shown, caret_pad))
    }
}

/// Levenshtein distance, for "did you mean" hints.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Names longer than this get no suggestion (the distance is quadratic).
const SUGGEST_MAX_CHARS: usize = 256;

/// The closest candidate to `name`, if it is close enough to be a likely typo.
pub fn suggest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let len = name.chars().count();
    candidates
        .into_iter()
        .filter_map(|c| {
            // Half the longer name: "web-srv" still finds "web-servers", "zzz"
            // finds nothing. The lengths alone rule most out (and a huge name
            // costs no quadratic distance).
            let clen = c.chars().count();
            let most = (len.max(clen) / 2).max(1);
            let worth = len.abs_diff(clen) <= most && len.max(clen) <= SUGGEST_MAX_CHARS;
            worth.then(|| (edit_distance(name, c), c, most))
        })
        .filter(|(d, _, most)| d <= most)
        .map(|(d, c, _)| (d, c))
        .min_by_key(|(d, c)| (*d, *c))
        .map(|(_, c)| c)
}

/// A "did you mean" hint for an unknown name, or a list of what exists.
pub fn did_you_mean<'a>(name: &str, what: &str, candidates: impl IntoIterator<Item = &'a str> + Clone) -> String {
    match suggest(name, candidates.clone()) {
        Some(s) => format!("did you mean {}?", chars::quote(s)),
        None => {
            let all: Vec<&str> = candidates.into_iter().take(8).collect();
            if all.is_empty() {
                format!("no {what} is defined")
            } else {
                let all: Vec<String> = all.into_iter().map(|c| chars::escape_line(c).0).collect();
                format!("defined {what}s include: {}", all.join(", "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances() {
        assert_eq!(edit_distance("web-srv", "web-servers"), 4);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn suggestions() {
        assert_eq!(
            suggest("web-srv", ["web-servers", "app-servers", "db"]),
            Some("web-servers")
        );
        assert_eq!(suggest("zzzzzz", ["web-servers"]), None);
    }
}
