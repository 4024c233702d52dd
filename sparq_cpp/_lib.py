"""Finds our libllama, points llama-cpp-python at it, and binds our own C API with cffi.

llama-cpp-python 0.3.36 loads ``$LLAMA_CPP_LIB_PATH/libllama.so`` when ``llama_cpp`` is first
imported, so the variable must be set before that import. If ``llama_cpp`` was already imported
with another library, the two cannot be swapped in one process: we raise a clear error.
"""

from __future__ import annotations

import enum
import os
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _lib_name() -> str:
    if sys.platform == "darwin":
        return "libllama.dylib"
    if sys.platform == "win32":
        return "llama.dll"
    return "libllama.so"


def lib_dir() -> Path:
    """The folder holding our libllama and ggml libraries."""
    env = os.environ.get("SPARQ_CPP_LIB_DIR")
    d = Path(env).resolve() if env else PACKAGE_DIR / "lib"
    if not (d / _lib_name()).exists():
        raise ImportError(
            f"sparq_cpp: {d / _lib_name()} is missing. Build the native library first "
            "(`make build` in a checkout, or `pip install .`).")
    return d


LIB_DIR = lib_dir()
LIB_PATH = LIB_DIR / _lib_name()


def _loaded_path(llama_cpp_module) -> str:
    return str(getattr(llama_cpp_module.llama_cpp._lib, "_name", ""))


def _import_llama_cpp():
    already = sys.modules.get("llama_cpp.llama_cpp")
    if already is None:
        os.environ["LLAMA_CPP_LIB_PATH"] = str(LIB_DIR)
    import llama_cpp  # noqa: E402  (must come after the variable is set)

    loaded = _loaded_path(llama_cpp)
    if not loaded or Path(loaded).resolve() != LIB_PATH.resolve():
        raise ImportError(
            f"sparq_cpp: llama_cpp was already imported with another library ({loaded or 'unknown'}). "
            f"Import sparq_cpp before llama_cpp (or start a new Python process), so that llama_cpp "
            f"loads sparq-cpp's library {LIB_PATH}.")
    return llama_cpp


llama_cpp = _import_llama_cpp()

_CDEF = """
const char * llama_sparq_version(void);

struct llama_sparq_params {
    int32_t k;
    float   compression;
    int32_t r;
    int32_t l;
    int32_t mean_realloc;
    int32_t min_ctx;
    int32_t layer_start;
    int32_t layer_end;
    bool    no_tau;
    int32_t path;
    int32_t mirror;
};

struct llama_sparq_stats {
    int64_t n_tokens_sparq;
    int64_t n_tokens_dense;
    int32_t n_layers_sparq;
    int32_t n_layers;
    double  bytes_attn_sparq;
    double  bytes_attn_dense;
    int64_t extra_bytes;
    int32_t n_layers_ops;
};

struct llama_context;

struct llama_sparq_layer_plan {
    int32_t il;
    int32_t path;
    int32_t r;
    int32_t k;
    int32_t l;
    int32_t type_kt;
    double  bytes;
    double  bytes_dense;
};

struct llama_sparq_params llama_sparq_default_params(void);
int32_t llama_sparq_params_check(const struct llama_sparq_params * params);
int32_t llama_sparq_plan_layer(const struct llama_sparq_params * params, int32_t n_head, int32_t n_head_kv, int32_t d,
                               int32_t dv, int type_k, int type_v, bool fused, int32_t n_pos,
                               struct llama_sparq_layer_plan * out);
int32_t llama_sparq_set(struct llama_context * ctx, const struct llama_sparq_params * params);
int32_t llama_sparq_prepare_cache(struct llama_context * ctx);
int32_t llama_sparq_get(const struct llama_context * ctx, struct llama_sparq_params * params);
int32_t llama_sparq_plan(const struct llama_context * ctx, const struct llama_sparq_params * params, int32_t n_pos,
                         struct llama_sparq_layer_plan * out, int32_t n_max);
int32_t llama_sparq_stats_get(const struct llama_context * ctx, struct llama_sparq_stats * stats);
void    llama_sparq_stats_reset(struct llama_context * ctx);
const char * llama_sparq_strerror(int32_t status);
const char * llama_sparq_dense_reason(void);
const char * llama_sparq_layer_device(const struct llama_context * ctx, int32_t il);
int32_t llama_sparq_graph_size(const struct llama_context * ctx, int32_t * n_compute);

size_t ggml_backend_dev_count(void);
void * ggml_backend_dev_get(size_t index);
const char * ggml_backend_dev_name(void * device);
const char * ggml_backend_dev_description(void * device);
int ggml_backend_dev_type(void * device);
void * ggml_backend_rpc_add_server(const char * endpoint);
void ggml_backend_register(void * reg);
int64_t llama_sparq_check(const struct llama_context * ctx, float * max_rel_err_v);
"""


class SparqStatus(enum.IntEnum):
    """``enum llama_sparq_status`` of native/src/include/llama-sparq.h (tests/test_c_api.py checks
    the values against the header)."""

    OK = 0
    DENSE = 1  # accepted, but no layer of this model or cache can use SparQ: decoding stays dense
    ROTATED = 2  # llama_sparq_prepare_cache: the cache already holds Hadamard-rotated keys
    ERR_NULL = -1
    ERR_K = -2
    ERR_COMPRESSION = -3
    ERR_BOTH = -4
    ERR_R = -5
    ERR_L = -6
    ERR_REALLOC = -7
    ERR_MIN_CTX = -8
    ERR_LAYERS = -9
    ERR_V_TRANS = -10
    ERR_ALLOC = -11
    ERR_PATH = -12
    ERR_MIRROR = -13
    ERR_SHAPE = -14  # llama_sparq_plan_layer: a head count, head size, cache type or n_pos out of range


def _bind():
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    # dlopen of the same path returns the handle llama_cpp already holds: one library, not two.
    return ffi, ffi.dlopen(str(LIB_PATH))


ffi, lib = _bind()


def backend_devices() -> list:
    """(name, description) of every ggml device the loaded library has, e.g. ("CPU", ...),
    ("Vulkan0", "llvmpipe ...")."""
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        out.append((ffi.string(lib.ggml_backend_dev_name(dev)).decode(),
                    ffi.string(lib.ggml_backend_dev_description(dev)).decode()))
    return out


def gpu_devices() -> list:
    """(name, description) of the GPU devices (dedicated or integrated) of the loaded library: none
    on a CPU-only build, whatever llama_supports_gpu_offload says (it is true whenever the RPC
    backend is built)."""
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        if lib.ggml_backend_dev_type(dev) in (1, 2):  # GGML_BACKEND_DEVICE_TYPE_GPU, _IGPU
            out.append((ffi.string(lib.ggml_backend_dev_name(dev)).decode(),
                        ffi.string(lib.ggml_backend_dev_description(dev)).decode()))
    return out


def sparq_version() -> str:
    """Version string answered by our library (proves the fork is the one loaded)."""
    return ffi.string(lib.llama_sparq_version()).decode()


def system_info() -> str:
    return llama_cpp.llama_print_system_info().decode()


def gpu_offload_supported() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())
