#!/usr/bin/env bash
# make test-arm: the SparQ op on 64-bit ARM, without an ARM machine. Cross-builds ggml with the op
# and its tests for two targets, armv8.2-a+fp16 (Apple Silicon, recent Snapdragon and Graviton
# cores) and plain armv8-a, with Debian's cross compiler, and runs test-sparq-op (random,
# adversarial and NaN-poison cases) and test-backend-ops -o SPARQ_ATTN (the NEON fast path
# against the reference path) under user-mode QEMU. Emulated time says nothing about speed.
#
#   scripts/test_arm.sh [PYTHON]      (PYTHON runs the upstream preparation; default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}

missing=()
command -v aarch64-linux-gnu-g++ >/dev/null || missing+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64-static >/dev/null || command -v qemu-aarch64 >/dev/null || missing+=(qemu-user-static)
command -v ninja >/dev/null || missing+=(ninja-build)
if ((${#missing[@]})); then
    echo "test-arm needs Debian's ${missing[*]}: as root, apt-get update && apt-get install -y ${missing[*]}" >&2
    exit 1
fi
QEMU=$(command -v qemu-aarch64-static || command -v qemu-aarch64)
SYSROOT=/usr/aarch64-linux-gnu

for arch in armv8.2-a+fp16 armv8-a; do
    dir=build/arm-${arch//[^a-z0-9.]/-}
    echo "== $arch ($dir)"
    cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
        -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ \
        -DCMAKE_FIND_ROOT_PATH=$SYSROOT -DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER \
        -DCMAKE_FIND_ROOT_PATH_MODE_LIBRARY=ONLY -DCMAKE_FIND_ROOT_PATH_MODE_INCLUDE=ONLY \
        -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH="$arch" -DSPARQ_BUILD_TESTS=ON \
        -DSPARQ_STAGE_DIR="$PWD/$dir/lib" -DPython3_EXECUTABLE="$(command -v "$PY")" >/dev/null
    cmake --build "$dir" -j "$JOBS" --target test-sparq-op test-backend-ops
    # the binaries must be ARM ones, built for this target
    aarch64-linux-gnu-readelf -h "$dir/bin/test-sparq-op" | grep -q "Machine:.*AArch64" || { echo "not an aarch64 binary" >&2; exit 1; }
    QEMU_LD_PREFIX=$SYSROOT "$QEMU" -cpu max "$dir/bin/test-sparq-op"
    # test-backend-ops prints "N/N tests passed" and exits non-zero on a failure (pipefail)
    QEMU_LD_PREFIX=$SYSROOT "$QEMU" -cpu max "$dir/bin/test-backend-ops" -b CPU -o SPARQ_ATTN 2>&1 | grep -E "tests passed|backends passed"
done
echo "test-arm: both ARM builds passed"
