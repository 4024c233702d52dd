"""KV cache types by llama.cpp's names (-ctk/-ctv): the ones SparQ reads, and what each needs."""

from __future__ import annotations

from ._lib import llama_cpp

CACHE_TYPES = ("f16", "f32", "q8_0")  # KV cache types SparQ reads (llama.cpp's -ctk/-ctv names)


def cache_type(name: str) -> int:
    """'f16', 'f32' or 'q8_0' -> the GGML_TYPE_* value llama-cpp-python's type_k/type_v take."""
    if name not in CACHE_TYPES:
        raise ValueError(f"cache type must be one of {', '.join(CACHE_TYPES)}, got {name!r}")
    return getattr(llama_cpp, f"GGML_TYPE_{name.upper()}")


# bytes per element of a K or V row (q8_0: 34-byte blocks of 32)
ELEMENT_BYTES = {"f16": 2.0, "f32": 4.0, "q8_0": 34 / 32}


def v_needs_flash_attn(name: str) -> bool:
    """llama.cpp stores a quantized V only with flash attention on (V row-major)."""
    return name not in ("f16", "f32")
