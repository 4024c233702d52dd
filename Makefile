# sparq-cpp: the two commands are `make demo` and `make test`; each sets itself up on a fresh clone.
#
#   make demo      .venv + the library alone, then the default model (smollm2-135m) answers a long essay, dense and SparQ
#   make test      .venv + build (with the op tests and the tools), then pytest (without the slow set)
#   make test-slow the slow set: the long checks CI runs after make test
#   make lib       (re)build the native library into sparq_cpp/lib (incremental): what Python and the demo need
#   make build     the same, plus the op tests and llama.cpp's tools into sparq_cpp/bin (incremental)
#   make tools     the same as build: llama-bench, llama-cli, llama-server from the fork, with --sparq-* flags
#   make bench-op  the SparQ op benchmark against dense attention (scripts/bench_op.py)
#   make sanitize  AddressSanitizer + UBSan build (build/sanitize), then the op and cache tests on it
#   make test-avx2 the whole test suite again on an AVX2-only build (build/avx2, AVX-512 off)
#   make test-arm  the op's NEON paths: two aarch64 cross-builds, their op tests under qemu-aarch64
#   make clean     remove the build folder and the staged libraries (keeps .venv and caches)

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.sparq-setup
JOBS   ?= $(shell nproc 2>/dev/null || echo 2)

upstream = $(shell sed -n 's/.*$(1) *"\(.*\)".*/\1/p' native/upstream.cmake)
UP_PKG := $(call upstream,SPARQ_UPSTREAM_PACKAGE)
UP_VER := $(call upstream,SPARQ_UPSTREAM_VERSION)
UP_SHA := $(call upstream,SPARQ_UPSTREAM_SHA256)

.PHONY: setup lib build tools demo test test-slow test-avx2 test-arm test-vulkan bench-op sanitize clean

# The virtual environment: re-created when missing or broken, refreshed when the pinned
# requirements change. llama-cpp-python is installed from the same pinned source tarball as our
# fork, without building its own copy of llama.cpp.
$(STAMP): pyproject.toml requirements-dev.txt native/upstream.cmake
	@if [ -e $(VENV) ] && ! $(VPY) -c 'import sys' >/dev/null 2>&1; then echo "stale $(VENV): re-creating"; rm -rf $(VENV); fi
	@[ -x $(VPY) ] || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	tarball=$$($(VPY) native/prepare_upstream.py --fetch-only --package $(UP_PKG) --version $(UP_VER) --sha256 $(UP_SHA)) && \
	  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(VPY) -m pip install --quiet --disable-pip-version-check \
	    --no-build-isolation --no-deps "$$tarball"
	@touch $@

setup: $(STAMP)

PIP_E := CMAKE_BUILD_PARALLEL_LEVEL=$(JOBS) $(VPY) -m pip install --quiet --disable-pip-version-check \
  --no-build-isolation --no-deps -e .

# the library alone; a build folder that has the tests and tools keeps building them (CMake's cache)
lib: $(STAMP)
	@echo "building the native library into sparq_cpp/lib (a clean build takes a few minutes on 2 cores) ..."
	$(PIP_E)

build: $(STAMP)
	@echo "building the native library, the op tests and llama.cpp's tools (a clean build takes about 8 minutes on 2 cores) ..."
	$(PIP_E) -Ccmake.define.SPARQ_BUILD_TESTS=ON -Ccmake.define.SPARQ_BUILD_TOOLS=ON

# llama.cpp's llama-bench, llama-cli and llama-server with --sparq-* into sparq_cpp/bin (part of build)
tools: build

# a long essay answered with dense attention and with SparQ 1/8: both answers, both decode speeds
demo: lib
	$(VENV)/bin/sparq-cpp info
	$(VENV)/bin/sparq-cpp demo -m smollm2-135m

test: build
	$(VPY) -m pytest tests -m "not slow"

# the long checks (marked slow): a q8_0 cache at 1/8, 4096 tokens generated after 4096, the
# portable graph at k >= context on both models; CI runs them after make test
test-slow: build
	$(VPY) -m pytest tests -m slow

bench-op: build
	$(VPY) scripts/bench_op.py
	$(VPY) scripts/bench_op.py --cold --out results/bench_op_cold

# The op tests (C++) and the SparQ cache, batch and fuzz tests (pytest, with the sanitized
# libraries loaded into Python through LD_PRELOAD of the ASan runtime; leak reports off, as
# CPython itself does not free everything at exit). The long 4096+4096-token run is left out.
# About 25 minutes on 2 cores (cold build 9, tests 15; measured on an AMD EPYC): not part of `make test`.
SAN_DIR := build/sanitize
SAN_ENV := ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 \
           LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so)"
sanitize: $(STAMP)
	cmake -S . -B $(SAN_DIR) -G Ninja -DSPARQ_SANITIZE=ON -DSPARQ_BUILD_TESTS=ON \
	  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPython3_EXECUTABLE=$(abspath $(VPY))
	cmake --build $(SAN_DIR) -j $(JOBS)
	ASAN_OPTIONS=detect_leaks=0 $(SAN_DIR)/bin/test-sparq-op
	ASAN_OPTIONS=detect_leaks=0 $(SAN_DIR)/bin/test-backend-ops -b CPU -o SPARQ_ATTN
	$(SAN_ENV) SPARQ_CPP_LIB_DIR=$(SAN_DIR)/lib $(VPY) -m pytest -p no:cacheprovider \
	  tests/test_sparq_fuzz.py tests/test_robustness.py tests/test_sparq.py \
	  -k "fuzz or batched or settings_changed or cache_operations or seq_cp or turning or c_api or one_eighth"

# The same suite on a library built for an AVX2 laptop (no AVX-512, whatever this CPU has), in its
# own folder; the package is pointed at it with SPARQ_CPP_LIB_DIR, the op tests with
# SPARQ_CPP_BIN_DIR. `sparq-cpp info` must then report AVX2 = 1 and no AVX512. Not part of `make test`.
AVX2_DIR   := build/avx2
AVX2_FLAGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
              -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF
AVX2_ENV   := SPARQ_CPP_LIB_DIR=$(abspath $(AVX2_DIR))/lib SPARQ_CPP_BIN_DIR=$(abspath $(AVX2_DIR))/bin
test-avx2: $(STAMP)
	cmake -S . -B $(AVX2_DIR) -G Ninja -DSPARQ_BUILD_TESTS=ON $(AVX2_FLAGS) -DSPARQ_STAGE_DIR=$(abspath $(AVX2_DIR))/lib \
	  -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE=$(abspath $(VPY))
	cmake --build $(AVX2_DIR) -j $(JOBS)
	$(AVX2_ENV) $(VENV)/bin/sparq-cpp info | tee $(AVX2_DIR)/info.txt
	@grep -q "AVX2 = 1" $(AVX2_DIR)/info.txt && ! grep -q "AVX512 = 1" $(AVX2_DIR)/info.txt || \
	  { echo "test-avx2: the library in $(AVX2_DIR)/lib is not an AVX2-only build"; exit 1; }
	$(AVX2_ENV) $(VPY) -m pytest tests

# The op on 64-bit ARM without an ARM machine (scripts/test_arm.sh): armv8.2-a+fp16 and armv8-a
# cross-builds of ggml with the op (Debian's g++-aarch64-linux-gnu), test-sparq-op and
# test-backend-ops -o SPARQ_ATTN under user-mode QEMU (qemu-user-static).
test-arm: $(STAMP)
	scripts/test_arm.sh $(VPY)

# SparQ on a Vulkan device without a GPU (scripts/test_vulkan.sh): a Vulkan build in build/vulkan,
# Mesa's lavapipe as the device; test-backend-ops for the portable graph and the ops it uses, and
# a decode with the layers on Vulkan0 against CPU SparQ. Needs Debian's glslc libvulkan-dev
# spirv-headers mesa-vulkan-drivers (the script says what is missing). Not part of `make test`.
test-vulkan: $(STAMP)
	scripts/test_vulkan.sh $(VPY)

clean:
	rm -rf build sparq_cpp/lib
