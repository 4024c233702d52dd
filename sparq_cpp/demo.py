"""``sparq-cpp demo`` (``make demo``): what SparQ is for, in about a minute on 2 cores.

A long chat message (Paul Graham essays, several thousand tokens, and a question about them) is
answered twice, with dense attention and with SparQ; the second answer reuses the prompt's
cache (llama-cpp-python keeps the longest common prefix), so the prompt is prefilled once. Both
answers are shown with the decode speed of each, side by side.
"""

from __future__ import annotations

import sys
import time

QUESTION = "\n\nIn two sentences, what are the essays above about?"


def _answer(llm, message: str, n: int) -> tuple:
    """(text, prompt tokens) of a greedy chat answer of at most n tokens (it stops at its end)."""
    out = llm.create_chat_completion(messages=[{"role": "user", "content": message}], max_tokens=n,
                                     temperature=0.0, repeat_penalty=1.0)
    return out["choices"][0]["message"]["content"].strip(), out["usage"]["prompt_tokens"]


def _decode_speed(llm, n_prompt: int, n: int) -> float:
    """Decode tokens/s over exactly n greedy tokens after the prompt's n_prompt cached tokens (past
    the answer's end if it stops earlier), as `sparq-cpp bench` times them; the cache is left
    holding the prompt."""
    import numpy as np

    from .eval import last_logits

    llm.n_tokens = n_prompt - 1  # the next eval removes the answer's cells and gives the prompt's logits
    llm.eval([int(llm.input_ids[n_prompt - 1])])
    t0 = time.perf_counter()
    for _ in range(n):
        llm.eval([int(np.argmax(last_logits(llm)))])
    dt = time.perf_counter() - t0
    # back to the prompt minus its last token, so that the next answer decodes that token again and
    # samples from its logits (not from the last timed token's)
    llm.n_tokens = n_prompt - 1
    return n / dt


def run(model: str = "smollm2-135m", prompt_tokens: int = 7000, n_predict: int = 64,
        compression: float = 1 / 8, threads: int = 2, out=sys.stdout) -> int:
    """Both answers, and the decode speed of each over the same n_predict tokens."""
    from fractions import Fraction

    from tqdm import tqdm

    from .llama import Llama
    from .models import essays_text

    budget = str(Fraction(compression).limit_denominator(1000))
    bar = tqdm(total=3, desc="demo", file=sys.stderr, bar_format="{desc}: {n}/{total}{postfix}")
    bar.set_postfix_str("loading the model")
    llm = Llama(model, n_ctx=prompt_tokens + n_predict + 256, n_batch=512, n_threads=threads,
                n_threads_batch=threads, flash_attn=True, verbose=False)
    try:
        toks = llm.tokenize(essays_text().encode(), add_bos=False)[:prompt_tokens]
        message = llm.detokenize(toks).decode(errors="ignore") + QUESTION
        bar.update(1)
        bar.set_postfix_str(f"prefill of about {len(toks)} tokens, then the answer with dense attention")
        dense_text, n_prompt = _answer(llm, message, n_predict)
        dense_speed = _decode_speed(llm, n_prompt, n_predict)
        bar.update(1)
        bar.set_postfix_str(f"the answer with SparQ {budget}")
        llm.set_sparq(compression=compression)
        llm.sparq_stats(reset=True)
        sparq_speed = _decode_speed(llm, n_prompt, n_predict)
        st = llm.sparq_stats()
        sparq_text, _ = _answer(llm, message, n_predict)
        bar.update(1)
        bar.close()
    finally:
        llm.close()

    print(f"\n{model}: a chat message of {len(toks)} essay tokens and a question, answers of up to {n_predict} "
          f"tokens (greedy), {threads} threads\n", file=out)
    print(f"--- dense attention ---\n{dense_text}\n", file=out)
    print(f"--- SparQ, compression {budget} ---\n{sparq_text}\n", file=out)
    reads = f"{st['read_fraction']:.3f}" if st["read_fraction"] else "-"
    print("| attention | decode tokens/s | x dense | KV reads of dense |", file=out)
    print("|---|---:|---:|---:|", file=out)
    print(f"| dense (flash attention) | {dense_speed:.1f} | 1.00 | 1 |", file=out)
    print(f"| SparQ {budget} | {sparq_speed:.1f} | {sparq_speed / dense_speed:.2f} | {reads} |", file=out)
    print(f"\n(decode speeds over the same {n_predict} tokens after the prompt, greedy, past an answer's end; SparQ "
          f"decoded {st['n_tokens_sparq']} tokens on {st['n_layers_sparq']} of {st['n_layers']} attention layers; "
          "`sparq-cpp bench` measures decode speed with repetitions and medians)", file=out)
    return 0
