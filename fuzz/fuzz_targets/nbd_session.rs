//! Drive the NBD handshake and transmission phases with arbitrary client bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = qnbd::testing::nbd_session(data);
});
