//! Fuzz target: the bytes choose a qcow2 layout and a sequence of writes, write-zeroes,
//! discards, flushes and compressed writes, run with one failing storage operation; the image
//! left behind must open, pass the check and read only values the operations allow (see
//! `qnbd::testing::write_ops`). Seeds: `corpus/write_ops/` (made by `make-write-ops-seeds`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = qnbd::testing::write_ops(data);
});
