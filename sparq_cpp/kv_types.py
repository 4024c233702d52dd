"""KV cache types by llama.cpp's names (-ctk/-ctv): the ones SparQ reads, and what each needs."""

from __future__ import annotations

from ._lib import llama_cpp

# llama.cpp's KV cache types (-ctk/-ctv), in its order; SparQ reads the first three, the others
# decode densely (one warning)
CACHE_TYPES = ("f16", "f32", "q8_0", "bf16", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
SPARQ_CACHE_TYPES = ("f16", "f32", "q8_0")


def cache_type(name: str) -> int:
    """A cache type by llama.cpp's name ('f16', 'q8_0', ...) -> the GGML_TYPE_* value
    llama-cpp-python's type_k/type_v take."""
    if name not in CACHE_TYPES:
        raise ValueError(f"cache type must be one of {', '.join(CACHE_TYPES)}, got {name!r}")
    return getattr(llama_cpp, f"GGML_TYPE_{name.upper()}")


def v_needs_flash_attn(name: str) -> bool:
    """llama.cpp stores a quantized V only with flash attention on (V row-major)."""
    return name not in ("f16", "f32")
