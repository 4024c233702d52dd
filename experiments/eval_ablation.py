#!/usr/bin/env python3
"""The 1/8 ablations of `sparq-cpp eval` alone: teacher forcing against dense at 1/8 of dense's
K/V bytes for the default setting and each variant (the float K^T mirror, alone and reading the
int8 default's rows; the int8 mirror's bytes spent on r = d/4 instead of rows; no tau, r = d/16,
both, local window k/8 and k/2; 1/4 as a reference), per model, with the JSON saved after each
model. It is the evidence behind each model family's default (docs/results.md, "the levers
measured").

    python experiments/eval_ablation.py                                   # both models, 2048 and 4096, 256 tokens
    python experiments/eval_ablation.py -m smollm2-135m -c 2048 -n 64     # a quick look
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparq_cpp import eval as ev

KEEP = ("1/4", "1/8", "1/8 float mirror", "1/8 r=d/4 (int8 bytes to step 2)", "1/8 float mirror, int8's rows", "1/8 no tau (sqrt(d))", "1/8 r=d/16 (larger k)", "1/8 no tau, r=d/16", "1/8 l=k/8", "1/8 l=k/2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="smollm2-135m,gemma3-270m")
    ap.add_argument("-c", "--contexts", default="2048,4096")
    ap.add_argument("-n", "--n-tokens", type=int, default=256)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-s", "--settings", help="the settings to run, by label, '|'-separated (default: all of KEEP)")
    ap.add_argument("-o", "--output", default="results/eval_ablation")
    args = ap.parse_args()
    keep = args.settings.split("|") if args.settings else list(KEEP)
    ctxs = [int(c) for c in args.contexts.split(",")]
    rows = []
    for name in args.model.split(","):
        res = ev.run([name], {name: ctxs}, {name: []}, args.n_tokens, args.threads, None, parts=("tf",), labels=keep)
        rows += res["tf"]
        out = {**{k: v for k, v in res.items() if k != "tf"}, "tf": rows}
        Path(args.output).with_suffix(".json").write_text(json.dumps(out, indent=1))
    print(f"wrote {Path(args.output).with_suffix('.json')}")


if __name__ == "__main__":
    main()
