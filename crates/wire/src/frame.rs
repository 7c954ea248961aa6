//! TODO(frame): being written.
