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

Values typed as text (`--set`, `-p`, `--eps`) are parsed here too, without eval: `parse_value`.
"""
from __future__ import annotations

import json
import math
import re
import types
import typing
from collections.abc import Iterable
from numbers import Integral, Real

from ..errors import BadInput

__all__ = ["is_int", "is_real", "check_int", "check_real", "check_choice", "parse_float", "parse_unit",
           "parse_eps_list", "parse_value"]


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
        raise BadInput(f"unknown {name}={value!r}; known: {', '.join(map(str, known))}")
    return value


# ---------------------------------------------------------------- parsing values without eval

_FRACTION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*/\s*([0-9]*\.?[0-9]+)\s*$")


def parse_float(text: str, name: str = "value") -> float:
    """A decimal (`0.031`) or a fraction (`8/255`), parsed without eval."""
    s = str(text).strip()
    m = _FRACTION.match(s)
    try:
        value = float(m.group(1)) / float(m.group(2)) if m else float(s)
    except (ValueError, ZeroDivisionError) as err:
        raise BadInput(f"{name} must be a number like 0.03 or 8/255, got {name}={text!r}") from err
    if not math.isfinite(value):
        raise BadInput(f"{name} must be finite, got {name}={text!r}")
    return value


def parse_unit(text: str, name: str) -> float:
    value = parse_float(text, name)
    if not 0.0 <= value <= 1.0:
        raise BadInput(f"{name} must be in [0, 1], got {name}={text!r}")
    return value


def parse_eps_list(text: str, name: str = "eps") -> tuple[float, ...]:
    """Comma-separated budgets in [0,1], each a decimal or `k/255`."""
    parts = [p for p in str(text).split(",") if p.strip()]
    if not parts:
        raise BadInput(f"{name} must list at least one budget, got {name}={text!r}")
    values = tuple(parse_unit(p, name) for p in parts)
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:  # one extractor per budget: a repeat would train (or stack) the same network twice
        raise BadInput(f"{name} lists a budget twice ({', '.join(f'{v:g}' for v in repeated)}), got {name}={text!r}")
    return values


def parse_value(text: str, tp, name: str = "value"):
    """Text into a value of type `tp`, without eval: the one parser of `--set section.field=value` and
    `afs-kit report -p NAME=VALUE`. `X | None` takes None (or null), bool true/false/1/0/yes/no, float a
    decimal or a fraction (`8/255`), str drops enclosing quotes, `tuple[X, ...]`/`list[X]` comma-separated
    items or a JSON list (`["3/255,8/255", "all"]`)."""
    origin, args, s = typing.get_origin(tp), typing.get_args(tp), str(text).strip()
    if s.lower() in ("none", "null"):
        if origin in (typing.Union, types.UnionType) and type(None) in args:
            return None
        raise BadInput(f"{name} must not be None, got {name}={text!r}")
    if origin in (typing.Union, types.UnionType):
        return parse_value(text, [a for a in args if a is not type(None)][0], name)
    if tp is bool:
        if s.lower() in ("1", "true", "yes", "0", "false", "no"):
            return s.lower() in ("1", "true", "yes")
        raise BadInput(f"{name} must be True or False, got {name}={text!r}")
    if tp is int:
        try:
            return int(s)
        except ValueError as err:
            raise BadInput(f"{name} must be an integer, got {name}={text!r}") from err
    if tp is float:
        return parse_float(s, name)
    if tp is str:
        return s[1:-1] if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"" else s
    if origin not in (tuple, list):
        raise BadInput(f"{name}: cannot parse a value of type {tp}")
    try:
        items = json.loads(s) if s.startswith("[") else [p.strip() for p in s.split(",") if p.strip()]
    except json.JSONDecodeError as err:
        raise BadInput(f"{name} must be a JSON list or comma-separated values, got {name}={text!r} ({err})") from err
    if args[0] is str and not all(isinstance(v, str) for v in items):
        raise BadInput(f"{name} must list strings, got {name}={text!r}")
    return origin(parse_value(v if isinstance(v, str) else json.dumps(v), args[0], name) for v in items)


def duration(seconds: float) -> str:
    """A time left or taken as people say it: "under 1 s", "40 s", "3.5 min", "2.1 h" (never "about 0 min")."""
    if seconds < 1:
        return "under 1 s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
