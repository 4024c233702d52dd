#!/usr/bin/env python3
"""Accuracy against dense decoding: the same as ``sparq-cpp eval`` (see sparq_cpp/eval.py).

    python scripts/eval_accuracy.py -m smollm2-135m,gemma3-270m
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sparq_cpp.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval"] + sys.argv[1:]))
