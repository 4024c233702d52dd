"""Model shapes with random weights, built in memory: decode speed on the models people run
without their files (``sparq-cpp bench --shape llama3-8b``).

A shape (layers, heads, sizes, vocabulary) becomes a GGUF header in memory, handed to libllama's
``llama_model_init_from_user``, which allocates the weights and lets a callback fill them: each
quantized weight with blocks that ggml's own quantizer made from random normal values (scaled by
1/sqrt(row length), so activations stay in range through every layer), norms and RoPE factors
with ones, biases with zeros. Nothing is downloaded and nothing is written to disk. libllama
creates every optional tensor of the architecture in this mode (the llama family's biases and RoPE
factors): a few vector additions per layer that a real GGUF would not have.

The cache is filled to a depth without a prefill (32k tokens through an 8B model take hours on
two cores): a sequence state of random K and V rows at positions 0..depth-1, in the layout
``llama_state_seq_get_data`` writes, loaded with ``llama_state_seq_set_data`` as a state saved
after a prefill would be; SparQ rebuilds its K^T mirror and V sums from the loaded cache, as
after any state load. Random weights and keys: the figures are speed, never accuracy.
"""

from __future__ import annotations

import ctypes as C
import math
import struct
from dataclasses import dataclass, fields, replace
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ._lib import llama_cpp

__all__ = ["Shape", "SHAPES", "parse_shape", "ShapeModel", "SeqStateLayout", "WEIGHT_TYPES"]


@dataclass(frozen=True)
class Shape:
    """The sizes that set a decoder's speed (libllama gives every shape the biases its architecture
    may have: Qwen 2's Q/K/V biases are there without a field for them)."""

    arch: str
    layers: int
    embd: int
    heads: int
    kv_heads: int
    head_dim: int
    ff: int
    vocab: int
    rope_base: float = 10000.0

    def describe(self) -> str:
        return (f"{self.arch}, {self.layers} layers, embedding {self.embd}, {self.heads} query / {self.kv_heads} KV "
                f"heads of {self.head_dim}, feed-forward {self.ff}, vocabulary {self.vocab}")


# The published configurations (config.json of each family's models)
SHAPES: Dict[str, Shape] = {
    "llama3-8b": Shape("llama", 32, 4096, 32, 8, 128, 14336, 128256, 500000.0),
    "llama3.2-1b": Shape("llama", 16, 2048, 32, 8, 64, 8192, 128256, 500000.0),
    "llama3.2-3b": Shape("llama", 28, 3072, 24, 8, 128, 8192, 128256, 500000.0),
    "mistral-7b": Shape("llama", 32, 4096, 32, 8, 128, 14336, 32768, 1000000.0),
    "qwen2.5-7b": Shape("qwen2", 28, 3584, 28, 4, 128, 18944, 152064, 1000000.0),
    "qwen2.5-1.5b": Shape("qwen2", 28, 1536, 12, 2, 128, 8960, 151936, 1000000.0),
}

_ARCHS = ("llama", "qwen2")
_INT_FIELDS = ("layers", "embd", "heads", "kv_heads", "head_dim", "ff", "vocab")


def parse_shape(text: str) -> Tuple[str, Shape]:
    """'llama3-8b', or a named shape with sizes changed ('llama3-8b,layers=8'), or a shape of
    one's own ('arch=llama,layers=4,embd=1024,heads=16,kv_heads=4,head_dim=64,ff=2816,vocab=32000')
    -> (label, Shape); ValueError naming what is wrong."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"--shape: empty; one of {', '.join(SHAPES)}, or sizes such as layers=4,embd=1024,...")
    base, label = None, text
    if "=" not in parts[0]:
        if parts[0] not in SHAPES:
            raise ValueError(f"--shape {parts[0]!r}: unknown; one of {', '.join(SHAPES)}, or give the sizes "
                             "(arch=llama,layers=...,embd=...,heads=...,kv_heads=...,head_dim=...,ff=...,vocab=...)")
        base, parts = SHAPES[parts[0]], parts[1:]
    names = {f.name for f in fields(Shape)}
    kv = {}
    for p in parts:
        key, sep, val = p.partition("=")
        key = key.strip()
        if not sep or key not in names:
            raise ValueError(f"--shape {text!r}: {p!r} is not a size; the sizes are {', '.join(sorted(names))}")
        if key in _INT_FIELDS:
            try:
                kv[key] = int(val)
            except ValueError:
                raise ValueError(f"--shape {text!r}: {key} takes an integer, got {val!r}") from None
        elif key == "rope_base":
            kv[key] = float(val)
        else:
            kv[key] = val.strip()
    if base is None:
        missing = [k for k in ("arch",) + _INT_FIELDS if k not in kv]
        if missing:
            raise ValueError(f"--shape {text!r}: a shape of one's own needs {', '.join(missing)} "
                             f"(or start from a named one: {', '.join(SHAPES)})")
        shape = Shape(**kv)
    else:
        shape = replace(base, **kv)
    if shape.arch not in _ARCHS:
        raise ValueError(f"--shape {text!r}: arch must be one of {', '.join(_ARCHS)}")
    for k in _INT_FIELDS:
        if getattr(shape, k) < 1:
            raise ValueError(f"--shape {text!r}: {k} must be at least 1")
    if shape.heads % shape.kv_heads:
        raise ValueError(f"--shape {text!r}: heads ({shape.heads}) must be a multiple of kv_heads ({shape.kv_heads})")
    if shape.head_dim % 2 or shape.embd % 32 or shape.ff % 32 or (shape.heads * shape.head_dim) % 32:
        raise ValueError(f"--shape {text!r}: embd, ff and heads*head_dim must be multiples of 32 (quantized "
                         "blocks), head_dim even")
    return label, shape


# -- ggml and libllama entry points (ctypes, on the library llama_cpp loaded) --------------------

_lib = llama_cpp.llama_cpp._lib
GGML_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q4_k": 12, "q5_k": 13,
             "q6_k": 14, "bf16": 30}
_TYPE_NAMES = {v: k for k, v in GGML_TYPE.items()}
# cache types a random fill writes (random_rows)
FILL_CACHE_TYPES = ("f16", "f32", "bf16", "q8_0", "q4_0")
# weights the bench builds: llama-quantize's pure types (every matrix but the output in this type,
# the output matrix in q6_k as llama-quantize makes it for q4 and q5 types)
WEIGHT_TYPES = ("q4_0", "q4_k", "q5_k", "q8_0", "f16")


def _fn(name: str, restype, *argtypes):
    f = _lib[name]  # a new function object: llama_cpp's own bindings keep their argtypes
    f.restype, f.argtypes = restype, list(argtypes)
    return f


class _GgmlInitParams(C.Structure):
    _fields_ = [("mem_size", C.c_size_t), ("mem_buffer", C.c_void_p), ("no_alloc", C.c_bool)]


_ggml_init = _fn("ggml_init", C.c_void_p, _GgmlInitParams)
_ggml_free = _fn("ggml_free", None, C.c_void_p)
_ggml_new_tensor = _fn("ggml_new_tensor", C.c_void_p, C.c_void_p, C.c_int, C.c_int, C.POINTER(C.c_int64))
_ggml_set_name = _fn("ggml_set_name", C.c_void_p, C.c_void_p, C.c_char_p)
_ggml_get_name = _fn("ggml_get_name", C.c_char_p, C.c_void_p)
_ggml_nbytes = _fn("ggml_nbytes", C.c_size_t, C.c_void_p)
_ggml_row_size = _fn("ggml_row_size", C.c_size_t, C.c_int, C.c_int64)
_ggml_blck_size = _fn("ggml_blck_size", C.c_int64, C.c_int)
_ggml_quantize_chunk = _fn("ggml_quantize_chunk", C.c_size_t, C.c_int, C.c_void_p, C.c_void_p, C.c_int64,
                           C.c_int64, C.c_int64, C.c_void_p)
_ggml_backend_tensor_set = _fn("ggml_backend_tensor_set", None, C.c_void_p, C.c_void_p, C.c_size_t, C.c_size_t)
_gguf_init_empty = _fn("gguf_init_empty", C.c_void_p)
_gguf_free = _fn("gguf_free", None, C.c_void_p)
_gguf_set_str = _fn("gguf_set_val_str", None, C.c_void_p, C.c_char_p, C.c_char_p)
_gguf_set_u32 = _fn("gguf_set_val_u32", None, C.c_void_p, C.c_char_p, C.c_uint32)
_gguf_set_f32 = _fn("gguf_set_val_f32", None, C.c_void_p, C.c_char_p, C.c_float)
_gguf_add_tensor = _fn("gguf_add_tensor", None, C.c_void_p, C.c_void_p)
_SET_TENSOR_DATA = C.CFUNCTYPE(None, C.c_void_p, C.c_void_p)
_model_init_from_user = _fn("llama_model_init_from_user", C.c_void_p, C.c_void_p, _SET_TENSOR_DATA, C.c_void_p,
                            llama_cpp.llama_model_params)
_state_seq_set_data = _fn("llama_state_seq_set_data", C.c_size_t, C.c_void_p, C.c_void_p, C.c_size_t, C.c_int32)
_state_seq_get_data = _fn("llama_state_seq_get_data", C.c_size_t, C.c_void_p, C.c_void_p, C.c_size_t, C.c_int32)
_state_seq_get_size = _fn("llama_state_seq_get_size", C.c_size_t, C.c_void_p, C.c_int32)


def _quantize(type_name: str, values: np.ndarray) -> bytes:
    """rows of float32 values -> their blocks of type_name, by ggml's own quantizer."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    nrows, n = values.shape
    t = GGML_TYPE[type_name]
    if type_name == "f16":
        return values.astype(np.float16).tobytes()
    out = C.create_string_buffer(_ggml_row_size(t, n) * nrows)
    _ggml_quantize_chunk(t, values.ctypes.data, out, 0, nrows, n, None)
    return out.raw


# -- the model ----------------------------------------------------------------------------------

class ShapeModel:
    """A model of this shape with random weights of type ``weights`` (see WEIGHT_TYPES), built in
    memory. ``model`` is the llama_model pointer (as llama_cpp's functions take it); ``close()``
    frees it. ``weight_bytes_per_token``: the weight bytes one decoded token reads (every matrix,
    one row of the token embeddings)."""

    _PATTERN_ROWS = 256  # random rows per (type, row length, scale), repeated from a random row per tensor

    def __init__(self, shape: Shape, weights: str = "q4_0", n_gpu_layers: int = 0, seed: int = 0,
                 verbose: bool = False):
        from llama_cpp._logger import set_verbose
        from llama_cpp._utils import suppress_stdout_stderr

        set_verbose(verbose)  # libllama's log through llama-cpp-python's logger, as Llama(verbose=...) sets it

        if weights not in WEIGHT_TYPES:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_TYPES)}, got {weights!r}")
        self.shape, self.weights, self.seed = shape, weights, seed
        self._rng = np.random.default_rng(seed)
        self._patterns: Dict[Tuple[str, int, float], np.ndarray] = {}
        self._types: Dict[str, Tuple[str, Tuple[int, ...]]] = {}  # name -> (type, ne) of the quantized matrices
        self.model = None
        self._gguf = self._header()
        self._cb = _SET_TENSOR_DATA(self._set_tensor_data)
        self._filled_bytes = 0
        self._error: Optional[BaseException] = None
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        with suppress_stdout_stderr(disable=verbose):  # libllama's load log, as Llama(verbose=False)
            model = _model_init_from_user(self._gguf, self._cb, None, params)
        if self._error is not None:
            if model:
                llama_cpp.llama_model_free(model)
            raise self._error
        if not model:
            raise RuntimeError(f"libllama could not build a model of shape {shape.describe()} (its log says why)")
        self.model = model
        s = shape
        emb_type, emb_ne = self._types["token_embd.weight"]
        self.weight_bytes = self._filled_bytes  # (llama_model_size counts file bytes: none here)
        emb_bytes = _ggml_row_size(GGML_TYPE[emb_type], emb_ne[0]) * emb_ne[1]
        self.weight_bytes_per_token = self.weight_bytes - emb_bytes + emb_bytes // s.vocab

    def _header(self) -> int:
        s, arch = self.shape, self.shape.arch
        g = _gguf_init_empty()
        _gguf_set_str(g, b"general.architecture", arch.encode())
        _gguf_set_str(g, b"general.name", f"random {arch} shape".encode())
        _gguf_set_str(g, b"tokenizer.ggml.model", b"none")  # no tokenizer: vocab dummy tokens
        for key, val in (("vocab_size", s.vocab), ("context_length", 131072), ("embedding_length", s.embd),
                         ("block_count", s.layers), ("feed_forward_length", s.ff),
                         ("attention.head_count", s.heads), ("attention.head_count_kv", s.kv_heads),
                         ("attention.key_length", s.head_dim), ("attention.value_length", s.head_dim),
                         ("rope.dimension_count", s.head_dim)):
            _gguf_set_u32(g, f"{arch}.{key}".encode(), val)
        _gguf_set_f32(g, f"{arch}.rope.freq_base".encode(), s.rope_base)
        _gguf_set_f32(g, f"{arch}.attention.layer_norm_rms_epsilon".encode(), 1e-5)
        # the matrices' types (libllama creates every tensor the header does not list as F32)
        q = s.heads * s.head_dim
        kvd = s.kv_heads * s.head_dim
        mats = {"token_embd.weight": (s.embd, s.vocab), "output.weight": (s.embd, s.vocab)}
        for i in range(s.layers):
            mats.update({f"blk.{i}.attn_q.weight": (s.embd, q), f"blk.{i}.attn_k.weight": (s.embd, kvd),
                         f"blk.{i}.attn_v.weight": (s.embd, kvd), f"blk.{i}.attn_output.weight": (q, s.embd),
                         f"blk.{i}.ffn_gate.weight": (s.embd, s.ff), f"blk.{i}.ffn_up.weight": (s.embd, s.ff),
                         f"blk.{i}.ffn_down.weight": (s.ff, s.embd)})
        types = {name: "q6_k" if name == "output.weight" and self.weights in ("q4_0", "q4_k", "q5_k") else self.weights
                 for name in mats}
        for name, ne in mats.items():  # ggml would abort on a row that is not whole blocks
            if ne[0] % _ggml_blck_size(GGML_TYPE[types[name]]):
                _gguf_free(g)
                raise ValueError(f"{name}: rows of {ne[0]} values are not whole {types[name]} blocks of "
                                 f"{_ggml_blck_size(GGML_TYPE[types[name]])}; take other sizes or --weights")
        ctx = _ggml_init(_GgmlInitParams(mem_size=(len(mats) + 8) * 1024, mem_buffer=None, no_alloc=True))
        try:
            for name, ne in mats.items():
                t = types[name]
                arr = (C.c_int64 * 2)(*ne)
                tensor = _ggml_new_tensor(ctx, GGML_TYPE[t], 2, arr)
                _ggml_set_name(tensor, name.encode())
                _gguf_add_tensor(g, tensor)  # copies the tensor's description
                self._types[name] = (t, ne)
        finally:
            _ggml_free(ctx)
        return g

    def _pattern(self, type_name: str, n: int, scale: float) -> np.ndarray:
        key = (type_name, n, scale)  # the token embeddings (scale 1) share a row length with the projections
        if key not in self._patterns:
            rows = self._rng.standard_normal((self._PATTERN_ROWS, n), dtype=np.float32) * np.float32(scale)
            blob = _quantize(type_name, rows)
            self._patterns[key] = np.frombuffer(blob, dtype=np.uint8).reshape(self._PATTERN_ROWS, -1)
        return self._patterns[key]

    def _set_tensor_data(self, tensor, _ud) -> None:
        if self._error is not None:
            return
        try:
            name = _ggml_get_name(tensor).decode()
            nbytes = _ggml_nbytes(tensor)
            if name in self._types:
                t, (n, nrows) = self._types[name]
                pat = self._pattern(t, n, 1.0 if name == "token_embd.weight" else 1.0 / math.sqrt(n))
                start = int(self._rng.integers(0, self._PATTERN_ROWS))
                rows = np.ascontiguousarray(pat[(np.arange(nrows) + start) % self._PATTERN_ROWS])
                assert rows.nbytes == nbytes, (name, rows.nbytes, nbytes)
                _ggml_backend_tensor_set(tensor, rows.ctypes.data, 0, nbytes)
            else:  # F32 vectors: norms and RoPE factors 1, biases 0
                fill = 0.0 if name.endswith(".bias") else 1.0
                data = np.full(nbytes // 4, fill, dtype=np.float32)
                _ggml_backend_tensor_set(tensor, data.ctypes.data, 0, nbytes)
            self._filled_bytes += nbytes
        except BaseException as e:  # an exception cannot cross the C callback: raised after the load
            self._error = e

    def close(self) -> None:
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None
        if self._gguf:
            _gguf_free(self._gguf)
            self._gguf = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# -- a sequence's state, as llama_state_seq_get_data writes it ------------------------------------

_STATE_MAGIC = 0xAF143CD8  # llama_context's sequence state: this, the sequence id, then the cache's state


@dataclass
class SeqStateLayout:
    """What a one-stream cache writes per cell and layer (llama_kv_cache::state_write):
    for each layer K's type and row size, then V's (row-major), or V's type, element size and row
    length (transposed, flash attention off)."""

    v_trans: bool
    k: List[Tuple[int, int]]  # per layer (ggml type, bytes per row)
    v: List[Tuple[int, int, int]]  # per layer (ggml type, bytes per row or per element, elements per row)

    @classmethod
    def parse(cls, blob: bytes, n_cells: int) -> Tuple["SeqStateLayout", List[Tuple[int, List[int]]], List[np.ndarray], List[np.ndarray]]:
        """A state of n_cells cells of one sequence -> its layout, the cells' (pos, seq ids), and
        every layer's K and V rows (uint8 arrays [n_cells, row bytes]; V as stored, [row length,
        n_cells elements] when transposed)."""
        off = 0

        def take(fmt):
            nonlocal off
            vals = struct.unpack_from(fmt, blob, off)
            off += struct.calcsize(fmt)
            return vals

        magic, _seq = take("<Ii")
        if magic != _STATE_MAGIC:
            raise ValueError(f"not a sequence state (magic {magic:#x})")
        (n_stream,) = take("<I")
        (cell_count,) = take("<I")
        if n_stream != 1 or cell_count != n_cells:
            raise ValueError(f"a state of {n_stream} streams, {cell_count} cells: one stream of {n_cells} expected")
        cells = []
        for _ in range(n_cells):
            pos, n_seq = take("<iI")
            cells.append((pos, list(take(f"<{n_seq}i"))))
        v_trans, n_layer = take("<II")
        k_layout, ks = [], []
        for _ in range(n_layer):
            t, row = take("<iQ")
            ks.append(np.frombuffer(blob, dtype=np.uint8, count=row * n_cells, offset=off).reshape(n_cells, row))
            off += row * n_cells
            k_layout.append((t, row))
        v_layout, vs = [], []
        for _ in range(n_layer):
            if v_trans:
                t, el, n = take("<iII")
                vs.append(np.frombuffer(blob, dtype=np.uint8, count=el * n * n_cells, offset=off).reshape(n, n_cells * el))
                off += el * n * n_cells
                v_layout.append((t, el, n))
            else:
                t, row = take("<iQ")
                vs.append(np.frombuffer(blob, dtype=np.uint8, count=row * n_cells, offset=off).reshape(n_cells, row))
                off += row * n_cells
                v_layout.append((t, row, 0))
        if off != len(blob):
            raise ValueError(f"unexpected cache state layout: {len(blob) - off} bytes left after {n_layer} layers "
                             "(a cache with more per-cell data than the llama family's)")
        return cls(bool(v_trans), k_layout, v_layout), cells, ks, vs

    def v_row_bytes(self, il: int) -> int:
        """Bytes of one cell's V in layer il (a row, or its elements when V is transposed)."""
        _, a, n = self.v[il]
        return a * (n or 1)

    def cell_bytes(self) -> int:
        """K and V bytes of one cell over all layers."""
        return sum(row for _, row in self.k) + sum(self.v_row_bytes(il) for il in range(len(self.v)))

    def size(self, n_cells: int) -> int:
        # header (magic, sequence, streams, cells), per cell (pos, n_seq, seq), v_trans and layers,
        # a 12-byte header per layer for K and for V, then the rows
        return 16 + 12 * n_cells + 8 + 12 * (len(self.k) + len(self.v)) + self.cell_bytes() * n_cells

    def write(self, n_cells: int, k_rows: Callable[[int], np.ndarray], v_rows: Callable[[int], np.ndarray],
              seq_id: int = 0) -> bytearray:
        """The state of one sequence at positions 0..n_cells-1: layer il's K rows from k_rows(il)
        ([n_cells, row bytes], uint8), its V rows from v_rows(il) (the same, row-major: transposed
        here when the cache stores V transposed)."""
        buf = bytearray(self.size(n_cells))
        mv = memoryview(buf)
        struct.pack_into("<IiII", buf, 0, _STATE_MAGIC, seq_id, 1, n_cells)
        off = 16
        meta = np.empty((n_cells, 3), dtype=np.int32)
        meta[:, 0] = np.arange(n_cells, dtype=np.int32)
        meta[:, 1] = 1
        meta[:, 2] = seq_id
        mv[off:off + meta.nbytes] = meta.tobytes()
        off += meta.nbytes
        struct.pack_into("<II", buf, off, int(self.v_trans), len(self.k))
        off += 8
        for il, (t, row) in enumerate(self.k):
            struct.pack_into("<iQ", buf, off, t, row)
            off += 12
            rows = k_rows(il)
            assert rows.shape == (n_cells, row), (rows.shape, n_cells, row)
            np.frombuffer(mv[off:off + rows.nbytes], dtype=np.uint8).reshape(rows.shape)[...] = rows
            off += rows.nbytes
        for il, (t, a, n) in enumerate(self.v):
            rows = v_rows(il)
            if self.v_trans:
                struct.pack_into("<iII", buf, off, t, a, n)
                off += 12
                assert rows.shape == (n_cells, a * n), (rows.shape, n_cells, a * n)
                # [cells, n elements of a bytes] -> [n, cells elements]
                tr = rows.reshape(n_cells, n, a).transpose(1, 0, 2)
                np.frombuffer(mv[off:off + rows.nbytes], dtype=np.uint8).reshape(n, n_cells, a)[...] = tr
            else:
                struct.pack_into("<iQ", buf, off, t, a)
                off += 12
                assert rows.shape == (n_cells, a), (rows.shape, n_cells, a)
                np.frombuffer(mv[off:off + rows.nbytes], dtype=np.uint8).reshape(rows.shape)[...] = rows
            off += rows.nbytes
        assert off == len(buf)
        return buf


def seq_state(ctx) -> bytes:
    """Sequence 0's state of a context (llama_state_seq_get_data)."""
    n = _state_seq_get_size(ctx, 0)
    buf = C.create_string_buffer(n)
    got = _state_seq_get_data(ctx, buf, n, 0)
    if got != n:
        raise RuntimeError(f"llama_state_seq_get_data wrote {got} of {n} bytes")
    return buf.raw


def load_seq_state(ctx, blob) -> None:
    """Sequence 0 of a context from a state (llama_state_seq_set_data); RuntimeError when refused."""
    src = (C.c_char * len(blob)).from_buffer(blob) if isinstance(blob, bytearray) else blob
    if _state_seq_set_data(ctx, src, len(blob), 0) != len(blob):
        raise RuntimeError("llama_state_seq_set_data refused the state (the library's log says why)")


def random_rows(type_id: int, n_cells: int, row_bytes: int, rng: np.random.Generator) -> np.ndarray:
    """n_cells random rows of a cache type: f16/f32/bf16 values of both signs with magnitudes in
    [1/8, 1/2) (random mantissas: no two rows alike, cheap enough for gigabytes), q8_0 and q4_0
    blocks of random quants with a scale that keeps their values in the same range."""
    raw = rng.bit_generator.random_raw((n_cells * row_bytes + 7) // 8)
    rows = raw.view(np.uint8)[:n_cells * row_bytes].reshape(n_cells, row_bytes)
    name = _TYPE_NAMES.get(type_id)
    if name in ("f16", "bf16", "f32"):
        h = rows.view(np.uint16)
        if name == "f16":  # sign, exponent 12 or 13 (1/8..1/2), random mantissa
            h &= np.uint16(0x87FF)
            h |= np.uint16(0x3000)
        else:  # bf16 and the high halves of f32: sign, exponent 124 or 125, random mantissa
            hi = h if name == "bf16" else h.reshape(n_cells, -1, 2)[:, :, 1]
            hi &= np.uint16(0x80FF)
            hi |= np.uint16(0x3E00)
        return rows
    blocks = {"q8_0": 34, "q4_0": 18}
    if name not in blocks:
        raise ValueError(f"a random cache fill takes {', '.join(FILL_CACHE_TYPES)} rows, not ggml type {type_id}")
    b = rows.reshape(n_cells, -1, blocks[name])
    d = np.float16(1 / 256 if name == "q8_0" else 1 / 16)
    b[:, :, 0:2] = np.frombuffer(d.tobytes(), dtype=np.uint8)
    return rows


def fill_random(ctx, depth: int, seed: int = 0) -> SeqStateLayout:
    """Sequence 0 of a context (one stream) holds positions 0..depth-1 with random K and V rows,
    as after a prefill of depth tokens: a state written in the library's layout (learned from
    the state of one decoded token) and loaded through llama_state_seq_set_data. The sequence's
    cells must be empty before."""
    one = (llama_cpp.llama_token * 1)(0)
    if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1)) != 0:
        raise RuntimeError("llama_decode failed")
    layout, _, _, _ = SeqStateLayout.parse(seq_state(ctx), 1)
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), 0, -1, -1)
    rng = np.random.Generator(np.random.SFC64(seed))
    blob = layout.write(depth,
                        lambda il: random_rows(layout.k[il][0], depth, layout.k[il][1], rng),
                        lambda il: random_rows(layout.v[il][0], depth, layout.v_row_bytes(il), rng))
    load_seq_state(ctx, blob)
    return layout
