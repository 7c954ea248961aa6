//! Palisade's packet sources and sinks.
//!
//! Everything above this crate is sans-IO: the datapath is handed packets and
//! the current time. This crate is where packets come from and go to. Today
//! that is capture files ([`capture`]); AF_PACKET rings, TAP devices and the
//! VXLAN underlay socket join it behind the same kind of interface.
#![deny(missing_docs)]

pub mod capture;
