#!/usr/bin/env bash
# SparQ on an NVIDIA GPU, in one run of a few minutes, on a machine without network (the nvidia-
# cublas wheel must then be in the sparq-cpp cache already, or the toolkit must have cuBLAS; see
# scripts/build_cuda.sh). Writes everything under $OUT (default results/device):
#   1. the CUDA build (build/cuda, architectures $CUDA_ARCH, default 90 = H100/H200);
#   2. test-backend-ops on CUDA0 against the CPU: the portable SparQ graph (SPARQ_ATTN_OPS) and
#      the ops it uses (TOP_K, GET_ROWS, SOFT_MAX, MUL_MAT at every shape upstream cases);
#   3. tests/test_gpu.py: smollm2-135m decoding with SparQ, its layers on CUDA0, against CPU SparQ;
#   4. sparq-cpp bench, dense against SparQ with every layer on the GPU, at 8k and 32k (gemma3-270m,
#      whose 32k context fits; smollm2-135m at 8k; a Llama-3-8B shape with random weights made on
#      the machine, both ways the portable graph attends).
# Usage: scripts/device_check.sh [python]. Needs what a network provides once: the repository's
# venv (make setup), the two models and the essays in the sparq-cpp cache (~/.cache/sparq-cpp,
# filled by their first use, e.g. make test), and the nvidia-cublas wheel there if the toolkit
# has no cuBLAS; copy them along to a machine without network.
set -uo pipefail
cd "$(dirname "$0")/.."
VPY=${1:-.venv/bin/python}
OUT=${OUT:-results/device}
mkdir -p "$OUT"
status=0
step() { echo; echo "=== $* ==="; }

step "GPU"
nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt" | head -15

step "build"
JOBS=${JOBS:-$(nproc)} scripts/build_cuda.sh "$VPY" 2>&1 | tail -5 | tee "$OUT/build.txt" || { echo "build failed"; exit 1; }
export SPARQ_CPP_LIB_DIR=$PWD/build/cuda/lib
"$(dirname "$VPY")/sparq-cpp" info | tee "$OUT/info.txt"

step "test-backend-ops on CUDA0"
for op in SPARQ_ATTN_OPS TOP_K GET_ROWS SOFT_MAX SUM_ROWS; do
    build/cuda/bin/test-backend-ops -b CUDA0 -o "$op" > "$OUT/test-backend-ops_$op.txt" 2>&1 || status=1
    echo "$op: $(grep -E '[0-9]+/[0-9]+ tests passed' "$OUT/test-backend-ops_$op.txt" | head -1)"
done

step "decode on CUDA0 against CPU SparQ"
"$VPY" -m pytest -q -s tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.txt" | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "bench"
# dense against SparQ with every layer on the GPU: the two models, and a Llama-3-8B shape with
# random weights made here (8 of its 32 layers), 8k and 32k; the portable graph attending over
# gathered rows (the default) and under a sparse mask (upstream's sparse flash attention)
B="$(dirname "$VPY")/sparq-cpp bench -ngl -1 -r 5 --no-plot"
$B -m smollm2-135m -d 8000 -s 1/8,1/16,k=64 --save "$OUT/bench_smollm2-135m" 2>/dev/null | tee "$OUT/bench_smollm2-135m.txt" || status=1
$B -m gemma3-270m -d 8000,32000 -s 1/8,1/16,k=64 --save "$OUT/bench_gemma3-270m" 2>/dev/null | tee "$OUT/bench_gemma3-270m.txt" || status=1
for attend in gather mask; do
    LLAMA_SPARQ_OPS_ATTEND=$attend $B --shape llama3-8b,layers=8 -d 8192,32768 -s 1/8,1/16 \
        --save "$OUT/bench_llama3-8b_$attend" 2>/dev/null | tee "$OUT/bench_llama3-8b_$attend.txt" || status=1
done

step "done: $([ $status -eq 0 ] && echo all passed || echo FAILURES, see $OUT)"
exit $status
