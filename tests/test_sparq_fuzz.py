"""Random SparQ settings through Python and the C API: each is accepted and decodes to finite
logits, or is refused (ValueError / a negative status); nothing aborts."""

import os
import subprocess
import sys

import numpy as np

from sparq_cpp import Llama

# per argument: valid values and wrong ones (types, ranges, NaN/inf, huge)
_CHOICES = {
    "k": [1, 8, 64, 300, 4096, 2**31 - 1, 0, -1, 2.5, True, "8"],
    "compression": [0.125, 0.5, 1.0, 0.25, 0.02, 1e-9, 0, 1.5, float("nan"), float("inf"), -0.5],
    "r": [1, 8, 32, 64, 65, 10**9, 0, -3, 4.0],
    "l": [0, 4, 16, 64, 100, -1, None],
    "realloc": [True, False, 1, "yes"],
    "min_ctx": [0, 256, 512, 10**6, -1, 2**40],
    "layers": [(0, 4), (0, None), (28, 30), (4, 2), (30, 40), range(2, 9), [1, 3], 5, (0, 1, 2)],
    "no_tau": [True, False, 1],
}


def test_python_fuzz_1000_settings():
    rng = np.random.default_rng(1234)
    llm = Llama("smollm2-135m", n_ctx=512, n_batch=512, flash_attn=True, verbose=False, seed=0)
    prompt = llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 20)[:300]
    llm.eval(prompt)
    accepted = refused = 0
    for _ in range(1000):
        kwargs = {}
        base = rng.random()
        if base < 0.4:
            kwargs["k"] = int(rng.choice([8, 64, 200]))
        elif base < 0.8:
            kwargs["compression"] = float(rng.choice([0.125, 0.25, 0.5]))
        for key in rng.choice(list(_CHOICES), size=rng.integers(1, 4), replace=False):
            opts = _CHOICES[str(key)]
            kwargs[str(key)] = opts[rng.integers(len(opts))]
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        before = llm.sparq
        try:
            llm.set_sparq(**kwargs)
        except ValueError:
            refused += 1
            assert llm.sparq == before  # a refusal changes nothing
            continue
        accepted += 1
        llm.n_tokens = len(prompt)  # decode one token after the same prompt, with these settings
        llm.eval([prompt[-1]])
        assert np.isfinite(np.array(llm.scores[llm.n_tokens - 1])).all(), kwargs
    print(f"python fuzz: {accepted} accepted and decoded, {refused} refused")
    assert accepted > 50 and refused > 50


_C_FUZZ = r"""
import math, random, struct, sys
import numpy as np
from sparq_cpp import Llama, llama_cpp
from sparq_cpp._lib import ffi, lib
random.seed(99)
llm = Llama("smollm2-135m", n_ctx=512, n_batch=512, flash_attn=True, verbose=False)
ctx = ffi.cast("struct llama_context *", llm._ctx.ctx)
prompt = llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 20)[:300]
llm.eval(prompt)
ints = [0, 1, 2, 5, 8, 31, 64, 65, 255, 256, 600, 2**31 - 1, -1, -2, -7, -2**31]
floats = [0.0, 1e-9, 0.01, 0.125, 0.5, 1.0, 1.0001, -0.25, 3.0, float("nan"), float("inf"), -float("inf")]
ok = bad = 0
p = ffi.new("struct llama_sparq_params *")
for i in range(1000):
    p[0] = lib.llama_sparq_default_params()
    for f in ("k", "r", "l", "mean_realloc", "min_ctx", "layer_start", "layer_end"):
        if random.random() < 0.5:
            setattr(p, f, random.choice(ints))
    if random.random() < 0.5:
        p.compression = random.choice(floats)
    p.no_tau = random.random() < 0.2
    rc = lib.llama_sparq_set(ctx if random.random() > 0.01 else ffi.NULL, p)
    if rc < 0:
        bad += 1
        continue
    ok += 1
    llm.n_tokens = len(prompt)
    llm.eval([prompt[-1]])
    assert np.isfinite(np.array(llm.scores[llm.n_tokens - 1])).all()
print("C_FUZZ", ok, bad)
"""


def test_c_api_fuzz_1000_settings_in_a_subprocess():
    r = subprocess.run([sys.executable, "-c", _C_FUZZ], capture_output=True, text=True, timeout=900,
                       env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-3000:]  # an abort would show as a signal here
    line = [x for x in r.stdout.splitlines() if x.startswith("C_FUZZ")][0]
    ok, bad = map(int, line.split()[1:])
    print(f"C API fuzz: {ok} accepted and decoded, {bad} refused with an error code")
    assert ok + bad == 1000 and ok > 50 and bad > 50
