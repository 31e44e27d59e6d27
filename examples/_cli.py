"""Command-line value checks shared by the examples and the benchmarks.

Each factory returns an argparse ``type=`` that converts the text and checks its range at
parse time, so a bad value is argparse's one-line error (exit 2) that names the flag, the
allowed range and the value given, never a traceback from deep inside a run::

    p.add_argument("--steps", type=int_range(1))            # error: argument --steps: expected an integer >= 1, got '-5'
    p.add_argument("--lr", type=float_range(0, lo_open=True))
"""

from __future__ import annotations

import argparse
import math
from typing import Callable, Optional

__all__ = ["ArgValueError", "float_range", "int_range"]


class ArgValueError(argparse.ArgumentTypeError, ValueError):
    """A command-line value out of range: argparse reports it in one line; code that calls the
    converter directly can catch it as a ``ValueError``."""


def _bounds(lo, hi, lo_open: bool, hi_open: bool) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}" if isinstance(lo, float) else f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}" if isinstance(hi, float) else f"{'<' if hi_open else '<='} {hi}")
    return " and ".join(parts)


def int_range(lo: Optional[int] = None, hi: Optional[int] = None) -> Callable[[str], int]:
    """An integer in ``[lo, hi]`` (either bound may be None)."""
    what = "an integer" + (f" {_bounds(lo, hi, False, False)}" if lo is not None or hi is not None else "")

    def convert(text: str) -> int:
        try:
            v = int(text)
        except (TypeError, ValueError):
            raise ArgValueError(f"expected {what}, got {text!r}") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ArgValueError(f"expected {what}, got {text!r}")
        return v

    convert.__name__ = what  # argparse names the type in some messages
    return convert


def float_range(lo: Optional[float] = None, hi: Optional[float] = None, *, lo_open: bool = False,
                hi_open: bool = False) -> Callable[[str], float]:
    """A finite number in ``[lo, hi]``; ``lo_open`` / ``hi_open`` exclude the bound."""
    what = "a number" + (f" {_bounds(float(lo) if lo is not None else None, float(hi) if hi is not None else None, lo_open, hi_open)}"
                         if lo is not None or hi is not None else "")

    def convert(text: str) -> float:
        try:
            v = float(text)
        except (TypeError, ValueError):
            raise ArgValueError(f"expected {what}, got {text!r}") from None
        bad = not math.isfinite(v)
        if lo is not None:
            bad |= v <= lo if lo_open else v < lo
        if hi is not None:
            bad |= v >= hi if hi_open else v > hi
        if bad:
            raise ArgValueError(f"expected {what}, got {text!r}")
        return v

    convert.__name__ = what
    return convert
