"""Figures of the paper from arrays: one function per figure, each returning a matplotlib Figure.

Figures are made with pyplot and at once detached from it (`plt.close`), so nothing accumulates in
pyplot's global list and a notebook shows a returned figure exactly once (pyplot's first figure also
registers Jupyter's display hook; a bare `matplotlib.figure.Figure` would print as text there).
No backend is chosen here: scripts get matplotlib's default (Agg without a display), notebooks inline.
`save_figure` writes a PNG atomically.

Budgets are floats in pixel scale (8/255). A figure draws them in the unit its report's tables use
(`config.format_budget`): multiples of 1/255 in units of 1/255 (CIFAR), any other budgets as decimals.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .attacks.registry import PGD_ATTACKS, attack_label
from .config import budget_label
from .core.checks import check_int
from .core.io import atomic_write
from .core.stats import confidence_interval
from .errors import BadInput
from .explain.analysis import weight_array, weight_stats
from .explain.paper import TABLE4_CIFAR10, ReferenceRow
from .explain.selection import Selection

__all__ = [
    "plot_clean_vs_robust", "plot_delta_z", "plot_tsne", "plot_robustness_vs_budget",
    "plot_importance_ratios", "plot_weight_histograms", "plot_alpha_tradeoff", "save_figure", "extractor_colours",
]

MIN_SPAN = 10.0  # percentage points: an accuracy axis spans at least this, so a 0.3-point gap looks small


def _budget_unit(values: np.ndarray) -> tuple[float, str]:
    """(scale, axis unit) for budgets: 255 and "x 1/255" when all are multiples of 1/255, else 1 and ""."""
    k = np.asarray(values, dtype=float) * 255
    if np.all(np.abs(k - np.round(k)) < 1e-6):
        return 255.0, " (x 1/255)"
    return 1.0, ""


def _at_least(ax, axis: str, span: float = MIN_SPAN) -> None:
    """Widen an accuracy axis to `span` points around its data (within 0-100) so small gaps stay small."""
    lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
    if hi - lo >= span:
        return
    lo = min(max(0.0, (lo + hi - span) / 2), 100.0 - span)
    (ax.set_xlim if axis == "x" else ax.set_ylim)(lo, lo + span)


def _wilson_yerr(percent: Sequence[float], n: int | None) -> np.ndarray | None:
    """Error bars (2, k) of accuracies in percent on `n` examples: their 95% Wilson intervals
    (`afs_kit.stats.confidence_interval`); None when `n` is None (no bars drawn)."""
    if n is None:
        return None

    n = check_int("n", n, 1, what="examples behind each accuracy, or None")
    v = np.asarray(percent, dtype=float)
    bounds = np.array([confidence_interval(int(round(p * n / 100)), n) for p in v]).reshape(-1, 2)
    return np.clip(np.stack([v - bounds[:, 0], bounds[:, 1] - v]), 0, None)


def _new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] | None = None):
    """A figure and its [nrows, ncols] axes, already closed in pyplot (see the module docstring)."""
    import matplotlib.pyplot as plt  # imported when a figure is made, not when the kit is imported

    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False, layout="constrained")
    plt.close(fig)
    return fig, axes


def _array(values, name: str, ndim: int = 1) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise BadInput(f"{name} must be numeric, got {name}={values!r}") from err
    if arr.ndim != ndim:
        raise BadInput(f"{name} must be {ndim}-dimensional, got {name} with shape {arr.shape}")
    return arr


def _same_length(name: str, values: np.ndarray, ref_name: str, n: int) -> None:
    if len(values) != n:
        raise BadInput(f"{name} must have one value per entry of {ref_name} ({n}), got len({name})={len(values)}")


# ----------------------------------------------------------------------------- colours and markers

STACKED_COLOURS = ("tab:red", "tab:orange", "tab:brown", "black", "tab:pink", "tab:gray")
STACKED_MARKER = "D"  # a stacked model other than the headline (controls, other subsets); no single network's
HEADLINE_MARKER = "*"  # the AFS models


def extractor_colours(budgets: Sequence[float]) -> dict[str, tuple]:
    """One colour per training budget, keyed by the extractor's name in every table and figure
    (`config.budget_label`, "eps=8/255"): viridis in budget order, so a run's figures agree and the eye
    reads small to large budget. Pass the result as `colours` to every figure of one run."""
    import matplotlib as mpl

    ordered = sorted({float(b) for b in budgets})
    cmap = mpl.colormaps["viridis"]
    return {budget_label(b): tuple(cmap(0.9 * i / max(1, len(ordered) - 1))) for i, b in enumerate(ordered)}


def _styles(names: Sequence[str], colours: Mapping[str, tuple] | None,
            markers: Mapping[str, str] | None = None) -> dict[str, tuple[object, str]]:
    """name -> (colour, marker). A single extractor (its name ends in a key of `colours`, e.g. "(a) network
    eps=0.1") keeps its run-wide colour and a circle; any other name is a stacked model: a star for AFS, a
    diamond for the rest, coloured from a palette no extractor uses (reds, oranges, browns, black: viridis, the
    extractors' map, runs from purple through blue and green to yellow), in order of appearance."""
    from matplotlib.colors import to_rgba

    colours, markers = dict(colours or {}), markers or {}
    keys = sorted(colours, key=len, reverse=True)  # the longest name first, so a name matches its own extractor
    given = {name: next((colours[k] for k in keys if name.endswith(k)), None) for name in names}
    # names of extractors the caller gave no colour: a run-independent order of their own
    unknown = [n for n in names if given[n] is None and n.startswith("eps=")]
    given.update(zip(unknown, _distinct_colours(len(unknown))))
    stacked = iter(to_rgba(STACKED_COLOURS[i % len(STACKED_COLOURS)]) for i in range(len(names)))
    out = {}
    for name in names:
        if given[name] is not None:
            out[name] = (given[name], markers.get(name, "o"))
        else:
            default = HEADLINE_MARKER if name.startswith("AFS") else STACKED_MARKER
            out[name] = (next(stacked), markers.get(name, default))
    return out


# ----------------------------------------------------------------------------- fig. 1

PAPER_SCALE_NOTE = ("Right: quoted from the paper (WRN-34-10 / WRN-28-10 on the full data set), another scale; "
                    "compare the shape of the trade-off, not the positions.")


def plot_clean_vs_robust(results: Mapping[str, tuple[float, float]] | None = None,
                         reference: Sequence[ReferenceRow] | None = TABLE4_CIFAR10, robust: str = "pgd",
                         title: str | None = None, n: int | None = None, robust_label: str = "PGD-20",
                         frontier: Sequence[tuple[float, float]] | None = None,
                         markers: Mapping[str, str] | None = None, colours: Mapping[str, tuple] | None = None):
    """Fig. 1: clean accuracy (x) against robust accuracy (y) of several methods.

    results: the kit's own methods, name -> (clean, robust), in %.
    n: test examples behind each of the kit's accuracies: 95% Wilson error bars in both directions.
    reference: published rows (default: table 4, CIFAR-10), in a panel of their own beside the kit's (another
        scale: a caption says so), one legend entry each; rows without the two values are skipped. None: none.
    robust: which reference column is the y value, "pgd" or "aa".
    robust_label: the attack behind the kit's own y values when `robust` is "pgd" (the y axis says it).
    frontier: the single networks' frontier, its corners as (robust, clean) (`afs_kit.frontier.envelope`),
        drawn as a dashed line: flat left of the most accurate network, ending at the most robust one.
    colours: extractor name -> colour (`extractor_colours`), the same in every figure of a run.
    markers: name -> matplotlib marker, overriding the defaults: circles for single extractors, a star for
        names starting "AFS", diamonds for other stacked models.
    Each of the kit's models has its own legend entry, beside the axes (no labels on the points, so none overlap,
    and the legend covers none); both axes
    span at least `MIN_SPAN` points, so that a small gap is drawn small.
    """
    if robust not in ("pgd", "aa"):
        raise BadInput(f"robust must be 'pgd' or 'aa', got robust={robust!r}")
    results = dict(results or {})
    for name, point in results.items():
        if len(tuple(point)) != 2:
            raise BadInput(f"results[{name!r}] must be (clean, robust), got {point!r}")
    quoted = [(r.method, r.clean, getattr(r, robust)) for r in reference or ()
              if r.clean is not None and getattr(r, robust) is not None]
    panels = int(bool(results) or not quoted) + int(bool(quoted))
    fig, axes = _new_figure(1, panels, figsize=(6 * panels + (2.5 if results else 0), 4.5))
    ax = axes[0, 0]
    if results or not quoted:
        _own_points(ax, results, n, frontier, _styles(list(results), colours, markers))
        ax.set_ylabel(f"robust accuracy, {robust_label if robust == 'pgd' else 'AutoAttack'} (%)")
        ax.set_title(title or "Accuracy-robustness trade-off")
    if quoted:
        paper = axes[0, -1]
        for (name, cx, ry), marker in zip(quoted, "s^v<>phX8P"):
            paper.scatter([cx], [ry], marker=marker, facecolors="none", edgecolors="0.3", s=60, label=name)
        paper.set_ylabel(f"robust accuracy, {'PGD-20' if robust == 'pgd' else 'AutoAttack'} (%)")
        paper.set_title("quoted from the paper" if results else (title or "The paper's trade-off (quoted)"))
        if results:
            fig.text(0.5, -0.01, PAPER_SCALE_NOTE, ha="center", va="top", fontsize=8, wrap=True)
    for i, panel in enumerate(axes[0]):
        panel.margins(x=0.15, y=0.1)
        _at_least(panel, "x")
        _at_least(panel, "y")
        own = i == 0 and bool(results)
        panel.set_xlabel("clean accuracy (%)" + (f", 95% CI over n={n}" if n and own else ""))
        panel.grid(alpha=0.3)
        if own:  # beside the axes: inside, a legend of many models covers some of their points
            panel.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7)
        elif panel.get_legend_handles_labels()[0]:
            panel.legend(loc="best", fontsize=7)
    return fig


def _own_points(ax, results: Mapping[str, tuple[float, float]], n: int | None,
                frontier: Sequence[tuple[float, float]] | None, styles: Mapping[str, tuple]) -> None:
    if frontier is not None and len(frontier):
        corners = np.asarray(frontier, dtype=float).reshape(-1, 2)
        # x is clean, y robust here: the frontier runs from the most accurate network (flat towards less
        # robustness) down to the most robust one, where it ends
        xs = np.concatenate([[corners[0, 1]], corners[:, 1]])
        ys = np.concatenate([[0.0], corners[:, 0]])
        ax.plot(xs, ys, "--", color="0.35", lw=1.2, label="single networks' frontier", zorder=1)
    drawn: dict[tuple[float, float], str] = {}
    for name, (cx, ry) in results.items():
        # one legend entry per model, with its interval; stacked models drawn above single ones; a model whose
        # marker another one covers says so in its legend entry
        colour, marker = styles[name]
        first = drawn.setdefault((round(cx, 6), round(ry, 6)), name)
        label = name if first == name else f"{name} (the same point as {first})"
        ax.errorbar([cx], [ry], xerr=_wilson_yerr([cx], n), yerr=_wilson_yerr([ry], n), fmt=marker, color=colour,
                    ms=12 if marker == HEADLINE_MARKER else 7, capsize=3, label=label,
                    zorder=3 if marker != "o" else 2, mec="black" if marker != "o" else None, mew=0.6)


# ----------------------------------------------------------------------------- fig. 3

def plot_delta_z(eps: Sequence[float], mean: Sequence[float], std: Sequence[float] | None = None,
                 selected: Sequence[float] | Selection | None = None, Delta: float | None = None,
                 title: str | None = None):
    """Fig. 3: Delta-z against the training budget, with a +-1 std band, the selected budgets marked.

    mean, std: per budget, e.g. `delta_z_curve(..., reduce="mean_std")` at one Delta.
    selected: budgets chosen by the concavity rule (or the `Selection` itself).
    """
    e = _array(eps, "eps")
    m = _array(mean, "mean")
    _same_length("mean", m, "eps", len(e))
    fig, axes = _new_figure(figsize=(6, 4))
    ax = axes[0, 0]
    scale, unit = _budget_unit(e if Delta is None else np.append(e, Delta))
    k = e * scale
    ax.plot(k, m, "o-", color="tab:blue", label="mean over examples")
    if std is not None:
        s = _array(std, "std")
        _same_length("std", s, "eps", len(e))
        ax.fill_between(k, m - s, m + s, color="tab:blue", alpha=0.2, label="+-1 std")
    if selected is not None:
        chosen = selected.selected if isinstance(selected, Selection) else list(selected)
        mask = np.array([any(np.isclose(v, c, rtol=0, atol=1e-9) for c in chosen) for v in e])
        ax.scatter(k[mask], m[mask], s=140, marker="*", color="tab:orange", zorder=3, label="selected")
    ax.set_xlabel(f"training budget eps{unit}")
    ax.set_ylabel("Delta_z (largest logit change)")
    at = "" if Delta is None else f" at Delta = {Delta * scale:g}" + ("/255" if scale == 255 else "")
    ax.set_title(title or f"Delta_z{at} vs training budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# ----------------------------------------------------------------------------- fig. 4

def _distinct_colours(n: int):
    """`n` colours told apart at a glance: tab10, tab20, then a continuous map."""
    import matplotlib as mpl

    if n <= 10:
        return [mpl.colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [mpl.colormaps["tab20"](i) for i in range(n)]
    return [mpl.colormaps["turbo"](i / max(1, n - 1)) for i in range(n)]


def plot_tsne(embeddings: Sequence, labels, class_names: Sequence[str] | None = None,
              titles: Sequence[str] | None = None, point_size: float = 4.0, max_legend: int = 20):
    """Fig. 4: t-SNE embeddings side by side (e.g. network-3, network-8, their concatenation).

    embeddings: arrays [N, 2] of the same N examples; labels: their classes [N] (ints).
    class_names: legend text per class (default the numbers); the legend is left out above
    `max_legend` classes (CIFAR-100), where it would hide the plot.
    """
    embs = [_array(e, f"embeddings[{i}]", ndim=2) for i, e in enumerate(embeddings)]
    if not embs:
        raise BadInput("embeddings must hold at least one embedding, got an empty sequence")
    y = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise BadInput(f"labels must be a 1-D array of integer classes, got shape {y.shape} and dtype {y.dtype}")
    for i, e in enumerate(embs):
        if e.shape[1] != 2:
            raise BadInput(f"embeddings[{i}] must be [N, 2], got shape {e.shape}")
        _same_length(f"embeddings[{i}]", e, "labels", len(y))
    n_classes = int(y.max()) + 1 if len(y) else 0
    names = list(class_names) if class_names is not None else [str(c) for c in range(n_classes)]
    if len(names) < n_classes:
        raise BadInput(f"class_names must name every class (labels go up to {n_classes - 1}), "
                       f"got {len(names)} names")
    if titles is not None and len(titles) != len(embs):
        raise BadInput(f"titles must have one title per embedding ({len(embs)}), got titles={list(titles)!r}")
    colors = _distinct_colours(max(n_classes, 1))
    fig, axes = _new_figure(1, len(embs), figsize=(4.2 * len(embs) + 1.5, 4.2))
    for i, (ax, e) in enumerate(zip(axes[0], embs)):
        for c in range(n_classes):
            pts = e[y == c]
            ax.scatter(pts[:, 0], pts[:, 1], s=point_size, color=colors[c], label=names[c], linewidths=0)
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(titles[i] if titles is not None else f"({chr(ord('a') + i)})")
    if n_classes <= max_legend:
        handles, texts = axes[0, -1].get_legend_handles_labels()
        fig.legend(handles, texts, loc="outside right center", markerscale=3, fontsize=8, title="class")
    return fig


# ----------------------------------------------------------------------------- fig. 5a

def plot_robustness_vs_budget(budgets: Sequence[float], accuracies: Mapping[str, Sequence[float]],
                              title: str | None = None, n: int | None = None,
                              colours: Mapping[str, tuple] | None = None):
    """Fig. 5a: robust accuracy (%) against the attack budget, one line per model (AFS, single extractors);
    with `n` (test examples) 95% Wilson error bars; `colours` as in `plot_clean_vs_robust`."""
    b = _array(budgets, "budgets")
    if not accuracies:
        raise BadInput("accuracies must map at least one model name to its accuracies, got an empty mapping")
    fig, axes = _new_figure(figsize=(6, 4))
    ax = axes[0, 0]
    scale, unit = _budget_unit(b)
    styles = _styles(list(accuracies), colours)
    for name, acc in accuracies.items():
        a = _array(acc, f"accuracies[{name!r}]")
        _same_length(f"accuracies[{name!r}]", a, "budgets", len(b))
        colour, marker = styles[name]
        ax.errorbar(b * scale, a, yerr=_wilson_yerr(a, n), fmt=f"{marker}-", color=colour, capsize=2, label=name,
                    lw=1.2 if marker == "o" else 2.2, ms=10 if marker == HEADLINE_MARKER else 5)
    ax.set_xlabel(f"attack budget{unit}")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_title(title or "Robustness under different budgets")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# ----------------------------------------------------------------------------- fig. 5b

def plot_importance_ratios(ratios: Mapping[float | str, Sequence[float]],
                           extractor_labels: Sequence[str] | None = None, title: str | None = None):
    """Fig. 5b: importance ratio of each stacked extractor, grouped bars, one colour per alpha.

    ratios: alpha (or any setting label) -> `importance_ratio(...)` (one value per extractor).
    extractor_labels: x tick labels (e.g. "3/255"); default "net-1", "net-2", ...
    """
    if not ratios:
        raise BadInput("ratios must map at least one alpha to its importance ratios, got an empty mapping")
    rows = {k: _array(v, f"ratios[{k!r}]") for k, v in ratios.items()}
    n = len(next(iter(rows.values())))
    for k, v in rows.items():
        _same_length(f"ratios[{k!r}]", v, "the first entry of ratios", n)
    labels = list(extractor_labels) if extractor_labels is not None else [f"net-{i + 1}" for i in range(n)]
    if len(labels) != n:
        raise BadInput(f"extractor_labels must have one label per extractor ({n}), got {labels!r}")
    fig, axes = _new_figure(figsize=(max(5.0, 0.9 * n + 3), 4))
    ax = axes[0, 0]
    width = 0.8 / len(rows)
    x = np.arange(n)
    for j, (alpha, v) in enumerate(rows.items()):
        ax.bar(x - 0.4 + width * (j + 0.5), v, width, label=f"alpha = {alpha}")
    ax.set_xticks(x, labels)
    ax.set_xlabel("stacked extractor")
    ax.set_ylabel("importance ratio")
    ax.set_title(title or "Importance of each extractor")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


# ----------------------------------------------------------------------------- fig. 6

def plot_weight_histograms(weights: Mapping[str, object], bins: int = 60, title: str | None = None,
                           colours: Mapping[str, tuple] | None = None):
    """Fig. 6: histogram of each weight matrix (merger, single extractors' classifiers), side by side, each
    single network in its colour of `colours` (as in `plot_clean_vs_robust`).

    weights: name -> an nn.Linear, anything with `.weight`, or the matrix itself. Densities, so
    matrices of different sizes compare; each panel's title carries `weight_stats` (share of |W| in
    the largest 10% of entries, Gini of |W|, excess kurtosis).
    """
    if not weights:
        raise BadInput("weights must map at least one name to a weight matrix, got an empty mapping")
    bins = check_int("bins", bins, 1)
    mats = {name: weight_array(w, f"weights[{name!r}]") for name, w in weights.items()}
    fig, axes = _new_figure(1, len(mats), figsize=(4.2 * len(mats), 3.8))
    # one x-axis and the same bins for every panel, so the shapes compare at a glance
    lo, hi = min(float(w.min()) for w in mats.values()), max(float(w.max()) for w in mats.values())
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
    styles = _styles(list(mats), colours)
    for ax, (name, w) in zip(axes[0], mats.items()):
        st = weight_stats(w)
        ax.hist(w.ravel(), bins=edges, density=True, color=styles[name][0], alpha=0.8)
        ax.set_xlim(edges[0], edges[-1])
        ax.set_xlabel("weight value")
        ax.set_ylabel("density")
        ax.set_title(f"{name}\ntop-10% |W| mass {st['top10_mass']:.2f}, Gini {st['gini']:.2f}, "
                     f"kurtosis {st['kurtosis']:.1f}", fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------- table 2 as a figure

def plot_alpha_tradeoff(alphas: Sequence[float], clean: Sequence[float], *robust: Sequence[float],
                        title: str | None = None, n: int | None = None, worst: Sequence[float] | None = None):
    """Table 2 as a figure: clean and PGD accuracy (%) of the stacked model against the merger's alpha;
    `robust` the PGD accuracies in the registry's order (PGD-10, then PGD-20), `worst` adds the worst case over
    every attack, `n` (test examples) 95% Wilson error bars."""
    a = _array(alphas, "alphas")
    if not 1 <= len(robust) <= len(PGD_ATTACKS):
        raise BadInput(f"robust: give 1 to {len(PGD_ATTACKS)} PGD curves ({', '.join(PGD_ATTACKS)}), got {len(robust)}")
    series = {"clean": _array(clean, "clean"),
              **{attack_label(name): _array(v, name) for name, v in zip(PGD_ATTACKS, robust)}}
    if worst is not None:
        series["worst case"] = _array(worst, "worst")
    for name, v in series.items():
        _same_length(name.lower().replace("-", ""), v, "alphas", len(a))
    fig, axes = _new_figure(figsize=(6, 4))
    ax = axes[0, 0]
    for (name, v), marker in zip(series.items(), "osdv"):
        ax.errorbar(a, v, yerr=_wilson_yerr(v, n), marker=marker, capsize=2, label=name)
    ax.set_xlabel("alpha (weight of the clean loss, eq. 5)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "Effect of alpha on the merger")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# ----------------------------------------------------------------------------- saving

def save_figure(fig, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Write `fig` as a PNG atomically (the run files' writer: temporary file, fsync, rename) and close it.

    The folder is created when missing. Returns the path written.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise BadInput(f"path must end in .png, got path={str(path)!r}")
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    import matplotlib.pyplot as plt

    plt.close(fig)  # a no-op for our (already detached) figures; frees any pyplot-made figure passed in
    return path
