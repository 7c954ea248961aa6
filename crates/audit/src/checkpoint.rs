//! Signed checkpoints and the log's signing key.
//!
//! A checkpoint `{seq, hash, time, signature}` is an ed25519 signature over
//! the chain hash of record `seq`: it commits to every record up to `seq`, so
//! rewriting history (even with every hash recomputed) needs the private key.
//! Each segment has a sidecar `<segment>.ckpt` of fixed-size entries; its
//! first entry is the segment's anchor (the record before the segment: its
//! header's `first_seq - 1` and `prev_hash`), so a segment verifies on its own
//! once older segments are deleted by retention. Deletions by retention are
//! themselves signed, with a different domain tag, in `retention.ckpt`, so a
//! log that starts late is either explained by a signed retention entry or
//! reported.
//!
//! The key lives at `<dir>/audit.key` (hex seed, mode 0600), created on first
//! open, with the public key at `<dir>/audit.pub`. A verifier should be given
//! the public key from elsewhere: one read from the log directory only shows
//! the log is consistent with itself.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

use crate::error::{AuditError, IoContext};
use crate::segment::Hash;

/// Length of one checkpoint entry.
pub const CHECKPOINT_LEN: usize = field::SIGNATURE.end;

/// Field layout of a checkpoint entry.
mod field {
    use std::ops::Range;
    pub const SEQ: Range<usize> = 0..8;
    pub const HASH: Range<usize> = 8..40;
    pub const TIME_NS: Range<usize> = 40..48;
    pub const SIGNATURE: Range<usize> = 48..112;
}

/// What a signature is for: the tag is part of the signed message, so a
/// checkpoint cannot be passed off as a retention entry or the reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A checkpoint of the chain.
    Checkpoint,
    /// The records up to `seq` were deleted by retention.
    Retention,
}

impl Purpose {
    fn tag(self) -> &'static [u8] {
        match self {
            Purpose::Checkpoint => b"palisade-audit checkpoint v1\0",
            Purpose::Retention => b"palisade-audit retention v1\0",
        }
    }
}

/// One signed checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// The record it covers (0: before the first record).
    pub seq: u64,
    /// That record's chain hash.
    pub hash: Hash,
    /// When it was made (Unix time, nanoseconds).
    pub time_ns: u64,
    /// ed25519 signature over the purpose tag, seq, hash and time.
    pub signature: [u8; 64],
}

impl Checkpoint {
    fn message(purpose: Purpose, seq: u64, hash: &Hash, time_ns: u64) -> Vec<u8> {
        let mut m = purpose.tag().to_vec();
        m.extend_from_slice(&seq.to_le_bytes());
        m.extend_from_slice(hash);
        m.extend_from_slice(&time_ns.to_le_bytes());
        m
    }

    /// Sign a checkpoint.
    pub fn sign(key: &SigningKey, purpose: Purpose, seq: u64, hash: Hash, time_ns: u64) -> Checkpoint {
        let signature = key.sign(&Self::message(purpose, seq, &hash, time_ns)).to_bytes();
        Checkpoint {
            seq,
            hash,
            time_ns,
            signature,
        }
    }

    /// Whether the signature is `key`'s for this content.
    pub fn verify(&self, key: &VerifyingKey, purpose: Purpose) -> bool {
        let sig = Signature::from_bytes(&self.signature);
        key.verify(&Self::message(purpose, self.seq, &self.hash, self.time_ns), &sig)
            .is_ok()
    }

    /// The entry's bytes.
    pub fn emit(&self) -> [u8; CHECKPOINT_LEN] {
        let mut b = [0u8; CHECKPOINT_LEN];
        b[field::SEQ].copy_from_slice(&self.seq.to_le_bytes());
        b[field::HASH].copy_from_slice(&self.hash);
        b[field::TIME_NS].copy_from_slice(&self.time_ns.to_le_bytes());
        b[field::SIGNATURE].copy_from_slice(&self.signature);
        b
    }

    /// Parse an entry; `None` when `b` is short.
    pub fn parse(b: &[u8]) -> Option<Checkpoint> {
        let b = b.get(..CHECKPOINT_LEN)?;
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&b[field::HASH]);
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&b[field::SIGNATURE]);
        Some(Checkpoint {
            seq: u64::from_le_bytes(b[field::SEQ].try_into().ok()?),
            hash,
            time_ns: u64::from_le_bytes(b[field::TIME_NS].try_into().ok()?),
            signature,
        })
    }
}

/// The entries of a checkpoint file and the length of a torn tail (a
/// trailing partial entry), if any.
pub fn read_checkpoints(path: &Path) -> Result<(Vec<Checkpoint>, usize), AuditError> {
    let data = std::fs::read(path).at(path)?;
    let chunks = data.chunks_exact(CHECKPOINT_LEN);
    let torn = chunks.remainder().len();
    Ok((chunks.filter_map(Checkpoint::parse).collect(), torn))
}

/// Append an entry to a checkpoint file and make it durable.
pub fn append_checkpoint(path: &Path, c: &Checkpoint) -> Result<(), AuditError> {
    let mut f = OpenOptions::new().create(true).append(true).open(path).at(path)?;
    f.write_all(&c.emit()).at(path)?;
    f.sync_data().at(path)
}

/// The path of the retention file in `dir`.
pub fn retention_path(dir: &Path) -> PathBuf {
    dir.join("retention.ckpt")
}

/// Lowercase hex.
pub fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parse exactly 32 bytes of hex (surrounding whitespace ignored).
fn from_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        // `s` is ASCII of length 64, so every 2-byte slice is in bounds and on a char boundary.
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Read a signing key (a hex ed25519 seed).
pub fn read_signing_key(path: &Path) -> Result<SigningKey, AuditError> {
    let text = std::fs::read_to_string(path).at(path)?;
    let seed = from_hex32(&text).ok_or_else(|| AuditError::Key {
        path: path.into(),
        reason: "expected 64 hex digits (an ed25519 seed)".into(),
    })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Read a public key (hex).
pub fn read_verifying_key(path: &Path) -> Result<VerifyingKey, AuditError> {
    let text = std::fs::read_to_string(path).at(path)?;
    let bytes = from_hex32(&text).ok_or_else(|| AuditError::Key {
        path: path.into(),
        reason: "expected 64 hex digits (an ed25519 public key)".into(),
    })?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| AuditError::Key {
        path: path.into(),
        reason: format!("not a valid ed25519 public key: {e}"),
    })
}

/// Write `text` to a new file `path` with `mode`, durably.
fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), AuditError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .at(path)?;
    f.write_all(text.as_bytes()).at(path)?;
    f.sync_all().at(path)
}

/// The log's signing key: `external` if given, else `<dir>/audit.key`,
/// created (with `audit.pub`) when neither exists. `audit.pub` is written if
/// missing and must match the key if present.
pub fn load_or_create_key(dir: &Path, external: Option<&Path>) -> Result<(SigningKey, bool), AuditError> {
    let pub_path = dir.join("audit.pub");
    let (key, created) = match external {
        Some(p) => (read_signing_key(p)?, false),
        None => {
            let key_path = dir.join("audit.key");
            if key_path.exists() {
                (read_signing_key(&key_path)?, false)
            } else {
                let mut seed = [0u8; 32];
                getrandom::fill(&mut seed).map_err(|e| AuditError::Key {
                    path: key_path.clone(),
                    reason: format!("no randomness for a new key: {e}"),
                })?;
                write_new(&key_path, &format!("{}\n", to_hex(&seed)), 0o600)?;
                (SigningKey::from_bytes(&seed), true)
            }
        }
    };
    let public = key.verifying_key();
    if pub_path.exists() {
        let stored = read_verifying_key(&pub_path)?;
        if stored != public {
            return Err(AuditError::Key {
                path: pub_path,
                reason: "does not match the signing key".into(),
            });
        }
    } else {
        write_new(&pub_path, &format!("{}\n", to_hex(public.as_bytes())), 0o644)?;
    }
    if created {
        sync_dir(dir)?;
    }
    Ok((key, created))
}

/// fsync a directory, so that entries created or removed in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_purpose_separation() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let c = Checkpoint::sign(&key, Purpose::Checkpoint, 9, [1; 32], 77);
        let vk = key.verifying_key();
        assert!(c.verify(&vk, Purpose::Checkpoint));
        assert!(!c.verify(&vk, Purpose::Retention));
        let back = Checkpoint::parse(&c.emit()).unwrap();
        assert_eq!(back, c);
        let mut bad = c;
        bad.seq = 10;
        assert!(!bad.verify(&vk, Purpose::Checkpoint));
        let other = SigningKey::from_bytes(&[4; 32]).verifying_key();
        assert!(!c.verify(&other, Purpose::Checkpoint));
    }

    #[test]
    fn hex_parsing() {
        assert_eq!(from_hex32(&to_hex(&[0xab; 32])), Some([0xab; 32]));
        assert_eq!(from_hex32("zz"), None);
        assert_eq!(from_hex32(&"é".repeat(32)), None);
    }
}
