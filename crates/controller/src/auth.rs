//! API tokens and roles.
//!
//! A token is 32 random bytes, shown once in hex with a `pal_` prefix; the
//! store keeps only its SHA-256 (`tokens/<hex digest>` → [`TokenRecord`]), so
//! a copy of the store does not hand out credentials, and a lookup is one
//! `get` by digest. Roles (a fixed ladder of permissions checked per
//! endpoint) are part of the API's contract: [`palisade_api::roles`].

use palisade_api::roles::{Revocation, Role};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
    fn secrets_are_random_and_keys_hide_them() {
        let (a, b) = (new_secret(), new_secret());
        assert_ne!(a, b);
        assert!(a.starts_with("pal_") && a.len() == 68);
        let k = token_key(&a);
        assert!(!k.contains(&a[4..]));
        assert_eq!(k, token_key(&a));
    }
}
