"""The paper's claim as a number: how far AFS lies above the single networks' accuracy-robustness frontier.

The singles' frontier is the upper-left envelope of their (robust, clean) points joined by straight
lines: at robustness x, the best clean accuracy a mixture of single networks reaches with robustness
at least x. It is flat at the best clean accuracy left of the most accurate single network, falls
along the upper concave hull to the most robust one, and does not exist right of it. AFS's distance
above it is AFS's clean accuracy minus the frontier's at AFS's robustness, in points; its 95% interval
comes from a bootstrap over test examples that draws the same examples for every model (the models
were evaluated on the same images, so their errors are paired).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import BadInput

# where AFS's robustness lies relative to the singles' robustness range
INSIDE, LEFT, RIGHT = "inside", "left", "right"


def envelope(points: Sequence[tuple[float, float]]) -> np.ndarray:
    """The frontier's corners, (robust, clean) rows by increasing robustness: the points no mixture of
    the others beats on both axes (the upper concave hull from the most accurate to the most robust)."""
    pts = np.asarray(points, dtype=float).reshape(-1, 2)
    if len(pts) == 0:
        raise BadInput("points must hold at least one (robust, clean) pair, got none")
    if not np.isfinite(pts).all():
        raise BadInput(f"points must be finite, got {pts.tolist()}")
    # most accurate first among equally robust points; then the hull from the most accurate rightwards
    pts = pts[np.lexsort((-pts[:, 1], pts[:, 0]))]
    start = int(np.argmax(pts[:, 1] + 1e-12 * pts[:, 0]))  # the most accurate (the most robust of ties)
    hull: list[np.ndarray] = []
    for p in pts[start:]:
        if hull and p[0] == hull[-1][0]:
            continue  # equally robust, less accurate
        # drop corners that fall below the chord to the new point (the hull stays concave)
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) >= 0:
            hull.pop()
        hull.append(p)
    # only the falling part: a later corner that is no less accurate makes the ones before it dominated
    out = [hull[-1]]
    for p in reversed(hull[:-1]):
        if p[1] > out[-1][1]:
            out.append(p)
    return np.array(out[::-1])


def _cross(o, a, b) -> float:
    return float((a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]))


def frontier_clean(corners: np.ndarray, robust: float) -> float:
    """The frontier's clean accuracy at `robust` (NaN right of the most robust single network)."""
    xs, ys = corners[:, 0], corners[:, 1]
    if robust > xs[-1]:
        return float("nan")
    if robust <= xs[0]:
        return float(ys[0])
    return float(np.interp(robust, xs, ys))


def position(corners: np.ndarray, robust: float) -> str:
    """Whether `robust` lies inside the singles' robustness range, left of it or right of it."""
    return LEFT if robust < corners[0, 0] else RIGHT if robust > corners[-1, 0] else INSIDE


def distance(afs: tuple[float, float], singles: Sequence[tuple[float, float]]) -> float:
    """AFS's clean accuracy minus the frontier's at AFS's robustness; points are (robust, clean).
    NaN when AFS is more robust than every single network (no frontier there)."""
    return afs[1] - frontier_clean(envelope(singles), afs[0])


def bootstrap_draws(n: int, draws: int, seed: int = 0) -> np.ndarray:
    """[draws, n] example indices drawn with replacement: ONE draw shared by every model."""
    if n < 1:
        raise BadInput(f"n (test examples) must be >= 1, got n={n}")
    if draws < 1:
        raise BadInput(f"draws must be >= 1, got draws={draws}")
    return np.random.default_rng(seed).integers(0, n, size=(draws, n))


def frontier_study(afs: Mapping[str, np.ndarray], singles: Mapping[str, Mapping[str, np.ndarray]],
                   draws: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """AFS's distance above the singles' frontier with its bootstrap interval.

    afs, singles[name]: per-example 0/1 flags `clean` and `robust` on the SAME test examples (the
    robust flag is the worst case over the attacks run). Returns the points (%), the frontier's corners,
    the distance (points), its `level` interval [lo, hi] (hi None: unbounded, when more than a tail's share
    of the draws have AFS more robust than every single network; the interval is None when even lo is), the
    share of such draws and the position."""
    if not singles:
        raise BadInput("singles must hold at least one network, got none")
    n = len(afs["clean"])
    models = {"AFS": afs, **singles}
    for name, f in models.items():
        for what in ("clean", "robust"):
            if len(f[what]) != n:
                raise BadInput(f"{name}'s {what} flags cover {len(f[what])} examples, AFS's {n}: the frontier "
                               f"needs every model on the same examples")
    flags = {w: np.stack([np.asarray(m[w], dtype=float) for m in models.values()]) for w in ("clean", "robust")}
    point = {w: 100 * flags[w].mean(axis=1) for w in flags}  # [models]
    singles_pts = list(zip(point["robust"][1:], point["clean"][1:]))
    corners = envelope(singles_pts)
    where = position(corners, point["robust"][0])
    observed = float(point["clean"][0] - frontier_clean(corners, point["robust"][0]))
    idx = bootstrap_draws(n, draws, seed)
    # how often each example is drawn, then every model's accuracies on the same resampled examples
    counts = np.zeros((draws, n))
    np.add.at(counts, (np.arange(draws)[:, None], idx), 1)
    boot = {w: 100 * (counts @ flags[w].T).T / n for w in flags}  # [models, draws]
    dist = np.array([boot["clean"][0, d] - frontier_clean(envelope(list(zip(boot["robust"][1:, d],
                                                                            boot["clean"][1:, d]))),
                                                          boot["robust"][0, d])
                     for d in range(draws)])
    # a draw where AFS is more robust than every single network lies beyond the frontier's end: it counts
    # as an unbounded distance (leaving it out would drop exactly the draws most favourable to AFS)
    right = np.isnan(dist)
    dist[right] = np.inf
    tail = (1 - level) / 2
    lo, hi = (float(np.quantile(dist, q, method="inverted_cdf")) for q in (tail, 1 - tail))
    interval = None if np.isinf(lo) else [lo, None if np.isinf(hi) else hi]  # None: unbounded above
    return {"distance": None if np.isnan(observed) else observed, "ci95": interval, "level": level,
            "draws": draws, "seed": seed, "n": n, "position": where,
            "right_of_range_share": float(right.mean()),
            "afs": {"robust": float(point["robust"][0]), "clean": float(point["clean"][0])},
            "singles": {name: {"robust": float(r), "clean": float(c)}
                        for name, r, c in zip(singles, point["robust"][1:], point["clean"][1:])},
            "corners": corners.tolist(), "verdict": verdict(interval)}


def verdict(interval: Sequence[float] | None) -> str:
    """'above', 'below' or 'on' the frontier, only as the interval allows (draws where AFS is more robust
    than every single network count as unboundedly above); 'right of the range' when that happens in so
    many draws that the interval has no lower end."""
    if interval is None:
        return "right of the range"
    lo, hi = interval
    return "above" if lo > 0 else "below" if hi is not None and hi < 0 else "on"


def frontier_text(study: dict, robust_name: str = "worst-case accuracy") -> str:
    """The frontier in two or three sentences, from the numbers."""
    a, share = study["afs"], study["right_of_range_share"]
    head = f"AFS ({robust_name} {a['robust']:.1f}%, clean {a['clean']:.1f}%, n = {study['n']})"
    draws = f"{study['draws']} bootstrap draws of the test examples, shared by every model"
    if study["distance"] is None:  # more robust than every single network on these images
        most = max(study["singles"].items(), key=lambda kv: kv[1]["robust"])
        text = (f"{head} is more robust than every single network (the most robust, {most[0]}, has "
                f"{most[1]['robust']:.1f}%): it lies right of the singles' range, where their frontier ends, so no "
                f"distance is measured on these images. Over {draws}, it lies right of the range in "
                f"{100 * share:.1f}% of them")
        if study["ci95"] is None:
            return text + "."
        lo, hi = study["ci95"]
        return (text + f"; counting those as unboundedly above, the distance's 95% interval runs from {lo:+.1f} "
                f"points to {'no upper end' if hi is None else f'{hi:+.1f} points'}: {_said(study['verdict'])}.")
    lo, hi = study["ci95"]
    upper = "unbounded" if hi is None else f"{hi:+.1f}"
    text = (f"{head} lies {study['distance']:+.1f} points of clean accuracy from the single networks' frontier at "
            f"its robustness (95% interval {lo:+.1f} to {upper} over {draws}): {_said(study['verdict'])}.")
    if study["position"] == LEFT:
        text += (" AFS is less robust than every single network, so this compares it with the most accurate one "
                 "alone (the frontier is flat there).")
    if share > 0:
        text += (f" In {100 * share:.1f}% of the draws AFS was more robust than every single network (counted as "
                 f"unboundedly above).")
    return text


def _said(verdict_: str) -> str:
    return {"above": "above the frontier (the interval excludes 0)",
            "below": "below the frontier (the interval excludes 0)",
            "on": "on the frontier (the interval includes 0)"}[verdict_]
