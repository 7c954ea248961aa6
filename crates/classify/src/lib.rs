//! Palisade classify layer (under construction).
