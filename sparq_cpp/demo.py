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
    """(text, decode tokens/s) of a greedy chat answer; the speed counts the tokens after the
    first, whose time includes the prompt's prefill."""
    text, times = [], []
    for chunk in llm.create_chat_completion(messages=[{"role": "user", "content": message}], max_tokens=n,
                                            temperature=0.0, repeat_penalty=1.0, stream=True):
        piece = chunk["choices"][0]["delta"].get("content")
        if piece:
            times.append(time.perf_counter())
            text.append(piece)
    speed = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return "".join(text).strip(), speed


def run(model: str = "smollm2-135m", prompt_tokens: int = 7000, n_predict: int = 64,
        compression: float = 1 / 8, threads: int = 2, out=sys.stdout) -> int:
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
        dense_text, dense_speed = _answer(llm, message, n_predict)
        bar.update(1)
        bar.set_postfix_str(f"the answer with SparQ {budget}")
        llm.set_sparq(compression=compression)
        llm.sparq_stats(reset=True)
        sparq_text, sparq_speed = _answer(llm, message, n_predict)
        st = llm.sparq_stats()
        bar.update(1)
        bar.close()
    finally:
        llm.close()

    n_prompt = len(toks)
    print(f"\n{model}: a chat message of {n_prompt} essay tokens and a question, answers of up to {n_predict} "
          f"tokens (greedy), {threads} threads\n", file=out)
    print(f"--- dense attention ---\n{dense_text}\n", file=out)
    print(f"--- SparQ, compression {budget} ---\n{sparq_text}\n", file=out)
    reads = f"{st['read_fraction']:.3f}" if st["read_fraction"] else "-"
    print("| attention | decode tokens/s | x dense | KV reads of dense |", file=out)
    print("|---|---:|---:|---:|", file=out)
    print(f"| dense (flash attention) | {dense_speed:.1f} | 1.00 | 1 |", file=out)
    print(f"| SparQ {budget} | {sparq_speed:.1f} | {sparq_speed / dense_speed:.2f} | {reads} |", file=out)
    print(f"\n(SparQ decoded {st['n_tokens_sparq']} tokens on {st['n_layers_sparq']} of {st['n_layers']} "
          f"attention layers; `sparq-cpp bench` measures decode speed with repetitions and medians)", file=out)
    return 0
