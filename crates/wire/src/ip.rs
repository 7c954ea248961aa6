//! TODO(ip): being written.
