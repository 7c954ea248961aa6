//! Palisade's lab: a small virtual datacenter on one machine (network namespaces, veth, QEMU guests).
#![deny(missing_docs)]
