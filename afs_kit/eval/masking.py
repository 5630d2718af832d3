"""Checks that a robust accuracy is not inflated by gradient masking, each able to fail.

After Athalye et al. (2018, "Obfuscated gradients") and Carlini et al. (2019, "On evaluating
adversarial robustness"). Every form of masking they name is caught by at least one check:

| form                                     | caught by                                          |
|------------------------------------------|----------------------------------------------------|
| shattered gradients (non-differentiable) | nonzero_gradients, blackbox_not_stronger           |
| stochastic gradients (random forward)    | deterministic_eval_mode                            |
| vanishing / exploding gradients          | nonzero_gradients, converged (its margin loss)     |
| a backward pass that does not match      | blackbox_not_stronger, transfer_not_stronger       |
| an attack that has not converged         | converged                                          |
| a stack whose members hide each other    | stack_attacks_not_stronger (a stack's own attacks) |

"Stronger" is decided per example, never on two averages: an attack is significantly stronger than
the reported one when an exact McNemar test on the same examples gives p < 0.05 and it breaks more
of the examples the two disagree on. One such test per check; with the default 200 examples a
difference of about 4 points is significant.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attacks.methods import pgd, square_attack
from ..attacks.registry import HEADLINE_PGD, PGD_STEPS
from ..config import EvalConfig
from ..core.checks import check_int, check_real
from ..core.device import exact_fp32, model_device, resolve_device
from ..core.stats import SIGNIFICANCE, discordant, paired_test, percent
from ..errors import BadInput, warn
from ..models.stack import AFSModel, LogitAverage
from .flags import check_eval_inputs, correct_flags, pgd_flags, robust_where

STRENGTHS = {
    # examples checked (None: all given), Square's queries (AutoAttack's standard run uses 5,000), the restarts of
    # the converged check's PGD (for CE and for the CW margin loss). "light" is `make demo`'s: every check runs,
    # on less evidence (its half-cost converged check was half of every demo evaluation's time)
    "light": {"n": 100, "square_queries": 500, "restarts": 1},
    "quick": {"n": 200, "square_queries": 1000, "restarts": 2},
    "full": {"n": None, "square_queries": 5000, "restarts": 2},
}
STRONGER_STEPS = 5     # the converged check runs 5x the steps of the strongest reported PGD


def checked_examples(cfg: EvalConfig) -> int | None:
    """How many examples an evaluation's masking checks use (`EvalConfig.sanity_examples` unless the strength is
    "full", which checks every one); None: the strength's own number."""
    return cfg.sanity_examples if cfg.sanity_strength != "full" else None


def _stronger(reported: torch.Tensor, other: torch.Tensor, **numbers) -> dict:
    """Fails when `other` (robust flags of another attack) breaks significantly more than `reported`."""
    only_other_breaks, only_reported_breaks = discordant(reported, other)
    p = paired_test(reported, other)
    failed = only_other_breaks > only_reported_breaks and p < SIGNIFICANCE
    return {"passed": not failed, "reported": percent(reported), "other": percent(other),
            "only_other_breaks": only_other_breaks, "only_reported_breaks": only_reported_breaks, "p": p,
            **numbers}


def stronger_pgd_flags(model, x, y, eps: float, steps: int, batch_size: int = 200, generator=None,
                       progress: bool = False, robust: torch.Tensor | None = None, restarts: int = 2) -> torch.Tensor:
    """Robust flags under the `converged` check's attack: PGD-`steps`, step eps/8, `restarts` restarts, run
    once with cross-entropy and once with the CW margin loss; robust only if both fail.

    `robust` (e.g. the clean-correct flags) marks the examples still to attack; the rest stay False.
    Each attack runs only on the examples every earlier one left standing, as AutoAttack does: in
    eval mode an example's attack does not depend on the others, so this only saves the work.
    """
    robust = torch.ones(len(y), dtype=torch.bool, device=y.device) if robust is None else robust
    for loss in ("ce", "cw"):
        robust = robust_where(robust, x, y, lambda xs, ys, loss=loss: pgd_flags(
            model, xs, ys, eps, eps / 8, steps, batch_size, restarts=restarts, generator=generator,
            loss=loss, progress=progress, desc=f"PGD-{steps} {loss}"))
    return robust


class MemberLogits(nn.Module):
    """The logits an AFS model's merger computes from some of its members' features alone (the others' share
    left out): what an attack made for a stack follows, one member (or group) at a time."""

    def __init__(self, model, members: list[int]):
        super().__init__()
        dims = model.stack.feature_dims
        start = [sum(dims[:i]) for i in range(len(dims))]
        cols = torch.cat([torch.arange(start[i], start[i] + dims[i]) for i in members])
        self.extractors = nn.ModuleList([model.stack.extractors[i] for i in members])
        weight, bias = model.merger.share(cols)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.cat([m.features(x) for m in self.extractors], dim=1), self.weight, self.bias)


def stack_sources(model: nn.Module, below: list[int] | None = None) -> dict[str, nn.Module]:
    """The attacks made for a stack: PGD on each member's share of the merger's logits and, where `below`
    names the members trained below the evaluation budget, on theirs together; none for other models."""
    if not isinstance(model, AFSModel) or len(model.stack.extractors) < 2:
        return {}
    sources = {f"member {i}": MemberLogits(model, [i]) for i in range(len(model.stack.extractors))}
    if below and 1 < len(below) < len(model.stack.extractors):
        sources["members below the budget"] = MemberLogits(model, below)
    return sources


def stack_attack_flags(model, x, y, eps: float, step: float, steps: int, sources: dict[str, nn.Module],
                       standing: torch.Tensor, generator=None, batch_size: int = 200) -> tuple[torch.Tensor, dict]:
    """Robust flags of `model` under every attack of `sources` (PGD-`steps` on each, evaluated on the whole
    model), each on the examples the ones before left standing; and per source what it broke, or why it could
    not attack (a source without gradients is a finding, not a crash)."""
    robust, per = standing.clone(), {}
    for name, source in sources.items():
        hit = _through(source, model, x, y, robust, eps, step, steps, generator, batch_size)
        if isinstance(hit, str):
            per[name] = hit
            continue
        per[name] = int((robust & ~hit).sum())  # broken by this attack and by none before it
        robust = hit
    return robust, per


def _through(source: nn.Module, model, x, y, standing: torch.Tensor, eps: float, step: float, steps: int,
             generator, batch_size: int = 200) -> torch.Tensor | str:
    """`model`'s robust flags where PGD is crafted on `source` (a surrogate, a member's share) and only the
    examples `standing` are attacked; a source without gradients gives "no gradient: ..." (a finding, not a crash)."""
    def crafted(xs, ys):
        x_adv = torch.cat([pgd(source, xs[i:i + batch_size], ys[i:i + batch_size], eps, step, steps,
                               generator=generator) for i in range(0, len(ys), batch_size)])
        return correct_flags(model, x_adv, ys)

    try:
        return robust_where(standing, x, y, crafted)
    except RuntimeError as err:
        return f"no gradient: {str(err).splitlines()[0]}"


def attacks_joining_worst(model, x, y, eps: float, step: float, checks: dict, standing: torch.Tensor, generator,
                          batch_size: int = 200, progress: bool = False, below: list[int] | None = None) -> dict:
    """The stronger attacks of the checks that failed (`sanity_checks` result `checks`), run on every example
    still `standing`, each after the one before: {"pgd<N>": flags} for `converged`, {"stack": flags} for
    `stack_attacks_not_stronger`. They join `worst`."""
    out, found = {}, checks["checks"]
    if not found["converged"]["passed"]:
        steps, restarts = found["converged"]["steps"], found["converged"].get("restarts", 2)
        out[f"pgd{steps}"] = standing = stronger_pgd_flags(model, x, y, eps, steps, batch_size, generator=generator,
                                                           progress=progress, robust=standing, restarts=restarts)
    stack = found.get("stack_attacks_not_stronger")
    if stack is not None and not stack["passed"]:
        out["stack"], _ = stack_attack_flags(model, x, y, eps, step, stack["steps"], stack_sources(model, below),
                                             standing, generator, batch_size)
    return out


def transfer_sources(model: nn.Module) -> dict[str, nn.Module]:
    """The surrogates a stacked model's transfer check attacks: each extractor and their logit average."""
    if isinstance(model, AFSModel):
        members = list(model.stack.extractors)
    elif isinstance(model, LogitAverage):
        members = list(model.models)
    else:
        return {}
    sources = {f"extractor {i}": m for i, m in enumerate(members)}
    if len(members) > 1:
        sources["logit average"] = LogitAverage(members)
    return sources


@exact_fp32("fp32")  # the checks' attacks in IEEE fp32 (TF32 off on CUDA), as the reported ones
def sanity_checks(model, x: torch.Tensor, y: torch.Tensor, eps: float, metrics: dict | None = None,
                  n: int | None = None, seed: int = 0, device: str | None = None, flags: dict | None = None,
                  strength: str = "quick", sources: dict[str, nn.Module] | None = None,
                  step: float | None = None, say=None, below: list[int] | None = None) -> dict:
    """Gradient-masking checks on at most `n` examples (default: the strength's, 200 for "quick").

    Args:
        model, x, y, eps: the model as evaluated, its test examples and the evaluation budget.
        metrics: the evaluation's metrics (its attacks name the reported PGD's steps; with AutoAttack
            and PGD but no `flags`, `aa_not_above_pgd` compares the two percentages).
        flags: the evaluation's per-example flags ({attack: BoolTensor} over the same first examples
            as x). The reported attack is the AND of its PGD flags; without flags PGD-20 is run here.
        strength: "quick" (200 examples, Square with 1,000 queries), "full" (every example given,
            Square with 5,000 queries as in AutoAttack) or "light" (100 examples, Square with 500 queries,
            one restart of the converged check's PGD: the demo's).
        sources: surrogate models for the transfer check; None: for an AFS model or a logit average,
            each extractor and their logit average; for any other model the check is skipped.
        step: the reported PGD's step size (None: eps / 4).
        say: called with one line as each slow check starts (e.g. `print`); None: silent.
        device: where the checks run; None: the model's device (x and y are moved there).

    Checks, each `{"passed": bool, ...numbers}`:
        converged: PGD with 5x the steps of the strongest reported PGD, 2 restarts (1 when "light"), cross-entropy and
            the CW margin loss, does not break significantly more examples (McNemar p < 0.05) than
            the reported attack. `Run.evaluate` then reports the stronger attack in `worst`.
        blackbox_not_stronger: Square (no gradients) is not significantly stronger than PGD.
        aa_square_breaks_nothing (where AutoAttack ran): Square, run after APGD-CE, APGD-T and FAB-T,
            lowers the robust accuracy by at most 0.2 points (pyautoattack's own warning threshold).
        transfer_not_stronger: PGD on each surrogate, transferred to the model, breaks no significantly
            more examples (all surrogates together) than the white-box attack.
        aa_not_above_pgd (where AutoAttack ran): PGD does not break significantly more than AutoAttack.
        stack_attacks_not_stronger (AFS models): PGD on each member's share of the merger's logits (and on the
            members trained below the budget together, `below`), each evaluated on the whole model and run on
            what the reported attack left standing, breaks no significantly more; `broke_beyond_reported` says
            what each broke. `Run.evaluate` then reports them in `worst` ("stack").
        monotone_in_budget: robust accuracy does not rise with the budget (eps/2, eps, 2 eps).
        large_budget_breaks: at a budget of max(0.5, 8 eps) accuracy falls to at most 10%.
        nonzero_gradients: input gradients are finite and non-zero for most examples.
        deterministic_eval_mode: same logits twice, independent of the rest of the batch, eval mode.

    Returns `{"passed", "failed": [names], "checks": {name: {...}}, "n", "strength"}`; a failed check
    also warns loudly.
    """
    if strength not in STRENGTHS:
        raise BadInput(f"strength must be one of {', '.join(STRENGTHS)}, got strength={strength!r}")
    if n is None:
        n = STRENGTHS[strength]["n"] or len(y)
    n = check_int("n", n, 1, what="examples checked")
    check_real("eps", eps, 0, 1, low_open=True, what="the sanity checks' budget")
    dev = model_device(model, x.device) if device is None else resolve_device(device)
    x, y = x[:n].to(dev), y[:n].to(dev)
    check_eval_inputs(x, y)
    if len(y) == 0:
        raise BadInput("the sanity checks need at least one example, got x with 0 images")
    model = model.to(dev).eval()
    n = len(y)
    tol = 100 / n + 1e-9
    alpha = eps / 4 if step is None else step
    gen = torch.Generator(device=dev).manual_seed(seed)
    clean = correct_flags(model, x, y)
    checks = {}

    attacked = [a for a in (metrics or {}).get("attacks", []) if a in PGD_STEPS] or [HEADLINE_PGD]
    reported_steps = max(PGD_STEPS[a] for a in attacked)
    given = {a: f[:n].to(dev) for a, f in (flags or {}).items() if a in PGD_STEPS}
    if given:
        white = clean.clone()
        for f in given.values():
            white &= f
    else:
        white = robust_where(clean, x, y,
                          lambda xs, ys: pgd_flags(model, xs, ys, eps, alpha, reported_steps, generator=gen))

    steps = STRONGER_STEPS * reported_steps
    say = say or (lambda _line: None)
    restarts = STRENGTHS[strength]["restarts"]
    attack = f"PGD-{steps} x {restarts} restart{'s' if restarts > 1 else ''}, CE and CW"
    say(f"  masking check 1 of 4: converged, {attack}, on the {int(clean.sum())} of {n} examples classified "
        f"correctly ...")
    strong = stronger_pgd_flags(model, x, y, eps, steps, generator=gen, robust=clean, restarts=restarts)
    checks["converged"] = _stronger(white, strong, attack=f"{attack}, step eps/8", steps=steps, restarts=restarts)

    queries = STRENGTHS[strength]["square_queries"]
    say(f"  masking check 2 of 4: Square, {queries} queries ...")
    square = clean & correct_flags(model, square_attack(model, x, y, eps, n_queries=queries, seed=seed), y)
    checks["blackbox_not_stronger"] = _stronger(white, square, attack=f"Square, {queries} queries")

    sources = transfer_sources(model) if sources is None else sources
    if sources:
        say(f"  masking check 3 of 4: transfer from {len(sources)} surrogates ...")
        transfer, per_source = clean.clone(), {}
        for name, source in sources.items():
            hit = _through(source.to(dev).eval(), model, x, y, clean, eps, alpha, reported_steps, gen)
            if isinstance(hit, str):  # a member (a path of the model) without gradients
                per_source[name] = hit
                continue
            per_source[name] = percent(hit)
            transfer &= hit
        checks["transfer_not_stronger"] = _stronger(white, transfer, per_source=per_source)
        unattackable = [k for k, v in per_source.items() if isinstance(v, str)]
        if unattackable:
            checks["transfer_not_stronger"].update(passed=False, no_gradient=unattackable)

    stack = stack_sources(model, below)
    if stack:
        say(f"  masking check 3b: PGD-{reported_steps} on each member's share of the merger's logits ...")
        by_stack, per_member = stack_attack_flags(model, x, y, eps, alpha, reported_steps, stack, white,
                                                  generator=gen)
        checks["stack_attacks_not_stronger"] = _stronger(white, by_stack, broke_beyond_reported=per_member,
                                                         steps=reported_steps)
        if any(isinstance(v, str) for v in per_member.values()):
            checks["stack_attacks_not_stronger"]["passed"] = False

    checks.update(_autoattack_checks(metrics, flags, n))

    say("  masking check 4 of 4: budgets eps/2 to 8 eps, gradients, determinism ...")
    budgets = [eps / 2, eps, 2 * eps]
    curve = [percent(robust_where(clean, x, y, lambda xs, ys, b=b: pgd_flags(model, xs, ys, min(b, 1.0), b / 4, 10,
                                                                            generator=gen)))
             for b in budgets]
    checks["monotone_in_budget"] = {"passed": all(b <= a + tol for a, b in zip([percent(clean)] + curve, curve)),
                                    "budgets": [min(b, 1.0) for b in budgets], "accuracy": curve}
    large = min(1.0, max(0.5, 8 * eps))
    at_large = percent(robust_where(clean, x, y, lambda xs, ys: pgd_flags(model, xs, ys, large, large / 10, 20,
                                                                        generator=gen)))
    checks["large_budget_breaks"] = {"passed": at_large <= 10.0, "budget": large, "accuracy": at_large}

    delta = torch.zeros_like(x, requires_grad=True)
    loss = F.cross_entropy(model(x + delta), y, reduction="sum")
    # a model whose output carries no gradient at all answers with all-zero gradients (allow_unused)
    (grad,) = torch.autograd.grad(loss, delta, allow_unused=True) if loss.requires_grad else (None,)
    grad = torch.zeros_like(x) if grad is None else grad
    zero_share = (grad.flatten(1).abs().sum(1) == 0).float().mean().item()
    finite = bool(torch.isfinite(grad).all())
    checks["nonzero_gradients"] = {"passed": zero_share < 0.5 and finite, "zero_gradient_share": zero_share,
                                   "finite": finite}
    with torch.no_grad():
        z = model(x)
        same = torch.equal(z, model(x))
        # BatchNorm left in training mode, or any batch statistic, makes one example's logits
        # depend on the others in its batch
        half = max(1, n // 2)
        alone = torch.allclose(model(x[:half]), z[:half], rtol=1e-4, atol=1e-4)
    in_eval = not any(m.training for m in model.modules())
    checks["deterministic_eval_mode"] = {"passed": same and alone and in_eval, "deterministic": same,
                                         "batch_independent": alone, "eval_mode": in_eval}

    return _verdict(checks, n, strength)


def _autoattack_checks(metrics: dict | None, flags: dict | None, n: int) -> dict:
    """The checks that compare AutoAttack with PGD on the first `n` examples (none without AutoAttack)."""
    checks = {}
    breakdown = (metrics or {}).get("aa_breakdown")
    if breakdown and "square" in breakdown:
        drop = 100 * breakdown["square"] / metrics["n"]
        checks["aa_square_breaks_nothing"] = {"passed": drop <= 0.2, "square_broke": breakdown["square"],
                                              "points": drop, "breakdown": breakdown}
    pgd = [f[:n] for a, f in (flags or {}).items() if a in PGD_STEPS]
    if flags is not None and "aa" in flags and pgd:
        aa, white = flags["aa"][:n], flags["clean"][:n].clone()
        for f in pgd:
            white &= f.to(white.device)
        checks["aa_not_above_pgd"] = _stronger(aa.to(white.device), white, aa=percent(aa), pgd=percent(white))
    elif metrics and "aa" in metrics and HEADLINE_PGD in metrics:
        checks["aa_not_above_pgd"] = {"passed": metrics["aa"] <= metrics[HEADLINE_PGD] + 100 / metrics["n"] + 1e-9,
                                      "aa": metrics["aa"], HEADLINE_PGD: metrics[HEADLINE_PGD]}
    return checks


def aa_checks(sanity: dict, metrics: dict, flags: dict) -> dict:
    """`sanity` (a `sanity_checks` result) with its AutoAttack checks made again from an evaluation
    record to which attacks were added; the other checks are kept as they were."""
    checks = {k: v for k, v in sanity["checks"].items() if k not in ("aa_square_breaks_nothing", "aa_not_above_pgd")}
    checks.update(_autoattack_checks(metrics, flags, sanity["n"]))
    return _verdict(checks, sanity["n"], sanity["strength"])


def _verdict(checks: dict, n: int, strength: str) -> dict:
    failed = [k for k, v in checks.items() if not v["passed"]]
    if failed:
        details = "; ".join(f"{k}: {_brief(checks[k])}" for k in failed)
        warn(f"SANITY CHECKS FAILED: {', '.join(failed)} -- the robust accuracy may be inflated by gradient "
             f"masking or a broken attack; do not trust it before finding out why ({details})")
    return {"passed": not failed, "failed": failed, "checks": checks, "n": n, "strength": strength}


def _brief(check: dict) -> dict:
    return {k: v for k, v in check.items() if k != "passed"}
