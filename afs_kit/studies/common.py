"""What every study shares: the run a notebook works on, cached evaluations of single extractors
and AFS models, a table row's numbers (accuracy with interval, worst case, masking checks, training
health), paired sentences, display helpers and several seeds."""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..attacks.registry import HEADLINE_PGD, PGD_ATTACKS, autoattack_name  # noqa: F401  (studies re-exports them)
from ..config import budget_label, format_budget, get_preset, preset_from_dict
from ..core.checks import check_int
from ..core.io import load_checkpoint, read_json
from ..core.stats import compare
from ..errors import BadInput
from ..eval.evaluation import flags_over
from ..models.stack import subset_vector
from ..plots import extractor_colours, save_figure
from ..run.pipeline import Run
from ..run.rundir import default_run_dir, model_name
from ..train.merger_choice import floor_label

# the attacks of tables 1-3 (clean is always measured); AutoAttack only where the paper uses it
# shown in every table that has them: the per-example worst case over every attack, the
# gradient-masking checks, the training health of the model and, for a merger, its floor (never significantly
# below one of its members on its own objective, on validation images)
TRUST_COLUMNS = ("worst", "sanity", "health", "floor")


# ============================================================================ the run a notebook works on

def _warning_without_path(message, category, filename, lineno, line=None) -> str:
    return f"{category.__name__}: {message}\n"


def open_run(preset: str, run_dir: str | Path | None = None, device: str = "auto", seed: int = 0,
             budgets: Sequence[float] | None = None, progress: bool = True) -> Run:
    """The run a notebook reads and writes: an existing run keeps its stored preset (with any --set
    overrides it was made with); `budgets` and a non-zero `seed` replace the preset's.

    Warnings in the notebook then print as "Category: message", without the source file's path: an
    executed report must not carry the paths of the machine that made it."""
    warnings.formatwarning = _warning_without_path
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(preset, seed)
    chosen = get_preset(preset)
    info = run_dir / "run.json"
    if info.is_file():
        stored = preset_from_dict(read_json(info)["preset"])
        if stored.name != chosen.name:
            raise BadInput(f"run {run_dir} was made with preset={stored.name!r}, not preset={preset!r}")
        chosen = stored
    check_int("seed", seed, 0)
    if seed:
        chosen = dataclasses.replace(
            chosen, extractor=dataclasses.replace(chosen.extractor, seed=seed),
            merger=dataclasses.replace(chosen.merger, seed=seed),
            evaluation=dataclasses.replace(chosen.evaluation, seed=seed))
    if budgets is not None:
        chosen = dataclasses.replace(chosen, budgets=tuple(float(b) for b in budgets))
    return Run(run_dir, chosen, device=device, progress=progress)


def figures_dir(run: Run, figures: str | Path | None = None) -> Path:
    path = Path(figures) if figures is not None else run.dir.figures
    path.mkdir(parents=True, exist_ok=True)
    return path


def show(fig, path: str | Path) -> None:
    """Save `fig` as a PNG (the static figure of reports) and show it inline."""
    from IPython.display import display

    save_figure(fig, path)
    display(fig)


def say(run: Run, section: str, text: str) -> None:
    """Print a generated sentence and keep it in summary.json["texts"] (reports/README.md quotes it)."""
    print(text)
    summary = read_json(run.dir.summary_path) if run.dir.summary_path.is_file() else {}
    run.dir.update_summary("texts", {**summary.get("texts", {}), section: text})


def table(rows: Sequence[dict], columns: Sequence[str] | None = None, digits: int = 1):
    """A pandas DataFrame for display, floats rounded to `digits` places."""
    import pandas as pd

    df = pd.DataFrame(list(rows))
    if columns is not None:
        # every accuracy with its interval, and the headline robust accuracy and the checks behind it
        # beside the numbers, whatever columns a notebook asks for
        wanted = []
        for c in [*columns, *(c for c in TRUST_COLUMNS if c not in columns)]:
            wanted += [c, f"{c}_ci"]
        df = df[[c for c in dict.fromkeys(wanted) if c in df.columns]]
    # settings are shown exactly (alpha 0.25 must not read 0.2); measured numbers to `digits` places
    df = df.round({c: digits for c in df.columns if c not in ("alpha", "eps", "p")})
    for c in df.columns:
        # an interval or a min-max range, stored as [lo, hi], reads "lo-hi"
        if c.endswith(("_ci", "_range")):
            df[c] = [ci_text(v) if isinstance(v, (list, tuple)) and len(v) == 2 else "-" for v in df[c]]
    for c in df.columns:
        # counts stay integers, and a missing one reads "-" (not 200.0 and NaN)
        column = [r.get(c) for r in rows]
        given = [v for v in column if v is not None]
        if given and all(isinstance(v, int) and not isinstance(v, bool) for v in given):
            df[c] = ["-" if v is None else v for v in column]
    return df


def label(eps: float) -> str:
    """An extractor's name in tables and figures: its training budget."""
    return budget_label(eps)


def colours(run: Run) -> dict[str, tuple]:
    """One colour per extractor of the run, the same in every figure (`plots.extractor_colours`)."""
    return extractor_colours(run.budgets())


def baseline_budget(run: Run) -> float:
    """The single network trained at (nearest) the evaluation budget: the paper's PGD-AT baseline."""
    budgets = run.budgets()
    if not budgets:
        raise BadInput(f"run {run.dir.root} has no trained extractors yet")
    eps = run.preset.evaluation.eps
    return min(budgets, key=lambda b: (abs(b - eps), b))


def main_subset(run: Run, subset: str | None = None) -> str:
    """The binary vector of the main AFS model's extractors ('selected' resolved by the concavity rule)."""
    spec = run.preset.default_subset if subset is None else subset

    return subset_vector(run.subset_indices(spec), len(run.budgets()))


def main_alpha(run: Run, alpha: float | None = None) -> float:
    return float(run.preset.merger.alpha if alpha is None else alpha)


# ============================================================================ cached evaluations

def evaluate_extractor(run: Run, eps: float, attacks: Sequence[str] = PGD_ATTACKS,
                       n_examples: int | None = None) -> dict:
    """One extractor under `attacks` (clean always), cached in RUN/eval/ by config and checkpoint."""
    # every robust number in a report is cross-checked against gradient masking, single networks too
    return run.evaluate(model_name("extractor", eps), run.extractor(eps)[0], attacks=tuple(attacks),
                        n_examples=n_examples, sanity=True, model_info=run.model_info("extractor", eps))


def afs_name(run: Run, subset: str, alpha: float) -> str:
    """The merger folder of (subset, alpha) under the run's merger config."""
    cfg = dataclasses.replace(run.preset.merger, alpha=float(alpha))
    return run.merger_name(run.subset_indices(subset), cfg)[0]


def merger_exists(run: Run, subset: str, alpha: float) -> bool:
    return (run.dir.merger_dir(afs_name(run, subset, alpha)) / "merger.pt").is_file()


def evaluate_afs(run: Run, subset: str, alpha: float, attacks: Sequence[str] = PGD_ATTACKS,
                 n_examples: int | None = None) -> tuple[dict, torch.nn.Module]:
    """The AFS model of (subset, alpha), its merger trained when missing, evaluated (cached) with the
    gradient-masking sanity checks; returns (metrics, model)."""
    model = run.afs_model(subset, alpha=float(alpha))
    name = afs_name(run, subset, alpha)
    metrics = run.evaluate(model_name("afs", name), model, attacks=tuple(attacks),
                           n_examples=n_examples, model_info=run.model_info("merger", name))
    return metrics, model


def accuracy_row(metrics: dict, attacks: Sequence[str]) -> dict:
    """A table row's numbers: each accuracy with its 95% interval, `worst` (every attack run on the
    same examples, the headline robust accuracy), the masking checks' verdict and training health."""
    out = {}
    for a in ("clean", *attacks, "worst"):
        if a in metrics:
            out[a] = metrics[a]
            out[f"{a}_ci"] = [float(v) for v in metrics["ci95"][a]]  # [lo, hi], numbers a program can read
    sanity = metrics.get("sanity")
    out["sanity"] = "not run" if sanity is None else "passed" if sanity["passed"] else \
        "FAILED: " + ", ".join(sanity["failed"])
    out["sanity_passed"] = bool(sanity and sanity["passed"])
    # every masking check with its verdict and the numbers it was decided on
    out["masking"] = sanity
    model = metrics.get("model", {})
    out["health"] = "not trained" if model.get("kind") == "avg" else health_label(model.get("health"))
    merged = model.get("kind") in ("merger", "ensemble")
    out["floor"] = floor_label(model.get("floor")) if merged else "-"
    out["floor_verdict"] = model.get("floor") if merged else None
    # which of its checked weights a merger kept: "start" (from the best member's head, it predicts as that
    # member does) or "epoch N"; None where not a merger or not recorded
    kept = model.get("kept_epoch") if merged else None
    out["merger_kept"] = None if kept is None else "start" if kept == 0 else f"epoch {kept}"
    out["merger_init"] = model.get("init") if merged else None
    out["eval"], out["examples_hash"] = metrics.get("name"), metrics.get("examples", {}).get("hash")
    out["attacks"] = metrics.get("attacks")  # the attacks behind these numbers (a record may hold more)
    return out


def ci_text(ci: Sequence[float]) -> str:
    """An interval [lo, hi] as tables and sentences write it: "52.8-61.5"."""
    lo, hi = ci
    return f"{lo:.1f}-{hi:.1f}"


def health_label(health: dict | None) -> str:
    """A training-health verdict in a few words (from the checkpoint's `health`)."""
    if health is None:
        return "not recorded"
    if health["passed"]:
        return "ok"
    why = [w for w, bad in (("loss above chance", health.get("above_chance")), ("loss rising", health.get("rising")))
           if bad]
    return "FLAGGED: " + (", ".join(why) or "see checkpoint")


def evaluation_flags(run: Run, name: str, attacks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The per-example flags saved beside evaluation `name`'s metrics.json (for paired tests); with `attacks`, as
    if only those had been run (`flags_over`), as the row's numbers are."""
    flags = load_checkpoint(run.dir.eval_dir(name) / "flags.pt")["flags"]
    return flags if attacks is None else flags_over(flags, attacks)


def paired_sentence(run: Run, a: dict, b: dict, name_a: str, name_b: str, measure: str = "worst") -> str:
    """'A is better than B (...)' or 'no significant difference' for two table rows, by the exact
    McNemar test on their per-example flags (same examples, checked by the examples' hash)."""
    fa, fb = evaluation_flags(run, a["eval"], a.get("attacks")), evaluation_flags(run, b["eval"], b.get("attacks"))
    if a["examples_hash"] != b["examples_hash"]:
        raise BadInput(f"rows {name_a!r} and {name_b!r} were evaluated on different examples; no paired test")
    return compare(fa[measure], fb[measure], name_a, name_b)["text"]


# ============================================================================ several seeds

def seed_runs(run: Run, count: int = 1) -> list[Run]:
    """This run and its other seeds (`Run.seed_run`), `count` in all; the missing extractors of each
    are trained."""
    runs = [run.seed_run(s) for s in run.seeds(count)]
    for r in runs:
        r.train_extractors()
    return runs


def over_seeds(per_seed: dict[int, Sequence[dict]], by: str, columns: Sequence[str]) -> list[dict]:
    """Mean and min-max over seeds of each `columns` value, rows matched by their `by` field (e.g.
    the budget or the method). Seeds missing a row are left out of that row's statistics."""
    keys = list(dict.fromkeys(r[by] for rows in per_seed.values() for r in rows))
    out = []
    for key in keys:
        row = {by: key, "seeds": 0}
        for c in columns:
            values = [r[c] for rows in per_seed.values() for r in rows if r[by] == key and r.get(c) is not None]
            row["seeds"] = max(row["seeds"], len(values))
            if values:
                row[c] = float(np.mean(values))
                row[f"{c}_range"] = [float(min(values)), float(max(values))]
        out.append(row)
    return out


def seeds_summary(run: Run, per_seed: dict[str, dict[int, Sequence[dict]]]) -> None:
    """summary.json["seeds"]: the seeds used and, per table, each seed's rows."""
    summary = read_json(run.dir.summary_path) if run.dir.summary_path.is_file() else {}
    stored = {k: v for k, v in (summary.get("seeds") or {}).items() if k != "seeds"}
    tables = {**stored, **{name: {str(s): rows for s, rows in table.items()} for name, table in per_seed.items()}}
    # the seeds the tables hold now: a table made again with fewer seeds takes its old seeds with it
    seeds = sorted({int(s) for table in tables.values() for s in table})
    run.dir.update_summary("seeds", {"seeds": seeds, **tables})


# table 1's rows, shared by its builder in `tables` and the widgets' single networks
def extractor_table(run: Run, n_examples: int | None = None) -> list[dict]:
    """Table 1: clean, PGD-10 and PGD-20 test accuracy (%) of every trained extractor, and the
    validation numbers its early stopping saw."""
    rows = []
    for i, eps in enumerate(run.budgets()):
        m = evaluate_extractor(run, eps, PGD_ATTACKS, n_examples)
        best = run.extractor(eps)[1]["metrics"]
        rows.append({"network": i, "eps": eps, "budget": format_budget(eps), **accuracy_row(m, PGD_ATTACKS),
                     "val_clean": best.get("val_clean"), "val_pgd": best.get("val_pgd"), "n": m["n"]})
    return rows


def extractor_points(rows: Sequence[dict], robust: str = HEADLINE_PGD) -> dict[str, tuple[float, float]]:
    """name -> (clean, robust) of table-1 rows, for `plot_clean_vs_robust`."""
    return {label(r["eps"]): (r["clean"], r[robust]) for r in rows}


def stacked_labels(run: Run, subset: str) -> list[str]:
    budgets = run.budgets()
    return [format_budget(budgets[i]) for i in run.subset_indices(subset)]
