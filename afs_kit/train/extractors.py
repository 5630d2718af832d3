"""Adversarial training of one feature extractor (eq. 3-4), resumable, early-stopped on held-out data.

Trainers: PGD-AT (Madry et al.), FGSM with a random start ("fast" AT, Wong et al.) and TRADES
(Zhang et al.); a random budget per batch gives the "Rand.pert." network of table 6. Early stopping
follows Rice et al.: keep the epoch with the best PGD accuracy on a validation split carved from the
training set; the test set is never looked at.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..attacks.methods import pgd
from ..config import (ATTACK_BN, LR_SCHEDULES, TRAINERS, DataConfig, ExtractorConfig, config_hash, format_budget,
                      step_size)
from ..core.checks import check_choice, check_int, check_real
from ..core.device import autocast, check_precision, memory_format, prepare_training, resolve_device
from ..core.distributed import World
from ..core.io import expect, load_checkpoint, save_checkpoint
from ..core.stats import percent
from ..data.batches import (augment, batches_on, channel_stats, data_fingerprint, iterate_batches, limited, to_float,
                            validation_split)
from ..data.dataset import Dataset
from ..errors import BadInput
from ..models.nets import build_model, model_from_checkpoint
from .progress import resume, save_progress, training_health, warn_if_unhealthy


def extractor_key(cfg: ExtractorConfig, data_cfg: DataConfig, data: Dataset) -> str:
    return config_hash(cfg, data_cfg, data_fingerprint(data))


def _validation_budget(cfg: ExtractorConfig) -> float:
    return cfg.eps_range[1] if cfg.eps_range is not None else cfg.eps


@torch.no_grad()
def _accuracy(model, x, y, batch_size, precision, device) -> torch.Tensor:
    correct = []
    for idx in iterate_batches(len(y), batch_size, shuffle=False):
        with autocast(precision, device):
            correct.append(model(x[idx]).argmax(1) == y[idx])
    return torch.cat(correct)


def validate(model, x, y, eps, cfg: ExtractorConfig, device, generator) -> dict:
    """Clean and PGD accuracy (percent) on the held-out split at the extractor's own budget."""
    model.eval()
    clean = _accuracy(model, x, y, cfg.batch_size, cfg.precision, device)
    out = {"val_clean": percent(clean), "val_eps": eps}
    if eps > 0:
        robust = []
        for idx in iterate_batches(len(y), cfg.batch_size, shuffle=False):
            x_adv = pgd(model, x[idx], y[idx], eps, step_size(eps, cfg.step_size), cfg.val_attack_steps,
                        precision=cfg.precision, generator=generator)
            with torch.no_grad(), autocast(cfg.precision, device):
                robust.append(model(x_adv).argmax(1) == y[idx])
        out["val_pgd"] = percent(torch.cat(robust) & clean)
    else:
        out["val_pgd"] = out["val_clean"]
    return out


def step_passes(cfg: ExtractorConfig, eps: float) -> int:
    """Forward passes over the batch in one training step at budget `eps` (each with its backward but
    TRADES' clean prediction), what a step costs in proportion: the clean step one; FGSM-RS two; PGD-k
    k + 1; TRADES k + 3 (its clean prediction, k attack steps, the clean and adversarial halves)."""
    if eps == 0:
        return 1
    return {"fgsm": 2, "pgd": cfg.attack_steps + 1}.get(cfg.trainer, cfg.attack_steps + 3)


def training_loss(model, x, y, eps, cfg: ExtractorConfig, device, generator, net=None) -> torch.Tensor:
    """The outer loss of one step for the configured trainer (eq. 3 for PGD-AT). `net`: the module whose forward
    the loss differentiates, a DistributedDataParallel wrapper of `model` under torchrun (default `model`); the
    attack runs on `model` itself, as DDP allows one forward per backward."""
    net = model if net is None else net
    if eps == 0:
        with autocast(cfg.precision, device):
            return F.cross_entropy(net(x), y)
    alpha = step_size(eps, cfg.step_size)
    # attack_bn="train": the attack's forward passes use batch statistics AND update the BatchNorm running
    # statistics (attack_steps extra momentum updates per step, on the perturbed images), as in the authors'
    # train.py and Rice et al., whose model stays in train mode during the attack; kept on purpose (faithful).
    # "eval": running statistics, left untouched by the attack (TRADES, HAT).
    bn_train = cfg.attack_bn == "train"
    if cfg.trainer == "pgd":
        x_adv = pgd(model, x, y, eps, alpha, cfg.attack_steps, precision=cfg.precision, generator=generator,
                    train_mode=bn_train, checked=True)  # the data set checked its labels and pixels once
    elif cfg.trainer == "fgsm":
        # Wong et al.: one step of 1.25 eps from a uniform random start
        x_adv = pgd(model, x, y, eps, 1.25 * eps, 1, precision=cfg.precision, generator=generator,
                    train_mode=bn_train, checked=True)
    else:  # trades: attack the KL divergence from the clean prediction (made in the attack's BatchNorm mode)
        model.train(bn_train)
        with torch.no_grad(), autocast(cfg.precision, device):
            p_clean = F.softmax(model(x).float(), dim=1)
        model.train()

        def kl_to_clean(z, _y):
            return F.kl_div(F.log_softmax(z.float(), dim=1), p_clean, reduction="none").sum(1)

        x_adv = pgd(model, x, y, eps, alpha, cfg.attack_steps, loss=kl_to_clean,
                    precision=cfg.precision, generator=generator, train_mode=bn_train, checked=True)
        with autocast(cfg.precision, device):
            z_clean, z_adv = net(torch.cat([x, x_adv])).float().chunk(2)
        kl = F.kl_div(F.log_softmax(z_adv, dim=1), F.softmax(z_clean, dim=1), reduction="batchmean")
        return F.cross_entropy(z_clean, y) + cfg.trades_beta * kl
    with autocast(cfg.precision, device):
        return F.cross_entropy(net(x_adv), y)








def train_epoch(model, optimizer, x_train: torch.Tensor, y_train: torch.Tensor, cfg: ExtractorConfig,
                data_cfg: DataConfig, device, order_gen: torch.Generator, noise_gen: torch.Generator,
                desc: str = "", progress: bool = False, batch_schedule=None, net=None,
                world: World = World()) -> torch.Tensor:
    """One pass over the uint8 images `x_train` (already on `device`): shuffled batches, batched
    augmentation on the device, the configured adversarial loss, one optimizer step per batch.

    Returns the mean training loss as a 0-dim tensor (read it with .item(): no host sync per batch).
    `batch_schedule` (a learning-rate scheduler) is stepped after every batch: the cyclic schedule.
    `train_extractor` calls this once per epoch; the benchmarks time it on its own. Under torchrun
    (`--parallel data`) every rank takes its share of each batch (the global batch stays `cfg.batch_size`), `net`
    is the DistributedDataParallel wrapper that averages the gradients, and the loss is the mean over ranks.
    """
    fmt = memory_format(cfg.precision)
    model.train()
    # a last batch smaller than the world would leave a rank without examples: it is dropped there
    whole = [b for b in iterate_batches(len(y_train), cfg.batch_size, shuffle=True, generator=order_gen)
             if len(b) >= world.size]
    batches = batches_on([b.tensor_split(world.size)[world.rank] for b in whole], device)
    # the ranks' gradients are averaged: a share's loss weighted by its size makes that the whole batch's mean
    weights = [len(part) * world.size / len(b) for part, b in zip(batches, whole)]
    draws = torch.rand(len(batches), generator=order_gen)
    bar = tqdm(batches, desc=desc, disable=not progress, leave=False)
    running = torch.zeros((), device=device)
    for i, idx in enumerate(bar):
        x = augment(x_train[idx], data_cfg.crop_padding, data_cfg.flip, noise_gen).contiguous(memory_format=fmt)
        eps = cfg.eps
        if cfg.eps_range is not None:
            lo, hi = cfg.eps_range
            eps = lo + (hi - lo) * draws[i].item()
        loss = training_loss(model, x, y_train[idx], eps, cfg, device, noise_gen, net=net)
        loss = loss * weights[i] if world.distributed else loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if batch_schedule is not None:
            batch_schedule.step()
        running += loss.detach()
    return world.mean(running / len(batches))






def learning_rate_schedule(optimizer, cfg: ExtractorConfig, batches_per_epoch: int):
    """The configured schedule: "step" is stepped once per epoch, "cyclic" once per batch."""
    if cfg.lr_schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.lr_milestones), gamma=cfg.lr_gamma)
    total = cfg.epochs * batches_per_epoch
    peak = max(1, round(0.4 * total))  # Wong et al.: the rate peaks at 2/5 of training

    def factor(step: int) -> float:
        # LambdaLR evaluates step 0 at construction: the first batch trains at lr / peak, not 0
        t = step + 1
        return t / peak if t <= peak else max(0.0, (total - t) / max(1, total - peak))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_extractor_config(cfg: ExtractorConfig) -> None:
    """Everything `train_extractor` needs of its config, checked before anything is written."""
    check_real("eps", cfg.eps, 0, 1)
    if cfg.eps_range is not None and not (len(cfg.eps_range) == 2 and 0 <= cfg.eps_range[0] <= cfg.eps_range[1] <= 1):
        raise BadInput(f"eps_range must satisfy 0 <= lo <= hi <= 1, got eps_range={cfg.eps_range!r}")
    for name in ("epochs", "batch_size", "attack_steps", "val_attack_steps", "val_examples"):
        check_int(name, getattr(cfg, name), 1)
    if cfg.step_size is not None and not cfg.step_size > 0:
        raise BadInput(f"step_size (the PGD step) must be > 0, got step_size={cfg.step_size!r}")
    check_choice("trainer", cfg.trainer, TRAINERS)
    check_choice("attack_bn", cfg.attack_bn, ATTACK_BN)
    check_choice("lr_schedule", cfg.lr_schedule, LR_SCHEDULES)
    check_precision(cfg.precision)


def existing_extractor(cfg: ExtractorConfig, data: Dataset, data_cfg: DataConfig, out_dir: str | Path) -> dict | None:
    """The finished checkpoint in `out_dir` when it was made from this config, None when there is none.

    Refuses (ValueError naming the file) a checkpoint in `out_dir` made for other data, class count,
    architecture or config, before the caller writes anything.
    """
    check_extractor_config(cfg)
    out_dir = Path(out_dir)
    data = limited(data, data_cfg)
    key = extractor_key(cfg, data_cfg, data)
    final_path, last_path = out_dir / "extractor.pt", out_dir / "last.pt"
    for path in (final_path, last_path):
        if not path.is_file():
            continue
        ckpt = load_checkpoint(path)
        if path == final_path:
            # name what differs when it is the data or the architecture; any other difference shows in the key
            expect(ckpt, path, kind="extractor", **data_fingerprint(data))
            expect(ckpt.get("config", {}), path, model=cfg.model)
        if ckpt.get("key") != key:
            raise BadInput(f"{path} was trained with another config (key {ckpt.get('key')} != {key}); "
                           f"use another run directory or delete it")
        if path == final_path:
            return ckpt
    return None


def train_extractor(cfg: ExtractorConfig, data: Dataset, data_cfg: DataConfig, out_dir: str | Path,
                    device: str = "auto", progress: bool = True, stop_after_epoch: int | None = None,
                    world: World = World(), trained_by: dict | None = None) -> dict:
    """Train (or resume, or load) one extractor; returns its final checkpoint dict.

    `out_dir/last.pt` is rewritten after every epoch (weights, optimizer, schedule, RNG states,
    history, best weights so far) so a rerun of the same call resumes; `out_dir/extractor.pt` holds
    the early-stopped weights with their config and metrics. `stop_after_epoch` ends the call after
    that epoch (0-based) as an interruption would, for tests. `world` (under torchrun, `--parallel data`):
    the ranks train this one network together under DistributedDataParallel; rank 0 validates, decides and
    writes. `trained_by` (which rank, of how many, in which mode) goes into the checkpoint.
    """
    ckpt = existing_extractor(cfg, data, data_cfg, out_dir)
    out_dir = Path(out_dir)
    data = limited(data, data_cfg)
    key = extractor_key(cfg, data_cfg, data)
    final_path, last_path = out_dir / "extractor.pt", out_dir / "last.pt"
    label = f"extractor {format_budget(cfg.eps)}"
    if ckpt is not None:
        if progress:
            print(f"{label}: found {final_path} made from the same config, skipping")
        return ckpt

    dev = resolve_device(device)
    prepare_training(dev, cfg.precision)
    fmt = memory_format(cfg.precision)
    torch.manual_seed(cfg.seed)
    mean, std = channel_stats(data.x_train)
    model = build_model(cfg.model, data.num_classes, in_channels=data.image_shape[0], mean=mean, std=std)
    model = model.to(dev, memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    order_gen = torch.Generator().manual_seed(cfg.seed)  # data order and per-batch budgets
    noise_gen = torch.Generator(device=dev).manual_seed(cfg.seed + 1)  # augmentation and random starts
    net = None
    if world.distributed:
        if cfg.batch_size % world.size:
            raise BadInput(f"extractor.batch_size={cfg.batch_size} must be divisible by the world size {world.size} "
                           f"(--parallel data keeps the global batch)")
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    train_idx, val_idx = validation_split(data, data_cfg.val_fraction, seed=0)
    x_train, y_train = data.x_train[train_idx].to(dev), data.y_train[train_idx].to(dev)
    val_idx = val_idx[: cfg.val_examples]
    x_val = to_float(data.x_train[val_idx]).to(dev, memory_format=fmt)
    y_val = data.y_train[val_idx].to(dev)
    val_eps = _validation_budget(cfg)
    schedule = learning_rate_schedule(optimizer, cfg, math.ceil(len(y_train) / cfg.batch_size))
    per_batch = cfg.lr_schedule == "cyclic"

    start, history, best = 0, [], {"val_pgd": -1.0}
    best_state = None
    ckpt = resume(last_path, key, model, optimizer, order_gen, noise_gen, dev)
    if ckpt is not None:
        schedule.load_state_dict(ckpt["schedule"])
        start, history, best, best_state = ckpt["epoch"] + 1, ckpt["history"], ckpt["best"], ckpt["best_state"]
        if progress:
            print(f"{label}: resuming from {last_path} after epoch {ckpt['epoch'] + 1}/{cfg.epochs}")

    for epoch in range(start, cfg.epochs):
        if world.distributed:  # each rank its own stream, from (seed, rank, epoch): a resume draws the same
            noise_gen.manual_seed(cfg.seed + 1 + 7919 * (world.rank + 1) + 104729 * epoch)
        train_loss = train_epoch(model, optimizer, x_train, y_train, cfg, data_cfg, dev, order_gen, noise_gen,
                                 desc=f"{label} epoch {epoch + 1}/{cfg.epochs}", progress=progress,
                                 batch_schedule=schedule if per_batch else None, net=net, world=world)
        if not per_batch:
            schedule.step()
        # validation's random starts from (seed, epoch): the same whatever training drew, on any world size
        val_gen = torch.Generator(device=dev).manual_seed(cfg.seed + 2 + 104729 * epoch)
        metrics = world.broadcast(validate(model, x_val, y_val, val_eps, cfg, dev, val_gen) if world.main else None)
        metrics.update(epoch=epoch, train_loss=train_loss.item(), lr=optimizer.param_groups[0]["lr"])
        history.append(metrics)
        if metrics["val_pgd"] > best["val_pgd"]:
            best = metrics
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if progress:
            print(f"{label} epoch {epoch + 1}/{cfg.epochs}: loss {metrics['train_loss']:.3f} "
                  f"val clean {metrics['val_clean']:.1f}% val PGD {metrics['val_pgd']:.1f}%")
        if world.main:
            save_progress(last_path, key, epoch, model, optimizer, order_gen, noise_gen, history,
                          schedule=schedule.state_dict(), best=best, best_state=best_state)
        if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch + 1 < cfg.epochs:
            return {"interrupted_after_epoch": epoch}

    model.load_state_dict(best_state, strict=True)
    health = training_health(history, data.num_classes)
    warn_if_unhealthy(health, label)
    ckpt = {
        "key": key, "kind": "extractor", "model_kwargs": model.model_kwargs,
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
        "config": dataclasses.asdict(cfg), "data_config": dataclasses.asdict(data_cfg),
        **data_fingerprint(data), "metrics": best, "history": history, "health": health,
        "trained_by": trained_by or {"rank": 0, "world_size": 1},
    }
    if world.main:
        save_checkpoint(final_path, ckpt)
        last_path.unlink(missing_ok=True)
    world.barrier()
    return ckpt


def load_extractor(path: str | Path, device: str | torch.device = "cpu", data: Dataset | None = None):
    """An extractor and its checkpoint; refused when made for other data than `data`."""
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != "extractor":
        raise BadInput(f"{path} is not an extractor checkpoint (kind={ckpt.get('kind')!r})")
    if data is not None:
        expect(ckpt, path, **data_fingerprint(data))
    return model_from_checkpoint(ckpt, device), ckpt
