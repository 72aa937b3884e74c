//! Fuzz target `decode_request`: see [`pyvhost_fuzz::decode_request`] for what it feeds the core and which
//! invariants it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pyvhost_fuzz::decode_request::run(data));
