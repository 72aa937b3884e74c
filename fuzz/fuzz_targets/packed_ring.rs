//! Fuzz target `packed_ring`: see [`pyvhost_fuzz::packed_ring`] for what it feeds the core and which
//! invariants it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pyvhost_fuzz::packed_ring::run(data));
