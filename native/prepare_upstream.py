#!/usr/bin/env python3
"""Fetch, check, extract, patch and overlay the pinned llama.cpp source tree.

Run by CMakeLists.txt at configure time; can also be run by hand:

    python3 native/prepare_upstream.py --dest build/upstream \
        --package llama-cpp-python --version 0.3.36 --sha256 <hash>

Steps:
1. Find ``<package>-<version>.tar.gz`` in the cache folder (``$SPARQ_CPP_CACHE`` or
   ``~/.cache/sparq-cpp``); if it is missing or its sha256 is wrong, download it by package name
   with ``pip download --no-deps --no-binary <package>`` (its build requirements come as wheels:
   with ``:all:`` pip builds them from source too, minutes of work) and check the sha256 again.
2. Extract only the parts of ``vendor/llama.cpp`` that the build needs into ``<dest>/pristine``
   (once per tarball).
3. Build the patched tree in a scratch folder: copy pristine, apply ``native/patches/*.patch`` in
   name order, then with ``--rpc`` (the RPC backend is built) ``native/patches/rpc/*.patch`` (a
   patch that does not apply stops with its name), overlay ``native/src/``.
4. Sync the scratch tree into ``<dest>/llama.cpp``, writing only the files whose content changed,
   so that a second build reuses the first one's objects.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from patches import SERIES  # noqa: E402  (the series and their order: native/patches.py)

# Parts of vendor/llama.cpp the build uses. Everything else (docs, models, examples, web UI
# assets, python tooling) stays in the tarball.
NEEDED = (
    "CMakeLists.txt",
    "LICENSE",
    "cmake/",
    "common/",
    "ggml/",
    "include/",
    "licenses/",
    "src/",
    "tests/test-backend-ops.cpp",
    "tests/test-llama-archs.cpp",
    "scripts/ui-assets.cmake",
    "tools/CMakeLists.txt",
    "tools/cli/",
    "tools/llama-bench/",
    "tools/mtmd/",
    "tools/rpc/",
    "tools/server/",
    "tools/ui/CMakeLists.txt",
    "tools/ui/ui.cpp.in",
    "tools/ui/ui.h.in",
    "vendor/",
)


def log(msg: str) -> None:
    print(f"[sparq-cpp upstream] {msg}", file=sys.stderr, flush=True)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    env = os.environ.get("SPARQ_CPP_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sparq-cpp"


def fetch(package: str, version: str, sha256: str) -> Path:
    cdir = cache_dir() / "upstream"
    cdir.mkdir(parents=True, exist_ok=True)
    name = f"{package.replace('-', '_')}-{version}.tar.gz"
    tarball = cdir / name
    if tarball.exists() and sha256_of(tarball) == sha256:
        log(f"using cached {tarball}")
        return tarball
    if tarball.exists():
        log(f"cached {tarball} has the wrong sha256, fetching it again")
        tarball.unlink()
    log(f"downloading {package}=={version} (source distribution) from the package index ...")
    with tempfile.TemporaryDirectory(dir=cdir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"{package}=={version}",
               "--no-deps", "--no-binary", package, "--dest", tmp, "--quiet"]
        # Our build environment usually has no network-isolated pip of its own; fall back to
        # any python3 with pip on PATH.
        r = subprocess.run(cmd)
        if r.returncode != 0 and shutil.which("python3"):
            cmd[0] = shutil.which("python3")
            r = subprocess.run(cmd)
        if r.returncode != 0:
            sys.exit(f"error: could not download {package}=={version} with pip")
        got = Path(tmp) / name
        if not got.exists():
            sys.exit(f"error: pip did not produce {name} (found: {os.listdir(tmp)})")
        actual = sha256_of(got)
        if actual != sha256:
            sys.exit(f"error: sha256 mismatch for {name}: expected {sha256}, got {actual}")
        shutil.move(str(got), tarball)
    log(f"fetched {tarball} (sha256 ok)")
    return tarball


def extract(tarball: Path, sha256: str, pristine: Path) -> None:
    stamp = pristine / ".sparq-pristine"
    want = sha256 + "\n" + ",".join(NEEDED)  # a new part of the tree to extract re-extracts
    if stamp.exists() and stamp.read_text() == want:
        return
    if pristine.exists():
        shutil.rmtree(pristine)
    pristine.mkdir(parents=True)
    log(f"extracting vendor/llama.cpp into {pristine}")
    with tarfile.open(tarball) as tf:
        members = []
        for m in tf.getmembers():
            parts = m.name.split("/", 3)
            # <pkg>-<ver>/vendor/llama.cpp/<rel>
            if len(parts) < 4 or parts[1] != "vendor" or parts[2] != "llama.cpp":
                continue
            rel = parts[3]
            if not any(rel == n or (n.endswith("/") and rel.startswith(n)) for n in NEEDED):
                continue
            if not (m.isfile() or m.isdir()):
                continue
            m.name = rel
            members.append(m)
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tf.extractall(pristine, members=members, **kwargs)
    stamp.write_text(want)


def apply_patches(tree: Path, patches: list[Path]) -> None:
    for p in patches:
        r = subprocess.run(["patch", "-p1", "--forward", "--batch", "--no-backup-if-mismatch",
                            "-s", "-d", str(tree), "-i", str(p)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.stderr.write(r.stdout + r.stderr)
            sys.exit(f"error: patch {p.name} does not apply to the pinned upstream tree")
        log(f"applied {p.name}")


def overlay(tree: Path, src: Path) -> None:
    for f in sorted(src.rglob("*")):
        if f.is_file():
            dst = tree / f.relative_to(src)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)


def sync(src: Path, dst: Path) -> int:
    """Make dst equal to src, touching only files whose content differs."""
    changed = 0
    dst.mkdir(parents=True, exist_ok=True)
    seen = set()
    for f in src.rglob("*"):
        rel = f.relative_to(src)
        seen.add(rel)
        out = dst / rel
        if f.is_dir():
            out.mkdir(parents=True, exist_ok=True)
        elif not out.exists() or not filecmp.cmp(f, out, shallow=False):
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, out)
            changed += 1
    for f in sorted(dst.rglob("*"), reverse=True):
        if f.relative_to(dst) not in seen:
            if f.is_dir():
                shutil.rmtree(f, ignore_errors=True)
            else:
                f.unlink()
            changed += 1
    return changed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", type=Path, help="work folder (required unless --fetch-only)")
    ap.add_argument("--fetch-only", action="store_true",
                    help="only fetch and check the tarball, and print its path")
    ap.add_argument("--package", required=True)
    ap.add_argument("--version", required=True)
    ap.add_argument("--sha256", required=True)
    ap.add_argument("--patches", type=Path, default=HERE / "patches")
    ap.add_argument("--src", type=Path, default=HERE / "src")
    ap.add_argument("--rpc", action="store_true", help="also apply the RPC backend's series (patches/rpc/)")
    args = ap.parse_args()

    tarball = fetch(args.package, args.version, args.sha256)
    if args.fetch_only:
        print(tarball)
        return
    if args.dest is None:
        ap.error("--dest is required")
    dest = args.dest.resolve()
    pristine = dest / "pristine"
    extract(tarball, args.sha256, pristine)

    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        work = Path(tmp) / "llama.cpp"
        shutil.copytree(pristine, work, ignore=shutil.ignore_patterns(".sparq-pristine"))
        for series in SERIES:
            if series != "rpc/" or args.rpc:
                apply_patches(work, sorted(args.patches.glob(f"{series}*.patch")))
        overlay(work, args.src)
        n = sync(work, dest / "llama.cpp")
    log(f"patched tree ready at {dest / 'llama.cpp'} ({n} files updated)")


if __name__ == "__main__":
    main()
