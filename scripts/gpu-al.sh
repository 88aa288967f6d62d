#!/usr/bin/env bash
# Issue 4's GPU figures in one device run (../shared/GPU.md): Alard–Lupton subtraction of
# simulated 1024² and 4096² pairs through `blink subtract --engine gpu` (stage times from the
# debug log), the AL kernels alone (criterion `al`, kernel half-width 18 as the default basis
# makes), cutout batches of 63×63 (criterion `engine`, 8192 stamps a batch), and the whole-frame
# kernels on 1024² and 4096² pairs resident on the device and end to end (criterion `frame_gpu`);
# issue 5's streaming stacking cost on the GPU engine (criterion `stacking`, 64 and 1024 stamps a
# batch); and the WGSL-against-CPU-twin parity tests (`tests/integration/*_parity.rs`) on the card.
# Two steps:
#
#   scripts/gpu-al.sh prepare   # here: loader debs into .gl/, binary and benches packed into .gpu/
#   scripts/gpu-al.sh run       # on the device, carrying .gl and .gpu; a table last
#
# Or the short check of issue 5's streaming cost and of the parity tests under concurrency:
#
#   scripts/gpu-al.sh prepare stacking   # the stacking bench and the integration tests only
#   scripts/gpu-al.sh stacking           # the bench at 64 and 1024 stamps, the parity tests
#                                        # three times with 4 threads (a hang names its tests)
#                                        # Issue 5's target is the line "the stacks' own work
#                                        # ... % of the subtraction alone" (resident squares
#                                        # on the device, `gpu::kernels::ring`): ≤ 10%.
#   scripts/gpu-al.sh parity [RUNS]      # the parity tests alone, RUNS (5) times with 4 threads
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu-common.sh

prepare() {
    loader_prepare
    local benches="al engine frame_gpu stacking" bins="blink bench-al bench-engine bench-frame_gpu bench-stacking tests-integration"
    if [ "${1:-}" = stacking ]; then
        benches=stacking bins="bench-stacking tests-integration"
    else
        cargo build --release
        cp target/release/blink .gpu/blink
    fi
    for b in $benches; do
        # The bench target's own artifact (the last executable can be the blink binary).
        exe=$(cargo bench --bench "$b" --no-run --message-format=json 2>/dev/null \
            | grep "\"kind\":\[\"bench\"\]" | grep "\"name\":\"$b\"" \
            | grep -o '"executable":"[^"]*"' | tail -1 | cut -d'"' -f4)
        cp "$exe" ".gpu/bench-$b"
    done
    # The integration tests, for the parity tests on the card.
    exe=$(cargo test --release --test integration --no-run --message-format=json 2>/dev/null \
        | grep '"name":"integration"' | grep -o '"executable":"[^"]*"' | tail -1 | cut -d'"' -f4)
    cp "$exe" .gpu/tests-integration
    # Stripped and packed: the carry to the device holds 64 MiB at most.
    # (the binaries only: a bundle left by an earlier run is not an ELF file)
    # xz, not gzip: with the tracked tree the gzip bundle passed 64 MiB.
    rm -f .gpu/bundle.tgz
    (cd .gpu && strip $bins && tar cf - $bins | xz -6 -T2 > bundle.tar.xz && rm $bins)
    ls -la .gpu
}

subtract() { # SIZE REPEATS
    local n=$1 dir=/tmp/pair$1
    .gpu/blink simulate --out "$dir" --nights 1 --epochs-per-night 1 --size "${n}x${n}" --no-alerts -q
    local sci tpl
    sci=$(ls "$dir"/frames/*.fits | head -1); tpl=$(ls "$dir"/templates/*.fits | head -1)
    for r in $(seq "$2"); do
        RUST_LOG=warn,blink=debug .gpu/blink subtract --science "$sci" --template "$tpl" \
            --out-diff /tmp/d$n.fits --out-score /tmp/z$n.fits --engine gpu 2>&1 \
            | sed 's/\x1b\[[0-9;]*m//g' | grep -v ' INFO ' > "$out/subtract$n.$r.txt" || true
        tail -1 "$out/subtract$n.$r.txt"
    done
}

unpack() {
    # The device may lack the xz tool; Python's tarfile reads xz on its own.
    python3 -c 'import tarfile; tarfile.open(".gpu/bundle.tar.xz").extractall(".gpu")' || tar xJf .gpu/bundle.tar.xz -C .gpu
    loader_unpack
    out=${OUT:-/tmp/blink-gpu}
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
}

# The parity tests RUNS times with 4 threads: the harness names a test running over 60 s.
parity_runs() {
    for r in $(seq "$1"); do
        local t0=$SECONDS rc=0
        timeout 75 .gpu/tests-integration parity --test-threads 4 > "$out/parity$r.txt" 2>&1 || rc=$?
        echo "parity run $r: rc $rc in $((SECONDS - t0)) s"
    done
}

parity_table() {
    for f in "$out"/parity*.txt; do
        printf '%s: ' "$(basename "$f" .txt)"; grep -h -E '^test result' "$f" || echo 'no result (hung or killed)'
        grep -h -E 'running for over|FAILED|panicked' "$f" | head -5 || true
    done
}

stacking() {
    unpack
    for n in 64 1024; do
        BLINK_BENCH_BATCH=$n timeout 90 .gpu/bench-stacking --bench --warm-up-time 1 --measurement-time 2 2>&1 | tee "$out/stacking$n.txt" | grep -E 'time:|stacking bench' || true
    done
    parity_runs 3
    echo
    echo "=== blink stacking on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi') ==="
    grep -h -E 'stacking bench \[' "$out"/stacking*.txt || true
    parity_table
}

parity() {
    unpack
    parity_runs "${1:-5}"
    echo
    echo "=== blink parity tests, 4 threads, on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi') ==="
    parity_table
}

run() {
    unpack
    subtract 1024 2
    subtract 4096 2
    BLINK_BENCH_AL_HALF=18 timeout 40 .gpu/bench-al --bench --warm-up-time 1 --measurement-time 3 2>&1 | tee "$out/al.txt" | grep -E 'time:|thrpt:|adapter|^AL' || true
    BLINK_BENCH_BATCH=8192 timeout 45 .gpu/bench-engine --bench --warm-up-time 1 --measurement-time 3 2>&1 | tee "$out/engine.txt" | grep -E 'time:|thrpt:|adapter|GPU phases|pairs/s' || true
    BLINK_BENCH_FRAME_SIZES=4096,1024 timeout 100 .gpu/bench-frame_gpu --bench --warm-up-time 1 --measurement-time 1 2>&1 | tee "$out/frame_gpu.txt" | grep -E 'time:|adapter|skipped' || true
    for n in 64 1024; do
        BLINK_BENCH_BATCH=$n timeout 60 .gpu/bench-stacking --bench --warm-up-time 1 --measurement-time 2 2>&1 | tee "$out/stacking$n.txt" | grep -E 'time:|stacking bench' || true
    done
    # Parity on the card (the tests pick the GPU adapter; a run on llvmpipe would say so).
    timeout 150 .gpu/tests-integration parity --test-threads 4 --nocapture 2>&1 | tee "$out/parity.txt" | tail -5 || true
    echo
    echo "=== blink AL on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi') ==="
    for n in 1024 4096; do
        for f in "$out"/subtract$n.*.txt; do
            printf '%s² ' "$n"
            grep -o -E 'prepare_s=[0-9.]+|fit_s=[0-9.]+|convolve_s=[0-9.]+| s=[0-9.]+|score_s=[0-9.]+|planes=[0-9.]+|fit_read_mb=[0-9.]+' "$f" | tr '\n' ' '
            grep -o -E '[0-9.]+ s \([0-9.]+ s reading\); .*' "$f" || echo
        done
    done
    grep -h -E 'time:|thrpt:' -B1 "$out/al.txt" "$out/engine.txt" | grep -v '^--' || true
    grep -h -E 'GPU phases|stage|upload|compute|readback' "$out/engine.txt" | head -12 || true
    grep -h -E 'adapter' "$out/frame_gpu.txt" || true
    grep -h -E 'time:' -B1 "$out/frame_gpu.txt" | grep -v '^--' || true
    grep -h -E 'stacking bench \[' "$out"/stacking*.txt || true
    grep -h -o -E 'adapter [^;]*' "$out/parity.txt" | sort | uniq -c | head -3 || true
    grep -h -E '^test result|FAILED|panicked' "$out/parity.txt" | head -8 || true
}

case "${1:-}" in
    prepare) prepare "${2:-}" ;;
    run) run ;;
    stacking) stacking ;;
    parity) parity "${2:-5}" ;;
    *) echo "usage: $0 prepare [stacking] | run | stacking | parity [RUNS]" >&2; exit 2 ;;
esac
