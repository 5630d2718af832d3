"""Adversarial feature stacking: frozen extractors, concatenated features, a linear merger (eq. 1-2, 5).

`AFSModel` is an ordinary `nn.Module` from pixels to logits, so every attack differentiates
through the whole stack: the merger is trained, and evaluated, against the WHOLE model.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .attacks import pgd
from .checks import parse_eps_list
from .config import DataConfig, MergerConfig, format_budget, step_size
from .batches import augment, batches_on, data_fingerprint, iterate_batches, to_float, validation_split
from .data import Dataset
from .device import autocast, memory_format, prepare_training, resolve_device
from .distributed import World
from .runs import expect, load_checkpoint, save_checkpoint
from .training import resume, save_progress, training_health, warn_if_unhealthy


class FeatureStack(nn.Module):
    """Frozen extractors (eval mode, no parameter gradients) whose features are concatenated (eq. 2)."""

    def __init__(self, extractors: list[nn.Module]):
        super().__init__()
        if not extractors:
            raise ValueError("extractors must hold at least one network, got an empty list")
        self.extractors = nn.ModuleList(extractors)
        self.extractors.requires_grad_(False)
        self.feature_dims = [int(m.feature_dim) for m in extractors]
        self.train(False)

    @property
    def feature_dim(self) -> int:
        return sum(self.feature_dims)

    def train(self, mode: bool = True) -> FeatureStack:
        # frozen extractors keep their BatchNorm statistics: always eval, whatever the caller asks
        super().train(mode)
        self.extractors.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.features(x) for m in self.extractors], dim=1)


class LinearMerger(nn.Module):
    """One linear layer over the stacked features (eq. 1)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear(feats.float())


class AFSModel(nn.Module):
    """Stack + merger, pixels in [0,1] to logits; `features`/`classifier` as every kit model has."""

    def __init__(self, stack: FeatureStack, merger: LinearMerger):
        super().__init__()
        self.stack, self.merger = stack, merger

    @property
    def feature_dim(self) -> int:
        return self.stack.feature_dim

    @property
    def classifier(self) -> nn.Linear:
        return self.merger.linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merger(self.stack(x))


class LogitAverage(nn.Module):
    """The logit-averaging ensemble of eq. 9: sum_i lambda_i z_i with lambda_i > 0, sum 1 (uniform by default)."""

    def __init__(self, models: list[nn.Module], weights: list[float] | None = None):
        super().__init__()
        if not models:
            raise ValueError("models must hold at least one network, got an empty list")
        weights = [1 / len(models)] * len(models) if weights is None else list(weights)
        if len(weights) != len(models) or any(w <= 0 for w in weights) or not math.isclose(sum(weights), 1.0):
            raise ValueError(f"weights must be {len(models)} positive numbers summing to 1, got weights={weights}")
        self.models = nn.ModuleList(models).requires_grad_(False).eval()
        self.register_buffer("weights", torch.tensor(weights))

    def train(self, mode: bool = True) -> LogitAverage:
        super().train(mode)
        self.models.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(w * m(x).float() for w, m in zip(self.weights, self.models))


# ---------------------------------------------------------------- naming subsets

def parse_subset(spec: str, budgets: list[float] | tuple[float, ...],
                 names: list[str] | tuple[str, ...] = ()) -> list[int]:
    """Indices of the extractors a subset names: the kit's extractors sorted by budget, then `names` (those
    added from outside the kit, which have no budget).

    `all`; a binary vector, one digit per extractor, leftmost the smallest budget (the paper's
    "100000001" = network-0 and network-8; a shorter vector names the first extractors); or a
    comma-separated list of budgets (`3/255,8/255` or decimals) and names.
    """
    budgets, names = list(budgets), list(names)
    given, spec = spec, str(spec).strip()
    members = [format_budget(b) for b in budgets] + names
    if spec == "all":
        return list(range(len(members)))
    if spec and set(spec) <= {"0", "1"}:  # a binary vector; budget 0 alone is written 0/255 or 0.0
        if len(spec) > len(members):
            raise ValueError(f"subset={spec!r} has {len(spec)} digits but the run has only "
                             f"{len(members)} extractors ({', '.join(members)})")
        chosen = [i for i, c in enumerate(spec) if c == "1"]
        if not chosen:
            raise ValueError(f"subset={spec!r} selects no extractor (an empty subset)")
        return chosen
    if not spec:
        raise ValueError(f"subset must not be empty, got subset={given!r}; give 'all', a binary vector or a list of budgets")
    items = [item.strip() for item in spec.split(",")]
    chosen = [len(budgets) + names.index(item) for item in items if item in names]
    rest = ",".join(item for item in items if item not in names)
    if any(c not in "0123456789./, eE-+" for c in rest):
        raise ValueError(f"subset={spec!r} is neither 'all', a binary vector of 0 and 1, nor a list of budgets"
                         + (f" and extractor names ({', '.join(names)})" if names else ""))
    for eps in parse_eps_list(rest, "subset") if rest else ():
        hits = [i for i, b in enumerate(budgets) if abs(b - eps) < 1e-6]
        if not hits:
            raise ValueError(f"subset={spec!r} names budget {format_budget(eps)}, which has no extractor in this "
                             f"run (extractors: {', '.join(members)})")
        chosen.append(hits[0])
    return sorted(set(chosen))


def subset_vector(indices: list[int], n: int) -> str:
    return "".join("1" if i in indices else "0" for i in range(n))


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
def feature_sq_norm(stack: FeatureStack, x_uint8: torch.Tensor, precision: str, device,
                    max_images: int = 1000, batch_size: int = 250) -> float:
    """E||f||^2: the mean squared norm of the stacked features of up to `max_images` clean training
    images (evenly spaced, no augmentation, the frozen extractors in eval mode as always).

    The Hessian of the cross-entropy of a linear layer is at most E[f f^T] / 2, whose largest eigenvalue
    is at most E||f||^2 / 2; heavy-ball SGD (momentum m) is stable below lr * lambda_max = 2 (1 + m).
    So lr / E||f||^2 with lr < 4 (1 + m) is a stable step whatever the extractors' architecture, training
    and number, while a raw lr is not (ReLU features are non-negative, so E||f||^2 is dominated by
    their mean and grows with every extractor stacked).
    """
    n = len(x_uint8)
    idx = torch.arange(0, n, max(1, -(-n // max_images)))
    fmt = memory_format(precision)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for part in idx.split(batch_size):
        x = to_float(x_uint8[part.to(x_uint8.device)]).to(device).contiguous(memory_format=fmt)
        with autocast(precision, device):
            feats = stack(x)
        total += feats.double().pow(2).sum()
    return float(total.item() / len(idx))


def merger_step_lr(cfg: MergerConfig, epoch: int, feat_sq: float | None) -> float:
    """The SGD learning rate of `epoch`: cfg.lr (divided by E||f||^2 with normalize_lr), a tenth of it
    from `lr_drop_epoch` on."""
    lr = cfg.lr / feat_sq if cfg.normalize_lr else cfg.lr
    return lr if epoch < cfg.lr_drop_epoch else lr * 0.1


def train_merger(stack: FeatureStack, data: Dataset, cfg: MergerConfig, data_cfg: DataConfig,
                 out_dir: str | Path | None = None, key: str = "", device: str = "auto",
                 progress: bool = True, world: World = World()) -> tuple[AFSModel, list[dict]]:
    """Train the linear merger over a frozen stack (eq. 5); resumable when `out_dir` is given.

    Trains on the training split (the validation split stays held out), `cfg.epochs` epochs, SGD with
    `cfg.lr` for `cfg.lr_drop_epoch` epochs and a tenth of it after; the final weights are kept. With
    `cfg.normalize_lr` the rate is divided by E||f||^2 (`feature_sq_norm`, measured once before the first
    epoch and kept for a resume): the merger is still one linear layer over the raw concatenated features,
    so its weights (importance ratios, histograms) mean what they meant; only the step size changes.
    A RuntimeWarning says when `training_health` flags the run.
    """
    if not 0 <= cfg.alpha <= 1:
        raise ValueError(f"alpha (the clean-loss weight of eq. 5) must be in [0, 1], got alpha={cfg.alpha}")
    dev = resolve_device(device)
    prepare_training(dev)
    fmt = memory_format(cfg.precision)
    stack = stack.to(dev, memory_format=fmt)
    torch.manual_seed(cfg.seed)
    merger = LinearMerger(stack.feature_dim, data.num_classes).to(dev)
    model = AFSModel(stack, merger)
    optimizer = torch.optim.SGD(merger.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    noise_gen = torch.Generator(device=dev).manual_seed(cfg.seed + 1)
    train_idx, _ = validation_split(data, data_cfg.val_fraction, seed=0)
    x_train, y_train = data.x_train[train_idx].to(dev), data.y_train[train_idx].to(dev)

    last_path = Path(out_dir) / "last.pt" if out_dir is not None else None
    start, history, feat_sq = 0, [], None
    ckpt = resume(last_path, key, merger, optimizer, order_gen, noise_gen, dev)
    if ckpt is not None:
        start, history, feat_sq = ckpt["epoch"] + 1, ckpt["history"], ckpt.get("feature_sq_norm")
        if progress:
            print(f"merger alpha={cfg.alpha:g}: resuming from {last_path} after epoch {start}/{cfg.epochs}")
    if feat_sq is None:
        feat_sq = feature_sq_norm(stack, x_train, cfg.precision, dev)

    for epoch in range(start, cfg.epochs):
        if world.distributed:  # each rank its own stream, from (seed, rank, epoch): a resume draws the same
            noise_gen.manual_seed(cfg.seed + 1 + 7919 * (world.rank + 1) + 104729 * epoch)
        lr = merger_step_lr(cfg, epoch, feat_sq)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_loss = train_merger_epoch(model, optimizer, x_train, y_train, cfg, data_cfg, dev, order_gen, noise_gen,
                                        desc=f"merger alpha={cfg.alpha:g} epoch {epoch + 1}/{cfg.epochs}",
                                        progress=progress, world=world)
        history.append({"epoch": epoch, "lr": lr, "train_loss": train_loss.item(), "feature_sq_norm": feat_sq})
        if last_path is not None and world.main:
            save_progress(last_path, key, epoch, merger, optimizer, order_gen, noise_gen, history,
                          feature_sq_norm=feat_sq)
    model.eval()
    warn_if_unhealthy(training_health(history, data.num_classes), f"merger alpha={cfg.alpha:g}")
    return model, history


def merger_checkpoint(model: AFSModel, cfg: MergerConfig, key: str, extractor_names: list[str],
                      extractor_keys: list[str], data_info: dict, history: list[dict]) -> dict:
    """The merger's checkpoint; "health" is `training_health` of its per-epoch training losses."""
    health = training_health(history, model.merger.linear.out_features)
    return {"key": key, "kind": "merger", "extractors": extractor_names, "extractor_keys": extractor_keys,
            "feature_dims": model.stack.feature_dims, "config": dataclasses.asdict(cfg), **data_info,
            "state_dict": {k: v.cpu() for k, v in model.merger.state_dict().items()}, "history": history,
            "health": health}


def load_merger(path: str | Path, stack: FeatureStack, n_classes: int, **wanted) -> tuple[AFSModel, dict]:
    """A trained merger over `stack`, strictly: the checkpoint must be a merger, match `wanted` (its
    key, the data fingerprint, ...) and fit the stack's feature sizes. Returns (model in eval mode, ckpt)."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    expect(ckpt, path, kind="merger", **wanted)
    dims = ckpt.get("feature_dims")
    if dims is not None and list(dims) != list(stack.feature_dims):
        raise ValueError(f"checkpoint {path} was trained on features of sizes {list(dims)}, but this stack has "
                         f"{list(stack.feature_dims)}; refusing to use it: retrain the merger")
    merger = LinearMerger(stack.feature_dim, n_classes)
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
    model, history = train_merger(stack, data, cfg, data_cfg, out_dir, key, device, progress, world)
    if world.main:
        save_merger(final, merger_checkpoint(model, cfg, key, extractor_names, extractor_keys, data_fingerprint(data),
                                             history))
    world.barrier()
    return model.eval(), True


def save_merger(path: str | Path, ckpt: dict) -> None:
    save_checkpoint(path, ckpt)
    (Path(path).parent / "last.pt").unlink(missing_ok=True)
