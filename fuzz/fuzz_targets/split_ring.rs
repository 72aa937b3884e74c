//! Fuzz target `split_ring`: see [`pyvhost_fuzz::split_ring`] for what it feeds the core and which
//! invariants it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pyvhost_fuzz::split_ring::run(data));
