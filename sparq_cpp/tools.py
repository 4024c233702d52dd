"""llama.cpp's own programs built from the fork with --sparq-* flags: llama-bench, llama-cli and
llama-server in sparq_cpp/bin (`make tools`, or any build with SPARQ_BUILD_TOOLS=ON).

``sparq-cpp llama-bench -m smollm2-135m -d 8000 --sparq-compression 0,1/8`` runs the program with
the given arguments; a named model after ``-m``/``--model`` is replaced by its file (fetched on
first use), everything else goes through as given.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

TOOLS = ("llama-bench", "llama-cli", "llama-server")
BIN_DIR = Path(__file__).resolve().parent / "bin"


def tool_path(name: str) -> Path:
    if name not in TOOLS:
        raise ValueError(f"unknown tool {name!r}: one of {', '.join(TOOLS)}")
    p = Path(os.environ.get("SPARQ_CPP_TOOLS_DIR", BIN_DIR)) / name
    if not p.exists():
        raise FileNotFoundError(f"no {name} in {p.parent}: build the tools with `make tools` "
                                "(CMake option SPARQ_BUILD_TOOLS=ON)")
    return p


def resolve_models(args: List[str]) -> List[str]:
    """-m/--model NAME -> the model's file, for the named models (sparq_cpp.models)."""
    from .models import KNOWN_MODELS, model_path

    out = list(args)
    for i, a in enumerate(out[:-1]):
        if a in ("-m", "--model"):
            # llama-bench takes comma-separated models, as its other parameters
            parts = out[i + 1].split(",") if "," in out[i + 1] else [out[i + 1]]
            out[i + 1] = ",".join(str(model_path(p)) if p in KNOWN_MODELS else p for p in parts)
    return out


def main(name: str, argv: Optional[List[str]] = None) -> int:
    exe = tool_path(name)
    args = resolve_models(list(sys.argv[2:] if argv is None else argv))
    os.execv(str(exe), [str(exe)] + args)
    return 0  # not reached
