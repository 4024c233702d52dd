"""The patch series over the pinned llama.cpp is what its own commits give (native/patches.py):
applied to the pristine tree one commit per patch, it regenerates byte-identical, so a change made
on that branch and exported is the only way the series changes."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_patch_series_regenerates_byte_identical():
    if not (ROOT / "build" / "native" / "upstream" / "pristine").is_dir():
        pytest.fail("no pristine upstream tree: `make build` extracts it")
    r = subprocess.run([sys.executable, str(ROOT / "native" / "patches.py"), "check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "byte-identical" in r.stdout


def test_rpc_series_is_ggml_rpc_alone():
    # the RPC backend's series (applied when it is built) and the main series touch separate files:
    # a build without RPC gets upstream's ggml-rpc, and either series applies without the other
    def files(patches):
        return {line[len("+++ b/"):].strip() for p in patches for line in p.read_text().splitlines()
                if line.startswith("+++ b/")}

    main = files(sorted((ROOT / "native" / "patches").glob("*.patch")))
    rpc = files(sorted((ROOT / "native" / "patches" / "rpc").glob("*.patch")))
    assert rpc and all(f.startswith(("ggml/src/ggml-rpc/", "ggml/include/ggml-rpc.h")) for f in rpc), rpc
    assert not main & rpc, main & rpc
