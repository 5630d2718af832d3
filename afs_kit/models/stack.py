"""The stacked model: frozen extractors' features concatenated, a merger, the logit average; subsets."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import format_budget
from ..core.checks import parse_eps_list
from ..errors import BadInput


class FeatureStack(nn.Module):
    """Frozen extractors (eval mode, no parameter gradients) whose features are concatenated (eq. 2)."""

    def __init__(self, extractors: list[nn.Module]):
        super().__init__()
        if not extractors:
            raise BadInput("extractors must hold at least one network, got an empty list")
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
    """One linear layer over the stacked features (eq. 1).

    While it trains with `merger.standardize`, its layer acts on standardized features (f - shift) / scale
    (`standardize`); `fold` writes that back as one linear layer over the raw features, which is all a saved
    merger ever holds, so its weights, importance ratios and histograms keep their meaning."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)
        self.shift: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None

    # the merger interface: what training, the masking checks and the analysis ask of any merger
    @property
    def weight(self) -> torch.Tensor:
        """The map from the raw stacked features to the logits, [classes, features] (importance ratios, fig. 6)."""
        return self.linear.weight

    @property
    def num_classes(self) -> int:
        return self.linear.out_features

    @property
    def trained(self) -> nn.Module:
        """The module whose parameters SGD moves and whose state a checkpoint and a resume hold."""
        return self.linear

    def set_start(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Start training from these weights (the merger's init choices, train/merger_choice.py)."""
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)

    def share(self, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the logits computed from the feature columns `columns` alone (stack attacks)."""
        return self.linear.weight.detach()[:, columns].clone(), self.linear.bias.detach().clone()

    def standardize(self, shift: torch.Tensor, scale: torch.Tensor) -> None:
        """Reparametrize in place: the same logits, the layer now over (f - shift) / scale."""
        with torch.no_grad():
            self.linear.bias += self.linear.weight @ shift
            self.linear.weight *= scale
        self.shift, self.scale = shift, scale

    def fold(self) -> None:
        """Back to one linear layer over the raw features (the same logits)."""
        if self.scale is None:
            return
        with torch.no_grad():
            self.linear.weight /= self.scale
            self.linear.bias -= self.linear.weight @ self.shift
        self.shift = self.scale = None

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        feats = feats.float()
        if self.scale is not None:
            feats = (feats - self.shift) / self.scale
        return self.linear(feats)


MERGERS = {"linear": LinearMerger}  # a new merger: its class (with the interface above) and one entry here


def build_merger(in_features: int, num_classes: int, kind: str = "linear") -> nn.Module:
    if kind not in MERGERS:
        raise BadInput(f"unknown merger kind={kind!r}; known: {', '.join(MERGERS)}")
    return MERGERS[kind](in_features, num_classes)


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
            raise BadInput("models must hold at least one network, got an empty list")
        weights = [1 / len(models)] * len(models) if weights is None else list(weights)
        if len(weights) != len(models) or any(w <= 0 for w in weights) or not math.isclose(sum(weights), 1.0):
            raise BadInput(f"weights must be {len(models)} positive numbers summing to 1, got weights={weights}")
        self.models = nn.ModuleList(models).requires_grad_(False).eval()
        self.register_buffer("weights", torch.tensor(weights))

    def train(self, mode: bool = True) -> LogitAverage:
        super().train(mode)
        self.models.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(w * m(x).float() for w, m in zip(self.weights, self.models))


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
            raise BadInput(f"subset={spec!r} has {len(spec)} digits but the run has only "
                           f"{len(members)} extractors ({', '.join(members)})")
        chosen = [i for i, c in enumerate(spec) if c == "1"]
        if not chosen:
            raise BadInput(f"subset={spec!r} selects no extractor (an empty subset)")
        return chosen
    if not spec:
        raise BadInput(f"subset must not be empty, got subset={given!r}; give 'all', a binary vector or a list of budgets")
    items = [item.strip() for item in spec.split(",")]
    chosen = [len(budgets) + names.index(item) for item in items if item in names]
    rest = ",".join(item for item in items if item not in names)
    if any(c not in "0123456789./, eE-+" for c in rest):
        raise BadInput(f"subset={spec!r} is neither 'all', a binary vector of 0 and 1, nor a list of budgets"
                       + (f" and extractor names ({', '.join(names)})" if names else ""))
    for eps in parse_eps_list(rest, "subset") if rest else ():
        hits = [i for i, b in enumerate(budgets) if abs(b - eps) < 1e-6]
        if not hits:
            raise BadInput(f"subset={spec!r} names budget {format_budget(eps)}, which has no extractor in this "
                           f"run (extractors: {', '.join(members)})")
        chosen.append(hits[0])
    return sorted(set(chosen))


def subset_vector(indices: list[int], n: int) -> str:
    return "".join("1" if i in indices else "0" for i in range(n))


