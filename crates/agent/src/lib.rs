//! Palisade's host agent: the datapath engine on real interfaces.
#![deny(missing_docs)]
