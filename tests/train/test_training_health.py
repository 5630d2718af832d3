"""Training health (final loss vs chance, a rising last epoch), the attack_bn field, and a merger step
size that does not depend on the scale of the stacked features."""
from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn as nn

from afs_kit.config import PRESETS, get_preset, override, validate_preset
from afs_kit.data.batches import to_float
from afs_kit.models.nets import build_model
from afs_kit.models.stack import FeatureStack
from afs_kit.train.extractors import check_extractor_config, step_passes, train_extractor, training_loss
from afs_kit.train.merger import feature_sq_norm, merger_checkpoint, train_merger
from afs_kit.train.progress import training_health

K = 10


def _history(*losses):
    return [{"epoch": i, "train_loss": v} for i, v in enumerate(losses)]


# ---------------------------------------------------------------- the verdict

def test_a_falling_loss_below_chance_passes():
    h = training_health(_history(2.1, 1.6, 1.2), K)
    assert h["passed"] and not h["above_chance"] and not h["rising"]
    assert h["chance"] == pytest.approx(math.log(K))
    assert h["final_loss"] == pytest.approx(1.2) and h["last_losses"] == pytest.approx([2.1, 1.6, 1.2])


def test_a_rising_loss_is_flagged():
    # the cifar10-mini merger that did not train: 3.01, 4.59, 4.77
    h = training_health(_history(1.0, 1.1, 1.2), K)
    assert not h["passed"] and h["rising"] and not h["above_chance"]
    # 5% is the tolerance: a 4% rise passes, a 6% one does not
    assert training_health(_history(1.5, 1.0, 1.04), K)["passed"]
    assert training_health(_history(1.5, 1.0, 1.06), K)["rising"]
    # near zero loss a relative rise is noise: a well-fit network going 0.009 -> 0.011 is healthy
    assert training_health(_history(0.02, 0.009, 0.011), K)["passed"]


def test_a_loss_above_chance_is_flagged():
    h = training_health(_history(3.0, 2.9, 2.8), K)
    assert not h["passed"] and h["above_chance"] and not h["rising"]
    assert training_health(_history(0.8), 2)["above_chance"], "chance is ln K: ln 2 = 0.69 for two classes"
    assert training_health(_history(0.6), 2)["passed"]
    nan = training_health(_history(1.0, float("nan")), K)
    assert not nan["passed"] and nan["above_chance"]


def test_training_health_refuses_what_it_cannot_judge():
    with pytest.raises(ValueError, match="empty history"):
        training_health([], K)
    with pytest.raises(ValueError, match="train_loss"):
        training_health([{"epoch": 0}], K)
    with pytest.raises(ValueError, match="num_classes"):
        training_health(_history(1.0), 1)


# ---------------------------------------------------------------- checkpoints carry it

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread, digits):
    """Two smoke extractors (eps 0 and 0.1) and a merger over them, trained as the smoke preset says."""
    preset = get_preset("smoke")
    root = tmp_path_factory.mktemp("health")
    ckpts = [train_extractor(dataclasses.replace(preset.extractor, eps=eps), digits, preset.data, root / f"e{i}",
                             device="cpu", progress=False) for i, eps in enumerate((0.0, 0.1))]
    from afs_kit.models.nets import model_from_checkpoint
    extractors = [model_from_checkpoint(c) for c in ckpts]
    # from nn.Linear's random draw: these tests are about the step size, which a member's head as the start hides
    preset = dataclasses.replace(preset, merger=dataclasses.replace(preset.merger, init="random"))
    model, history, choice = train_merger(FeatureStack(extractors), digits, preset.merger, preset.data, root / "m",
                                          "k", device="cpu", progress=False)
    merger = merger_checkpoint(model, preset.merger, "k", ["e0", "e1"], [c["key"] for c in ckpts],
                               {"num_classes": digits.num_classes}, history, choice)
    return preset, ckpts, extractors, merger


def test_extractor_and_merger_checkpoints_carry_health(tiny, digits):
    _, ckpts, _, merger = tiny
    for ckpt in [*ckpts, merger]:
        h = ckpt["health"]
        assert h == training_health(ckpt["history"], digits.num_classes)
        assert set(h) >= {"passed", "final_loss", "chance", "above_chance", "rising", "last_losses"}
        assert h["final_loss"] == ckpt["history"][-1]["train_loss"]
        assert h["passed"], f"the smoke preset trains healthily: {h}"


def test_an_unhealthy_extractor_warns(tmp_path, digits, one_thread):
    preset = get_preset("smoke")
    # a learning rate far beyond any stable step: the loss ends above chance
    cfg = dataclasses.replace(preset.extractor, eps=0.0, epochs=2, lr=1e4, momentum=0.0, precision="fp32")
    with pytest.warns(RuntimeWarning, match="unhealthy"):
        ckpt = train_extractor(cfg, digits, preset.data, tmp_path, device="cpu", progress=False)
    assert not ckpt["health"]["passed"]


# ---------------------------------------------------------------- the merger's step size

class _Scaled(nn.Module):
    """An extractor whose features are `scale` times larger: the same information, another unit."""

    def __init__(self, inner: nn.Module, scale: float):
        super().__init__()
        self.inner, self.scale, self.feature_dim = inner, scale, inner.feature_dim

    def features(self, x):
        return self.scale * self.inner.features(x)

    def forward(self, x):  # the member's own logits (the merger's floor checks every member)
        return self.inner(x)


def test_the_merger_step_follows_the_feature_scale(tiny, digits):
    preset, _, extractors, merger = tiny
    assert preset.merger.normalize_lr, "every preset divides the merger's rate by E||f||^2"
    first = merger["history"][0]
    assert first["lr"] == pytest.approx(preset.merger.lr / first["feature_sq_norm"])
    x = digits.x_train[:300]
    small_sq = feature_sq_norm(FeatureStack(extractors), x, "fp32", "cpu")
    cfg = dataclasses.replace(preset.merger, epochs=2)
    # stacking 4 copies of each extractor multiplies E||f||^2 by 4 (as stacking more extractors does) and
    # leaves what a linear merger can learn unchanged: the normalized step follows, and the loss curve with it
    many = FeatureStack(extractors * 4)
    assert feature_sq_norm(many, x, "fp32", "cpu") == pytest.approx(4 * small_sq, rel=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a healthy merger does not warn
        warnings.filterwarnings("ignore", "training in bf16 on a CPU without")  # a note on the machine, not the merger
        _, history, _ = train_merger(many, digits, cfg, preset.data, None, device="cpu", progress=False)
    assert history[0]["lr"] == pytest.approx(first["lr"] / 4, rel=0.01)
    assert training_health(history, digits.num_classes)["passed"], history
    for a, b in zip(history, merger["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=0.15)
    # features 30 times larger (900 times E||f||^2) under the raw rate that was this very step: it
    # diverges, and training health says so
    big = FeatureStack([_Scaled(m, 30.0) for m in extractors])
    assert feature_sq_norm(big, x, "fp32", "cpu") == pytest.approx(900 * small_sq, rel=1e-4)
    raw_cfg = dataclasses.replace(cfg, normalize_lr=False, lr=first["lr"])
    with pytest.warns(RuntimeWarning, match="merger alpha=0.5 looks unhealthy"):
        _, raw, _ = train_merger(big, digits, raw_cfg, preset.data, None, device="cpu", progress=False)
    assert not training_health(raw, digits.num_classes)["passed"], raw


# ---------------------------------------------------------------- attack_bn

def test_attack_bn_is_validated():
    smoke = get_preset("smoke")
    assert smoke.extractor.attack_bn == "train"
    assert override(smoke, ["extractor.attack_bn=eval"]).extractor.attack_bn == "eval"
    with pytest.raises(ValueError, match=r"extractor\.attack_bn='batch'"):
        override(smoke, ["extractor.attack_bn=batch"])
    with pytest.raises(ValueError, match="attack_bn='batch'"):
        check_extractor_config(dataclasses.replace(smoke.extractor, attack_bn="batch"))


def test_every_preset_crafts_training_attacks_as_the_authors():
    for preset in PRESETS.values():
        validate_preset(preset)
        assert preset.extractor.attack_bn == "train", preset.name


@pytest.mark.parametrize("trainer", ["pgd", "fgsm", "trades"])
def test_attack_bn_decides_whether_the_attack_moves_batchnorm_statistics(trainer, digits):
    """train: batch statistics, and each forward pass of the attack updates the running statistics (as the
    authors' code); eval: running statistics, untouched by the attack."""
    cfg = dataclasses.replace(get_preset("smoke").extractor, trainer=trainer, eps=0.2, attack_steps=3,
                              precision="fp32")
    x, y = to_float(digits.x_train[:64]), digits.y_train[:64]
    steps = 1 if trainer == "fgsm" else cfg.attack_steps
    # TRADES also makes its clean prediction in the attack's mode, and its loss in training mode
    extra = {"trades": (1, 0), "pgd": (0, 0), "fgsm": (0, 0)}[trainer]
    after = {}
    for mode in ("train", "eval"):
        torch.manual_seed(0)
        model = build_model("cnn-tiny", 10, in_channels=1)
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        model.eval()  # so that only the attack (and TRADES' own train-mode loss) can run BatchNorm in train mode
        gen = torch.Generator().manual_seed(0)
        loss = training_loss(model, x, y, cfg.eps, dataclasses.replace(cfg, attack_bn=mode), "cpu", gen)
        assert torch.isfinite(loss)
        tracked = int(bns[0].num_batches_tracked)
        if mode == "train":
            assert tracked == steps + extra[0] + (1 if trainer == "trades" else 0)
        else:
            assert tracked == (1 if trainer == "trades" else 0)
        after[mode] = bns[0].running_mean.clone()
    assert not torch.equal(after["train"], after["eval"])
    if trainer != "trades":
        assert torch.equal(after["eval"], torch.zeros_like(after["eval"])), "eval mode leaves the statistics alone"


@pytest.mark.parametrize("trainer,eps", [("pgd", 0.0), ("fgsm", 0.2), ("pgd", 0.2), ("trades", 0.2)])
def test_step_passes_counts_a_training_steps_forward_passes(trainer, eps, digits):
    """What the time-left estimate weighs each network by: the images one training step sends through the
    network, in batches."""
    cfg = dataclasses.replace(get_preset("smoke").extractor, trainer=trainer, attack_steps=3, precision="fp32")
    x, y = to_float(digits.x_train[:32]), digits.y_train[:32]
    model = build_model("cnn-tiny", 10, in_channels=1).train()
    seen = []
    model.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].shape[0]))
    training_loss(model, x, y, eps, cfg, "cpu", torch.Generator().manual_seed(0)).backward()
    assert sum(seen) / len(x) == step_passes(cfg, eps)


def test_the_cyclic_rate_rises_to_its_peak_at_two_fifths_and_falls_to_zero():
    """Wong et al.'s one cycle, moved every batch: 0 -> lr over the first 2/5 of the steps -> 0."""
    from afs_kit.config import ExtractorConfig
    from afs_kit.train.extractors import learning_rate_schedule

    cfg = ExtractorConfig(lr=0.2, epochs=5, lr_schedule="cyclic")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    schedule = learning_rate_schedule(opt, cfg, batches_per_epoch=10)
    rates = []
    for _ in range(50):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert max(rates) == pytest.approx(0.2) and rates.index(max(rates)) == 19
    assert all(a < b for a, b in zip(rates[:20], rates[1:20])) and all(a > b for a, b in zip(rates[19:], rates[20:]))
    assert 0 < rates[0] <= 0.2 / 20 + 1e-12 and rates[-1] <= 0.2 / 30 + 1e-12
    step = learning_rate_schedule(opt, ExtractorConfig(lr=0.2, lr_milestones=(2,)), 10)
    assert isinstance(step, torch.optim.lr_scheduler.MultiStepLR)
