//! TODO(ipv6): being written.
