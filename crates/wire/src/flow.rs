//! TODO(flow): being written.
