//! Fuzz target `inflight`: see [`pyvhost_fuzz::inflight`] for what it feeds the core and which
//! invariants it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pyvhost_fuzz::inflight::run(data));
