//! Classtypes: a rule's category and default priority.
//!
//! A rule's `classtype:bad-unknown` names an entry of the classification
//! table, which gives the category EVE prints (`alert.category`) and the
//! priority the rule has unless it sets one (`alert.severity`, and the order
//! of rules within one action). The default table is the one Suricata and
//! the common rulesets ship; a `classification.config` file replaces it.

use std::collections::HashMap;

use crate::error::LoadError;

/// One classtype.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Class {
    /// The category text.
    pub description: String,
    /// The default priority (1 is the most severe).
    pub priority: u8,
}

/// The classification table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classifications {
    classes: HashMap<String, Class>,
}

/// Suricata's `classification.config`: name, description, priority.
const DEFAULT: &[(&str, &str, u8)] = &[
    ("not-suspicious", "Not Suspicious Traffic", 3),
    ("unknown", "Unknown Traffic", 3),
    ("bad-unknown", "Potentially Bad Traffic", 2),
    ("attempted-recon", "Attempted Information Leak", 2),
    ("successful-recon-limited", "Information Leak", 2),
    ("successful-recon-largescale", "Large Scale Information Leak", 2),
    ("attempted-dos", "Attempted Denial of Service", 2),
    ("successful-dos", "Denial of Service", 2),
    ("attempted-user", "Attempted User Privilege Gain", 1),
    ("unsuccessful-user", "Unsuccessful User Privilege Gain", 1),
    ("successful-user", "Successful User Privilege Gain", 1),
    ("attempted-admin", "Attempted Administrator Privilege Gain", 1),
    ("successful-admin", "Successful Administrator Privilege Gain", 1),
    ("rpc-portmap-decode", "Decode of an RPC Query", 2),
    ("shellcode-detect", "Executable code was detected", 1),
    ("string-detect", "A suspicious string was detected", 3),
    ("suspicious-filename-detect", "A suspicious filename was detected", 2),
    (
        "suspicious-login",
        "An attempted login using a suspicious username was detected",
        2,
    ),
    ("system-call-detect", "A system call was detected", 2),
    ("tcp-connection", "A TCP connection was detected", 4),
    ("trojan-activity", "A Network Trojan was detected", 1),
    (
        "unusual-client-port-connection",
        "A client was using an unusual port",
        2,
    ),
    ("network-scan", "Detection of a Network Scan", 3),
    ("denial-of-service", "Detection of a Denial of Service Attack", 2),
    (
        "non-standard-protocol",
        "Detection of a non-standard protocol or event",
        2,
    ),
    ("protocol-command-decode", "Generic Protocol Command Decode", 3),
    (
        "web-application-activity",
        "access to a potentially vulnerable web application",
        2,
    ),
    ("web-application-attack", "Web Application Attack", 1),
    ("misc-activity", "Misc activity", 3),
    ("misc-attack", "Misc Attack", 2),
    ("icmp-event", "Generic ICMP event", 3),
    ("inappropriate-content", "Inappropriate Content was Detected", 1),
    ("policy-violation", "Potential Corporate Privacy Violation", 1),
    (
        "default-login-attempt",
        "Attempt to login by a default username and password",
        2,
    ),
    ("targeted-activity", "Targeted Malicious Activity was Detected", 1),
    ("exploit-kit", "Exploit Kit Activity Detected", 1),
    ("external-ip-check", "Device Retrieving External IP Address Detected", 2),
    ("domain-c2", "Domain Observed Used for C2 Detected", 1),
    ("pup-activity", "Possibly Unwanted Program Detected", 2),
    ("credential-theft", "Successful Credential Theft Detected", 1),
    ("social-engineering", "Possible Social Engineering Attempted", 2),
    ("coin-mining", "Crypto Currency Mining Activity Detected", 2),
    (
        "command-and-control",
        "Malware Command and Control Activity Detected",
        1,
    ),
];

impl Default for Classifications {
    fn default() -> Self {
        Classifications {
            classes: DEFAULT
                .iter()
                .map(|&(name, description, priority)| {
                    (
                        name.to_string(),
                        Class {
                            description: description.to_string(),
                            priority,
                        },
                    )
                })
                .collect(),
        }
    }
}

impl Classifications {
    /// Reads a `classification.config`: lines `config classification: name,description,priority`;
    /// `#` comments and blank lines are ignored.
    pub fn parse(text: &str) -> Result<Self, LoadError> {
        let mut classes = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: &str| LoadError::BadClassification {
                line: i + 1,
                reason: reason.to_string(),
            };
            let rest = line
                .strip_prefix("config classification:")
                .ok_or_else(|| bad("expected `config classification: name,description,priority`"))?;
            let mut parts = rest.splitn(3, ',');
            let name = parts.next().unwrap_or("").trim();
            let description = parts.next().ok_or_else(|| bad("missing description"))?.trim();
            let priority = parts
                .next()
                .ok_or_else(|| bad("missing priority"))?
                .trim()
                .parse::<u8>()
                .map_err(|_| bad("priority is not a number from 0 to 255"))?;
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(bad("the name must be letters, digits, '-' and '_'"));
            }
            classes.insert(
                name.to_string(),
                Class {
                    description: description.to_string(),
                    priority,
                },
            );
        }
        Ok(Classifications { classes })
    }

    /// The entry for `name`.
    pub fn get(&self, name: &str) -> Option<&Class> {
        self.classes.get(name)
    }

    /// Number of classtypes.
    pub fn len(&self) -> usize {
        self.classes.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_table_and_parsing() {
        let d = Classifications::default();
        assert_eq!(d.get("bad-unknown").unwrap().priority, 2);
        assert_eq!(
            d.get("trojan-activity").unwrap().description,
            "A Network Trojan was detected"
        );
        let c = Classifications::parse("# x\nconfig classification: foo,Foo Things,4\n").unwrap();
        assert_eq!(c.get("foo").unwrap().priority, 4);
        assert!(Classifications::parse("config classification: foo,Foo\n").is_err());
        assert!(Classifications::parse("classification: foo,Foo,1\n").is_err());
    }
}
