"""Networks used as feature extractors: Wide ResNets, PreActResNet-18 and small CPU networks.

Every network is a `FeatureNet`: it takes x in [0,1], normalizes it inside with the buffers `mean`
and `std` ([1,C,1,1]), and exposes `features(x)` (the penultimate vector, after the last pooling and
activation), `feature_dim`, the last layer `classifier` (an `nn.Linear`), and `model_kwargs`, the plain
arguments with which `build_model(**model.model_kwargs)` rebuilds the same architecture.

The Wide ResNets follow Zagoruyko & Komodakis as written in Rice et al.'s `robust_overfitting`
(`wideresnet.py`), the WRN-28-10 / WRN-34-10 of the AFS paper; PreActResNet-18 follows
`preactresnet.py` of the same code. Their fixed-size `avg_pool2d` is replaced by adaptive average
pooling, which is the same for 32x32 inputs and also accepts other sizes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.checks import check_int
from ..core.device import eval_mode, kept_modes  # noqa: F401  (re-exported: afs_kit.models.eval_mode)
from ..errors import BadInput

__all__ = ["MODEL_NAMES", "FeatureNet", "build_model", "is_model_name", "parse_wrn_name"]

MODEL_NAMES: tuple[str, ...] = (
    "wrn-28-10", "wrn-34-10", "wrn-28-30", "wrn-16-4", "preact-resnet18", "cnn-tiny", "cnn-small", "cnn-cifar",
    "mlp",
)
_WRN_PATTERN = re.compile(r"wrn-(\d+)-(\d+)")
# a small net k times wider ("cnn-tiny-x3"): table 6's "large model" for the CPU presets
_WIDE_SMALL_PATTERN = re.compile(r"(cnn-tiny|cnn-small|cnn-cifar)-x(\d+)")


class _ChannelsLast(torch.autograd.Function):
    """x in channels-last layout, its gradient handed back contiguous: attacks that flatten gradients with .view
    (pyautoattack) see the layout they were given."""

    @staticmethod
    def forward(ctx, x):
        return x.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class FeatureNet(nn.Module):
    """Base class: normalization inside, `features` from the subclass's trunk, a linear classifier.

    Subclasses define `trunk` (normalized x -> [N, feature_dim], pooled and activated) and call
    `_finish(feature_dim)` at the end of their `__init__`.
    """

    classifier: nn.Linear

    def __init__(self, model_kwargs: dict, mean: list[float], std: list[float]):
        super().__init__()
        self._model_kwargs = model_kwargs
        # Buffers (not parameters): they move with .to() and are saved in the state_dict, so a checkpoint
        # carries its own normalization; persistent so load_state_dict(strict=True) checks them.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.feature_dim = 0

    def _finish(self, feature_dim: int) -> None:
        self.feature_dim = int(feature_dim)
        self.classifier = nn.Linear(self.feature_dim, int(self._model_kwargs["num_classes"]))

    @property
    def model_kwargs(self) -> dict:
        """Plain arguments of `build_model` that rebuild this architecture (a fresh copy each time)."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._model_kwargs.items()}

    def trunk(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std with the model's buffers; x is in [0,1] pixel space."""
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate vector [N, feature_dim]: after global pooling and the final activation."""
        if x.dim() == 4 and x.device.type == "cpu" and not x.is_contiguous(memory_format=torch.channels_last):
            # oneDNN's convolutions in channels-last layout: fp32 training and attack steps took 0.55-0.6x the time
            # on 2 Intel Xeon cores (cnn-cifar, cnn-small, cnn-cifar-x2)
            x = _ChannelsLast.apply(x)
        return self.trunk(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def extra_repr(self) -> str:
        return f"name={self.model_kwargs['name']!r}, feature_dim={self.feature_dim}"


# --------------------------------------------------------------------------- Wide ResNet (Rice et al.)

class WideBasicBlock(nn.Module):
    """Pre-activation basic block of `wideresnet.py`: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut.

    When the width or stride changes, the shortcut is a 1x1 conv applied to the *pre-activated* input,
    as in the reference code (not to the raw input).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.shortcut = None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place ReLU is safe on a fresh BN output: BN's backward does not need its own output.
        out = F.relu(self.bn1(x), inplace=True)
        residual = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out), inplace=True))
        return out + residual


class WideResNet(FeatureNet):
    """WRN-depth-widen: 16 -> 16k -> 32k -> 64k channels, (depth-4)/6 blocks per stage, final BN-ReLU, GAP."""

    def __init__(self, depth: int, widen: int, in_channels: int, model_kwargs: dict, mean, std):
        super().__init__(model_kwargs, mean, std)
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = self._stage(widths[0], widths[1], n, stride=1)
        self.block2 = self._stage(widths[1], widths[2], n, stride=2)
        self.block3 = self._stage(widths[2], widths[3], n, stride=2)
        self.bn = nn.BatchNorm2d(widths[3])
        self._finish(widths[3])
        # Initialization of the reference code: conv N(0, 2/(k*k*out)) (kaiming normal, fan_out),
        # BN weight 1 bias 0, linear bias 0 (linear weight keeps PyTorch's default).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(in_planes: int, out_planes: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(*[
            WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1) for i in range(n)
        ])

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out), inplace=True)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


# --------------------------------------------------------------------------- PreActResNet-18 (Rice et al.)

class PreActBlock(nn.Module):
    """`PreActBlock` of `preactresnet.py`; the projection shortcut also takes the pre-activated input."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + residual


class PreActResNet18(FeatureNet):
    """PreActResNet-18: conv3x3(64), [2,2,2,2] PreActBlocks of 64/128/256/512, final BN-ReLU, GAP.

    Initialization is PyTorch's default, as in the reference code (it sets none).
    """

    def __init__(self, in_channels: int, model_kwargs: dict, mean, std):
        super().__init__(model_kwargs, mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        layers, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(512)
        self._finish(512)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        out = F.relu(self.bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


# --------------------------------------------------------------------------- small CPU networks

def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> list[nn.Module]:
    # No conv bias: the BN right after it has its own shift.
    return [nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class SmallCNN(FeatureNet):
    """A plain conv-BN-ReLU stack ending in global average pooling; the layer list comes from `build_model`.

    Adaptive pooling makes every small net accept any input of at least 8x8.
    """

    def __init__(self, layers: list[nn.Module], feature_dim: int, model_kwargs: dict, mean, std):
        super().__init__(model_kwargs, mean, std)
        self.body = nn.Sequential(*layers)
        self._finish(feature_dim)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.body(x), 1).flatten(1)


class MLP(FeatureNet):
    """Pixels average-pooled to 8x8, one hidden layer of 64 ReLU units, the classifier. No BatchNorm: a batch's
    gradient is the mean of its examples', so `--parallel data` trains what one process trains (the ranks' shares
    averaged), up to the order of floating-point sums; the distributed tests rely on it."""

    def __init__(self, in_channels: int, model_kwargs: dict, mean, std, hidden: int = 64):
        super().__init__(model_kwargs, mean, std)
        self.hidden = nn.Linear(in_channels * 64, hidden)
        self._finish(hidden)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.hidden(F.adaptive_avg_pool2d(x, 8).flatten(1)))


def _cnn_tiny(c: int, k: int = 1) -> tuple[list[nn.Module], int]:
    # 8x8 digits: full resolution, then two stride-2 convs so the receptive field covers the digit
    # before the global average (about 15 k parameters at k = 1).
    return [*_conv_bn_relu(c, 16 * k), *_conv_bn_relu(16 * k, 32 * k, stride=2),
            *_conv_bn_relu(32 * k, 32 * k, stride=2)], 32 * k


def _cnn_small(c: int, k: int = 1) -> tuple[list[nn.Module], int]:
    # Three blocks 32/64/128, each conv-BN-ReLU then 2x2 max pooling (28 -> 14 -> 7 -> 3, 8 -> 4 -> 2 -> 1).
    layers: list[nn.Module] = []
    for cin, cout in ((c, 32 * k), (32 * k, 64 * k), (64 * k, 128 * k)):
        layers += [*_conv_bn_relu(cin, cout), nn.MaxPool2d(2, ceil_mode=True)]
    return layers, 128 * k


def _cnn_cifar(c: int, k: int = 1) -> tuple[list[nn.Module], int]:
    # 32x32 colour in under 0.3 M parameters at k = 1: widths 32-64-64-128-128, pooling 32 -> 16 -> 8 -> 4.
    # Pooling right after the first conv halves the multiply-adds (29 M instead of 57 M): a CPU network.
    layers = [
        *_conv_bn_relu(c, 32 * k), nn.MaxPool2d(2, ceil_mode=True),
        *_conv_bn_relu(32 * k, 64 * k),
        *_conv_bn_relu(64 * k, 64 * k),
        *_conv_bn_relu(64 * k, 128 * k), nn.MaxPool2d(2, ceil_mode=True),
        *_conv_bn_relu(128 * k, 128 * k), nn.MaxPool2d(2, ceil_mode=True),
    ]
    return layers, 128 * k


_SMALL_NETS = {"cnn-tiny": _cnn_tiny, "cnn-small": _cnn_small, "cnn-cifar": _cnn_cifar}


# --------------------------------------------------------------------------- the builder

def parse_wrn_name(name: str) -> tuple[int, int] | None:
    """(depth, widen) for a name "wrn-D-K", None when `name` is not of that form; ValueError when D or K is invalid."""
    match = _WRN_PATTERN.fullmatch(name)
    if match is None:
        return None
    depth, widen = int(match.group(1)), int(match.group(2))
    if depth < 10 or (depth - 4) % 6 != 0:
        raise BadInput(f"Wide ResNet depth D in {name!r} must satisfy (D - 4) % 6 == 0 and D >= 10, got D={depth}")
    if widen < 1:
        raise BadInput(f"Wide ResNet width K in {name!r} must be >= 1, got K={widen}")
    return depth, widen


def _small_net(name: str) -> tuple[str, int] | None:
    """(base name, width factor) of a small net ("cnn-tiny" -> 1, "cnn-tiny-x3" -> 3), else None."""
    if name in _SMALL_NETS:
        return name, 1
    match = _WIDE_SMALL_PATTERN.fullmatch(name)
    if match is None:
        return None
    if int(match.group(2)) < 1:
        raise BadInput(f"width factor in {name!r} must be >= 1, got x{match.group(2)}")
    return match.group(1), int(match.group(2))


def is_model_name(name) -> bool:
    """Whether `build_model` knows `name` (ValueError for a malformed "wrn-D-K" or "cnn-...-xK")."""
    return isinstance(name, str) and (name in MODEL_NAMES or parse_wrn_name(name) is not None
                                      or _small_net(name) is not None)


def check_model_name(name: str, what: str = "model") -> None:
    """Refuse an unknown architecture before anything is written (build_model would, but later)."""
    if not is_model_name(name):
        raise BadInput(f"unknown {what}={name!r}; known: {', '.join(MODEL_NAMES)} (or any 'wrn-D-K' with "
                       f"(D - 4) % 6 == 0, or 'cnn-tiny-xK' etc. for a K times wider small net)")


def _channel_values(values, label: str, in_channels: int, default: float) -> list[float]:
    if values is None:
        return [default] * in_channels
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().flatten().tolist()
    if isinstance(values, (str, bytes)):
        raise BadInput(f"{label} must be a sequence of {in_channels} numbers (one per channel), got {label}={values!r}")
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise BadInput(f"{label} must be a sequence of {in_channels} numbers (one per channel), "
                       f"got {label}={values!r}") from err
    if len(out) != in_channels:
        raise BadInput(f"{label} must have one value per input channel (in_channels={in_channels}), "
                       f"got {label}={out} of length {len(out)}")
    if not all(math.isfinite(v) for v in out):
        raise BadInput(f"{label} must be finite, got {label}={out}")
    return out


def build_model(name: str, num_classes: int, in_channels: int = 3,
                mean: Sequence[float] | torch.Tensor | None = None,
                std: Sequence[float] | torch.Tensor | None = None) -> FeatureNet:
    """Build a network by name; its input is x in [0,1] and it normalizes with (x - mean) / std inside.

    Names: see `MODEL_NAMES`; besides those, any "wrn-D-K" with (D - 4) % 6 == 0, and any small net
    k times wider, "cnn-tiny-xK" (likewise cnn-small, cnn-cifar).
    `mean` and `std` are per-channel (default 0.5 each). The result's `model_kwargs` rebuilds it.
    Parameters are created on the current default device, so `with torch.device("meta"):` builds a
    network without allocating its weights (for counting parameters).
    """
    if not isinstance(name, str):
        raise BadInput(f"name must be a string, got name={name!r}")
    # numpy integers are accepted; model_kwargs stores plain ints.
    num_classes, in_channels = check_int("num_classes", num_classes, 2), check_int("in_channels", in_channels, 1)
    mean_list = _channel_values(mean, "mean", in_channels, 0.5)
    std_list = _channel_values(std, "std", in_channels, 0.5)
    if any(s <= 0 for s in std_list):
        raise BadInput(f"std must be positive in every channel, got std={std_list}")
    kwargs = {"name": name, "num_classes": num_classes, "in_channels": in_channels,
              "mean": mean_list, "std": std_list}

    wrn = parse_wrn_name(name)
    if wrn is not None:
        return WideResNet(wrn[0], wrn[1], in_channels, kwargs, mean_list, std_list)
    if name == "preact-resnet18":
        return PreActResNet18(in_channels, kwargs, mean_list, std_list)
    if name == "mlp":
        return MLP(in_channels, kwargs, mean_list, std_list)
    small = _small_net(name)
    if small is not None:
        layers, feature_dim = _SMALL_NETS[small[0]](in_channels, small[1])
        return SmallCNN(layers, feature_dim, kwargs, mean_list, std_list)
    raise BadInput(f"unknown model name={name!r}; known names: {', '.join(MODEL_NAMES)} "
                   f"(or any 'wrn-D-K' with (D - 4) % 6 == 0, or 'cnn-tiny-xK' etc. for a K times wider small net)")


def model_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the network a checkpoint describes and load its weights strictly; eval mode."""
    model = build_model(**ckpt["model_kwargs"])
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model.to(device).eval()
