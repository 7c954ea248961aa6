//! Palisade policy layer (under construction).
