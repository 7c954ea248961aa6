//! The bounds the loader puts on policy text, in one place.
//!
//! A policy file is input from whoever can write the policy directory or
//! call the controller's API, and its structure is input too: a few hundred
//! bytes of nesting or aliases can otherwise take the stack or gigabytes of
//! memory. Each limit is far above what an honest policy reaches (the
//! numbers below say how far) and each is refused with a diagnostic at the
//! position where it is crossed. `crates/policy/README.md` lists them for
//! users.

/// The largest policy file read, in bytes (32 MiB).
///
/// The controller's request body limit, so that anything the API can take
/// in can be loaded; an inventory of 50,000 VMs written one per line is
/// about 10 MB. A file on disk is refused by its size before it is read.
pub const MAX_FILE_BYTES: u64 = 32 << 20;

/// How deep collections (block or flow, sequences or mappings, in any mix)
/// may nest in a file, the document's own collection counting as one level.
///
/// The deepest a valid policy goes is 6 (a file's mapping, `vms`, a VM,
/// `vnics`, a vNIC, `ips`). The tree is built without recursion, and this
/// bound keeps the code that walks, clones and drops it shallow as well.
pub const MAX_DEPTH: usize = 64;

/// The nodes that aliases may copy in a file regardless of its size.
///
/// With [`ALIAS_RATIO`]: at each alias (and each anchored node, whose copy
/// the loader keeps), the nodes copied so far may not exceed
/// `ALIAS_ALLOWANCE + ALIAS_RATIO × the nodes written out before it`, so a
/// file's tree is at most about eleven times the size of its text's. An
/// alias bomb (`a1: &a1 [*a0, *a0, …]`, ten copies a level) is refused at
/// its fourth level, a few hundred bytes into the file; a tag map shared by
/// thousands of VMs (PyYAML writes shared objects as anchors) stays well
/// within it.
pub const ALIAS_ALLOWANCE: u64 = 10_000;

/// See [`ALIAS_ALLOWANCE`].
pub const ALIAS_RATIO: u64 = 10;

/// The most nodes aliases may copy in one file, however large it is (about
/// 60 MB of tree): the ratio alone would let a 32 MiB file copy a hundred
/// million. 50,000 VMs sharing a tag map copy 150,000.
pub const MAX_ALIAS_NODES: u64 = 1_000_000;

/// The diagnostics one load reports; past it, one more says how many
/// errors and warnings were left out (an error if any of them was).
pub const MAX_DIAGNOSTICS: usize = 1_000;

/// The characters of a value quoted in a diagnostic's message or hint
/// before it is cut with `…`.
pub const MAX_QUOTED_CHARS: usize = 64;

/// The characters of a source line shown under a diagnostic: a window
/// around the column, cut with `…` at either end.
pub const MAX_CONTEXT_CHARS: usize = 100;
