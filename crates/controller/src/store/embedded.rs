//! The embedded store: one redb file, for a single controller.
//!
//! redb gives serializable write transactions, so [`Store::txn`] is a write
//! transaction that reads the compared keys and aborts (by not committing)
//! when one differs. The revision is a counter in its own table, bumped in
//! the same transaction as the writes it counts. A redb file has one
//! process, so [`Store::lock`] is a lock in memory: what `ttl` guards
//! against, a holder gone without unlocking, cannot outlive the process.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redb::{Database, ReadableTable, TableDefinition};

use super::{Compare, Store, StoreError};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";

/// A [`Store`] in a redb file.
pub struct EmbeddedStore {
    db: Database,
    /// Held locks by name, with their lease numbers.
    locks: Mutex<(HashMap<String, u64>, u64)>,
    unlocked: Condvar,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Embedded(e.to_string())
}

impl EmbeddedStore {
    /// Open (or create) the store file at `path`.
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        let db = Database::create(path).map_err(|e| StoreError::Embedded(format!("{}: {e}", path.display())))?;
        // Create both tables up front so that read transactions never meet a missing table.
        let tx = db.begin_write().map_err(err)?;
        tx.open_table(KV).map_err(err)?;
        tx.open_table(META).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(EmbeddedStore {
            db,
            locks: Mutex::default(),
            unlocked: Condvar::new(),
        })
    }
}

impl Store for EmbeddedStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(KV).map_err(err)?;
        Ok(t.get(key).map_err(err)?.map(|v| v.value().to_vec()))
    }

    fn list_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(KV).map_err(err)?;
        let mut out = Vec::new();
        for item in t.range(prefix..).map_err(err)? {
            let (k, v) = item.map_err(err)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn txn(&self, compares: &[Compare], puts: &[(String, Vec<u8>)]) -> Result<bool, StoreError> {
        let tx = self.db.begin_write().map_err(err)?;
        {
            let mut t = tx.open_table(KV).map_err(err)?;
            for c in compares {
                let now = t.get(c.key.as_str()).map_err(err)?.map(|v| v.value().to_vec());
                if now != c.value {
                    // Dropping an uncommitted write transaction aborts it.
                    return Ok(false);
                }
            }
            for (k, v) in puts {
                t.insert(k.as_str(), v.as_slice()).map_err(err)?;
            }
            let mut m = tx.open_table(META).map_err(err)?;
            let rev = m.get(REVISION).map_err(err)?.map_or(0, |v| v.value());
            m.insert(REVISION, rev + 1).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(true)
    }

    fn revision(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let m = tx.open_table(META).map_err(err)?;
        Ok(m.get(REVISION).map_err(err)?.map_or(0, |v| v.value()))
    }

    fn lock(&self, name: &str, _ttl: Duration, wait: Duration) -> Result<Option<u64>, StoreError> {
        let deadline = Instant::now() + wait;
        let mut locks = self.locks();
        loop {
            if !locks.0.contains_key(name) {
                locks.1 += 1;
                let lease = locks.1;
                locks.0.insert(name.to_string(), lease);
                return Ok(Some(lease));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            locks = self
                .unlocked
                .wait_timeout(locks, left)
                .map_or_else(|p| p.into_inner().0, |(g, _)| g);
        }
    }

    fn unlock(&self, name: &str, lease: u64) -> Result<(), StoreError> {
        let mut locks = self.locks();
        if locks.0.get(name) == Some(&lease) {
            locks.0.remove(name);
            self.unlocked.notify_all();
        }
        Ok(())
    }
}

impl EmbeddedStore {
    fn locks(&self) -> MutexGuard<'_, (HashMap<String, u64>, u64)> {
        // Each change to the table is one insert or remove: a panic cannot
        // leave it half-done, so a poisoned lock still holds a whole table.
        self.locks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformance_and_reopen() {
        let dir = std::env::temp_dir().join(format!("palisade-ctl-redb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("store.redb");
        let _ = std::fs::remove_file(&path);
        {
            let s = EmbeddedStore::open(&path).unwrap();
            super::super::conformance::check(&s);
        }
        // The data and the revision survive a restart.
        let s = EmbeddedStore::open(&path).unwrap();
        assert_eq!(s.get("a/1").unwrap().as_deref(), Some(&b"uno"[..]));
        assert!(s.revision().unwrap() >= 4);
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
