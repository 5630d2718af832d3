"""Adversarial feature stacking: frozen extractors, concatenated features, a linear merger (eq. 1-2, 5).

`AFSModel` is an ordinary `nn.Module` from pixels to logits, so every attack differentiates
through the whole stack: the merger is trained, and evaluated, against the WHOLE model.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..attacks.methods import pgd
from ..config import DataConfig, MergerConfig, step_size
from ..core.device import autocast, memory_format, prepare_training, resolve_device
from ..core.distributed import World
from ..core.io import expect, load_checkpoint, save_checkpoint
from ..data.batches import augment, batches_on, data_fingerprint, iterate_batches, to_float, validation_split
from ..data.dataset import Dataset
from ..errors import BadInput, warn
from ..models.stack import AFSModel, FeatureStack, build_merger
from .merger_choice import ValidationSet, brief, converged, floor_verdict, initial_weights, objective_check
from .progress import resume, save_progress, training_health, warn_if_unhealthy

# ---------------------------------------------------------------- naming subsets





# ---------------------------------------------------------------- training the merger (eq. 5)

def merger_loss(model: AFSModel, x: torch.Tensor, y: torch.Tensor, cfg: MergerConfig, device, generator):
    """alpha * CE(clean) + (1 - alpha) * CE(PGD against the whole model); or the authors' split batch."""
    alpha, eps = cfg.alpha, cfg.eps
    attack = dict(eps=eps, alpha=step_size(eps, cfg.step_size), steps=cfg.attack_steps,
                  precision=cfg.precision, generator=generator, checked=True)  # no host sync per step
    if cfg.mix == "split":
        n_clean = int(round(alpha * len(y)))
        parts = [x[:n_clean]]
        if n_clean < len(y):
            parts.append(pgd(model, x[n_clean:], y[n_clean:], **attack))
        with torch.no_grad(), autocast(cfg.precision, device):
            feats = model.stack(torch.cat(parts))  # frozen: no graph through the extractors
        return F.cross_entropy(model.merger(feats), y)
    loss = torch.zeros((), device=device)
    if alpha > 0:
        with torch.no_grad(), autocast(cfg.precision, device):
            feats = model.stack(x)
        loss = loss + alpha * F.cross_entropy(model.merger(feats), y)
    if alpha < 1:
        x_adv = pgd(model, x, y, **attack)
        with torch.no_grad(), autocast(cfg.precision, device):
            feats_adv = model.stack(x_adv)
        loss = loss + (1 - alpha) * F.cross_entropy(model.merger(feats_adv), y)
    return loss


def train_merger_epoch(model: AFSModel, optimizer, x_train: torch.Tensor, y_train: torch.Tensor, cfg: MergerConfig,
                       data_cfg: DataConfig, device, order_gen: torch.Generator, noise_gen: torch.Generator,
                       desc: str = "", progress: bool = False, world: World = World()) -> torch.Tensor:
    """One pass of merger training over the uint8 images `x_train` (already on `device`): shuffled
    batches, batched augmentation, `merger_loss`, one optimizer step per batch.

    Returns the mean loss as a 0-dim tensor. `train_merger` calls this once per epoch; the benchmarks
    time it on its own. Under torchrun each rank takes its share of every batch and attacks it through the whole
    stack; the linear layer's gradient is averaged over the ranks before each step.
    """
    fmt = memory_format(cfg.precision)
    model.train()
    total = torch.zeros((), device=device)
    # a last batch smaller than the world would leave a rank without examples: it is dropped there
    whole = [b for b in iterate_batches(len(y_train), cfg.batch_size, shuffle=True, generator=order_gen)
             if len(b) >= world.size]
    batches = batches_on([b.tensor_split(world.size)[world.rank] for b in whole], device)
    # the ranks' gradients are averaged: a share's loss weighted by its size makes that the whole batch's mean
    weights = [len(part) * world.size / len(b) for part, b in zip(batches, whole)]
    for i, idx in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False)):
        x = augment(x_train[idx], data_cfg.crop_padding, data_cfg.flip, noise_gen).contiguous(memory_format=fmt)
        loss = merger_loss(model, x, y_train[idx], cfg, device, noise_gen)
        loss = loss * weights[i] if world.distributed else loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        world.average_gradients(model.merger)
        optimizer.step()
        total += loss.detach()
    return world.mean(total / len(batches))


@torch.no_grad()
def feature_moments(stack: FeatureStack, x_uint8: torch.Tensor, precision: str, device,
                    max_images: int = 1000, batch_size: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and second moment E[f_j^2] (fp64, on the CPU) of the stacked features of up to
    `max_images` clean training images (evenly spaced, no augmentation, the frozen extractors in eval mode)."""
    n = len(x_uint8)
    idx = torch.arange(0, n, max(1, -(-n // max_images)))
    fmt = memory_format(precision)
    first = torch.zeros(stack.feature_dim, dtype=torch.float64, device=device)
    second = torch.zeros_like(first)
    for part in idx.split(batch_size):
        x = to_float(x_uint8[part.to(x_uint8.device)]).to(device).contiguous(memory_format=fmt)
        with autocast(precision, device):
            feats = stack(x).double()
        first += feats.sum(0)
        second += feats.pow(2).sum(0)
    return (first / len(idx)).cpu(), (second / len(idx)).cpu()


def feature_sq_norm(stack: FeatureStack, x_uint8: torch.Tensor, precision: str, device,
                    max_images: int = 1000, batch_size: int = 250) -> float:
    """E||f||^2: the mean squared norm of the stacked features (see `feature_moments`).

    The Hessian of the cross-entropy of a linear layer is at most E[f f^T] / 2, whose largest eigenvalue
    is at most E||f||^2 / 2; heavy-ball SGD (momentum m) is stable below lr * lambda_max = 2 (1 + m).
    So lr / E||f||^2 with lr < 4 (1 + m) is a stable step whatever the extractors' architecture, training
    and number, while a raw lr is not (ReLU features are non-negative, so E||f||^2 is dominated by
    their mean and grows with every extractor stacked).
    """
    return float(feature_moments(stack, x_uint8, precision, device, max_images, batch_size)[1].sum())


def standard_scaling(mean: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) that standardize each feature; a feature constant on the measured images keeps scale 1."""
    std = (second - mean.pow(2)).clamp_min(0).sqrt()
    return mean.float(), torch.where(std > 1e-6 * std.max().clamp_min(1e-12), std, torch.ones_like(std)).float()


def merger_schedule(cfg: MergerConfig, batches_per_epoch: int) -> tuple[int, int]:
    """(epochs, lr_drop_epoch): the configured ones, both stretched by one factor when fewer than
    `cfg.min_steps` steps would be taken (small data sets get enough steps; the rate still drops late)."""
    stretch = max(1, math.ceil(cfg.min_steps / max(1, cfg.epochs * batches_per_epoch)))
    return cfg.epochs * stretch, cfg.lr_drop_epoch * stretch


def merger_step_lr(cfg: MergerConfig, epoch: int, feat_sq: float | None, drop_epoch: int | None = None) -> float:
    """The SGD learning rate of `epoch`: cfg.lr (divided by E||f||^2 with normalize_lr), a tenth of it
    from the drop epoch (`drop_epoch`, default `cfg.lr_drop_epoch`) on."""
    lr = cfg.lr / feat_sq if cfg.normalize_lr else cfg.lr
    return lr if epoch < (cfg.lr_drop_epoch if drop_epoch is None else drop_epoch) else lr * 0.1


def _start_merger(model: AFSModel, cfg: MergerConfig, val: ValidationSet, member_names: list[str]) -> tuple[dict, dict]:
    """Each member checked on the merger's objective, then the merger's initial weights set (`cfg.init`)."""
    members = {name: objective_check(m, val, cfg) for name, m in zip(member_names, model.stack.extractors)}
    weight, bias, info = initial_weights(list(model.stack.extractors), model.merger.num_classes,
                                         cfg.init, [c["loss"] for c in members.values()], cfg.seed)
    if "member" in info:
        info["member"] = member_names[info["member"]]
    model.merger.set_start(weight, bias)
    return members, info


def train_merger(stack: FeatureStack, data: Dataset, cfg: MergerConfig, data_cfg: DataConfig,
                 out_dir: str | Path | None = None, key: str = "", device: str = "auto",
                 progress: bool = True, world: World = World(),
                 member_names: list[str] | None = None) -> tuple[AFSModel, list[dict], dict]:
    """Train the linear merger over a frozen stack (eq. 5); resumable when `out_dir` is given.

    Starts from `cfg.init`; trains on the training split, SGD with `cfg.lr` (divided by E||f||^2 with
    `cfg.normalize_lr`, measured once and kept for a resume) until the drop epoch and a tenth of it after, for
    `merger_schedule`'s epochs. After every epoch the weights are checked on the merger's objective on the
    validation split (`objective_check`); the weights kept are the best checked, the initial ones among them
    (`cfg.keep="best"`), or the last (`"last"`, the authors').
    With `cfg.standardize` SGD runs in standardized feature coordinates and the result is folded back into
    one linear layer over the raw features. Returns (model in eval mode, history, choice): `choice` holds the
    init, the checks, the kept epoch (0 = the initial weights), `converged` and the `floor` verdict against
    every member. A RuntimeWarning says when `training_health` flags the run or the floor is not met.
    """
    if not 0 <= cfg.alpha <= 1:
        raise BadInput(f"alpha (the clean-loss weight of eq. 5) must be in [0, 1], got alpha={cfg.alpha}")
    dev = resolve_device(device)
    prepare_training(dev, cfg.precision)
    fmt = memory_format(cfg.precision)
    stack = stack.to(dev, memory_format=fmt)
    names = member_names or [f"member {i + 1}" for i in range(len(stack.extractors))]
    merger = build_merger(stack.feature_dim, data.num_classes).to(dev)
    model = AFSModel(stack, merger)
    optimizer = torch.optim.SGD(merger.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    noise_gen = torch.Generator(device=dev).manual_seed(cfg.seed + 1)
    train_idx, _ = validation_split(data, data_cfg.val_fraction, seed=0)
    x_train, y_train = data.x_train[train_idx].to(dev), data.y_train[train_idx].to(dev)
    val = ValidationSet(data, data_cfg, cfg, dev)
    n_batches = sum(1 for b in iterate_batches(len(y_train), cfg.batch_size, shuffle=False) if len(b) >= world.size)
    epochs, drop_epoch = merger_schedule(cfg, n_batches)

    last_path = Path(out_dir) / "last.pt" if out_dir is not None else None
    members, init = _start_merger(model, cfg, val, names)
    mean, second = feature_moments(stack, x_train, cfg.precision, dev)
    if cfg.standardize:
        merger.standardize(*(t.to(dev) for t in standard_scaling(mean, second)))
    # the rate's unit: E||f||^2 of the coordinates SGD moves in (the feature count, once standardized)
    feat_sq = float(stack.feature_dim) if cfg.standardize else float(second.sum())
    ckpt = resume(last_path, key, merger.trained, optimizer, order_gen, noise_gen, dev)
    if ckpt is not None:  # the start's check is in the checkpoint: not measured again
        start, history, best, checks = ckpt["epoch"] + 1, ckpt["history"], ckpt["best"], ckpt["checks"]
        if progress:
            print(f"merger alpha={cfg.alpha:g}: resuming from {last_path} after epoch {start}/{epochs}")
    else:
        first = brief(objective_check(model, val, cfg))
        start, history, checks = 0, [], [{"epoch": 0, **first}]
        best = {"epoch": 0, "score": first["score"],
                "state": {k: v.clone() for k, v in merger.trained.state_dict().items()}}

    for epoch in range(start, epochs):
        if world.distributed:  # each rank its own stream, from (seed, rank, epoch): a resume draws the same
            noise_gen.manual_seed(cfg.seed + 1 + 7919 * (world.rank + 1) + 104729 * epoch)
        lr = merger_step_lr(cfg, epoch, feat_sq, drop_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_loss = train_merger_epoch(model, optimizer, x_train, y_train, cfg, data_cfg, dev, order_gen, noise_gen,
                                        desc=f"merger alpha={cfg.alpha:g} epoch {epoch + 1}/{epochs}",
                                        progress=progress, world=world)
        check = brief(objective_check(model, val, cfg))
        checks.append({"epoch": epoch + 1, **check})
        history.append({"epoch": epoch, "lr": lr, "train_loss": train_loss.item(), "feature_sq_norm": feat_sq})
        # strictly: among equals the earlier (the init first) is kept; keep="last" takes every epoch's
        if check["score"] > best["score"] or cfg.keep == "last":
            best = {"epoch": epoch + 1, "score": check["score"],
                    "state": {k: v.clone() for k, v in merger.trained.state_dict().items()}}
        if last_path is not None and world.main:
            save_progress(last_path, key, epoch, merger.trained, optimizer, order_gen, noise_gen, history,
                          best=best, checks=checks)
    merger.trained.load_state_dict(best["state"])
    merger.fold()
    model.eval()
    kept = objective_check(model, val, cfg)
    choice = {**init, "standardize": cfg.standardize, "epochs": epochs, "lr_drop_epoch": drop_epoch,
              "val_examples": len(val), "checks": checks, "kept_epoch": best["epoch"], "kept_score": kept["score"],
              "converged": converged([c["score"] for c in checks]),
              "floor": floor_verdict(kept, members, cfg.alpha),
              "members": {name: brief(c) for name, c in members.items()}}
    if history:
        warn_if_unhealthy(training_health(history, data.num_classes), f"merger alpha={cfg.alpha:g}")
    if not choice["floor"]["met"]:
        warn(f"merger alpha={cfg.alpha:g}: {choice['floor']['text']}")
    return model, history, choice


def merger_checkpoint(model: AFSModel, cfg: MergerConfig, key: str, extractor_names: list[str],
                      extractor_keys: list[str], data_info: dict, history: list[dict], choice: dict) -> dict:
    """The merger's checkpoint: "health" is `training_health` of its per-epoch training losses (None without
    an epoch), "choice" how it started and which weights were kept, "floor" its verdict against its members."""
    health = training_health(history, model.merger.num_classes) if history else None
    return {"key": key, "kind": "merger", "extractors": extractor_names, "extractor_keys": extractor_keys,
            "feature_dims": model.stack.feature_dims, "config": dataclasses.asdict(cfg), **data_info,
            "state_dict": {k: v.cpu() for k, v in model.merger.state_dict().items()}, "history": history,
            "health": health, "choice": {k: v for k, v in choice.items() if k != "floor"}, "floor": choice["floor"]}


def load_merger(path: str | Path, stack: FeatureStack, n_classes: int, **wanted) -> tuple[AFSModel, dict]:
    """A trained merger over `stack`, strictly: the checkpoint must be a merger, match `wanted` (its
    key, the data fingerprint, ...) and fit the stack's feature sizes. Returns (model in eval mode, ckpt)."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    expect(ckpt, path, kind="merger", **wanted)
    dims = ckpt.get("feature_dims")
    if dims is not None and list(dims) != list(stack.feature_dims):
        raise BadInput(f"checkpoint {path} was trained on features of sizes {list(dims)}, but this stack has "
                       f"{list(stack.feature_dims)}; refusing to use it: retrain the merger")
    merger = build_merger(stack.feature_dim, n_classes)
    merger.load_state_dict(ckpt["state_dict"], strict=True)
    return AFSModel(stack, merger).eval(), ckpt


def load_or_train_merger(stack: FeatureStack, data: Dataset, cfg: MergerConfig, data_cfg: DataConfig,
                         out_dir: str | Path, key: str, extractor_names: list[str], extractor_keys: list[str],
                         device: str = "auto", progress: bool = True, world: World = World()) -> tuple[AFSModel, bool]:
    """The merger's whole life: loaded when `out_dir/merger.pt` holds this key, else trained (resuming
    from `last.pt`) and saved with the extractors it stacks. Returns (model in eval mode, trained)."""
    final = Path(out_dir) / "merger.pt"
    if final.is_file():
        model, _ = load_merger(final, stack, data.num_classes, key=key)
        return model.to(resolve_device(device)), False
    model, history, choice = train_merger(stack, data, cfg, data_cfg, out_dir, key, device, progress, world,
                                          member_names=extractor_names)
    if world.main:
        save_merger(final, merger_checkpoint(model, cfg, key, extractor_names, extractor_keys, data_fingerprint(data),
                                             history, choice))
    world.barrier()
    return model.eval(), True


def save_merger(path: str | Path, ckpt: dict) -> None:
    save_checkpoint(path, ckpt)
    (Path(path).parent / "last.pt").unlink(missing_ok=True)
