"""argparse types that refuse, at parse time, numbers a command cannot run with."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _bounded(kind: type, ok: Callable[[float], bool], what: str) -> Callable[[str], float]:
    def parse(text: str):  # type: ignore[no-untyped-def]
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if math.isnan(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def positive(kind: type) -> Callable[[str], float]:
    """An int or float above 0."""
    return _bounded(kind, lambda v: v > 0, "above 0")


def at_least_0(kind: type) -> Callable[[str], float]:
    """An int or float of 0 or more."""
    return _bounded(kind, lambda v: v >= 0, "0 or more")


def unit_interval(text: str) -> float:
    """A number from 0 to 1, as the thresholds are (the server answers 400 otherwise)."""
    return _bounded(float, lambda v: 0 <= v <= 1, "between 0 and 1")(text)
