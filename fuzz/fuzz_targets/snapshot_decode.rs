//! libFuzzer target `snapshot_decode`: see [`raftkv_fuzz::snapshot_decode`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| raftkv_fuzz::snapshot_decode(data));
