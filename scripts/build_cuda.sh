#!/usr/bin/env bash
# The library with the CUDA backend, in build/cuda (libraries in build/cuda/lib, point the package
# at them with SPARQ_CPP_LIB_DIR). SparQ runs there as the portable graph of standard ggml ops.
#   CUDA_ARCH   GPU architectures (default 90: H100/H200; e.g. "80;90")
#   JOBS        parallel compile jobs (default: all cores)
# cuBLAS: the CUDA backend links it. Where the CUDA toolkit has none (the nvcc-only toolkit of
# our build machines), the nvidia-cublas wheel is fetched from PyPI by name, checked against its
# pinned sha256, and unpacked into the sparq-cpp cache (~/.cache/sparq-cpp); without network the
# cache must already hold it. Without the driver's libcuda.so (no GPU here) the build leaves out
# CUDA's virtual memory management (GGML_CUDA_NO_VMM), which only that library provides.
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=${1:-.venv/bin/python}
DIR=build/cuda
CUDA_ARCH=${CUDA_ARCH:-90}
JOBS=${JOBS:-$(nproc)}
CUBLAS_VERSION=13.0.2.14
CUBLAS_WHEEL=nvidia_cublas-$CUBLAS_VERSION-py3-none-manylinux_2_27_x86_64.whl
CUBLAS_SHA256=0cf238ffdbe46c00cb9aa98e7bca745c223a5ca5a53e686ac8b3e5a08fe80d6c

command -v nvcc >/dev/null || { echo "build_cuda: nvcc not found (the CUDA toolkit)" >&2; exit 1; }
CUDA_ROOT=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
extra=()
if ! ls "$CUDA_ROOT"/include/cublas_v2.h "$CUDA_ROOT"/targets/*/include/cublas_v2.h >/dev/null 2>&1; then
    cache=${SPARQ_CPP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sparq-cpp}
    dest=$cache/cublas-$CUBLAS_VERSION
    if [ ! -f "$dest/include/cublas_v2.h" ]; then
        mkdir -p "$cache"
        if [ ! -f "$cache/$CUBLAS_WHEEL" ]; then
            echo "build_cuda: the CUDA toolkit has no cuBLAS; fetching nvidia-cublas==$CUBLAS_VERSION from PyPI"
            "$VPY" -m pip download --quiet --no-deps --dest "$cache" "nvidia-cublas==$CUBLAS_VERSION"
        fi
        echo "$CUBLAS_SHA256  $cache/$CUBLAS_WHEEL" | sha256sum -c --quiet
        tmp=$(mktemp -d)
        "$VPY" -m zipfile -e "$cache/$CUBLAS_WHEEL" "$tmp"
        rm -rf "$dest" && mv "$tmp/nvidia/cu13" "$dest" && rm -rf "$tmp"
    fi
    extra+=(-DSPARQ_CUBLAS_DIR="$dest")
fi
if ! ldconfig -p | grep -q "libcuda.so" && [ ! -e "$CUDA_ROOT/lib64/stubs/libcuda.so" ]; then
    extra+=(-DGGML_CUDA_NO_VMM=ON)
fi

start=$(date +%s)
cmake -S . -B "$DIR" -G Ninja -DSPARQ_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" -DSPARQ_BUILD_TESTS=ON \
      -DSPARQ_STAGE_DIR="$PWD/$DIR/lib" -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$(realpath "$VPY")" "${extra[@]}" >/dev/null
cmake --build "$DIR" -j "$JOBS"
echo "build_cuda: built $DIR (CUDA architectures $CUDA_ARCH) in $(( $(date +%s) - start )) s"
