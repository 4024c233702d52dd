"""SparQ settings: the one list of SparQ arguments (``SparqParams``' fields), their validation,
and the conversion to the C API's ``llama_sparq_params`` (budgets are parsed by sparq_cpp.budget)."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Literal, Optional, Tuple

from ._lib import SparqStatus, ffi, lib

_INT32_MAX = 2**31 - 1

# LLAMA_SPARQ_DEFAULT_MIN_CTX of llama-sparq.h (tests/test_c_api.py checks it against the header)
DEFAULT_MIN_CTX = 512

# enum llama_sparq_path, in its order
SPARQ_PATHS = ("auto", "fused", "ops")
SPARQ_MIRRORS = ("auto", "float")  # enum llama_sparq_mirror, in order


def flash_attn_for(params, flash_attn: Optional[bool]) -> Optional[bool]:
    """The rule for flash attention with SparQ, for ``Llama``, the CLI and the server: SparQ needs
    V stored row-major, which llama.cpp does with flash attention, so SparQ settings turn it on;
    an explicit ``flash_attn=False`` with them is an error. Without SparQ, ``flash_attn`` as given."""
    if params is None:
        return flash_attn
    if flash_attn is not None and not flash_attn:
        raise ValueError("SparQ needs flash_attn=True (V stored row-major); drop flash_attn=False")
    return True


class SparqError(ValueError):
    """A setting the library refused; ``status`` is its ``SparqStatus``."""

    def __init__(self, status: SparqStatus, message: str):
        super().__init__(message)
        self.status = status


def _arg(help: str, default=None):
    return field(default=default, metadata={"help": help})


def _is_int(x) -> bool:
    """An int (not a bool) that fits the C API's int32_t."""
    return isinstance(x, int) and not isinstance(x, bool) and -_INT32_MAX - 1 <= x <= _INT32_MAX


@dataclass(frozen=True)
class SparqParams:
    """SparQ Attention settings (arXiv 2312.04985; docs/sparq.md). Its fields are the one list of
    SparQ arguments: ``sparq_<field>`` in ``Llama``, ``--sparq-<field>`` in the CLI,
    ``--sparq_<field>`` in the server, each with the help text listed at the end.

    Give either ``k`` (positions read exactly per query) or ``compression`` (target fraction of
    dense attention's K/V reads, which picks r and k from the head size and the context length).
    ``None`` means the default: r from the head size (k given: head size/8; compression c: c*head
    size), l = k/4, reallocation per model family (on for multi-head, off for grouped-query
    models, as the paper found), min_ctx 512 (a sequence's length from which SparQ replaces dense
    attention; measured: SparQ 1/8 is already faster than dense there), all layers.
    """

    k: Optional[int] = _arg("positions read exactly per generated token (instead of compression)")
    compression: Optional[float] = _arg("target fraction of dense attention's reads, e.g. 1/8 or 0.125 (instead of k)")
    r: Optional[int] = _arg("query components for the approximate scores (default from the head size)")
    l: Optional[int] = _arg("local window: the last l positions always read (default k/4)")
    realloc: Optional[bool] = _arg("mean reallocation: mix with the mean of V (default per model family)")
    min_ctx: Optional[int] = _arg("a sequence's length from which SparQ replaces dense attention (default 512)")
    layers: Optional[Tuple[int, Optional[int]]] = _arg("layers START END that may use SparQ (END exclusive; default all)")
    no_tau: bool = _arg("ablation: scale the approximate scores by the dense scale instead of tau", False)
    path: Optional[Literal["auto", "fused", "ops"]] = _arg(
        "how SparQ is computed: auto (default: the fused op where the layer's backend has it, else the "
        "portable graph of standard ggml ops), fused (the op only; other layers dense), ops (the portable graph everywhere)")
    mirror: Optional[Literal["auto", "float"]] = _arg(
        "the K^T copy the approximate scores read: auto (default: int8 with a power-of-two scale per position "
        "where the fused op runs on an f16 or q8_0 cache, half of f16's bytes, so a compression buys more rows k), "
        "float (f16, or f32 for an f32 cache)")

    def __post_init__(self):
        p = "sparq_"
        if self.k is not None and (not _is_int(self.k) or self.k < 1):
            raise ValueError(f"{p}k must be an integer in 1..2**31-1, got {self.k!r}")
        if self.compression is not None:
            c = self.compression
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or float(ffi.cast("float", c)) == 0:
                raise ValueError(f"{p}compression must be a number in (0, 1], got {c!r}")
        if self.k is not None and self.compression is not None:
            raise ValueError(f"give {p}k or {p}compression, not both")
        if self.k is None and self.compression is None:
            raise ValueError(f"SparQ needs {p}k or {p}compression")
        if self.r is not None and (not _is_int(self.r) or self.r < 1):
            raise ValueError(f"{p}r must be an integer >= 1 (at most the head size), got {self.r!r}")
        if self.l is not None and (not _is_int(self.l) or self.l < 0):
            raise ValueError(f"{p}l must be an integer >= 0, got {self.l!r}")
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
            if lohi is None or not _is_int(lohi[0]) or not (lohi[1] is None or (_is_int(lohi[1]) and lohi[1] >= 0)):
                raise ValueError(f"{p}layers must be (start, end) with 0 <= start < end (end None: to the last "
                                 f"layer), got {lay!r}")
            object.__setattr__(self, "layers", lohi)
        if not isinstance(self.no_tau, bool):
            raise ValueError(f"{p}no_tau must be a bool, got {self.no_tau!r}")
        if self.path is not None and self.path not in SPARQ_PATHS:
            raise ValueError(f"{p}path must be one of {', '.join(SPARQ_PATHS)}, got {self.path!r}")
        if self.mirror is not None and self.mirror not in SPARQ_MIRRORS:
            raise ValueError(f"{p}mirror must be one of {', '.join(SPARQ_MIRRORS)}, got {self.mirror!r}")
        # Above: what Python's types and None add (0 and -1 are the C API's "default"). The rules of
        # the values (ranges, l <= k, the layer range) are the library's one check, as for the CLIs.
        raise_for_status(lib.llama_sparq_params_check(self.to_c()))

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
        p.mean_realloc = -1 if self.realloc is None else int(self.realloc)
        p.min_ctx = -1 if self.min_ctx is None else self.min_ctx
        if self.layers is not None:
            p.layer_start = self.layers[0]
            p.layer_end = -1 if self.layers[1] is None else self.layers[1]
        p.no_tau = self.no_tau
        p.path = SPARQ_PATHS.index(self.path or "auto")
        p.mirror = SPARQ_MIRRORS.index(self.mirror or "auto")
        return p


# keyword arguments of ``Llama`` and ``Llama.set_sparq`` (with the ``sparq_`` prefix there)
SPARQ_ARGS = tuple(f.name for f in fields(SparqParams))
SPARQ_HELP = {f.name: f.metadata["help"] for f in fields(SparqParams)}
SparqParams.__doc__ += "\n    Fields:\n\n" + "".join(f"    - ``{a}``: {h}\n" for a, h in SPARQ_HELP.items())

# C status -> the Python argument it is about
_STATUS_ARG = {SparqStatus.ERR_K: "sparq_k", SparqStatus.ERR_COMPRESSION: "sparq_compression",
               SparqStatus.ERR_BOTH: "sparq_k", SparqStatus.ERR_R: "sparq_r", SparqStatus.ERR_L: "sparq_l",
               SparqStatus.ERR_REALLOC: "sparq_realloc", SparqStatus.ERR_MIN_CTX: "sparq_min_ctx",
               SparqStatus.ERR_LAYERS: "sparq_layers", SparqStatus.ERR_PATH: "sparq_path",
               SparqStatus.ERR_MIRROR: "sparq_mirror"}


def raise_for_status(rc: int) -> None:
    """SparqError naming the argument a negative llama_sparq_status is about, with the library's words."""
    if rc < 0:
        rc = SparqStatus(rc)
        msg = ffi.string(lib.llama_sparq_strerror(rc)).decode()
        arg = _STATUS_ARG.get(rc)
        raise SparqError(rc, f"{arg}: {msg}" if arg else msg)


def _ctx(ctx_ptr):
    return ffi.cast("struct llama_context *", ctx_ptr)


def describe(params: SparqParams) -> str:
    """'compression=0.125, r=8': the settings given (not None), as keyword arguments."""
    return ", ".join(f"{a}={v!r}" for a, v in asdict(params).items() if v is not None and v is not False)


def dense_reason() -> str:
    """Why this thread's last llama_sparq_set left decoding dense (the library's words)."""
    return ffi.string(lib.llama_sparq_dense_reason()).decode()


def apply(ctx_ptr, params: Optional[SparqParams], what: str = "this model") -> SparqStatus:
    """Set (or, with None, clear) SparQ on a llama_context pointer: SparqStatus.OK, or DENSE when
    SparQ cannot run there (one RuntimeWarning naming ``what`` and the library's reason: no layer
    can use it, or the context is shorter than min_ctx); SparqError (a ValueError) on refusal.
    OK with some layers of the cache left dense: one RuntimeWarning naming them and why."""
    rc = SparqStatus(lib.llama_sparq_set(_ctx(ctx_ptr), ffi.NULL if params is None else params.to_c()))
    raise_for_status(rc)
    if rc == SparqStatus.DENSE:
        warnings.warn(f"SparQ is not used with {what}: {dense_reason()}; decoding stays dense",
                      RuntimeWarning, stacklevel=5)  # the caller of Llama(...) or Llama.set_sparq
    elif dense_reason():  # some layers of the cache stay dense: which, and why
        warnings.warn(f"SparQ with {what}: {dense_reason()}", RuntimeWarning, stacklevel=5)
    return rc


def prepare_cache(ctx_ptr) -> SparqStatus:
    """llama_sparq_prepare_cache: get an empty cache ready for SparQ without turning it on (with a
    quantized cache, llama.cpp's Hadamard rotation of Q and K is turned off). OK, ROTATED (the
    cache already holds rotated keys) or DENSE (no cache SparQ can use)."""
    return SparqStatus(lib.llama_sparq_prepare_cache(_ctx(ctx_ptr)))


def current(ctx_ptr) -> Optional[SparqParams]:
    """The context's SparQ settings as the library holds them (compression as float32), or None."""
    p = ffi.new("struct llama_sparq_params *")
    if lib.llama_sparq_get(_ctx(ctx_ptr), p) != 1:
        return None
    return SparqParams(k=p.k or None, compression=float(p.compression) if not p.k else None, r=p.r or None,
                       l=None if p.l < 0 else p.l, realloc=None if p.mean_realloc < 0 else bool(p.mean_realloc),
                       min_ctx=None if p.min_ctx < 0 else p.min_ctx,
                       layers=None if (p.layer_start, p.layer_end) == (0, -1) else
                       (p.layer_start, None if p.layer_end < 0 else p.layer_end),
                       no_tau=bool(p.no_tau), path=None if p.path == 0 else SPARQ_PATHS[p.path],
                       mirror=None if p.mirror == 0 else SPARQ_MIRRORS[p.mirror])


def is_set(ctx_ptr) -> bool:
    """Whether SparQ is set on the context (the library's answer)."""
    return lib.llama_sparq_get(_ctx(ctx_ptr), ffi.NULL) == 1


def stats(ctx_ptr, reset: bool = False) -> dict:
    """The library's counters (``struct llama_sparq_stats``), ``read_fraction``, and ``devices``:
    for each device that holds SparQ layers (and so runs their SparQ attention), how many; with
    reset, the counters start again from zero after they are read."""
    s = ffi.new("struct llama_sparq_stats *")
    lib.llama_sparq_stats_get(_ctx(ctx_ptr), s)
    out = {f: getattr(s, f) for f in ("n_tokens_sparq", "n_tokens_dense", "n_layers_sparq", "n_layers_ops",
                                      "n_layers", "bytes_attn_sparq", "bytes_attn_dense", "extra_bytes")}
    out["read_fraction"] = (out["bytes_attn_sparq"] / out["bytes_attn_dense"]) if out["bytes_attn_dense"] else None
    devices = {}
    for il in range(out["n_layers"]):
        name = lib.llama_sparq_layer_device(_ctx(ctx_ptr), il)
        if name != ffi.NULL:
            name = ffi.string(name).decode()
            devices[name] = devices.get(name, 0) + 1
    out["devices"] = devices
    out.update(graph_nodes(ctx_ptr))
    if reset:
        reset_stats(ctx_ptr)
    return out


def graph_nodes(ctx_ptr) -> dict:
    """The graph of the last ubatch the context decoded (SparQ or dense): ``graph_nodes``, and
    ``graph_compute_nodes`` (views, reshapes and permutes left out: on a GPU, each is a kernel
    launch unless the backend fuses it)."""
    n_compute = ffi.new("int32_t *")
    n = lib.llama_sparq_graph_size(_ctx(ctx_ptr), n_compute)
    return {"graph_nodes": n, "graph_compute_nodes": n_compute[0]}


_MIRROR_TYPES = {0: "f32", 1: "f16", 24: "i8"}  # GGML_TYPE_F32, F16, I8


def plan(ctx_ptr, params: SparqParams, n_pos: int) -> list:
    """The library's plan (llama_sparq_plan) for a sequence of n_pos positions: for each attention
    layer of the cache SparQ serves, ``path`` ("dense", "fused", "ops"), r, k, l, the K^T mirror's
    type, and the estimated K/V bytes a token reads there (``bytes``) against dense's
    (``bytes_dense``). Nothing is set or decoded; SparqError for settings llama_sparq_set refuses."""
    if not _is_int(n_pos) or n_pos < 0:
        raise ValueError(f"n_pos must be a non-negative integer, got {n_pos!r}")
    n = lib.llama_sparq_plan(_ctx(ctx_ptr), params.to_c(), n_pos, ffi.NULL, 0)
    if n < 0:
        raise SparqError(SparqStatus(n), f"SparQ settings refused: {ffi.string(lib.llama_sparq_strerror(n)).decode()}")
    out = ffi.new("struct llama_sparq_layer_plan[]", max(n, 1))
    lib.llama_sparq_plan(_ctx(ctx_ptr), params.to_c(), n_pos, out, n)
    return [_plan_row(o) for o in out[0:n]]


def _plan_row(o) -> dict:
    return {"layer": o.il, "path": ("dense", "fused", "ops")[o.path], "r": o.r, "k": o.k, "l": o.l,
            "mirror": _MIRROR_TYPES.get(o.type_kt) if o.type_kt >= 0 else None,
            "bytes": o.bytes, "bytes_dense": o.bytes_dense}


_CACHE_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # GGML_TYPE_*


def plan_shape(params: SparqParams, n_pos: int, n_head: int, n_head_kv: int, d: int, dv: Optional[int] = None,
               type_k: str = "f16", type_v: str = "f16", fused: bool = True) -> dict:
    """The library's plan (llama_sparq_plan_layer) for one attention layer of a shape, without a model:
    n_head query and n_head_kv KV heads of size d (dv for V, default d), an f16/f32/q8_0 cache, the
    fused op on the CPU or the portable graph (fused=False), n_pos positions. A row as plan() gives
    (layer 0); SparqError for a shape or settings the library refuses."""
    if type_k not in _CACHE_TYPES or type_v not in _CACHE_TYPES:
        raise ValueError(f"cache types must be one of {', '.join(_CACHE_TYPES)}, got {type_k!r}, {type_v!r}")
    ints = dict(n_pos=n_pos, n_head=n_head, n_head_kv=n_head_kv, d=d, dv=d if dv is None else dv)
    bad = [k for k, v in ints.items() if not _is_int(v)]
    if bad:
        raise ValueError(f"{', '.join(bad)} must be integers")
    out = ffi.new("struct llama_sparq_layer_plan *")
    raise_for_status(lib.llama_sparq_plan_layer(params.to_c(), n_head, n_head_kv, d, ints["dv"], _CACHE_TYPES[type_k],
                                                _CACHE_TYPES[type_v], bool(fused), n_pos, out))
    return _plan_row(out[0])


def reset_stats(ctx_ptr) -> None:
    lib.llama_sparq_stats_reset(_ctx(ctx_ptr))
