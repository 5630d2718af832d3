"""ipywidgets explorers: an alpha slider and extractor-subset checkboxes over one run.

A setting already trained answers at once (mergers and evaluations are cached on disk by config,
and in memory once seen); a new one trains its merger only when "Train and show" is pressed, with a
progress bar in the explorer's output, and then stays cached. The kernel is the one source of
truth: every redraw reads the controls' values and locks them while it works. Every figure shown
here also exists as a static figure made by the notebooks, since executed reports keep no widget
state.
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

from .attacks.registry import HEADLINE_PGD, PGD_ATTACKS, attack_label
from .config import format_budget
from .errors import BadInput
from .explain.analysis import importance_ratio
from .plots import plot_alpha_tradeoff, plot_clean_vs_robust, plot_importance_ratios
from .run.pipeline import Run
from .studies.common import (accuracy_row, ci_text, colours, evaluate_afs, extractor_points, extractor_table,
                             main_alpha, main_subset, merger_exists, stacked_labels)

# an explorer's output drawn for a setting other than the one its controls show
STALE_CLASS = "afs-kit-stale"
STALE_STYLE = f"<style>.{STALE_CLASS} {{ opacity: 0.3; filter: grayscale(1); }}</style>"


def _accuracies(row: dict) -> str:
    """clean, every PGD and the worst case of a widget's row, with the intervals of clean and worst."""
    pgds = "".join(f"{attack_label(a)} {row[a]:.1f}%, " for a in PGD_ATTACKS)
    return (f"clean {row['clean']:.1f}% [{ci_text(row['clean_ci'])}], {pgds}"
            f"worst case {row['worst']:.1f}% [{ci_text(row['worst_ci'])}]")


def _setting(run: Run, vector: str, alpha: float, n_examples: int | None, cache: dict) -> dict:
    """Metrics and importance ratio of one (subset, alpha), computed once per explorer."""
    key = (vector, round(alpha, 6))
    if key not in cache:
        # the run's log lines (found, trained, evaluated) belong to the command line; the explorer shows its own
        # line, and the progress bars (stderr) still show while a merger trains
        with contextlib.redirect_stdout(io.StringIO()):
            metrics, model = evaluate_afs(run, vector, alpha, PGD_ATTACKS, n_examples)
        cache[key] = {"alpha": alpha, "subset": vector, "n": metrics["n"], **accuracy_row(metrics, PGD_ATTACKS),
                      "importance": importance_ratio(model.merger, model.stack.feature_dims).tolist()}
    return cache[key]


def alpha_explorer(run: Run, alphas: Sequence[float] | None = None, subset: str | None = None,
                   n_examples: int | None = None, step: float = 0.1, value: float | None = None):
    """A slider over the merger's alpha (eq. 5) that redraws clean/PGD accuracy against alpha (every
    alpha seen so far, the current one marked) and the importance ratio of each stacked extractor.

    alphas: settings evaluated up front (the notebook's sweep, answered from the cache); None: none.
    Returns an ipywidgets VBox; its `.children[-1]` is the Output the figures are drawn into.
    """
    import ipywidgets as w
    from IPython.display import display

    if not 0 < step <= 1:
        raise BadInput(f"step must be in (0, 1], got step={step!r}")
    vector = main_subset(run, subset)
    start = main_alpha(run, value)
    cache: dict = {}
    for a in alphas or ():
        _setting(run, vector, float(a), n_examples, cache)
    slider = w.FloatSlider(value=start, min=0.0, max=1.0, step=step, description="alpha", readout_format=".2f",
                           continuous_update=False, layout=w.Layout(width="420px"))
    button = w.Button(description="Train and show", button_style="primary")
    status = w.HTML()
    out = w.Output()
    labels = stacked_labels(run, vector)
    shown: list[float] = []  # the alpha the output draws, while the slider stands elsewhere

    def redraw(train: bool) -> None:
        # the kernel is the one source of truth: read the slider now, not the value a message carried,
        # and lock the controls while working so the page cannot move ahead of the kernel
        alpha = round(slider.value, 6)
        trained = (vector, alpha) in cache or merger_exists(run, vector, alpha)
        if not train and not trained:
            # a slider passing through values (keys, drags) must not train a merger for each of them; what is
            # drawn belongs to another alpha: greyed out and said, so it is not read as this one's
            out.add_class(STALE_CLASS)
            status.value = (f"alpha={alpha:g} has no merger yet: press 'Train and show' to train it (then cached)"
                            + (f"; greyed out below: alpha={shown[-1]:g}" if shown else ""))
            return
        slider.disabled = button.disabled = True
        status.value = "" if trained else f"alpha={alpha:g}: training its merger (then cached) ..."
        try:
            with out:
                out.clear_output(wait=True)
                row = _setting(run, vector, alpha, n_examples, cache)
                print(f"alpha={alpha:g}: {_accuracies(row)} "
                      f"(subset {vector}, masking checks {row['sanity']}); importance ratio "
                      + ", ".join(f"{lab}: {r:.2f}" for lab, r in zip(labels, row["importance"])))
                seen = sorted((r for (v, _), r in cache.items() if v == vector), key=lambda r: r["alpha"])
                fig = plot_alpha_tradeoff([r["alpha"] for r in seen], [r["clean"] for r in seen],
                                          *([r[a] for r in seen] for a in PGD_ATTACKS), n=row["n"],
                                          worst=[r["worst"] for r in seen])
                fig.axes[0].axvline(alpha, color="black", ls="--", lw=1)
                display(fig)
                display(plot_importance_ratios({f"{alpha:g}": row["importance"]}, labels,
                                               title=f"Importance of each extractor, alpha={alpha:g}"))
            shown[:] = [alpha]
            out.remove_class(STALE_CLASS)
            status.value = ""
        finally:
            slider.disabled = button.disabled = False

    slider.observe(lambda _change: redraw(False), names="value")
    button.on_click(lambda _button: redraw(True))
    redraw(True)
    return w.VBox([w.HTML(STALE_STYLE), w.HBox([slider, button, status]), out])


def subset_explorer(run: Run, alpha: float | None = None, n_examples: int | None = None,
                    subset: str | None = None):
    """One checkbox per trained extractor; the AFS model over the ticked ones is drawn against the
    single extractors (clean vs PGD-20) with its importance ratios. A subset whose merger exists
    answers as soon as it is ticked; a new one trains when "Train and show" is pressed.
    """
    import ipywidgets as w
    from IPython.display import display

    alpha = main_alpha(run, alpha)
    budgets = run.budgets()
    start = main_subset(run, subset)
    boxes = [w.Checkbox(value=start[i] == "1", description=format_budget(b), indent=False,
                        layout=w.Layout(width="90px")) for i, b in enumerate(budgets)]
    button = w.Button(description="Train and show", button_style="primary")
    out = w.Output()
    cache: dict = {}
    singles = extractor_points(extractor_table(run, n_examples))

    def vector() -> str:
        return "".join("1" if b.value else "0" for b in boxes)

    def redraw(train: bool) -> None:
        # one observer for every box, reading all of them: the kernel is the one source of truth, and
        # the boxes are locked while it works so the page cannot move ahead of it
        v = vector()
        for b in (*boxes, button):
            b.disabled = True
        try:
            show(v, train)
        finally:
            for b in (*boxes, button):
                b.disabled = False

    def show(v: str, train: bool) -> None:
        with out:
            out.clear_output(wait=True)
            if "1" not in v:
                print("tick at least one extractor")
                return
            if not train and (v, round(alpha, 6)) not in cache and not merger_exists(run, v, alpha):
                print(f"subset {v} has no merger yet: press 'Train and show' to train it (then it stays cached)")
                return
            row = _setting(run, v, alpha, n_examples, cache)
            print(f"subset={v} alpha={alpha:g}: {_accuracies(row)}, "
                  f"masking checks {row['sanity']}")
            points = {**singles, **{f"AFS {s}": (r["clean"], r[HEADLINE_PGD]) for (s, _), r in cache.items()}}
            display(plot_clean_vs_robust(points, reference=None, title="AFS subsets vs single extractors (PGD-20)",
                                         n=row["n"], colours=colours(run)))
            display(plot_importance_ratios({f"{alpha:g}": row["importance"]}, stacked_labels(run, v),
                                           title=f"Importance of each extractor, subset {v}"))

    for b in boxes:
        b.observe(lambda _change: redraw(False), names="value")
    button.on_click(lambda _button: redraw(True))
    redraw(True)
    return w.VBox([w.HBox(boxes), button, out])
