"""Uncertainty of accuracies and paired comparisons, from scipy.stats (no hand-written statistics).

- `confidence_interval(correct, n)`: the 95% Wilson score interval of an accuracy, in percent. Wilson
  rather than Clopper-Pearson: its coverage is close to the nominal 95% on average, where
  Clopper-Pearson is conservative (wider than it needs to be), and it stays inside [0, 100] with a
  non-zero width at 0 and 100% (a robust accuracy of 0/200 is not "exactly 0").
- `paired_test(flags_a, flags_b)`: the exact McNemar test of two models (or two attacks) on the same
  examples: only the discordant examples count, and under the null hypothesis each is equally
  likely to favour either side, so the p-value is a two-sided binomial test of b successes in
  b + c trials at 1/2. Unpaired tests on the two accuracies would waste the pairing: two models on
  the same 1,000 images share most of their errors.
"""
from __future__ import annotations

import hashlib
import itertools

import numpy as np
import torch

from ..errors import BadInput
from .checks import check_int

CONFIDENCE = 0.95
SIGNIFICANCE = 0.05  # "better" / "worse" only below this p-value


def percent(flags) -> float:
    """The accuracy (percent) of per-example Boolean flags, from the exact count: 461 of 1,000 is 46.1, not
    float32's 46.0999995... (0.0 for no examples)."""
    f = as_flags(flags, "flags")
    return round(100 * int(f.sum()) / len(f), 10) if len(f) else 0.0


def binomtest(*args, **kwargs):
    """scipy.stats.binomtest, imported when first needed: scipy.stats takes most of a second to import, which every
    `afs-kit` process and notebook kernel would otherwise pay before doing anything."""
    from scipy.stats import binomtest as scipy_binomtest

    return scipy_binomtest(*args, **kwargs)


def confidence_interval(correct: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval (percent, 4 decimals) of `correct` successes out of `n` examples."""
    correct, n = check_int("correct", correct, 0), check_int("n", n, 0)
    if n == 0:
        raise BadInput(f"n must be >= 1 for an interval, got n={n}")
    if correct > n:
        raise BadInput(f"correct must be <= n ({n}), got correct={correct}")
    ci = binomtest(correct, n).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return round(100 * float(ci.low), 4), round(100 * float(ci.high), 4)


def interval_of(flags) -> tuple[float, float]:
    """The 95% interval of the accuracy that a per-example Boolean vector gives."""
    f = as_flags(flags, "flags")
    return confidence_interval(int(f.sum()), len(f))


def as_flags(flags, name: str) -> np.ndarray:
    """A 1-D Boolean numpy array from a tensor, array or list of booleans (0/1 allowed)."""
    if isinstance(flags, torch.Tensor):
        flags = flags.detach().cpu().numpy()
    arr = np.asarray(flags)
    if arr.ndim != 1:
        raise BadInput(f"{name} must be one flag per example (1-D), got {name} with shape {arr.shape}")
    if arr.dtype != bool:
        if not np.issubdtype(arr.dtype, np.number) or not np.isin(arr, (0, 1)).all():
            raise BadInput(f"{name} must hold booleans (or 0/1), got values of dtype {arr.dtype}")
        arr = arr.astype(bool)
    return arr


def discordant(flags_a, flags_b) -> tuple[int, int]:
    """(b, c): examples only A gets right, examples only B gets right."""
    a, b = as_flags(flags_a, "flags_a"), as_flags(flags_b, "flags_b")
    if len(a) != len(b):
        raise BadInput(f"flags_a and flags_b must cover the same examples, got len(flags_a)={len(a)} "
                       f"and len(flags_b)={len(b)}")
    return int((a & ~b).sum()), int((~a & b).sum())


def paired_test(flags_a, flags_b) -> float:
    """Exact McNemar p-value (two-sided) that A and B are equally accurate on the same examples.

    1.0 when no example tells them apart.
    """
    b, c = discordant(flags_a, flags_b)
    if b + c == 0:
        return 1.0
    return float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)


def sign_test(scores_a, scores_b) -> tuple[float, int, int]:
    """Exact two-sided sign test that A and B score alike on the same examples: (p, examples where A scores
    higher, examples where B does). Only the examples where the scores differ count, each equally likely to
    favour either side under the null hypothesis; on 0/1 flags this is the exact McNemar test (`paired_test`)."""
    a = np.asarray(scores_a.detach().cpu() if isinstance(scores_a, torch.Tensor) else scores_a, dtype=float)
    b = np.asarray(scores_b.detach().cpu() if isinstance(scores_b, torch.Tensor) else scores_b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise BadInput(f"scores_a and scores_b must be one score per example each, got shapes {a.shape} and {b.shape}")
    higher, lower = int((a > b).sum()), int((a < b).sum())
    p = 1.0 if higher + lower == 0 else float(binomtest(higher, higher + lower, 0.5).pvalue)
    return p, higher, lower


def points_apart(diff: float) -> str:
    """A difference of accuracies in words: "1.0 point above", "2.5 points below", "level with"."""
    if round(abs(diff), 1) == 0:
        return "level with"
    size = f"{abs(diff):.1f} point{'' if round(abs(diff), 1) == 1 else 's'}"
    return f"{size} {'above' if diff > 0 else 'below'}"


def compare(flags_a, flags_b, name_a: str = "A", name_b: str = "B") -> dict:
    """A paired verdict for reports: accuracies, discordant counts, p and a sentence that says
    "better" or "worse" only when p < 0.05."""
    a, b = as_flags(flags_a, "flags_a"), as_flags(flags_b, "flags_b")
    only_a, only_b = discordant(a, b)
    p = paired_test(a, b)
    diff = 100 * (a.mean() - b.mean()) if len(a) else 0.0
    gap = f"{name_a} {points_apart(diff)} {name_b}"
    if p < SIGNIFICANCE:
        verdict = "better" if only_a > only_b else "worse"
        text = f"{name_a} is {verdict} than {name_b}: {gap} (p = {p:.2g}, n = {len(a)})"
    else:
        verdict = "no significant difference"
        text = f"{name_a} vs {name_b}: no significant difference ({gap}, p = {p:.2g}, n = {len(a)})"
    return {"a": name_a, "b": name_b, "difference": float(diff), "only_a": only_a, "only_b": only_b, "p": p,
            "n": len(a), "verdict": verdict, "text": text}


def examples_hash(indices) -> str:
    """A short hash of the example indices an evaluation used, so two results can be shown to be paired."""
    arr = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
    return hashlib.sha256(arr.tobytes()).hexdigest()[:16]


def spearman(x, y) -> tuple[float, float]:
    """Spearman's rank correlation and its two-sided p. Exact (every ordering of x against y) up to 8
    points, where scipy's t approximation is far off (it gives p ~ 1e-24 for 5 points in order, whose
    exact p is 1/60); scipy's approximation above that."""
    from scipy.stats import rankdata, spearmanr

    rx, ry = rankdata(np.asarray(x, dtype=float)), rankdata(np.asarray(y, dtype=float))
    approximate = spearmanr(rx, ry)
    rho = float(approximate.statistic)
    if len(rx) > 8 or rho != rho:
        return rho, float(approximate.pvalue)
    orders = np.array(list(itertools.permutations(rx)))
    centred = orders - orders.mean(axis=1, keepdims=True)
    cy = ry - ry.mean()
    null = centred @ cy / (np.linalg.norm(centred, axis=1) * np.linalg.norm(cy))
    return rho, float(np.mean(np.abs(null) >= abs(rho) - 1e-12))
