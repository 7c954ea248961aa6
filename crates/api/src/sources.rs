//! What a policy bundle is compiled from: the policy files and the tag
//! overlay the API keeps over them. Its own module so that the documents,
//! the bundle compilation and the deltas between versions all use these
//! without depending on one another.

use std::collections::BTreeMap;

/// Policy files by name (`name.yaml` → YAML text), in name order.
pub type Files = BTreeMap<String, String>;

/// A tag overlay: VM name → tag key → `Some(value)` (set) or `None` (removed).
///
/// The overlay is applied over the tags the policy files give a VM, so tagging
/// through the API needs no edit of the files, and survives new versions.
pub type TagOverlay = BTreeMap<String, BTreeMap<String, Option<String>>>;
