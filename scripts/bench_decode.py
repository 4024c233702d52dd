#!/usr/bin/env python3
"""Decode speed, dense against SparQ: the same as ``sparq-cpp bench`` (see sparq_cpp/bench.py).

    python scripts/bench_decode.py -m smollm2-135m -d 512,1024,2048,4096,8000 -s 1/4,1/8,1/16,k=64
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sparq_cpp.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench"] + sys.argv[1:]))
