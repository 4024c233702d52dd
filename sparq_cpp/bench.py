"""``sparq-cpp bench``: decode speed, dense against SparQ, side by side in one run.

For each depth the essays are prefilled once in each of two contexts of the same model and
library: one with flash attention off (V transposed, llama-cpp-python's default) and one with it
on; each SparQ setting has a context of its own, like the second, set before its first decode
and given that one's cache state (with a model shape, whose caches are gigabytes, the SparQ
settings are switched on the second instead). Then, for every repetition, each setting decodes
N tokens one at a time from the same cache state (the generated cells are removed after each
run), the settings in a rotating order so that drifts of a shared machine hit them alike. Dense
is the better of the two dense paths at each depth. Reported: medians, the spread (min..max),
and the ratio of medians against the best dense.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import List, Optional, Tuple

from ._lib import llama_cpp
from .kv_types import cache_type, v_needs_flash_attn
from .runinfo import run_info, save_outputs
from .budget import parse_compression
from . import sparq
from .sparq import SPARQ_PATHS, SparqParams


def parse_setting(text: str) -> Tuple[str, Optional[dict]]:
    """'dense', '1/8' (compression), '0.125', 'k=64' -> (label, set_sparq kwargs or None); a
    suffix ':ops' or ':fused' picks how SparQ is computed (sparq_path), e.g. '1/8:ops' for the
    portable graph of standard ggml ops on the CPU; ':float' the float K^T mirror (sparq_mirror),
    e.g. '1/8:float'."""
    t = text.strip()
    if t == "dense":
        return "dense", None
    t, *suffixes = t.split(":")
    extra = {}
    for sfx in suffixes:
        if sfx in SPARQ_PATHS:
            extra["path"] = sfx
        elif sfx == "float":
            extra["mirror"] = sfx
        else:
            raise ValueError(f"setting {text!r}: a suffix must be one of :{', :'.join(SPARQ_PATHS)}, :float")
    suffix = "".join(f" {sfx}" for sfx in suffixes)
    if t.startswith("k="):
        try:
            k = int(t[2:])
        except ValueError:
            raise ValueError(f"setting {text!r}: k= takes an integer, such as k=64") from None
        label, kw = f"k={k}{suffix}", {"k": k, **extra}
    else:
        label, kw = f"{t}{suffix}", {"compression": parse_compression(t), **extra}
    SparqParams(**kw)  # the same checks as everywhere: ValueError naming the setting
    return label, kw


class DecodeContext:
    """A model's context with its prefilled depth, decoded one token at a time through the C API
    (used by bench and eval). ``llm``: a Llama, whose context this is; or ``ctx``, a bare context
    (a shape's, sparq_cpp.shapes) whose cache ``fill`` fills."""

    def __init__(self, llm=None, ctx=None):
        self.llm = llm
        self.ctx = llm._ctx.ctx if llm is not None else ctx
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.depth = 0

    def prefill(self, tokens: List[int]) -> None:
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()
        if tokens:
            self.llm.eval(tokens)
        self.depth = len(tokens)

    def fill(self, depth: int, seed: int = 0) -> None:
        """The cache holds depth positions of random K and V rows, as after a prefill of depth
        tokens (sparq_cpp.shapes.fill_random)."""
        from .shapes import fill_random

        sparq.apply(self.ctx, None)
        llama_cpp.llama_memory_clear(self.mem, True)
        self.layout = fill_random(self.ctx, depth, seed) if depth else None
        self.depth = depth

    def set_sparq(self, params: Optional[SparqParams]) -> None:
        sparq.apply(self.ctx, params)

    def sparq_stats(self, reset: bool = False) -> dict:
        return sparq.stats(self.ctx, reset)

    def prompt(self, tokens: List[int]) -> float:
        """tokens/s processing these as one prompt batch after the prefill; the cache is restored after."""
        arr = (llama_cpp.llama_token * len(tokens))(*tokens)
        t0 = time.perf_counter()
        if llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(arr, len(tokens))) != 0:
            raise RuntimeError("llama_decode failed")
        llama_cpp.llama_synchronize(self.ctx)
        dt = time.perf_counter() - t0
        llama_cpp.llama_memory_seq_rm(self.mem, 0, self.depth, -1)
        return len(tokens) / dt

    def decode(self, tokens: List[int]) -> float:
        """tokens/s decoding these one at a time after the prefill; the cache is restored after."""
        one = (llama_cpp.llama_token * 1)()
        t0 = time.perf_counter()
        for t in tokens:
            one[0] = t
            if llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(one, 1)) != 0:
                raise RuntimeError("llama_decode failed")
        llama_cpp.llama_synchronize(self.ctx)
        dt = time.perf_counter() - t0
        llama_cpp.llama_memory_seq_rm(self.mem, 0, self.depth, -1)
        return len(tokens) / dt

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
        elif self.ctx:
            llama_cpp.llama_free(self.ctx)
        self.ctx = None


def check(model: str, depths: List[int], n_gen: int, n_prompt: int = 0) -> int:
    """Before any context is made: the model resolves to a GGUF file, and the essays give tokens
    enough for the deepest depth plus the timed tokens (ValueError otherwise). Returns that count."""
    from llama_cpp._internals import LlamaModel

    from .models import essays_text, model_path

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True  # the tokenizer alone: no weights, no context
    vocab = LlamaModel(path_model=model_path(model), params=params, verbose=False)
    try:
        n = len(vocab.tokenize(essays_text().encode(), add_bos=True, special=False))
    finally:
        vocab.close()
    need = max(depths) + max(n_gen, n_prompt)
    if need > n:
        raise ValueError(f"depth {max(depths)} + {max(n_gen, n_prompt)} timed tokens needs {need} tokens of text; "
                         f"the essays give {n} with this model's tokenizer: use a smaller -d")
    return n


class _Contexts:
    """The contexts a bench compares, over one model: flash attention off (dense only; absent where
    the cache type needs it on: llama.cpp stores a quantized V only with it), on (dense), for
    another cache type than f16 the f16 cache's two dense paths (what a user could run instead, so
    they count for "best dense"), and for a model file one per SparQ setting, made as "on" and set
    at once. ``to_depth`` brings each to a depth.

    A model file's contexts keep their settings for the whole bench, as a user's would (on Mesa
    22.3's lavapipe a settings change after a decode can corrupt the heap, docs/results.md). A
    shape's SparQ rows switch settings on "on" instead (``switched``): its caches are gigabytes
    each (4 GiB for llama3-8b at 32k), one per setting would not fit where two do."""

    def __init__(self, model: Optional[str], shape, common: dict, cache_type_k: str, cache_type_v: str,
                 weights: str, sparq_settings: List[Tuple[str, dict]]):
        self.model, self.common, self.ctxs = model, common, {}
        self.shape_model = None
        if shape is not None:
            from .shapes import ShapeModel

            self.shape_model = ShapeModel(shape, weights, common["n_gpu_layers"])
        specs = [] if v_needs_flash_attn(cache_type_v) else [("off", False, cache_type_k, cache_type_v)]
        specs.append(("on", True, cache_type_k, cache_type_v))
        if (cache_type_k, cache_type_v) != ("f16", "f16"):
            specs += [("f16 off", False, "f16", "f16"), ("f16 on", True, "f16", "f16")]
        self.switched = shape is not None
        self.sparq = {}  # name -> settings, of the contexts set once
        for lab, kw in sparq_settings if shape is None else []:
            specs.append((f"SparQ {lab}", True, cache_type_k, cache_type_v))
            self.sparq[f"SparQ {lab}"] = kw
        try:
            for name, fa, tk, tv in specs:
                self.ctxs[name] = self._context(fa, tk, tv)
                if name in self.sparq:
                    self.ctxs[name].set_sparq(SparqParams(**self.sparq[name]))
        except BaseException:
            self.close()
            raise
        # as a sparq_* argument to the constructor would: the dense context's cache is then laid out
        # as the SparQ contexts' are (no Hadamard rotation of a quantized cache), and they take its state
        sparq.prepare_cache(self.ctxs["on"].ctx)

    def _context(self, fa: bool, tk: str, tv: str) -> "DecodeContext":
        common = self.common
        if self.shape_model is None:
            from .llama import Llama

            return DecodeContext(Llama(self.model, flash_attn=fa, **dict(common, type_k=cache_type(tk), type_v=cache_type(tv))))
        from llama_cpp._utils import suppress_stdout_stderr

        p = llama_cpp.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch = common["n_ctx"], common["n_batch"], common["n_ubatch"]
        p.n_seq_max = 1
        p.n_threads = p.n_threads_batch = common["n_threads"]
        p.flash_attn_type = 1 if fa else 0
        p.type_k, p.type_v = cache_type(tk), cache_type(tv)
        p.no_perf = True
        with suppress_stdout_stderr():
            ctx = llama_cpp.llama_init_from_model(self.shape_model.model, p)
        if not ctx:
            raise MemoryError(f"libllama could not create a context of {common['n_ctx']} tokens for this "
                              "shape (its log says why; most often memory): use a smaller -d")
        return DecodeContext(ctx=ctx)

    def to_depth(self, depth: int, toks: Optional[List[int]]) -> None:
        from .shapes import load_seq_state, seq_state

        for name, c in self.ctxs.items():
            if name in self.sparq:
                continue
            if self.shape_model is None:
                c.prefill(toks[:depth])
            else:
                c.fill(depth)
        # the SparQ contexts take the dense one's cache: the same K and V for every row
        state = seq_state(self.ctxs["on"].ctx) if depth and self.sparq else None
        for name in self.sparq:
            c = self.ctxs[name]
            llama_cpp.llama_memory_clear(c.mem, True)
            if c.llm is not None:
                c.llm.reset()
            if state is not None:
                load_seq_state(c.ctx, state)
            c.depth = depth

    def context(self, label: str) -> "DecodeContext":
        """The context of a SparQ row: its own, or "on" where the settings are switched."""
        return self.ctxs["on"] if self.switched else self.ctxs[label]

    def kv_bytes(self, n_ctx: int) -> Optional[int]:
        """A context's K and V bytes for n_ctx cells (shapes: from the cache layout after a fill)."""
        lay = getattr(self.ctxs["on"], "layout", None)
        return None if lay is None else n_ctx * lay.cell_bytes()

    def close(self) -> None:
        for c in self.ctxs.values():
            c.close()
        if self.shape_model is not None:
            self.shape_model.close()


def run(model: Optional[str], depths: List[int], settings: List[str], threads: int, n_gen: int, reps: int,
        out: Optional[str], plot: bool = True, progress: bool = True,
        cache_type_k: str = "f16", cache_type_v: str = "f16", n_gpu_layers: int = 0,
        n_prompt: int = 0, fmt: str = "md", shape: Optional[str] = None, weights: str = "q4_0") -> dict:
    """The bench on a model file (``model``), or on a model shape with random weights built in
    memory (``shape``, as --shape takes it; ``weights`` their type), its cache filled to each
    depth without a prefill (sparq_cpp.shapes)."""
    import random
    import resource

    from tqdm import tqdm

    parsed = [parse_setting(s) for s in settings]
    if ("dense", None) not in parsed:
        parsed.insert(0, ("dense", None))
    shp = None
    if shape is not None:
        from .shapes import parse_shape

        label, shp = parse_shape(shape)
    n_ctx = max(depths) + max(n_gen, n_prompt) + 64
    # a shape's contexts are never prefilled: their compute buffers sized for one ubatch of the
    # prompt timing at most (at 32k, a 512-token ubatch of dense attention without flash attention
    # would take gigabytes)
    n_ubatch = 512 if shp is None else max(1, min(512, n_prompt))
    common = dict(n_ctx=n_ctx, n_batch=max(2048, n_prompt) if shp is None else max(1, n_prompt), n_ubatch=n_ubatch,
                  n_threads=threads, n_threads_batch=threads, n_gpu_layers=n_gpu_layers, verbose=False)
    cs = _Contexts(model, shp, common, cache_type_k, cache_type_v, weights,
                   [(lab, kw) for lab, kw in parsed if kw is not None])
    try:
        if shp is None:
            from .models import essays_text

            toks = cs.ctxs["on"].llm.tokenize(essays_text().encode())
            if len(toks) < max(depths) + max(n_gen, n_prompt):
                raise ValueError(f"the essays give {len(toks)} tokens, fewer than depth {max(depths)} + {max(n_gen, n_prompt)}")
            weight_bytes_tok = int(llama_cpp.llama_model_size(cs.ctxs["on"].llm.model))
        else:
            rnd = random.Random(0)
            toks = None
            weight_bytes_tok = cs.shape_model.weight_bytes_per_token

        # (label, context, sparq kwargs); dense appears twice: flash attention off and on
        two = (cache_type_k, cache_type_v) != ("f16", "f16")
        kv = "" if not two else (cache_type_k if cache_type_k == cache_type_v else f"{cache_type_k}/{cache_type_v}") + " "
        runs = [(f"dense {kv}FA off", cs.ctxs["off"], None)] if "off" in cs.ctxs else []
        runs += [(f"dense {kv}FA on", cs.ctxs["on"], None)]
        if two:
            runs += [("dense f16 FA off", cs.ctxs["f16 off"], None), ("dense f16 FA on", cs.ctxs["f16 on"], None)]
        runs += [(f"SparQ {lab}", cs.context(f"SparQ {lab}"), kw) for lab, kw in parsed if kw is not None]

        rows = []
        what = model if shp is None else f"shape {label}"
        bar = tqdm(total=len(depths) * reps * len(runs), desc=f"bench {what}", file=sys.stderr, disable=not progress)
        for depth in depths:
            bar.set_postfix_str(f"depth {depth}: " + ("prefill" if shp is None else "fill"))
            cs.to_depth(depth, toks)
            if shp is None:
                gen, prompt = toks[depth:depth + n_gen], toks[depth:depth + n_prompt]
            else:
                gen = [rnd.randrange(shp.vocab) for _ in range(n_gen)]
                prompt = [rnd.randrange(shp.vocab) for _ in range(n_prompt)]
            times = {lab: [] for lab, _, _ in runs}
            pp_times = {lab: [] for lab, _, _ in runs}
            st, nodes = {}, {}
            for rep in range(reps):
                order = runs[rep % len(runs):] + runs[:rep % len(runs)]
                for lab, c, kw in order:
                    bar.set_postfix_str(f"depth {depth}: {lab}")
                    if cs.switched and c is cs.ctxs["on"]:
                        c.set_sparq(SparqParams(**kw) if kw else None)
                    c.decode(gen[:1])  # warm-up: a re-reserve after a settings change, the mirror's rebuild
                    c.sparq_stats(reset=True)
                    times[lab].append(c.decode(gen))
                    nodes[lab] = sparq.graph_nodes(c.ctx)  # the last token's graph
                    if kw:
                        st[lab] = c.sparq_stats()
                    if prompt:
                        pp_times[lab].append(c.prompt(prompt))
                    bar.update(1)
            med = {lab: statistics.median(v) for lab, v in times.items()}
            best = max(med[lab] for lab, _, kw in runs if kw is None)
            pp_med = {lab: statistics.median(v) for lab, v in pp_times.items() if v}
            for lab, _, kw in runs:
                row = {"depth": depth, "setting": lab, "tokens_per_s": med[lab],
                       "min": min(times[lab]), "max": max(times[lab]), "runs": times[lab],
                       "x_best_dense": med[lab] / best, "sparq": kw, **nodes[lab]}
                if kw:  # below min_ctx SparQ falls back to dense: say so in the table
                    s = st[lab]
                    row["sparq_token_fraction"] = s["n_tokens_sparq"] / len(gen)
                    row["read_fraction"] = s["read_fraction"]
                    row["sparq_extra_bytes"] = s["extra_bytes"]
                    if s["n_tokens_sparq"] and s["n_layers_sparq"] == s["n_layers"]:
                        # bytes a dense token reads over what a SparQ token reads: weights + attention
                        ad = s["bytes_attn_dense"] / s["n_tokens_sparq"]
                        asp = s["bytes_attn_sparq"] / s["n_tokens_sparq"]
                        row["bytes_limit"] = (weight_bytes_tok + ad) / (weight_bytes_tok + asp)
                if pp_med:
                    pp_best = max(pp_med[lab2] for lab2, _, kw2 in runs if kw2 is None)
                    row.update(pp_tokens_per_s=pp_med[lab], pp_runs=pp_times[lab], pp_x_best_dense=pp_med[lab] / pp_best)
                rows.append(row)
        bar.close()
        if cs.switched:
            cs.ctxs["on"].set_sparq(None)
        kvb = cs.kv_bytes(n_ctx)
        extra = max((r.get("sparq_extra_bytes") or 0 for r in rows), default=0)
        memory = {"weights_bytes": cs.shape_model.weight_bytes if shp is not None else weight_bytes_tok,
                  "weight_bytes_per_token": weight_bytes_tok, "n_ctx": n_ctx, "kv_bytes_per_context": kvb,
                  "n_contexts": len(cs.ctxs), "sparq_extra_bytes": extra,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    finally:
        cs.close()

    result = {
        **run_info(), "model": model if shp is None else None, "threads": threads, "n_gpu_layers": n_gpu_layers,
        "n_gen": n_gen, "n_prompt": n_prompt, "reps": reps, "depths": depths,
        "cache_type_k": cache_type_k, "cache_type_v": cache_type_v,
        "settings": [lab for lab, _, _ in runs], "rows": rows, "memory": memory,
    }
    if shp is not None:
        from dataclasses import asdict

        result.update(shape=label, shape_sizes=asdict(shp), weights=weights, random_weights=True)
    print(format_result(result, fmt))
    fallback = sorted({r["setting"] for r in rows if r.get("sparq_token_fraction") == 0})
    if fallback:
        print(f"bench: {', '.join(fallback)} decoded densely at depth(s) "
              f"{', '.join(str(r['depth']) for r in rows if r['setting'] == fallback[0] and r['sparq_token_fraction'] == 0)}: "
              "the sequence was shorter than SparQ's min_ctx (the length from which it replaces dense attention)",
              file=sys.stderr)
    save_outputs(result, out, _plot if plot else None)
    return result


def format_result(result: dict, fmt: str = "md") -> str:
    """The table as llama-bench prints its own: md (default), csv, or json (the whole result)."""
    if fmt == "json":
        import json

        return json.dumps(result, indent=1)
    if fmt == "csv":
        cols = ["depth", "setting", "tokens_per_s", "min", "max", "x_best_dense", "bytes_limit", "read_fraction",
                "sparq_token_fraction", "graph_nodes", "graph_compute_nodes"]
        if any("pp_tokens_per_s" in r for r in result["rows"]):
            cols += ["pp_tokens_per_s", "pp_x_best_dense"]
        lines = [",".join(cols)]
        for r in result["rows"]:
            lines.append(",".join("" if r.get(c) is None else f'"{r[c]}"' if isinstance(r[c], str) else str(r[c])
                                  for c in cols))
        return "\n".join(lines)
    return table(result)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def describe_model(result: dict) -> str:
    if result.get("shape"):
        from .shapes import Shape

        return (f"shape {result['shape']} ({Shape(**result['shape_sizes']).describe()}), RANDOM {result['weights']} "
                "weights built in memory: speed only")
    return f"model {result['model']}"


def table(result: dict) -> str:
    pp = any("pp_tokens_per_s" in r for r in result["rows"])
    lim = any(r.get("bytes_limit") for r in result["rows"])
    nodes = all("graph_compute_nodes" in r for r in result["rows"])
    lines = [f"{describe_model(result)}, KV cache {result.get('cache_type_k', 'f16')}/{result.get('cache_type_v', 'f16')}, "
             f"{result['threads']} threads, {result.get('n_gpu_layers', 0)} GPU layers, {result['n_gen']} tokens x "
             f"{result['reps']} runs per setting (median, min..max), commit {result['commit']}", "",
             "| depth | setting | t/s | min..max | x best dense |" + (" bytes limit |" if lim else "")
             + (" nodes |" if nodes else "") + (f" pp{result.get('n_prompt')} t/s | x best dense |" if pp else ""),
             "|---:|---|---:|---:|---:|" + ("---:|" if lim else "") + ("---:|" if nodes else "") + ("---:|---:|" if pp else "")]
    for r in result["rows"]:
        note = " (dense fallback)" if r.get("sparq_token_fraction") == 0 else ""
        line = (f"| {r['depth']} | {r['setting']}{note} | {r['tokens_per_s']:.1f} | "
                f"{r['min']:.1f}..{r['max']:.1f} | {r['x_best_dense']:.2f} |")
        if lim:
            line += f" {r['bytes_limit']:.2f} |" if r.get("bytes_limit") else " |"
        if nodes:
            line += f" {r['graph_compute_nodes']} |"
        if pp:
            line += f" {r['pp_tokens_per_s']:.1f} | {r['pp_x_best_dense']:.2f} |"
        lines.append(line)
    m = result.get("memory") or {}
    if nodes:
        lines += ["", "nodes: the graph of one decoded token, the nodes that compute (views, reshapes and permutes "
                  "left out); on a GPU each is a kernel launch unless the backend fuses it"]
    if lim:
        lines += ["", "bytes limit: the bytes a dense token reads (weights + K and V at that depth) over the bytes a "
                  f"SparQ token reads (weights + its share of K/V and the K^T mirror); weights read per token: "
                  f"{_gib(m.get('weight_bytes_per_token', 0))}"]
    if m.get("kv_bytes_per_context"):
        lines.append(f"memory: weights {_gib(m['weights_bytes'])}; K and V cache {_gib(m['kv_bytes_per_context'])} "
                     f"per context ({m['n_ctx']} cells, {m['n_contexts']} contexts); SparQ adds "
                     f"{_gib(m['sparq_extra_bytes'])} (K^T mirror and V sums); peak process memory "
                     f"{_gib(m['peak_rss_bytes'])}")
    return "\n".join(lines)


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = dict(zip(result["settings"], plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    for lab in result["settings"]:
        rs = [r for r in result["rows"] if r["setting"] == lab]
        d = [r["depth"] for r in rs]
        style = "--" if lab.startswith("dense") else "-"
        a1.plot(d, [r["tokens_per_s"] for r in rs], style, marker="o", label=lab, color=colors[lab])
        if not lab.startswith("dense"):
            a2.plot(d, [r["x_best_dense"] for r in rs], marker="o", label=lab, color=colors[lab])
    a2.axhline(1.0, color="gray", lw=0.8)
    for a in (a1, a2):
        if min(result["depths"]) > 0:  # a log axis has no place for depth 0
            a.set_xscale("log", base=2)
        a.set_xlabel("depth (tokens in the cache)")
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    a1.set_ylabel("tokens/s")
    a2.set_ylabel("x best dense")
    fig.suptitle(f"{describe_model(result)}, {result['threads']} threads ({result['machine']['cpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
