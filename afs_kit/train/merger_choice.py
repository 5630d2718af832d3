"""How a merger starts, which of its weights are kept, and whether it reaches its members (the floor).

The merger is judged on its own objective (eq. 5 read as accuracies): alpha x clean accuracy + (1 - alpha) x
robust accuracy under PGD at the merger's budget, on the validation split (never the test set). The random
starts are drawn once per validation example, so two checks differ only by the weights they check.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attacks.methods import pgd, random_starts
from ..config import MERGER_INITS, DataConfig, MergerConfig, step_size
from ..core.device import eval_mode, exact_fp32
from ..core.stats import SIGNIFICANCE, points_apart, sign_test
from ..data.batches import iterate_batches, to_float, validation_split
from ..data.dataset import Dataset
from ..errors import BadInput

CONVERGED_POINTS = 0.5   # "converged": the score moved less than this over the last CONVERGED_CHECKS checks
CONVERGED_CHECKS = 3


class ValidationSet:
    """The merger's validation images (float, on the device), labels and one PGD start per image."""

    def __init__(self, data: Dataset, data_cfg: DataConfig, cfg: MergerConfig, device):
        _, idx = validation_split(data, data_cfg.val_fraction, seed=0)
        if cfg.val_examples is not None and cfg.val_examples < len(idx):
            idx = idx[torch.linspace(0, len(idx) - 1, cfg.val_examples).round().long()]  # evenly spaced: every class
        self.x = to_float(data.x_train[idx]).to(device)
        self.y = data.y_train[idx].to(device)
        self.starts = random_starts(self.x, cfg.eps, cfg.seed, "merger-validation")

    def __len__(self) -> int:
        return len(self.y)


def objective_check(model: nn.Module, val: ValidationSet, cfg: MergerConfig, batch_size: int = 200) -> dict:
    """The model on the merger's objective, in fp32: per-example clean and robust flags (robust = still right
    after PGD-`cfg.val_attack_steps` at `cfg.eps`, ANDed with clean; None at alpha = 1), the score in percent
    (alpha x clean + (1 - alpha) x robust accuracy) and eq. 5's loss as measured (`loss`, from the mean clean
    and robust cross-entropies)."""
    clean, robust = [], []
    clean_loss, loss = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    with eval_mode(model), exact_fp32("fp32"):  # IEEE fp32 as the evaluation's PGD (no TF32 on CUDA)
        for idx in iterate_batches(len(val), batch_size, shuffle=False):
            x, y = val.x[idx], val.y[idx]
            with torch.no_grad():
                z = model(x).float()
            clean.append(z.argmax(1) == y)
            clean_loss += F.cross_entropy(z, y, reduction="sum").double().cpu()
            if cfg.alpha < 1:
                x_adv = pgd(model, x, y, cfg.eps, step_size(cfg.eps, cfg.step_size), cfg.val_attack_steps,
                            precision="fp32", start=val.starts[idx])
                with torch.no_grad():
                    z = model(x_adv).float()
                robust.append(z.argmax(1) == y)
                loss += F.cross_entropy(z, y, reduction="sum").double().cpu()
    clean_flags = torch.cat(clean).cpu()
    robust_flags = torch.cat(robust).cpu() & clean_flags if robust else None
    score = 100 * cfg.alpha * clean_flags.float().mean().item()
    if robust_flags is not None:
        score += 100 * (1 - cfg.alpha) * robust_flags.float().mean().item()
    robust_loss = None if robust_flags is None else loss.item() / len(val)
    return {"score": score, "clean": 100 * clean_flags.float().mean().item(),
            "robust": None if robust_flags is None else 100 * robust_flags.float().mean().item(),
            "clean_loss": clean_loss.item() / len(val), "robust_loss": robust_loss,
            "loss": cfg.alpha * clean_loss.item() / len(val) + (1 - cfg.alpha) * (robust_loss or 0.0),
            "flags": {"clean": clean_flags, "robust": robust_flags}}


def brief(check: dict) -> dict:
    """A check without its flags: what a history entry keeps."""
    return {k: v for k, v in check.items() if k != "flags"}


def initial_weights(members: list[nn.Module], num_classes: int, init: str, losses: list[float] | None = None,
                    generator_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The merger's starting (weight, bias) over the concatenated features of `members` (each with `feature_dim`;
    logit-average and best-member also read each member's final layer, `classifier`):

    random: nn.Linear's default draw (seeded); zero: all zeros; logit-average: [W_1 ... W_n] / n and the mean
    bias, so that the merger gives exactly eq. 9's uniform logit average; best-member: the classifier of the
    member with the lowest `losses` (its validation loss on eq. 5, the objective the merger trains on) and
    zeros elsewhere, so that the merger gives exactly that member's logits. The loss, not the accuracy score:
    where clean accuracy falls as fast as robust accuracy rises across the members (cifar10-mini at alpha =
    0.5: 31.1 for eps = 0 against 30.8 for 8/255), the score cannot tell them apart and would start a robust
    merger at a network with 1% robust accuracy; the loss punishes its confident errors under attack.
    Returns (weight, bias, what was chosen)."""
    if init not in MERGER_INITS:
        raise BadInput(f"unknown merger.init={init!r}; known: {', '.join(MERGER_INITS)}")
    dims = [int(m.feature_dim) for m in members]
    heads = [m.classifier for m in members] if init in ("logit-average", "best-member") else []
    weight = torch.zeros(num_classes, sum(dims))
    bias = torch.zeros(num_classes)
    info: dict = {"init": init}
    if init == "random":
        torch.manual_seed(generator_seed)
        layer = nn.Linear(sum(dims), num_classes)
        weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    elif init == "logit-average":
        weight = torch.cat([h.weight.detach().float().cpu() for h in heads], dim=1) / len(heads)
        bias = torch.stack([h.bias.detach().float().cpu() for h in heads]).mean(0)
    elif init == "best-member":
        if losses is None or len(losses) != len(heads):
            raise BadInput(f"merger.init='best-member' needs one validation loss per member ({len(heads)}), "
                           f"got losses={losses}")
        best = min(range(len(heads)), key=lambda i: losses[i])  # the first of equals
        start = sum(dims[:best])
        weight[:, start:start + dims[best]] = heads[best].weight.detach().float().cpu()
        bias = heads[best].bias.detach().float().cpu().clone()
        info["member"] = best
    return weight, bias, info


def converged(scores: list[float]) -> bool:
    """The score moved less than CONVERGED_POINTS over the last CONVERGED_CHECKS checks."""
    last = scores[-CONVERGED_CHECKS:]
    return len(last) == CONVERGED_CHECKS and max(last) - min(last) < CONVERGED_POINTS


def example_scores(check: dict, alpha: float) -> torch.Tensor:
    """Each example's share of the objective: alpha x clean + (1 - alpha) x robust (flags as 0/1)."""
    score = alpha * check["flags"]["clean"].float()
    if check["flags"]["robust"] is not None:
        score = score + (1 - alpha) * check["flags"]["robust"].float()
    return score


def floor_verdict(afs: dict, members: dict[str, dict], alpha: float) -> dict:
    """Is the merger significantly below one of its members on its own objective (validation split)?

    The per-example scores (`example_scores`) of the merger and of each member are compared by the exact sign
    test on the same images, which is the exact McNemar test at alpha = 0 or 1 (0/1 scores); a member is
    "above" the merger when its score is higher and p < SIGNIFICANCE. `met` is True when no member is above."""
    mine = example_scores(afs, alpha)
    rows = []
    for name, member in members.items():
        theirs = example_scores(member, alpha)
        p, wins, losses = sign_test(mine, theirs)
        mean, other = 100 * mine.mean().item(), 100 * theirs.mean().item()
        rows.append({"member": name, "member_score": other, "merger_score": mean, "difference": mean - other,
                     "p": p, "merger_higher": wins, "member_higher": losses, "below": mean < other and p < SIGNIFICANCE})
    above = [r for r in rows if r["below"]]
    best = max(rows, key=lambda r: r["member_score"])
    if above:
        worst = min(above, key=lambda r: r["difference"])
        text = (f"below the floor: {worst['member']} scores {worst['member_score']:.1f} against the merger's "
                f"{worst['merger_score']:.1f} (merger {points_apart(worst['difference'])} it, p = {worst['p']:.2g})")
    else:
        text = (f"floor met: no member significantly above the merger (best member {best['member']} "
                f"{best['member_score']:.1f}, merger {best['merger_score']:.1f})")
    return {"met": not above, "members": rows, "n": len(mine), "alpha": alpha, "text": text,
            "below": [r["member"] for r in above]}


def floor_label(floor: dict | None) -> str:
    """The floor verdict in a few words, for tables."""
    if floor is None:
        return "not checked"
    return "met" if floor["met"] else f"BELOW {', '.join(floor['below'])}"
