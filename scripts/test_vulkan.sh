#!/usr/bin/env bash
# make test-vulkan: SparQ on a Vulkan device, on this machine without a GPU. Builds the library
# with the Vulkan backend in build/vulkan (Debian 12's packages: glslc libvulkan-dev spirv-headers
# mesa-vulkan-drivers), then on Mesa's lavapipe (a Vulkan driver that runs on the CPU; ggml skips
# CPU-type devices unless GGML_VK_VISIBLE_DEVICES names them):
#   1. test-backend-ops on Vulkan0 against the CPU: the portable SparQ graph (SPARQ_ATTN_OPS) and
#      the top-k and row gathers it uses, at the shapes of both test models;
#   2. tests/test_gpu.py: smollm2-135m decoding with SparQ, its layers on Vulkan0, against
#      CPU SparQ.
# Each test-backend-ops case runs in its own process: lavapipe 22.3 (Debian 12) has crashed in a
# long run of these graphs in one process (a segfault inside libvulkan_lvp.so), never in a short one.
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=${1:-.venv/bin/python}
DIR=build/vulkan
JOBS=${JOBS:-2}

missing=()
command -v glslc >/dev/null 2>&1 || missing+=(glslc)
[ -f /usr/include/vulkan/vulkan.h ] || missing+=(libvulkan-dev)
[ -d /usr/include/spirv ] || missing+=(spirv-headers)
ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1 || missing+=(mesa-vulkan-drivers)
if [ ${#missing[@]} -gt 0 ]; then
    echo "test-vulkan: missing Debian packages: ${missing[*]}" >&2
    echo "install them (as root): apt-get update && apt-get install -y glslc libvulkan-dev spirv-headers mesa-vulkan-drivers" >&2
    exit 1
fi

start=$(date +%s)
cmake -S . -B "$DIR" -G Ninja -DSPARQ_VULKAN=ON -DSPARQ_BUILD_TESTS=ON -DSPARQ_STAGE_DIR="$PWD/$DIR/lib" \
      -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$(realpath "$VPY")" >/dev/null
cmake --build "$DIR" -j "$JOBS"
echo "test-vulkan: build $(( $(date +%s) - start )) s"

export GGML_VK_VISIBLE_DEVICES=${GGML_VK_VISIBLE_DEVICES:-0}
export SPARQ_CPP_LIB_DIR="$PWD/$DIR/lib"
"$(dirname "$VPY")/sparq-cpp" info | tee "$DIR/info.txt"
grep -q "Vulkan0" "$DIR/info.txt" || { echo "test-vulkan: the Vulkan build sees no Vulkan device" >&2; exit 1; }

# 1. test-backend-ops, one case per process; each must report "1/1 tests passed"
cases=()
for a in 0 8; do  # attending under a sparse mask, over gathered rows (GGML_SPARQ_GATHER)
    for t in f16 q8_0 f32; do
        for kv in 2048 8192; do
            for nb in 1 4; do
                f=$(( 1 | a | (nb == 1 ? 4 : 0) ))  # REALLOC, one query: ALL_SEE_K
                cases+=("SPARQ_ATTN_OPS|^hs=64,nh=3,G=3,kv=$kv,nb=$nb,.*flags=$f,type_KV=$t,sinks=0,")
                cases+=("SPARQ_ATTN_OPS|^hs=256,nh=1,G=4,kv=$kv,nb=$nb,.*flags=$f,type_KV=$t,sinks=0,")
            done
        done
    done
    cases+=("SPARQ_ATTN_OPS|kv=2048,nb=2,.*flags=$a,type_KV=f16,sinks=0," "SPARQ_ATTN_OPS|flags=$(( 3 | a ))," "SPARQ_ATTN_OPS|kv=1024,.*flags=$(( 1 | a )),")
done
cases+=("SPARQ_ATTN_OPS|nb=2,.*flags=0,type_KV=f16,sinks=1," "SPARQ_ATTN_OPS|nb=2,.*flags=1,type_KV=f16,sinks=1,")  # learned attention sinks
cases+=("SPARQ_ATTN_OPS|nb=1,.*flags=12,type_KV=f16,sinks=1," "SPARQ_ATTN_OPS|nb=1,.*flags=13,type_KV=f16,sinks=1,")
for kv in 2048 8192; do
    k=$((kv / 16))
    cases+=("TOP_K|^type=f32,ne=\\[$kv,4,3,1\\],k=$k," "TOP_K|^type=f32,ne=\\[$kv,4,1,1\\],k=$k,")
    for t in f16 q8_0; do
        cases+=("GET_ROWS|^type=$t,n=64,m=$kv,r=$((k * 4)),be1=3," "GET_ROWS|^type=$t,n=256,m=$kv,r=$((k * 4)),be1=1,")
    done
    cases+=("GET_ROWS|^type=f16,n=$kv,m=64,r=32,be1=3," "GET_ROWS|^type=f16,n=$kv,m=256,r=128,be1=1,")
done
cases+=("TOP_K|^type=f32,ne=\\[64,4,3,1\\],k=8," "TOP_K|^type=f32,ne=\\[256,4,1,1\\],k=32,")

start=$(date +%s)
failed=0
for c in "${cases[@]}"; do
    op=${c%%|*}
    params=${c#*|}
    out=$("$DIR/bin/test-backend-ops" -b Vulkan0 -o "$op" -p "$params" 2>&1 || true)
    line=$(grep -E "^  $op\(" <<<"$out" | head -1 | sed 's/\x1b\[[0-9;]*m//g' || true)
    if grep -q "1/1 tests passed" <<<"$out"; then
        echo "ok    ${line:-$op $params}"
    else
        echo "FAIL  $op $params"
        grep -E "ERR|FAIL|not supported|tests passed|Segmentation|Abort" <<<"$out" | sed 's/\x1b\[[0-9;]*m//g' | head -5
        failed=$((failed + 1))
    fi
done
echo "test-vulkan: test-backend-ops on Vulkan0: $(( ${#cases[@]} - failed ))/${#cases[@]} cases passed, $(( $(date +%s) - start )) s"
[ "$failed" -eq 0 ]

# 2. decode on the Vulkan device against CPU SparQ
"$VPY" -m pytest -q -s tests/test_gpu.py
