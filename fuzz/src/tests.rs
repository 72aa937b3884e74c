//! Stable-toolchain checks of the fuzz crate: the committed corpora are the generated
//! seeds (plus anything added on purpose, such as a fixed crash), every corpus file
//! replays through its target without a failed invariant, and the seeds get deep.

use std::path::PathBuf;
use std::sync::Mutex;

use crate::seeds::seeds;
use crate::TARGETS;

/// The targets count this process's fds: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

/// `PYVHOST_WRITE_SEEDS=1` rewrites the seed files (`scripts/fuzz.sh seeds`).
#[test]
fn corpus_is_generated() {
    let _serial = serial();
    let write = std::env::var_os("PYVHOST_WRITE_SEEDS").is_some();
    for (target, inputs) in seeds() {
        let dir = corpus_dir(target);
        for (i, input) in inputs.iter().enumerate() {
            let path = dir.join(format!("seed-{i}"));
            if write {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, input).unwrap();
            }
            let on_disk = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (run scripts/fuzz.sh seeds)", path.display()));
            assert_eq!(
                &on_disk,
                input,
                "{} is stale: run scripts/fuzz.sh seeds",
                path.display()
            );
        }
    }
}

#[test]
fn every_corpus_file_replays() {
    let _serial = serial();
    for &(target, run) in TARGETS {
        let dir = corpus_dir(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            run(&std::fs::read(&path).unwrap());
            n += 1;
        }
        assert!(n > 0, "{target}: empty corpus");
    }
}

/// The reply seeds carry the front-end through the whole sequence (no call fails), so
/// the fuzzer starts from replies that are accepted.
#[test]
fn reply_seeds_are_accepted() {
    let _serial = serial();
    let (_, inputs) = seeds()
        .into_iter()
        .find(|(t, _)| *t == "frontend_replies")
        .unwrap();
    for input in inputs {
        let ok = crate::frontend_replies::run_counting(&input);
        assert_eq!(
            ok,
            crate::frontend_replies::CALLS.len(),
            "calls that succeeded"
        );
    }
}

/// The daemon seeds are whole sessions the real daemon serves without refusing anything.
#[test]
fn daemon_seeds_are_served() {
    let _serial = serial();
    let (_, inputs) = seeds()
        .into_iter()
        .find(|(t, _)| *t == "daemon_session")
        .unwrap();
    for input in inputs {
        assert_eq!(crate::daemon_session::run_session(&input), None);
    }
}

/// Replays one input on stable, without libFuzzer (give an absolute path: the test runs
/// in `fuzz/`):
/// `PYVHOST_FUZZ_REPLAY=<target>:<file> cargo test --manifest-path fuzz/Cargo.toml replay -- --ignored --nocapture`.
#[test]
#[ignore = "needs PYVHOST_FUZZ_REPLAY=<target>:<file>"]
fn replay() {
    let _serial = serial();
    let spec = std::env::var("PYVHOST_FUZZ_REPLAY").expect("PYVHOST_FUZZ_REPLAY=<target>:<file>");
    let (target, file) = spec.split_once(':').expect("<target>:<file>");
    let run = TARGETS
        .iter()
        .find(|(t, _)| *t == target)
        .unwrap_or_else(|| panic!("no target {target}"))
        .1;
    run(&std::fs::read(file).unwrap());
}
