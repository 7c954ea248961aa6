//! TODO(arp): being written.
