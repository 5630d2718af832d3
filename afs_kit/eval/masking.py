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
| attacks that each stop just short        | smallest_margin_not_stronger (the closest point)   |

"Stronger" is decided per example, never on two averages: an attack is significantly stronger than
the reported one when an exact McNemar test on the same examples gives p < 0.05 and it breaks more
of the examples the two disagree on. One such test per check; with the default 200 examples a
difference of about 4 points is significant.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tqdm.auto import tqdm

from ..attacks.methods import cw_margin, pgd, square_attack
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
    "light": {"n": 100, "square_queries": 200, "restarts": 1},
    "quick": {"n": 200, "square_queries": 1000, "restarts": 2},
    "full": {"n": None, "square_queries": 5000, "restarts": 2},
}
STRONGER_STEPS = 5     # the converged check runs 5x the steps of the strongest reported PGD
# the attacks of failed checks that join `worst` beside the converged check's "pgd<N>": each a PGD
JOINING_PGD = ("stack", "smallest margin")


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
                       progress: bool = False, robust: torch.Tensor | None = None, restarts: int = 2,
                       keep: SmallestMargin | None = None) -> torch.Tensor:
    """Robust flags under the `converged` check's attack: PGD-`steps`, step eps/8, `restarts` restarts, run
    once with cross-entropy and once with the CW margin loss; robust only if both fail.

    `robust` (e.g. the clean-correct flags) marks the examples still to attack; the rest stay False.
    Each attack runs only on the examples every earlier one left standing, as AutoAttack does: in
    eval mode an example's attack does not depend on the others, so this only saves the work.
    `keep`: a SmallestMargin offered every point crafted.
    """
    robust = torch.ones(len(y), dtype=torch.bool, device=y.device) if robust is None else robust
    for loss in ("ce", "cw"):
        robust = crafted_flags(model, x, y, robust, lambda b, loss=loss: pgd(
            model, x[b], y[b], eps, eps / 8, steps, restarts=restarts, generator=generator, loss=loss),
            batch_size, keep, f"PGD-{steps} {loss}", progress)
    return robust


class SmallestMargin:
    """Per example, the point of smallest margin z_y - max_{j != y} z_j on the whole model (negative: misclassified)
    among every adversarial point offered, and the attack that made it. MixedNUTS's adaptive AutoAttack (Bai et
    al., 2024) keeps the minimum-margin example across attacks; one more attack started there goes on from where
    all of them came closest."""

    def __init__(self, model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 200):
        self.model, self.y, self.batch_size = model, y, batch_size
        self.point, self.margin = x.clone(), self._margins(x, y)
        self.names = ["clean"]
        self.source = torch.zeros(len(y), dtype=torch.long, device=y.device)

    @torch.no_grad()
    def _margins(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        size = self.batch_size
        return -torch.cat([cw_margin(self.model(x[i:i + size]), y[i:i + size]) for i in range(0, len(y), size)]
                          or [torch.zeros(0, device=y.device)])

    def offer(self, name: str, idx: torch.Tensor, x_adv: torch.Tensor) -> None:
        """Points `x_adv` of attack `name` for the examples `idx`: kept where their margin is the smallest yet."""
        if not len(idx):
            return
        margin = self._margins(x_adv, self.y[idx])
        better = margin < self.margin[idx]
        if name not in self.names:
            self.names.append(name)
        won = idx[better]
        self.point[won], self.margin[won] = x_adv[better], margin[better]
        self.source[won] = self.names.index(name)

    def chosen_from(self, among: torch.Tensor) -> dict[str, int]:
        """How many of the examples `among` have their smallest-margin point from each attack."""
        return {name: int(((self.source == i) & among).sum()) for i, name in enumerate(self.names)}


def smallest_margin_flags(model, x, y, eps: float, step: float, steps: int, margins: SmallestMargin,
                          standing: torch.Tensor, batch_size: int = 200, progress: bool = False) -> torch.Tensor:
    """Robust flags under PGD-`steps` on the CW margin started at each example's smallest-margin point (`margins`),
    run on the examples `standing` (those every attack offered to `margins` left standing); the rest not robust."""
    return crafted_flags(model, x, y, standing,
                         lambda b: pgd(model, x[b], y[b], eps, step, steps, loss="cw", start=margins.point[b]),
                         batch_size, name="smallest margin", progress=progress)


def crafted_flags(model, x, y, standing: torch.Tensor, craft, batch_size: int = 200,
                  keep: SmallestMargin | None = None, name: str = "", progress: bool = False) -> torch.Tensor:
    """`model`'s robust flags where `craft(b)` (the adversarial points of the examples whose indices are `b`) attacks
    the examples `standing` (through `robust_where`), batch by batch; the points crafted are offered to `keep` as
    attack `name`."""
    idx = standing.nonzero().flatten()  # the examples robust_where hands to `attack`, in its order

    def attack(_xs, ys):
        x_adv = torch.cat([craft(idx[i:i + batch_size]) for i in tqdm(range(0, len(idx), batch_size), desc=name,
                                                                      disable=not progress, leave=False)])
        if keep is not None:
            keep.offer(name, idx, x_adv)
        return correct_flags(model, x_adv, ys)

    return robust_where(standing, x, y, attack)


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
                       standing: torch.Tensor, generator=None, batch_size: int = 200,
                       keep: SmallestMargin | None = None) -> tuple[torch.Tensor, dict]:
    """Robust flags of `model` under every attack of `sources` (PGD-`steps` on each, evaluated on the whole
    model), each on the examples the ones before left standing; and per source what it broke, or why it could
    not attack (a source without gradients is a finding, not a crash). `keep`: a SmallestMargin offered the points."""
    robust, per = standing.clone(), {}
    for name, source in sources.items():
        hit = _through(source, model, x, y, robust, eps, step, steps, generator, batch_size, keep, f"stack {name}")
        if isinstance(hit, str):
            per[name] = hit
            continue
        per[name] = int((robust & ~hit).sum())  # broken by this attack and by none before it
        robust = hit
    return robust, per


def _through(source: nn.Module, model, x, y, standing: torch.Tensor, eps: float, step: float, steps: int,
             generator, batch_size: int = 200, keep: SmallestMargin | None = None,
             name: str = "") -> torch.Tensor | str:
    """`model`'s robust flags where PGD is crafted on `source` (a surrogate, a member's share) and only the
    examples `standing` are attacked; a source without gradients gives "no gradient: ..." (a finding, not a crash)."""
    try:
        return crafted_flags(model, x, y, standing,
                             lambda b: pgd(source, x[b], y[b], eps, step, steps, generator=generator),
                             batch_size, keep, name)
    except RuntimeError as err:
        return f"no gradient: {str(err).splitlines()[0]}"


def attacks_joining_worst(model, x, y, eps: float, step: float, checks: dict, standing: torch.Tensor, generator,
                          batch_size: int = 200, progress: bool = False, below: list[int] | None = None) -> dict:
    """The stronger attacks of the checks that failed (`sanity_checks` result `checks`), run on every example
    still `standing`, each after the one before: {"pgd<N>": flags} for `converged`, {"stack": flags} for
    `stack_attacks_not_stronger`, {"smallest margin": flags} for `smallest_margin_not_stronger` (PGD from each
    example's smallest-margin point among the converged check's and the stack's attacks, run here for it if
    their checks passed). They join `worst`."""
    out, found = {}, checks["checks"]
    closest = found.get("smallest_margin_not_stronger", {"passed": True})
    keep = None if closest["passed"] else SmallestMargin(model, x, y, batch_size)
    converged = found["converged"]
    if not converged["passed"] or keep is not None:
        steps, restarts = converged["steps"], converged.get("restarts", 2)
        robust = stronger_pgd_flags(model, x, y, eps, steps, batch_size, generator=generator, progress=progress,
                                    robust=standing, restarts=restarts, keep=keep)
        if not converged["passed"]:
            out[f"pgd{steps}"] = standing = robust
    stack = found.get("stack_attacks_not_stronger")
    if stack is not None and (not stack["passed"] or keep is not None):
        robust, _ = stack_attack_flags(model, x, y, eps, step, stack["steps"], stack_sources(model, below),
                                       standing, generator, batch_size, keep)
        if not stack["passed"]:
            out["stack"] = standing = robust
    if keep is not None:
        left = standing & keep.margin.gt(0)  # no offered point crossed the boundary
        out["smallest margin"] = smallest_margin_flags(model, x, y, eps, step, closest["steps"], keep, left,
                                                       batch_size, progress)
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
            Square with 5,000 queries as in AutoAttack) or "light" (100 examples, Square with 200 queries,
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
        smallest_margin_not_stronger: PGD-N (the reported steps) on the CW margin, started at each example's
            smallest-margin point among every adversarial point the checks above crafted (MixedNUTS's adaptive
            AutoAttack keeps the minimum-margin example across attacks), breaks no significantly more than all
            those attacks together; `broke_beyond_reported` counts what it broke that the reported PGD did not,
            `chosen_from` which attack's point came closest, per correctly classified example. `Run.evaluate`
            then reports it in `worst` ("smallest margin"). The evaluation's own PGD and AutoAttack points are
            not among them (an evaluation keeps flags, not points); the converged check's PGD supersedes PGD's.
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
    closest = SmallestMargin(model, x, y)  # every check's adversarial points, for the smallest-margin attack
    strong = stronger_pgd_flags(model, x, y, eps, steps, generator=gen, robust=clean, restarts=restarts, keep=closest)
    checks["converged"] = _stronger(white, strong, attack=f"{attack}, step eps/8", steps=steps, restarts=restarts)

    queries = STRENGTHS[strength]["square_queries"]
    say(f"  masking check 2 of 4: Square, {queries} queries ...")
    square_points = square_attack(model, x, y, eps, n_queries=queries, seed=seed)
    square = clean & correct_flags(model, square_points, y)
    closest.offer(f"Square {queries}", clean.nonzero().flatten(), square_points[clean])
    checks["blackbox_not_stronger"] = _stronger(white, square, attack=f"Square, {queries} queries")

    sources = transfer_sources(model) if sources is None else sources
    if sources:
        say(f"  masking check 3 of 4: transfer from {len(sources)} surrogates ...")
        transfer, per_source = clean.clone(), {}
        for name, source in sources.items():
            hit = _through(source.to(dev).eval(), model, x, y, clean, eps, alpha, reported_steps, gen,
                           keep=closest, name=f"transfer {name}")
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
                                                  generator=gen, keep=closest)
        checks["stack_attacks_not_stronger"] = _stronger(white, by_stack, broke_beyond_reported=per_member,
                                                         steps=reported_steps)
        if any(isinstance(v, str) for v in per_member.values()):
            checks["stack_attacks_not_stronger"]["passed"] = False

    # every attack above together; the smallest-margin attack goes on from the point where they came closest
    together = white & strong & square
    if sources:
        together &= transfer
    if stack:
        together &= by_stack
    say(f"  masking check 3c: PGD-{reported_steps} (CW) from each example's smallest-margin point ...")
    left = together & closest.margin.gt(0)
    from_closest = smallest_margin_flags(model, x, y, eps, alpha, reported_steps, closest, left)
    checks["smallest_margin_not_stronger"] = _stronger(
        together, from_closest, steps=reported_steps, broke_beyond_reported=int((white & ~from_closest).sum()),
        chosen_from=closest.chosen_from(clean))

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
