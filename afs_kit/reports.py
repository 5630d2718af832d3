"""What the notebooks call, and `afs-kit report`: the notebook sequence executed with papermill.

The notebooks stay thin: every table is built here from `Run` (so evaluations are cached on disk
by config), every figure comes from `afs_kit.plots`. `run_report` executes `notebooks/NN_*.ipynb`
in order into `reports/<preset>/`: the executed notebooks, their HTML, every figure as PNG and
`summary.json` (each notebook's part, from RUN/summary.json, plus the wall time of each stage).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .config import budget_name, config_hash, format_budget, get_preset, parse_float, parse_unit, preset_from_dict
from .pipeline import PROJECT_ROOT, Run
from .runs import load_checkpoint, read_json, write_json

NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
NOTEBOOKS = ("01_extractors", "02_delta_z", "03_tsne", "04_merger_alpha", "05_subsets", "06_weights",
             "07_comparison")

# Every name a notebook's `parameters` cell may hold: name -> (kind, meaning). `afs-kit report -p`
# accepts exactly these; "?" marks kinds that also take None, a count is an integer >= 1, a unit a
# number in [0, 1].
PARAMETERS: dict[str, tuple[str, str]] = {
    "PRESET": ("str", "preset name (afs-kit report sets it from --preset)"),
    "RUN_DIR": ("str?", "run directory; None: runs/<preset> under the project root"),
    "DEVICE": ("str", "auto (CUDA when present), cpu or cuda[:N]"),
    "SEED": ("int", "seed of extractor, merger and evaluation (0: the preset's); t-SNE too"),
    "SEEDS": ("count", "training seeds in one run directory: SEED and the next SEEDS-1 (tables 1 and 4-5 give "
                       "the mean and min-max over them)"),
    "BUDGETS": ("units?", "training budgets, one extractor each; None: the preset's"),
    "N_EVAL": ("count?", "test examples for clean and PGD accuracy; None: the preset's"),
    "N_AA": ("count?", "test examples for AutoAttack; None: the preset's evaluation.aa_examples (at most N_EVAL)"),
    "TSNE_EXAMPLES": ("count?", "test examples embedded by t-SNE; None: the preset's"),
    "ALPHAS": ("units?", "alpha sweep of the merger (table 2); None: the preset's"),
    "ALPHA": ("unit?", "alpha of the main AFS model; None: the preset's merger alpha"),
    "SUBSET": ("str?", "extractors of the main AFS model; None: the preset's default subset"),
    "SUBSETS": ("strs?", "subsets of table 3 (binary vectors, 'all', 'selected'); None: the preset's"),
    "ABLATION": ("bool", "train and compare the random-budget network of table 6"),
    "FIGURES_DIR": ("str?", "where PNG figures go; None: RUN/figures (the report sets its own)"),
    "INTERACTIVE": ("bool", "show the ipywidgets explorers (the report sets False)"),
}

# the attacks of tables 1-3 (clean is always measured); AutoAttack only where the paper uses it
PGD_ATTACKS = ("pgd10", "pgd20")
# shown in every table that has them: the per-example worst case over every attack, the
# gradient-masking checks and the training health of the model
TRUST_COLUMNS = ("worst", "sanity", "health")


# ============================================================================ parameters

def parse_parameter(name: str, text: str):
    """One `-p NAME=VALUE` value as the literal its kind asks for, without eval.

    Lists are comma-separated (`0,0.5,1`, `101,all`) or JSON (`["3/255,8/255", "all"]`); numbers
    may be fractions (`8/255`); None is `None`.
    """
    if name not in PARAMETERS:
        raise ValueError(f"unknown notebook parameter {name!r}; known: {', '.join(PARAMETERS)}")
    kind = PARAMETERS[name][0]
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    s = str(text).strip()
    if s.lower() in ("none", "null"):
        if optional:
            return None
        raise ValueError(f"parameter {name} must not be None, got {name}={text!r}")
    if kind == "bool":
        low = s.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"parameter {name} must be True or False, got {name}={text!r}")
    if kind in ("int", "count"):
        try:
            value = int(s)
        except ValueError as err:
            raise ValueError(f"parameter {name} must be an integer, got {name}={text!r}") from err
        lo = 1 if kind == "count" else 0
        if value < lo:
            raise ValueError(f"parameter {name} must be >= {lo}, got {name}={text!r}")
        return value
    if kind == "unit":
        return parse_unit(s, name)
    if kind == "str":
        return _unquote(s)
    items = _list_items(name, s)
    if kind == "units":
        values = [v if isinstance(v, (int, float)) and not isinstance(v, bool) else parse_float(str(v), name)
                  for v in items]
        bad = [v for v in values if not 0 <= v <= 1]
        if bad:
            raise ValueError(f"parameter {name} must list numbers in [0, 1], got {name}={text!r}")
        return values
    if not all(isinstance(v, str) for v in items):
        raise ValueError(f"parameter {name} must list strings, got {name}={text!r}")
    return items


def _unquote(s: str) -> str:
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    return s


def _list_items(name: str, s: str) -> list:
    if s.startswith("["):
        try:
            items = json.loads(s)
        except json.JSONDecodeError as err:
            raise ValueError(f"parameter {name} must be a JSON list or comma-separated values, "
                             f"got {name}={s!r} ({err})") from err
        if not isinstance(items, list):
            raise ValueError(f"parameter {name} must be a list, got {name}={s!r}")
    else:
        items = [_unquote(p.strip()) for p in s.split(",") if p.strip()]
    if not items:
        raise ValueError(f"parameter {name} must list at least one value, got {name}={s!r}")
    return items


def parse_parameters(assignments: Sequence[str]) -> dict:
    """`["NAME=VALUE", ...]` -> {NAME: value}; an unknown name or a bad value raises a ValueError naming it."""
    out = {}
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"notebook parameter must look like NAME=VALUE, got {item!r}")
        name, text = item.split("=", 1)
        name = name.strip()
        out[name] = parse_parameter(name, text)
    return out


# ============================================================================ the run a notebook works on

def default_run_dir(preset: str, seed: int = 0) -> Path:
    return PROJECT_ROOT / "runs" / (preset if seed == 0 else f"{preset}-seed{seed}")


def open_run(preset: str, run_dir: str | Path | None = None, device: str = "auto", seed: int = 0,
             budgets: Sequence[float] | None = None, progress: bool = True) -> Run:
    """The run a notebook reads and writes: an existing run keeps its stored preset (with any --set
    overrides it was made with); `budgets` and a non-zero `seed` replace the preset's."""
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(preset, seed)
    chosen = get_preset(preset)
    info = run_dir / "run.json"
    if info.is_file():
        stored = preset_from_dict(read_json(info)["preset"])
        if stored.name != chosen.name:
            raise ValueError(f"run {run_dir} was made with preset={stored.name!r}, not preset={preset!r}")
        chosen = stored
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got seed={seed!r}")
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

    from .plots import save_figure

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
    return df.round({c: digits for c in df.columns if c not in ("alpha", "eps", "p")})


def label(eps: float) -> str:
    """An extractor's name in tables: its training budget."""
    return f"eps={format_budget(eps)}"


def baseline_budget(run: Run) -> float:
    """The single network trained at (nearest) the evaluation budget: the paper's PGD-AT baseline."""
    budgets = run.budgets()
    if not budgets:
        raise ValueError(f"run {run.dir.root} has no trained extractors yet")
    eps = run.preset.evaluation.eps
    return min(budgets, key=lambda b: (abs(b - eps), b))


def main_subset(run: Run, subset: str | None = None) -> str:
    """The binary vector of the main AFS model's extractors ('selected' resolved by the concavity rule)."""
    spec = run.preset.default_subset if subset is None else subset
    from .stacking import subset_vector

    return subset_vector(run.subset_indices(spec), len(run.budgets()))


def main_alpha(run: Run, alpha: float | None = None) -> float:
    return float(run.preset.merger.alpha if alpha is None else alpha)


# ============================================================================ cached evaluations

def _eval_name(base: str, attacks: Sequence[str], n: int | None) -> str:
    return f"{base}--{'-'.join(attacks)}--n{n if n is not None else 'all'}"


def evaluate_extractor(run: Run, eps: float, attacks: Sequence[str] = PGD_ATTACKS,
                       n_examples: int | None = None) -> dict:
    """One extractor under `attacks` (clean always), cached in RUN/eval/ by config and checkpoint."""
    model, ckpt = run.extractor(eps)
    # every robust number in a report is cross-checked against gradient masking, single networks too
    return run.evaluate(_eval_name(f"extractor-{budget_name(eps)}", attacks, n_examples), model,
                        attacks=tuple(attacks), n_examples=n_examples, sanity=True,
                        model_info={"kind": "extractor", "eps": eps, "key": ckpt["key"],
                                    "health": ckpt.get("health")})


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
    health = load_checkpoint(run.dir.merger_dir(name) / "merger.pt").get("health")
    metrics = run.evaluate(_eval_name(f"afs-{name}", attacks, n_examples), model, attacks=tuple(attacks),
                           n_examples=n_examples, model_info={"kind": "merger", "name": name, "health": health})
    return metrics, model


def accuracy_row(metrics: dict, attacks: Sequence[str]) -> dict:
    """A table row's numbers: each accuracy with its 95% interval, `worst` (every attack run on the
    same examples, the headline robust accuracy), the masking checks' verdict and training health."""
    out = {}
    for a in ("clean", *attacks, "worst"):
        if a in metrics:
            out[a] = metrics[a]
            lo, hi = metrics["ci95"][a]
            out[f"{a}_ci"] = f"{lo:.1f}-{hi:.1f}"
    sanity = metrics.get("sanity")
    out["sanity"] = "not run" if sanity is None else "passed" if sanity["passed"] else \
        "FAILED: " + ", ".join(sanity["failed"])
    out["sanity_passed"] = bool(sanity and sanity["passed"])
    model = metrics.get("model", {})
    out["health"] = "not trained" if model.get("kind") == "avg" else health_label(model.get("health"))
    out["eval"], out["examples_hash"] = metrics.get("name"), metrics.get("examples", {}).get("hash")
    return out


def health_label(health: dict | None) -> str:
    """A training-health verdict in a few words (from the checkpoint's `health`)."""
    if health is None:
        return "not recorded"
    if health["passed"]:
        return "ok"
    why = [w for w, bad in (("loss above chance", health.get("above_chance")), ("loss rising", health.get("rising")))
           if bad]
    return "FLAGGED: " + (", ".join(why) or "see checkpoint")


def evaluation_flags(run: Run, name: str) -> dict[str, torch.Tensor]:
    """The per-example flags saved beside evaluation `name`'s metrics.json (for paired tests)."""
    return load_checkpoint(run.dir.eval_dir(name) / "flags.pt")["flags"]


def paired_sentence(run: Run, a: dict, b: dict, name_a: str, name_b: str, measure: str = "worst") -> str:
    """'A is better than B (...)' or 'no significant difference' for two table rows, by the exact
    McNemar test on their per-example flags (same examples, checked by the examples' hash)."""
    from .stats import compare

    fa, fb = evaluation_flags(run, a["eval"]), evaluation_flags(run, b["eval"])
    if a["examples_hash"] != b["examples_hash"]:
        raise ValueError(f"rows {name_a!r} and {name_b!r} were evaluated on different examples; no paired test")
    return compare(fa[measure], fb[measure], name_a, name_b)["text"]


# ============================================================================ table 1

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


def extractor_points(rows: Sequence[dict], robust: str = "pgd20") -> dict[str, tuple[float, float]]:
    """name -> (clean, robust) of table-1 rows, for `plot_clean_vs_robust`."""
    return {label(r["eps"]): (r["clean"], r[robust]) for r in rows}


def extractor_text(rows: Sequence[dict]) -> str:
    """Does clean accuracy fall and robust accuracy rise with the training budget, as in table 1?"""
    clean = [r["clean"] for r in rows]
    robust = [r["pgd20"] for r in rows]
    falls = all(b <= a for a, b in zip(clean, clean[1:]))
    rises = all(b >= a for a, b in zip(robust, robust[1:]))
    return (f"From budget {rows[0]['budget']} to {rows[-1]['budget']}: clean accuracy {clean[0]:.1f}% -> "
            f"{clean[-1]:.1f}% ({'falls monotonically' if falls else 'not monotone'}), PGD-20 {robust[0]:.1f}% -> "
            f"{robust[-1]:.1f}% ({'rises monotonically' if rises else 'not monotone'}). The paper's table 1 has "
            f"both monotone.")


def quoted(rows) -> list[dict]:
    """The paper's published rows (dataclasses from `afs_kit.analysis`) as dicts for `table`; budgets
    written k/255, the source (the same for every row) left out."""
    out = []
    for r in rows:
        d = {k: v for k, v in dataclasses.asdict(r).items() if k != "source"}
        if "eps" in d:
            d["eps"] = format_budget(d["eps"])
        out.append(d)
    return out


def best_single(rows: Sequence[dict], robust: str = "pgd20") -> dict:
    """The extractor row with the best trade-off, mean(clean, robust)."""
    return max(rows, key=lambda r: (r["clean"] + r[robust]) / 2)


# ============================================================================ fig. 3, the selection rule

def delta_z_values(run: Run) -> dict:
    """Per-example Delta-z (eq. 8) of every extractor at the evaluation budget on the first
    `delta_z_examples` validation images (`Run.delta_z_values`, the procedure the selection is made
    with; never test images): mean and std (ddof=0) over the examples."""
    budgets, values = run.delta_z_values()
    return {"budgets": budgets, "Delta": run.preset.evaluation.eps, "mean": values.mean(axis=1).tolist(),
            "std": values.std(axis=1).tolist(), "n": int(values.shape[1]), "split": "validation"}


def selection_summary(run: Run, dz: dict | None = None) -> dict:
    """The concavity rule's verdict as stored by the run (selection.json, made on validation images,
    with the per-budget std) and eq. 10 over the selected budgets. Delta-z is not recomputed: `dz`
    (from `delta_z_values`) is optional, and only checked against the stored curve when given."""
    from .paper import PAPER_SELECTED_EPS
    from .selection import check_eq10

    vector = run.selected_subset()
    stored = read_json(run.dir.root / "selection.json")
    sel = stored["selection"]
    out = {"vector": vector, "budgets": stored["budgets"], "delta_z": stored["delta_z"], "std": stored["std"],
           "Delta": stored["Delta"], "n": stored["n_examples"], "split": stored["split"], "z": sel["z"],
           "eval_budget": sel["eval_budget"], "chosen_range": sel["chosen_range"], "selected": sel["selected"],
           "reasons": sel["reasons"], "second_difference": sel["second_difference"],
           "second_difference_se": sel["second_difference_se"], "concave": sel["concave"],
           "paper_selected": [round(e * 255) for e in PAPER_SELECTED_EPS], "eq10": None}
    if dz is not None:
        gap = float(np.max(np.abs(np.subtract(stored["delta_z"], dz["mean"]))))
        if gap > 1e-4 * max(1.0, float(np.max(np.abs(dz["mean"])))):
            out["note_recomputed"] = (f"a recomputed Delta-z differs from the stored one by up to {gap:.3g} (a "
                                      f"nondeterministic attack on this device?); the table shows the stored one")
    if len(sel["selected"]) >= 3:
        idx = [i for i, b in enumerate(stored["budgets"]) if any(abs(b - s) < 1e-9 for s in sel["selected"])]
        eq = check_eq10([stored["budgets"][i] for i in idx], [stored["delta_z"][i] for i in idx])
        out["eq10"] = dataclasses.asdict(eq)
    return out


def selection_rows(summary: dict) -> list[dict]:
    chosen = set(summary["selected"])
    return [{"budget": format_budget(b), "delta_z": v, "std": s, "d2": d2, "se": se, "concave": c,
             "selected": b in chosen, "reason": r}
            for b, v, s, d2, se, c, r in zip(summary["budgets"], summary["delta_z"], summary["std"],
                                             summary["second_difference"], summary["second_difference_se"],
                                             summary["concave"], summary["reasons"])]


def selection_text(summary: dict) -> str:
    lo, hi = summary["chosen_range"]
    where = (f"Delta-z at Delta = {format_budget(summary['Delta'])}, mean over {summary['n']} validation images "
             f"(never test images)")
    if len(summary["selected"]) == len(summary["budgets"]):
        text = (f"The concavity rule selects every budget, {format_budget(lo)} ... {format_budget(hi)} (subset "
                f"vector {summary['vector']}): {where}, is concave over the whole grid within {summary['z']:g} "
                f"standard errors" + (" (fewer than 3 budgets: trivially)." if len(summary["budgets"]) < 3 else "."))
    else:
        text = (f"The concavity rule selects the budgets {format_budget(lo)} ... {format_budget(hi)} (subset vector "
                f"{summary['vector']}): the widest contiguous range containing the evaluation budget "
                f"{format_budget(summary['eval_budget'])} over which {where}, is concave within {summary['z']:g} "
                f"standard errors.")
        dropped = [(b, r) for b, r in zip(summary["budgets"], summary["reasons"]) if b not in summary["selected"]]
        text += " Left out: " + "; ".join(f"{format_budget(b)} ({r.removeprefix('out: ')})" for b, r in dropped) + "."
    eq = summary.get("eq10")
    if eq is not None:
        verdict = "holds" if eq["holds"] else "does NOT hold"
        text += (f" Eq. 10 over them {verdict}: sum lambda_i Delta_z_i = {eq['lhs']:.3f} vs Delta_z of the "
                 f"network at {format_budget(eq['reference_eps'])} = {eq['rhs']:.3f}.")
    return text


# ============================================================================ fig. 4

def tsne_study(run: Run, subset: str | None = None, n_examples: int | None = None, seed: int = 0) -> dict:
    """Fig. 4: t-SNE of the features of the smallest and the largest budget of the main subset (the
    paper's network-3 and network-8) and of their concatenation, on clean test images."""
    from sklearn.metrics import silhouette_score

    from .analysis import trustworthiness_score, tsne_embedding

    budgets = run.budgets()
    indices = run.subset_indices(main_subset(run, subset))
    if len(indices) < 2:
        indices = list(range(len(budgets)))
    pair = [budgets[indices[0]], budgets[indices[-1]]]
    x, y = run.test_set(n_examples or run.preset.tsne_examples)
    with torch.no_grad():
        feats = [run.extractor(b)[0].features(x.to(run.device)).float().cpu() for b in pair]
    feats.append(torch.cat(feats, dim=1))
    titles = [f"(a) {label(pair[0])}", f"(b) {label(pair[1])}", "(c) concatenation"]
    perplexity = min(30.0, (len(y) - 2) / 3)
    embeddings = [tsne_embedding(f, perplexity=perplexity, seed=seed) for f in feats]
    labels = y.numpy()
    trust = [trustworthiness_score(f, e) for f, e in zip(feats, embeddings)]
    # class separation in each embedding: how well the classes fall apart (fig. 4's visual claim, as a number)
    sil = [float(silhouette_score(e, labels)) for e in embeddings]
    return {"embeddings": embeddings, "labels": labels, "titles": titles, "budgets": pair,
            "trustworthiness": trust, "silhouette": sil, "n": int(len(labels))}


def tsne_summary(study: dict) -> dict:
    """The numbers of fig. 4 for summary.json (the embeddings themselves stay out)."""
    return {"budgets": study["budgets"], "titles": study["titles"], "trustworthiness": study["trustworthiness"],
            "silhouette": study["silhouette"], "n": study["n"]}


def tsne_rows(study: dict) -> list[dict]:
    return [{"features": t, "trustworthiness": tr, "class_separation_silhouette": s}
            for t, tr, s in zip(study["titles"], study["trustworthiness"], study["silhouette"])]


def tsne_text(study: dict) -> str:
    a, b, c = study["silhouette"]  # (a) the smaller budget, (b) the larger (more robust) one
    order = "higher" if c >= b else "lower"
    return (f"Class separation (silhouette of the 2-D embedding, one t-SNE seed, no test of significance): "
            f"{study['titles'][0]} {a:.3f}, {study['titles'][1]} {b:.3f}, concatenation {c:.3f}; the "
            f"concatenation's is {order} than the more robust network's alone (the paper's fig. 4 shows it "
            f"separating the classes well).")


# ============================================================================ table 2, fig. 5

def alpha_sweep(run: Run, alphas: Sequence[float], subset: str | None = None,
                n_examples: int | None = None) -> list[dict]:
    """Table 2: one merger per alpha over the main subset (trained when missing), its clean, PGD-10
    and PGD-20 accuracy (%) and the importance ratio of each stacked extractor (fig. 5b)."""
    from .analysis import importance_ratio

    vector = main_subset(run, subset)
    rows = []
    for alpha in alphas:
        m, model = evaluate_afs(run, vector, alpha, PGD_ATTACKS, n_examples)
        ratio = importance_ratio(model.merger, model.stack.feature_dims)
        rows.append({"alpha": float(alpha), **accuracy_row(m, PGD_ATTACKS),
                     "importance": [float(r) for r in ratio], "subset": vector, "n": m["n"]})
    return rows


def stacked_labels(run: Run, subset: str) -> list[str]:
    budgets = run.budgets()
    return [format_budget(budgets[i]) for i in run.subset_indices(subset)]


def robustness_curves(run: Run, subset: str | None = None, alpha: float | None = None,
                      n_examples: int | None = None, steps: int = 20) -> dict:
    """Fig. 5a: PGD-`steps` accuracy (%) against the attack budget of the main AFS model and of every
    single extractor; each curve is cached in RUN/analysis/curves/ by config."""
    from .evaluation import robustness_curve

    ev = run.preset.evaluation
    budgets = list(ev.budgets) or [float(v) for v in np.linspace(0, 2 * ev.eps, 9)]
    vector, alpha = main_subset(run, subset), main_alpha(run, alpha)
    models = {f"AFS (alpha={alpha:g})": (lambda: run.afs_model(vector, alpha=alpha),
                                         {"kind": "merger", "name": afs_name(run, vector, alpha)})}
    for eps in run.budgets():
        models[label(eps)] = (lambda eps=eps: run.extractor(eps)[0],
                              {"kind": "extractor", "key": run.extractor(eps)[1]["key"]})
    n = n_examples if n_examples is not None else ev.n_examples
    x, y = run.test_set(n)
    curves = {}
    for name, (build, info) in models.items():
        key = config_hash(info, budgets, len(y), steps, ev.seed, ev.batch_size, ev.precision)
        path = run.dir.root / "analysis" / "curves" / f"{config_hash(name)}.json"
        if path.is_file() and read_json(path).get("key") == key:
            curves[name] = read_json(path)["accuracy"]
            continue
        curve = robustness_curve(build(), x, y, budgets, steps=steps, batch_size=ev.batch_size, seed=ev.seed,
                                 precision=ev.precision, device=run.device)
        curves[name] = [c["accuracy"] for c in curve]
        write_json(path, {"key": key, "name": name, "budgets": budgets, "accuracy": curves[name], "n": len(y)})
    return {"budgets": budgets, "accuracy": curves, "n": int(len(y)), "steps": steps}


def alpha_text(run: Run, rows: Sequence[dict], extractors: Sequence[dict]) -> str:
    """Which alpha trades best (mean of clean and the worst case), and how it compares with the best
    single network: "better" or "worse" only where the paired test says so."""
    best = max(rows, key=lambda r: (r["clean"] + r["worst"]) / 2)
    single = best_single(extractors)
    afs_t, single_t = (best["clean"] + best["worst"]) / 2, (single["clean"] + single["worst"]) / 2
    name_a, name_b = f"AFS alpha={best['alpha']:g}", f"the best single extractor {label(single['eps'])}"
    return (f"Best alpha by mean(clean, worst case): alpha={best['alpha']:g} (clean {best['clean']:.1f}%, worst case "
            f"{best['worst']:.1f}%, mean {afs_t:.1f}); {label(single['eps'])}: clean {single['clean']:.1f}%, "
            f"worst case {single['worst']:.1f}%, mean {single_t:.1f} ({afs_t - single_t:+.1f} points). Clean: "
            f"{paired_sentence(run, best, single, name_a, name_b, 'clean')}. Worst case: "
            f"{paired_sentence(run, best, single, name_a, name_b, 'worst')}.")


# ============================================================================ table 3

def subset_table(run: Run, subsets: Sequence[str], alpha: float | None = None,
                 n_examples: int | None = None) -> list[dict]:
    """Table 3: the AFS model over each subset of extractors (merger trained when missing)."""
    from .analysis import importance_ratio

    alpha = main_alpha(run, alpha)
    rows = []
    for spec in subsets:
        vector = main_subset(run, spec)
        m, model = evaluate_afs(run, vector, alpha, PGD_ATTACKS, n_examples)
        rows.append({"subset": vector, "spec": spec, "extractors": len(model.stack.feature_dims),
                     **accuracy_row(m, PGD_ATTACKS),
                     "importance": [float(r) for r in importance_ratio(model.merger, model.stack.feature_dims)],
                     "alpha": alpha, "n": m["n"]})
    return rows


def subset_points(extractors: Sequence[dict], rows: Sequence[dict]) -> dict[str, tuple[float, float]]:
    """Single extractors and AFS subsets as name -> (clean, PGD-20), for `plot_clean_vs_robust`."""
    return {**extractor_points(extractors), **{f"AFS {r['subset']}": (r["clean"], r["pgd20"]) for r in rows}}


def subset_text(run: Run, rows: Sequence[dict]) -> str:
    """Which subset trades best, and whether the largest stack differs from it by the paired test."""
    best = max(rows, key=lambda r: (r["clean"] + r["worst"]) / 2)
    most = max(rows, key=lambda r: r["extractors"])
    text = (f"Best subset by mean(clean, worst case): {best['subset']} ({best['extractors']} extractors, clean "
            f"{best['clean']:.1f}%, worst case {best['worst']:.1f}%). The largest stack, {most['subset']}: clean "
            f"{most['clean']:.1f}%, worst case {most['worst']:.1f}%")
    if best is most:
        return text + "; it is the best."
    return (text + f". Worst case: {paired_sentence(run, best, most, best['subset'], most['subset'])}. Clean: "
            f"{paired_sentence(run, best, most, best['subset'], most['subset'], 'clean')}.")


# ============================================================================ fig. 6

def weight_study(run: Run, subset: str | None = None, alpha: float | None = None) -> dict:
    """Fig. 6: the classifier weights of a small-budget network (the paper's network-1), of the
    baseline network (network-8) and the main AFS model's merger, with their sparsity statistics."""
    from .analysis import weight_stats

    budgets = run.budgets()
    base = baseline_budget(run)
    small = budgets[1] if len(budgets) > 1 and budgets[1] != base else budgets[0]
    vector, alpha = main_subset(run, subset), main_alpha(run, alpha)
    weights = {f"(a) network {label(small)}": run.extractor(small)[0].classifier.weight,
               f"(b) network {label(base)}": run.extractor(base)[0].classifier.weight,
               f"(c) AFS merger {vector}, alpha={alpha:g}": run.afs_model(vector, alpha=alpha).merger.weight}
    weights = {k: w.detach().float().cpu() for k, w in weights.items()}
    return {"weights": weights, "stats": {k: weight_stats(w) for k, w in weights.items()}}


def weights_text(stats: dict) -> str:
    names = list(stats)
    afs, singles = stats[names[-1]], [stats[n] for n in names[:-1]]
    even = all(afs["gini"] < s["gini"] for s in singles)
    word = "more evenly spread (lower Gini) than" if even else "NOT more evenly spread than every one of"
    return (f"The merger's weights are {word} the single classifiers': Gini "
            + ", ".join(f"{n.split(' ', 1)[1]} {stats[n]['gini']:.3f}" for n in names) + ".")


# ============================================================================ tables 4-6, fig. 1

def comparison_table(run: Run, subset: str | None = None, alpha: float | None = None,
                     n_examples: int | None = None, n_aa: int | None = None) -> list[dict]:
    """Tables 4-5 for this run: the main AFS model, the baseline (PGD-AT at the evaluation budget),
    the best single extractor and the logit average of eq. 9 over the same extractors.

    Clean and PGD-20 on `n_examples`; AutoAttack on the first `n_aa` (default the preset's
    `evaluation.aa_examples`, at most `n_examples`) with the
    trade-off (mean of clean and AA) on those same examples. The logit average gets no AutoAttack.
    """
    if n_aa is None:
        n_aa = run.preset.evaluation.aa_examples
        n_aa = n_examples if n_aa is None else n_aa if n_examples is None else min(n_aa, n_examples)
    vector, alpha = main_subset(run, subset), main_alpha(run, alpha)
    extractors = extractor_table(run, n_examples)
    base, single = baseline_budget(run), best_single(extractors)["eps"]
    with_aa = (*PGD_ATTACKS, "aa")  # AutoAttack and PGD on the same examples: `worst` is over all of them
    rows = []

    def row(role, method, pgd, aa, n_models):
        r = {"role": role, "method": method, **accuracy_row(pgd, ("pgd20",)), "aa": None, "tradeoff": None,
             "n": pgd["n"], "n_aa": None, "extractors": n_models, "pgd_eval": pgd["name"], "aa_eval": None}
        if aa is not None:
            on_aa = accuracy_row(aa, with_aa)
            # the worst case and the trade-off on the AutoAttack examples, with the clean accuracy of
            # those same examples (tables 4-5); the masking checks of that evaluation
            r.update({k: on_aa[k] for k in ("aa", "aa_ci", "worst", "worst_ci", "sanity", "sanity_passed")},
                     clean_on_aa=aa["clean"], tradeoff=aa["tradeoff"], n_aa=aa["n"], aa_eval=aa["name"])
        rows.append(r)

    afs_pgd, _ = evaluate_afs(run, vector, alpha, PGD_ATTACKS, n_examples)
    afs_aa, _ = evaluate_afs(run, vector, alpha, with_aa, n_aa)
    row("AFS", f"AFS {vector}, alpha={alpha:g}", afs_pgd, afs_aa, vector.count("1"))
    row("baseline", f"baseline PGD-AT {label(base)}", evaluate_extractor(run, base, PGD_ATTACKS, n_examples),
        evaluate_extractor(run, base, with_aa, n_aa), 1)
    if abs(single - base) > 1e-12:
        row("best single", f"best single {label(single)}", evaluate_extractor(run, single, PGD_ATTACKS, n_examples),
            evaluate_extractor(run, single, with_aa, n_aa), 1)
    avg = run.logit_average(vector)
    avg_pgd = run.evaluate(_eval_name(f"avg-{vector}", PGD_ATTACKS, n_examples), avg, attacks=PGD_ATTACKS,
                           n_examples=n_examples, model_info={"kind": "avg", "subset": vector,
                                                              "keys": [run.extractor(run.budgets()[i])[1]["key"]
                                                                       for i in run.subset_indices(vector)]})
    row("logit average", f"logit average (eq. 9) {vector}", avg_pgd, None, vector.count("1"))
    return rows


def paired_comparisons(run: Run, rows: Sequence[dict]) -> list[dict]:
    """AFS (the first row) against every other row, per example on the same examples: clean and the
    worst case over every attack, each by an exact McNemar test (`afs_kit.stats.compare`)."""
    from .stats import compare

    afs = rows[0]
    out = []
    for other in rows[1:]:
        use_aa = afs["aa_eval"] is not None and other["aa_eval"] is not None
        key = "aa_eval" if use_aa else "pgd_eval"
        a, b = evaluation_flags(run, afs[key]), evaluation_flags(run, other[key])
        for what in ("clean", "worst"):
            verdict = compare(a[what], b[what], "AFS", other["method"])
            out.append({"against": other["method"], "measure": what, "examples": len(a[what]),
                        "attacks": "PGD-10, PGD-20 and AutoAttack" if use_aa else "PGD-10 and PGD-20", **verdict})
    return out


def paper_reference(run: Run):
    """The paper's table of the same data set (quoted), or None."""
    from .paper import TABLE4_CIFAR10, TABLE5_CIFAR100

    name = run.data.name.lower()
    if "cifar100" in name or "cifar-100" in name:
        return TABLE5_CIFAR100
    if "cifar10" in name or "cifar-10" in name:
        return TABLE4_CIFAR10
    return None


def comparison_text(rows: Sequence[dict], paired: Sequence[dict]) -> str:
    """Tables 4-5 in sentences, from the numbers: the trade-off (mean of clean and AutoAttack on the
    same examples) of AFS and of the best single network, then every paired test, which alone may
    say "better" or "worse"."""
    afs = rows[0]
    singles = [r for r in rows[1:] if r["tradeoff"] is not None]
    best = max(singles, key=lambda r: r["tradeoff"])
    text = (f"{afs['method']}: clean {afs['clean_on_aa']:.1f}%, AutoAttack {afs['aa']:.1f}% "
            f"(worst case over every attack {afs['worst']:.1f}%, 95% CI {afs['worst_ci']}), trade-off "
            f"{afs['tradeoff']:.1f}, against {best['tradeoff']:.1f} for the best single network, {best['method']} "
            f"({afs['tradeoff'] - best['tradeoff']:+.1f} points, on {afs['n_aa']} test examples).")
    for p in paired:
        text += f" {p['measure'].capitalize()} accuracy: {p['text']}."
    return text


def cost_table(run: Run, subset: str | None = None, alpha: float | None = None, n_examples: int | None = None,
               ablation: bool = True) -> list[dict]:
    """Table 6: parameters, multiply-accumulates per image, clean and PGD-20 accuracy of the baseline,
    the random-budget network and the large model (when `ablation` and the preset names them) and the
    AFS model."""
    from .analysis import model_cost
    from .training import model_from_checkpoint

    vector, alpha = main_subset(run, subset), main_alpha(run, alpha)
    shape = run.data.image_shape
    base = baseline_budget(run)
    entries = [(f"Baseline {label(base)}", run.extractor(base)[0],
                evaluate_extractor(run, base, PGD_ATTACKS, n_examples))]
    if ablation and run.preset.ablation_budget_range is not None:
        ckpt = run.train_ablation()
        model = model_from_checkpoint(ckpt, run.device)
        lo, hi = run.preset.ablation_budget_range
        metrics = run.evaluate(_eval_name("ablation-random-budget", PGD_ATTACKS, n_examples), model,
                               attacks=PGD_ATTACKS, n_examples=n_examples,
                               model_info={"kind": "ablation", "key": ckpt["key"], "health": ckpt.get("health")})
        entries.append((f"Rand.pert. {format_budget(lo)}..{format_budget(hi)}", model, metrics))
    if ablation and run.preset.large_model is not None:
        ckpt = run.train_large_model()
        model = model_from_checkpoint(ckpt, run.device)
        metrics = run.evaluate(_eval_name("ablation-large-model", PGD_ATTACKS, n_examples), model,
                               attacks=PGD_ATTACKS, n_examples=n_examples,
                               model_info={"kind": "ablation", "key": ckpt["key"], "health": ckpt.get("health")})
        entries.append((f"Large model {run.preset.large_model} {label(run.preset.evaluation.eps)}", model, metrics))
    afs_metrics, afs = evaluate_afs(run, vector, alpha, PGD_ATTACKS, n_examples)
    entries.append((f"AFS {vector}", afs, afs_metrics))
    rows = []
    for setting, model, m in entries:
        cost = model_cost(model, shape)
        rows.append({"setting": setting, "params_k": cost["params"] / 1e3, "macs_m": cost["macs"] / 1e6,
                     **accuracy_row(m, PGD_ATTACKS), "params": cost["params"], "macs": cost["macs"]})
    return rows


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
                row[f"{c}_range"] = f"{min(values):.1f}-{max(values):.1f}"
        out.append(row)
    return out


def seeds_summary(run: Run, per_seed: dict[str, dict[int, Sequence[dict]]]) -> None:
    """summary.json["seeds"]: the seeds used and, per table, each seed's rows."""
    summary = read_json(run.dir.summary_path) if run.dir.summary_path.is_file() else {}
    stored = summary.get("seeds") or {}
    seeds = sorted({int(s) for table in per_seed.values() for s in table} | set(stored.get("seeds", [])))
    run.dir.update_summary("seeds", {**stored, "seeds": seeds,
                                     **{name: {str(s): rows for s, rows in table.items()}
                                        for name, table in per_seed.items()}})


def weight_rows(stats: dict) -> list[dict]:
    return [{"classifier": name, **values} for name, values in stats.items()]


def cost_text(run: Run, rows: Sequence[dict]) -> str:
    """Table 6 in a few sentences: what AFS costs and gains over the baseline; what the ablations do
    (each difference with its paired test on the same examples)."""
    base, afs = rows[0], rows[-1]

    def against_base(r):
        return (f"{r['params'] / base['params']:.2f}x the parameters and {r['macs'] / base['macs']:.2f}x the MACs "
                f"of the baseline; clean {r['clean'] - base['clean']:+.1f} points, worst case "
                f"{r['worst'] - base['worst']:+.1f} points ("
                f"{paired_sentence(run, r, base, r['setting'], 'the baseline')})")

    text = f"AFS has {against_base(afs)}."
    for r in rows[1:-1]:
        text += f" {r['setting']}: {against_base(r)}."
    return text


# ============================================================================ afs-kit report

def notebook_parameters(path: str | Path) -> dict:
    """The names and literal values of a notebook's one `parameters` cell."""
    import ast

    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"notebook {path} must have exactly one cell tagged 'parameters', found {len(cells)}")
    values = {}
    for node in ast.parse(cells[0].source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ValueError(f"the parameters cell of {path} must hold only NAME = literal lines, got "
                             f"{ast.unparse(node)!r}")
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def notebook_paths(folder: str | Path | None = None) -> list[Path]:
    folder = Path(folder) if folder is not None else NOTEBOOKS_DIR
    paths = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no notebooks NN_name.ipynb in {folder}")
    return paths


def _write_html(notebook: Path, html: Path) -> None:
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nbformat.read(str(notebook), as_version=4))
    html.write_text(body, encoding="utf-8")


def _write_summary(out: Path, run_dir: Path, extra: dict) -> None:
    summary_path = run_dir / "summary.json"
    summary = read_json(summary_path) if summary_path.is_file() else {}
    write_json(out / "summary.json", {**summary, **extra})


def check_parameter_values(values: dict, preset, device: str) -> None:
    """What a notebook would only find out later: the device exists, subsets fit the budgets."""
    from .device import resolve_device
    from .stacking import parse_subset

    resolve_device(values.get("DEVICE", device))
    budgets = values.get("BUDGETS") or preset.budgets
    for name in ("SUBSET", "SUBSETS"):
        specs = values.get(name)
        for spec in [specs] if isinstance(specs, str) else specs or []:
            if spec != "selected":
                try:
                    parse_subset(spec, sorted(budgets))
                except ValueError as err:
                    raise ValueError(f"parameter {name}: {err}") from err


def run_report(preset: str, out: str | Path | None = None, run_dir: str | Path | None = None,
               params: Sequence[str] = (), device: str = "auto", notebooks: str | Path | None = None,
               log=print) -> int:
    """Execute the notebook sequence with papermill into `out` (default reports/<preset>).

    Everything is checked before the first notebook runs (preset, parameter names and values, the
    notebooks' own parameters, the run directory's lock); a bad one raises a ValueError. Each
    notebook gets only the parameters its `parameters` cell declares. A failing notebook stops the
    report: exit status 1, its name and cell on stderr, and summary.json says `"partial": true`.
    Returns 0 when every notebook ran.
    """
    import papermill as pm

    values = parse_parameters(params)
    if "PRESET" in values and values["PRESET"] != preset:
        raise ValueError(f"parameter PRESET={values['PRESET']!r} contradicts --preset {preset}")
    check_parameter_values(values, get_preset(preset), device)
    seed = values.get("SEED", 0)
    run_dir = Path(values["RUN_DIR"] if values.get("RUN_DIR") is not None else
                   run_dir if run_dir is not None else Path("runs") / (preset if not seed else f"{preset}-seed{seed}"))
    out = Path(out) if out is not None else Path("reports") / preset
    run_dir, out = run_dir.resolve(), out.resolve()
    paths = notebook_paths(notebooks)
    declared = {p.stem: notebook_parameters(p) for p in paths}
    for stem, names in declared.items():
        unknown = set(names) - set(PARAMETERS)
        if unknown:
            raise ValueError(f"notebook {stem} declares parameters {sorted(unknown)} that afs-kit report does not know")
    info = run_dir / "run.json"
    if info.is_file():
        stored = read_json(info).get("preset", {}).get("name")
        if stored != preset:
            raise ValueError(f"run {run_dir} was made with preset={stored!r}, not preset={preset!r}")
    base = {"PRESET": preset, "RUN_DIR": str(run_dir), "DEVICE": device, "FIGURES_DIR": str(out / "figures"),
            "INTERACTIVE": False, **values}
    base["RUN_DIR"] = str(run_dir)

    from .runs import RunLock

    info = {"preset": preset, "run": str(run_dir), "parameters": values}
    stage_seconds: dict[str, float] = {}
    # one writer per run directory: the notebooks' kernels write into it while the report holds the lock
    # (taken first: a run in use elsewhere is refused before the report folder is touched)
    from .version import pinned_code_version

    # one code version for the whole report, whatever is committed while it runs (the kernels inherit it)
    with RunLock(run_dir), pinned_code_version() as version:
        info["code_version"] = version
        _clear_report(out, paths)
        _write_summary(out, run_dir, {"partial": True, "stage_seconds": stage_seconds, **info})
        for path in paths:
            stem = path.stem
            given = {k: v for k, v in base.items() if k in declared[stem]}
            executed = out / f"{stem}.ipynb"
            log(f"report {preset}: {stem} ...")
            start = time.perf_counter()
            try:
                pm.execute_notebook(str(path), str(executed), parameters=given, cwd=str(path.parent),
                                    progress_bar=False, kernel_name="python3",
                                    # the kernel's own log (e.g. its transport warning) stays out of the report
                                    extra_arguments=["--IPKernelApp.log_level=ERROR"])
            except pm.PapermillExecutionError as err:
                stage_seconds[stem] = round(time.perf_counter() - start, 2)
                failure = {"notebook": stem, "cell": err.cell_index, "execution_count": err.exec_count,
                           "error": f"{err.ename}: {err.evalue}"}
                _write_html(executed, out / f"{stem}.html")
                _write_summary(out, run_dir, {"partial": True, "failed": failure, "stage_seconds": stage_seconds,
                                              **info})
                print(f"afs-kit: report {preset} failed in notebook {stem}, cell {err.cell_index} "
                      f"(execution count {err.exec_count}): {err.ename}: {err.evalue}; partial report in {out}",
                      file=sys.stderr)
                return 1
            except BaseException as err:
                # a dead kernel, a timeout, an interrupt: the report says where it stopped, then the error goes on
                stage_seconds[stem] = round(time.perf_counter() - start, 2)
                failure = {"notebook": stem, "cell": None, "error": f"{type(err).__name__}: {err}"}
                _write_summary(out, run_dir, {"partial": True, "failed": failure, "stage_seconds": stage_seconds,
                                              **info})
                raise
            stage_seconds[stem] = round(time.perf_counter() - start, 2)
            _write_html(executed, out / f"{stem}.html")
            _write_summary(out, run_dir, {"partial": True, "stage_seconds": stage_seconds, **info})
            log(f"report {preset}: {stem} done in {stage_seconds[stem]:.1f} s")
        _write_summary(out, run_dir, {"partial": False, "stage_seconds": stage_seconds, **info})
    log(f"report {preset}: {len(paths)} notebooks in {sum(stage_seconds.values()):.1f} s -> {out}")
    return 0


def _clear_report(out: Path, paths: Sequence[Path]) -> None:
    """Remove what an earlier report left in `out` (only the files a report writes), so a partial
    report never shows an older run's later notebooks or figures as its own."""
    out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        for suffix in (".ipynb", ".html"):
            (out / f"{path.stem}{suffix}").unlink(missing_ok=True)
    for png in (out / "figures").glob("*.png"):
        png.unlink()
    (out / "figures").mkdir(exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)


__all__ = ["PARAMETERS", "NOTEBOOKS", "parse_parameter", "parse_parameters", "open_run", "figures_dir", "show",
           "table", "extractor_table", "delta_z_values", "selection_summary", "tsne_study", "alpha_sweep",
           "robustness_curves", "subset_table", "weight_study", "comparison_table", "cost_table", "run_report",
           "notebook_parameters"]
