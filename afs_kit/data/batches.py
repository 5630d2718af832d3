"""Which training images are used and how: the fixed stratified validation split (early stopping and
model selection never see the test set), the `train_limit` subset, the data's fingerprint and channel
statistics, batch index streams, uint8 -> float and batched random crop + flip on the tensors' device.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from ..core.checks import check_int, check_real
from ..errors import BadInput

if TYPE_CHECKING:  # types only: data.py re-exports this module's functions
    from ..config import DataConfig
    from .dataset import Dataset

# ------------------------------------------------------------------------------------- splits and batches


def data_fingerprint(data: Dataset) -> dict:
    """What a checkpoint must agree on with the data it is used with."""
    return {"dataset": data.name, "num_classes": data.num_classes, "image_shape": list(data.image_shape)}


def limited(data: Dataset, data_cfg: DataConfig) -> Dataset:
    """The first `train_limit` training images (tiny presets); the test split is untouched."""
    if data_cfg.train_limit is None or data_cfg.train_limit >= len(data.y_train):
        return data
    n = data_cfg.train_limit
    return dataclasses.replace(data, x_train=data.x_train[:n], y_train=data.y_train[:n])


def channel_stats(x_uint8: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training images, for the normalization inside the model."""
    x = to_float(x_uint8)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return [round(v, 4) for v in mean.tolist()], [round(v, 4) for v in std.tolist()]



def validation_split(data: Dataset, fraction: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the training set into (train_idx, val_idx): disjoint, together all of range(len(x_train)), sorted.

    Stratified (``round(fraction * n_c)`` of each class, at least one kept on each side) when every class present
    has at least 2 images; otherwise a plain seeded split, with a warning.
    """
    check_real("fraction", fraction, 0, 1, low_open=True, high_open=True)
    y = data.y_train
    n = len(y)
    if n < 2:
        raise BadInput(f"validation_split needs at least 2 training images, got {n} in data set {data.name!r}")
    gen = torch.Generator().manual_seed(int(seed))
    counts = torch.bincount(y, minlength=data.num_classes)
    present = counts[counts > 0]
    if bool((present >= 2).all()):
        val_parts = []
        for c in torch.nonzero(counts).flatten().tolist():
            idx = torch.nonzero(y == c).flatten()
            n_val = min(max(round(fraction * len(idx)), 1), len(idx) - 1)
            val_parts.append(idx[torch.randperm(len(idx), generator=gen)[:n_val]])
        val_idx = torch.cat(val_parts)
    else:
        small = [data.classes[c] for c in torch.nonzero(counts == 1).flatten().tolist()]
        warnings.warn(
            f"validation_split: classes {small} have a single training image, so the split is not stratified",
            stacklevel=2,
        )
        n_val = min(max(round(fraction * n), 1), n - 1)
        val_idx = torch.randperm(n, generator=gen)[:n_val]
    in_val = torch.zeros(n, dtype=torch.bool)
    in_val[val_idx] = True
    return torch.nonzero(~in_val).flatten(), torch.nonzero(in_val).flatten()


def iterate_batches(
    n: int, batch_size: int, shuffle: bool, generator: torch.Generator | None = None, drop_last: bool = False
) -> Iterator[torch.Tensor]:
    """Yield CPU LongTensor index batches over range(n), shuffled with ``generator`` when ``shuffle``."""
    n, batch_size = check_int("n", n, 0), check_int("batch_size", batch_size, 1)
    if shuffle:
        device = generator.device if generator is not None else "cpu"
        order = torch.randperm(n, generator=generator, device=device).cpu()
    else:
        order = torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    # a plain function returning a generator, so bad arguments fail at the call, not at the first next()
    return (order[start : start + batch_size] for start in range(0, stop, batch_size))


def batches_on(batches: list[torch.Tensor], device) -> list[torch.Tensor]:
    """Index batches moved to `device` in one transfer, so that no training step waits on the host for its own."""
    if not batches:
        return []
    return list(torch.cat(batches).to(device).split([len(b) for b in batches]))


# ------------------------------------------------------------------------------------------ augmentation


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1], on the same device."""
    if x.dtype != torch.uint8:
        raise BadInput(f"x must be a uint8 tensor, got dtype={x.dtype}")
    return x.to(torch.float32).div_(255.0)


def augment(
    x: torch.Tensor, crop_padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop with ``crop_padding`` pixels of zero padding and random horizontal flip, float32 in [0, 1].

    One random offset and one flip decision per image, as a single gather on the device of ``x``. Random
    numbers are drawn on the generator's device (CPU when ``generator`` is None: the global CPU generator),
    so a seeded CPU generator gives the same batch on every device. ``crop_padding=0, flip=False`` is
    exactly ``to_float(x)``.
    """
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise BadInput(f"x must be uint8 [B, C, H, W], got dtype={x.dtype}, shape={tuple(x.shape)}")
    crop_padding = check_int("crop_padding", crop_padding, 0)
    if crop_padding == 0 and not flip:
        return to_float(x)
    b, c, h, w = x.shape
    p = int(crop_padding)
    rng_device = generator.device if generator is not None else torch.device("cpu")
    offsets = torch.randint(0, 2 * p + 1, (2, b), generator=generator, device=rng_device).to(x.device)
    flips = (
        torch.rand(b, generator=generator, device=rng_device).lt(0.5).to(x.device)
        if flip
        else torch.zeros(b, dtype=torch.bool, device=x.device)
    )
    padded = torch.nn.functional.pad(x, (p, p, p, p)) if p else x
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # [B, H] rows of the padded image
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # [B, W]
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # a flip reads the columns backwards
    out = padded[
        torch.arange(b, device=x.device)[:, None, None, None],
        torch.arange(c, device=x.device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    return to_float(out)
