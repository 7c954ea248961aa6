//! TODO(udp): being written.
