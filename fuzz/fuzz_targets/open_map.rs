//! Fuzz target: any byte string opened as an in-memory qcow2-or-raw image, mapped and read
//! from start to end. Errors are expected; a panic, an abort, a hang or unbounded memory is a
//! bug. Seeds live in `corpus/open_map/` (made by `qcow2-spec-tests/bad-inputs/make-fuzz-seeds`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = qnbd::testing::open_and_map(data);
});
