"""What extractor and merger training share: saved progress, resume, training health."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..core.checks import check_int
from ..core.io import expect, load_checkpoint, save_checkpoint
from ..errors import BadInput, warn

RISE_TOLERANCE = 0.05  # a last epoch whose mean training loss is more than 5% above the epoch before is "rising"


RISE_FLOOR = 0.01      # ... and more than 1% of chance (ln K) above it: near zero loss, 0.009 -> 0.011 is noise


def training_health(history: list[dict], num_classes: int, key: str = "train_loss") -> dict:
    """Did training go wrong? Flags a final training loss above chance or a rising last epoch.

    `history`: one dict per epoch holding the epoch's mean training loss under `key` (the histories of
    `train_extractor` and `train_merger`). Chance is ln K, the loss of a constant uniform prediction over
    K classes. It applies to every loss the kit trains with: CE on clean or adversarial images (a constant
    prediction is unaffected by any perturbation), eq. 5's alpha-mix of two such CEs, and TRADES'
    CE + beta * KL (the constant prediction has CE ln K and KL 0), so a model above it has done worse
    than learning nothing. Rising: the last epoch's loss is more than RISE_TOLERANCE (relative) above the
    one before, by more than RISE_FLOOR * ln K (absolute; without it a well-fit network's 0.009 -> 0.011
    would be flagged); never with a single epoch. A non-finite loss counts as above chance and rising.

    Returns {"passed", "final_loss", "chance", "above_chance", "rising", "last_losses" (up to the last
    three epochs), "epochs"}.
    """
    check_int("num_classes", num_classes, 2)
    if not history:
        raise BadInput("history must hold at least one epoch, got an empty history")
    missing = [i for i, h in enumerate(history) if key not in h]
    if missing:
        raise BadInput(f"every epoch of history must hold {key!r}; epochs {missing} do not")
    losses = [float(h[key]) for h in history]
    final, chance = losses[-1], math.log(num_classes)
    above = not math.isfinite(final) or final > chance
    rising = len(losses) >= 2 and (not math.isfinite(final) or (final > losses[-2] * (1 + RISE_TOLERANCE)
                                                                and final - losses[-2] > RISE_FLOOR * chance))
    return {"passed": not (above or rising), "final_loss": final, "chance": chance, "above_chance": above,
            "rising": rising, "last_losses": losses[-3:], "epochs": len(losses)}


def warn_if_unhealthy(health: dict, label: str) -> None:
    """A RuntimeWarning naming what `training_health` flagged; nothing when it passed."""
    if health["passed"]:
        return
    why = []
    if health["above_chance"]:
        why.append(f"final training loss {health['final_loss']:.3f} is above chance ln K = {health['chance']:.3f}")
    if health["rising"]:
        why.append(f"training loss rose over the last epochs ({', '.join(f'{v:.3f}' for v in health['last_losses'])})")
    warn(f"{label} looks unhealthy: {'; '.join(why)}")


def save_progress(path: Path, key: str, epoch: int, module: torch.nn.Module, optimizer, order_gen: torch.Generator,
                  noise_gen: torch.Generator, history: list[dict], **extra) -> None:
    """What either trainer (extractor or merger) needs to go on after `epoch`: weights, optimizer, both
    random streams, the history and the trainer's own `extra` (schedule, best weights, ...)."""
    save_checkpoint(path, {"key": key, "epoch": epoch, "state_dict": module.state_dict(),
                           "optimizer": optimizer.state_dict(), "order_rng": order_gen.get_state(),
                           "noise_rng": noise_gen.get_state(), "history": history, **extra})


def resume(path: Path | None, key: str, module: torch.nn.Module, optimizer, order_gen: torch.Generator,
           noise_gen: torch.Generator, device) -> dict | None:
    """Restore a training stopped after an epoch from `path` (written by `save_progress`) and return
    that checkpoint (its "epoch", "history" and extras); None when there is none. Refuses a file
    made with another config (ValueError naming it)."""
    if path is None or not path.is_file():
        return None
    ckpt = load_checkpoint(path, map_location=device)
    expect(ckpt, path, key=key)
    module.load_state_dict(ckpt["state_dict"], strict=True)
    optimizer.load_state_dict(ckpt["optimizer"])
    order_gen.set_state(ckpt["order_rng"].cpu())
    noise_gen.set_state(ckpt["noise_rng"].cpu())
    return ckpt


