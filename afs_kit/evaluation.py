"""Accuracy under attack with per-example flags, robustness curves, trade-off, gradient-masking checks.

Every attack targets the model it is given as a whole: for an AFS model that is the stack of
extractors and the merger together. An attack's robust flag is ANDed with the clean flag (an
example already misclassified is never counted as robust), and `worst` is the AND over all attacks.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .attacks import autoattack, pgd
from .config import ATTACKS, EvalConfig, step_size
from .data import iterate_batches
from .device import autocast, resolve_device
from .runs import save_checkpoint, write_json

PGD_STEPS = {"pgd10": 10, "pgd20": 20}


def check_eval_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be a batch of images [N,C,H,W], got x.shape={tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must hold one label per image ({x.shape[0]}), got y.shape={tuple(y.shape)}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"x must lie in [0, 1], got values in [{x.min().item():.3g}, {x.max().item():.3g}]")


@torch.no_grad()
def correct_flags(model, x, y, batch_size: int = 500, precision: str = "fp32") -> torch.Tensor:
    """Per-example `prediction == label` in eval mode (mode restored)."""
    was_training = model.training
    model.eval()
    try:
        out = []
        for idx in iterate_batches(len(y), batch_size, shuffle=False):
            with autocast(precision, x.device):
                out.append(model(x[idx]).argmax(1) == y[idx])
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=x.device)
    finally:
        model.train(was_training)


def pgd_flags(model, x, y, eps, alpha, steps, batch_size=200, restarts=1, precision="fp32",
              generator=None, progress=False, desc="PGD") -> torch.Tensor:
    """Per-example robust flags (still correct after PGD), batch by batch."""
    out = []
    for idx in tqdm(list(iterate_batches(len(y), batch_size, shuffle=False)), desc=desc, disable=not progress,
                    leave=False):
        x_adv = pgd(model, x[idx], y[idx], eps, alpha, steps, restarts=restarts, precision=precision,
                    generator=generator)
        out.append(correct_flags(model, x_adv, y[idx], batch_size, precision))
    return torch.cat(out)


def evaluate(model, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig, device: str = "auto",
             progress: bool = True) -> dict:
    """Clean, PGD-10, PGD-20 and AutoAttack (as configured) on the first `cfg.n_examples` examples.

    Returns `{"metrics": {...}, "flags": {attack: BoolTensor}}`; accuracies in percent.
    """
    for a in cfg.attacks:
        if a not in ATTACKS:
            raise ValueError(f"unknown attack={a!r}; known: {', '.join(ATTACKS)}")
    dev = resolve_device(device)
    n = len(y) if cfg.n_examples is None else min(cfg.n_examples, len(y))
    x, y = x[:n].to(dev).contiguous(), y[:n].to(dev)
    check_eval_inputs(x, y)
    model = model.to(dev).eval()
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    alpha = step_size(cfg.eps, cfg.step_size)
    flags = {"clean": correct_flags(model, x, y, cfg.batch_size)}
    for name in cfg.attacks:
        if name in PGD_STEPS:
            robust = pgd_flags(model, x, y, cfg.eps, alpha, PGD_STEPS[name], cfg.batch_size,
                               precision=cfg.precision, generator=gen, progress=progress, desc=name)
            flags[name] = flags["clean"] & robust
        elif name == "aa":
            robust, _ = autoattack(model, x, y, cfg.eps, seed=cfg.seed, batch_size=cfg.batch_size,
                                   verbose=False)
            flags[name] = flags["clean"] & robust.to(dev)
    attacked = [a for a in flags if a != "clean"]
    flags["worst"] = flags["clean"].clone()
    for a in attacked:
        flags["worst"] &= flags[a]
    metrics = {a: 100 * f.float().mean().item() for a, f in flags.items()}
    if "aa" in metrics:
        metrics["tradeoff"] = tradeoff(metrics["clean"], metrics["aa"])
    metrics.update(n=n, eps=cfg.eps, step_size=alpha, attacks=list(cfg.attacks), seed=cfg.seed,
                   precision=cfg.precision)
    return {"metrics": metrics, "flags": {a: f.cpu() for a, f in flags.items()}}


def tradeoff(clean: float, aa: float) -> float:
    """Tables 4-5: the mean of clean and AutoAttack accuracy."""
    return (clean + aa) / 2


def robustness_curve(model, x, y, budgets, steps: int = 20, batch_size: int = 200, seed: int = 0,
                     precision: str = "fp32", device: str = "auto", progress: bool = False) -> list[dict]:
    """Accuracy (percent) under PGD-`steps` at each budget, step a quarter of the budget (fig. 5a)."""
    dev = resolve_device(device)
    x, y = x.to(dev), y.to(dev)
    model = model.to(dev).eval()
    gen = torch.Generator(device=dev).manual_seed(seed)
    clean = correct_flags(model, x, y, batch_size)
    out = []
    for eps in budgets:
        if eps == 0:
            acc = clean
        else:
            acc = clean & pgd_flags(model, x, y, eps, eps / 4, steps, batch_size, precision=precision,
                                    generator=gen, progress=progress, desc=f"eps {eps:.3g}")
        out.append({"eps": float(eps), "accuracy": 100 * acc.float().mean().item()})
    return out


def write_evaluation(out_dir: str | Path, result: dict, model_info: dict) -> dict:
    """`metrics.json` (accuracies, settings, the model's config) and the per-example flags beside it."""
    out_dir = Path(out_dir)
    metrics = {**result["metrics"], "model": model_info}
    if "sanity" in result:
        metrics["sanity"] = result["sanity"]
    save_checkpoint(out_dir / "flags.pt", {"kind": "flags", "flags": result["flags"]})
    write_json(out_dir / "metrics.json", metrics)
    return metrics


# ---------------------------------------------------------------- checks against gradient masking

def sanity_checks(model, x: torch.Tensor, y: torch.Tensor, eps: float, metrics: dict | None = None,
                  n: int = 100, seed: int = 0, device: str = "auto") -> dict:
    """Cheap checks after Athalye et al. and AutoAttack's flags, on at most `n` examples.

    Accuracy at budget 0 equals clean accuracy; robust accuracy does not rise with the budget and
    falls to (near) 0 at a large one; 50 steps with 2 restarts do not beat 10 steps; AutoAttack is
    not above PGD-20 (from `metrics`); input gradients are finite and not zero; the model in eval
    mode is deterministic and does not depend on what else is in the batch. About 150 forward and
    backward passes over `n` examples: small next to the evaluation itself.

    Each entry is `{"passed": bool, ...numbers}`; a failed check warns loudly. Tolerances are one
    example of the `n` checked.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (examples checked) must be an integer >= 1, got n={n!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps <= 1:
        raise ValueError(f"eps must be in (0, 1] for the sanity checks, got eps={eps!r}")
    dev = resolve_device(device)
    x, y = x[:n].to(dev), y[:n].to(dev)
    check_eval_inputs(x, y)
    if len(y) == 0:
        raise ValueError("the sanity checks need at least one example, got x with 0 images")
    model = model.to(dev).eval()
    tol = 100 / len(y) + 1e-9
    gen = torch.Generator(device=dev).manual_seed(seed)

    def acc(flags):
        return 100 * flags.float().mean().item()

    clean_flags = correct_flags(model, x, y)
    clean = acc(clean_flags)
    checks = {}
    at_zero = acc(clean_flags & pgd_flags(model, x, y, 0.0, 1e-3, 5, generator=gen))
    checks["budget_zero_equals_clean"] = {"passed": abs(at_zero - clean) <= 1e-9, "clean": clean, "at_zero": at_zero}
    budgets = [eps / 2, eps, 2 * eps]
    curve = [acc(clean_flags & pgd_flags(model, x, y, min(b, 1.0), b / 4, 10, generator=gen)) for b in budgets]
    checks["monotone_in_budget"] = {"passed": all(b <= a + tol for a, b in zip([clean] + curve, curve)),
                                    "budgets": [min(b, 1.0) for b in budgets], "accuracy": curve}
    large = min(1.0, max(0.5, 8 * eps))
    at_large = acc(clean_flags & pgd_flags(model, x, y, large, large / 10, 20, generator=gen))
    checks["large_budget_breaks"] = {"passed": at_large <= 10.0, "budget": large, "accuracy": at_large}
    strong = acc(clean_flags & pgd_flags(model, x, y, eps, eps / 8, 50, restarts=2, generator=gen))
    checks["more_steps_not_stronger"] = {"passed": strong <= curve[1] + tol, "pgd10": curve[1],
                                         "pgd50x2": strong}
    if metrics and "aa" in metrics and "pgd20" in metrics:
        checks["aa_not_above_pgd"] = {"passed": metrics["aa"] <= metrics["pgd20"] + 100 / metrics["n"] + 1e-9,
                                      "aa": metrics["aa"], "pgd20": metrics["pgd20"]}
    delta = torch.zeros_like(x, requires_grad=True)
    loss = F.cross_entropy(model(x + delta), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, delta)
    zero_share = (grad.flatten(1).abs().sum(1) == 0).float().mean().item()
    finite = bool(torch.isfinite(grad).all())
    checks["nonzero_gradients"] = {"passed": zero_share < 0.5 and finite, "zero_gradient_share": zero_share,
                                   "finite": finite}
    with torch.no_grad():
        z = model(x)
        same = torch.equal(z, model(x))
        # BatchNorm left in training mode, or any batch statistic, makes one example's logits
        # depend on the others in its batch
        half = max(1, len(y) // 2)
        alone = torch.allclose(model(x[:half]), z[:half], rtol=1e-4, atol=1e-4)
    in_eval = not any(m.training for m in model.modules())
    checks["deterministic_eval_mode"] = {"passed": same and alone and in_eval, "deterministic": same,
                                         "batch_independent": alone, "eval_mode": in_eval}
    failed = [k for k, v in checks.items() if not v["passed"]]
    if failed:
        details = "; ".join(f"{k}: {({a: b for a, b in checks[k].items() if a != 'passed'})}" for k in failed)
        warnings.warn(f"SANITY CHECKS FAILED: {', '.join(failed)} -- the robust accuracy may be inflated by "
                      f"gradient masking or a broken attack; do not trust it before finding out why ({details})",
                      RuntimeWarning, stacklevel=2)
    return {"passed": not failed, "failed": failed, "checks": checks, "n": len(y)}


