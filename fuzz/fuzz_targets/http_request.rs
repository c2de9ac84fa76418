//! libFuzzer target `http_request`: see [`raftkv_fuzz::http_request`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| raftkv_fuzz::http_request(data));
