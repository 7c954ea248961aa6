//! Palisade wire layer (under construction).
