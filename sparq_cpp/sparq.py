"""SparQ settings: validation in Python, conversion to the C API's ``llama_sparq_params``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

from ._lib import SPARQ_DENSE, SPARQ_OK, ffi, lib

# keyword arguments of ``Llama`` and ``Llama.set_sparq`` (without the ``sparq_`` prefix there)
SPARQ_ARGS = ("k", "compression", "r", "l", "realloc", "min_ctx", "layers", "no_tau")


_INT32_MAX = 2**31 - 1


def parse_fraction(text: str) -> float:
    """'1/8' or '0.125' -> float; ValueError otherwise."""
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"not a fraction: {text!r}") from None


def _is_int(x) -> bool:
    """An int (not a bool) that fits the C API's int32_t."""
    return isinstance(x, int) and not isinstance(x, bool) and -_INT32_MAX - 1 <= x <= _INT32_MAX


@dataclass(frozen=True)
class SparqParams:
    """SparQ Attention settings (arXiv 2312.04985; see the README).

    Give either ``k`` (positions read exactly per query) or ``compression`` (target fraction of
    dense attention's K/V reads, which picks r and k from the head size and the context length).
    ``None`` means the default: r from the head size (k given: head size/8; compression c: c*head
    size), l = k/4, reallocation per model family (on for multi-head, off for grouped-query
    models, as the paper found), min_ctx 512 (measured: SparQ 1/8 is already faster than dense there), all layers.
    """

    k: Optional[int] = None
    compression: Optional[float] = None
    r: Optional[int] = None
    l: Optional[int] = None
    realloc: Optional[bool] = None
    min_ctx: Optional[int] = None
    layers: Optional[Tuple[int, Optional[int]]] = None
    no_tau: bool = False

    def __post_init__(self):
        p = "sparq_"
        if self.k is not None and (not _is_int(self.k) or self.k < 1):
            raise ValueError(f"{p}k must be an integer in 1..2**31-1, got {self.k!r}")
        if self.compression is not None:
            c = self.compression
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or not 0 < c <= 1:
                raise ValueError(f"{p}compression must be a number in (0, 1], got {c!r}")
        if self.k is not None and self.compression is not None:
            raise ValueError(f"give {p}k or {p}compression, not both")
        if self.k is None and self.compression is None:
            raise ValueError(f"SparQ needs {p}k or {p}compression")
        if self.r is not None and (not _is_int(self.r) or self.r < 1):
            raise ValueError(f"{p}r must be an integer >= 1 (at most the head size), got {self.r!r}")
        if self.l is not None:
            if not _is_int(self.l) or self.l < 0:
                raise ValueError(f"{p}l must be an integer >= 0, got {self.l!r}")
            if self.k is not None and self.l > self.k:
                raise ValueError(f"{p}l must be <= {p}k ({self.k}), got {self.l}")
        if self.realloc is not None and not isinstance(self.realloc, bool):
            raise ValueError(f"{p}realloc must be True, False or None, got {self.realloc!r}")
        if self.min_ctx is not None and (not _is_int(self.min_ctx) or self.min_ctx < 0):
            raise ValueError(f"{p}min_ctx must be an integer in 0..2**31-1, got {self.min_ctx!r}")
        if self.layers is not None:
            lay = self.layers
            if isinstance(lay, range):
                lohi = (lay.start, lay.stop) if lay.step == 1 else None
            elif isinstance(lay, (tuple, list)) and len(lay) == 2:
                lohi = tuple(lay)
            else:
                lohi = None
            if (lohi is None or not _is_int(lohi[0]) or lohi[0] < 0
                    or not (lohi[1] is None or (_is_int(lohi[1]) and lohi[1] > lohi[0]))):
                raise ValueError(f"{p}layers must be (start, end) with 0 <= start < end (end None: to the last "
                                 f"layer), got {lay!r}")
            object.__setattr__(self, "layers", lohi)
        if not isinstance(self.no_tau, bool):
            raise ValueError(f"{p}no_tau must be a bool, got {self.no_tau!r}")

    @classmethod
    def from_kwargs(cls, prefix: str = "", **kwargs) -> Optional["SparqParams"]:
        """Settings from ``sparq_*`` (prefix ``"sparq_"``) or bare keyword arguments; None if no
        k or compression is given and nothing else either (dense)."""
        known = {prefix + a for a in SPARQ_ARGS}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown SparQ argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        vals = {a: kwargs.get(prefix + a) for a in SPARQ_ARGS}
        if vals["no_tau"] is None:
            vals["no_tau"] = False
        if vals["k"] is None and vals["compression"] is None:
            given = [prefix + a for a in SPARQ_ARGS if a != "no_tau" and vals[a] is not None]
            if vals["no_tau"]:
                given.append(prefix + "no_tau")
            if given:
                raise ValueError(f"{', '.join(given)} need(s) {prefix}k or {prefix}compression")
            return None
        return cls(**vals)

    def as_kwargs(self, prefix: str = "sparq_") -> dict:
        return {prefix + a: v for a, v in asdict(self).items()}

    def to_c(self):
        p = ffi.new("struct llama_sparq_params *")
        p[0] = lib.llama_sparq_default_params()
        p.k = self.k or 0
        p.compression = float(self.compression) if self.compression is not None else 0.0
        p.r = self.r or 0
        p.l = -1 if self.l is None else self.l
        p.realloc = -1 if self.realloc is None else int(self.realloc)
        p.min_ctx = -1 if self.min_ctx is None else self.min_ctx
        if self.layers is not None:
            p.layer_start = self.layers[0]
            p.layer_end = -1 if self.layers[1] is None else self.layers[1]
        p.no_tau = self.no_tau
        return p


# C status -> the Python argument it is about
_STATUS_ARG = {-2: "sparq_k", -3: "sparq_compression", -4: "sparq_k", -5: "sparq_r", -6: "sparq_l",
               -7: "sparq_realloc", -8: "sparq_min_ctx", -9: "sparq_layers"}


def apply(ctx_ptr, params: Optional[SparqParams]) -> int:
    """Set (or, with None, clear) SparQ on a llama_context pointer; ValueError on refusal."""
    ctx = ffi.cast("struct llama_context *", ctx_ptr)
    rc = lib.llama_sparq_set(ctx, ffi.NULL if params is None else params.to_c())
    if rc < 0:
        msg = ffi.string(lib.llama_sparq_strerror(rc)).decode()
        arg = _STATUS_ARG.get(rc)
        raise ValueError(f"{arg}: {msg}" if arg else msg)
    assert rc in (SPARQ_OK, SPARQ_DENSE)
    return rc


def is_set(ctx_ptr) -> bool:
    """Whether SparQ is set on the context (the library's answer)."""
    return lib.llama_sparq_get(ffi.cast("struct llama_context *", ctx_ptr), ffi.NULL) == 1


def stats(ctx_ptr) -> dict:
    s = ffi.new("struct llama_sparq_stats *")
    lib.llama_sparq_stats_get(ffi.cast("struct llama_context *", ctx_ptr), s)
    out = {f: getattr(s, f) for f in ("n_tokens_sparq", "n_tokens_dense", "n_layers_sparq", "n_layers",
                                      "bytes_attn_sparq", "bytes_attn_dense", "extra_bytes")}
    out["read_fraction"] = (out["bytes_attn_sparq"] / out["bytes_attn_dense"]) if out["bytes_attn_dense"] else None
    return out


def reset_stats(ctx_ptr) -> None:
    lib.llama_sparq_stats_reset(ffi.cast("struct llama_context *", ctx_ptr))
