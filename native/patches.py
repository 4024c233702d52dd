"""The patch series over the pinned llama.cpp as git commits: edit upstream files on a branch,
write the series back from it, and check that the series is what its own commits give.

    python native/patches.py branch DIR   # DIR: a git repository of the pristine tree, then one
                                          # commit per patch of native/patches (named by it)
    python native/patches.py export DIR   # native/patches/*.patch written from DIR's commits
    python native/patches.py check        # the series applies to the pristine tree and comes
                                          # back byte-identical (tests/test_upstream.py)

To change a patch: `branch`, edit and `git commit --fixup` (or `git rebase -i`) in DIR so that each
commit stays one patch, `export`, rebuild. A new patch is a new commit whose subject is its file
name. Two series: native/patches/*.patch, always applied, then native/patches/rpc/*.patch, applied
when the RPC backend is built (SPARQ_RPC, on by default): their commits are named "rpc/NNNN-name.patch".
The pristine tree is the one `make build` extracts (build/native/upstream/pristine, from
the pinned llama-cpp-python sdist); docs/upstream.md has the steps to move to a newer one.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATCHES = ROOT / "native" / "patches"
PRISTINE = ROOT / "build" / "native" / "upstream" / "pristine"

# fixed, whatever the user's git configuration says: the series must come out the same anywhere
GIT = ["git", "-c", "user.name=sparq-cpp", "-c", "user.email=sparq-cpp@localhost", "-c", "core.autocrlf=false",
       "-c", "diff.noprefix=false", "-c", "diff.mnemonicPrefix=false", "-c", "diff.renames=false",
       "-c", "commit.gpgsign=false", "-c", "core.hooksPath=/dev/null"]


def _git(repo: Path, *args: str) -> str:
    r = subprocess.run([*GIT, "-C", str(repo), *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"error: git {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


# the series in the order they are applied: the main one, then the RPC backend's
SERIES = ("", "rpc/")


def patch_files(patches: Path = PATCHES) -> list:
    return [p for sub in SERIES for p in sorted(patches.glob(f"{sub}*.patch"))]


def _name(patches: Path, p: Path) -> str:
    return p.relative_to(patches).as_posix()


def branch(dest: Path, pristine: Path = PRISTINE, patches: Path = PATCHES) -> None:
    """dest: the pristine tree as one commit, then each patch applied and committed under its name"""
    if not pristine.is_dir():
        sys.exit(f"error: no pristine tree at {pristine} (`make build` extracts it)")
    if dest.exists():
        sys.exit(f"error: {dest} exists")
    shutil.copytree(pristine, dest)
    _git(dest, "init", "-q")
    _git(dest, "add", "-A")
    _git(dest, "commit", "-q", "-m", "pristine")
    for p in patch_files(patches):
        r = subprocess.run([*GIT, "-C", str(dest), "apply", "--whitespace=nowarn", str(p)], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"error: {_name(patches, p)} does not apply: {r.stderr.strip()}")
        _git(dest, "add", "-A")
        _git(dest, "commit", "-q", "-m", _name(patches, p))


def series(repo: Path) -> dict:
    """file name -> text of each patch, from the commits after the last one named "pristine" (the
    upstream tree; a rebase onto a newer one leaves the older below it), each named by its file"""
    commits = _git(repo, "rev-list", "--reverse", "HEAD").split()
    subjects = [_git(repo, "log", "-1", "--format=%s", c).strip() for c in commits]
    if "pristine" not in subjects:
        sys.exit(f"error: {repo} has no commit named 'pristine' (the upstream tree)")
    commits = commits[len(subjects) - 1 - subjects[::-1].index("pristine"):]
    out = {}
    for prev, c in zip(commits, commits[1:]):
        name = _git(repo, "log", "-1", "--format=%s", c).strip()
        if not name.endswith(".patch") or not any(name.startswith(s) and "/" not in name[len(s):] for s in SERIES):
            sys.exit(f"error: commit {c[:12]}: its subject must be the patch's file name (rpc/ for the RPC "
                     f"series), not {name!r}")
        out[name] = _git(repo, "diff", "--no-color", "--no-ext-diff", "--full-index", "--no-renames", prev, c)
    return out


def export(repo: Path, patches: Path = PATCHES) -> list:
    """native/patches from repo's commits: changed files written, patches no commit has removed"""
    new = series(repo)
    changed = []
    for old in patch_files(patches):
        if _name(patches, old) not in new:
            old.unlink()
            changed.append(_name(patches, old))
    for name, text in new.items():
        f = patches / name
        if not f.exists() or f.read_text() != text:
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(text)
            changed.append(name)
    return changed


def check(pristine: Path = PRISTINE, patches: Path = PATCHES) -> list:
    """the patches whose text differs from what their own commits give (empty: the series is exact)"""
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "tree"
        branch(repo, pristine, patches)
        new = series(repo)
    names = {_name(patches, p): p for p in patch_files(patches)}
    return [n for n, p in names.items() if new.get(n) != p.read_text()] + [n for n in new if n not in names]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("branch", "export", "check"))
    ap.add_argument("dir", nargs="?", type=Path, help="the git repository (branch, export)")
    ap.add_argument("--pristine", type=Path, default=PRISTINE)
    args = ap.parse_args(argv)
    if args.command != "check" and args.dir is None:
        ap.error(f"{args.command} needs DIR")
    if args.command == "branch":
        branch(args.dir, args.pristine)
        print(f"{args.dir}: the pristine tree and {len(patch_files())} patch commits")
    elif args.command == "export":
        changed = export(args.dir)
        print("written: " + (", ".join(changed) if changed else "nothing (the series is unchanged)"))
    else:
        bad = check(args.pristine)
        if bad:
            print("these patches are not what their own commits give (regenerate with branch + export): " + ", ".join(bad))
            return 1
        print("the series applies to the pristine tree and regenerates byte-identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
