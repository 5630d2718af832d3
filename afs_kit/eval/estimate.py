"""What an evaluation will cost before it runs: the forward and backward passes each attack needs (from
its settings) and the model's measured time per pass on a few test images (`afs-kit evaluate --estimate`).

The counts are per attacked example and are upper bounds where an attack runs only on the examples still
standing (every PGD and AutoAttack attack skips examples already misclassified or broken): the estimate
assumes every example is attacked, so it is a ceiling, reached by a model that is robust everywhere.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from ..attacks.registry import PGD_STEPS
from ..config import EvalConfig
from ..core.checks import duration
from ..core.device import autocast, model_device
from ..models.stack import AFSModel, LogitAverage
from .masking import STRENGTHS, STRONGER_STEPS, checked_examples

APGD_ITERATIONS = 100      # pyautoattack's standard settings, which the kit's AutoAttack runs use
TARGET_CLASSES = 9         # APGD-T's and FAB-T's target classes in the standard version
SQUARE_QUERIES = 5000
AA_STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")


def aa_passes(attack: str, num_classes: int) -> tuple[int, int]:
    """(forward, backward) passes per example of one of AutoAttack's attacks under its standard settings."""
    targets = min(TARGET_CLASSES, num_classes - 1)
    return {"apgd-ce": (APGD_ITERATIONS + 1, APGD_ITERATIONS),
            "apgd-dlr": (APGD_ITERATIONS + 1, APGD_ITERATIONS),
            "apgd-t": (targets * (APGD_ITERATIONS + 1), targets * APGD_ITERATIONS),
            # FAB linearizes the model at every step: one backward pass per target (FAB-T), one per class (FAB)
            "fab-t": (targets * 2 * APGD_ITERATIONS, targets * APGD_ITERATIONS),
            "fab": (2 * APGD_ITERATIONS, num_classes * APGD_ITERATIONS),
            "square": (SQUARE_QUERIES, 0)}[attack]


def attack_passes(attack: str, cfg: EvalConfig, num_classes: int) -> dict:
    """One attack's passes per example: {"forward", "backward", "what"}."""
    if attack == "clean":
        return {"forward": 1, "backward": 0, "what": "one forward pass"}
    if attack in PGD_STEPS:
        steps = PGD_STEPS[attack]
        return {"forward": steps + 1, "backward": steps, "what": f"{steps} steps and a final prediction"}
    parts = list(cfg.aa_attacks) or list(AA_STANDARD)
    passes = [aa_passes(a, num_classes) for a in parts]
    return {"forward": sum(f for f, _ in passes), "backward": sum(b for _, b in passes),
            "what": "AutoAttack " + ", ".join(parts) + " (each only on what the ones before left standing)"}


def masking_passes(cfg: EvalConfig) -> dict:
    """The quick masking checks' passes per checked example, and the stronger PGD that a failed `converged`
    check runs on every example: {"forward", "backward", "examples", "fallback"}."""
    strongest = max((PGD_STEPS[a] for a in cfg.attacks if a in PGD_STEPS), default=max(PGD_STEPS.values()))
    strength = STRENGTHS[cfg.sanity_strength]
    stronger = STRONGER_STEPS * strongest * strength["restarts"] * 2  # CE and CW
    # converged, transfer (PGD-20 on the surrogates together, about one model), monotone (two more budgets),
    # large budget, gradients, the smallest-margin PGD; Square's queries are forward passes, and the smallest-
    # margin choice weighs the points of each attack once (about 5 forward passes)
    backward = stronger + 4 * 20 + 1 + strongest
    examples = checked_examples(cfg) or strength["n"]
    return {"forward": backward + 4 * 20 + strength["square_queries"] + 3 + 5, "backward": backward,
            "examples": examples, "fallback": stronger}


@torch.no_grad()
def _forward(model, x, precision):
    with autocast(precision, x.device):
        model(x)


def pass_times(model, x: torch.Tensor, precision: str = "fp32", repeats: int = 3) -> tuple[float, float]:
    """Seconds per image of a forward pass and of a forward and backward pass (the input's gradient, as an
    attack takes it), measured on the images `x` after one warm-up of each."""
    dev = model_device(model, x.device)
    x = x.to(dev)
    model.eval()

    def forward_backward():
        xr = x.clone().requires_grad_(True)
        with autocast(precision, dev):
            loss = model(xr).float().logsumexp(1).sum()
        loss.backward()

    out = []
    for run in (lambda: _forward(model, x, precision), forward_backward):
        run()  # warm-up: allocations, kernel choice
        done, start = 0, time.perf_counter()
        # at least `repeats` runs and a quarter of a second: a tiny model's single pass is below the clock's noise
        while done < repeats or (time.perf_counter() - start < 0.25 and done < 50 * repeats):
            run()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            done += 1
        out.append((time.perf_counter() - start) / (done * len(x)))
    model.zero_grad(set_to_none=True)
    return out[0], out[1]


def estimate(model, x: torch.Tensor, cfg: EvalConfig, n: int, sanity: bool, num_classes: int,
             sample: int = 32) -> dict:
    """The estimate for evaluating `model` on `n` examples under `cfg` (with the masking checks when
    `sanity`), timed on the first `sample` images of `x`: {"lines": [...], "seconds", "seconds_if_fallback"}.
    Writes nothing."""
    t_fwd, t_fb = pass_times(model, x[:max(1, min(sample, len(x)))], cfg.precision)
    t_bwd = max(t_fb - t_fwd, 0.0)
    lines, total = [], 0.0
    for attack in ("clean", *(a for a in cfg.attacks if a != "clean")):
        p = attack_passes(attack, cfg, num_classes)
        seconds = n * (p["forward"] * t_fwd + p["backward"] * t_bwd)
        total += seconds
        lines.append(f"{attack}: {p['forward']} forward + {p['backward']} backward passes per example "
                     f"({p['what']}) x {n} examples: at most {duration(seconds)}")
    fallback = 0.0
    if sanity:
        m = masking_passes(cfg)
        checked = min(n, m["examples"] or n)
        seconds = checked * (m["forward"] * t_fwd + m["backward"] * t_bwd)
        total += seconds
        fallback = n * m["fallback"] * (t_fwd + t_bwd)
        lines.append(f"masking checks ({cfg.sanity_strength}): about {m['forward']} forward + {m['backward']} "
                     f"backward passes per example x {checked} examples: about {duration(seconds)}; if `converged` "
                     f"fails, {m['fallback']} more forward and backward passes on each of at most {n} examples: "
                     f"{duration(fallback)}")
    lines.append(f"measured on {min(sample, len(x))} test images ({model_device(model, x.device)}, {cfg.precision}): "
                 f"forward {1e3 * t_fwd:.2f} ms, forward + backward {1e3 * t_fb:.2f} ms per image")
    tail = f" ({duration(total + fallback)} if the converged check fails)" if sanity else ""
    lines.append(f"estimated wall time: {duration(total)}{tail}")
    return {"lines": lines, "seconds": total, "seconds_if_fallback": total + fallback,
            "per_image": {"forward": t_fwd, "forward_backward": t_fb}}


def estimate_run(run, models, attacks=None, n: int | None = None, sanity: bool = False) -> list[str]:
    """`afs-kit evaluate --estimate`: the estimate of each (name, model) of `Run` `run` under its preset's
    protocol (`attacks` replacing the preset's), on `n` test images (None: the preset's); the masking
    checks counted for stacked models (as `Run.evaluate` runs them) or everywhere with `sanity`."""
    cfg = run.preset.evaluation
    cfg = dataclasses.replace(cfg, attacks=tuple(attacks or cfg.attacks))
    x, _ = run.test_set(n if n is not None else cfg.n_examples)
    lines = []
    for name, model in models:
        checked = sanity or isinstance(model, (AFSModel, LogitAverage))
        lines += [f"{name}:", *("  " + line for line in estimate(model, x, cfg, len(x), checked,
                                                                  run.data.num_classes)["lines"])]
    return lines
