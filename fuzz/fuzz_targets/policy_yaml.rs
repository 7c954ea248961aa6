//! Fuzz the policy loader with generated structure: the input is a program
//! (`crates/policy/tests/support/yaml_program.rs`) that nests block and
//! flow collections, repeats instructions thousands of times, puts anchors,
//! aliases, tags and odd characters; the loader must not panic or overflow
//! its stack, must keep the tree within its depth and alias limits, and must
//! report every diagnostic inside the text, escaped and of bounded size.
#![no_main]

#[path = "../../crates/policy/tests/support/yaml_program.rs"]
mod yaml_program;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = yaml_program::build(data);
    if let Err(e) = yaml_program::check(&text) {
        panic!("{e}\ntext: {text:?}");
    }
});
