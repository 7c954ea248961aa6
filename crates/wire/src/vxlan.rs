//! TODO(vxlan): being written.
