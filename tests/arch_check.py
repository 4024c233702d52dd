"""SparQ on every architecture llama.cpp builds: the checks behind tests/test_archs.py and the table
in docs/architectures.md.

The models are llama.cpp's own: its test generator (upstream's tests/test-llama-archs.cpp, built
as build/native/bin/test-llama-archs by `make build`) writes a small random-weight GGUF of every
architecture it can build (2 layers of width 256 for most, head size 128, vocabulary 128; MoE
variants where the architecture has them), and models made here from two of them with other head
sizes (RESIZED: V heads smaller than K's, as MiMo-V2-Flash's; heads of 512, as Gemma 4's global
layers; the generator makes every head 128 wide). Its learned attention sinks (gpt-oss, MiMo 2, Granite
SWA) are random like the other weights, near 0: beside 600 positions such a sink holds almost no
weight, and a SparQ that left it out would pass. They are set here to what trained sinks are, a
large share of each head's weight (log of the prompt's length, +-1.5). Each model, in a process of its own set (a crash is one
model's failure, not the suite's), is decoded dense and with SparQ on the same random prompt:

- ``exact``: SparQ with k >= the context (every visible position read, l = 0) set before the
  prefill, 4 decoded tokens: logits equal to dense (flash attention, F16 cache) within the rounding
  bound, 1.5x dense's own difference between flash attention on and off;
- ``ops``: the same through the portable graph of standard ops (what GPU backends run), with mean
  reallocation (alpha must come to 1);
- ``q8_0``: the same on a q8_0 cache against dense on a q8_0 cache;
- ``two_seqs``: two sequences of different lengths in one cache (a stream each), one decode batch
  for both, against dense;
- ``seq_cp``: a sequence copied to another in one shared cache, the copy decoded;
- ``state``: the dense context's sequence state loaded into a SparQ context, then decoded;
- ``shift``: the first 100 positions removed and the rest shifted back (a K-shift), then decoded
  (where the model's memory can shift);
- ``budget``: SparQ at 1/8 after the exact check, on the same context: it runs on the layers the
  library says it takes (its counters), its logits are finite and within a loose bound of dense
  (random weights say nothing of accuracy: the bound catches garbage, not a worse choice);
- ``reasons``: the library's one warning per refused layer group, and its reason when no layer
  can take SparQ.

`python tests/arch_check.py --table docs/architectures.md` writes the table from these results.
"""

from __future__ import annotations

import argparse
import ctypes as C
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD_BIN = ROOT / "build" / "native" / "bin"
GENERATOR = BUILD_BIN / "test-llama-archs"
MODELS_DIR = ROOT / "build" / "archs"
# the generator's seed and weight scale: 0.3 makes attention peaked enough that a wrong position
# read shows in the logits (at upstream's default 0.1 attention is nearly uniform)
GEN_ARGS = ("-s", "42", "-d", "0.3")
ARCH_SOURCE = ROOT / "build" / "native" / "upstream" / "llama.cpp" / "src" / "llama-arch.cpp"
SAVER_SOURCE = ARCH_SOURCE.parent / "llama-model-saver.cpp"
GENERATOR_SOURCE = ARCH_SOURCE.parent.parent / "tests" / "test-llama-archs.cpp"

N_PROMPT = 600      # tokens before the decoded ones (longer than the default min_ctx of 512)
N_GEN = 4           # decoded tokens compared per check
N_CTX = 1024
BOUND_FACTOR = 1.5  # the rounding bound: this times dense's flash attention on/off difference
# models made here from the generator's, with other heads: name -> (from, K head size, V head size
# [, KV heads per layer [, query heads per layer]]) (_heads_resized)
RESIZED = {
    "mimo2-dv64-moe.gguf": ("mimo2-moe.gguf", 128, 64),       # V heads smaller than K's (MiMo-V2-Flash: 192, 128)
    "llama-d512-dense.gguf": ("llama-dense.gguf", 512, 512),  # the largest heads the op takes (Gemma 4's global layers)
    "openelm-kv21-dense.gguf": ("openelm-dense.gguf", 128, 128, [2, 1]),  # KV heads per layer (OpenELM's vary)
    # a layer SparQ refuses beside one it takes: 65 query heads on 1 KV head (more than GGML_SPARQ_MAX_GROUP)
    "openelm-g65-dense.gguf": ("openelm-dense.gguf", 128, 128, [2, 1], [2, 65]),
}
SINK_LOGIT = math.log(N_PROMPT)  # a sink's weight, that of N_PROMPT positions of logit 0
BUDGET_NMSE = 1.0   # the loose bound at 1/8: squared error against dense's logits / their square
                    # (random weights say nothing of accuracy: this catches garbage, an error as large as the logits)


def generate(out_dir: Path = MODELS_DIR) -> list:
    """The generator's models in out_dir, written when missing or older than the generator."""
    stamp = out_dir / ".generated"
    want = f"{GENERATOR.stat().st_mtime_ns} {' '.join(GEN_ARGS)} sinks={SINK_LOGIT:.3f} {sorted(RESIZED.items())}"
    if not (stamp.exists() and stamp.read_text() == want):
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in out_dir.glob("*.gguf"):
            f.unlink()
        r = subprocess.run([str(GENERATOR), "-o", str(out_dir), *GEN_ARGS], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"test-llama-archs -o failed ({r.returncode}): {r.stderr[-2000:]}")
        for f in out_dir.glob("*.gguf"):
            _weighty_sinks(f)
        for name, (base, *sizes) in RESIZED.items():
            _heads_resized(out_dir / base, out_dir / name, *sizes)
        stamp.write_text(want)
    return sorted(out_dir.glob("*.gguf"))


def _heads_resized(src: Path, dst: Path, dk: int, dv: int, kv_heads: list = None, heads: list = None) -> None:
    """A copy of src with K heads of dk and V heads of dv, and kv_heads[il] KV heads and heads[il]
    query heads in layer il where given, new random attention projections for them (the generator
    makes every head 128 wide, every layer alike)"""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    key = lambda name: f"{arch}.{name}"
    size = {key("attention.key_length"): dk, key("attention.key_length_swa"): dk,
            key("rope.dimension_count"): dk, key("rope.dimension_count_swa"): dk,
            key("attention.value_length"): dv, key("attention.value_length_swa"): dv}
    n_head = reader.fields[key("attention.head_count")].contents()
    n_head_kv = reader.fields[key("attention.head_count_kv")].contents()
    kv_heads = kv_heads or [n_head_kv] * reader.fields[key("block_count")].contents()
    heads = heads or [n_head] * len(kv_heads)
    writer = gguf.GGUFWriter(dst, arch)
    writer.add_architecture = lambda *a, **k: None  # written from the copied fields below
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture" or (
                f.types[0] == gguf.GGUFValueType.ARRAY and len(f.data) == 0):  # (gguf-py writes no empty array)
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        val = size.get(f.name, f.contents())
        for name, per_layer in (("attention.head_count_kv", kv_heads), ("attention.head_count", heads)):
            if f.name == key(name) and len(set(per_layer)) > 1:
                val, vtype, sub = per_layer, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32
        writer.add_key_value(f.name, val, vtype, sub_type=sub)
    rng = np.random.default_rng(11)
    for t in reader.tensors:
        data = np.asarray(t.data)
        parts = t.name.split(".")  # blk.N.<kind>.<part>
        kind, part = (parts[2], parts[-1]) if len(parts) == 4 else ("", "")
        # rows of each projection's output (the weights' ne[1], the biases' ne[0])
        kvh, qh = (kv_heads[int(parts[1])], heads[int(parts[1])]) if kind else (0, 0)
        out_rows = {"attn_q": dk * qh, "attn_k": dk * kvh, "attn_v": dv * kvh, "attn_qkv": dk * (qh + 2 * kvh)}
        if kind in out_rows and part in ("weight", "bias"):
            shape = (out_rows[kind], data.shape[1]) if part == "weight" else (out_rows[kind],)
            data = (rng.standard_normal(shape) * data.std()).astype(np.float32)
        elif t.name == "rope_freqs.weight":  # a factor per rotated pair
            data = np.resize(data, dk // 2).astype(np.float32)
        elif kind == "attn_output" and part == "weight":
            data = (rng.standard_normal((data.shape[0], dv * qh)) * data.std()).astype(np.float32)
        writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _weighty_sinks(path: Path) -> None:
    """The model's attention sinks (if any), in place: SINK_LOGIT +- 1.5, a different one per head"""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path, "r+")
    rng = np.random.default_rng(7)
    for t in reader.tensors:
        if t.name.endswith("attn_sinks.weight"):
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, (path.name, t.name, t.tensor_type)
            t.data[...] = SINK_LOGIT + rng.uniform(-1.5, 1.5, t.data.shape)
    reader.data.flush()


def _arch_enum_names() -> dict:
    """LLM_ARCH_* -> name, for every architecture of the pinned llama.cpp (LLM_ARCH_NAMES in src/llama-arch.cpp)"""
    text = ARCH_SOURCE.read_text()
    block = text[text.index("LLM_ARCH_NAMES"):]
    block = block[:block.index("};")]
    return {e: n for e, n in re.findall(r'\{\s*(LLM_ARCH_\w+),\s*"([^"]+)"\s*\}', block) if n != "(unknown)"}


def all_arch_names() -> list:
    """Every architecture name of the pinned llama.cpp."""
    return list(_arch_enum_names().values())


def not_built_reasons() -> dict:
    """name -> why llama.cpp's generator builds no model of it, in upstream's words: the comments of
    its arch_supported() (tests/test-llama-archs.cpp; not the backend-specific #ifdef ones) and the
    architectures its model saver cannot write (src/llama-model-saver.cpp)"""
    names = _arch_enum_names()
    gen = GENERATOR_SOURCE.read_text()
    body = gen[gen.index("static bool arch_supported"):]
    body = re.sub(r"#ifdef.*?#endif", "", body[:body.index("\n}\n")], flags=re.S)
    out = {}
    for cond, why in re.findall(r"if \(([^{]*?)\)\s*\{\s*return false;[ \t]*(?://\s*([^\n]*))?", body):
        for e in re.findall(r"LLM_ARCH_\w+", cond):
            if e in names:
                out[names[e]] = f"upstream: {why.strip()}" if why.strip() else "upstream gives no reason"
    saver = SAVER_SOURCE.read_text()
    block = saver[saver.index("bool llama_model_saver_supports_arch"):]
    for e in re.findall(r"LLM_ARCH_\w+", block[:block.index("return false")]):
        out.setdefault(names[e], "llama.cpp's model saver cannot write it")
    return out


# -- one model ------------------------------------------------------------------------------------

def _check_model(path: Path) -> dict:
    import numpy as np

    from sparq_cpp import shapes, sparq as sq
    from sparq_cpp._lib import llama_cpp
    from sparq_cpp.sparq import SparqParams
    from sparq_util import decode, prefill

    warnings_seen = []

    @llama_cpp.llama_log_callback
    def _log(level, text, _ud):
        if level == 3 and b"sparq" in text:  # GGML_LOG_LEVEL_WARN from our library
            warnings_seen.append(text.decode(errors="replace").strip())

    if not os.environ.get("ARCH_CHECK_LOG"):  # ARCH_CHECK_LOG=1: libllama's whole log on stderr
        llama_cpp.llama_log_set(_log, None)

    mp = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        return {"error": "the model did not load"}
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    desc = C.create_string_buffer(256)
    llama_cpp.llama_model_meta_val_str(model, b"general.architecture", desc, 256)
    n_layer = llama_cpp.llama_model_n_layer(model)
    # learned absolute positions (gpt2, starcoder): as many as the training context, no more
    n_ctx_train = llama_cpp.llama_model_n_ctx_train(model)
    learned_pos = _has_tensor(path, b"position_embd.weight")
    n_prompt = min(N_PROMPT, n_ctx_train - N_GEN - 110) if learned_pos else N_PROMPT
    rng = np.random.default_rng(0)
    toks = [int(t) for t in rng.integers(0, n_vocab, n_prompt + 4 * N_GEN)]
    # SparQ reading every position: k more than any sequence here holds, fewer than the cache's cells
    exact = SparqParams(k=n_prompt + 3 * N_GEN + 50, l=0, min_ctx=0)

    ctxs = []

    def new_ctx(fa=True, cache="f16", n_seq=1, unified=False, sparq=None):
        """a context (freed at the end unless free() frees it first), with SparQ set when given"""
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = (n_ctx_train if learned_pos else N_CTX) * n_seq
        p.n_batch = p.n_ubatch = 512
        p.n_seq_max, p.kv_unified = n_seq, unified
        p.n_threads = p.n_threads_batch = 1  # two models are checked at a time, one per core
        p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if fa else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.type_k = p.type_v = {"f16": 1, "q8_0": 8}[cache]
        ctx = llama_cpp.llama_init_from_model(model, p)
        if not ctx:
            raise RuntimeError("llama_init_from_model failed")
        ctxs.append(ctx)
        if sparq is not None:
            set_sparq(ctx, sparq)
        return ctx

    def free(*cs):
        for c in cs:
            llama_cpp.llama_free(c)
            ctxs.remove(c)

    def set_sparq(ctx, params):
        warnings_seen.clear()
        return sq.apply(ctx, params)

    def gen(ctx, start, seq=0, offset=0):
        """decode toks[start:start+N_GEN] one at a time at positions start-offset...: their logits"""
        return np.array([decode(ctx, [(toks[p], p - offset, seq)], n_vocab)[0] for p in range(start, start + N_GEN)])

    def rounding_bound(on, off):
        """BOUND_FACTOR x dense's flash attention on/off difference (+ 1e-6 of the logits' scale,
        for a zero difference)"""
        return BOUND_FACTOR * float(np.abs(on - off).max()) + 1e-6 * float(np.abs(on).max())

    def record(name, sparq_logits, dense_logits, bound):
        diff = float(np.abs(sparq_logits - dense_logits).max())
        checks[name] = {"diff": diff, "bound": bound, "ok": bool(np.isfinite(sparq_logits).all() and diff <= bound)}

    def against_dense(name, run, **ctx_kw):
        """run(ctx) -> logits in fresh contexts: dense with flash attention on and off, then SparQ at
        k >= context; the SparQ logits recorded against dense's within the rounding bound"""
        on, off, sparq = (run(new_ctx(fa=fa, sparq=p, **ctx_kw)) for fa, p in ((True, None), (False, None), (True, exact)))
        record(name, sparq, on, rounding_bound(on, off))
        free(*ctxs[-3:])

    out = {"arch": desc.value.decode(), "file": path.name, "n_layer": n_layer, "n_prompt": n_prompt, "checks": {}}
    checks = out["checks"]
    try:
        # dense with flash attention on and off, F16 cache, decoding alike: the rounding bound at
        # each compared token
        pair = [new_ctx(fa=fa) for fa in (True, False)]
        for c in pair:
            prefill(c, 0, toks[:n_prompt], n_vocab, logits=False)

        def dense_gen(start, offset=0):
            on, off = (gen(c, start, offset=offset) for c in pair)
            return on, rounding_bound(on, off)

        dense, bound = dense_gen(n_prompt)
        out["scale"] = float(np.abs(dense).max())

        # SparQ set before the prefill (the graphs write the mirror), k >= context
        s = new_ctx()
        try:
            status = set_sparq(s, exact)
        except sq.SparqError as e:
            out["refused"] = str(e)
            return out
        out["status"] = status.name
        out["warnings"] = list(warnings_seen)
        out["reason"] = sq.dense_reason()
        out["layers_sparq"] = sq.stats(s)["n_layers_sparq"]
        out["layers_attn"] = sq.stats(s)["n_layers"]  # with a KV cache (a hybrid's recurrent layers have none)
        if status != sq.SparqStatus.OK:
            return out
        # the layers of the cache SparQ can serve (not those in a sliding-window or chunked cache)
        out["layers_cache"] = len(sq.plan(s, exact, n_prompt))
        prefill(s, 0, toks[:n_prompt], n_vocab, logits=False)
        sq.reset_stats(s)
        record("exact", gen(s, n_prompt), dense, bound)
        # the warnings came once, at the setting: none from the prefill or the decoded tokens
        checks["exact"]["ok"] &= warnings_seen == out["warnings"]
        st = sq.stats(s)
        checks["exact"]["sparq_tokens"] = st["n_tokens_sparq"]
        checks["exact"]["ok"] &= st["n_tokens_sparq"] == N_GEN

        # 1/8 on the same context, the next tokens, against dense decoding them too
        budget = SparqParams(compression=0.125, min_ctx=0)
        set_sparq(s, budget)
        sq.reset_stats(s)
        sp = gen(s, n_prompt + N_GEN)
        de, _ = dense_gen(n_prompt + N_GEN)
        st = sq.stats(s)
        nmse = float(((sp - de) ** 2).sum() / (de ** 2).sum())
        # the plan (llama_sparq_plan) of each decoded token's length counts the bytes the decode counted
        start = n_prompt + N_GEN
        planned = sum(p["bytes"] for pos in range(start, start + N_GEN)
                      for p in sq.plan(s, budget, pos + 1) if p["path"] != "dense")
        checks["budget"] = {"nmse": nmse, "bound": BUDGET_NMSE, "read_fraction": st["read_fraction"],
                            "sparq_tokens": st["n_tokens_sparq"], "planned_bytes": planned,
                            "ok": bool(np.isfinite(sp).all() and nmse <= BUDGET_NMSE and st["n_tokens_sparq"] == N_GEN
                                       and st["n_layers_sparq"] == out["layers_sparq"]
                                       and abs(planned - st["bytes_attn_sparq"]) <= 1e-9 * st["bytes_attn_sparq"])}
        free(s)

        # the portable graph of standard ops (what GPU backends run) with mean reallocation, k >=
        # context: alpha (s_hat over every row, and the sinks') must be 1 for it to equal dense
        s = new_ctx(sparq=SparqParams(k=exact.k, l=0, min_ctx=0, path="ops", realloc=True))
        prefill(s, 0, toks[:n_prompt], n_vocab, logits=False)
        sq.reset_stats(s)
        record("ops", gen(s, n_prompt), dense, bound)
        checks["ops"]["ok"] &= sq.stats(s)["n_layers_ops"] == out["layers_sparq"]
        free(s)

        # the dense context's sequence state into a SparQ context (the mirror rebuilt from it)
        n_done = n_prompt + 2 * N_GEN
        s = new_ctx(sparq=exact)
        shapes.load_seq_state(s, shapes.seq_state(pair[0]))
        record("state", gen(s, n_done), *dense_gen(n_done))

        # a K-shift: the first 100 positions removed, the rest moved back, in every context
        if llama_cpp.llama_memory_can_shift(llama_cpp.llama_get_memory(pair[0])):
            n_done += N_GEN
            for c in (s, *pair):
                m = llama_cpp.llama_get_memory(c)
                llama_cpp.llama_memory_seq_rm(m, 0, 0, 100)
                llama_cpp.llama_memory_seq_add(m, 0, 100, -1, -100)
            record("shift", gen(s, n_done, offset=100), *dense_gen(n_done, offset=100))
        free(s, *pair)

        # a q8_0 cache, dense's prepared as SparQ prepares its own (without llama.cpp's Hadamard
        # rotation of K). Dense's flash attention rounds Q to q8_0 for its K products, SparQ's op
        # keeps Q in F32: the bound is the F16 one's or, where larger, BOUND_FACTOR x dense q8_0's
        # difference from dense F16 (the quantization's own size; a wrong row read is larger)
        try:
            dq = new_ctx(cache="q8_0")
        except RuntimeError:  # llama.cpp takes a q8_0 cache only for head sizes of whole blocks
            out["skipped"] = "q8_0: llama.cpp has no q8_0 cache for this head size"
        else:
            sq.prepare_cache(dq)
            sq8 = new_ctx(cache="q8_0", sparq=exact)
            for c in (dq, sq8):
                prefill(c, 0, toks[:n_prompt], n_vocab, logits=False)
            dense_q8 = gen(dq, n_prompt)
            record("q8_0", gen(sq8, n_prompt), dense_q8,
                   max(bound, BOUND_FACTOR * float(np.abs(dense_q8 - dense).max())))
            free(dq, sq8)

        # two sequences in one cache, of different lengths, decoded in one batch
        short = n_prompt - 40

        def two_seqs(c):
            prefill(c, 0, toks[:n_prompt], n_vocab, logits=False)
            prefill(c, 1, toks[N_GEN:N_GEN + short], n_vocab, logits=False)
            return np.array([decode(c, [(toks[n_prompt + i], n_prompt + i, 0), (toks[short + i], short + i, 1)], n_vocab)
                             for i in range(N_GEN)])

        against_dense("two_seqs", two_seqs, n_seq=2)

        # a sequence copy in one cache shared by both sequences, then the copy decoded
        def seq_cp(c):
            prefill(c, 0, toks[:n_prompt], n_vocab, logits=False)
            llama_cpp.llama_memory_seq_cp(llama_cpp.llama_get_memory(c), 0, 1, -1, -1)
            return gen(c, n_prompt, seq=1)

        against_dense("seq_cp", seq_cp, n_seq=2, unified=True)
        return out
    finally:
        for c in ctxs:
            llama_cpp.llama_free(c)
        llama_cpp.llama_model_free(model)


def _has_tensor(path: Path, name: bytes) -> bool:
    """whether the GGUF file has a tensor of this name (its header alone is read)"""
    from sparq_cpp import shapes

    class _Params(C.Structure):
        _fields_ = [("no_alloc", C.c_bool), ("ctx", C.c_void_p)]

    init = shapes._fn("gguf_init_from_file", C.c_void_p, C.c_char_p, _Params)
    find = shapes._fn("gguf_find_tensor", C.c_int64, C.c_void_p, C.c_char_p)
    g = init(str(path).encode(), _Params(True, None))
    try:
        return find(g, name) >= 0
    finally:
        shapes._gguf_free(g)


def worker(paths: list) -> None:
    """One JSON line per model on stdout (stderr: libllama's log)."""
    for p in paths:
        t0 = time.perf_counter()
        print(json.dumps({"start": Path(p).name}), flush=True)
        try:
            r = _check_model(Path(p))
        except Exception as e:  # the check failed for this model: reported, the next one runs
            r = {"error": repr(e)}
        r["file"], r["seconds"] = Path(p).name, round(time.perf_counter() - t0, 2)
        print(json.dumps(r), flush=True)


def run_all(paths: list, jobs: int = 2, timeout: float = 600) -> dict:
    """file name -> result, each model checked in a worker process (jobs in parallel); a model whose
    process dies is reported with the exit status, and its worker goes on with the next model."""
    todo = [str(p) for p in paths]
    shards = [todo[i::jobs] for i in range(jobs)]
    results: dict = {}
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def run_shard(shard):
        while shard:
            proc = subprocess.run([sys.executable, __file__, "--worker", *shard], capture_output=True, text=True,
                                  timeout=timeout, env=env)
            started = None
            for line in proc.stdout.splitlines():
                if not line.startswith("{"):
                    continue  # a model's own output on stdout
                r = json.loads(line)
                if "start" in r:
                    started = r["start"]
                else:
                    results[r["file"]] = r
                    started = None
            done = {Path(s).name for s in shard if Path(s).name in results}
            if started is not None:  # the process died in this model
                results[started] = {"file": started, "error": f"the process died (exit status {proc.returncode}): "
                                                              f"{_last_error(proc.stderr)}"}
                done.add(started)
            rest = [s for s in shard if Path(s).name not in done]
            if len(rest) == len(shard):
                raise RuntimeError(f"worker made no progress: {proc.stderr[-2000:]}")
            shard = rest

    threads = [threading.Thread(target=run_shard, args=(s,)) for s in shards if s]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _last_error(stderr: str) -> str:
    """the dead process's last assertion or error line (else its last line)"""
    lines = [l for l in stderr.splitlines() if l.strip()]
    errors = [l for l in lines if "GGML_ASSERT" in l or "error" in l.lower()]
    return (errors or lines or [""])[-1].strip()


# -- the table --------------------------------------------------------------------------------------

def table(results: dict) -> str:
    """docs/architectures.md from the results of every generated model: one row per architecture
    of the pinned llama.cpp."""
    by_arch: dict = {}
    for r in results.values():
        by_arch.setdefault(r.get("arch") or r["file"].rsplit("-", 1)[0], []).append(r)
    lines = [
        "# SparQ on llama.cpp's architectures",
        "",
        "Generated by `python tests/arch_check.py --table docs/architectures.md` from the checks of",
        "`tests/test_archs.py` (do not edit by hand; the test fails when this file and the checks",
        "disagree). Each architecture of the pinned llama.cpp, as a small random-weight model from",
        "llama.cpp's own test generator (`test-llama-archs -o`, seed and scale in `tests/arch_check.py`):",
        "the attention layers SparQ takes of the model's layers, and why the others decode densely.",
        "Where SparQ runs, it is dense's output to rounding at k >= context on an F16 and a q8_0 cache,",
        "through the fused op and the portable graph, with two sequences, after a sequence copy, a state",
        "load and a K-shift, and finite and near dense at 1/8.",
        "",
        "| architecture | model | SparQ layers | dense layers and why |",
        "|---|---|---:|---|",
    ]
    not_built = not_built_reasons()
    for name in all_arch_names():
        rows = by_arch.get(name)
        if not rows:
            why = not_built.get(name, "skipped by its model loop")
            lines.append(f"| {name} | - | - | not built by llama.cpp's test generator ({why}) |")
            continue
        for r in sorted(rows, key=lambda r: r["file"]):
            variant = r["file"].rsplit("-", 1)[1].removesuffix(".gguf")
            if r["file"] in RESIZED:
                dk, dv, *per_layer = RESIZED[r["file"]][1:]
                variant += f", K/V heads {dk}/{dv}" + "".join(f", {what} heads {n} per layer" for what, n in zip(("KV", "query"), per_layer)) + " (made here)"
            if "error" in r:
                lines.append(f"| {name} | {variant} | - | error: {r['error']} |")
                continue
            taken = f"{r.get('layers_sparq', 0)} of {r['n_layer']}"
            why = _why(r)
            lines.append(f"| {name} | {variant} | {taken} | {why} |")
    return "\n".join(lines) + "\n"


def _why(r: dict) -> str:
    if "refused" in r:
        return r["refused"]
    if r.get("status") == "DENSE":
        return r["reason"]
    parts = [r["reason"].split("; dense: ", 1)[1]] if r["reason"] else []  # the layers of the cache left dense
    n_window = r["layers_attn"] - r["layers_cache"]
    if n_window > 0:
        parts.append(f"{n_window} sliding-window or chunked layer{'s' if n_window > 1 else ''} "
                     "(their own short cache: dense by design)")
    n_recurrent = r["n_layer"] - r["layers_attn"]
    if n_recurrent > 0:
        parts.append(f"{n_recurrent} recurrent layer{'s' if n_recurrent > 1 else ''} (no attention)")
    if "skipped" in r:
        parts.append(r["skipped"])
    return "; ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", nargs="+", metavar="GGUF", help="check these models, one JSON line each")
    ap.add_argument("--table", metavar="FILE", help="check every generated model and write the table to FILE")
    ap.add_argument("--arch", help="only models whose file name starts with this (not with --table)")
    args = ap.parse_args(argv)
    if args.arch and args.table:
        ap.error("--table needs every model: drop --arch")
    if args.worker:
        worker(args.worker)
        return 0
    paths = generate()
    if args.arch:
        paths = [p for p in paths if p.name.startswith(args.arch)]
    results = run_all(paths)
    for f in sorted(results):
        print(json.dumps(results[f]))
    if args.table:
        Path(args.table).write_text(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
