"""The Python side of the C API matches native/src/include/llama-sparq.h: the cffi declarations of
the two structs (size and every field's offset, as a C compiler lays them out) and the status codes.
Nothing else checks the hand-copied declarations in sparq_cpp/_lib.py."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sparq_cpp._lib import SparqStatus, ffi

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "native" / "src" / "include" / "llama-sparq.h"
STRUCTS = ("llama_sparq_params", "llama_sparq_stats", "llama_sparq_layer_plan")


def _fields(struct):
    """Field names of a struct in the header, in order."""
    text = HEADER.read_text()
    body = re.search(r"struct %s \{(.*?)\};" % struct, text, re.S).group(1)
    return re.findall(r"^\s*\w+\s+(\w+);", body, re.M)


def _upstream_include_dirs():
    """llama.h and ggml.h of the patched upstream tree in a build folder (any of them)."""
    for inc in sorted(ROOT.glob("build/*/upstream/llama.cpp/include")):
        ggml = inc.parent / "ggml" / "include"
        if (inc / "llama.h").exists() and (ggml / "ggml.h").exists():
            return [inc, ggml]
    pytest.fail("no build folder with the patched upstream headers: run `make build`")


def test_cffi_struct_layout_matches_the_header(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    assert cc, "a C compiler is needed (the build needs one too)"
    lines = ['#include <stddef.h>', '#include <stdio.h>', '#include "llama-sparq.h"', "int main(void) {"]
    for s in STRUCTS:
        lines.append(f'printf("{s} sizeof %zu\\n", sizeof(struct {s}));')
        for f in _fields(s):
            lines.append(f'printf("{s} {f} %zu\\n", offsetof(struct {s}, {f}));')
    for name in SparqStatus.__members__:
        lines.append(f'printf("status {name} %d\\n", (int) LLAMA_SPARQ_{name});')
    lines += ["return 0;", "}"]
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "layout"
    inc = [f"-I{d}" for d in [HEADER.parent, *_upstream_include_dirs()]]
    r = subprocess.run([cc, *inc, str(src), "-o", str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    c = {}
    for line in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines():
        *key, value = line.split()
        c[tuple(key)] = int(value)

    for s in STRUCTS:
        fields = _fields(s)
        assert fields, s
        assert ffi.sizeof(f"struct {s}") == c[(s, "sizeof")], s
        py_fields = [name for name, _ in ffi.typeof(f"struct {s}").fields]
        assert py_fields == fields, (s, py_fields, fields)
        for f in fields:
            assert ffi.offsetof(f"struct {s}", f) == c[(s, f)], (s, f)
    for name, member in SparqStatus.__members__.items():
        assert member.value == c[("status", name)], name


def _enum(name):
    """{member (without LLAMA_SPARQ_): value} of one enum of the header"""
    body = re.search(r"enum " + name + r" \{(.*?)\};", HEADER.read_text(), re.S).group(1)
    return {m: int(v) for m, v in re.findall(r"LLAMA_SPARQ_(\w+)\s*=\s*(-?\d+)", body)}


def test_every_status_of_the_header_is_named_in_python():
    names = set(_enum("llama_sparq_status"))
    assert names == set(SparqStatus.__members__), names ^ set(SparqStatus.__members__)


def test_paths_of_the_header_are_pythons():
    from sparq_cpp.sparq import SPARQ_PATHS

    assert _enum("llama_sparq_path") == {f"PATH_{p.upper()}": i for i, p in enumerate(SPARQ_PATHS)}


def test_mirrors_of_the_header_are_pythons():
    from sparq_cpp.sparq import SPARQ_MIRRORS

    assert _enum("llama_sparq_mirror") == {f"MIRROR_{m.upper()}": i for i, m in enumerate(SPARQ_MIRRORS)}


def test_default_min_ctx_of_the_header_is_pythons():
    from sparq_cpp.sparq import DEFAULT_MIN_CTX

    m = re.search(r"#define LLAMA_SPARQ_DEFAULT_MIN_CTX (\d+)", HEADER.read_text())
    assert m and int(m.group(1)) == DEFAULT_MIN_CTX
