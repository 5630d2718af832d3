"""afs_kit.core.checks: what each check accepts, what it refuses, and that every refusal names the argument and value."""
import math
import re

import numpy as np
import pytest

from afs_kit.core.checks import check_choice, check_int, check_real, is_int, is_real, parse_eps_list
from afs_kit.errors import BadInput

# ------------------------------------------------------------------------------------------ check_int

@pytest.mark.parametrize("value, minimum, maximum", [
    (0, None, None), (-5, None, None), (1, 1, None), (7, 1, None), (3, 1, 3), (1, 1, 1), (-2, None, 0),
    (np.int64(4), 1, None), (np.int32(0), 0, None), (np.uint8(2), 1, 3),
])
def test_check_int_accepts_integers_in_range_and_returns_a_plain_int(value, minimum, maximum):
    out = check_int("k", value, minimum, maximum)
    assert out == value and type(out) is int


@pytest.mark.parametrize("value, minimum, maximum, message", [
    (0, 1, None, r"^k must be an integer >= 1, got k=0$"),
    (4, 1, 3, r"^k must be an integer in \[1, 3\], got k=4$"),
    (0, 1, 3, r"^k must be an integer in \[1, 3\], got k=0$"),
    (1, None, 0, r"^k must be an integer <= 0, got k=1$"),
    (True, None, None, r"^k must be an integer, got k=True$"),
    (False, 0, None, r"^k must be an integer >= 0, got k=False$"),
    (np.bool_(True), 0, None, r"^k must be an integer >= 0, got k=(np\.)?True_?$"),
    (2.0, 1, None, r"^k must be an integer >= 1, got k=2\.0$"),
    (2.5, 1, None, r"^k must be an integer >= 1, got k=2\.5$"),
    ("3", 1, None, r"^k must be an integer >= 1, got k='3'$"),
    (None, 1, None, r"^k must be an integer >= 1, got k=None$"),
    (np.int64(0), 1, None, r"^k must be an integer >= 1, got k=(np\.int64\()?0\)?$"),
])
def test_check_int_refuses_with_the_name_and_the_value(value, minimum, maximum, message):
    with pytest.raises(ValueError, match=message):
        check_int("k", value, minimum, maximum)


def test_check_int_what_describes_the_argument():
    with pytest.raises(ValueError, match=r"^n \(examples checked\) must be an integer >= 1, got n=0$"):
        check_int("n", 0, 1, what="examples checked")


# ------------------------------------------------------------------------------------------ check_real

@pytest.mark.parametrize("value, kwargs", [
    (0, dict(low=0, high=1)), (1, dict(low=0, high=1)), (0.5, dict(low=0, high=1, low_open=True, high_open=True)),
    (1.0, dict(low=0, high=1, low_open=True)), (0.0, dict(low=0, high=1, high_open=True)),
    (np.float32(0.25), dict(low=0, high=1)), (np.int64(3), dict(low=1)), (-1e300, {}),
    (math.inf, dict(low=1, finite=False)), (-math.inf, dict(finite=False)), (math.nan, dict(finite=False)),
    (2, dict(high=2)), (1.5, dict(high=2, high_open=True)),
])
def test_check_real_accepts_numbers_in_range_and_returns_a_float(value, kwargs):
    out = check_real("x", value, **kwargs)
    assert type(out) is float
    assert out == float(value) or (math.isnan(out) and math.isnan(value))


@pytest.mark.parametrize("value, kwargs, message", [
    (2.0, dict(low=0, high=1), r"^x must be in \[0, 1\], got x=2\.0$"),
    (-0.1, dict(low=0, high=1), r"^x must be in \[0, 1\], got x=-0\.1$"),
    (0, dict(low=0, high=1, low_open=True), r"^x must be in \(0, 1\], got x=0$"),
    (1, dict(low=0, high=1, high_open=True), r"^x must be in \[0, 1\), got x=1$"),
    (1.0, dict(low=0, high=1, low_open=True, high_open=True), r"^x must be in \(0, 1\), got x=1\.0$"),
    (-1, dict(low=0), r"^x must be a finite number >= 0, got x=-1$"),
    (0, dict(low=0, low_open=True, finite=False), r"^x must be > 0, got x=0$"),
    (0.5, dict(low=1, finite=False), r"^x must be >= 1, got x=0\.5$"),
    (3, dict(high=2, high_open=True), r"^x must be a finite number < 2, got x=3$"),
    (0.25, dict(low=0.5), r"^x must be a finite number >= 0\.5, got x=0\.25$"),
    (math.nan, {}, r"^x must be a finite number, got x=nan$"),
    (math.inf, {}, r"^x must be a finite number, got x=inf$"),
    (math.inf, dict(low=0), r"^x must be a finite number >= 0, got x=inf$"),
    (math.nan, dict(low=0, high=1), r"^x must be in \[0, 1\], got x=nan$"),
    (math.nan, dict(low=0, finite=False), r"^x must be >= 0, got x=nan$"),
    (True, dict(low=0, high=1), r"^x must be in \[0, 1\], got x=True$"),
    (False, dict(finite=False), r"^x must be a number, got x=False$"),
    ("0.1", dict(finite=False), r"^x must be a number, got x='0\.1'$"),
    (None, dict(low=0), r"^x must be a finite number >= 0, got x=None$"),
    (1j, {}, r"^x must be a finite number, got x=1j$"),
])
def test_check_real_refuses_with_the_name_and_the_value(value, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_real("x", value, **kwargs)


def test_check_real_what_describes_the_argument():
    with pytest.raises(ValueError, match=r"^alpha \(the PGD step size\) must be > 0, got alpha=-0\.01$"):
        check_real("alpha", -0.01, 0, low_open=True, finite=False, what="the PGD step size")


# ------------------------------------------------------------------------------------------ check_choice

def test_check_choice_accepts_a_known_value_and_lists_the_known_ones_otherwise():
    assert check_choice("mix", "b", ("a", "b", "c")) == "b"
    assert check_choice("mix", "a", ["a"]) == "a"
    assert check_choice("mix", "c", {"c": 1}) == "c"  # any iterable of names, e.g. a dict's keys
    with pytest.raises(ValueError, match=r"^unknown mix='d'; known: a, b, c$"):
        check_choice("mix", "d", ("a", "b", "c"))
    with pytest.raises(ValueError, match=re.escape("unknown mix=['a']; known: a")):
        check_choice("mix", ["a"], ("a",))  # unhashable values are refused, not a TypeError
    with pytest.raises(ValueError, match=r"^unknown mix=None; known: a$"):
        check_choice("mix", None, ("a",))


# ------------------------------------------------------------------------------------------ predicates

def test_bool_is_never_a_number_but_numpy_numbers_are():
    for yes in (0, -3, np.int8(1), np.uint64(7)):
        assert is_int(yes) and is_real(yes)
    for yes in (0.5, np.float32(1.5), np.float64("nan"), math.inf):
        assert is_real(yes) and not is_int(yes)
    for no in (True, False, np.bool_(True), "1", None, 1j, [1]):
        assert not is_int(no) and not is_real(no)


def test_a_budget_listed_twice_is_refused_naming_it():
    with pytest.raises(BadInput, match=r"eps lists a budget twice \(0.1\), got eps='0.1,0.1'"):
        parse_eps_list("0.1,0.1")
    with pytest.raises(BadInput, match="twice"):
        parse_eps_list("8/255,16/510,0")  # the same budget spelled two ways
