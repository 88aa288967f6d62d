#!/usr/bin/env bash
# blink's benchmarks on a lent GPU, as ../shared/GPU.md says: one script, run once, a small
# table last. Two steps:
#
#   scripts/gpu-bench.sh prepare   # here: Vulkan loader debs into .gl/, release binary and the
#                                  # criterion bench executables into .gpu/ (both git-ignored)
#   scripts/gpu-bench.sh run       # on the device (carry .gl and .gpu): unpack the loader, run
#                                  # the criterion benches (engine, frames 2048², decode),
#                                  # simulate the default night and `blink bench` it
#
# Every figure names the adapter it ran on; a run on llvmpipe says so and is not a GPU figure.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu-common.sh

prepare() {
    loader_prepare
    cargo build --release
    cp target/release/blink .gpu/blink
    # The bench executables: the last "executable" of each bench target.
    for b in engine frames decode; do
        exe=$(cargo bench --bench "$b" --no-run --message-format=json 2>/dev/null \
            | grep -o '"executable":"[^"]*"' | tail -1 | cut -d'"' -f4)
        cp "$exe" ".gpu/bench-$b"
    done
    ls -la .gpu
}

run() {
    loader_unpack
    export RUST_LOG=warn,blink=info
    out=${OUT:-/tmp/blink-gpu}
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
    # Criterion benches (--bench makes the executable benchmark; results under ./target/criterion).
    .gpu/bench-engine --bench 2>&1 | tee "$out/engine.txt"
    BLINK_BENCH_FRAME=2048 .gpu/bench-frames --bench 2>&1 | tee "$out/frames.txt"
    .gpu/bench-decode --bench 2>&1 | tee "$out/decode.txt"
    # The default night, detected and replayed.
    /usr/bin/time -f 'simulate: %e s' .gpu/blink simulate --out /tmp/night -q 2>&1 | tee "$out/simulate.txt"
    /usr/bin/time -f 'bench: %e s' .gpu/blink bench /tmp/night --json "$out/bench.json" --plots "$out/plots" -q \
        > "$out/bench.txt" 2> "$out/bench.err" || { tail -20 "$out/bench.err"; exit 1; }
    grep -h 'adapter' "$out"/engine.txt "$out"/frames.txt | sort -u
    echo
    echo "=== blink on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi') ==="
    printf '%-58s %s\n' "criterion benchmark" "time [low mean high]"
    cat "$out/engine.txt" "$out/frames.txt" "$out/decode.txt" \
        | awk '/time:/ { t=$0; sub(/.*time: */, "", t); n=$0; sub(/ *time:.*/, "", n); if (n ~ /[^ ]/) name=n; printf "%-58s %s\n", name, t }
               !/time:/ && NF && $1 !~ /^(Benchmarking|Found|thrpt:|GPU|change:|Performance|No|[0-9])/ { name=$0 }'
    grep -h -E 'simulate:|bench:' "$out/simulate.txt" "$out/bench.err" || true
    sed -n '1,20p' "$out/bench.txt"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
