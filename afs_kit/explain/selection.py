"""Choosing the extractors (sec. 2.4, 3.1): Delta-z (eq. 8), its curve over budgets (fig. 3), the
concavity rule and the eq. 10 check. `Run.selected_subset` runs the rule on validation images and
stores it in selection.json; `afs_kit.plots.plot_delta_z` draws it.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ..attacks.methods import pgd
from ..config import format_budget
from ..core.checks import check_int, check_real
from ..core.device import eval_mode as _eval_mode
from ..core.io import read_json, write_json
from ..data.batches import to_float, validation_split
from ..errors import BadInput
from ..models.stack import subset_vector

__all__ = ["delta_z", "delta_z_curve", "Selection", "select_extractors", "Eq10Check", "check_eq10"]

_P_OF_NORM = {"Linf": math.inf, "L2": 2.0}


def _as_1d_float(values, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise BadInput(f"{name} must be a sequence of numbers, got {name}={values!r}") from err
    if arr.ndim != 1:
        raise BadInput(f"{name} must be one-dimensional, got {name} with shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise BadInput(f"{name} must be finite, got {name}={arr.tolist()}")
    return arr


def _check_curve(eps, values, values_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Budgets and one value per budget: same length, >= 3 budgets, strictly increasing budgets."""
    e = _as_1d_float(eps, "eps")
    v = _as_1d_float(values, values_name)
    if len(e) != len(v):
        raise BadInput(f"{values_name} must hold one value per budget (len(eps)={len(e)}), "
                       f"got len({values_name})={len(v)}")
    if len(e) < 3:
        raise BadInput(f"eps must hold at least 3 budgets (a second difference needs three), got eps={e.tolist()}")
    if not np.all(np.diff(e) > 0):
        raise BadInput(f"eps must be sorted in strictly increasing order, got eps={e.tolist()}")
    return e, v


# ------------------------------------------------------------------------------------ Delta-z (eq. 8)

def delta_z(model: nn.Module, x: torch.Tensor, Delta: float, norm: str = "Linf", p: float | None = None,
            steps: int = 10, alpha: float | None = None, restarts: int = 1,
            generator: torch.Generator | None = None, batch_size: int = 500,
            precision: str = "fp32") -> torch.Tensor:
    """Eq. 8 per example: max over ||x_adv - x||_norm <= Delta of ||z(x_adv) - z(x)||_p, found by PGD.

    The attack maximizes the logit change itself (not the cross-entropy), through
    `afs_kit.attacks.pgd` with a callable loss, always from a uniform random start: at x_adv = x the
    gradient of a norm of z(x_adv) - z(x) is degenerate (zero change, undefined direction).
    PGD gives a lower bound of the maximum; more steps and restarts tighten it.

    Args:
        model: images in [0, 1] -> logits [N, K]; run in eval mode, training flags restored after.
        x: images [N, C, H, W] in [0, 1], on the model's device.
        Delta: the evaluation attack strength (a budget in `norm`, e.g. 8/255).
        norm: the attack norm, "Linf" or "L2".
        p: the norm of the logit change; None uses the attack's (Linf -> inf, L2 -> 2), as eq. 8
           writes one p for both.
        steps, alpha, restarts: PGD steps, step size (None: Delta / 4, 2/255 at 8/255) and restarts
           (per example the restart with the largest change is kept).
        generator: torch.Generator on x's device for the random starts (None: the global RNG).
        batch_size: examples per attack batch.
        precision: "fp32" or "bf16" autocast of the attack's forward passes (the reported change
           itself is always measured in fp32).

    Returns a float tensor [N] on x's device; exactly zero where Delta = 0.
    """
    if norm not in _P_OF_NORM:
        raise BadInput(f"norm must be one of {tuple(_P_OF_NORM)}, got norm={norm!r}")
    Delta = check_real("Delta", Delta, 0)
    p = check_real("p", _P_OF_NORM[norm] if p is None else p, 1, finite=False, what="math.inf allowed")
    batch_size = check_int("batch_size", batch_size, 1)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise BadInput(f"x must be a batch of images [N,C,H,W], got x.shape={shape}")
    alpha = Delta / 4 if alpha is None else alpha
    out = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    if Delta == 0 or x.shape[0] == 0:
        return out  # no perturbation, no change: exactly zero, without running the model

    x = x.detach()
    with _eval_mode(model):
        for start in range(0, x.shape[0], batch_size):
            xb = x[start:start + batch_size]
            with torch.no_grad():
                z0 = model(xb).float()
            # pgd hands the callable its y; the example's index, so each row compares with its own z0
            idx = torch.arange(xb.shape[0], device=xb.device)

            def logit_change(z: torch.Tensor, i: torch.Tensor, z0: torch.Tensor = z0) -> torch.Tensor:
                return torch.linalg.vector_norm(z - z0[i], ord=p, dim=1)

            x_adv = pgd(model, xb, idx, eps=Delta, alpha=alpha, steps=steps, norm=norm, random_start=True,
                        restarts=restarts, loss=logit_change, precision=precision, generator=generator)
            with torch.no_grad():
                out[start:start + xb.shape[0]] = logit_change(model(x_adv).float(), idx)
    return out


def delta_z_curve(models: Sequence[nn.Module], x: torch.Tensor, Deltas: Sequence[float], norm: str = "Linf",
                  p: float | None = None, steps: int = 10, alpha: float | None = None, restarts: int = 1,
                  seed: int = 0, batch_size: int = 500, precision: str = "fp32",
                  reduce: str = "none") -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Delta-z of every model at every attack strength on the same images (fig. 3).

    Each (model, Delta) pair gets a fresh generator seeded with `seed`, so all models see the same
    random starts and the curve is reproducible. `alpha` None means Delta / 4 for each Delta.

    Returns with reduce="none" an array [n_models, n_Deltas, N]; with reduce="mean_std" the pair
    (mean, std) over the examples, each [n_models, n_Deltas] (std with ddof=0).
    """
    if reduce not in ("none", "mean_std"):
        raise BadInput(f"reduce must be 'none' or 'mean_std', got reduce={reduce!r}")
    models = list(models)
    if not models:
        raise BadInput("models must hold at least one network, got an empty sequence")
    deltas = _as_1d_float(Deltas, "Deltas")
    if len(deltas) == 0:
        raise BadInput(f"Deltas must hold at least one attack strength, got Deltas={list(Deltas)!r}")
    values = np.zeros((len(models), len(deltas), x.shape[0]), dtype=np.float64)
    for i, model in enumerate(models):
        for j, Delta in enumerate(deltas):
            gen = torch.Generator(device=x.device).manual_seed(seed)
            values[i, j] = delta_z(model, x, float(Delta), norm=norm, p=p, steps=steps, alpha=alpha,
                                   restarts=restarts, generator=gen, batch_size=batch_size,
                                   precision=precision).cpu().numpy()
    if reduce == "mean_std":
        return values.mean(axis=2), values.std(axis=2)
    return values


# ------------------------------------------------------------------------------------ the selection rule

@dataclass(frozen=True)
class Selection:
    """The concavity rule's verdict: the `selected` budgets (one contiguous range), and per budget why.

    Per budget (lists as long as `eps`): the mean Delta-z, its spread over the examples, the second
    divided difference of the mean curve and its standard error (None at the two end budgets, which
    have no second difference), whether that second difference counts as concave, and the reason the
    budget is in or out.
    """
    eps: list[float]
    delta_z: list[float]                             # mean over the examples
    second_difference: list[float | None]            # None at the two end budgets
    reasons: list[str]
    selected: list[float]                            # the chosen range's budgets, increasing
    tol: float = 0.0
    std: list[float] | None = None                   # over the examples (ddof=0); None for 1-D means
    second_difference_se: list[float | None] | None = None  # std(ddof=1)/sqrt(N) of the per-example d2
    concave: list[bool | None] | None = None         # d2 <= z * SE + tol (None at the end budgets)
    Delta: float | None = None                       # the evaluation budget
    eval_budget: float | None = None                 # the trained budget nearest Delta (always selected)
    z: float = 2.0
    n_examples: int | None = None                    # None for 1-D means
    chosen_range: tuple[float, float] | None = None  # (smallest, largest) selected budget

    def as_rows(self) -> list[dict]:
        """One dict per budget (eps, delta_z, std, d2, se, concave, selected, reason), e.g. for a DataFrame."""
        n = len(self.eps)
        chosen = set(self.selected)
        std = self.std if self.std is not None else [None] * n
        se = self.second_difference_se if self.second_difference_se is not None else [None] * n
        concave = self.concave if self.concave is not None else [None] * n
        return [{"eps": e, "delta_z": v, "std": s, "d2": d2, "se": q, "concave": c, "selected": e in chosen,
                 "reason": r}
                for e, v, s, d2, q, c, r in zip(self.eps, self.delta_z, std, self.second_difference, se, concave,
                                                self.reasons)]


def _second_divided_differences(e: np.ndarray, v: np.ndarray) -> np.ndarray:
    """f[e-, e, e+] times 2 at every interior budget: the discrete second derivative on an uneven grid.

    2 * ((v+ - v)/(e+ - e) - (v - v-)/(e - e-)) / (e+ - e-); on an even grid of step h it is
    (v- - 2v + v+) / h^2, the usual second difference scaled by 1/h^2 (same sign). `v` may be
    [n_budgets] or [n_budgets, N] (then per column: one curve per example).
    """
    de = np.diff(e).reshape((-1,) + (1,) * (v.ndim - 1))
    slopes = np.diff(v, axis=0) / de
    span = (e[2:] - e[:-2]).reshape((-1,) + (1,) * (v.ndim - 1))
    return 2.0 * np.diff(slopes, axis=0) / span


def _check_selection_input(eps, delta_z) -> tuple[np.ndarray, np.ndarray]:
    """Budgets (>= 1, strictly increasing) and delta_z as [n_budgets] means or [n_budgets, N] per example."""
    e = _as_1d_float(eps, "eps")
    if len(e) == 0:
        raise BadInput(f"eps must hold at least one budget, got eps={e.tolist()}")
    if not np.all(np.diff(e) > 0):
        raise BadInput(f"eps must be sorted in strictly increasing order, got eps={e.tolist()}")
    if isinstance(delta_z, torch.Tensor):
        delta_z = delta_z.detach().cpu().numpy()
    try:
        v = np.asarray(delta_z, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise BadInput(f"delta_z must be numbers, [n_budgets] means or [n_budgets, N] per example, "
                       f"got delta_z={delta_z!r}") from err
    if v.ndim not in (1, 2):
        raise BadInput(f"delta_z must be 1-D (the mean per budget) or 2-D [n_budgets, N] (per example), "
                       f"got delta_z with shape {v.shape}")
    if len(v) != len(e):
        raise BadInput(f"delta_z must hold one value (or row) per budget (len(eps)={len(e)}), "
                       f"got len(delta_z)={len(v)}")
    if v.ndim == 2 and v.shape[1] == 0:
        raise BadInput(f"delta_z must hold at least one example per budget, got delta_z with shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise BadInput(f"delta_z must be finite, got NaN or inf in delta_z with shape {v.shape}")
    return e, v


def select_extractors(eps: Sequence[float], delta_z, Delta: float | None = None, z: float = 2.0,
                      tol: float = 0.0) -> Selection:
    """The budget-selection standard of sections 2.4 and 3.1, made precise.

    Eq. 10 (sum_i lambda_i Delta_z_i < Delta_z of the middle network) holds when Delta_z is concave
    in the training budget eps (Jensen), so the extractors to stack are a range of budgets over which
    the measured curve is concave. The rule: choose the WIDEST CONTIGUOUS range of budgets that
    contains the evaluation budget (the trained budget nearest `Delta`) and over which the mean
    Delta_z is concave, i.e. every second divided difference at an interior budget of the range is
    <= 0 within `z` standard errors (d2 <= z * SE + tol, plus float round-off). The range's own
    end budgets need no second difference of their own, so the smallest and the largest trained
    budgets can be chosen. Second differences are exact on uneven grids (divided differences).

    Standard errors: the same examples are attacked at every budget, so the second difference is
    taken per example (a paired difference; it is linear, so its mean is the mean curve's d2) and
    SE = std(ddof=1) / sqrt(N) over the examples. Given 1-D means (or N = 1) SE = 0 and the test
    is d2 <= tol.

    Ties in width (possible only when the evaluation budget itself is convex, so that it can only
    be an end of the range, or when Delta is None): the range whose mean budget is nearest Delta
    (the stack is then centred on the strength it is evaluated at, as eq. 10 compares with the
    middle network); if still tied, the one with the larger budgets (the stack then keeps the
    robustness at Delta, which is what the paper trades against clean accuracy).
    Fewer than 3 budgets: there is no second difference and every range is trivially concave, so
    all budgets are chosen.

    Worked example (budgets in units of 1/255, so d2 is in Delta_z per (1/255)^2; the verdict does
    not depend on the unit): budgets 0, 2, 4, 6, 8 with mean Delta_z 5.0, 3.0, 2.6, 2.0, 1.2 and
    Delta = 8. The slopes are -1, -0.2, -0.3, -0.4, so d2 = 2 * (slope change) / 4 is 0.4 at 2,
    -0.05 at 4 and -0.05 at 6. The evaluation budget is 8; the range 2..8 has interior budgets 4
    and 6, both concave, while 0..8 would make 2 interior, where the curve is convex (0.4 > 0).
    So 2, 4, 6, 8 are chosen and 0 is dropped (2 is kept: as the range's end its own d2 is not
    needed). Had the per-example values given SE = 0.25 at 2, then 0.4 <= 2 * 0.25 would count as
    noise and all of 0..8 would be chosen.

    >>> sel = select_extractors([0, 2, 4, 6, 8], [5.0, 3.0, 2.6, 2.0, 1.2], Delta=8)
    >>> sel.selected, [None if d is None else round(d, 4) for d in sel.second_difference]
    ([2.0, 4.0, 6.0, 8.0], [None, 0.4, -0.05, -0.05, None])

    Args:
        eps: training budgets, strictly increasing, at least one.
        delta_z: Delta_z of the network trained at each budget at one evaluation strength Delta:
            either [n_budgets, N] per example (the same N examples at every budget; gives standard
            errors) or [n_budgets] means (the old form; SE = 0).
        Delta: the evaluation budget, in the unit of eps; the chosen range always contains the
            trained budget nearest it (on a tie the smaller). None: no such constraint, the widest
            concave range anywhere.
        z: how many standard errors a positive second difference may be and still count as concave.
        tol: a further allowance on d2 (in delta_z per eps^2); 0 is the rule as stated.
    """
    z = check_real("z", z, 0.0)
    tol = check_real("tol", tol)
    if Delta is not None:
        Delta = check_real("Delta", Delta, 0.0)
    e, v = _check_selection_input(eps, delta_z)
    n = len(e)
    per_example = v.ndim == 2
    means = v.mean(axis=1) if per_example else v
    std = v.std(axis=1).tolist() if per_example else None
    n_examples = int(v.shape[1]) if per_example else None
    anchor = int(np.argmin(np.abs(e - Delta))) if Delta is not None else None

    if n < 3:
        reason = "fewer than 3 budgets: no second difference, every range is trivially concave; all chosen"
        return Selection(eps=e.tolist(), delta_z=means.tolist(), second_difference=[None] * n,
                         reasons=[reason] * n, selected=e.tolist(), tol=tol, std=std,
                         second_difference_se=[None] * n, concave=[None] * n, Delta=Delta,
                         eval_budget=None if anchor is None else float(e[anchor]), z=z, n_examples=n_examples,
                         chosen_range=(float(e[0]), float(e[-1])))

    d2 = _second_divided_differences(e, means)
    if per_example and v.shape[1] > 1:
        se = _second_divided_differences(e, v).std(axis=1, ddof=1) / math.sqrt(v.shape[1])
    else:
        se = np.zeros(n - 2)
    # float round-off of a divided difference: a straight line must not read as convex
    round_off = 64 * np.finfo(np.float64).eps * float(np.max(np.abs(means))) / float(np.min(np.diff(e))) ** 2
    ok = d2 <= z * se + tol + round_off
    second: list[float | None] = [None, *d2.tolist(), None]
    ses: list[float | None] = [None, *se.tolist(), None]
    concave: list[bool | None] = [None, *ok.tolist(), None]
    bad = [k for k in range(1, n - 1) if not concave[k]]

    # every range [i, j] containing the anchor with no convex budget strictly inside it
    candidates = [(i, j) for i in range(n) for j in range(i, n)
                  if (anchor is None or i <= anchor <= j) and not any(i < k < j for k in bad)]

    scale = float(e[-1] - e[0]) or 1.0  # distances rounded relative to the grid: float noise breaks no tie

    def preference(r: tuple[int, int]):
        i, j = r
        mid = float(e[i:j + 1].mean())
        return (j - i, -round(abs(mid - Delta) / scale, 9) if Delta is not None else 0.0, mid)

    lo, hi = max(candidates, key=preference)

    def verdict(k: int) -> str:
        return (f"d2={d2[k - 1]:.4g} vs {z:g} SE={z * se[k - 1]:.4g}" if per_example and n_examples > 1
                else f"d2={d2[k - 1]:.4g}")

    reasons = []
    for k in range(n):
        tag = " (evaluation budget)" if k == anchor else ""
        if lo <= k <= hi:
            own = f"; {verdict(k)}" if 0 < k < n - 1 else ""
            if k in (lo, hi):
                reasons.append(f"in{tag}: an end of the chosen range, whose own concavity is not needed{own}")
            else:
                reasons.append(f"in{tag}: concave ({verdict(k)})")
        else:
            edge = lo if k < lo else hi  # widening the range to k makes `edge` interior, and it is convex
            reasons.append(f"out{tag}: a range reaching it would have {format_budget(e[edge])} inside, where "
                           f"Delta-z is convex ({verdict(edge)})")
    return Selection(eps=e.tolist(), delta_z=means.tolist(), second_difference=second, reasons=reasons,
                     selected=e[lo:hi + 1].tolist(), tol=tol, std=std, second_difference_se=ses, concave=concave,
                     Delta=Delta, eval_budget=None if anchor is None else float(e[anchor]), z=z,
                     n_examples=n_examples, chosen_range=(float(e[lo]), float(e[hi])))


@dataclass(frozen=True)
class Eq10Check:
    """Eq. 10 for the logit-averaging model: lhs = sum_i lambda_i Delta_z_i, rhs = Delta_z of one network."""
    lhs: float
    rhs: float
    holds: bool              # lhs < rhs (strict, as eq. 10)
    reference_eps: float     # budget of the single network compared with (nearest the weighted mean budget)
    reference_index: int
    mean_eps: float          # sum_i lambda_i eps_i
    lambdas: tuple[float, ...]


def check_eq10(eps: Sequence[float], delta_z: Sequence[float], lambdas: Sequence[float] | None = None) -> Eq10Check:
    """Check eq. 10: does averaging the logits (weights `lambdas`) shrink the largest logit change?

    The single network compared with is the one whose budget is nearest the weighted mean budget
    sum_i lambda_i eps_i (the paper's "second network" of three; on a tie the smaller budget).
    `lambdas`: positive, summing to 1 (within 1e-6); None = uniform.
    """
    e, v = _check_curve(eps, delta_z, "delta_z")
    if lambdas is None:
        lam = np.full(len(e), 1.0 / len(e))
    else:
        lam = _as_1d_float(lambdas, "lambdas")
        if len(lam) != len(e):
            raise BadInput(f"lambdas must hold one weight per budget (len(eps)={len(e)}), "
                           f"got len(lambdas)={len(lam)}")
        if not np.all(lam > 0) or abs(lam.sum() - 1) > 1e-6:
            raise BadInput(f"lambdas must be positive and sum to 1, got lambdas={lam.tolist()}")
    mean_eps = float(lam @ e)
    ref = int(np.argmin(np.abs(e - mean_eps)))
    lhs, rhs = float(lam @ v), float(v[ref])
    return Eq10Check(lhs=lhs, rhs=rhs, holds=lhs < rhs, reference_eps=float(e[ref]), reference_index=ref,
                     mean_eps=mean_eps, lambdas=tuple(lam.tolist()))


# ---------------------------------------------------------------- a run's selection (selection.json)

def run_delta_z(run):
    """Per-example Delta-z (eq. 8) of every extractor at the evaluation budget: (budgets, [n_budgets, N]).

    On the first `delta_z_examples` (preset) validation images: choosing extractors is model
    selection, so it never looks at the test set. The split is the one extractor training holds
    out, `validation_split(data, data.val_fraction, seed=0)` over the training images. Every
    extractor gets a generator seeded alike, so all see the same random starts (and the same
    examples: the rule takes paired, per-example differences) and the curve is reproducible.
    """
    _, val_idx = validation_split(run.data, run.preset.data.val_fraction, seed=0)
    x = to_float(run.data.x_train[val_idx[: run.preset.delta_z_examples]]).to(run.device)
    budgets = run.budgets()
    rows = [delta_z(run.extractor(b)[0], x, run.preset.evaluation.eps,
                    generator=torch.Generator(device=run.device).manual_seed(0)).cpu()
            for b in budgets]
    return budgets, torch.stack(rows).numpy()


def run_selection(run) -> str:
    """The binary vector the concavity rule chooses (`select_extractors` on the per-example
    validation Delta-z, with the evaluation budget), stored in selection.json with the extractors'
    keys and the settings it was made from; redone when either changes (or the file predates them)."""
    path = run.dir.selection_path
    if not run.budgets():
        raise BadInput(f"subset 'selected' needs extractors trained by the kit (the concavity rule needs their "
                       f"budgets); {run.dir.root} has only outside ones: give a subset (all, a vector, names)")
    keys = [run.member(p)[1]["key"] for _, p in run.extractor_checkpoints()]
    settings = {"split": "validation", "delta_z_examples": run.preset.delta_z_examples,
                "Delta": run.preset.evaluation.eps}
    if path.is_file():
        stored = read_json(path)
        if (isinstance(stored, dict) and stored.get("extractor_keys") == keys and "std" in stored
                and all(stored.get(k) == v for k, v in settings.items())):
            return stored["vector"]
    budgets, values = run.delta_z_values()
    sel = select_extractors(budgets, values, Delta=run.preset.evaluation.eps)
    chosen = [i for i, b in enumerate(budgets) if any(abs(b - s) < 1e-9 for s in sel.selected)]
    with run.writing():
        write_json(path, {"budgets": budgets, "extractor_keys": keys, **settings, "n_examples": sel.n_examples,
                          "delta_z": sel.delta_z, "std": sel.std, "selection": dataclasses.asdict(sel),
                          "vector": subset_vector(chosen, len(budgets))})
    return read_json(path)["vector"]
