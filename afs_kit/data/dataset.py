"""The data set as uint8 tensors in memory, what every loader returns."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BadInput


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors field by field has no single truth value
class Dataset:
    """A data set with its official train/test split, held in memory."""

    name: str
    x_train: torch.Tensor  # uint8 [N, C, H, W]
    y_train: torch.Tensor  # int64 [N]
    x_test: torch.Tensor  # uint8 [M, C, H, W]
    y_test: torch.Tensor  # int64 [M]
    classes: tuple[str, ...]  # class names in label order

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise BadInput(f"x_{split} must be uint8 [N, C, H, W], got dtype={x.dtype}, shape={tuple(x.shape)}")
            if y.dtype != torch.int64 or y.dim() != 1:
                raise BadInput(f"y_{split} must be int64 [N], got dtype={y.dtype}, shape={tuple(y.shape)}")
            if len(x) != len(y):
                raise BadInput(f"x_{split} has {len(x)} images but y_{split} has {len(y)} labels")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(self.classes)):
                raise BadInput(
                    f"y_{split} must be in [0, {len(self.classes) - 1}] for {len(self.classes)} classes, "
                    f"got labels in [{int(y.min())}, {int(y.max())}]"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise BadInput(
                f"train and test images differ in shape: {tuple(self.x_train.shape[1:])} vs "
                f"{tuple(self.x_test.shape[1:])}"
            )
        # a list would make the frozen dataclass unhashable and mutable from outside
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return (int(c), int(h), int(w))

    def __repr__(self) -> str:
        # an npz:/folder: name holds the file's full path; a notebook's output names only the file
        kind, sep, where = self.name.partition(":")
        shown = f"{kind}:{Path(where).name}" if sep and kind in ("npz", "folder") else self.name
        return (
            f"Dataset(name={shown!r}, train={len(self.x_train)}, test={len(self.x_test)}, "
            f"image_shape={self.image_shape}, num_classes={self.num_classes})"
        )


