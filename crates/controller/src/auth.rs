//! API tokens and roles.
//!
//! A token is 32 random bytes, shown once in hex with a `pal_` prefix; the
//! store keeps only its SHA-256 (`tokens/<hex digest>` → [`TokenRecord`]), so
//! a copy of the store does not hand out credentials, and a lookup is one
//! `get` by digest. Roles are a fixed ladder of permissions checked per
//! endpoint with [`Role::allows`].

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
}

impl Role {
    /// Whether the role grants `p`.
    pub fn allows(self, p: Permission) -> bool {
        match p {
            Permission::Read => true,
            Permission::Change => matches!(self, Role::Admin | Role::Operator),
            Permission::Audit => matches!(self, Role::Admin | Role::Auditor),
            Permission::Agent | Permission::ManageTokens => self == Role::Admin,
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

/// A stored token (without the secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The token's name: the actor of the changes made with it.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// When it was created (Unix time, nanoseconds).
    pub created_ns: u64,
    /// When it was revoked, and by whom: a revoked token authenticates
    /// nothing, and its record stays so that changes made with it keep a
    /// named actor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<Revocation>,
}

/// When and by whom a token was revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Unix time, nanoseconds.
    pub time_ns: u64,
    /// The actor who revoked it.
    pub by: String,
}

/// A new random token secret.
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("pal_{}", hex(&bytes))
}

/// The store key of a token secret.
pub fn token_key(secret: &str) -> String {
    format!("tokens/{}", hex(&Sha256::digest(secret.as_bytes())))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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

    #[test]
    fn secrets_are_random_and_keys_hide_them() {
        let (a, b) = (new_secret(), new_secret());
        assert_ne!(a, b);
        assert!(a.starts_with("pal_") && a.len() == 68);
        let k = token_key(&a);
        assert!(!k.contains(&a[4..]));
        assert_eq!(k, token_key(&a));
    }
}
