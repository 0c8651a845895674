//! Drive a connection on the ring data plane (after a real negotiation over a socket pair) with
//! arbitrary client bytes. Shares the `nbd_session` corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = qnbd::testing::nbd_plane_session(data);
});
