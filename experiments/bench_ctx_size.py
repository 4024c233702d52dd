"""Does the context size change decode speed at a fixed depth? smollm2-135m, depth 2048, one
context per size held at once, dense (flash attention on) and SparQ 1/8 decoding 64 tokens,
interleaved over rounds (median). Used to explain the gap between llama-bench (context = depth +
tokens) and sparq-cpp bench (context = the run's largest depth) in the README.

    python experiments/bench_ctx_size.py [rounds]
"""

import statistics
import sys

from sparq_cpp import Llama, models
from sparq_cpp.bench import DecodeContext
from sparq_cpp.sparq import SparqParams

DEPTH, N_GEN, SIZES = 2048, 64, (2240, 4096, 8192)


def main(rounds: int = 3) -> None:
    ctxs = {}
    for n_ctx in SIZES:
        llm = Llama("smollm2-135m", n_ctx=n_ctx, n_batch=2048, n_ubatch=512, n_threads=2, n_threads_batch=2,
                    flash_attn=True, verbose=False)
        toks = llm.tokenize(models.essays_text(8).encode())[:DEPTH + N_GEN]
        c = DecodeContext(llm)
        c.prefill(toks[:DEPTH])
        ctxs[n_ctx] = (c, toks[DEPTH:])
    res = {}
    for _ in range(rounds):
        for n_ctx, (c, gen) in ctxs.items():
            for lab, kw in (("dense FA on", None), ("SparQ 1/8", dict(compression=1 / 8))):
                c.llm.set_sparq(SparqParams(**kw) if kw else None)
                c.decode(gen[:1])  # warm-up after the settings change
                res.setdefault((n_ctx, lab), []).append(c.decode(gen))
    print(f"depth {DEPTH}, {N_GEN} tokens, {rounds} rounds (median, min..max t/s)\n")
    print("| context | setting | t/s | min..max |\n|---:|---|---:|---:|")
    for (n_ctx, lab), v in res.items():
        print(f"| {n_ctx} | {lab} | {statistics.median(v):.1f} | {min(v):.1f}..{max(v):.1f} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
