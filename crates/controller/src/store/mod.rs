//! Where the controller keeps its state: a small key-value interface with two
//! implementations, [`EmbeddedStore`] (redb, one file, the default for a
//! single node) and [`EtcdStore`] (etcd, for several controllers).
//!
//! The interface is deliberately that of etcd's: ordered string keys, values
//! as bytes, a store-wide revision that every write bumps, and one atomic
//! primitive, [`Store::txn`], which checks a set of keys against expected
//! values and writes a set of keys only if they all hold. Every change of the
//! controller is one such transaction (the new version, the current pointer,
//! the change record together), so a failed check or a crash never leaves a
//! half-applied change, and two controllers racing on one etcd cannot both
//! win. Watching is by revision: [`Store::wait_for_write`] returns when a key
//! was written after a store revision (an etcd watch), and the server then
//! re-reads the small current-policy pointer; a store that cannot watch (the
//! embedded one, which only its own controller writes) is polled.
//! [`Store::lock`] is a lock across every controller on the store (on etcd,
//! a key bound to a lease, so a crashed holder's lock expires); controllers
//! take it to compile one change at a time, and the transactions' checks
//! still decide, so a lock lost to a stall cannot corrupt anything.

use std::time::Duration;

mod embedded;
mod etcd;

pub use embedded::EmbeddedStore;
pub use etcd::EtcdStore;

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The embedded database failed.
    #[error("embedded store: {0}")]
    Embedded(String),
    /// etcd could not be reached or answered an error.
    #[error("etcd {endpoint}: {message}")]
    Etcd {
        /// The endpoint tried last.
        endpoint: String,
        /// What went wrong.
        message: String,
    },
    /// A stored value does not decode (a bug or a foreign writer).
    #[error("stored value under {key} is corrupt: {message}")]
    Corrupt {
        /// The key.
        key: String,
        /// The decoding error.
        message: String,
    },
}

/// One condition of a transaction: `key` holds exactly `value` (`None`: is absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    /// The key.
    pub key: String,
    /// The expected value; `None` means the key must not exist.
    pub value: Option<Vec<u8>>,
}

/// The key-value interface of a controller store. Implementations are
/// blocking; the server calls them off its async threads.
pub trait Store: Send + Sync + 'static {
    /// The value of `key`.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every key starting with `prefix`, with its value, in key order.
    fn list_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// If every comparison holds, write every `(key, value)` atomically and
    /// return true; otherwise write nothing and return false.
    fn txn(&self, compares: &[Compare], puts: &[(String, Vec<u8>)]) -> Result<bool, StoreError>;
    /// The store-wide revision: it grows with every successful write.
    fn revision(&self) -> Result<u64, StoreError>;

    /// Wait until `key` may have been written at a store revision after
    /// `after`, for at most about `timeout`: `Ok(true)` when it may have been
    /// (a write, or the store could not tell, as after a compaction),
    /// `Ok(false)` when the time passed without one. Only stores that
    /// [`can_watch`](Store::can_watch) implement it; the others answer
    /// `Ok(true)` at once and their callers poll.
    fn wait_for_write(&self, key: &str, after: u64, timeout: Duration) -> Result<bool, StoreError> {
        let _ = (key, after, timeout);
        Ok(true)
    }

    /// Whether [`wait_for_write`](Store::wait_for_write) waits for writes.
    fn can_watch(&self) -> bool {
        false
    }

    /// Take the store-wide lock `name`, waiting at most `wait` for it:
    /// `Some(lease)` once held (pass it to [`unlock`](Store::unlock)),
    /// `None` when another holder still has it. Across every controller on
    /// the store there is one holder at a time; a holder that stops without
    /// unlocking (a controller that crashed) loses it after `ttl`.
    fn lock(&self, name: &str, ttl: Duration, wait: Duration) -> Result<Option<u64>, StoreError>;

    /// Let go of a lock taken with [`lock`](Store::lock).
    fn unlock(&self, name: &str, lease: u64) -> Result<(), StoreError>;

    /// Write one key unconditionally.
    fn put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.txn(&[], &[(key.to_string(), value.to_vec())]).map(|_| ())
    }
}

/// Decode a JSON value stored under `key`.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

/// Read and decode `key`.
pub(crate) fn get_json<T: serde::de::DeserializeOwned>(store: &dyn Store, key: &str) -> Result<Option<T>, StoreError> {
    store.get(key)?.map(|b| decode(key, &b)).transpose()
}

/// The exclusive end of the key range starting with `prefix` (etcd's `range_end`).
pub(crate) fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // An empty (or all-0xff) prefix: etcd reads "\0" as "to the end of the keyspace".
    vec![0]
}

#[cfg(test)]
pub(crate) mod conformance {
    //! The behaviour every [`Store`] must have, run against each implementation.
    use super::*;

    /// One holder per name; a waiter gets the lock when it is let go.
    fn check_locks(store: &dyn Store) {
        let (ttl, none) = (Duration::from_secs(10), Duration::ZERO);
        let first = store.lock("c", ttl, none).unwrap().expect("a free lock");
        assert_eq!(store.lock("c", ttl, Duration::from_millis(200)).unwrap(), None);
        let other = store.lock("d", ttl, none).unwrap().expect("another name is free");
        store.unlock("c", first).unwrap();
        let second = store.lock("c", ttl, none).unwrap().expect("let go");
        // A stale lease (the first) does not let go of the second holder's lock.
        store.unlock("c", first).unwrap();
        assert_eq!(store.lock("c", ttl, none).unwrap(), None);
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(300));
                store.unlock("c", second).unwrap();
            });
            let t = std::time::Instant::now();
            let third = store
                .lock("c", ttl, Duration::from_secs(10))
                .unwrap()
                .expect("waited for it");
            assert!(t.elapsed() >= Duration::from_millis(200), "{:?}", t.elapsed());
            store.unlock("c", third).unwrap();
        });
        store.unlock("d", other).unwrap();
    }

    pub(crate) fn check(store: &dyn Store) {
        check_locks(store);
        let r0 = store.revision().unwrap();
        assert_eq!(store.get("a/1").unwrap(), None);
        store.put("a/1", b"one").unwrap();
        store.put("a/2", b"two").unwrap();
        store.put("b/1", b"other").unwrap();
        let r1 = store.revision().unwrap();
        assert!(r1 > r0, "revision must grow: {r0} -> {r1}");
        assert_eq!(store.get("a/1").unwrap().as_deref(), Some(&b"one"[..]));
        let listed = store.list_prefix("a/").unwrap();
        assert_eq!(
            listed,
            vec![
                ("a/1".to_string(), b"one".to_vec()),
                ("a/2".to_string(), b"two".to_vec())
            ]
        );
        // A failing comparison writes nothing and leaves the revision alone.
        let bad = [Compare {
            key: "a/1".into(),
            value: Some(b"wrong".to_vec()),
        }];
        assert!(!store.txn(&bad, &[("a/3".into(), b"x".to_vec())]).unwrap());
        assert_eq!(store.get("a/3").unwrap(), None);
        assert_eq!(store.revision().unwrap(), r1);
        let absent = [Compare {
            key: "a/1".into(),
            value: None,
        }];
        assert!(!store.txn(&absent, &[("a/3".into(), b"x".to_vec())]).unwrap());
        // Holding comparisons write all puts.
        let good = [
            Compare {
                key: "a/1".into(),
                value: Some(b"one".to_vec()),
            },
            Compare {
                key: "a/9".into(),
                value: None,
            },
        ];
        let puts = [
            ("a/1".to_string(), b"uno".to_vec()),
            ("a/3".to_string(), b"tres".to_vec()),
        ];
        assert!(store.txn(&good, &puts).unwrap());
        assert_eq!(store.get("a/1").unwrap().as_deref(), Some(&b"uno"[..]));
        assert_eq!(store.get("a/3").unwrap().as_deref(), Some(&b"tres"[..]));
        assert!(store.revision().unwrap() > r1);
        assert_eq!(store.list_prefix("zzz/").unwrap(), vec![]);
    }

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end("a/"), b"a0".to_vec());
        assert_eq!(prefix_end(""), vec![0]);
    }
}
