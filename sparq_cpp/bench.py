"""``sparq-cpp bench``: decode speed, dense against SparQ, side by side in one run.

For each depth the essays are prefilled once in each of two contexts of the same model and
library: one with flash attention off (V transposed, llama-cpp-python's default) and one with it
on (SparQ's context). Then, for every repetition, each setting decodes N tokens one at a time
from the same cache state (the generated cells are removed after each run), the settings in a
rotating order so that drifts of a shared machine hit them alike. Dense is the better of the
two dense paths at each depth. Reported: medians, the spread (min..max), and the ratio of
medians against the best dense.
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
    (used by bench and eval)."""

    def __init__(self, llm):
        self.llm = llm
        self.ctx = llm._ctx.ctx
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.depth = 0

    def prefill(self, tokens: List[int]) -> None:
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()
        if tokens:
            self.llm.eval(tokens)
        self.depth = len(tokens)

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


def run(model: str, depths: List[int], settings: List[str], threads: int, n_gen: int, reps: int,
        out: Optional[str], plot: bool = True, progress: bool = True,
        cache_type_k: str = "f16", cache_type_v: str = "f16", n_gpu_layers: int = 0,
        n_prompt: int = 0, fmt: str = "md") -> dict:
    from tqdm import tqdm

    from .llama import Llama
    from .models import essays_text

    parsed = [parse_setting(s) for s in settings]
    if ("dense", None) not in parsed:
        parsed.insert(0, ("dense", None))
    text = essays_text()
    n_ctx = max(depths) + max(n_gen, n_prompt) + 64
    common = dict(n_ctx=n_ctx, n_batch=max(2048, n_prompt), n_ubatch=512, n_threads=threads, n_threads_batch=threads,
                  n_gpu_layers=n_gpu_layers, verbose=False, type_k=cache_type(cache_type_k), type_v=cache_type(cache_type_v))
    # llama.cpp stores a quantized V only with flash attention on: then that is the one dense path
    fa_off = None if v_needs_flash_attn(cache_type_v) else DecodeContext(Llama(model, **common))
    fa_on = DecodeContext(Llama(model, flash_attn=True, **common))
    # as a sparq_* argument to the constructor would: dense and SparQ runs then share that cache
    fa_on.llm.sparq_prepare_cache()
    # another cache type than f16: the default f16 cache's dense paths are what a user could run
    # instead, so they run here too and count for "best dense"
    ref = []
    if (cache_type_k, cache_type_v) != ("f16", "f16"):
        f16 = dict(common, type_k=cache_type("f16"), type_v=cache_type("f16"))
        ref = [("dense f16 FA off", DecodeContext(Llama(model, **f16))),
               ("dense f16 FA on", DecodeContext(Llama(model, flash_attn=True, **f16)))]
    toks = fa_on.llm.tokenize(text.encode())
    if len(toks) < max(depths) + max(n_gen, n_prompt):
        raise ValueError(f"the essays give {len(toks)} tokens, fewer than depth {max(depths)} + {max(n_gen, n_prompt)}")

    # (label, context, sparq kwargs); dense appears twice: flash attention off and on
    kv = "" if not ref else (cache_type_k if cache_type_k == cache_type_v else f"{cache_type_k}/{cache_type_v}") + " "
    runs = ([(f"dense {kv}FA off", fa_off, None)] if fa_off else []) + [(f"dense {kv}FA on", fa_on, None)]
    runs += [(lab, c, None) for lab, c in ref]
    runs += [(f"SparQ {lab}", fa_on, kw) for lab, kw in parsed if kw is not None]

    rows = []
    bar = tqdm(total=len(depths) * reps * len(runs), desc=f"bench {model}", file=sys.stderr, disable=not progress)
    for depth in depths:
        bar.set_postfix_str(f"depth {depth}: prefill")
        for c in [fa_off, fa_on] + [c for _, c in ref]:
            if c:
                c.prefill(toks[:depth])
        gen = toks[depth:depth + n_gen]
        prompt = toks[depth:depth + n_prompt]
        times = {lab: [] for lab, _, _ in runs}
        pp_times = {lab: [] for lab, _, _ in runs}
        sparq_tok = {}
        for rep in range(reps):
            order = runs[rep % len(runs):] + runs[:rep % len(runs)]
            for lab, c, kw in order:
                bar.set_postfix_str(f"depth {depth}: {lab}")
                if c is fa_on:
                    c.llm.set_sparq(SparqParams(**kw) if kw else None)
                c.decode(gen[:1])  # warm-up: re-reserve after a settings change, mirror rebuild
                c.llm.sparq_stats(reset=True)
                times[lab].append(c.decode(gen))
                if kw:  # below min_ctx SparQ falls back to dense: say so in the table
                    sparq_tok[lab] = c.llm.sparq_stats()["n_tokens_sparq"] / len(gen)
                if prompt:
                    pp_times[lab].append(c.prompt(prompt))
                bar.update(1)
        med = {lab: statistics.median(v) for lab, v in times.items()}
        best = max(med[lab] for lab, _, kw in runs if kw is None)
        pp_med = {lab: statistics.median(v) for lab, v in pp_times.items() if v}
        for lab, _, kw in runs:
            row = {"depth": depth, "setting": lab, "tokens_per_s": med[lab],
                   "min": min(times[lab]), "max": max(times[lab]), "runs": times[lab],
                   "x_best_dense": med[lab] / best, "sparq": kw,
                   "sparq_token_fraction": sparq_tok.get(lab)}
            if pp_med:
                pp_best = max(pp_med[lab2] for lab2, _, kw2 in runs if kw2 is None)
                row.update(pp_tokens_per_s=pp_med[lab], pp_runs=pp_times[lab], pp_x_best_dense=pp_med[lab] / pp_best)
            rows.append(row)
    bar.close()
    fa_on.llm.set_sparq(None)
    for _, c in ref:
        c.llm.close()

    result = {
        **run_info(), "model": model, "threads": threads, "n_gpu_layers": n_gpu_layers, "n_gen": n_gen,
        "n_prompt": n_prompt, "reps": reps, "depths": depths,
        "cache_type_k": cache_type_k, "cache_type_v": cache_type_v,
        "settings": [lab for lab, _, _ in runs], "rows": rows,
    }
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
        cols = ["depth", "setting", "tokens_per_s", "min", "max", "x_best_dense", "sparq_token_fraction"]
        if any("pp_tokens_per_s" in r for r in result["rows"]):
            cols += ["pp_tokens_per_s", "pp_x_best_dense"]
        lines = [",".join(cols)]
        for r in result["rows"]:
            lines.append(",".join("" if r.get(c) is None else f'"{r[c]}"' if isinstance(r[c], str) else str(r[c])
                                  for c in cols))
        return "\n".join(lines)
    return table(result)


def table(result: dict) -> str:
    pp = any("pp_tokens_per_s" in r for r in result["rows"])
    lines = [f"model {result['model']}, KV cache {result.get('cache_type_k', 'f16')}/{result.get('cache_type_v', 'f16')}, "
             f"{result['threads']} threads, {result.get('n_gpu_layers', 0)} GPU layers, {result['n_gen']} tokens x "
             f"{result['reps']} runs per setting (median, min..max), commit {result['commit']}", "",
             "| depth | setting | t/s | min..max | x best dense |" + (f" pp{result.get('n_prompt')} t/s | x best dense |" if pp else ""),
             "|---:|---|---:|---:|---:|" + ("---:|---:|" if pp else "")]
    for r in result["rows"]:
        note = " (dense fallback)" if r.get("sparq_token_fraction") == 0 else ""
        line = (f"| {r['depth']} | {r['setting']}{note} | {r['tokens_per_s']:.1f} | "
                f"{r['min']:.1f}..{r['max']:.1f} | {r['x_best_dense']:.2f} |")
        if pp:
            line += f" {r['pp_tokens_per_s']:.1f} | {r['pp_x_best_dense']:.2f} |"
        lines.append(line)
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
        a.set_xscale("log", base=2)
        a.set_xlabel("depth (tokens in the cache)")
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    a1.set_ylabel("tokens/s")
    a2.set_ylabel("x best dense")
    fig.suptitle(f"{result['model']}, {result['threads']} threads ({result['machine']['cpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
