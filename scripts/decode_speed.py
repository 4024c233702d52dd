#!/usr/bin/env python3
"""Decode speed through llama-cpp-python's API: dense (flash attention off and on) against SparQ.

For each depth the essays are prefilled once per context, then N tokens are decoded one at a
time from the same cache state, several times (median). Dense and SparQ run in the same process
from the same library; the ratio is SparQ against the better of the two dense paths. The
timings include llama-cpp-python's per-token Python work, as a user of ``Llama.eval`` sees it.

    python scripts/decode_speed.py --model smollm2-135m --depths 512 1024 2048 4096 8000
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--depths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8000])
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", "--n-gen", type=int, default=32, help="tokens decoded per repetition")
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--json", default=str(ROOT / "results" / "decode_speed.json"))
    args = ap.parse_args()

    from tqdm import tqdm

    from sparq_cpp import Llama, models

    text = "\n\n".join(p.read_text() for p in sorted(models.essays_dir().glob("*.txt")))
    n_ctx = max(args.depths) + args.n_gen + 256
    common = dict(n_ctx=n_ctx, n_batch=512, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    dense_off = Llama(args.model, **common)
    llm = Llama(args.model, flash_attn=True, **common)
    toks = llm.tokenize(text.encode())
    settings = [("SparQ 1/8", dict(compression=1 / 8, min_ctx=0)), ("SparQ k=64", dict(k=64, min_ctx=0))]

    def tps(m, prompt):
        m.reset()
        m.eval(prompt)
        base, out = m.n_tokens, []
        for _ in range(args.reps):
            m.n_tokens = base
            t0 = time.perf_counter()
            for i in range(args.n_gen):
                m.eval([prompt[i]])
            out.append(args.n_gen / (time.perf_counter() - t0))
        return statistics.median(out)

    rows = []
    for depth in tqdm(args.depths, desc="depths", file=sys.stderr):
        prompt = toks[:depth]
        row = {"depth": depth, "dense_fa_off": tps(dense_off, prompt)}
        llm.set_sparq(None)
        row["dense_fa_on"] = tps(llm, prompt)
        best = max(row["dense_fa_off"], row["dense_fa_on"])
        for name, kw in settings:
            llm.set_sparq(**kw)
            row[name] = tps(llm, prompt)
            row[name + " ratio"] = row[name] / best
        rows.append(row)

    head = ["depth", "dense FA off t/s", "dense FA on t/s"] + [f"{n} t/s (x best dense)" for n, _ in settings]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [str(r["depth"]), f"{r['dense_fa_off']:.1f}", f"{r['dense_fa_on']:.1f}"]
        cells += [f"{r[n]:.1f} ({r[n + ' ratio']:.2f}x)" for n, _ in settings]
        print("| " + " | ".join(cells) + " |")

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "commit": commit,
        "machine": f"{platform.machine()} {platform.processor()}", "model": args.model,
        "threads": args.threads, "n_gen": args.n_gen, "reps": args.reps, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
