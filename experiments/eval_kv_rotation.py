"""q8_0 KV cache with SparQ: does llama.cpp's Hadamard rotation of Q and K hurt SparQ's step 1?

With a quantized cache (and head size a multiple of 64) upstream multiplies Q and K by a Hadamard
matrix before storing and using them; that spreads q's mass over all components, which SparQ's
choice of the r largest |q| components relies on not happening. llama_sparq_set therefore turns
the rotation off when SparQ is set on an empty cache (what ``sparq_cpp.Llama(..., sparq_*=...)``,
``sparq-cpp bench`` and ``sparq-cpp eval`` do). This script measures that choice: teacher forcing
on the essays (the protocol of ``sparq-cpp eval``), everything compared with dense decoding on an
F16 cache: dense and SparQ 1/8 on F16, on q8_0 with the rotation kept (SparQ set only after the
prefill, upstream's default) and on q8_0 as sparq-cpp runs it (rotation off).

    python experiments/eval_kv_rotation.py [-m smollm2-135m] [-c 2048,4096] [-n 128]
"""

import argparse
import json
import sys

from sparq_cpp.eval import _Model, _essay_tokens, compare
from sparq_cpp.sparq import SparqParams
from sparq_cpp.runinfo import run_info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("-c", "--contexts", default="2048,4096")
    ap.add_argument("-n", "--n-tokens", type=int, default=128)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-o", "--output", default="results/eval_kv_rotation")
    args = ap.parse_args()
    contexts = [int(x) for x in args.contexts.split(",")]
    n_ctx = max(contexts) + args.n_tokens + 64

    caches = [("f16", "f16", False), ("q8_0", "q8_0", True), ("q8_0", "q8_0", False)]
    logits = {}  # (cache label, setting, context) -> teacher-forced logits
    conts = {}
    for tk, tv, rot in caches:
        label = tk if tk == "f16" else f"{tk}, rotation {'on' if rot else 'off'}"
        m = _Model(args.model, n_ctx, args.threads, tk, tv, keep_rotation=rot)
        toks = _essay_tokens(m.llm)
        bos = [m.llm.token_bos()] if m.llm._model.add_bos_token() else []
        for C in contexts:
            prefix, cont = bos + toks[:C - len(bos)], toks[C - len(bos):C - len(bos) + args.n_tokens]
            conts[C] = cont
            print(f"{label}: context {C}", file=sys.stderr)
            m.llm.set_sparq(None)
            m.prefill(prefix)
            logits[(label, "dense", C)] = m.feed(C, cont)
            m.llm.set_sparq(SparqParams(compression=1 / 8))
            logits[(label, "SparQ 1/8", C)] = m.feed(C, cont)
        m.llm.close()

    rows = []
    for (label, setting, C), lg in logits.items():
        if (label, setting) == ("f16", "dense"):
            continue
        ref = logits[("f16", "dense", C)]
        rows.append(dict(cache=label, setting=setting, context=C,
                         **compare(ref[:-1], lg[:-1], conts[C][1:])))
        if setting != "dense":  # also against dense on the same cache
            same = logits[(label, "dense", C)]
            rows[-1]["vs_same_cache"] = compare(same[:-1], lg[:-1], conts[C][1:])
    print(f"| cache | setting | " + " | ".join(f"{C}: agreement / KL vs dense f16" for C in contexts)
          + " | " + " | ".join(f"{C}: agreement / KL vs dense, same cache" for C in contexts) + " |")
    print("|---|---|" + "---|" * (2 * len(contexts)))
    for label in dict.fromkeys(r["cache"] for r in rows):
        for setting in ("dense", "SparQ 1/8"):
            rs = {r["context"]: r for r in rows if r["cache"] == label and r["setting"] == setting}
            if not rs:
                continue
            a = " | ".join(f"{rs[C]['agreement']:.3f} / {rs[C]['kl']:.3f}" for C in contexts)
            b = " | ".join((f"{rs[C]['vs_same_cache']['agreement']:.3f} / {rs[C]['vs_same_cache']['kl']:.3f}"
                            if "vs_same_cache" in rs[C] else "") for C in contexts)
            print(f"| {label} | {setting} | {a} | {b} |")
    with open(args.output + ".json", "w") as f:
        json.dump({**run_info(), "model": args.model, "n_tokens": args.n_tokens, "rows": rows}, f, indent=1)
    print(f"wrote {args.output}.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
