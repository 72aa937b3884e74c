#!/usr/bin/env bash
# Coverage-guided fuzzing of the core (cargo-fuzz, libFuzzer): builds every target in
# fuzz/ once with the nightly toolchain, then runs each for a bounded time from its seed
# corpus. Any crash, failed invariant, leak or hang fails the run, naming the target and
# the input that did it.
#
#   bash scripts/fuzz.sh                 # every target, FUZZ_SECONDS (default 10) each
#   bash scripts/fuzz.sh split_ring ...  # only these targets
#   bash scripts/fuzz.sh seeds           # rewrite fuzz/corpus/*/seed-* from fuzz/src/seeds.rs
#
# First, on stable, `cargo test` in fuzz/ replays every committed corpus file through its
# target and checks the seed files are what fuzz/src/seeds.rs generates.
#
# Environment: FUZZ_SECONDS (per target), FUZZ_ARTIFACTS (where crash inputs go, default target/fuzz-artifacts), FUZZ_ARGS (more
# libFuzzer flags). New inputs the fuzzer finds go to a scratch directory, never into
# the committed corpus; copy one there on purpose to keep it as a regression input.
# cargo-fuzz comes from scripts/setup.sh (~/.cache/pyvhost/cargo-fuzz).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export PATH="$HOME/.cache/pyvhost/cargo-fuzz/bin:$PATH"
SECONDS_EACH=${FUZZ_SECONDS:-10}
ARTIFACTS=${FUZZ_ARTIFACTS:-$ROOT/target/fuzz-artifacts}
log() { printf '== fuzz: %s\n' "$*"; }

if [[ "${1:-}" == seeds ]]; then
    PYVHOST_WRITE_SEEDS=1 cargo test --manifest-path fuzz/Cargo.toml --lib corpus_is_generated
    exit 0
fi
if ! command -v cargo-fuzz >/dev/null; then
    log "cargo-fuzz is missing: run bash scripts/setup.sh" >&2
    exit 1
fi

mapfile -t ALL < <(cargo +nightly fuzz list --fuzz-dir fuzz)
TARGETS=("$@")
((${#TARGETS[@]})) || TARGETS=("${ALL[@]}")

start=$SECONDS
log "replaying the committed corpora (stable)"
CARGO_TARGET_DIR="$ROOT/target" cargo test -q --manifest-path fuzz/Cargo.toml
log "building ${#ALL[@]} targets (nightly, release, ASan)"
cargo +nightly fuzz build --fuzz-dir fuzz
log "built in $((SECONDS - start)) s"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
for t in "${TARGETS[@]}"; do
    mkdir -p "$scratch/$t" "$ARTIFACTS/$t"
    log "$t: ${SECONDS_EACH} s"
    # Runs the binary cargo-fuzz built (no rebuild): the first corpus directory receives
    # new inputs, the committed seeds are read only. -timeout turns a hang into a failure.
    if ! cargo +nightly fuzz run --fuzz-dir fuzz "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$ARTIFACTS/$t/" -print_final_stats=1 ${FUZZ_ARGS:-} \
        >"$scratch/$t.log" 2>&1; then
        failed+=("$t")
        tail -n 60 "$scratch/$t.log"
        log "FAILED: target $t; input(s):"
        ls -1 "$ARTIFACTS/$t"/* 2>/dev/null | sed 's/^/    /' || echo "    (no artifact written)"
        log "reproduce: cargo +nightly fuzz run --fuzz-dir fuzz $t <artifact>"
    else
        grep -E '^stat::number_of_executed_units|^stat::average_exec_per_sec' "$scratch/$t.log" \
            | sed "s/^/    $t /" || true
    fi
done
log "total $((SECONDS - start)) s"
if ((${#failed[@]})); then
    log "crashing targets: ${failed[*]}"
    exit 1
fi
log "no crash in ${TARGETS[*]}"
