//! Roles and the permissions they grant: a fixed ladder, checked by the
//! controller per endpoint and named by clients when they create tokens.

use serde::{Deserialize, Serialize};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Everything, including token management and the agents' endpoints in dev mode.
    Admin,
    /// Read, apply and roll back policy, change tags.
    Operator,
    /// Read, and read the change records.
    Auditor,
    /// Read.
    ReadOnly,
}

/// What an endpoint needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Read inventory, policy, versions, agents.
    Read,
    /// Apply or roll back policy, change tags.
    Change,
    /// Read change records.
    Audit,
    /// Act as an agent without a client certificate (plain-HTTP dev mode only).
    Agent,
    /// Create tokens.
    ManageTokens,
    /// Replace a host's pinned audit key.
    ReplaceKeys,
}

impl Role {
    /// Whether the role grants `p`.
    pub fn allows(self, p: Permission) -> bool {
        match p {
            Permission::Read => true,
            Permission::Change => matches!(self, Role::Admin | Role::Operator),
            Permission::Audit => matches!(self, Role::Admin | Role::Auditor),
            Permission::Agent | Permission::ManageTokens | Permission::ReplaceKeys => self == Role::Admin,
        }
    }

    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Auditor => "auditor",
            Role::ReadOnly => "read-only",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "operator" => Ok(Role::Operator),
            "auditor" => Ok(Role::Auditor),
            "read-only" | "readonly" | "read" => Ok(Role::ReadOnly),
            _ => Err(format!("unknown role \"{s}\" (admin, operator, auditor, read-only)")),
        }
    }
}

/// When and by whom a token was revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Unix time, nanoseconds.
    pub time_ns: u64,
    /// The actor who revoked it.
    pub by: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_grant_the_ladder() {
        use Permission::*;
        assert!(Role::Admin.allows(Change) && Role::Admin.allows(Audit) && Role::Admin.allows(Agent));
        assert!(Role::Operator.allows(Change) && !Role::Operator.allows(Audit));
        assert!(!Role::Auditor.allows(Change) && Role::Auditor.allows(Audit));
        assert!(Role::ReadOnly.allows(Read) && !Role::ReadOnly.allows(Change) && !Role::ReadOnly.allows(Audit));
        assert_eq!("read-only".parse::<Role>(), Ok(Role::ReadOnly));
        assert!("root".parse::<Role>().is_err());
    }
}
