# pyvhost developer and CI entry points.  `make test` is THE test command
# (.ci/run calls it): setup, lint, Rust tests, type checks, fuzz, the installed wheel's
# smoke tests, pytest.  `make demo` is the README's first command: .venv, build, demo.
#
# Every Python tool comes from .venv (made by scripts/venv.sh, which `make setup` and
# `make demo` run), never from $PATH.

.NOTPARALLEL:
.DEFAULT_GOAL := test
SHELL := /bin/bash

VENV        := $(CURDIR)/.venv
PY          := $(VENV)/bin/python
MATURIN     := $(VENV)/bin/maturin
RUFF        := $(VENV)/bin/ruff
MYPY        := $(VENV)/bin/mypy
MKDOCS      := $(VENV)/bin/mkdocs
PYTEST      := $(VENV)/bin/pytest
BENCH_DIR   := $(CURDIR)/target/bench
ALLOWLIST   := python/vhost/stubtest-allowlist.txt
PYTEST_ARGS ?= --timeout=600 --durations=10
BENCH_N     ?= 20000
BENCH_BATCHES ?= 5
BENCH_RUNS  ?= 5

# One interpreter for PyO3 everywhere, so maturin and cargo share build artifacts.
export PYO3_PYTHON := $(PY)

.PHONY: setup tools build lint typecheck rust-test pytest fuzz docs test demo bench wheel clean

setup:
	bash scripts/setup.sh

# Peers and .venv tools only, no extension build.
tools:
	bash scripts/setup.sh --no-build

build:
	VIRTUAL_ENV=$(VENV) $(MATURIN) develop --release

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps
	$(RUFF) check python tests benches
	$(PY) scripts/gen_codes.py --check

# benches/ too: the tests import benches/pyclient.py.
typecheck:
	$(MYPY) --strict python tests benches
	if [ -f $(ALLOWLIST) ]; then \
		MYPYPATH=python $(PY) -m mypy.stubtest vhost --allowlist $(ALLOWLIST); \
	else \
		MYPYPATH=python $(PY) -m mypy.stubtest vhost; \
	fi

# The glue crate too: its test binary links libpython through PYO3_PYTHON (exported
# above, no extension-module feature outside maturin), so it builds, links and runs here.
rust-test:
	cargo test --workspace

pytest:
	$(PYTEST) $(PYTEST_ARGS)

# Every cargo-fuzz target for FUZZ_SECONDS (default 10) each, from the committed seeds;
# fails on any crash, naming the target and the input (scripts/fuzz.sh, fuzz/README.md).
fuzz: tools
	bash scripts/fuzz.sh

# The documentation site (mkdocs.yml) into target/site, every warning an error: a broken
# link or cross-reference, a page missing from the nav, a docstring mkdocstrings cannot
# parse (not --quiet: it hides warnings from the count --strict checks). The API
# reference is read statically from the sources and the stubs, so this needs no build
# of the extension. tests/test_docs.py runs every example of the pages.
docs:
	NO_MKDOCS_2_WARNING=1 $(MKDOCS) build --strict

test: setup lint rust-test typecheck docs fuzz smoke pytest

# The README's first command, on a machine with only Python and Rust: .venv with maturin
# (scripts/venv.sh first checks Python, Rust and a C compiler: one line if one is missing or
# too old), the extension built into it, the demo. No apt, no QEMU, no test guest, no peers:
# those are `make setup`'s, which `make test` runs. tests/test_dist.py checks `make -n demo`.
demo:
	VENV=$(VENV) bash scripts/venv.sh
	VIRTUAL_ENV=$(VENV) $(MATURIN) develop --release
	$(PY) -m vhost demo

# Round-trip latency, pinned to one CPU and free: our Frontend against our back-end and
# qemu-storage-daemon, the pure-Python client, and the floor.c socketpair floor, all in
# one run; then 4 KiB blk IOPS against qemu-storage-daemon, and descriptor-chain throughput
# (Python API and the Rust example, each beside its memcpy floor); then, in the test guest,
# vhost-net TX and vDPA blk reads beside tap write() and vhost-user; then dirty logging's
# cost (off/on, beside qemu-storage-daemon) and QEMU live-migration times on serve blk
# against qemu-storage-daemon. See benches/README.md.
bench: setup
	$(PY) benches/bench_roundtrip.py --n $(BENCH_N) --batches $(BENCH_BATCHES)
	$(PY) benches/bench_blk.py --runs $(BENCH_RUNS)
	$(PY) benches/bench_vring.py --runs $(BENCH_RUNS)
	$(PY) benches/bench_kern.py
	$(PY) benches/bench_dirty_log.py --runs 3
	$(PY) benches/bench_migration.py --runs 3

# What is published, into dist/: the manylinux2014 abi3 wheel (linked by zig, its tag
# checked by auditwheel) and the sdist. `make wheel` and `make sdist` are the same step.
.PHONY: dist sdist smoke
dist:
	bash scripts/wheel.sh
wheel sdist: dist

# dist/'s wheel installed into a fresh virtual environment outside the checkout, and
# tests/smoke_installed.py run against it from there (scripts/smoke.sh).
smoke: dist
	bash scripts/smoke.sh

clean:
	rm -rf $(BENCH_DIR) dist
