//! Why a rule was refused.
//!
//! Rules come from the policy compiler or from files, so a bad one is reported,
//! never trusted: a classifier that stored an inconsistent rule could answer
//! differently from the oracle.

/// Why a classifier refused a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RuleError {
    /// The source and destination prefixes are of different address families.
    #[error("source and destination prefixes are of different address families")]
    MixedFamilies,
    /// A port range whose low end is above its high end.
    #[error("empty port range {lo}..={hi}")]
    EmptyPortRange {
        /// The low end.
        lo: u16,
        /// The high end.
        hi: u16,
    },
    /// A prefix length longer than the address.
    #[error("bad prefix length {len} (at most {max})")]
    BadPrefixLength {
        /// The length given.
        len: u8,
        /// The longest allowed for the family.
        max: u8,
    },
    /// Every rule id is in use.
    #[error("classifier is full")]
    Full,
}
