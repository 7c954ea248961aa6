//! The limits `tests/hostile.rs` restates are the library's.

use palisade_policy::limits;

#[test]
fn hostile_tests_use_the_librarys_limits() {
    assert_eq!(limits::MAX_DEPTH, 64);
    assert_eq!(limits::MAX_FILE_BYTES, 32 << 20);
    assert_eq!(limits::MAX_DIAGNOSTICS, 1_000);
    assert_eq!((limits::ALIAS_ALLOWANCE, limits::ALIAS_RATIO), (10_000, 10));
    assert_eq!(limits::MAX_ALIAS_NODES, 1_000_000);
}
