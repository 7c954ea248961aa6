//! Signed heads: the trail's latest signed checkpoint, published OUTSIDE the
//! trail so that cutting, deleting or rolling back the trail is noticed.
//!
//! A checkpoint commits to every record up to its sequence number, but it
//! lives in the trail's own directory: whoever can write the directory can
//! cut the tail to a consistent prefix, delete the last segment with its
//! checkpoints, or put back an older copy, and the trail still verifies. A
//! [`SignedHead`] is that checkpoint with the public key that signed it; the
//! log hands each one to its [`HeadPublisher`]s (a file the operator chose,
//! the controller's store through the agent's client, ...). `verify` given
//! the last published head fails when the trail ends before it or differs
//! from it; [`crate::AuditLog::open`] refuses to extend a trail that does
//! not contain the head its publishers last published, so a rollback is not
//! papered over by new heads.
//!
//! The document is one JSON object, hex for the binary fields:
//! `{"seq":N,"hash":"…","time_ns":T,"signature":"…","public_key":"…"}`.

use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;

use crate::checkpoint::{Checkpoint, Purpose, from_hex, sync_dir, to_hex};
use crate::error::{AuditError, IoContext};
use crate::segment::Hash;

/// The largest head document read (a head is about 400 bytes).
const MAX_HEAD_BYTES: u64 = 64 << 10;

/// A signed checkpoint and the public key that signed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedHead {
    /// The last record it covers.
    pub seq: u64,
    /// That record's chain hash (it commits to every record before it).
    pub hash: Hash,
    /// When it was signed (Unix time, nanoseconds).
    pub time_ns: u64,
    /// The checkpoint's ed25519 signature.
    pub signature: [u8; 64],
    /// The trail's public key.
    pub public_key: [u8; 32],
}

/// The JSON form.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HeadDoc {
    seq: u64,
    hash: String,
    time_ns: u64,
    signature: String,
    public_key: String,
}

impl SignedHead {
    /// The head of checkpoint `c` signed by `public_key`.
    pub fn new(c: &Checkpoint, public_key: [u8; 32]) -> SignedHead {
        SignedHead {
            seq: c.seq,
            hash: c.hash,
            time_ns: c.time_ns,
            signature: c.signature,
            public_key,
        }
    }

    /// The checkpoint it carries.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            seq: self.seq,
            hash: self.hash,
            time_ns: self.time_ns,
            signature: self.signature,
        }
    }

    /// Its public key, if a valid one.
    pub fn verifying_key(&self) -> Option<VerifyingKey> {
        VerifyingKey::from_bytes(&self.public_key).ok()
    }

    /// Whether its signature verifies with its own public key.
    pub fn verify(&self) -> bool {
        self.verifying_key()
            .is_some_and(|k| self.checkpoint().verify(&k, Purpose::Checkpoint))
    }

    /// The JSON document (one line).
    pub fn to_json(&self) -> String {
        let doc = HeadDoc {
            seq: self.seq,
            hash: to_hex(&self.hash),
            time_ns: self.time_ns,
            signature: to_hex(&self.signature),
            public_key: to_hex(&self.public_key),
        };
        // A struct of integers and strings always serializes.
        serde_json::to_string(&doc).unwrap_or_default()
    }

    /// Parse a JSON document; the error says what is wrong.
    pub fn from_json(text: &str) -> Result<SignedHead, String> {
        let doc: HeadDoc = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let hex = |what: &str| format!("`{what}` is not the right number of hex digits");
        Ok(SignedHead {
            seq: doc.seq,
            hash: from_hex(&doc.hash).ok_or_else(|| hex("hash"))?,
            time_ns: doc.time_ns,
            signature: from_hex(&doc.signature).ok_or_else(|| hex("signature"))?,
            public_key: from_hex(&doc.public_key).ok_or_else(|| hex("public_key"))?,
        })
    }

    /// Read a head file; `Ok(None)` when it does not exist.
    pub fn read(path: &Path) -> Result<Option<SignedHead>, AuditError> {
        use std::io::Read;
        let f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(AuditError::io(path, e)),
        };
        let mut text = String::new();
        f.take(MAX_HEAD_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| AuditError::format(path, format!("not a signed head (a JSON document): {e}")))?;
        if text.len() as u64 > MAX_HEAD_BYTES {
            return Err(AuditError::format(path, "not a signed head: larger than 64 KiB"));
        }
        SignedHead::from_json(&text)
            .map(Some)
            .map_err(|e| AuditError::format(path, format!("not a signed head: {e}")))
    }

    /// Write to `path` atomically (a temporary file beside it, synced, then
    /// renamed over it, and the directory synced).
    pub fn write_atomic(&self, path: &Path) -> Result<(), AuditError> {
        let name = path
            .file_name()
            .ok_or_else(|| AuditError::format(path, "a head file needs a file name"))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(".tmp");
        let tmp = path.with_file_name(tmp_name);
        {
            let mut f = std::fs::File::create(&tmp).at(&tmp)?;
            f.write_all(self.to_json().as_bytes()).at(&tmp)?;
            f.write_all(b"\n").at(&tmp)?;
            f.sync_all().at(&tmp)?;
        }
        std::fs::rename(&tmp, path).at(path)?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        sync_dir(dir)
    }
}

/// Where a log publishes its signed heads. The embedding daemon supplies
/// one (the agent: to its controller; the controller: to its store); the
/// crate has [`FileHeadPublisher`].
///
/// [`publish`](HeadPublisher::publish) is called after each checkpoint is
/// durable in the trail, on the appending thread: a publisher that talks to
/// the network should queue and return. A failure does not fail the append
/// (the records are durable); it is counted in
/// [`crate::store::AuditStatus`] and the next head supersedes the missed one.
pub trait HeadPublisher: Send {
    /// Publish `head`, the newest signed head.
    fn publish(&mut self, head: &SignedHead) -> Result<(), String>;

    /// The last head published, read back from where it was published
    /// (`None` if nothing was, or the publisher cannot read back). Opening a
    /// log refuses a trail that does not contain it.
    fn last_published(&mut self) -> Result<Option<SignedHead>, AuditError>;

    /// Where it publishes, for messages (`file /var/lib/palisade/audit.head`).
    fn describe(&self) -> String;
}

/// Publishes each head to a file outside the trail, atomically replacing
/// the previous one.
#[derive(Debug, Clone)]
pub struct FileHeadPublisher {
    path: PathBuf,
}

impl FileHeadPublisher {
    /// A publisher to `path`, which must not be inside the trail `dir`.
    pub fn new(path: &Path, dir: &Path) -> Result<FileHeadPublisher, AuditError> {
        if crate::checkpoint::is_inside(path, dir)? {
            return Err(AuditError::format(
                path,
                format!(
                    "the head file is inside the trail directory {}: whoever can write the trail could roll it back with it; keep it outside",
                    dir.display()
                ),
            ));
        }
        Ok(FileHeadPublisher { path: path.into() })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl HeadPublisher for FileHeadPublisher {
    fn publish(&mut self, head: &SignedHead) -> Result<(), String> {
        head.write_atomic(&self.path).map_err(|e| e.to_string())
    }

    fn last_published(&mut self) -> Result<Option<SignedHead>, AuditError> {
        SignedHead::read(&self.path)
    }

    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    #[test]
    fn json_round_trip_and_strictness() {
        let key = SigningKey::from_bytes(&[9; 32]);
        let c = Checkpoint::sign(&key, Purpose::Checkpoint, 42, [3; 32], 1000);
        let h = SignedHead::new(&c, key.verifying_key().to_bytes());
        assert!(h.verify());
        let back = SignedHead::from_json(&h.to_json()).unwrap();
        assert_eq!(back, h);
        let mut other = h;
        other.seq = 43;
        assert!(!other.verify());
        // Unknown fields, short hex and non-objects are refused.
        let extra = h.to_json().replace("{\"seq\"", "{\"extra\":1,\"seq\"");
        assert!(SignedHead::from_json(&extra).is_err());
        let short = h.to_json().replace(&to_hex(&[3; 32]), "0303");
        assert!(SignedHead::from_json(&short).unwrap_err().contains("hash"));
        assert!(SignedHead::from_json("[]").is_err());
    }
}
