"""The paper's tables for one run, each with the sentence that says what it shows: table 1 (the
extractors), table 2 (alpha), table 3 (subsets), tables 4-5 (the comparison with paired tests) and
table 6 (cost and ablations)."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ..attacks.registry import HEADLINE_PGD
from ..config import config_hash, format_budget
from ..core.io import read_json, write_json
from ..core.stats import compare, points_apart, spearman
from ..errors import BadInput
from ..eval.evaluation import robustness_curve
from ..eval.masking import JOINING_PGD
from ..explain.analysis import importance_ratio, model_cost
from ..explain.frontier import frontier_study, frontier_text
from ..explain.paper import TABLE4_CIFAR10, TABLE5_CIFAR100
from ..models.nets import model_from_checkpoint
from ..plots import HEADLINE_MARKER, STACKED_MARKER
from ..run.controls import same_budget_ensemble
from ..run.pipeline import Run
from ..run.rundir import model_name
from .common import (PGD_ATTACKS, accuracy_row, afs_name, autoattack_name, baseline_budget, ci_text, evaluate_afs,
                     evaluate_extractor, evaluation_flags, extractor_points, extractor_table, label, main_alpha,
                     main_subset, paired_sentence)

# ============================================================================ table 1

def extractor_text(rows: Sequence[dict]) -> str:
    """Does clean accuracy fall and robust accuracy (the worst case) rise with the training budget, as
    in table 1? Said by a Spearman test across the budgets and by whether the smallest and largest
    budget's 95% intervals overlap."""
    def interval(r, what):
        return tuple(r[f"{what}_ci"])

    first, last = rows[0], rows[-1]
    parts = []
    for what, name, falls in (("clean", "clean accuracy", True), ("worst", "worst-case robust accuracy", False)):
        values = [r[what] for r in rows]
        rho, p = spearman([r["eps"] for r in rows], values) if len(rows) > 2 else (float("nan"), float("nan"))
        trend = ("no trend can be tested on fewer than 3 budgets" if p != p else
                 f"Spearman rho = {rho:+.2f} across the {len(rows)} budgets, p = {p:.2g}: "
                 + (("it falls" if falls else "it rises") if (rho < 0) == falls and p < 0.05 else
                    "no significant trend the paper's way"))
        (lo_a, hi_a), (lo_b, hi_b) = interval(first, what), interval(last, what)
        apart = "apart" if hi_b < lo_a or hi_a < lo_b else "overlapping"
        parts.append(f"{name} {first[what]:.1f}% [{ci_text(first[what + '_ci'])}] at {first['budget']} and "
                     f"{last[what]:.1f}% [{ci_text(last[what + '_ci'])}] at {last['budget']} (95% intervals {apart}); "
                     f"{trend}")
    return "; ".join(parts) + ". The paper's table 1 has clean accuracy falling and robustness rising throughout."


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


def best_single(rows: Sequence[dict], robust: str = HEADLINE_PGD) -> dict:
    """The extractor row with the best trade-off, mean(clean, robust)."""
    return max(rows, key=lambda r: (r["clean"] + r[robust]) / 2)


# ============================================================================ table 2, fig. 5

def alpha_sweep(run: Run, alphas: Sequence[float], subset: str | None = None,
                n_examples: int | None = None) -> list[dict]:
    """Table 2: one merger per alpha over the main subset (trained when missing), its clean, PGD-10
    and PGD-20 accuracy (%) and the importance ratio of each stacked extractor (fig. 5b)."""
    vector = main_subset(run, subset)
    rows = []
    for alpha in alphas:
        m, model = evaluate_afs(run, vector, alpha, PGD_ATTACKS, n_examples)
        ratio = importance_ratio(model.merger, model.stack.feature_dims)
        rows.append({"alpha": float(alpha), **accuracy_row(m, PGD_ATTACKS),
                     "importance": [float(r) for r in ratio], "subset": vector, "n": m["n"]})
    return rows


def robustness_curves(run: Run, subset: str | None = None, alpha: float | None = None,
                      n_examples: int | None = None, steps: int = 20) -> dict:
    """Fig. 5a: PGD-`steps` accuracy (%) against the attack budget of the main AFS model and of every
    single extractor; each curve is cached in RUN/analysis/curves/ by config."""
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
        path = run.dir.curve_path(config_hash(name))
        if path.is_file() and read_json(path).get("key") == key:
            curves[name] = read_json(path)["accuracy"]
            continue
        curve = robustness_curve(build(), x, y, budgets, steps=steps, batch_size=ev.batch_size, seed=ev.seed,
                                 precision=ev.precision, device=run.device)
        curves[name] = [c["accuracy"] for c in curve]
        with run.writing():
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
            f"worst case {single['worst']:.1f}%, mean {single_t:.1f} (AFS {points_apart(afs_t - single_t)}). Clean: "
            f"{paired_sentence(run, best, single, name_a, name_b, 'clean')}. Worst case: "
            f"{paired_sentence(run, best, single, name_a, name_b, 'worst')}.")


# ============================================================================ table 3

def subset_table(run: Run, subsets: Sequence[str], alpha: float | None = None,
                 n_examples: int | None = None) -> list[dict]:
    """Table 3: the AFS model over each subset of extractors (merger trained when missing)."""
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
    return {**extractor_points(extractors), **{f"AFS {r['subset']}": (r["clean"], r[HEADLINE_PGD]) for r in rows}}


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


# ============================================================================ tables 4-6, fig. 1

def comparison_table(run: Run, subset: str | None = None, alpha: float | None = None,
                     n_examples: int | None = None, n_aa: int | None = None, controls: bool = True) -> list[dict]:
    """Tables 4-5 for this run: the headline AFS model (role "AFS": the preset's default subset, the
    concavity rule's stack where there is a choice), the baseline (PGD-AT at the evaluation budget), the
    best single extractor and, with `controls`, two controls on the same test images: the logit average of
    eq. 9 over the same extractors ("logit average") and as many networks all trained at the baseline's
    budget with other seeds, merged by the same merger training ("same-budget ensemble").

    Clean and PGD-20 on `n_examples`; AutoAttack on the first `n_aa` (default the preset's
    `evaluation.aa_examples`, at most `n_examples`) with the trade-off (mean of clean and AA) on those
    same examples. The controls get no AutoAttack.
    """
    if n_aa is None:
        n_aa = run.preset.evaluation.aa_examples
        n_aa = n_examples if n_aa is None else n_aa if n_examples is None else min(n_aa, n_examples)
    vector, alpha = main_subset(run, subset), main_alpha(run, alpha)
    extractors = extractor_table(run, n_examples)
    base, single = baseline_budget(run), best_single(extractors)["eps"]
    with_aa = (*PGD_ATTACKS, "aa")  # AutoAttack and PGD on the same examples: `worst` is over all of them
    rows = []

    def row(role, method, pgd, aa, n_models, subset=None):
        r = {"role": role, "method": method, "subset": subset, **accuracy_row(pgd, (HEADLINE_PGD,)), "aa": None,
             "tradeoff": None, "n": pgd["n"], "n_aa": None, "extractors": n_models, "pgd_eval": pgd["name"],
             "aa_eval": None}
        if aa is not None:
            on_aa = accuracy_row(aa, with_aa)
            # the worst case and the trade-off on the AutoAttack examples, with the clean accuracy of
            # those same examples (tables 4-5); the masking checks of that evaluation
            r.update({k: on_aa[k] for k in ("aa", "aa_ci", "worst", "worst_ci", "sanity", "sanity_passed",
                                            "masking")},
                     clean_on_aa=aa["clean"], tradeoff=aa["tradeoff"], n_aa=aa["n"], aa_eval=aa["name"],
                     aa_attacks=list(aa.get("aa_breakdown", {})))
        rows.append(r)

    afs_pgd, _ = evaluate_afs(run, vector, alpha, PGD_ATTACKS, n_examples)
    afs_aa, _ = evaluate_afs(run, vector, alpha, with_aa, n_aa)
    size = vector.count("1")
    row("AFS", f"AFS {vector}, alpha={alpha:g}", afs_pgd, afs_aa, size, vector)
    rows[0]["spec"] = run.preset.default_subset if subset is None else subset  # "selected": the rule's stack
    row("baseline", f"baseline PGD-AT {label(base)}", evaluate_extractor(run, base, PGD_ATTACKS, n_examples),
        evaluate_extractor(run, base, with_aa, n_aa), 1)
    if abs(single - base) > 1e-12:
        row("best single", f"best single {label(single)}", evaluate_extractor(run, single, PGD_ATTACKS, n_examples),
            evaluate_extractor(run, single, with_aa, n_aa), 1)
    if controls:
        avg = run.logit_average(vector)
        avg_pgd = run.evaluate(model_name("avg", vector), avg, attacks=PGD_ATTACKS, n_examples=n_examples,
                               model_info=run.model_info("avg", vector))
        row("logit average", f"logit average (eq. 9) {vector}", avg_pgd, None, size, vector)
        model, name = same_budget_ensemble(run, base, size, alpha)
        ens_pgd = run.evaluate(model_name("ensemble", name), model, attacks=PGD_ATTACKS, n_examples=n_examples,
                               model_info=run.model_info("ensemble", name))
        row("same-budget ensemble", f"same-budget ensemble {size} x {label(base)}, alpha={alpha:g}", ens_pgd, None,
            size)
    return rows


def paired_comparisons(run: Run, rows: Sequence[dict]) -> list[dict]:
    """AFS (the first row) against every other row, per example on the same examples: clean and the
    worst case over every attack, each by an exact McNemar test (`afs_kit.stats.compare`)."""
    afs = rows[0]
    out = []
    for other in rows[1:]:
        use_aa = afs["aa_eval"] is not None and other["aa_eval"] is not None
        key = "aa_eval" if use_aa else "pgd_eval"
        measured = None if use_aa else PGD_ATTACKS  # a PGD record may also hold AutoAttack, added for another row
        a, b = evaluation_flags(run, afs[key], measured), evaluation_flags(run, other[key], measured)
        for what in ("clean", "worst"):
            verdict = compare(a[what], b[what], "AFS", other["method"])
            out.append({"against": other["method"], "role": other["role"], "measure": what,
                        "examples": len(a[what]),
                        "attacks": f"PGD-10, PGD-20 and {autoattack_name(afs['aa_attacks'])}" if use_aa
                        else "PGD-10 and PGD-20", **verdict})
    # clean accuracy at matched robustness: every single extractor whose worst case lies inside AFS's
    # 95% interval (the question of the paper's abstract: more accurate at the same robustness?)
    lo, hi = afs["worst_ci"]
    for r in extractor_table(run, afs["n"]):
        if lo <= r["worst"] <= hi:
            a, b = evaluation_flags(run, afs["pgd_eval"]), evaluation_flags(run, r["eval"])
            verdict = compare(a["clean"], b["clean"], "AFS", f"{label(r['eps'])} (matched robustness)")
            out.append({"against": f"{label(r['eps'])}, worst case {r['worst']:.1f}% inside AFS's [{lo:.1f}-{hi:.1f}]",
                        "role": "single", "measure": "clean", "examples": len(a["clean"]),
                        "attacks": "matched robustness", **verdict})
    return out


def attack_gains(rows: Sequence[dict]) -> list[dict]:
    """Per model of a comparison (`comparison_table` rows): what the attacks made for stacks (PGD on each member's
    share of the merger's logits) and the smallest-margin attack broke beyond the reported PGD, on the masking
    checks' examples, and whether they joined `worst` (they do when their check fails)."""
    out = []
    for r in rows:
        masking = r.get("masking") or {}
        checks = masking.get("checks", {})
        stack, closest = checks.get("stack_attacks_not_stronger"), checks.get("smallest_margin_not_stronger")
        row = {"role": r["role"], "method": r["method"], "checked": masking.get("n")}
        if stack is not None:
            row.update(stack_attacks="; ".join(f"{k}: {v}" for k, v in stack["broke_beyond_reported"].items()),
                       stack_in_worst="yes" if not stack["passed"] else "no")
        else:
            row.update(stack_attacks="not a stack", stack_in_worst="-")
        if closest is not None:
            chosen = {k: v for k, v in closest["chosen_from"].items() if v}
            row.update(smallest_margin=closest["broke_beyond_reported"],
                       beyond_every_check=closest["only_other_breaks"], p=closest["p"],
                       smallest_margin_in_worst="yes" if not closest["passed"] else "no",
                       closest_from=max(chosen, key=chosen.get) if chosen else "-")
        out.append(row)
    return out


def pgd_robust_flags(flags: dict) -> np.ndarray:
    """Per example: correct under every PGD attack of an evaluation record (PGD-10, PGD-20, the stronger PGD of a
    failed `converged` check, a stack's own attacks and the smallest-margin attack where they broke more);
    AutoAttack, run on only some models, is left out so that every point of the frontier is measured alike."""
    robust = flags["clean"].bool().clone()
    for attack, f in flags.items():
        if attack.startswith("pgd") or attack in JOINING_PGD:
            robust &= f.bool()
    return robust.numpy()


def singles_frontier(run: Run, rows: Sequence[dict], n_examples: int | None = None, draws: int = 2000) -> dict:
    """The headline AFS model (the first of `rows`) against the single extractors' frontier on the same
    test images: (robustness under every PGD attack, clean accuracy) points, the distance above the
    frontier and its bootstrap interval (`afs_kit.frontier.frontier_study`, examples resampled once for
    every model)."""
    afs = rows[0]
    singles = extractor_table(run, n_examples)
    hashes = {afs["examples_hash"], *(r["examples_hash"] for r in singles)}
    if len(hashes) != 1:
        raise BadInput("the AFS model and the single extractors were evaluated on different examples; the "
                       "frontier needs the same ones")

    def points(name):
        f = evaluation_flags(run, name)
        return {"clean": f["clean"].bool().numpy(), "robust": pgd_robust_flags(f)}

    study = frontier_study(points(afs["pgd_eval"]), {label(r["eps"]): points(r["eval"]) for r in singles},
                           draws=draws, seed=run.preset.evaluation.seed)
    study["robust_measure"] = ("every PGD attack (PGD-10, PGD-20 and the stronger ones of failed masking checks: "
                               "the converged check's, the stack's own, the smallest-margin one)")
    study["afs_method"] = afs["method"]
    # the controls measured alike, for fig. 1 (they are not part of the frontier)
    study["controls"] = {}
    for r in rows[1:]:
        if r["role"] in ("logit average", "same-budget ensemble") and r["examples_hash"] in hashes:
            p = points(r["pgd_eval"])
            study["controls"][r["method"]] = {"robust": 100 * float(p["robust"].mean()),
                                              "clean": 100 * float(p["clean"].mean())}
    return study


def frontier_points(study: dict) -> dict[str, tuple[float, float]]:
    """Fig. 1's points from `singles_frontier`: name -> (clean, robust) of AFS, the controls and every
    single extractor, all under the frontier's robustness measure."""
    named = {study["afs_method"]: study["afs"], **study["controls"], **study["singles"]}
    return {name: (p["clean"], p["robust"]) for name, p in named.items()}


def frontier_markers(study: dict) -> dict[str, str]:
    """Fig. 1's markers for the stacked models, which no single network shares: a star for AFS, diamonds
    for the controls."""
    return {study["afs_method"]: HEADLINE_MARKER, **{name: STACKED_MARKER for name in study["controls"]}}


def paper_reference(run: Run):
    """The paper's table of the same data set (quoted), or None."""
    name = run.data.name.lower()
    if "cifar100" in name or "cifar-100" in name:
        return TABLE5_CIFAR100
    if "cifar10" in name or "cifar-10" in name:
        return TABLE4_CIFAR10
    return None


def comparison_text(rows: Sequence[dict], paired: Sequence[dict], frontier: dict | None = None) -> str:
    """Tables 4-5 in sentences, from the numbers: the trade-off (mean of clean and AutoAttack on the
    same examples) of AFS and of the best single network, then every paired test, which alone may
    say "better" or "worse"."""
    afs = rows[0]
    singles = [r for r in rows[1:] if r["tradeoff"] is not None]
    best = max(singles, key=lambda r: r["tradeoff"])
    chosen = " (the concavity rule's stack, chosen on validation images)" if afs.get("spec") == "selected" else ""
    text = (f"{afs['method']}{chosen}: clean {afs['clean_on_aa']:.1f}%, {autoattack_name(afs['aa_attacks'])} "
            f"{afs['aa']:.1f}% "
            f"(worst case over every attack {afs['worst']:.1f}%, 95% CI {ci_text(afs['worst_ci'])}), trade-off "
            f"{afs['tradeoff']:.1f}, against {best['tradeoff']:.1f} for the best single network, {best['method']} "
            f"(AFS {points_apart(afs['tradeoff'] - best['tradeoff'])}, on {afs['n_aa']} test examples).")
    for p in paired:
        text += f" {p['measure'].capitalize()} accuracy: {p['text']}."
    if not any(p["attacks"] == "matched robustness" for p in paired):
        text += (f" No single extractor's worst case lies inside AFS's 95% interval [{ci_text(afs['worst_ci'])}], "
                 f"so none is compared at matched robustness.")
    for r in rows:
        if r.get("merger_kept") == "start" and r.get("merger_init") == "best-member":
            text += (f" {r['method']}: its merger kept its start, the head of its best member on validation (no "
                     f"epoch's weights scored higher), so it predicts exactly as that single network does.")
    if frontier is not None:
        text += " " + frontier_text(frontier, "robustness under every PGD attack")
    return text


def cost_table(run: Run, subset: str | None = None, alpha: float | None = None, n_examples: int | None = None,
               ablation: bool = True) -> list[dict]:
    """Table 6: parameters, multiply-accumulates per image, clean and PGD-20 accuracy of the baseline,
    the random-budget network and the large model (when `ablation` and the preset names them) and the
    AFS model."""
    vector, alpha = main_subset(run, subset), main_alpha(run, alpha)
    shape = run.data.image_shape
    base = baseline_budget(run)
    entries = [(f"Baseline {label(base)}", run.extractor(base)[0],
                evaluate_extractor(run, base, PGD_ATTACKS, n_examples))]
    if ablation and run.preset.ablation_budget_range is not None:
        ckpt = run.train_ablation()
        model = model_from_checkpoint(ckpt, run.device)
        lo, hi = run.preset.ablation_budget_range
        metrics = run.evaluate(model_name("ablation", "random-budget"), model,
                               attacks=PGD_ATTACKS, n_examples=n_examples,
                               model_info={"kind": "ablation", "key": ckpt["key"], "health": ckpt.get("health")})
        entries.append((f"Rand.pert. {format_budget(lo)}..{format_budget(hi)}", model, metrics))
    if ablation and run.preset.large_model is not None:
        ckpt = run.train_large_model()
        model = model_from_checkpoint(ckpt, run.device)
        metrics = run.evaluate(model_name("ablation", "large-model"), model,
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


def cost_text(run: Run, rows: Sequence[dict]) -> str:
    """Table 6 in a few sentences: what AFS costs and gains over the baseline; what the ablations do
    (each difference with its paired test on the same examples)."""
    base, afs = rows[0], rows[-1]

    def against_base(r):
        return (f"{r['params'] / base['params']:.2f}x the parameters and {r['macs'] / base['macs']:.2f}x the MACs "
                f"of the baseline; clean {points_apart(r['clean'] - base['clean'])} it, worst case "
                f"{points_apart(r['worst'] - base['worst'])} it ("
                f"{paired_sentence(run, r, base, r['setting'], 'the baseline')})")

    text = f"AFS has {against_base(afs)}."
    for r in rows[1:-1]:
        text += f" {r['setting']}: {against_base(r)}."
    return text
