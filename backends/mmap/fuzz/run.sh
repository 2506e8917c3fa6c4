#!/usr/bin/env bash
# Fuzz conveyor-mmap's on-disk decoders (fuzz_targets/decode.rs).
#
#   backends/mmap/fuzz/run.sh build        # CI: build the target on stable (no fuzzing)
#   backends/mmap/fuzz/run.sh smoke [N]    # stable: coverage-guided libFuzzer for N s (60)
#   backends/mmap/fuzz/run.sh cargo-fuzz [N]  # nightly + cargo-fuzz (ASan), N s (300)
#
# `build` proves the target and libfuzzer-sys (which compiles libFuzzer's
# C++ with the system C++ compiler) still build: a plain stable
# `cargo build`, uninstrumented; the binary runs but is not coverage-guided.
#
# `smoke` is real coverage-guided fuzzing on stable Rust: the sanitizer
# coverage passes are stable codegen flags; only `-Zsanitizer=address`
# (which cargo-fuzz adds) needs nightly, and the decoders are safe Rust,
# so panics, overflows (overflow checks are on) and out-of-range slicing
# are caught without it. `--target` keeps the flags off build scripts.
#
# `cargo-fuzz` is the usual route where a nightly toolchain and cargo-fuzz
# are installed (`cargo install cargo-fuzz`).
#
# Crashes are written to backends/mmap/fuzz/artifacts/; reproduce one with
# the same binary and the file as its only argument.
set -euo pipefail
cd "$(dirname "$0")"
mode="${1:-build}"
secs="${2:-}"
target="$(rustc -vV | sed -n 's/^host: //p')"

case "$mode" in
  build)
    cargo build --manifest-path Cargo.toml --bin decode
    ;;
  smoke)
    export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
      -Cllvm-args=-sanitizer-coverage-level=4 \
      -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
      -Cllvm-args=-sanitizer-coverage-pc-table \
      -Cllvm-args=-sanitizer-coverage-trace-compares \
      -Cdebug-assertions -Coverflow-checks"
    cargo build --release --target "$target" --manifest-path Cargo.toml --bin decode
    mkdir -p corpus/decode artifacts/decode
    dir="${CARGO_TARGET_DIR:-target}"
    "$dir/$target/release/decode" -max_total_time="${secs:-60}" -max_len=4096 \
      -artifact_prefix=artifacts/decode/ corpus/decode
    ;;
  cargo-fuzz)
    cd .. && cargo +nightly fuzz run decode -- -max_total_time="${secs:-300}" -max_len=4096
    ;;
  *)
    echo "usage: $0 [build | smoke [seconds] | cargo-fuzz [seconds]]" >&2
    exit 2
    ;;
esac
