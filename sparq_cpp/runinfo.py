"""What a results file records about its run, and writing it: the command, the commit, the machine;
JSON and an optional plot. Imports nothing of the package's library, so that scripts about the
native op alone (scripts/bench_op.py) can load this module by itself."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """Short commit of the source tree, or "unknown" (an installed package has none)."""
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), or what platform knows of it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_threads() -> int:
    """llama.cpp's default thread count (common's cpu_get_num_math): the physical cores, counted
    from the CPUs' thread siblings on Linux; else half of the logical CPUs when there are more than
    four, all of them otherwise."""
    siblings = set()
    for p in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology/thread_siblings"):
        try:
            siblings.add(p.read_text().strip())
        except OSError:
            pass
    if siblings:
        return len(siblings)
    n = os.cpu_count() or 1
    return n // 2 if n > 4 else n


def run_info(argv: Optional[list] = None) -> dict:
    """The command (as typed), the commit and the machine of this run."""
    argv = sys.argv if argv is None else argv
    cmd = ("sparq-cpp " + " ".join(argv[1:]) if Path(argv[0]).name == "sparq-cpp"
           else " ".join([Path(argv[0]).name] + list(argv[1:])))
    return {"command": cmd, "commit": git_commit(),
            "machine": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "system": platform.platform()}}


def save_outputs(result: dict, out: Optional[str], plot: Optional[Callable[[dict, str], None]] = None) -> None:
    """out.json, and out.png drawn by plot(result, path) when given; nothing without out."""
    if not out:
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps(result, indent=1))
    if plot is not None:
        plot(result, out + ".png")
    print(f"wrote {out}.json" + (f" and {out}.png" if plot is not None else ""), file=sys.stderr)
