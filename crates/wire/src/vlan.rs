//! TODO(vlan): being written.
