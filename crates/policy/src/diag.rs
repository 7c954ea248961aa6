//! Diagnostics: what is wrong in a policy, where, and what to do about it.
//!
//! Loading and validation never stop at the first problem: every check pushes
//! a [`Diagnostic`] and carries on, so one `palisade policy check` run lists
//! everything. [`render`] prints them the way rustc does, with the source line
//! and a caret under the offending column.

use std::fmt::{self, Write as _};

use serde::Serialize;

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
        write!(
            f,
            "{}:{}:{}: {sev}[{}]: {}",
            self.file, self.line, self.column, self.kind, self.message
        )
    }
}

/// Render diagnostics rustc-style: header, source line with a caret, hint.
pub fn render(diags: &[Diagnostic], sources: &SourceMap) -> String {
    let mut out = String::new();
    for d in diags {
        let _ = writeln!(out, "{d}");
        if let Some(text) = sources.line(&d.file, d.line) {
            let num = d.line.to_string();
            let pad = " ".repeat(num.len());
            let caret_pad: String = text
                .chars()
                .take(d.column.saturating_sub(1) as usize)
                .map(|c| if c == '\t' { '\t' } else { ' ' })
                .collect();
            let _ = writeln!(out, "{pad} |");
            let _ = writeln!(out, "{num} | {text}");
            let _ = writeln!(out, "{pad} | {caret_pad}^");
        }
        if let Some(h) = &d.hint {
            let _ = writeln!(out, "  = hint: {h}");
        }
    }
    out
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

/// The closest candidate to `name`, if it is close enough to be a likely typo.
pub fn suggest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(name, c), c))
        // Half the longer name: "web-srv" still finds "web-servers", "zzz" finds nothing.
        .filter(|(d, c)| *d <= (name.chars().count().max(c.chars().count()) / 2).max(1))
        .min_by_key(|(d, c)| (*d, *c))
        .map(|(_, c)| c)
}

/// A "did you mean" hint for an unknown name, or a list of what exists.
pub fn did_you_mean<'a>(name: &str, what: &str, candidates: impl IntoIterator<Item = &'a str> + Clone) -> String {
    match suggest(name, candidates.clone()) {
        Some(s) => format!("did you mean \"{s}\"?"),
        None => {
            let all: Vec<&str> = candidates.into_iter().take(8).collect();
            if all.is_empty() {
                format!("no {what} is defined")
            } else {
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
