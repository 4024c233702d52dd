#!/usr/bin/env python3
"""Benchmark GGML_OP_SPARQ_ATTN against ggml's two dense attention paths, side by side in one run.

Runs build/native/bin/bench-sparq-op (built by `make build`), which times, on the same F16 K/V
data and one query token: the SparQ op, ggml_flash_attn_ext, and mul_mat + soft_max + mul_mat
over a transposed V (llama.cpp's path with flash attention off). SparQ runs as libllama plans
a layer of each shape (r, k, l and the K^T mirror: int8 by default, as decoding reads it;
--mirror float for the f16 one). Prints a table of medians and
ratios against the faster dense path, the bytes each reads and the achieved read bandwidth, and
writes JSON (and a PNG plot when matplotlib is installed).

    python scripts/bench_op.py                      # the table of docs/results.md
    python scripts/bench_op.py --ctx 4096,32768 --threads 2 --reps 30
    python scripts/bench_op.py --cold --out results/bench_op_cold   # caches evicted before each run

By default every repetition runs on the same data, so what a method reads may stay in the
last-level cache between repetitions (SparQ's few MB can; dense's tens of MB mostly cannot).
In decode, the other layers pass through the cache between two calls of a layer: --cold writes
a 96 MiB buffer before every timed run, which is closer to that.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "build" / "native" / "bin" / "bench-sparq-op"


def _load(name: str):
    """A module of sparq_cpp that needs nothing of its library, loaded alone: importing the package
    would load libllama, which this script (the native benchmark's driver) does not use."""
    spec = importlib.util.spec_from_file_location(f"sparq_cpp_{name}", ROOT / "sparq_cpp" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


budget, runinfo = _load("budget"), _load("runinfo")


def _budget_arg(text: str) -> str:
    """'1/8,1/16' (or 0.125,...) -> '8,16', the 1/c form bench-sparq-op takes; every budget is
    parsed by the same parser as the other tools', and must be 1/c with a whole c."""
    cs = []
    for part in text.split(","):
        try:
            c = budget.parse_compression(part.strip())
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if abs(1 / c - round(1 / c)) > 1e-6:
            raise argparse.ArgumentTypeError(f"bench-sparq-op takes budgets 1/c with a whole c, got {part!r}")
        cs.append(str(round(1 / c)))
    return ",".join(cs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", default="1024,4096,8192,16384,32768", help="context lengths S")
    ap.add_argument("--dims", default="64:3:3,128:4:8",
                    help="head_dim:group:n_head_kv triples (default: SmolLM2-135M-like, Llama-3-8B-like)")
    ap.add_argument("--compression", type=_budget_arg, default="1/8,1/16",
                    help="read budgets, as every tool takes them (1/8 or 0.125), comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions per measurement (median)")
    ap.add_argument("--cold", action="store_true", help="evict the caches before every timed run")
    ap.add_argument("--mirror", choices=("auto", "float"), default="auto",
                    help="the K^T mirror step 2 reads: auto (int8, libllama's default) or float (f16)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench_op"), help="output prefix (.json, .png)")
    args = ap.parse_args(argv)

    if not BIN.exists():
        sys.exit(f"{BIN} is missing: run `make build` first")
    cmd = [str(BIN), "--threads", str(args.threads), "--reps", str(args.reps), "--ctx", args.ctx,
           "--dims", args.dims, "--compression", args.compression, "--mirror", args.mirror] + (["--cold"] if args.cold else [])
    n_expected = len(args.ctx.split(",")) * len(args.dims.split(",")) * len(args.compression.split(","))

    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety
        tqdm = None
    bar = tqdm(total=n_expected, desc="bench-sparq-op", unit="cfg", file=sys.stderr) if tqdm else None
    machine, rows = None, []
    t0 = time.time()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            rec = json.loads(line)
            if rec["kind"] == "machine":
                machine = rec
            else:
                rows.append(rec)
                if bar:
                    bar.update(1)
    if bar:
        bar.close()
    if proc.returncode != 0:
        sys.exit(f"bench-sparq-op failed with exit code {proc.returncode}")

    bw = machine["read_gbs"]
    print(f"\nSparQ attention op vs dense, one token, F16 K/V, {args.threads} threads, "
          f"{'caches evicted before each run' if args.cold else 'warm caches'}; "
          f"machine read bandwidth {bw:.1f} GB/s ({args.threads} threads)\n")
    hdr = ("| d | group | kv heads | S | budget | r | k | mirror | SparQ ms | flash_attn ms | mul_mat ms | "
           "speed-up vs faster dense | reads SparQ / dense | SparQ GB/s | dense GB/s |")
    print(hdr)
    print("|" + "|".join(["---"] * (hdr.count("|") - 1)) + "|")
    for r in rows:
        dense_ms = min(r["ms_flash_attn"], r["ms_mul_mat"])
        r["speedup"] = dense_ms / r["ms_sparq"]
        r["gbs_sparq"] = r["bytes_sparq"] / (r["ms_sparq"] * 1e-3) / 1e9
        r["gbs_dense"] = r["bytes_dense"] / (dense_ms * 1e-3) / 1e9
        print(f"| {r['head_dim']} | {r['group']} | {r['n_head_kv']} | {r['ctx']} | {r['compression']} | {r['r']} | "
              f"{r['k']} | {r['mirror']} | {r['ms_sparq']:.3f} | {r['ms_flash_attn']:.3f} | {r['ms_mul_mat']:.3f} | "
              f"**{r['speedup']:.2f}x** | {r['bytes_sparq'] / r['bytes_dense']:.3f} | {r['gbs_sparq']:.1f} | "
              f"{r['gbs_dense']:.1f} |")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
        "native_command": " ".join(cmd),
        "commit": runinfo.git_commit(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "threads": args.threads, "read_gbs": bw},
        "seconds": round(time.time() - t0, 1),
        "results": rows,
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    print(f"\nwrote {out.with_suffix('.json')}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return 0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({(r["head_dim"], r["group"], r["n_head_kv"], r["compression"]) for r in rows}):
        pts = [r for r in rows if (r["head_dim"], r["group"], r["n_head_kv"], r["compression"]) == key]
        ax.plot([p["ctx"] for p in pts], [p["speedup"] for p in pts], marker="o",
                label=f"d={key[0]}, group {key[1]}, {key[2]} kv heads, {key[3]}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context S (positions)")
    ax.set_ylabel("speed-up vs faster dense path")
    ax.set_title(f"SparQ op vs dense attention, CPU, {args.threads} threads{', cold caches' if args.cold else ''}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
