"""The passes an evaluation's attacks need, counted from their settings, and the estimate built on them."""
import pytest
import torch

from afs_kit.config import EvalConfig
from afs_kit.core.checks import duration
from afs_kit.eval.estimate import aa_passes, attack_passes, estimate, masking_passes
from afs_kit.models.nets import build_model


def test_passes_follow_the_attacks_settings():
    cfg = EvalConfig()
    assert attack_passes("clean", cfg, 10)[("forward")] == 1
    assert (attack_passes("pgd10", cfg, 10)["forward"], attack_passes("pgd10", cfg, 10)["backward"]) == (11, 10)
    # the standard version: APGD-CE, then 9 targets each for APGD-T and FAB-T, then Square's 5,000 queries
    standard = attack_passes("aa", cfg, 10)
    assert standard["backward"] == 100 + 9 * 100 + 9 * 100 and standard["forward"] >= 5000
    custom = attack_passes("aa", EvalConfig(aa_attacks=("apgd-ce", "apgd-dlr")), 10)
    assert (custom["forward"], custom["backward"]) == (202, 200)
    assert aa_passes("apgd-t", 3) == (2 * 101, 2 * 100), "fewer classes than targets: one target per other class"
    # the converged check: 5x the strongest PGD's steps, 2 restarts, CE and CW
    assert masking_passes(cfg)["fallback"] == 5 * 20 * 2 * 2
    assert masking_passes(EvalConfig(attacks=("clean", "pgd10")))["fallback"] == 5 * 10 * 2 * 2
    assert masking_passes(EvalConfig(sanity_examples=50))["examples"] == 50
    # the demo's light checks: one restart of the converged check's PGD, 100 examples, Square's 200 queries
    light = masking_passes(EvalConfig(sanity_strength="light"))
    assert light["fallback"] == 5 * 20 * 1 * 2 and light["examples"] == 100
    assert light["forward"] - light["backward"] == masking_passes(cfg)["forward"] - masking_passes(cfg)["backward"] - 800


def test_the_estimate_grows_with_the_examples_and_ends_with_one_line():
    torch.manual_seed(0)
    model = build_model("cnn-tiny", num_classes=10, in_channels=1).eval()
    x = torch.rand(16, 1, 8, 8)
    cfg = EvalConfig(attacks=("clean", "pgd10"))
    small, large = (estimate(model, x, cfg, n, sanity=False, num_classes=10) for n in (100, 10_000))
    assert large["seconds"] > small["seconds"] > 0
    assert large["lines"][-1].startswith("estimated wall time: ") and "pgd10: 11 forward" in large["lines"][1]
    checked = estimate(model, x, cfg, 100, sanity=True, num_classes=10)
    assert checked["seconds_if_fallback"] > checked["seconds"] > small["seconds"] * 0.5


@pytest.mark.parametrize("seconds, text", [(0.2, "under 1 s"), (20, "20 s"), (45, "45 s"), (750, "12.5 min"),
                                           (11520, "3.2 h")])
def test_times_read_as_people_say_them(seconds, text):
    assert duration(seconds) == text
