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
