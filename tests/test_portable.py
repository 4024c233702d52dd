"""The portable SparQ graph (standard ggml ops: top_k, get_rows, mul_mat, soft_max, ...), which
backends without the fused op run (Vulkan, CUDA, Metal), against dense decoding and the fused op
on the CPU, where ``sparq_path="ops"`` forces it.

The two paths compute the same thing in a different order, so they agree to float rounding, and
for this model family rounding is large: the fused op alone, run with 1 and with 2 threads,
differs by up to 0.77 in a logit over 16 steps at k >= context (measured on smollm2-135m), so
"equal" is ROUNDING here too. Ties: the fused op counts approximate-score numerators below the
smallest normal float as 0 and gives ties to the lower position; the portable graph keeps what
ggml's soft_max gives there and takes ggml_top_k's (unordered) choice among equal scores.
"""

import numpy as np
import pytest

from sparq_cpp import Llama, SparqParams, SparqStatus, llama_cpp
from sparq_cpp._lib import ffi, lib
from sparq_util import VSUM_TOL, check
from test_sparq import MODELS, ROUNDING, _greedy, _llm, _teacher_forced, _tokens


@pytest.mark.slow  # CI: make test-slow
@pytest.mark.parametrize("name", MODELS)
def test_portable_graph_at_k_at_least_context_equals_dense_and_the_fused_op(name, essay_text):
    llm = _llm(name)
    # as test_k_at_least_context_equals_dense: 1540 + 63 tokens, k = 1700 >= every query's
    # visible count, n_kv = 1792 > k, so every step takes SparQ (the portable graph's top-k then
    # also picks cells the token cannot see; the mask keeps them out of the softmax)
    prompt = _tokens(llm, essay_text, 1540)
    dense_toks, dense_logits = _greedy(llm, prompt, 64)
    out = {}
    for path in ("fused", "ops"):
        llm.set_sparq(k=1700, l=0, min_ctx=0, path=path)
        llm.sparq_stats(reset=True)
        out[path] = _teacher_forced(llm, prompt, dense_toks[:-1])
        st = llm.sparq_stats()
        assert st["n_tokens_sparq"] == 63, st
        assert st["n_layers_ops"] == (st["n_layers_sparq"] if path == "ops" else 0), st
        assert st["devices"] == {"CPU": st["n_layers_sparq"]}, st
    d_dense = np.abs(out["ops"] - dense_logits[1:]).max()
    d_fused = np.abs(out["ops"] - out["fused"]).max()
    print(f"{name}: portable graph vs dense max |diff| {d_dense:.3f}, vs the fused op {d_fused:.3f}")
    assert d_dense < ROUNDING[name]
    assert d_fused < ROUNDING[name]


@pytest.mark.parametrize("cache", [pytest.param(c, marks=pytest.mark.slow) for c in ("q8_0", "f32")])
def test_portable_graph_on_q8_0_and_f32_caches(cache, essay_text):
    # k >= context, l = 0: dense to rounding, reading q8_0 rows (with the f16 mirror) or f32 rows
    t = {"q8_0": llama_cpp.GGML_TYPE_Q8_0, "f32": llama_cpp.GGML_TYPE_F32}[cache]
    llm = Llama("smollm2-135m", n_ctx=1280, n_batch=512, n_threads=2, logits_all=True, verbose=False,
                flash_attn=True, type_k=t, type_v=t, sparq_k=1110, sparq_l=0, sparq_min_ctx=0, sparq_path="ops")
    try:
        toks = _tokens(llm, essay_text, 1104)
        out = _teacher_forced(llm, toks[:1040], toks[1040:1104])
        st = llm.sparq_stats()
        assert st["n_tokens_sparq"] == 64 and st["n_layers_ops"] == st["n_layers_sparq"] > 0, st
        assert check(llm) == (0, pytest.approx(0.0, abs=VSUM_TOL))
        llm.set_sparq(None)
        dense = _teacher_forced(llm, toks[:1040], toks[1040:1104])
    finally:
        llm.close()
    diff = np.abs(out - dense).max()
    print(f"{cache} cache, portable graph at k >= context: max |diff| to dense {diff:.3f}")
    assert diff < ROUNDING["smollm2-135m"]


def test_path_argument():
    with pytest.raises(ValueError, match="sparq_path"):
        Llama("smollm2-135m", sparq_compression=1 / 8, sparq_path="gpu")
    llm = _llm("smollm2-135m")
    llm.set_sparq(compression=1 / 8, path="fused")
    assert llm.sparq_stats()["n_layers_ops"] == 0
    llm.set_sparq(compression=1 / 8, path="ops")
    st = llm.sparq_stats()
    assert st["n_layers_ops"] == st["n_layers_sparq"] == 30
    llm.set_sparq(compression=1 / 8)  # auto: the CPU has the fused op
    assert llm.sparq_stats()["n_layers_ops"] == 0
    # the C API: an unknown path is an error code, and nothing changes
    p = SparqParams(k=64).to_c()
    for bad in (-1, 3, 1 << 30):
        p.path = bad
        assert lib.llama_sparq_set(ffi.cast("struct llama_context *", llm._ctx.ctx), p) == SparqStatus.ERR_PATH
    assert llm.sparq_stats()["n_layers_sparq"] == 30 and llm.sparq.compression == 1 / 8
