"""Intervals and paired tests agree with scipy.stats on fixed inputs; bad input names the argument."""
import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from afs_kit.core.stats import compare, confidence_interval, discordant, examples_hash, paired_test, percent


@pytest.mark.parametrize("correct, n", [(0, 200), (1, 200), (150, 200), (200, 200), (767, 1000), (5, 7)])
def test_confidence_interval_is_scipys_wilson_interval_in_percent(correct, n):
    ci = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = confidence_interval(correct, n)
    # rounded to 4 decimals of a percentage point, as metrics.json keeps it
    assert (lo, hi) == (round(100 * ci.low, 4), round(100 * ci.high, 4))
    assert 0 <= lo <= 100 * correct / n <= hi <= 100


def test_confidence_interval_reference_values():
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", table I: 81 of 263,
    # Wilson score interval 0.2553 to 0.3662
    lo, hi = confidence_interval(81, 263)
    assert lo == pytest.approx(25.53, abs=0.01) and hi == pytest.approx(36.62, abs=0.01)
    assert confidence_interval(0, 200)[1] > 0, "0 of 200 is not an exact 0"


def test_paired_test_is_the_exact_mcnemar_test():
    rng = np.random.default_rng(0)
    a = rng.random(500) < 0.7
    b = a.copy()
    flip = rng.choice(500, 40, replace=False)
    b[flip] = ~b[flip]
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    expected = binomtest(only_a, only_a + only_b, 0.5).pvalue
    assert paired_test(a, b) == pytest.approx(expected, rel=1e-12)
    assert paired_test(torch.tensor(a), torch.tensor(b)) == pytest.approx(expected, rel=1e-12)
    assert paired_test(a, b) == paired_test(b, a)
    assert paired_test(a, a) == 1.0
    # 10 discordant examples all one way: p = 2 / 2^10
    x = np.ones(20, bool)
    y = x.copy()
    y[:10] = False
    assert paired_test(x, y) == pytest.approx(2 / 2**10)


def test_compare_says_better_only_when_significant():
    x = np.ones(100, bool)
    y = x.copy()
    y[:3] = False
    assert compare(x, y, "A", "B")["verdict"] == "no significant difference"
    assert "no significant difference" in compare(x, y, "A", "B")["text"]
    y[:20] = False
    out = compare(x, y, "A", "B")
    assert out["verdict"] == "better" and out["p"] < 0.05 and out["only_a"] == 20
    assert compare(y, x)["verdict"] == "worse"


def test_examples_hash_tells_example_sets_apart():
    assert examples_hash(torch.arange(100)) == examples_hash(np.arange(100))
    assert examples_hash(torch.arange(100)) != examples_hash(torch.arange(1, 101))


@pytest.mark.parametrize("call, match", [
    (lambda: paired_test(np.ones(5, bool), np.ones(6, bool)), r"len\(flags_a\)=5 and len\(flags_b\)=6"),
    (lambda: paired_test(np.ones((2, 3), bool), np.ones(6, bool)), r"flags_a must be one flag per example"),
    (lambda: paired_test(np.array([0.5, 1.0]), np.ones(2, bool)), r"flags_a must hold booleans"),
    (lambda: confidence_interval(5, 0), r"n=0"),
    (lambda: confidence_interval(-1, 10), r"correct=-1"),
    (lambda: confidence_interval(11, 10), r"correct=11"),
    (lambda: confidence_interval(2.5, 10), r"correct=2.5"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_spearman_is_exact_for_a_few_budgets():
    """Five budgets in order: the exact two-sided p is 2/5! = 1/60 (scipy's t approximation says ~1e-24);
    any other case agrees with scipy's own exact permutation test."""
    import scipy.stats

    from afs_kit.core.stats import spearman

    assert spearman([0, 1, 2, 3, 4], [9, 7, 5, 3, 1]) == pytest.approx((-1.0, 1 / 60))
    x, y = [0, 2, 4, 6, 8, 10], [3.0, 1.0, 4.0, 1.5, 5.0, 9.0]
    ref = scipy.stats.permutation_test((x,), lambda a: scipy.stats.spearmanr(a, y).statistic,
                                       permutation_type="pairings", n_resamples=float("inf"))
    rho, p = spearman(x, y)
    assert rho == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)


def test_the_sign_test_is_mcnemar_on_flags_and_sees_only_the_sign():
    from afs_kit.core.stats import sign_test

    a = torch.tensor([1, 1, 1, 0, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    b = torch.tensor([0, 0, 1, 0, 1, 1, 0, 0, 0, 1], dtype=torch.bool)
    p, higher, lower = sign_test(a.float(), b.float())
    assert (higher, lower) == discordant(a, b) and p == pytest.approx(paired_test(a, b))
    assert sign_test([0.5, 1.0, 0.0], [0.0, 0.5, 0.0])[1:] == (2, 0)
    assert sign_test([1.0], [1.0])[0] == 1.0
    with pytest.raises(ValueError, match="one score per example"):
        sign_test([1.0, 0.0], [1.0])


def test_accuracies_come_from_exact_counts():
    assert percent(torch.tensor([True] * 461 + [False] * 539)) == 46.1  # float32's mean gives 46.0999995...
    assert percent([1, 0, 0]) == pytest.approx(100 / 3) and percent([]) == 0.0
