"""Helpers shared by the SparQ tests: raw llama.cpp contexts, batch decoding, the cache check."""

import numpy as np

from sparq_cpp import Llama, llama_cpp
from sparq_cpp._lib import ffi, lib


def check(llm_or_ctx):
    """(mirror elements differing from K, largest relative error of a running V sum)"""
    ctx = llm_or_ctx._ctx.ctx if isinstance(llm_or_ctx, Llama) else llm_or_ctx
    err = ffi.new("float *")
    n_bad = lib.llama_sparq_check(ffi.cast("struct llama_context *", ctx), err)
    return n_bad, err[0]


def raw_context(llm, n_seq, unified, n_ctx=4096):
    """A flash-attention llama_context on llm's model through the low-level API."""
    p = llama_cpp.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch = n_ctx, 512, 512
    p.n_seq_max, p.kv_unified = n_seq, unified
    p.n_threads = p.n_threads_batch = 2
    p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    ctx = llama_cpp.llama_init_from_model(llm._model.model, p)
    assert ctx
    return ctx


def decode(ctx, items, n_vocab, logits=True):
    """items: (token, pos, seq), with logits for every one (logits=False: for none); returns them."""
    batch = llama_cpp.llama_batch_init(len(items), 0, 1)
    try:
        for i, (t, pos, s) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, pos, 1, logits
            batch.seq_id[i][0] = s
        batch.n_tokens = len(items)
        assert llama_cpp.llama_decode(ctx, batch) == 0
        return [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy()
                for i in range(len(items))] if logits else []
    finally:
        llama_cpp.llama_batch_free(batch)


def prefill(ctx, seq, tokens, n_vocab, start=0, logits=True):
    """Decode tokens into seq from position start, 512 per batch."""
    for i in range(0, len(tokens), 512):
        decode(ctx, [(t, start + i + j, seq) for j, t in enumerate(tokens[i:i + 512])], n_vocab, logits)


# check()'s V-sum error when the sums are right: the library keeps them in fp64 and hands them to
# the op in fp32, so one fp32 rounding, 2^-24 = 6e-8 relative; 1e-6 leaves a margin for the
# (1 + |sum|) normalisation of sums near zero.
VSUM_TOL = 1e-6
