//! Fuzz target `frontend_replies`: see [`pyvhost_fuzz::frontend_replies`] for what it feeds the core and which
//! invariants it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pyvhost_fuzz::frontend_replies::run(data));
