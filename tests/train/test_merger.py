"""The merger's start, the weights it keeps and its floor (issue 23): each init gives exactly the logits it
promises before any step, standardized training folds back into one linear layer, the kept weights are the
best checked on validation images (the initial ones among them), and a merger below a member is flagged."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from conftest import quick_cnn

from afs_kit.config import MERGER_INITS, get_preset, override
from afs_kit.models.nets import build_model
from afs_kit.models.stack import FeatureStack, LinearMerger, LogitAverage
from afs_kit.studies.common import accuracy_row
from afs_kit.train.merger import merger_schedule, train_merger
from afs_kit.train.merger_choice import (ValidationSet, converged, floor_label, floor_verdict, initial_weights,
                                         objective_check)

SMOKE = get_preset("smoke")


@pytest.fixture(scope="module")
def members(digits, one_thread):
    """A trained cnn-tiny (about 97% clean) and an untrained one: two members that differ."""
    torch.manual_seed(1)
    return [quick_cnn(digits), build_model("cnn-tiny", 10, in_channels=1).eval()]


def _merger_with(stack: FeatureStack, init: str, losses=None) -> LinearMerger:
    weight, bias, _ = initial_weights(list(stack.extractors), 10, init, losses, generator_seed=3)
    merger = LinearMerger(stack.feature_dim, 10)
    with torch.no_grad():
        merger.linear.weight.copy_(weight)
        merger.linear.bias.copy_(bias)
    return merger


@pytest.mark.parametrize("init", MERGER_INITS)
def test_each_init_gives_the_logits_it_promises(init, members, digits):
    stack = FeatureStack(members)
    x = digits.x_test[:64].float() / 255
    torch.manual_seed(3)
    seeded = torch.nn.Linear(stack.feature_dim, 10)  # nn.Linear's own draw from the merger's seed
    with torch.no_grad():
        logits = _merger_with(stack, init, losses=[0.5, 2.3])(stack(x))
        promised = {
            "logit-average": LogitAverage(members)(x),
            "best-member": members[0](x),  # the member with the lower loss, zeros over the other's features
            "zero": torch.zeros(64, 10),
            "random": seeded(stack(x)),
        }[init]
    torch.testing.assert_close(logits, promised, rtol=1e-5, atol=1e-5)


def test_best_member_follows_the_losses_and_refuses_without_them(members):
    stack = FeatureStack(members)
    heads = [m.classifier for m in members]
    weight, bias, info = initial_weights(members, 10, "best-member", losses=[2.0, 0.7])
    assert info["member"] == 1
    d0 = members[0].feature_dim
    assert torch.equal(weight[:, :d0], torch.zeros(10, d0)) and torch.equal(weight[:, d0:], heads[1].weight)
    assert torch.equal(bias, heads[1].bias)
    with pytest.raises(ValueError, match="one validation loss per member"):
        initial_weights(members, 10, "best-member", losses=None)
    with pytest.raises(ValueError, match="merger.init='median'"):
        initial_weights(members, 10, "median")
    with pytest.raises(ValueError, match="merger.init='median'"):
        override(SMOKE, ["merger.init=median"])
    assert stack.feature_dim == d0 + members[1].feature_dim


def test_standardized_coordinates_fold_back_into_one_linear_layer(members, digits):
    stack = FeatureStack(members)
    x = digits.x_test[:32].float() / 255
    merger = _merger_with(stack, "logit-average")
    with torch.no_grad():
        before = merger(stack(x))
        feats = stack(x)
        merger.standardize(feats.mean(0), feats.std(0) + 0.5)
        torch.testing.assert_close(merger(stack(x)), before, rtol=1e-4, atol=1e-4)
        merger.fold()
        torch.testing.assert_close(merger(stack(x)), before, rtol=1e-4, atol=1e-4)
    assert set(merger.state_dict()) == {"linear.weight", "linear.bias"}, "a folded merger is one plain layer"


def test_training_that_only_hurts_keeps_the_initial_weights(members, digits):
    """A rate far beyond any stable step wrecks every epoch: the weights kept are the best member's own, the
    floor is met, and the curve of validation checks is in the result."""
    cfg = dataclasses.replace(SMOKE.merger, init="best-member", alpha=1.0, epochs=2, lr=1e4, momentum=0.0,
                              val_examples=60, precision="fp32")
    stack = FeatureStack(members)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the wrecked training is flagged unhealthy: expected
        model, history, choice = train_merger(stack, digits, cfg, SMOKE.data, None, device="cpu", progress=False,
                                              member_names=["good", "untrained"])
    assert choice["init"] == "best-member" and choice["member"] == "good"
    assert all(c["score"] < choice["checks"][0]["score"] for c in choice["checks"][1:]), choice["checks"]
    assert choice["kept_epoch"] == 0, choice["checks"]
    assert [c["epoch"] for c in choice["checks"]] == [0, 1, 2] and len(history) == 2
    x = digits.x_test[:64].float() / 255
    with torch.no_grad():
        torch.testing.assert_close(model(x), members[0](x), rtol=1e-5, atol=1e-5)
    assert choice["floor"]["met"] and choice["kept_score"] == pytest.approx(choice["members"]["good"]["score"])
    assert choice["floor"]["n"] == 60


def test_a_healthy_merger_starts_at_a_member_and_never_ends_below_its_start(digits, one_thread):
    """The smoke stack: the kept weights score at least the initial ones on the validation images."""
    torch.manual_seed(0)
    members = [quick_cnn(digits), quick_cnn(digits)]
    cfg = dataclasses.replace(SMOKE.merger, alpha=0.5, val_examples=80)
    model, _, choice = train_merger(FeatureStack(members), digits, cfg, SMOKE.data, None, device="cpu",
                                    progress=False, member_names=["a", "b"])
    assert choice["kept_score"] >= choice["checks"][0]["score"]
    assert choice["kept_score"] == max(c["score"] for c in choice["checks"])
    val = ValidationSet(digits, SMOKE.data, cfg, "cpu")
    assert objective_check(model, val, cfg)["score"] == pytest.approx(choice["kept_score"])


def test_the_floor_names_the_member_a_merger_falls_below():
    n = 200
    good = torch.ones(n, dtype=torch.bool)
    poor = torch.arange(n) % 4 == 0  # 25%
    merger = {"score": 25.0, "flags": {"clean": good, "robust": poor}}
    strong = {"score": 100.0, "flags": {"clean": good, "robust": good}}
    level = {"score": 25.0, "flags": {"clean": good, "robust": poor}}
    verdict = floor_verdict(merger, {"8/255": strong, "0": level}, alpha=0.0)
    assert not verdict["met"] and verdict["below"] == ["8/255"]
    assert "below the floor: 8/255 scores 100.0" in verdict["text"]
    assert floor_label(verdict) == "BELOW 8/255"
    assert floor_verdict(merger, {"0": level}, alpha=0.0)["met"]
    # at alpha = 0.5 a trade-off is not a fall: 20 points less clean for 20 more robust scores level
    tradeoff = {"score": 50.0, "flags": {"clean": torch.arange(n) % 10 < 6, "robust": torch.arange(n) % 10 < 4}}
    other = {"score": 50.0, "flags": {"clean": torch.arange(n) % 10 < 8, "robust": torch.arange(n) % 10 < 2}}
    assert floor_verdict(tradeoff, {"other": other}, alpha=0.5)["met"]
    assert not floor_verdict(tradeoff, {"other": other}, alpha=1.0)["met"], "on clean alone it is 20 points below"
    # a merger row in a table says so; models that are not mergers have no floor
    row = accuracy_row({"ci95": {}, "model": {"kind": "merger", "floor": verdict}}, ())
    assert row["floor"] == "BELOW 8/255"
    assert accuracy_row({"ci95": {}, "model": {"kind": "extractor"}}, ())["floor"] == "-"


def test_converged_means_three_checks_within_half_a_point():
    assert converged([10.0, 30.0, 30.2, 30.4])
    assert not converged([10.0, 30.0, 30.6])
    assert not converged([30.0, 30.1]), "fewer than three checks cannot show convergence"


def test_a_step_budget_stretches_epochs_and_the_drop_alike():
    cfg = dataclasses.replace(SMOKE.merger, epochs=2, lr_drop_epoch=1, min_steps=100)
    assert merger_schedule(cfg, batches_per_epoch=14) == (8, 4), "28 steps -> 4 times as many: 112 >= 100"
    assert merger_schedule(dataclasses.replace(cfg, min_steps=0), 14) == (2, 1)
    assert merger_schedule(dataclasses.replace(cfg, min_steps=28), 14) == (2, 1), "enough steps already"
    with pytest.raises(ValueError, match="merger.min_steps"):
        override(SMOKE, ["merger.min_steps=-1"])
