"""SparQ in libllama decode, on the real models and the Paul Graham essays.

Levels asserted here were measured with 2 threads on two kinds of x86-64 CPU, an AVX-512 one
(`make test` on an AMD EPYC Zen 4) and an AVX2-only build of the same library (`make test-avx2`),
and are stated with their margins next to each assert; every margin holds on both.
"Rounding" for these models: dense decoding itself differs
between llama.cpp's two dense paths (flash attention on and off, same weights, same tokens) by
up to 1.28 (smollm2-135m) and 3.34 (gemma3-270m) in a logit, with top-1 agreement 95.7% and
93.0% over 256 teacher-forced tokens after 2000: that is the size of fp16 accumulation
differences, and the bound used for "equal to dense to rounding".
"""

import math
import pickle

import numpy as np
import pytest

import sparq_cpp
from sparq_cpp import Llama, SparqParams, llama_cpp
from sparq_cpp._lib import ffi, lib
from sparq_cpp.eval import log_softmax
from sparq_cpp.shapes import load_seq_state, seq_state
from sparq_util import VSUM_TOL, check as _check, decode as _decode, prefill as _prefill, raw_context as _raw_context

MODELS = ["smollm2-135m", "gemma3-270m"]
# max |logit - dense logit| allowed at k >= context: 1.5x dense's own FA on/off difference.
# Measured (test_k_at_least_context_equals_dense, AVX-512 / AVX2): smollm2-135m 0.844 / 0.975,
# gemma3-270m 1.414 / 0.590
ROUNDING = {"smollm2-135m": 1.28 * 1.5, "gemma3-270m": 3.34 * 1.5}


_LLMS = {}


def _llm(name):
    """One flash-attention context per model for the whole module; tests switch SparQ on it."""
    if name not in _LLMS:
        _LLMS[name] = Llama(name, n_ctx=4096, n_batch=512, n_threads=2, logits_all=True,
                            flash_attn=True, verbose=False, seed=0)
    llm = _LLMS[name]
    llm.set_sparq(None)
    return llm


def _tokens(llm, text, n):
    toks = llm.tokenize(text.encode())
    assert len(toks) >= n
    return toks[:n]


# (model context, prompt) -> sequence 0's cache after the prompt, and the prompt's last logits
_PROMPTS = {}


def _start(llm, prompt, live=False):
    """The prompt in llm's cache, from a reset. A module context (_llm: an f16 cache, where a prompt
    is prefilled densely with SparQ on or off, so its cells are the same) computes each prompt
    once and every run, the first too, starts from its cells loaded back: SparQ's mirror and sums
    are rebuilt from them. (Loaded cells can sit elsewhere in gemma3's sliding-window cache than a
    prefill leaves them, which moves its logits by rounding: dense and SparQ start alike.)
    live: the prompt decoded, always (SparQ's counters then count its tokens)."""
    llm.reset()
    if live or not any(llm is m for m in _LLMS.values()):
        llm.eval(prompt)
        return
    key = (id(llm), tuple(prompt))
    if key not in _PROMPTS:
        llm.eval(prompt)
        _PROMPTS[key] = (seq_state(llm.ctx), np.array(llm.scores[len(prompt) - 1]))
        llm.reset()
    state, last = _PROMPTS[key]
    load_seq_state(llm.ctx, state)
    llm.input_ids[:len(prompt)] = prompt
    llm.n_tokens = len(prompt)
    llm.scores[len(prompt) - 1] = last


def _teacher_forced(llm, prompt, cont, live=False):
    _start(llm, prompt, live)
    out = []
    for t in cont:
        llm.eval([t])
        out.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64))
    return np.array(out)


def _greedy(llm, prompt, n):
    _start(llm, prompt)
    toks, logits = [], []
    for _ in range(n):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        t = int(row.argmax())
        toks.append(t)
        logits.append(row)
        llm.eval([t])
    return toks, np.array(logits)


def _first_parting(toks, ref_toks):
    """Index of the first step where two greedy token lists differ, or their length."""
    return next((i for i, (a, b) in enumerate(zip(toks, ref_toks)) if a != b), len(toks))


# gemma3's in the slow set (CI: make test-slow); make test has smollm2's, and gemma3's exactness
# at k >= context on random weights in the architecture table (tests/test_archs.py)
@pytest.mark.parametrize("name", [MODELS[0], pytest.param(MODELS[1], marks=pytest.mark.slow)])
def test_k_at_least_context_equals_dense(name, essay_text):
    llm = _llm(name)
    # 1540 prompt tokens + 64 generated: every query sees at most 1604 < k = 1700 positions, and
    # the cache length n_kv is 1792 > k, so each of the 64 steps goes through the SparQ op.
    prompt = _tokens(llm, essay_text, 1540)
    dense_toks, dense_logits = _greedy(llm, prompt, 64)
    llm.set_sparq(k=1700, l=0, min_ctx=0)
    llm.sparq_stats(reset=True)
    # the dense continuation fed through SparQ: logits equal to rounding at every step
    logits = _teacher_forced(llm, prompt, dense_toks[:-1])
    st = llm.sparq_stats()
    assert st["n_tokens_sparq"] == 63, st
    both = np.vstack([dense_logits[:1], logits])  # row 0: the prompt's last token, dense prefill
    assert np.abs(both - dense_logits).max() < ROUNDING[name]

    # Greedy generation with SparQ follows dense's tokens. Two paths equal to rounding can part
    # only where dense's top choice and SparQ's are closer than the rounding: which way such a
    # near tie breaks depends on the CPU's instruction set (dense flash attention uses AVX-512
    # where the CPU has it, the SparQ kernel AVX2), so the test asserts what holds on every
    # CPU: the logits equal dense's to rounding up to and including the first step where the
    # tokens part, and there dense's own margin between the two tokens is below the rounding.
    # Measured (AVX-512 / AVX2-only build): smollm2-135m parts at token 49 with a dense margin of
    # 0.028 / is identical for all 64 tokens; gemma3-270m parts at token 30, margin 0.103 / at
    # token 1, margin 0.069 (dense top-2 17.92 / 17.99).
    toks, greedy_logits = _greedy(llm, prompt, 64)
    n = _first_parting(toks, dense_toks)
    upto = min(n + 1, len(toks))
    diff = np.abs(greedy_logits[:upto] - dense_logits[:upto]).max()
    if n < len(toks):
        margin = dense_logits[n][dense_toks[n]] - dense_logits[n][toks[n]]
        print(f"{name}: greedy parts from dense at token {n}, dense margin {margin:.3f}, max |diff| {diff:.3f}")
        assert 0 <= margin < ROUNDING[name]
    else:
        print(f"{name}: greedy equals dense for {n} tokens, max |diff| {diff:.3f}")
    assert diff < ROUNDING[name]


def _agreement_and_ppl_ratio(dense, sparq, cont):
    """Top-1 agreement over every fed token, and the perplexity ratio of SparQ to dense on the
    continuation (row i of the logits predicts cont[i + 1])."""
    tgt = np.array(cont[1:])
    idx = np.arange(len(tgt))
    ld, ls = log_softmax(dense[:-1]), log_softmax(sparq[:-1])
    ppl_ratio = math.exp(-ls[idx, tgt].mean() + ld[idx, tgt].mean())
    return (dense.argmax(-1) == sparq.argmax(-1)).mean(), ppl_ratio


# measured at 1/8 (2000-token prompt, 256 teacher-forced tokens), AVX-512 / AVX2-only build, the
# fused op with its int8 K^T mirror ("auto"): smollm2-135m agreement 0.914 / 0.922, perplexity
# ratio 1.012 / 1.004; gemma3-270m 0.852 / 0.855 and 1.053 / 1.054. The portable graph ("ops",
# the F16 mirror, planned by elements as the fused op was before the int8 mirror: 0.887 / 0.891,
# 1.037 / 1.045 and 0.848 / 0.863, 1.070 / 1.088): smollm2-135m 0.875 / 0.875, 1.039 / 1.043;
# gemma3-270m 0.848 / 0.871, 1.098 / 1.092. Asserted with margins of at least 0.025 in agreement
# and 0.022 in the ratio on both builds. The fused op and the portable graph with the same mirror
# differ by their rounding alone, and that moves gemma3's ratio by up to 0.03 (a near tie chosen
# differently changes the cache of every later token). With the budget planned on each sequence's
# own length (exactly 0.125 of dense's reads, where the cache's padding made it 0.13-0.15), on an
# Intel Xeon with AVX-512 and AVX-VNNI (2 / 1 threads): smollm2-135m auto 0.910, 1.009; ops 0.887,
# 1.054; gemma3-270m auto 0.859 / 0.859, 1.028 / 1.052; ops 0.820 / 0.828, 1.145 / 1.149. With the
# prompt's cells loaded back for each run (_start; the same Xeon, 2 threads): smollm2-135m the same
# to the last digit; gemma3-270m auto 0.852, 1.041, ops 0.852, 1.110 (its sliding-window cells
# sit elsewhere than after a prefill: dense and SparQ both move by rounding).
LEVELS_1_8 = {"auto": {"smollm2-135m": (0.88, 1.04), "gemma3-270m": (0.82, 1.08)},
              "ops": {"smollm2-135m": (0.85, 1.07), "gemma3-270m": (0.79, 1.18)}}


_DENSE_1_8 = {}  # model -> (prompt, continuation, dense's teacher-forced logits)


@pytest.mark.parametrize("name,path", [("smollm2-135m", "auto"), ("smollm2-135m", "ops"), ("gemma3-270m", "auto"),
                                       pytest.param("gemma3-270m", "ops", marks=pytest.mark.slow)])  # CI: make test-slow
def test_compression_one_eighth_tracks_dense(name, path, essay_text):
    # the fused op, and the portable graph of standard ops (path "ops", what GPU backends run)
    # against the same dense run, each held to its levels (LEVELS_1_8)
    llm = _llm(name)
    if name not in _DENSE_1_8:
        toks = _tokens(llm, essay_text, 2256)
        _DENSE_1_8[name] = toks[:2000], toks[2000:], _teacher_forced(llm, toks[:2000], toks[2000:])
    prompt, cont, dense = _DENSE_1_8[name]
    llm.set_sparq(compression=1 / 8, path=path)  # the default min_ctx (512) is below this context
    llm.sparq_stats(reset=True)
    sparq = _teacher_forced(llm, prompt, cont)
    st = llm.sparq_stats()

    agree, ppl_ratio = _agreement_and_ppl_ratio(dense, sparq, cont)
    print(f"{name} 1/8 ({path}): agreement {agree:.3f}, perplexity ratio {ppl_ratio:.4f}, "
          f"reads {st['read_fraction']:.3f} of dense, extra memory {st['extra_bytes'] / 2**20:.1f} MiB")
    assert st["n_tokens_sparq"] == len(cont)
    assert st["n_layers_sparq"] > 0
    assert st["n_layers_ops"] == (st["n_layers_sparq"] if path == "ops" else 0)
    assert 0.10 < st["read_fraction"] < 0.16  # compression 1/8 of dense reads, as estimated
    lo_agree, hi_ppl = LEVELS_1_8[path][name]
    assert agree >= lo_agree
    assert ppl_ratio <= hi_ppl


# q8_0 K and V, SparQ set on the empty cache, which turns llama.cpp's Hadamard rotation of Q and K
# off. Measured at 1/8 (2000-token prompt, 256 teacher-forced tokens, against dense decoding of
# the same q8_0 cache), AVX-512 / AVX2-only build: with the int8 K^T mirror (1/8 of the bytes)
# agreement 0.863 / 0.871, perplexity ratio 1.047 / 1.044; with the f16 mirror (0.18 of the
# bytes) 0.887 / 0.895 and 1.038 / 1.033. Both are held to the levels set for the f16 mirror
# (margins 0.013 and 0.023 for the int8 one, at least 0.032 for the f16 one). With the rotation kept (SparQ set after
# the prefill) the same protocol measured 0.773 and 1.106, which fails both bounds.
LEVELS_Q8_0_1_8 = (0.85, 1.07)


@pytest.mark.slow  # CI: make test-slow
def test_q8_0_cache(essay_text):
    q8_0 = llama_cpp.GGML_TYPE_Q8_0
    llm = Llama("smollm2-135m", n_ctx=2304, n_batch=512, n_threads=2, logits_all=True, verbose=False,
                type_k=q8_0, type_v=q8_0, sparq_compression=1 / 8)
    try:
        toks = _tokens(llm, essay_text, 2256)
        # k >= context, l = 0: dense to rounding. Prompt 1040 + 64 tokens: n_kv is 1280 > k = 1110
        # at every step, so each goes through the op, reading q8_0 rows.
        llm.set_sparq(None)
        dense = _teacher_forced(llm, toks[:1040], toks[1040:1104])
        llm.set_sparq(k=1110, l=0, min_ctx=0)
        llm.sparq_stats(reset=True)
        out = _teacher_forced(llm, toks[:1040], toks[1040:1104])
        assert llm.sparq_stats()["n_tokens_sparq"] == 64
        assert _check(llm) == (0, pytest.approx(0.0, abs=VSUM_TOL))  # the int8 mirror of the q8_0 K
        assert np.abs(out - dense).max() < ROUNDING["smollm2-135m"]

        # 1/8 against dense on the same q8_0 cache, with the int8 mirror (the default) and the f16 one
        llm.set_sparq(None)
        prompt, cont = toks[:2000], toks[2000:]
        dense = _teacher_forced(llm, prompt, cont)
        for mirror in ("auto", "float"):
            llm.set_sparq(compression=1 / 8, mirror=mirror)
            llm.sparq_stats(reset=True)
            sparq = _teacher_forced(llm, prompt, cont)
            st = llm.sparq_stats()
            assert st["n_tokens_sparq"] == len(cont)
            # bytes, counted honestly, per position against q8_0 K and V rows of 2*68 bytes: the int8
            # mirror's r = 8 components and exponent (9 bytes), planned by bytes, so k/S = 1/8 - 9/136
            # and the total is 1/8; the f16 mirror's 8 components (16 bytes), planned by elements
            # (k/S = 1/16): 16/136 + 1/16 = 0.18
            lo, hi = (0.11, 0.14) if mirror == "auto" else (0.16, 0.20)
            assert lo < st["read_fraction"] < hi, (mirror, st["read_fraction"])
            assert _check(llm) == (0, pytest.approx(0.0, abs=VSUM_TOL))
            agree, ppl_ratio = _agreement_and_ppl_ratio(dense, sparq, cont)
            print(f"q8_0 1/8 ({mirror} mirror): agreement {agree:.3f}, perplexity ratio {ppl_ratio:.4f}, "
                  f"reads {st['read_fraction']:.3f}")
            assert agree >= LEVELS_Q8_0_1_8[0]
            assert ppl_ratio <= LEVELS_Q8_0_1_8[1]
    finally:
        llm.close()


def test_unsupported_cache_type_falls_back_to_dense_with_one_warning():
    q4_0 = llama_cpp.GGML_TYPE_Q4_0
    with pytest.warns(RuntimeWarning, match="decoding stays dense") as rec:
        llm = Llama("smollm2-135m", n_ctx=1024, n_threads=2, verbose=False, type_k=q4_0, type_v=q4_0,
                    sparq_k=16, sparq_min_ctx=0)
    try:
        assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
        assert llm.sparq is None
        out = llm.create_completion("The capital of Germany is Berlin. " * 40, max_tokens=4, temperature=0.0)
        assert out["choices"][0]["text"]
        assert llm.sparq_stats()["n_tokens_sparq"] == 0
    finally:
        llm.close()


def test_forced_dense_runs_no_sparq(essay_text):
    llm = _llm("smollm2-135m")
    toks = _tokens(llm, essay_text, 616)
    dense = _teacher_forced(llm, toks[:600], toks[600:])
    llm.set_sparq(compression=1 / 8, min_ctx=1024)  # the sequence never gets that long: dense
    llm.sparq_stats(reset=True)
    out = _teacher_forced(llm, toks[:600], toks[600:], live=True)  # the prompt's tokens counted too
    st = llm.sparq_stats()
    assert st["n_tokens_sparq"] == 0 and st["n_tokens_dense"] == 616
    assert np.array_equal(out, dense)


@pytest.mark.parametrize("name", ["smollm2-135m", pytest.param("gemma3-270m", marks=pytest.mark.slow)])  # CI: make test-slow
@pytest.mark.parametrize("realloc", [True, False])
def test_cache_operations_keep_mirror_and_sums(name, realloc, essay_text):
    llm = _llm(name)
    toks = _tokens(llm, essay_text, 700)
    llm.set_sparq(compression=1 / 8, min_ctx=0, realloc=realloc)

    # seq_rm (llama-cpp-python's eval rewinds with it) then decode == a cleared cache fed the same tokens
    llm.reset()
    llm.eval(toks[:500])
    llm.eval(toks[500:600])
    for t in toks[600:604]:
        llm.eval([t])
    assert _check(llm)[0] == 0
    llm.n_tokens = 500  # the next eval removes positions >= 500
    rewound = []
    for t in toks[600:608]:
        llm.eval([t])
        rewound.append(np.array(llm.scores[llm.n_tokens - 1]))
    n_bad, err = _check(llm)
    assert n_bad == 0 and err < VSUM_TOL

    llm._ctx.kv_cache_clear()  # clear (data too): the sums restart
    llm.reset()
    llm.eval(toks[:500])
    fresh = []
    for t in toks[600:608]:
        llm.eval([t])
        fresh.append(np.array(llm.scores[llm.n_tokens - 1]))
    assert np.abs(np.array(rewound) - np.array(fresh)).max() < 1e-3

    # state save, decode, load, decode again == the same logits
    state = llm.save_state()
    a = [np.array(llm.scores[llm.n_tokens - 1])]
    for t in toks[608:616]:
        llm.eval([t])
        a.append(np.array(llm.scores[llm.n_tokens - 1]))
    llm.load_state(state)
    b = [np.array(llm.scores[llm.n_tokens - 1])]
    for t in toks[608:616]:
        llm.eval([t])
        b.append(np.array(llm.scores[llm.n_tokens - 1]))
    assert np.abs(np.array(a) - np.array(b)).max() < 1e-3
    n_bad, err = _check(llm)
    assert n_bad == 0 and err < VSUM_TOL

    # K-shift (drop the first 100 positions, shift the rest): the mirror follows the RoPE'd K
    mem = llama_cpp.llama_get_memory(llm._ctx.ctx)
    llama_cpp.llama_memory_seq_rm(mem, 0, 0, 100)
    llama_cpp.llama_memory_seq_add(mem, 0, 100, -1, -100)
    for t in toks[616:618]:
        tok = (llama_cpp.llama_token * 1)(t)
        assert llama_cpp.llama_decode(llm._ctx.ctx, llama_cpp.llama_batch_get_one(tok, 1)) == 0
    n_bad, err = _check(llm)
    assert n_bad == 0 and err < VSUM_TOL
    assert llm.sparq_stats()["n_tokens_sparq"] > 0


def test_turning_sparq_on_over_a_filled_cache(essay_text):
    llm = _llm("smollm2-135m")
    toks = _tokens(llm, essay_text, 1300)
    dense = _teacher_forced(llm, toks[:1280], toks[1280:])
    _start(llm, toks[:1280])  # a filled cache, SparQ off: no mirror yet
    llm.set_sparq(k=1500, l=0, min_ctx=0, realloc=True)  # built from the cache on the next decode
    llm.sparq_stats(reset=True)
    out = []
    for t in toks[1280:]:
        llm.eval([t])
        out.append(np.array(llm.scores[llm.n_tokens - 1]))
    assert llm.sparq_stats()["n_tokens_sparq"] == 20
    assert _check(llm) == (0, pytest.approx(0.0, abs=VSUM_TOL))
    assert np.abs(np.array(out) - dense).max() < ROUNDING["smollm2-135m"]


def test_completion_stream_and_chat_with_sparq(essay_text):
    llm = Llama("smollm2-135m", n_ctx=2048, sparq_compression=1 / 8, sparq_min_ctx=0, verbose=False, seed=0)
    assert llm.sparq == SparqParams(compression=1 / 8, min_ctx=0)
    prompt = essay_text[:3000] + "\n\nIn one sentence, the essay above is about"
    out = llm.create_completion(prompt, max_tokens=12, temperature=0.0)
    assert out["choices"][0]["text"].strip()
    llm.reset()  # else the prompt's last token is re-decoded alone, through SparQ, and may differ
    text = "".join(c["choices"][0]["text"] for c in llm.create_completion(prompt, max_tokens=12, temperature=0.0,
                                                                          stream=True))
    assert text == out["choices"][0]["text"]
    chat = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0.0)
    assert chat["choices"][0]["message"]["content"].strip()
    st = llm.sparq_stats()
    assert st["n_tokens_sparq"] > 0 and st["n_layers_sparq"] == st["n_layers"] == 30
    assert st["extra_bytes"] > 0

    clone = pickle.loads(pickle.dumps(llm))  # __setstate__ re-runs __init__: SparQ must survive
    assert clone.sparq == llm.sparq

    llm.set_sparq(None)
    assert llm.sparq is None


@pytest.mark.parametrize("kwargs, arg", [
    (dict(sparq_k=0), "sparq_k"), (dict(sparq_k=-3), "sparq_k"), (dict(sparq_k=2.5), "sparq_k"),
    (dict(sparq_k=True), "sparq_k"), (dict(sparq_compression=0), "sparq_compression"),
    (dict(sparq_compression=1.5), "sparq_compression"), (dict(sparq_compression=float("nan")), "sparq_compression"),
    (dict(sparq_k=64, sparq_compression=0.25), "sparq_k or sparq_compression"),
    (dict(sparq_k=64, sparq_r=0), "sparq_r"), (dict(sparq_k=64, sparq_l=65), "sparq_l"),
    (dict(sparq_k=64, sparq_l=-1), "sparq_l"), (dict(sparq_k=64, sparq_min_ctx=-1), "sparq_min_ctx"),
    (dict(sparq_k=64, sparq_realloc="yes"), "sparq_realloc"), (dict(sparq_k=64, sparq_layers=(4, 2)), "sparq_layers"),
    (dict(sparq_k=64, sparq_mirror="int4"), "sparq_mirror"),
    (dict(sparq_r=8), "sparq_k or sparq_compression"), (dict(sparq_kk=8), "unknown SparQ argument"),
    (dict(sparq_k=64, flash_attn=False), "flash_attn=True"),
])
def test_bad_arguments_raise_value_error_before_loading(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        Llama("/nonexistent/model.gguf", **kwargs)  # refused before the (missing) model is read


def test_bad_values_on_a_live_model():
    llm = _llm("smollm2-135m")
    with pytest.raises(ValueError, match="sparq_r"):
        llm.set_sparq(k=64, r=65)  # head size is 64
    with pytest.raises(ValueError, match="sparq_compression"):
        llm.set_sparq(compression=1 / 64, r=8)  # r alone reads 9/256 (int8 mirror), 1/16 (float)
    with pytest.raises(ValueError, match="sparq_layers"):
        llm.set_sparq(k=64, layers=(30, 40))
    assert llm.sparq is None  # nothing changed
    plain = Llama("smollm2-135m", n_ctx=512, verbose=False)  # flash_attn off: V transposed
    with pytest.raises(ValueError, match="flash_attn=True"):
        plain.set_sparq(k=64)


def test_c_api_returns_error_codes():
    llm = _llm("smollm2-135m")
    ctx = ffi.cast("struct llama_context *", llm._ctx.ctx)
    p = ffi.new("struct llama_sparq_params *")
    assert lib.llama_sparq_set(ffi.NULL, p) == -1
    cases = [dict(k=-1), dict(k=0, compression=0), dict(k=8, compression=0.5), dict(k=0, compression=2.0),
             dict(k=0, compression=float("nan")), dict(k=8, compression=0, r=-2), dict(k=8, compression=0, l=9),
             dict(k=8, compression=0, mean_realloc=2), dict(k=8, compression=0, min_ctx=-5),
             dict(k=8, compression=0, layer_start=5, layer_end=3), dict(k=8, compression=0, r=1000),
             dict(k=8, compression=0, mirror=2), dict(k=8, compression=0, mirror=-1)]
    for c in cases:
        p[0] = lib.llama_sparq_default_params()
        for f, v in c.items():
            setattr(p, f, v)
        assert lib.llama_sparq_set(ctx, p) < 0, c
    assert lib.llama_sparq_get(ctx, ffi.NULL) == 0
    p[0] = lib.llama_sparq_default_params()
    assert lib.llama_sparq_set(ctx, p) == 0
    assert lib.llama_sparq_get(ctx, ffi.NULL) == 1
    assert lib.llama_sparq_set(ctx, ffi.NULL) == 0


@pytest.mark.parametrize("path", ["fused", "ops"])
@pytest.mark.parametrize("unified", [False, True])
def test_seq_cp_and_seq_keep_then_decode_equal_a_fresh_context(unified, path, essay_text):
    # seq_cp is metadata only in one stream and a whole-stream copy across streams; seq_keep
    # frees the other sequence's cells. Either way the copied sequence then decodes as the
    # original would have in a fresh context.
    llm = _llm("smollm2-135m")
    toks = _tokens(llm, essay_text, 800)
    n_vocab = llm.n_vocab()
    params = SparqParams(compression=1 / 8, min_ctx=0, realloc=True, path=path)

    def gen(ctx, s, start, n=6):
        out, t = [], toks[790]
        for step in range(n):
            row = _decode(ctx, [(t, start + step, s)], n_vocab)[0]
            out.append(row)
            t = int(row.argmax())
        return np.array(out)

    ctx = _raw_context(llm, 2, unified)
    try:
        assert sparq_cpp.sparq.apply(ctx, params) == 0
        _prefill(ctx, 0, toks[:700], n_vocab)
        ref = gen(ctx, 0, 700)  # the reference continuation of seq 0, then undo it
        mem = llama_cpp.llama_get_memory(ctx)
        assert llama_cpp.llama_memory_seq_rm(mem, 0, 700, -1)
        llama_cpp.llama_memory_seq_cp(mem, 0, 1, -1, -1)
        llama_cpp.llama_memory_seq_keep(mem, 1)
        got = gen(ctx, 1, 700)
        assert _check(ctx) == (0, pytest.approx(0, abs=VSUM_TOL))
    finally:
        llama_cpp.llama_free(ctx)
    assert np.abs(got - ref).max() < 1e-3


def test_named_model_with_sparq_k_generates(essay_text):
    llm = Llama(model_path=sparq_cpp.model_path("smollm2-135m"), n_ctx=8192, sparq_k=64, verbose=False)
    out = llm.create_completion(essay_text[:6000] + "\n\nThe essay argues that", max_tokens=8, temperature=0.0)
    assert out["choices"][0]["text"].strip()
    st = llm.sparq_stats()
    assert st["n_tokens_sparq"] == 7 and st["n_layers_sparq"] == 30  # the first token comes from prefill


def test_backend_without_the_op_takes_the_portable_graph_or_stays_dense(tmp_path):
    # GGML_SPARQ_FORCE_UNSUPPORTED makes the CPU backend answer supports_op = false for the op,
    # as Metal or Vulkan (no fused SparQ kernel) do. With the default path ("auto") every layer
    # then runs the portable graph of standard ops; with path="fused" SparQ is refused per layer,
    # decoding stays dense and equal to dense, with one warning and no abort.
    import os
    import subprocess
    import sys

    code = """
import warnings, numpy as np
from sparq_cpp import Llama
prompt = "The capital of Germany is Berlin. " * 120
dense = Llama("smollm2-135m", n_ctx=2048, flash_attn=True, verbose=False)
a = dense.create_completion(prompt, max_tokens=8, temperature=0.0)["choices"][0]["text"]
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    llm = Llama("smollm2-135m", n_ctx=2048, sparq_k=16, sparq_min_ctx=0, verbose=False)
    llm.create_completion(prompt, max_tokens=8, temperature=0.0)
    st = llm.sparq_stats()
    print("AUTO WARNINGS", len(w), "SPARQ_TOKENS", st["n_tokens_sparq"], "OPS", st["n_layers_ops"], "OF", st["n_layers_sparq"])
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    llm = Llama("smollm2-135m", n_ctx=2048, sparq_k=16, sparq_min_ctx=0, sparq_path="fused", verbose=False)
b = llm.create_completion(prompt, max_tokens=8, temperature=0.0)["choices"][0]["text"]
print("WARNINGS", sum(issubclass(x.category, RuntimeWarning) for x in w))
print("SAME", a == b, "SPARQ_TOKENS", llm.sparq_stats()["n_tokens_sparq"], "SET", llm.sparq)
"""
    env = dict(os.environ, GGML_SPARQ_FORCE_UNSUPPORTED="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "AUTO WARNINGS 0 SPARQ_TOKENS 7 OPS 30 OF 30" in r.stdout, r.stdout
    assert "WARNINGS 1" in r.stdout and "SAME True SPARQ_TOKENS 0 SET None" in r.stdout, r.stdout
    assert "has no fused SparQ kernel" in r.stderr  # the library's one log line says why


SHAPES = {"smollm2-135m": (9, 3, 64), "gemma3-270m": (4, 1, 256)}  # query heads, KV heads, head size


@pytest.mark.parametrize("name", MODELS)
def test_plan_is_what_the_decode_reads(name, essay_text):
    # llama_sparq_plan, before any SparQ decode, says per layer what a token at that length reads;
    # the decode's own counters then count exactly that (the fused op, the portable graph, a fixed
    # k, reallocation's mean row, and a sequence below min_ctx, which stays dense)
    llm = _llm(name)
    toks = _tokens(llm, essay_text, 1201)
    llm.reset()
    llm.eval(toks[:1200])
    n_pos = 1201  # the next token sees the 1200 cached positions and itself
    for kw in (dict(compression=1 / 8), dict(compression=1 / 8, path="ops"), dict(k=64),
               dict(compression=1 / 4, realloc=True), dict(compression=1 / 8, min_ctx=2000)):
        plan = llm.sparq_plan(n_pos=n_pos, **kw)
        assert llm.sparq is None  # nothing was set
        llm.set_sparq(**kw)
        llm.sparq_stats(reset=True)
        llm.eval([toks[1200]])
        st = llm.sparq_stats()
        llm.n_tokens = 1200
        took = [p for p in plan if p["path"] != "dense"]
        # the same plan from the layer's shape alone (llama_sparq_plan_layer: no model)
        n_head, n_head_kv, d = SHAPES[name]
        alone = sparq_cpp.sparq.plan_shape(SparqParams(**kw), n_pos, n_head, n_head_kv, d, fused=kw.get("path") != "ops")
        for p in plan:
            if p["path"] != "dense" or kw.get("min_ctx") == 2000:
                assert {**p, "layer": 0} == alone, (kw, p, alone)
        if kw.get("min_ctx") == 2000:
            assert not took and st["n_tokens_sparq"] == 0, kw
        else:
            assert st["n_tokens_sparq"] == 1 and len(took) == st["n_layers_sparq"] > 0, kw
            assert all(p["path"] == ("ops" if kw.get("path") == "ops" else "fused") for p in took), kw
            assert sum(p["bytes"] for p in took) == pytest.approx(st["bytes_attn_sparq"], rel=1e-9), kw
            assert sum(p["bytes_dense"] for p in took) == pytest.approx(st["bytes_attn_dense"], rel=1e-9), kw
            if "k" in kw:
                assert all(p["k"] == 64 for p in took)
            else:
                assert all(p["l"] == p["k"] // 4 and 0 < p["k"] < n_pos for p in took)
        llm.set_sparq(None)
    with pytest.raises(ValueError, match="SparQ is off"):
        llm.sparq_plan()
    with pytest.raises(ValueError):
        llm.sparq_plan(compression=2.0)
