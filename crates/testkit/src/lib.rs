//! Palisade's test support, for tests, benches and fuzz targets only (a
//! dev-dependency; never a dependency of a library or binary).
//!
//! The properties the fuzz targets check live here, so that the targets
//! (`fuzz/`) and the tests that replay their committed crash inputs share one
//! definition, and the libraries carry no test code and do no file I/O for
//! it (after OPTE's test-support crate):
//! - [`wire`]: every parser run on one input, emit/parse round trips, the
//!   flow-key extractors agreeing ([`wire::check_frame`], the `dissect` target).
//! - [`engine`]: programs of frames, time and policy changes run through two
//!   engines, batched and frame by frame, which must agree
//!   ([`engine::check_engine`], the `engine` target); [`engine::vm_frame`]
//!   builds the frames between VMs that tests and benches send.
//! - [`regressions`]: replaying every input committed under
//!   `fuzz/regressions/<target>/` ([`regressions::assert_regressions_pass`]).
#![deny(missing_docs)]

pub mod engine;
pub mod regressions;
pub mod wire;

pub use engine::{check_engine, vm_frame};
pub use regressions::assert_regressions_pass;
pub use wire::check_frame;
