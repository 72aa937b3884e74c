//! Fuzz target `daemon_session`: see [`pyvhost_fuzz::daemon_session`] for what it feeds the core and which
//! invariants it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pyvhost_fuzz::daemon_session::run(data));
