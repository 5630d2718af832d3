"""PGD and AutoAttack on a small CNN trained on digits: projections at every step, agreement with the
reference implementations (torchattacks, pyautoattack), worst case over restarts, restored modes and
bad arguments refused with the argument and its value."""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import scipy.stats
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks
from conftest import quick_cnn
from pyautoattack import AutoAttack

from afs_kit.attacks.methods import autoattack, pgd
from afs_kit.data.datasets import load_dataset
from afs_kit.models.nets import build_model

EPS, ALPHA = 0.1, 0.025  # Linf budget where the quickly trained CNN is about half robust
L2_EPS = 1.0              # L2 budget on 8x8 images (the largest possible distance is 8)
N = 64                    # a power of 2: torchattacks' mean loss then has the kit's summed gradient / N exactly


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits")
    return data.x_test[:N].float() / 255, data.y_test[:N], data


@pytest.fixture(scope="module")
def model(digits):
    """cnn-tiny after 150 SGD steps on digits (a few seconds): about 97 % clean accuracy."""
    net = quick_cnn(digits[2])
    for p in net.parameters():
        p.requires_grad_(False)
    xt, yt, _ = digits
    with torch.no_grad():
        assert (net(xt).argmax(1) == yt).float().mean() > 0.9
    return net


class Recorder(nn.Module):
    """Passes every input on to `inner` and keeps a copy: what the attack fed the model, step by step."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.inner(x)


class ZeroGradient(nn.Module):
    """Logits that do not depend on x (zero input gradient): PGD never moves off its random start."""

    def forward(self, x):
        return x.flatten(1)[:, :1] * 0 + torch.arange(10.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def distance(a: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    d = (a - b).flatten(1)
    return d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)


def margin(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The CW loss written out: max_{j != y} z_j - z_y."""
    return z.masked_fill(F.one_hot(y, z.shape[1]).bool(), -math.inf).amax(1) - z.gather(1, y[:, None])[:, 0]


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


# ---------------------------------------------------------------- projection at every step

@pytest.mark.parametrize("norm, eps, alpha, precision", [
    ("Linf", EPS, EPS, "fp32"),        # alpha = eps: every step leaves the ball unless projected
    ("L2", L2_EPS, 0.5, "fp32"),
    ("Linf", EPS, EPS, "bf16"),
    ("L2", L2_EPS, 0.5, "bf16"),
])
def test_every_point_pgd_feeds_the_model_lies_in_the_ball_and_the_image_domain(model, digits, norm, eps, alpha,
                                                                              precision):
    x, y, _ = digits
    rec = Recorder(model)
    steps, restarts = 6, 2
    x_adv = pgd(rec, x, y, eps, alpha, steps, norm=norm, restarts=restarts, precision=precision, generator=gen())
    # one call per step of each restart, then one per restart to pick the worst case
    assert len(rec.seen) == restarts * (steps + 1)
    for i, seen in enumerate(rec.seen + [x_adv]):
        assert seen.dtype == torch.float32 and seen.shape == x.shape
        assert distance(seen, x, norm).max() <= eps + 1e-6, f"input {i} left the {norm} ball"
        assert seen.min() >= 0 and seen.max() <= 1, f"input {i} left [0, 1]"
    # the constraints were active, so the projections were really exercised: steps of alpha would carry
    # x_adv well beyond eps (L2: the clip to [0, 1] then shortens delta a little)
    assert distance(x_adv, x, norm).max() >= (eps - 1e-6 if norm == "Linf" else 0.95 * eps)
    assert ((x_adv == 0) & (x == 0)).any() and ((x_adv == 1) & (x == 1)).any()


def test_random_starts_are_uniform_over_the_ball():
    """Through a model with zero gradient the output is the random start: Linf U(-eps, eps) per pixel,
    L2 uniform over the ball's volume (radius / eps ~ U^(1/d)); no clipping at x = 0.5."""
    x, y = torch.full((400, 1, 4, 4), 0.5), torch.zeros(400, dtype=torch.int64)
    d = 16
    delta = pgd(ZeroGradient(), x, y, 0.2, 0.05, 1, generator=gen(1)) - x
    assert scipy.stats.kstest(delta.flatten().numpy(), scipy.stats.uniform(-0.2, 0.4).cdf).pvalue > 0.01
    delta = pgd(ZeroGradient(), x, y, 0.4, 0.05, 1, norm="L2", generator=gen(1)) - x
    radius = delta.flatten(1).norm(dim=1) / 0.4
    assert radius.max() <= 1 + 1e-6
    assert scipy.stats.kstest((radius.double() ** d).numpy(), "uniform").pvalue > 0.01
    direction = delta.flatten(1) / delta.flatten(1).norm(dim=1, keepdim=True)
    assert direction.mean(0).abs().max() < 0.1, "directions are not biased"


# ---------------------------------------------------------------- the reference implementations

@pytest.mark.parametrize("random_start", [True, False])
def test_linf_pgd_equals_torchattacks(model, digits, random_start):
    """Same model, batch and start (both draw U(-eps, eps) from the global RNG): the same images."""
    x, y, _ = digits
    torch.manual_seed(123)
    ref = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=10, random_start=random_start)(x, y)
    torch.manual_seed(123)
    ours = pgd(model, x, y, EPS, ALPHA, 10, random_start=random_start, generator=None)
    assert (ours - ref).abs().max() <= 1e-6
    assert torch.equal(model(ours).argmax(1), model(ref).argmax(1))
    assert not torch.equal(ours, x) and accuracy(model, ours, y) < accuracy(model, x, y)


def test_l2_pgd_equals_torchattacks_from_the_same_start(model, digits):
    """torchattacks' L2 start has radius eps * U (denser near the centre); the kit's is uniform over the
    ball, so the runs are compared from x itself."""
    x, y, _ = digits
    ref = torchattacks.PGDL2(model, eps=L2_EPS, alpha=0.25, steps=10, random_start=False)(x, y)
    ours = pgd(model, x, y, L2_EPS, 0.25, 10, norm="L2", random_start=False)
    # the two normalize the gradient with different epsilons and reduction orders, so each of the 10
    # steps may differ by a few float32 roundings (eps 1.2e-7) of values up to 1: 10 steps x ~4 operations
    # x 1.2e-7 = 5e-6 at most (seen: 1.07e-6 on an Intel AMX machine, below 1e-6 on AMD EPYC)
    assert (ours - ref).abs().max() <= 1e-5
    assert torch.equal(model(ours).argmax(1), model(ref).argmax(1))
    assert accuracy(model, ours, y) < accuracy(model, x, y)


@pytest.fixture(scope="module")
def standard_aa(model, digits):
    """AutoAttack's standard version on the first 24 digits (the caller's RNG state before and after), once for
    the two tests that compare with it: its Square's 5,000 queries are most of this file's time."""
    x, y, _ = digits
    rng = torch.get_rng_state()
    robust, x_adv, broken = autoattack(model, x[:24], y[:24], EPS, version="standard", seed=0, return_breakdown=True)
    return robust, x_adv, broken, (rng, torch.get_rng_state())


def test_autoattack_gives_the_flags_of_pyautoattack_called_directly(model, digits, standard_aa):
    x, y, _ = digits
    x, y = x[:24], y[:24]
    robust, x_adv, _, (rng_before, rng_after) = standard_aa
    assert torch.equal(rng_after, rng_before), "the caller's global RNG is left as it was"
    model.eval()
    direct = AutoAttack(model, norm="Linf", eps=EPS, version="standard", seed=0, device="cpu")
    direct.verbose = False
    x_ref, y_ref = direct.run_standard_evaluation(x, y, batch_size=500)
    assert robust.dtype == torch.bool and robust.shape == y.shape
    assert torch.equal(robust, y_ref == y)
    assert torch.equal(x_adv, x_ref)
    assert robust.any() and not robust.all(), "flags of both kinds, or the comparison says little"
    with torch.no_grad():
        clean = model(x).argmax(1) == y
        assert not (robust & ~clean).any(), "robust means correct on the clean image too"
        assert torch.equal(model(x_adv).argmax(1) == y, robust)
    assert distance(x_adv, x, "Linf").max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    # robust accuracy under AutoAttack is at most PGD-20's (up to one example)
    pgd_robust = model(pgd(model, x, y, EPS, ALPHA, 20, generator=gen())).argmax(1) == y
    assert robust.sum() <= pgd_robust.sum() + 1


def test_a_chosen_subset_of_autoattack_runs_those_attacks_with_the_versions_settings(model, digits, standard_aa):
    x, y, _ = digits
    x, y = x[:24], y[:24]
    robust, _, broken = autoattack(model, x, y, EPS, seed=0, return_breakdown=True, attacks=["apgd-ce", "apgd-dlr"])
    assert list(broken) == ["apgd-ce", "apgd-dlr"]
    # APGD-CE first, exactly as in the standard version (same seed, one restart)
    assert broken["apgd-ce"] == standard_aa[2]["apgd-ce"]
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    assert int(clean.sum()) - int(robust.sum()) == sum(broken.values())
    with pytest.raises(ValueError, match="attacks must name some of apgd-ce.*got attacks=\\['pgd'\\]"):
        autoattack(model, x, y, EPS, attacks=["pgd"])


# ---------------------------------------------------------------- restarts, losses, eps = 0

@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_restarts_keep_the_worst_case_of_their_runs(model, digits, loss):
    x, y, _ = digits
    for seed in range(3):
        g = gen(seed)
        runs = [pgd(model, x, y, EPS, ALPHA, 4, loss=loss, generator=g) for _ in range(3)]
        best = pgd(model, x, y, EPS, ALPHA, 4, loss=loss, restarts=3, generator=gen(seed))
        # the expected choice, example by example: the first run that fools the model, else the highest loss
        with torch.no_grad():
            z = torch.stack([model(r) for r in runs])
        fooled = z.argmax(2) != y
        per_loss = torch.stack([F.cross_entropy(zi, y, reduction="none") if loss == "ce" else margin(zi, y)
                                for zi in z])
        pick = torch.where(fooled.any(0), fooled.float().argmax(0), per_loss.argmax(0))
        expected = torch.stack(runs)[pick, torch.arange(len(y))]
        assert torch.equal(best, expected), f"seed {seed}"
        single_fooled = fooled[0]
        best_fooled = model(best).argmax(1) != y
        assert not (single_fooled & ~best_fooled).any(), "a restart never undoes a success"
        assert accuracy(model, best, y) <= accuracy(model, runs[0], y)


def test_cw_loss_raises_the_margin_and_a_callable_loss_is_used_as_given(model, digits):
    x, y, _ = digits
    x_cw = pgd(model, x, y, EPS, ALPHA, 10, loss="cw", generator=gen())
    with torch.no_grad():
        assert margin(model(x_cw), y).mean() > margin(model(x), y).mean()
    assert accuracy(model, x_cw, y) < accuracy(model, x, y)
    assert distance(x_cw, x, "Linf").max() <= EPS + 1e-6
    assert torch.equal(pgd(model, x, y, EPS, ALPHA, 10, loss=margin, generator=gen()), x_cw)
    # a callable sees fp32 logits and any targets, e.g. a targeted attack towards class 0
    target = torch.zeros_like(y)
    x_t = pgd(model, x, target, EPS, ALPHA, 10, loss=lambda z, t: -F.cross_entropy(z, t, reduction="none"),
              generator=gen())
    with torch.no_grad():
        assert F.cross_entropy(model(x_t), target) < F.cross_entropy(model(x), target) - 0.5


def test_ce_loss_rises_and_robust_accuracy_falls(model, digits):
    x, y, _ = digits
    for norm, eps, alpha in (("Linf", EPS, ALPHA), ("L2", L2_EPS, 0.25)):
        x_adv = pgd(model, x, y, eps, alpha, 10, norm=norm, generator=gen())
        with torch.no_grad():
            before = F.cross_entropy(model(x), y, reduction="none")
            after = F.cross_entropy(model(x_adv), y, reduction="none")
        assert after.mean() > before.mean() and (after >= before - 1e-4).float().mean() > 0.95
        assert accuracy(model, x_adv, y) < accuracy(model, x, y)


@pytest.mark.parametrize("kwargs", [{}, {"norm": "L2"}, {"restarts": 3, "loss": "cw"}, {"precision": "bf16"}])
def test_eps_zero_returns_a_copy_of_x_without_calling_the_model(model, digits, kwargs):
    x, y, _ = digits
    rec = Recorder(model)
    for eps in (0, 0.0):
        out = pgd(rec, x, y, eps, ALPHA, 5, generator=gen(), **kwargs)
        assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    assert rec.seen == []


# ---------------------------------------------------------------- training flags

def mixed_flags_model(model: nn.Module) -> nn.Module:
    """Outer module training, the trained CNN in eval mode but one BatchNorm training, a Dropout training."""
    net = nn.Sequential(copy.deepcopy(model), nn.Dropout(0.5))
    net.train()
    net[0].eval()
    bns = [m for m in net[0].modules() if isinstance(m, nn.BatchNorm2d)]
    bns[1].train()
    return net


def flags(net: nn.Module) -> list[bool]:
    return [m.training for m in net.modules()]


def test_every_modules_training_flag_is_restored(model, digits):
    x, y, _ = digits
    net = mixed_flags_model(model)
    before = flags(net)
    assert any(before) and not all(before)
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    during = []
    hook = net.register_forward_pre_hook(lambda m, args: during.append(flags(net)))
    pgd(net, x, y, EPS, ALPHA, 3, restarts=2, generator=gen())
    assert during and all(not any(f) for f in during), "the attack runs the whole model in eval mode"
    assert flags(net) == before
    for k, v in net.state_dict().items():
        assert torch.equal(v, buffers[k]), f"{k} changed: BatchNorm statistics must not move during an attack"
    during.clear()
    pgd(net, x, y, EPS, ALPHA, 2, train_mode=True, generator=gen())
    assert during and all(all(f) for f in during)
    assert flags(net) == before
    hook.remove()
    # on an error inside the attack too
    with pytest.raises(ValueError, match="loss must return one value per example"):
        pgd(net, x, y, EPS, ALPHA, 2, loss=lambda z, t: z.sum(), generator=gen())
    assert flags(net) == before
    autoattack(net, x[:4], y[:4], 0.0)
    assert flags(net) == before
    with pytest.raises(ValueError, match="label 10"):
        autoattack(net, x[:4], torch.full((4,), 10), EPS)
    assert flags(net) == before


# ---------------------------------------------------------------- bad arguments

def _pgd_cases(x, y):
    nan_x = x.clone()
    nan_x[0, 0, 0, 0] = math.nan
    negative, too_big = y.clone(), y.clone()
    negative[3], too_big[5] = -1, 10
    return [
        ({"eps": 1.5}, r"eps must be in \[0, 1\] for Linf, got eps=1.5"),
        ({"eps": -0.1}, r"eps=-0.1"),
        ({"eps": math.nan}, r"eps=nan"),
        ({"eps": "0.1"}, r"eps='0.1'"),
        ({"eps": 9.0, "norm": "L2"}, r"eps must be in \[0, 8\] for L2, got eps=9.0"),
        ({"alpha": 0}, r"alpha \(the PGD step size\) must be > 0, got alpha=0"),
        ({"alpha": -0.01}, r"alpha=-0.01"),
        ({"alpha": math.nan}, r"alpha=nan"),
        ({"steps": 0}, r"steps must be an integer >= 1, got steps=0"),
        ({"steps": -2}, r"steps=-2"),
        ({"steps": 2.5}, r"steps=2.5"),
        ({"restarts": 0}, r"restarts must be an integer >= 1, got restarts=0"),
        ({"norm": "L1"}, r"norm='L1'"),
        ({"loss": "mse"}, r"loss='mse'"),
        ({"precision": "fp16"}, r"precision='fp16'"),
        ({"generator": 0}, r"generator=0"),
        ({"x": x + 0.5}, r"x must lie in \[0, 1\], got x.min\(\)=0.5, x.max\(\)=1.5"),
        ({"x": x - 0.5}, r"x.min\(\)=-0.5"),
        ({"x": nan_x}, r"x must lie in \[0, 1\].*nan"),
        ({"x": x[0]}, r"x.shape=\(1, 8, 8\)"),
        ({"x": (x * 255).to(torch.uint8)}, r"x.dtype=torch.uint8"),
        ({"y": y[:-1]}, r"y must hold one label per image of x \(64\), got y.shape=\(63,\)"),
        ({"y": y[:, None]}, r"y.shape=\(64, 1\)"),
        ({"y": y.float()}, r"y.dtype=torch.float32"),
        ({"y": negative}, r"y must hold class labels >= 0, got a label -1"),
        ({"y": too_big}, r"labels in \[0, 9\] for a model with 10 classes, got a label 10"),
    ]


def test_bad_pgd_arguments_raise_value_errors_naming_them(model, digits):
    x, y, _ = digits
    base = dict(eps=EPS, alpha=ALPHA, steps=2, generator=None)
    cases = _pgd_cases(x, y)
    for overrides, message in cases:
        kwargs = {**base, "x": x, "y": y, **overrides}
        with pytest.raises(ValueError, match=message):
            pgd(model, kwargs.pop("x"), kwargs.pop("y"), **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a generator on another device needs CUDA")
def test_a_generator_on_another_device_is_refused(model, digits):
    x, y, _ = digits
    with pytest.raises(ValueError, match=r"generator must live on the model's device \(cpu\), where the attack "
                                         r"runs, got generator.device=cuda"):
        pgd(model, x, y, EPS, ALPHA, 2, generator=torch.Generator(device="cuda"))


def test_bad_autoattack_arguments_raise_value_errors_naming_them(model, digits):
    x, y, _ = digits
    x, y = x[:8], y[:8]
    torch.manual_seed(0)
    three, two = build_model("cnn-tiny", 3, in_channels=1).eval(), build_model("cnn-tiny", 2, in_channels=1).eval()
    y3 = y % 2
    cases = [
        (model, {"eps": 1.5}, r"eps=1.5"),
        (model, {"eps": -0.1}, r"eps=-0.1"),
        (model, {"norm": "L1"}, r"norm='L1'"),
        (model, {"version": "bogus"}, r"version must be one of .*, got version='bogus'"),
        (model, {"seed": -1}, r"seed must be an integer >= 0, got seed=-1"),
        (model, {"batch_size": 0}, r"batch_size=0"),
        (model, {"device": "tpu"}, r"device='tpu'"),
        (model, {"x": x * 2}, r"x.max\(\)=2"),
        (model, {"y": y[:3]}, r"y.shape=\(3,\)"),
        (model, {"y": y.float()}, r"y.dtype=torch.float32"),
        (three, {"y": y3}, r"version='standard' needs at least 10 classes.*got a model with 3 classes"),
        (three, {"y": y3, "version": "plus"}, r"version='plus' needs at least 10 classes.*3 classes"),
        (two, {"y": y3, "version": "rand"}, r"version='rand' needs at least 3 classes.*got a model with 2 classes"),
        (three, {"y": y3 + 2, "version": "rand"}, r"labels in \[0, 2\] for a model with 3 classes, got a label 3"),
    ]
    for net, overrides, message in cases:
        kwargs = {"x": x, "y": y, "eps": EPS, **overrides}
        with pytest.raises(ValueError, match=message):
            autoattack(net, kwargs.pop("x"), kwargs.pop("y"), **kwargs)


def test_an_attack_added_to_a_record_gives_the_flags_it_gives_when_run_with_the_others(model, digits):
    from afs_kit.config import EvalConfig
    from afs_kit.eval.evaluation import evaluate, robustness_curve

    x, y, _ = digits
    x, y = x[:60], y[:60]
    cfg = EvalConfig(eps=EPS, attacks=("clean", "pgd10", "pgd20"))
    together = evaluate(model, x, y, cfg, device="cpu", progress=False)
    first = evaluate(model, x, y, dataclasses.replace(cfg, attacks=("pgd20",)), device="cpu", progress=False)
    added = evaluate(model, x, y, dataclasses.replace(cfg, attacks=("pgd10",)), device="cpu", progress=False,
                     record=first)
    assert added["metrics"]["attacks"] == ["clean", "pgd10", "pgd20"]
    for a in ("clean", "pgd10", "pgd20", "worst"):
        assert torch.equal(added["flags"][a], together["flags"][a]), a
    assert added["metrics"]["worst"] == together["metrics"]["worst"]
    # fig. 5a: budget 0 is the clean accuracy and the curve never rises
    curve = robustness_curve(model, x, y, [EPS, 0.0, 2 * EPS, EPS / 2], steps=10, device="cpu")
    acc = {c["eps"]: c["accuracy"] for c in curve}
    assert [c["eps"] for c in curve] == [EPS, 0.0, 2 * EPS, EPS / 2]
    assert acc[0.0] == together["metrics"]["clean"]
    assert acc[0.0] >= acc[EPS / 2] >= acc[EPS] >= acc[2 * EPS]
