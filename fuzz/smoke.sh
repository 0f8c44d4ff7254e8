#!/usr/bin/env bash
# Runs every fuzz target for a while (default 60 s each: the CI smoke; the
# long run in docs/reliability.md passes 600). Skips, saying so, where
# `cargo +nightly` is missing: cargo-fuzz needs nightly's -Zsanitizer.
# Usage: fuzz/smoke.sh [seconds per target] [target...]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(tunnel_frames public_head host_router recv_window config)
fi
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz smoke SKIPPED: no nightly toolchain (rustup toolchain install nightly)"
    exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo +nightly install cargo-fuzz --locked --version 0.13.2
fi
# Safe Rust: what we hunt is panics, hangs and memory growth, which need no
# sanitizer; without one the build is minutes shorter and runs ~3x faster.
cargo +nightly fuzz build -s none
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    seeds=()
    [ -d "fuzz/seeds/$t" ] && seeds=("fuzz/seeds/$t")
    echo "== fuzz $t for ${secs}s"
    # -rss_limit_mb: a target growing past 512 MiB fails; -timeout: one
    # input taking 10 s is a hang.
    log="fuzz/artifacts/$t.log"
    mkdir -p fuzz/artifacts
    status=0
    cargo +nightly fuzz run -s none "$t" "fuzz/corpus/$t" ${seeds[@]+"${seeds[@]}"} -- \
        -max_total_time="$secs" -rss_limit_mb=512 -timeout=10 -print_final_stats=1 >"$log" 2>&1 || status=$?
    grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || true
    if [ "$status" -ne 0 ]; then
        tail -40 "$log" >&2
        echo "fuzz $t FAILED: the input is in fuzz/artifacts/$t/; reproduce with cargo +nightly fuzz run -s none $t <file>" >&2
        exit 1
    fi
done
echo "fuzz smoke passed: ${#targets[@]} targets, ${secs}s each"
