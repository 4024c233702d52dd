"""GGML_OP_SPARQ_ATTN: the C++ op tests built by `make build` (SPARQ_BUILD_TESTS=ON).

- test-sparq-op: the CPU kernel against a reference written independently of it (random and
  adversarial inputs, k >= S equals dense attention, NaN poison of everything that must not be read).
- test-backend-ops -b CPU -o SPARQ_ATTN: upstream's harness, the kernel's fast path against its
  own reference path (use_ref), on every registered case.
"""

import re
import subprocess
from pathlib import Path

import pytest

import os

# the op tests of the build under test: `make test-avx2` points SPARQ_CPP_BIN_DIR at its own build
BIN = Path(os.environ.get("SPARQ_CPP_BIN_DIR") or Path(__file__).resolve().parents[1] / "build" / "native" / "bin")


def _run(exe, *args, timeout=600):
    path = BIN / exe
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make build` (it builds the op tests)")
    return subprocess.run([str(path), *args], capture_output=True, text=True, timeout=timeout)


def test_sparq_op_against_reference_and_nan_poison():
    r = _run("test-sparq-op")
    print(r.stdout)
    m = re.search(r"(\d+) passed, (\d+) failed", r.stdout)
    assert m, r.stdout + r.stderr
    passed, failed = int(m.group(1)), int(m.group(2))
    assert r.returncode == 0 and failed == 0, r.stdout
    assert passed >= 100
    assert "poison" not in r.stdout  # no poison case among the failures


def test_backend_ops_sparq_attn_fast_vs_reference_path():
    r = _run("test-backend-ops", "-b", "CPU", "-o", "SPARQ_ATTN")
    out = r.stdout + r.stderr
    m = re.search(r"(\d+)/(\d+) tests passed", out)
    assert m, out[-3000:]
    assert r.returncode == 0, out[-3000:]
    assert m.group(1) == m.group(2) and int(m.group(2)) >= 200, m.group(0)
