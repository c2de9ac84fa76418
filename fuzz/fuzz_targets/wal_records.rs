//! libFuzzer target `wal_records`: see [`raftkv_fuzz::wal_records`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| raftkv_fuzz::wal_records(data));
