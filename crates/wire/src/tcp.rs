//! TODO(tcp): being written.
