//! libFuzzer target `peer_frames`: see [`raftkv_fuzz::peer_frames`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| raftkv_fuzz::peer_frames(data));
