#!/usr/bin/env bash
# Diagnose the intermittent hang of the parity tests with 4 threads on a GPU host: run them up
# to RUNS times; when a run passes 20 s, print each thread's kernel wait channel and stack (a
# futex wait is a user-space lock, an ioctl the driver), then kill it. Bundle: gpu-al.sh prepare
# stacking; run on the device carrying .gl and .gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -c 'import tarfile; tarfile.open(".gpu/bundle.tar.xz").extractall(".gpu")'
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json XDG_RUNTIME_DIR=/tmp
out=${OUT:-/tmp/hang}; mkdir -p "$out"
for r in $(seq "${1:-6}"); do
    .gpu/tests-integration parity --test-threads 4 > "$out/run$r.txt" 2>&1 &
    pid=$!
    for _ in $(seq 40); do sleep 0.5; kill -0 $pid 2>/dev/null || break; done
    if kill -0 $pid 2>/dev/null; then
        echo "run $r: hung; threads:"
        for t in /proc/$pid/task/*; do
            printf '%s %s %s | ' "$(basename $t)" "$(cat $t/comm)" "$(cat $t/wchan 2>/dev/null)"
            head -3 $t/stack 2>/dev/null | awk '{print $2}' | tr '\n' ' '; echo
        done | sort -k2 | tee "$out/hang$r.txt"
        kill -9 $pid; wait $pid 2>/dev/null
        break
    fi
    wait $pid; echo "run $r: rc $?"
done
