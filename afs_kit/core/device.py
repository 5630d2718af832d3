"""Where the kit runs: the device chosen at run time and the mixed-precision context."""
from __future__ import annotations

import contextlib
import functools
import itertools
import os
import platform
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import BadInput, warn

PRECISIONS = ("fp32", "bf16")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`"auto"` picks CUDA when present, else the CPU; anything else must exist on this machine. A CUDA device
    comes back with its index (`cuda` -> `cuda:0`, the current one), the form tensors report, so that
    `x.device == run.device` holds for tensors the kit put there (found on an H100: `cuda` != `cuda:0`)."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise BadInput(f"device must be 'auto', 'cpu' or 'cuda[:N]', got device={device!r}") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInput(f"device={device!r} was asked for, but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BadInput(f"device={device!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise BadInput(f"device must be 'auto', 'cpu' or 'cuda[:N]', got device={device!r}")
    return dev


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise BadInput(f"precision must be one of {PRECISIONS}, got precision={precision!r}")
    return precision


def autocast(precision: str, device: torch.device | str):
    """bf16 autocast on CPU (Intel AMX) and CUDA (tensor cores); a no-op context for fp32."""
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def memory_format(precision: str) -> torch.memory_format:
    """channels_last pays with bf16 convolutions (oneDNN/AMX, tensor cores): bf16 training hands its data and
    weights over in that layout; on a CPU every network also takes its input in it (`FeatureNet.features`)."""
    return torch.channels_last if precision == "bf16" else torch.contiguous_format


def model_device(model: torch.nn.Module, fallback: torch.device | str = "cpu") -> torch.device:
    """Where `model` runs: its first parameter's (or buffer's) device; `fallback` for a model with neither.
    The attacks and evaluations run there whatever device the caller's tensors are on (as torchattacks
    takes its device from the model) and hand their results back on the caller's device."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device(fallback)


@contextlib.contextmanager
def exact_fp32(precision: str):
    """Inside, "fp32" means IEEE fp32 on CUDA: TF32 off for matmuls and cuDNN convolutions (cuDNN allows
    TF32 by default on Ampere and later), restored on exit; bf16 is left as it is. A no-op on the CPU."""
    if precision != "fp32":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def matmul_precision(precision: str) -> str:
    """What an evaluation's metrics.json records of the arithmetic its attacks ran in."""
    return "fp32 (IEEE; TF32 off on CUDA)" if precision == "fp32" else "bf16 autocast (fp32 accumulation)"


# set to 1 for bitwise-reproducible CUDA training (a resumed run equal to an unbroken one; slower): deterministic
# algorithms, no cuDNN benchmarking (CUBLAS_WORKSPACE_CONFIG=:4096:8 must be set before CUDA starts)
DETERMINISTIC_ENV = "AFS_KIT_DETERMINISTIC"


def prepare_training(device: torch.device, precision: str = "fp32") -> None:
    """CUDA training settings: cuDNN benchmarks its convolutions for the fixed batch shapes (fastest, not bitwise
    reproducible between runs; evaluations do not depend on it), unless AFS_KIT_DETERMINISTIC=1. TF32 stays as
    PyTorch sets it for training. On a CPU whose bf16 is emulated, bf16 training is said to be slow, once."""
    if torch.device(device).type != "cuda":
        if precision == "bf16" and emulated_bf16():
            _say_emulated_bf16()
        return
    deterministic = os.environ.get(DETERMINISTIC_ENV) == "1"
    if deterministic:
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not deterministic


def emulated_bf16() -> bool:
    """Whether this x86 CPU lacks both AVX512-BF16 and AMX: PyTorch then emulates bf16 matmul, slower than fp32."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if platform.machine().lower() not in ("x86_64", "amd64") or None in probes:
        return False  # another CPU, or a torch without the probes: nothing said
    return not any(probe() for probe in probes)


@functools.cache
def _say_emulated_bf16() -> None:
    # once per process: every network a run trains would say it again
    warn("training in bf16 on a CPU without AVX512-BF16 or AMX, where bf16 matmul is emulated and slower than fp32 "
         "(63 against 300 GFLOP/s on such a Xeon, README 'Speed'); --set extractor.precision=fp32 --set "
         "merger.precision=fp32 trains in fp32 (networks with new cache keys)")


@contextlib.contextmanager
def kept_modes(model: nn.Module, training: bool = False) -> Iterator[None]:
    """`model.train(training)` for the duration, then every module's own training flag back: the one
    way the kit switches a caller's model (attacks, evaluations, checks) and leaves it as it found it."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was


def eval_mode(model: nn.Module):
    """Eval mode for the duration, then every module's own training flag back."""
    return kept_modes(model, False)
