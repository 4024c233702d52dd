"""Model shapes with random weights built in memory, and a cache filled without a prefill
(sparq_cpp.shapes, `sparq-cpp bench --shape`): the state the fill writes is the library's own
layout byte for byte, and a cache filled that way decodes, dense and with SparQ, exactly as the
prefilled cache it was taken from."""

import json
import subprocess
import sys

import numpy as np
import pytest

from sparq_cpp import bench, shapes
from sparq_cpp._lib import llama_cpp
from sparq_cpp.sparq import SparqParams

TINY = "arch=llama,layers=2,embd=256,heads=4,kv_heads=2,head_dim=64,ff=512,vocab=1000"
N_PROMPT = 700


@pytest.fixture(scope="module")
def tiny():
    _, shape = shapes.parse_shape(TINY)
    m = shapes.ShapeModel(shape, "q4_0")
    yield m
    m.close()


def _ctx(model, flash_attn=True, n_ctx=2048):
    p = llama_cpp.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, 1024, 512, 1
    p.n_threads = p.n_threads_batch = 2
    p.flash_attn_type = 1 if flash_attn else 0
    return bench.DecodeContext(ctx=llama_cpp.llama_init_from_model(model.model, p))


def _prefill(c, tokens):
    arr = (llama_cpp.llama_token * len(tokens))(*tokens)
    assert llama_cpp.llama_decode(c.ctx, llama_cpp.llama_batch_get_one(arr, len(tokens))) == 0
    c.depth = len(tokens)


def _next_logits(c, token, n_vocab):
    one = (llama_cpp.llama_token * 1)(token)
    assert llama_cpp.llama_decode(c.ctx, llama_cpp.llama_batch_get_one(one, 1)) == 0
    row = llama_cpp.llama_get_logits_ith(c.ctx, -1)
    out = np.ctypeslib.as_array(row, shape=(n_vocab,)).copy()
    llama_cpp.llama_memory_seq_rm(c.mem, 0, c.depth, -1)
    return out


def test_shape_names_and_sizes():
    label, s = shapes.parse_shape("llama3-8b")
    assert (s.layers, s.heads, s.kv_heads, s.head_dim, s.ff, s.vocab) == (32, 32, 8, 128, 14336, 128256)
    assert shapes.parse_shape("llama3-8b,layers=4")[1].layers == 4
    assert shapes.parse_shape(TINY)[1].embd == 256
    for text, msg in [("llama-9b", "unknown"), ("llama3-8b,depth=3", "is not a size"),
                      ("arch=llama,layers=2", "needs embd"), ("llama3-8b,heads=30", "multiple of kv_heads"),
                      ("llama3-8b,layers=x", "takes an integer"), ("llama3-8b,arch=gpt2", "arch must be")]:
        with pytest.raises(ValueError, match=msg):
            shapes.parse_shape(text)
    with pytest.raises(ValueError, match="weights must be one of"):
        shapes.ShapeModel(shapes.parse_shape(TINY)[1], "q2_k")
    # the output matrix is q6_k (blocks of 256) for q4_0 weights: a 288-wide model cannot have it
    with pytest.raises(ValueError, match="not whole q6_k blocks of 256"):
        shapes.ShapeModel(shapes.parse_shape(TINY + ",embd=288")[1], "q4_0")


def test_model_weights_are_sane_and_counted(tiny):
    # every weight in range: a prompt decodes to finite logits, and the weights read per token are
    # the model's bytes less the token embeddings but one row
    c = _ctx(tiny)
    try:
        rng = np.random.default_rng(1)
        _prefill(c, [int(t) for t in rng.integers(0, 1000, 64)])
        logits = _next_logits(c, 5, 1000)
        assert np.all(np.isfinite(logits)) and logits.std() > 0
    finally:
        c.close()
    assert 0 < tiny.weight_bytes_per_token < tiny.weight_bytes


@pytest.mark.parametrize("flash_attn", [True, False], ids=["V rows", "V transposed"])
def test_state_layout_round_trips_byte_for_byte(tiny, flash_attn):
    c = _ctx(tiny, flash_attn)
    try:
        _prefill(c, [int(t) for t in np.random.default_rng(2).integers(0, 1000, N_PROMPT)])
        blob = shapes.seq_state(c.ctx)
    finally:
        c.close()
    lay, cells, ks, vs = shapes.SeqStateLayout.parse(blob, N_PROMPT)
    assert lay.v_trans == (not flash_attn) and len(lay.k) == 2
    assert cells == [(i, [0]) for i in range(N_PROMPT)] and lay.size(N_PROMPT) == len(blob)
    if lay.v_trans:  # stored [elements, cells]: back to rows, which write() transposes again
        vs = [v.reshape(n, N_PROMPT, a).transpose(1, 0, 2).reshape(N_PROMPT, n * a) for v, (_, a, n) in zip(vs, lay.v)]
    assert bytes(lay.write(N_PROMPT, lambda il: ks[il], lambda il: vs[il])) == blob


def test_filled_cache_decodes_as_the_prefilled_one(tiny):
    # a prefilled cache's K and V, written by the fill's writer into a fresh context: the next
    # token's logits are those of the prefilled context, dense and with SparQ (whose K^T mirror and
    # V sums the loaded context rebuilds), bit for bit
    toks = [int(t) for t in np.random.default_rng(3).integers(0, 1000, N_PROMPT)]
    a, b = _ctx(tiny), _ctx(tiny)
    try:
        _prefill(a, toks)
        lay, _, ks, vs = shapes.SeqStateLayout.parse(shapes.seq_state(a.ctx), N_PROMPT)
        shapes.load_seq_state(b.ctx, lay.write(N_PROMPT, lambda il: ks[il], lambda il: vs[il]))
        b.depth = N_PROMPT
        assert llama_cpp.llama_memory_seq_pos_max(b.mem, 0) == N_PROMPT - 1
        for params in (None, SparqParams(compression=1 / 8), SparqParams(k=32)):
            a.set_sparq(params)
            b.set_sparq(params)
            a.sparq_stats(reset=True)
            la, lb = _next_logits(a, 7, 1000), _next_logits(b, 7, 1000)
            assert np.array_equal(la, lb), params
            if params is not None:
                assert a.sparq_stats()["n_tokens_sparq"] == 1
        # and as a cache prefilled with SparQ on, whose mirror the prefill's own graphs wrote
        c = _ctx(tiny)
        try:
            c.set_sparq(SparqParams(compression=1 / 8))
            _prefill(c, toks)
            b.set_sparq(SparqParams(compression=1 / 8))
            assert np.array_equal(_next_logits(c, 7, 1000), _next_logits(b, 7, 1000))
        finally:
            c.close()
    finally:
        a.close()
        b.close()


def test_random_fill_takes_sparq_at_its_budget(tiny):
    c = _ctx(tiny)
    try:
        c.fill(1500)
        assert llama_cpp.llama_memory_seq_pos_max(c.mem, 0) == 1499
        assert shapes._state_seq_get_size(c.ctx, 0) == c.layout.size(1500)
        c.set_sparq(SparqParams(compression=1 / 8))
        c.sparq_stats(reset=True)
        logits = _next_logits(c, 3, 1000)
        st = c.sparq_stats()
        assert np.all(np.isfinite(logits))
        assert st["n_tokens_sparq"] == 1 and st["n_layers_sparq"] == 2
        assert st["read_fraction"] == pytest.approx(1 / 8, abs=0.01)
        # a fill again (the bench's next depth) replaces the sequence
        c.fill(900)
        assert llama_cpp.llama_memory_seq_pos_max(c.mem, 0) == 899
    finally:
        c.close()


def test_bench_on_a_shape_prints_the_bytes_limit_and_memory(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sparq_cpp.cli", "bench", "--shape", TINY, "-d", "1024", "-n", "2",
                        "-r", "1", "-s", "1/8,1/8:ops", "-o", "json", "--no-plot"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["random_weights"] and res["shape"] == TINY and res["weights"] == "q4_0"
    assert [row["setting"] for row in res["rows"]][:3] == ["dense FA off", "dense FA on", "SparQ 1/8"]
    _, fa, sq, ops = res["rows"]
    assert sq["sparq_token_fraction"] == 1 and 1 < sq["bytes_limit"] < 8
    # the decode graph's nodes: the fused op in place of flash attention, plus the mirror's
    # upkeep; the portable graph its 20-odd nodes per layer (2 layers) on top
    assert 0 < fa["graph_compute_nodes"] < sq["graph_compute_nodes"] <= fa["graph_compute_nodes"] + 2 * 4, (fa, sq)
    assert sq["graph_compute_nodes"] + 2 * 15 < ops["graph_compute_nodes"] <= fa["graph_compute_nodes"] + 2 * 30, ops
    assert all(row["graph_nodes"] >= row["graph_compute_nodes"] for row in res["rows"])
    m = res["memory"]
    # cells x layers x (K, V) x 2 KV heads of 64 in f16
    assert m["kv_bytes_per_context"] == m["n_ctx"] * 2 * 2 * 128 * 2 and m["sparq_extra_bytes"] > 0
    assert (tmp_path / "sparq-cpp-results" / "bench_shape_custom.json").exists()
    r = subprocess.run([sys.executable, "-m", "sparq_cpp.cli", "bench", "--shape", "llama-9b"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "--shape 'llama-9b': unknown" in r.stderr and len(r.stderr.strip().splitlines()) == 1
