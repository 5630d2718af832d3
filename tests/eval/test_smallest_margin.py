"""The smallest-margin attack: per example the adversarial point that came closest to an error across every attack
the masking checks run (MixedNUTS's adaptive AutoAttack keeps the minimum-margin example), and PGD from there."""
import torch
from conftest import quick_cnn

from afs_kit.attacks.methods import cw_margin, pgd
from afs_kit.eval.flags import correct_flags
from afs_kit.eval.masking import (SmallestMargin, attacks_joining_worst, crafted_flags, smallest_margin_flags,
                                  stronger_pgd_flags)


def _pgd_cw(net, x, y, eps, steps, seed):
    """Crafts PGD-`steps` on the CW margin, step eps/8, from a random start drawn from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return lambda b: pgd(net, x[b], y[b], eps, eps / 8, steps, loss="cw", generator=gen)


def test_each_example_keeps_the_point_of_largest_margin_and_the_attack_that_made_it(digits, one_thread):
    net = quick_cnn(digits)
    x, y = digits.x_test[:60].float() / 255, digits.y_test[:60]
    keep = SmallestMargin(net, x, y, batch_size=25)
    idx = torch.arange(0, 60, 2)  # every other example
    noise = (x[idx] + 0.05 * torch.randn(x[idx].shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    attacked = pgd(net, x, y, 0.1, 0.025, 5, loss="cw")
    keep.offer("noise", idx, noise)
    keep.offer("PGD-5", torch.arange(60), attacked)
    with torch.no_grad():
        # the margin z_y - max_{j != y} z_j is minus the CW loss
        candidates = -torch.stack([cw_margin(net(x), y), torch.full((60,), -float("inf")), cw_margin(net(attacked), y)])
        candidates[1, idx] = -cw_margin(net(noise), y[idx])
    best, source = candidates.min(0)
    torch.testing.assert_close(keep.margin, best)
    assert keep.names == ["clean", "noise", "PGD-5"] and torch.equal(keep.source, source)
    assert torch.equal(keep.point[source == 2], attacked[source == 2])
    assert torch.equal(keep.point[source == 0], x[source == 0])
    clean = correct_flags(net, x, y)
    counts = keep.chosen_from(clean)
    assert sum(counts.values()) == int(clean.sum()) and counts["PGD-5"] > counts["noise"]


def test_going_on_from_the_closest_point_breaks_more_than_a_restart_of_the_same_attack(digits, one_thread):
    # PGD-2 with a step of eps/8 stops short of many errors; another random restart finds a few of them, PGD-2 from
    # each example's closest point (where the first run stopped) goes on and finds more
    net = quick_cnn(digits)
    x, y, eps = digits.x_test[:200].float() / 255, digits.y_test[:200], 0.1
    clean = correct_flags(net, x, y)
    keep = SmallestMargin(net, x, y)
    first = crafted_flags(net, x, y, clean, _pgd_cw(net, x, y, eps, 2, seed=0), keep=keep, name="PGD-2")
    restart = first & crafted_flags(net, x, y, clean, _pgd_cw(net, x, y, eps, 2, seed=1))
    left = first & keep.margin.gt(0)
    assert torch.equal(left, first), "an example still standing has no point of negative margin"
    closest = smallest_margin_flags(net, x, y, eps, eps / 8, 2, keep, left)
    assert not (closest & ~first).any(), "the smallest-margin attack runs only on what the others left standing"
    assert int((first & ~closest).sum()) > int((first & ~restart).sum()) > 0


def test_a_failed_smallest_margin_check_joins_worst_on_every_example_left_standing(digits, one_thread):
    net = quick_cnn(digits)
    x, y, eps = digits.x_test[:80].float() / 255, digits.y_test[:80], 0.1
    standing = correct_flags(net, x, y)
    standing[::3] = False  # as if other attacks had broken these
    checks = {"checks": {"converged": {"passed": True, "steps": 10, "restarts": 1},
                         "smallest_margin_not_stronger": {"passed": False, "steps": 2}}}
    joined = attacks_joining_worst(net, x, y, eps, eps / 4, checks, standing, torch.Generator().manual_seed(0),
                                   batch_size=40)
    assert list(joined) == ["smallest margin"], "a passed converged check adds no pgd50, only its points"
    flags = joined["smallest margin"]
    assert not (flags & ~standing).any()
    # at least as strong as the converged check's attack it went on from (same generator state)
    converged = stronger_pgd_flags(net, x, y, eps, 10, 40, generator=torch.Generator().manual_seed(0),
                                   robust=standing, restarts=1)
    assert not (flags & ~converged).any()
    checks["checks"]["smallest_margin_not_stronger"]["passed"] = True
    assert attacks_joining_worst(net, x, y, eps, eps / 4, checks, standing, torch.Generator()) == {}
