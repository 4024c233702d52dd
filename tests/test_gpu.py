"""SparQ decode with the model's layers on a GPU device (the portable graph of standard ops),
against CPU SparQ (the fused op) in the same process. Runs where the library under test has a
GPU backend and a device: `make test-vulkan` (a Vulkan build in build/vulkan, Mesa's lavapipe as
the device, GGML_VK_VISIBLE_DEVICES=0) and scripts/device_check.sh (CUDA). In `make test` (CPU
library) it is skipped."""

import numpy as np
import pytest

from sparq_cpp import Llama
from sparq_cpp._lib import backend_devices

from test_sparq import ROUNDING, _teacher_forced, _tokens


def _gpu_devices():
    return [name for name, _ in backend_devices() if name != "CPU" and not name.startswith(("BLAS", "RPC"))]


pytestmark = pytest.mark.skipif(not _gpu_devices(), reason="the library under test has no GPU device "
                                "(make test-vulkan, scripts/device_check.sh)")


def _decode(essay_text, runs, **sparq):
    """smollm2-135m, 600 prompt tokens, SparQ 1/8 from 256 cells, 24 teacher-forced tokens, once
    per run's settings: their logits and sparq_stats()"""
    out, stats = {}, {}
    for where, kw in runs.items():
        llm = Llama("smollm2-135m", n_ctx=1024, n_batch=512, n_threads=2, logits_all=True, verbose=False,
                    sparq_compression=1 / 8, sparq_min_ctx=256, **kw, **sparq)
        try:
            toks = _tokens(llm, essay_text, 624)
            out[where] = _teacher_forced(llm, toks[:600], toks[600:624])
            stats[where] = llm.sparq_stats()
        finally:
            llm.close()
    return out, stats


def test_sparq_decode_on_the_gpu_equals_cpu_sparq(essay_text):
    # 600 prompt tokens, SparQ from 256 cells on (n_kv 768 > k = 48 at 1/8), 24 teacher-forced
    # tokens: on the GPU device every SparQ layer runs the portable graph (no GPU backend has a
    # fused kernel), on the CPU the fused op, both with the F16 K^T mirror (the portable graph's;
    # the fused op's default int8 mirror reads other rows for the same budget)
    out, stats = _decode(essay_text, {"cpu": dict(n_gpu_layers=0), "gpu": dict(n_gpu_layers=-1)},
                         sparq_realloc=True, sparq_mirror="float")
    dev = _gpu_devices()[0]
    print("cpu:", stats["cpu"], "\ngpu:", stats["gpu"])
    assert stats["cpu"]["devices"] == {"CPU": 30} and stats["cpu"]["n_layers_ops"] == 0
    assert stats["gpu"]["devices"] == {dev: 30}, stats["gpu"]
    assert stats["gpu"]["n_layers_ops"] == 30
    assert stats["gpu"]["n_tokens_sparq"] == stats["cpu"]["n_tokens_sparq"] == 24
    diff = np.abs(out["gpu"] - out["cpu"]).max()
    agree = (out["gpu"].argmax(-1) == out["cpu"].argmax(-1)).mean()
    print(f"{dev} SparQ vs CPU SparQ: max |logit diff| {diff:.3f}, top-1 agreement {agree:.3f}")
    assert diff < ROUNDING["smollm2-135m"]


def test_weights_on_the_gpu_cache_on_the_cpu_takes_the_fused_op(essay_text):
    # offload_kqv=False (llama.cpp's --no-kv-offload): the weights on the GPU device, the KV cache
    # and the attention on the CPU, where SparQ runs the fused op; the same logits as all on the CPU
    out, stats = _decode(essay_text, {"cpu": dict(n_gpu_layers=0), "split": dict(n_gpu_layers=-1, offload_kqv=False)})
    print("cpu:", stats["cpu"], "\nsplit:", stats["split"])
    assert stats["split"]["devices"] == {"CPU": 30} and stats["split"]["n_layers_ops"] == 0, stats["split"]
    assert stats["split"]["n_tokens_sparq"] == stats["cpu"]["n_tokens_sparq"] == 24
    diff = np.abs(out["split"] - out["cpu"]).max()
    print(f"weights on {_gpu_devices()[0]}, cache on the CPU: max |logit diff| to all on the CPU {diff:.3f}")
    assert diff < ROUNDING["smollm2-135m"]
