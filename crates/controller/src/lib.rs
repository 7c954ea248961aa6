//! Palisade's controller: API, versioned policy, stores (embedded and etcd), secure agent channel.
#![deny(missing_docs)]
