"""Robustness of SparQ decoding: batches of many sequences, settings changed between decodes,
an exhausted context, and a long generation."""

import numpy as np
import pytest

import sparq_cpp
from sparq_cpp import Llama, SparqParams, llama_cpp
from sparq_cpp.eval import last_logits as _logits
from sparq_util import check, decode, prefill, raw_context, VSUM_TOL

STEPS = 32


@pytest.fixture(scope="module")
def smollm2():
    return Llama("smollm2-135m", n_ctx=512, flash_attn=True, verbose=False)


@pytest.mark.parametrize("unified", [False, True], ids=["streams", "unified"])
@pytest.mark.parametrize("n_seq, path", [(2, "fused"), pytest.param(4, "fused", marks=pytest.mark.slow),
                                         pytest.param(8, "fused", marks=pytest.mark.slow), (4, "ops")])
# (make test: 2 sequences on the fused op, 4 on the portable graph; the slow set adds 4 and 8 fused)
def test_batched_sequences_match_each_alone(n_seq, path, unified, smollm2, essay_text):
    # n_seq sequences share a 256-token prefix through seq_cp, then get their own text (lengths
    # 23..282 tokens, so each has its own mask and V sum), then STEPS teacher-forced tokens each.
    # Decoding one token of every sequence in one llama_batch must give the logits that decoding
    # each sequence alone gives, at every step, with a shared (unified) cache and with one stream
    # per sequence. k = 24 with mean reallocation: the selection and the V mean both matter.
    # path "ops": the portable graph, which handles the streams one by one.
    llm = smollm2
    toks = llm.tokenize(essay_text.encode())
    n_vocab = llm.n_vocab()
    shared = toks[:256]
    own = [toks[1000 + 700 * s: 1000 + 700 * s + 23 + 37 * s] for s in range(n_seq)]
    feed = [toks[20000 + 100 * s: 20000 + 100 * s + STEPS] for s in range(n_seq)]
    start = [len(shared) + len(o) for o in own]
    params = SparqParams(k=24, min_ctx=0, realloc=True, path=path)

    def run(together):
        ctx = raw_context(llm, n_seq, unified, n_ctx=1024 * n_seq)
        try:
            assert sparq_cpp.sparq.apply(ctx, params) == 0
            prefill(ctx, 0, shared, n_vocab)
            mem = llama_cpp.llama_get_memory(ctx)
            for s in range(1, n_seq):
                llama_cpp.llama_memory_seq_cp(mem, 0, s, -1, -1)
            for s in range(n_seq):
                prefill(ctx, s, own[s], n_vocab, start=len(shared))
            out = np.zeros((n_seq, STEPS, n_vocab), dtype=np.float32)
            groups = [list(range(n_seq))] if together else [[s] for s in range(n_seq)]
            for step in range(STEPS):
                for g in groups:
                    rows = decode(ctx, [(feed[s][step], start[s] + step, s) for s in g], n_vocab)
                    for s, row in zip(g, rows):
                        out[s, step] = row
            n_bad, err = check(ctx)
            assert n_bad == 0 and err < VSUM_TOL
            assert sparq_cpp.sparq.stats(ctx)["n_tokens_sparq"] == n_seq * STEPS
            return out
        finally:
            llama_cpp.llama_free(ctx)

    together, alone = run(True), run(False)
    assert np.isfinite(together).all()
    diff = np.abs(together - alone).max()
    print(f"{n_seq} sequences, {'unified' if unified else 'streams'}, {path}: max |logit difference| {diff:.2e}")
    assert diff < 1e-3, diff  # measured 0: bit-identical on this machine


def test_settings_changed_between_decodes_keep_the_cache(smollm2, essay_text):
    # Change, disable and re-enable SparQ between decodes, on a full cache and after seq_rm, and
    # run the context out. After every change the live context must decode exactly as a context
    # rebuilt from its saved state with the same settings: nothing of the cache is lost or stale.
    llm = smollm2
    toks = llm.tokenize(essay_text.encode())[:600]
    other = Llama("smollm2-135m", n_ctx=512, flash_attn=True, verbose=False)

    def same_as_rebuilt(params, next_toks):
        state = llm.save_state()
        llm.set_sparq(params)
        live = []
        for t in next_toks:
            llm.eval([t])
            live.append(_logits(llm))
        other.load_state(state)  # a fresh context: mirror and V sums built from the cache
        other.set_sparq(params)
        ref = []
        for t in next_toks:
            other.eval([t])
            ref.append(_logits(other))
        assert np.isfinite(live).all() and np.abs(np.array(live) - np.array(ref)).max() < 1e-4
        n_bad, err = check(llm)
        assert n_bad == 0 and err < VSUM_TOL

    llm.set_sparq(k=32, min_ctx=0)
    llm.reset()
    llm.eval(toks[:400])
    same_as_rebuilt(SparqParams(compression=1 / 4, min_ctx=0, realloc=True), toks[400:404])
    same_as_rebuilt(None, toks[404:408])  # dense between SparQ decodes
    same_as_rebuilt(SparqParams(k=16, l=4, min_ctx=0), toks[408:412])
    llm.n_tokens = 300  # the next eval removes positions >= 300 (seq_rm)
    same_as_rebuilt(SparqParams(k=48, min_ctx=0, no_tau=True), toks[300:304])

    llm.eval(toks[304:304 + 512 - 304 - 1])  # fill the context to 511 of 512 cells
    same_as_rebuilt(SparqParams(k=32, min_ctx=0, realloc=True), toks[511:512])  # the last cell
    assert llm.n_tokens == 512
    state = llm.save_state()
    with pytest.raises(RuntimeError):  # what llama-cpp-python raises when the cache is full
        llm.eval(toks[512:513])
    with pytest.raises(ValueError, match="exceed context window"):
        llm.create_completion(toks[:600], max_tokens=1)
    # neither failure changed the cache: the rebuilt context and the live one still agree
    llm.n_tokens = 500
    other.load_state(state)
    other.n_tokens = 500
    a = []
    b = []
    for t in toks[500:504]:
        llm.eval([t])
        other.eval([t])
        a.append(_logits(llm))
        b.append(_logits(other))
    assert np.abs(np.array(a) - np.array(b)).max() < 1e-4
    n_bad, err = check(llm)
    assert n_bad == 0 and err < VSUM_TOL
    llm.set_sparq(None)
    other.close()


@pytest.mark.slow  # CI: make test-slow
def test_long_generation_stays_finite_and_keeps_exact_v_sums(essay_text):
    # 4096 generated tokens after a 4096-token prompt at compression 1/8 with mean reallocation:
    # no NaN or Inf in any step's logits, and every 512 steps the running V sums (the mean's
    # numerators) equal a fresh fp64 recomputation from the cache to fp32 rounding.
    llm = Llama("smollm2-135m", n_ctx=8192, sparq_compression=1 / 8, sparq_realloc=True, verbose=False)
    prompt = llm.tokenize(essay_text.encode())[:4096]
    llm.eval(prompt)
    worst = 0.0
    for step in range(4096):
        row = _logits(llm)
        assert np.isfinite(row).all(), f"non-finite logits at step {step}"
        llm.eval([int(row.argmax())])
        if (step + 1) % 512 == 0:
            n_bad, err = check(llm)
            assert n_bad == 0, f"{n_bad} mirror elements differ from K at step {step}"
            assert err < VSUM_TOL, (step, err)
            worst = max(worst, err)
    assert np.isfinite(_logits(llm)).all()
    st = llm.sparq_stats()
    print(f"long run: {st['n_tokens_sparq']} SparQ tokens, largest V-sum error {worst:.2e} "
          f"(allowed {VSUM_TOL:.0e})")
    assert llm.n_tokens == 8192 and st["n_tokens_sparq"] == 4096


def test_compression_holds_for_every_sequence_of_a_shared_cache(smollm2, essay_text):
    # A compression is a promise about the bytes each sequence reads: with a short sequence beside
    # a long one in one cache (whose length n_kv the long one sets, padded), each reads 1/8 of its
    # own dense attention, alone and decoded together. The bound: k is rounded to whole rows, 1/S.
    # The short sequence's logits are the same with the long one in the cache as without it: its
    # selection depends on its own length only.
    llm = smollm2
    toks = llm.tokenize(essay_text.encode())
    n_vocab = llm.n_vocab()
    lengths = {0: 600, 1: 1900}
    params = SparqParams(compression=1 / 8)
    unified = True  # one cache whose length the long sequence sets (with a stream per sequence, each has its own)

    def short_alone_logits(ctx):
        return np.array([decode(ctx, [(toks[20000 + step], lengths[0] + step, 0)], n_vocab)[0] for step in range(8)])

    ctx = raw_context(llm, 1, unified, n_ctx=1024)  # the short sequence in a cache of its own
    try:
        assert sparq_cpp.sparq.apply(ctx, params) == 0
        prefill(ctx, 0, toks[:lengths[0]], n_vocab)
        own_cache = short_alone_logits(ctx)
    finally:
        llama_cpp.llama_free(ctx)

    ctx = raw_context(llm, 2, unified, n_ctx=4096)
    try:
        assert sparq_cpp.sparq.apply(ctx, params) == 0
        for s, n in lengths.items():
            prefill(ctx, s, toks[5000 * s: 5000 * s + n], n_vocab)
        mem = llama_cpp.llama_get_memory(ctx)
        for groups in ([[0]], [[1]], [[0, 1]]):
            sparq_cpp.sparq.reset_stats(ctx)
            if groups == [[0]]:
                shared = short_alone_logits(ctx)
                diff = np.abs(shared - own_cache).max()
                print(f"short sequence, shared cache against its own: max |logit difference| {diff:.2e}")
                assert diff < 1e-3, diff
            else:
                for step in range(8):
                    for g in groups:
                        decode(ctx, [(toks[20000 + step], lengths[s] + step, s) for s in g], n_vocab)
            for s, n in lengths.items():
                llama_cpp.llama_memory_seq_rm(mem, s, n, -1)
            st = sparq_cpp.sparq.stats(ctx)
            print(f"sequences {groups}: reads {st['read_fraction']:.4f} of dense")
            assert st["n_tokens_sparq"] == 8 * sum(len(g) for g in groups)
            assert abs(st["read_fraction"] - 1 / 8) < 1 / min(lengths.values()), st["read_fraction"]
    finally:
        llama_cpp.llama_free(ctx)
