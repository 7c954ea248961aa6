//! Typed errors: a refused rule, a ruleset that did not load.

use core::fmt;

/// Why a rule was refused, with where: line and column (1-based) of the
/// offending text and, for an option, its keyword.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    /// Line of the offending text.
    pub line: usize,
    /// Column of the offending text (in characters of bytes: the rule file's byte offset in the line, plus one).
    pub column: usize,
    /// The option keyword concerned, if the error is in an option.
    pub keyword: Option<String>,
    kind: RuleErrorKind,
}

impl RuleError {
    pub(crate) fn new(line: usize, column: usize, keyword: Option<String>, kind: RuleErrorKind) -> Self {
        RuleError {
            line,
            column,
            keyword,
            kind,
        }
    }

    /// What is wrong, without the position.
    pub fn reason(&self) -> String {
        self.kind.to_string()
    }

    /// Whether the rule uses a keyword (or protocol, or action) outside the
    /// supported subset, as opposed to being malformed.
    pub fn is_unsupported(&self) -> bool {
        matches!(
            self.kind,
            RuleErrorKind::UnknownKeyword | RuleErrorKind::UnknownProtocol(_) | RuleErrorKind::UnknownAction(_)
        )
    }
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}: ", self.line, self.column)?;
        if let Some(k) = &self.keyword {
            write!(f, "keyword `{k}`: ")?;
        }
        write!(f, "{}", self.kind)
    }
}

impl std::error::Error for RuleError {}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RuleErrorKind {
    #[error("the rule has no option list in parentheses")]
    MissingOptions,
    #[error("the rule is not terminated: the option list must end with ')'")]
    Unterminated,
    #[error("a rule header has 7 fields (action protocol source ports direction destination ports), found {0}")]
    BadHeader(usize),
    #[error("unknown action {0:?} (supported: alert, drop, reject, pass)")]
    UnknownAction(String),
    #[error("unknown or unsupported protocol {0:?} (supported: ip, tcp, udp, icmp, http, tls, dns)")]
    UnknownProtocol(String),
    #[error("direction must be -> or <>, found {0:?}")]
    BadDirection(String),
    #[error("{0}")]
    BadGroup(String),
    #[error("unknown or unsupported keyword")]
    UnknownKeyword,
    #[error("{0}")]
    BadValue(String),
    #[error("the option is missing its ';'")]
    MissingSemicolon,
    #[error("the rule has no sid")]
    MissingSid,
    #[error("the rule is longer than {0} bytes")]
    TooLong(usize),
    #[error("sid {0} is already used by the rule on line {1}")]
    DuplicateSid(u32, usize),
}

/// Why a ruleset did not load.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// Some rules were refused and the caller asked for all or nothing.
    #[error("{} rule(s) refused; first: {}", .0.len(), .0.first().map(ToString::to_string).unwrap_or_default())]
    Refused(Vec<RuleError>),
    /// A profile names a classtype, or selects nothing it could select.
    #[error("profile {profile:?}: {reason}")]
    BadProfile {
        /// The profile's name.
        profile: String,
        /// What is wrong.
        reason: String,
    },
    /// A classification file line did not parse.
    #[error("classification line {line}: {reason}")]
    BadClassification {
        /// The line.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}
