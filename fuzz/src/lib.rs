//! The logic of pyvhost's coverage-guided fuzz targets, one module per target; each
//! `fuzz_targets/<name>.rs` only hands libFuzzer's input to `<name>::run`. Keeping the
//! logic here lets `cargo test --manifest-path fuzz/Cargo.toml` replay every committed
//! corpus file (and any crash added to the corpus) on stable, and lets [`seeds`] build the
//! seed corpora from the core's own encoders.
//!
//! Every target asserts invariants, not only "no panic": round trips for the decoders,
//! no fd leaked by a daemon session, replies the front-end accepts having the shape asked
//! for, no ring head handed out twice while in flight, segments inside guest memory and
//! device writes inside the ring's own areas, and nothing lost or duplicated by inflight
//! tracking across back-end crashes.

pub mod daemon_session;
pub mod decode_request;
pub mod frontend_channel;
pub mod frontend_replies;
pub mod inflight;
pub mod input;
pub mod packed_ring;
pub mod ring;
pub mod seeds;
pub mod split_ring;
pub mod stream;

/// A target's entry point: one fuzz input.
pub type Target = fn(&[u8]);

/// Every target, by name (the directory names under `fuzz/corpus/`).
pub const TARGETS: &[(&str, Target)] = &[
    ("decode_request", decode_request::run),
    ("daemon_session", daemon_session::run),
    ("frontend_replies", frontend_replies::run),
    ("frontend_channel", frontend_channel::run),
    ("split_ring", split_ring::run),
    ("packed_ring", packed_ring::run),
    ("inflight", inflight::run),
];

/// Ignores SIGPIPE once per process: libFuzzer's `main` is not Rust's, so the runtime
/// does not, and a peer that closed its end must be an EPIPE, not a killed fuzzer.
pub fn ignore_sigpipe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: installs SIG_IGN, no handler code runs.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    });
}

/// Open fds of this process (the leak check of the session targets).
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

#[cfg(test)]
mod tests;
