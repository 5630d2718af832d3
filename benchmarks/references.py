"""The loops the kit replaces, re-implemented from their public descriptions: the baselines of the benchmarks.

- The AFS authors' extractor loop: a torchvision-style data set of PIL images, the PIL transforms
  RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor in DataLoader workers, fp32, PGD-10 with
  step 2/255 whose perturbation starts from a triangular random point (the sum of two uniforms), is
  clipped in place to the eps-box after every step and clamped to [0, 1] only at the end; the attack
  calls `loss.backward()`, so it also fills the parameter gradients (zeroed before the training step).
  The network stays in training mode during the attack, as in the robust-overfitting code it builds on.
- The authors' merger loop: fp32, the stacked extractors in eval mode but with `requires_grad` left on
  (so every attack step and the training step also compute their parameter gradients), the first alpha
  share of each batch clean and the rest PGD-10 against the whole stacked model, one linear merger.
- `torchattacks.PGD`, pyautoattack's `AutoAttack` and `sklearn.manifold.TSNE` are called directly.

Nothing here is tuned: these are the loops as people run them today.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms


class PILImageDataset(torch.utils.data.Dataset):
    """What `torchvision.datasets.CIFAR10` does per item: HWC uint8 array -> PIL image -> transform."""

    def __init__(self, x_uint8_nchw: torch.Tensor, y: torch.Tensor, transform):
        self.data = x_uint8_nchw.permute(0, 2, 3, 1).contiguous().numpy()  # HWC, as torchvision stores it
        self.targets = y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.data[i])
        return self.transform(img), self.targets[i]


def authors_loader(x_uint8: torch.Tensor, y: torch.Tensor, batch_size: int, workers: int, seed: int = 0,
                   crop_padding: int = 4, flip: bool = True) -> DataLoader:
    """The authors' training data: PIL transforms in `workers` DataLoader processes, reshuffled each epoch."""
    size = int(x_uint8.shape[-1])
    augment = [transforms.RandomCrop(size, padding=crop_padding)] if crop_padding else []
    augment += [transforms.RandomHorizontalFlip()] if flip else []
    transform = transforms.Compose([*augment, transforms.ToTensor()])
    return DataLoader(PILImageDataset(x_uint8, y, transform), batch_size=batch_size, shuffle=True,
                      num_workers=workers, generator=torch.Generator().manual_seed(seed))


def authors_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int) -> torch.Tensor:
    """The authors' PGD: triangular start, in-place clip of the perturbation, [0, 1] only at the end.

    `loss.backward()` fills the parameter gradients too (whatever requires grad), as in their code.
    """
    # triangular on [-eps, eps]: the sum of two uniforms on [-eps/2, eps/2]
    delta = (torch.rand_like(x) - 0.5) * eps + (torch.rand_like(x) - 0.5) * eps
    delta.requires_grad_(True)
    for _ in range(steps):
        loss = F.cross_entropy(model(x + delta), y)
        loss.backward()
        delta.data = delta.data + alpha * delta.grad.detach().sign()
        delta.data.clamp_(-eps, eps)
        delta.grad.zero_()
    return (x + delta.detach()).clamp(0, 1)


def authors_extractor_epoch(model: nn.Module, loader: DataLoader, optimizer, eps: float, alpha: float,
                            steps: int, device) -> float:
    """One epoch of the authors' PGD adversarial training; returns the mean training loss."""
    model.train()
    total, n = 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        x_adv = authors_pgd(model, x, y, eps, alpha, steps)
        loss = F.cross_entropy(model(x_adv), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total, n = total + loss.item(), n + 1
    return total / max(n, 1)


class PlainLayout(nn.Module):
    """A kit network run as the loops people use today run theirs: NCHW (contiguous) throughout. The kit's own
    forward takes a CPU input in channels-last layout (`FeatureNet.features`); same weights, same arithmetic."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.trunk(self.net.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.classifier(self.features(x))


class AuthorsStack(nn.Module):
    """The authors' stacked model: extractors' penultimate features concatenated, one linear merger.

    The extractors are put in eval mode, but their parameters keep `requires_grad=True`.
    """

    def __init__(self, extractors: list[nn.Module], num_classes: int):
        super().__init__()
        self.extractors = nn.ModuleList(extractors)
        self.merger = nn.Linear(sum(int(m.feature_dim) for m in extractors), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merger(torch.cat([m.features(x) for m in self.extractors], dim=1))


def authors_merger_epoch(model: AuthorsStack, loader: DataLoader, optimizer, alpha: float, eps: float,
                         step: float, steps: int, device) -> float:
    """One epoch of the authors' merger training: first alpha share of each batch clean, the rest PGD."""
    model.train()
    model.extractors.eval()
    total, n = 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        n_clean = int(round(alpha * len(y)))
        x_adv = authors_pgd(model, x[n_clean:], y[n_clean:], eps, step, steps)
        loss = F.cross_entropy(model(torch.cat([x[:n_clean], x_adv])), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total, n = total + loss.item(), n + 1
    return total / max(n, 1)


def torchattacks_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float,
                     steps: int) -> torch.Tensor:
    """`torchattacks.PGD` as its README shows it (uniform random start)."""
    import torchattacks

    return torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)(x, y)


def pyautoattack_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, version: str = "standard",
                       seed: int = 0, batch_size: int = 500, device="cpu") -> torch.Tensor:
    """pyautoattack called directly, as its README shows; robust flags (clean and adversarial correct)."""
    from pyautoattack import AutoAttack

    model.eval()
    adversary = AutoAttack(model, norm="Linf", eps=eps, version=version, seed=seed, device=device)
    _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    return y_adv.to(y.device) == y


def sklearn_tsne(features: np.ndarray, seed: int = 0, n_jobs: int | None = None) -> np.ndarray:
    """scikit-learn's TSNE with its defaults on the raw features (PCA start, as the current default)."""
    from sklearn.manifold import TSNE

    return TSNE(n_components=2, perplexity=30.0, init="pca", random_state=seed, n_jobs=n_jobs).fit_transform(features)
