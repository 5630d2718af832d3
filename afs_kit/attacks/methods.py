"""Attacks: PGD (Linf and L2, uniform random start, restarts, CE / CW / custom losses) and AutoAttack.

Everything lives in pixel space [0, 1]; `eps` is a float such as 8/255. Both attacks put the model in
eval mode while they run and restore every module's own training flag afterwards (an AFS model keeps
frozen extractors in eval mode inside a merger that trains, so one top-level flag is not enough).

PGD here is Madry et al.'s: a uniform random start in the eps-ball, then after the start and after
every step a projection onto the eps-ball and onto [0, 1]. This is NOT what the AFS authors' code does:
it starts from a triangular random point (the sum of two uniforms) and clamps to [0, 1] only after the
last step, so its intermediate points may leave the image domain.
"""
from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from pyautoattack import AutoAttack

from ..core.checks import check_int, check_real
from ..core.device import autocast, check_precision, eval_mode, kept_modes, model_device, resolve_device
from ..errors import BadInput
from .registry import AA_ATTACKS

NORMS = ("Linf", "L2")
LOSSES = ("ce", "cw")
AA_VERSIONS = ("standard", "plus", "rand")
# fewest classes each AutoAttack version works with: the targeted attacks of "standard" and "plus"
# use the 9 runner-up classes as targets, and the DLR loss of "rand" reads the 3rd-largest logit
AA_MIN_CLASSES = {"standard": 10, "plus": 10, "rand": 3}

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- helpers

def _check_images(x: torch.Tensor, y: torch.Tensor, need_int_labels: bool = True, values: bool = True) -> None:
    """Shapes and dtypes; with `values` also the label and pixel ranges (each a host sync on a GPU)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise BadInput(f"x must be a batch of images [N,C,H,W], got x.shape={shape}")
    if not x.is_floating_point():
        raise BadInput(f"x must be a float tensor in [0, 1], got x.dtype={x.dtype}")
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (x.shape[0],):
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise BadInput(f"y must hold one label per image of x ({x.shape[0]}), got y.shape={shape}")
    if need_int_labels and (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool):
        raise BadInput(f"y must hold integer class labels, got y.dtype={y.dtype}")
    if values and need_int_labels and y.numel() and (low := int(y.min())) < 0:
        raise BadInput(f"y must hold class labels >= 0, got a label {low}")
    if values and x.numel():
        lo, hi = torch.aminmax(x.detach())
        lo, hi = lo.item(), hi.item()
        if not (lo >= 0 and hi <= 1):  # also catches NaN
            raise BadInput(f"x must lie in [0, 1], got x.min()={lo:.4g}, x.max()={hi:.4g}")


def _check_eps(eps: float, norm: str, image_shape: tuple[int, ...]) -> float:
    if norm not in NORMS:
        raise BadInput(f"norm must be one of {NORMS}, got norm={norm!r}")
    eps = check_real("eps", eps, finite=False)  # NaN is refused just below, with the range
    # the largest distance between two images in [0,1]^d: 1 in Linf, sqrt(d) in L2
    top = 1.0 if norm == "Linf" else math.sqrt(math.prod(image_shape))
    if not 0 <= eps <= top:
        raise BadInput(f"eps must be in [0, {top:.4g}] for {norm}, got eps={eps}")
    return eps


def _check_label_range(y_top: int, num_classes: int) -> None:
    # an out-of-range label is an index error on the CPU and a device-side assert (a dead CUDA context) on a GPU
    if y_top > num_classes:
        raise BadInput(f"y must hold labels in [0, {num_classes - 1}] for a model with {num_classes} classes, "
                       f"got a label {y_top - 1}")


def _cuda_devices(device: torch.device) -> list[int]:
    """The CUDA device whose RNG pyautoattack reseeds (for `torch.random.fork_rng`); none on the CPU."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def cw_margin(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin max_{j != y} z_j - z_y, per example (> 0 means misclassified)."""
    z_y = z.gather(1, y[:, None]).squeeze(1)
    z_other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf")).amax(1)
    return z_other - z_y


def _per_example_loss(loss: str | LossFn, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if loss == "ce":
        return F.cross_entropy(z, y, reduction="none")
    if loss == "cw":
        return cw_margin(z, y)
    out = loss(z, y)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (z.shape[0],):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BadInput(f"loss must return one value per example ({z.shape[0]}), got shape={shape}")
    return out


def _random_start(x: torch.Tensor, eps: float, norm: str, generator) -> torch.Tensor:
    """A point drawn uniformly from the eps-ball around x (then clipped to [0, 1] by the caller)."""
    if norm == "Linf":
        return x + torch.empty_like(x).uniform_(-eps, eps, generator=generator)
    # L2: uniform over the ball's volume: a uniform direction (normalized Gaussian) and radius
    # eps * u^(1/d), the exact analogue of U(-eps, eps)^d for Linf (in high d most starts lie near
    # the sphere, as they should)
    d = x[0].numel()
    direction = torch.empty_like(x).normal_(generator=generator)
    direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    u = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
    return x + direction * (eps * u.pow(1.0 / d)).view(-1, 1, 1, 1)


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Onto the eps-ball around x, then onto [0, 1].

    Clipping to [0, 1] only moves each pixel towards x (x itself lies in [0, 1]), so the result stays
    inside the ball; in the same order as torchattacks, so the two agree bit for bit.
    """
    if norm == "Linf":
        delta = torch.clamp(x_adv - x, min=-eps, max=eps)
    else:
        delta = x_adv - x
        scale = (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
        delta = delta * scale.view(-1, 1, 1, 1)
    return torch.clamp(x + delta, min=0.0, max=1.0)


def _pgd_run(model, x, y, eps, alpha, steps, norm, random_start, loss, precision, generator, y_top=0, start=None):
    """One PGD run; no host-device synchronization inside the loop (`y_top`: max label + 1, a Python int)."""
    if start is not None:
        x_adv = _project(start, x, eps, norm)
    else:
        x_adv = _project(_random_start(x, eps, norm, generator), x, eps, norm) if random_start else x.clone()
    for step in range(steps):
        # differentiate w.r.t. the adversarial input only (x is constant, so this is the gradient
        # w.r.t. the perturbation): parameter .grad is never written
        x_adv.requires_grad_(True)
        with autocast(precision, x.device):
            z = model(x_adv)
        if step == 0:  # the class count is known only after the first forward pass
            _check_label_range(y_top, z.shape[1])
        # the loss in fp32; summed so each example's gradient does not depend on the batch size
        total = _per_example_loss(loss, z.float(), y).sum()
        (grad,) = torch.autograd.grad(total, x_adv)
        grad = grad.to(x_adv.dtype)
        x_adv = x_adv.detach()
        if norm == "Linf":
            x_adv = x_adv + alpha * grad.sign()
        else:
            g_norm = grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            x_adv = x_adv + alpha * grad / (g_norm + 1e-12)
        x_adv = _project(x_adv, x, eps, norm)
    return x_adv.detach()


# ---------------------------------------------------------------- PGD

def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
        norm: str = "Linf", random_start: bool = True, restarts: int = 1, loss: str | LossFn = "ce",
        precision: str = "fp32", generator: torch.Generator | None = None,
        train_mode: bool = False, checked: bool = False, start: torch.Tensor | None = None) -> torch.Tensor:
    """Projected gradient ascent on the loss (Madry et al., 2018); returns x_adv, detached.

    Args:
        model: maps images in [0, 1] to logits [N, K].
        x: images [N, C, H, W] in [0, 1] (float); y: labels [N].
        eps: budget in the chosen norm (8/255 for Linf; at most sqrt(C*H*W) for L2).
        alpha: the PGD step size (the paper's eta; not the merger's alpha of eq. 5).
        steps: gradient steps per restart.
        norm: "Linf" (step alpha * sign(grad)) or "L2" (step alpha * grad / ||grad||_2 per example).
        random_start: start from a point drawn uniformly from the eps-ball (Linf: U(-eps, eps) per
            pixel; L2: uniform over the ball's volume), clipped to [0, 1]; else start at x.
        restarts: independent runs; per example the worst case is kept: a run that misclassifies it
            (the first such run), else the run with the highest loss. For a callable loss, where
            "misclassified" means nothing, the highest loss alone.
        loss: "ce" (cross-entropy, summed over the batch), "cw" (max_{j != y} z_j - z_y), or a
            callable (logits [N, K] in fp32, y) -> per-example loss [N], maximized.
        precision: "fp32" or "bf16" (forward under torch.autocast in bf16; the gradient is taken
            outside autocast as PyTorch recommends; perturbation and x_adv stay in x's dtype).
        generator: torch.Generator on the model's device for the random start (None: the global RNG).
        train_mode: run the model in training mode (e.g. batch statistics); default eval mode.
        checked: the caller vouches that x lies in [0, 1] and y in the model's classes (the kit's trainers,
            whose data were checked when loaded): those checks, host syncs on a GPU, are skipped.
        start: the starting points (x's shape), projected onto the ball, instead of a random start: e.g.
            drawn per example in advance, so that a sharded evaluation starts where one process would.

    The attack runs on the model's device (x and y are moved there) and x_adv comes back on x's device.
    The model's (and every submodule's) training flag is restored afterwards, even on errors.
    After the start and every step x_adv is projected onto the eps-ball and [0, 1] (the authors'
    code clamps to [0, 1] only after the last step and starts from a triangular random point).
    eps = 0 returns a copy of x.

    Example:
        >>> x_adv = pgd(model, x, y, eps=8/255, alpha=2/255, steps=10)
    """
    _check_images(x, y, need_int_labels=not callable(loss), values=not checked)
    eps = _check_eps(eps, norm, tuple(x.shape[1:]))
    alpha = check_real("alpha", alpha, 0, low_open=True, finite=False, what="the PGD step size")
    steps, restarts = check_int("steps", steps, 1), check_int("restarts", restarts, 1)
    if not callable(loss) and loss not in LOSSES:
        raise BadInput(f"loss must be one of {LOSSES} or a callable (logits, y) -> [N], got loss={loss!r}")
    check_precision(precision)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise BadInput(f"generator must be a torch.Generator or None, got generator={generator!r}")
    home, dev = x.device, model_device(model, x.device)
    if start is not None and (not isinstance(start, torch.Tensor) or start.shape != x.shape or restarts != 1):
        raise BadInput(f"start must be a tensor of x's shape {tuple(x.shape)} with restarts=1, got "
                       f"{tuple(start.shape) if isinstance(start, torch.Tensor) else type(start).__name__}, "
                       f"restarts={restarts}")
    if generator is not None and generator.device.type != dev.type:
        raise BadInput(f"generator must live on the model's device ({dev}), where the attack runs, got "
                       f"generator.device={generator.device}")
    if eps == 0 or x.shape[0] == 0:
        return x.detach().clone()
    if dev != home:
        return pgd(model, x.to(dev), y.to(dev), eps, alpha, steps, norm, random_start, restarts, loss, precision,
                   generator, train_mode, checked, None if start is None else start.to(dev)).to(home)

    x = x.detach()
    # one host sync here (none when `checked`), so the loop can check the labels against the model's classes
    y_top = int(y.max()) + 1 if not (callable(loss) or checked) else 0
    with kept_modes(model, train_mode):
        best = best_loss = best_fooled = None
        for r in range(restarts):
            x_adv = _pgd_run(model, x, y, eps, alpha, steps, norm, random_start, loss, precision, generator, y_top,
                             None if start is None else start.detach().to(x.dtype))
            if restarts == 1:
                return x_adv
            with torch.no_grad(), autocast(precision, x.device):
                z = model(x_adv)
            z = z.float()
            per_loss = _per_example_loss(loss, z, y).detach()
            # "misclassified" is defined for the label losses only; a callable keeps the highest loss
            fooled = z.argmax(1) != y if not callable(loss) else torch.zeros_like(per_loss, dtype=torch.bool)
            if r == 0:
                best, best_loss, best_fooled = x_adv, per_loss, fooled
                continue
            take = (fooled & ~best_fooled) | (~fooled & ~best_fooled & (per_loss > best_loss))
            best = torch.where(take.view(-1, 1, 1, 1), x_adv, best)
            best_loss = torch.where(take, per_loss, best_loss)
            best_fooled = best_fooled | fooled
        return best


# ---------------------------------------------------------------- AutoAttack

def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "Linf",
               version: str = "standard", seed: int = 0, batch_size: int = 500, verbose: bool = False,
               device: str | torch.device | None = None, return_breakdown: bool = False,
               attacks: Sequence[str] | None = None, say=None):
    """AutoAttack (Croce & Hein, 2020) through the authors' package `pyautoattack`.

    Returns `(robust, x_adv)`: `robust` a BoolTensor [N] on y's device, True where the example is
    classified correctly both clean and after every attack of the version, which is how AutoAttack
    counts robust accuracy (`y_adv == y`, with `y_adv` the clean prediction, replaced by the
    adversarial prediction wherever an attack succeeded); `x_adv` [N, C, H, W] on x's device, equal
    to x where no attack succeeded. With `return_breakdown`, a third element: {attack: number of
    examples it broke}, in the order the version runs them (APGD-CE, APGD-T, FAB-T, Square for
    "standard"). Each attack runs on the examples still robust after the ones before it, exactly as
    in one `run_standard_evaluation` call, so the breakdown costs nothing; what Square breaks after
    the gradient attacks failed is a sign of gradient masking.

    Args:
        eps: budget (Linf or L2). eps = 0 skips the attacks: robust = clean-correct, x_adv = x.
        version: "standard" (APGD-CE, APGD-T, FAB-T, Square; needs >= 10 classes), "plus" (>= 10
            classes) or "rand" (for randomized models; >= 3 classes).
        seed: passed to every attack (pyautoattack reseeds the global RNG with it before each attack;
            the caller's global RNG state is saved and restored around the call).
        batch_size: examples per forward/backward batch.
        verbose: show pyautoattack's progress log (robust accuracy after each attack).
        device: where the attacks run (the model must already be there); None: the model's device.
        attacks: None runs the version's attacks; a list (of apgd-ce, apgd-dlr, apgd-t, fab, fab-t,
            square) runs those instead, in that order, with the version's settings: cheaper and weaker
            than the whole version, so say so wherever its numbers are shown.
        say: called with one line as each attack starts (e.g. `print`); None: silent.

    The model is in eval mode during the call; every module's training flag is restored afterwards.
    """
    _check_images(x, y)
    eps = _check_eps(eps, norm, tuple(x.shape[1:]))
    if version not in AA_VERSIONS:
        raise BadInput(f"version must be one of {AA_VERSIONS}, got version={version!r}")
    if attacks is not None:
        attacks = list(attacks)
        unknown = [a for a in attacks if a not in AA_ATTACKS]
        if not attacks or unknown:
            raise BadInput(f"attacks must name some of {', '.join(AA_ATTACKS)}, got attacks={attacks!r}")
    seed, batch_size = check_int("seed", seed, 0), check_int("batch_size", batch_size, 1)
    dev = model_device(model, x.device) if device is None else resolve_device(device)
    if x.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.bool, device=y.device), x.detach().clone()
        return (*empty, {}) if return_breakdown else empty
    # pyautoattack's flattening uses .view, which fails on channels_last and other strided tensors
    x = x.detach().contiguous()
    logger = logging.getLogger("auto-attack")
    handler, old_level = None, logger.level
    try:
        with eval_mode(model):
            with torch.no_grad():
                num_classes = model(x[:1].to(dev)).shape[1]
            if num_classes < AA_MIN_CLASSES[version]:
                raise BadInput(f"AutoAttack version={version!r} needs at least {AA_MIN_CLASSES[version]} classes "
                               f"(its targeted attacks use the runner-up classes as targets), got a model with "
                               f"{num_classes} classes; use pgd(..., loss='cw') or version='rand' instead")
            _check_label_range(int(y.max()) + 1, num_classes)
            with torch.no_grad():
                pred = torch.cat([model(x[i:i + batch_size].to(dev)).argmax(1).to(y.device)
                                  for i in range(0, x.shape[0], batch_size)])
            robust, x_adv, broken = pred == y, x.clone(), {}
            if eps > 0:
                if verbose:
                    handler = logging.StreamHandler()
                    logger.addHandler(handler)
                    logger.setLevel(logging.DEBUG)
                adversary = AutoAttack(model, norm=norm, eps=eps, version=version, seed=seed, device=dev)
                with torch.random.fork_rng(devices=_cuda_devices(dev)):
                    # a chosen subset runs with the version's settings (one restart, 9 target classes)
                    for attack in attacks or list(adversary.attacks_to_run):
                        # one attack at a time on what is still robust: what run_standard_evaluation does
                        # internally, so each attack's share is known
                        idx = robust.nonzero().flatten()
                        broken[attack] = 0
                        if len(idx) == 0:
                            continue
                        if say is not None:
                            say(f"  AutoAttack {attack} on the {len(idx)} of {len(y)} examples still robust ...")
                        adversary.attacks_to_run = [attack]
                        # both on the model's device: pyautoattack keeps its flags on x's and compares
                        # them with y's (a CPU x beside a CUDA model failed on an H100)
                        xa, ya = adversary.run_standard_evaluation(x[idx.to(x.device)].to(dev), y[idx].to(dev),
                                                                   batch_size=batch_size)
                        fooled = (ya.to(y.device) != y[idx])
                        hit = idx[fooled]
                        robust[hit] = False
                        x_adv[hit.to(x.device)] = xa[fooled.to(xa.device)].to(x.device)
                        broken[attack] = int(fooled.sum())
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            logger.setLevel(old_level)
    return (robust, x_adv, broken) if return_breakdown else (robust, x_adv)


# ---------------------------------------------------------------- Square (gradient-free)

def square_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, n_queries: int = 1000,
                  norm: str = "Linf", seed: int = 0, batch_size: int = 500) -> torch.Tensor:
    """Square Attack (Andriushchenko et al., 2020), pyautoattack's, untargeted on the margin loss.

    Needs no gradient at all, so a model that hides its gradients cannot hide from it: where it
    breaks examples that PGD did not, PGD's gradients lie. `n_queries` forward passes per example at
    most (AutoAttack's standard run uses 5,000); the square-size schedule is rescaled to it. Returns
    x_adv (equal to x where no query succeeded), on x's device. The caller's global RNG state is
    kept (pyautoattack reseeds it).
    """
    from pyautoattack.square import SquareAttack

    _check_images(x, y)
    eps = _check_eps(eps, norm, tuple(x.shape[1:]))
    n_queries = check_int("n_queries", n_queries, 1)
    seed, batch_size = check_int("seed", seed, 0), check_int("batch_size", batch_size, 1)
    if eps == 0 or x.shape[0] == 0:
        return x.detach().clone()
    x = x.detach().contiguous()
    attack = SquareAttack(model, norm=norm, n_queries=n_queries, eps=eps, p_init=0.8, n_restarts=1, seed=seed,
                          resc_schedule=True, device=x.device)
    with eval_mode(model), torch.random.fork_rng(devices=_cuda_devices(x.device)), torch.no_grad():
        return torch.cat([attack.perturb(x[i:i + batch_size], y[i:i + batch_size])
                          for i in range(0, x.shape[0], batch_size)])


def random_starts(x: torch.Tensor, eps: float, seed: int, key: str, part: slice | None = None,
                  n: int | None = None) -> torch.Tensor:
    """PGD's uniform random start x + U(-eps, eps), clipped to [0, 1], drawn for all `n` examples of an evaluation
    at once from (seed, `key`) on the CPU: example i starts at the same point whichever examples share its
    batch, whichever rank evaluates it (`x` holds the examples of `part`) and on any device."""
    n = len(x) if n is None else n
    gen = torch.Generator().manual_seed(seed + zlib.crc32(key.encode()))
    noise = torch.empty((n, *x.shape[1:]), dtype=x.dtype).uniform_(-eps, eps, generator=gen)
    return (x + noise[part if part is not None else slice(None)].to(x.device)).clamp_(0, 1)
