"""The paper's figures that are more than a table: fig. 3 (Delta-z and the selection rule), fig. 4
(t-SNE) and fig. 6 (the merger's weights), each with its numbers and sentence."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..config import format_budget
from ..core.io import read_json
from ..explain.analysis import trustworthiness_score, tsne_embedding, weight_stats
from ..explain.paper import PAPER_SELECTED_EPS
from ..explain.selection import check_eq10
from ..run.pipeline import Run
from .common import baseline_budget, label, main_alpha, main_subset

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
    vector = run.selected_subset()
    stored = read_json(run.dir.selection_path)
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
    labels = y.cpu().numpy()
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


# ============================================================================ fig. 6

def weight_study(run: Run, subset: str | None = None, alpha: float | None = None) -> dict:
    """Fig. 6: the classifier weights of a small-budget network (the paper's network-1), of the
    baseline network (network-8) and the main AFS model's merger, with their sparsity statistics."""
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


def weight_rows(stats: dict) -> list[dict]:
    return [{"classifier": name, **values} for name, values in stats.items()]
