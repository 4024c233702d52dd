"""The read budget as every tool takes it: ``1/8`` or ``0.125``, one parser that refuses what it
cannot parse. Imports nothing of the package's library (scripts/bench_op.py loads it alone)."""

from __future__ import annotations

import math


def parse_fraction(text: str) -> float:
    """'1/8' or '0.125' -> float; ValueError otherwise."""
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"not a fraction: {text!r}") from None


def parse_compression(text: str) -> float:
    """A read budget: a fraction of dense attention's reads in (0, 1], as '1/8' or '0.125';
    ValueError for anything else."""
    c = parse_fraction(text)
    if not (math.isfinite(c) and 0 < c <= 1):
        raise ValueError(f"a compression must be in (0, 1] (1/8 or 0.125), got {text!r}")
    return c
