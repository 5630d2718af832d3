"""One set of argument checks: every bad argument gets a ValueError naming the argument and the value.

The messages follow one pattern, "{name} must be <what it must be>, got {name}={value!r}":

    check_int("n", 0, 1)                                     n must be an integer >= 1, got n=0
    check_int("k", 4, 1, 3)                                  k must be an integer in [1, 3], got k=4
    check_real("eps", 2.0, 0, 1)                             eps must be in [0, 1], got eps=2.0
    check_real("f", 1.0, 0, 1, low_open=True, high_open=True)  f must be in (0, 1), got f=1.0
    check_real("Delta", -1.0, 0)                             Delta must be a finite number >= 0, got Delta=-1.0
    check_real("alpha", 0, 0, low_open=True, finite=False)   alpha must be > 0, got alpha=0
    check_choice("mix", "x", ("a", "b"))                     unknown mix='x'; known: a, b

`what` adds a few words after the name: "alpha (the PGD step size) must be > 0, got alpha=0".
bool is never a number here (True is not 1); numpy integers and floats are (numbers.Integral,
numbers.Real), and the checked value comes back as a plain int or float. NaN fails every bound, and
`finite=True` (the default) refuses NaN and +-inf even without bounds.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real

__all__ = ["is_int", "is_real", "check_int", "check_real", "check_choice"]


def is_int(value) -> bool:
    """An integer (numpy's included), but not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number (ints and numpy's numbers included), but not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool)


def _error(name: str, value, must: str, what: str | None) -> ValueError:
    label = f"{name} ({what})" if what else name
    return ValueError(f"{label} must be {must}, got {name}={value!r}")


def _bounds(low, high, low_open: bool, high_open: bool, fmt) -> str:
    """'in [0, 1)', '>= 1', '< 3', or '' without bounds."""
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{fmt(low)}, {fmt(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {fmt(low)}"
    if high is not None:
        return f"{'<' if high_open else '<='} {fmt(high)}"
    return ""


def _within(value, low, high, low_open: bool, high_open: bool) -> bool:
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return above and below


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None, *,
              what: str | None = None) -> int:
    """`value` as a plain int if it is an integer in [minimum, maximum] (None: no bound)."""
    if not is_int(value) or not _within(value, minimum, maximum, False, False):
        bounds = _bounds(minimum, maximum, False, False, str)
        raise _error(name, value, f"an integer {bounds}".rstrip(), what)
    return int(value)


def check_real(name: str, value, low: float | None = None, high: float | None = None, *, low_open: bool = False,
               high_open: bool = False, finite: bool = True, what: str | None = None) -> float:
    """`value` as a float if it is a number between `low` and `high` (None: no bound; `*_open`: the
    bound itself excluded) and, with `finite`, neither NaN nor +-inf."""
    ok = is_real(value) and (not finite or math.isfinite(value)) and _within(value, low, high, low_open, high_open)
    if not ok:
        bounds = _bounds(low, high, low_open, high_open, lambda b: f"{b:g}")
        if low is not None and high is not None:
            must = bounds  # two bounds: "in [0, 1]" (NaN and inf are outside anyway)
        else:
            must = (f"a finite number {bounds}" if finite else bounds or "a number").rstrip()
        raise _error(name, value, must, what)
    return float(value)


def check_choice(name: str, value, choices: Iterable[str]) -> str:
    """`value` if it is one of `choices`."""
    known = tuple(choices)
    if value not in known:
        raise ValueError(f"unknown {name}={value!r}; known: {', '.join(map(str, known))}")
    return value
