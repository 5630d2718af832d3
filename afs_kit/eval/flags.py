"""Per-example flags: which test examples a model gets right, clean or under PGD."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..attacks.methods import pgd
from ..core.device import autocast, eval_mode
from ..data.batches import iterate_batches
from ..errors import BadInput


def check_eval_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != 4:
        raise BadInput(f"x must be a batch of images [N,C,H,W], got x.shape={tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise BadInput(f"y must hold one label per image ({x.shape[0]}), got y.shape={tuple(y.shape)}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise BadInput(f"x must lie in [0, 1], got values in [{x.min().item():.3g}, {x.max().item():.3g}]")


@torch.no_grad()
def correct_flags(model, x, y, batch_size: int = 500, precision: str = "fp32") -> torch.Tensor:
    """Per-example `prediction == label` in eval mode (mode restored)."""
    with eval_mode(model):
        out = []
        for idx in iterate_batches(len(y), batch_size, shuffle=False):
            with autocast(precision, x.device):
                out.append(model(x[idx]).argmax(1) == y[idx])
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=x.device)


def pgd_flags(model, x, y, eps, alpha, steps, batch_size=200, restarts=1, precision="fp32",
              generator=None, progress=False, desc="PGD", loss="ce", starts=None) -> torch.Tensor:
    """Per-example robust flags (still correct after PGD with `loss`), batch by batch; `starts`: a start point
    per example (see `random_starts`) instead of random starts drawn from `generator`."""
    out = []
    for idx in tqdm(list(iterate_batches(len(y), batch_size, shuffle=False)), desc=desc, disable=not progress,
                    leave=False):
        x_adv = pgd(model, x[idx], y[idx], eps, alpha, steps, restarts=restarts, precision=precision,
                    generator=generator, loss=loss, start=None if starts is None else starts[idx.to(starts.device)])
        out.append(correct_flags(model, x_adv, y[idx], batch_size, precision))
    return torch.cat(out)


def robust_where(standing: torch.Tensor, x, y, attack) -> torch.Tensor:
    """Robust flags of `attack(x_sub, y_sub)` (a callable returning flags) run only on the examples
    `standing` marks; the others are not robust. The one way the kit skips examples an earlier attack
    (or the clean prediction) already broke: in eval mode an example's attack does not depend on the
    others, so this only saves the work."""
    flags = torch.zeros_like(standing)
    idx = standing.nonzero().flatten()
    if len(idx):
        flags[idx] = attack(x[idx], y[idx])
    return flags


