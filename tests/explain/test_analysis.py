"""Delta-z, the selection rule, t-SNE, the merger's weights, parameter/MAC counts, the quoted tables."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from afs_kit.attacks.methods import pgd
from afs_kit.data.batches import iterate_batches, to_float
from afs_kit.explain.analysis import importance_ratio, model_cost, trustworthiness_score, tsne_embedding, weight_stats
from afs_kit.explain.paper import (PAPER_SELECTED_EPS, TABLE1_EXTRACTORS, TABLE4_CIFAR10, TABLE5_CIFAR100,
                                   TABLE6_ABLATION)
from afs_kit.explain.selection import check_eq10, delta_z, delta_z_curve, select_extractors
from afs_kit.models.nets import build_model

PAPER_GRID = [k / 255 for k in range(10)]


# ------------------------------------------------------------------------ Delta-z on real models

@pytest.fixture(scope="module")
def digits_x(digits):
    return to_float(digits.x_test[:64])


@pytest.fixture(scope="module")
def standard_and_robust(digits):
    return _train_tiny(digits, 0.0), _train_tiny(digits, 0.15)


@pytest.fixture(scope="module")
def trained_digits_model(standard_and_robust):
    """The standard (eps = 0) cnn-tiny: Delta-z is largest, and so easiest to check, on it."""
    return standard_and_robust[0]


def test_delta_z_zero_at_zero_and_grows_with_budget(trained_digits_model, digits_x):
    model = trained_digits_model
    was_training = model.training
    mean, std = delta_z_curve([model], digits_x, [0.0, 0.02, 0.05, 0.1, 0.2], steps=10, seed=0, reduce="mean_std")
    assert mean.shape == std.shape == (1, 5)
    assert mean[0, 0] == 0 and std[0, 0] == 0  # exactly zero at Delta = 0
    assert np.all(np.diff(mean[0]) > 0), mean
    assert model.training == was_training
    full = delta_z_curve([model], digits_x, [0.0, 0.1], steps=10, seed=0)
    assert full.shape == (1, 2, 64) and np.all(full >= 0)
    # seeded: the same seed gives the same numbers
    np.testing.assert_array_equal(full[0, 1], delta_z_curve([model], digits_x, [0.1], steps=10, seed=0)[0, 0])


def test_delta_z_attack_beats_random_noise_and_respects_p(trained_digits_model, digits_x):
    model, Delta = trained_digits_model, 0.1
    gen = torch.Generator().manual_seed(0)
    dz = delta_z(model, digits_x, Delta, steps=10, generator=gen)
    was_training = model.training
    model.eval()  # the session fixture is shared: its mode is put back below
    with torch.no_grad():
        z0 = model(digits_x)
        noise = (digits_x + torch.empty_like(digits_x).uniform_(-Delta, Delta, generator=gen)).clamp(0, 1)
        random_change = torch.linalg.vector_norm(model(noise) - z0, ord=math.inf, dim=1)
    model.train(was_training)
    # the maximizer of eq. 8 finds larger logit changes than random points of the same ball
    assert dz.mean() > 1.5 * random_change.mean()
    assert (dz >= random_change * 0.999).float().mean() > 0.9
    # L2 attack, p defaults to 2; an explicit p=2 is the same computation
    dz2 = delta_z(model, digits_x, 1.0, norm="L2", steps=5, generator=torch.Generator().manual_seed(1))
    dz2b = delta_z(model, digits_x, 1.0, norm="L2", p=2, steps=5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(dz2, dz2b)
    assert torch.all(dz2 > 0)


def _train_tiny(digits, adv_eps: float, epochs: int = 12, seed: int = 0):
    """cnn-tiny on digits, standard (adv_eps = 0) or PGD-AT (Madry) at adv_eps; a few seconds on CPU."""
    torch.manual_seed(seed)
    model = build_model("cnn-tiny", num_classes=10, in_channels=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x_all, y_all = to_float(digits.x_train), digits.y_train
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in iterate_batches(len(y_all), 128, shuffle=True, generator=gen):
            x, y = x_all[idx], y_all[idx]
            if adv_eps > 0:
                x = pgd(model, x, y, eps=adv_eps, alpha=adv_eps / 4, steps=7, generator=gen)
            model.train()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()




def test_robust_extractor_has_smaller_delta_z(standard_and_robust, digits):
    standard, robust = standard_and_robust
    x, y = to_float(digits.x_test[:200]), digits.y_test[:200]
    with torch.no_grad():
        assert (standard(x).argmax(1) == y).float().mean() > 0.85  # both actually learned digits
        assert (robust(x).argmax(1) == y).float().mean() > 0.6
    mean, _ = delta_z_curve([standard, robust], x, [0.15], steps=10, seed=0, reduce="mean_std")
    assert mean[1, 0] < mean[0, 0], mean
    # and the robust one is indeed more robust (what the smaller logit change is meant to predict)
    accs = []
    for m in (standard, robust):
        x_adv = pgd(m, x, y, eps=0.15, alpha=0.15 / 4, steps=10, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            accs.append((m(x_adv).argmax(1) == y).float().mean().item())
    assert accs[1] > accs[0]


def test_delta_z_bad_inputs(trained_digits_model, digits_x):
    with pytest.raises(ValueError, match=r"Delta.*Delta=-0\.1"):
        delta_z(trained_digits_model, digits_x, -0.1)
    with pytest.raises(ValueError, match=r"norm=.L1."):
        delta_z(trained_digits_model, digits_x, 0.1, norm="L1")
    with pytest.raises(ValueError, match=r"p=0\.5"):
        delta_z(trained_digits_model, digits_x, 0.1, p=0.5)
    with pytest.raises(ValueError, match=r"reduce='median'"):
        delta_z_curve([trained_digits_model], digits_x, [0.1], reduce="median")


# ------------------------------------------------------------------------ the selection rule

def _paper_like_curve() -> np.ndarray:
    """Delta_z decreasing in the budget, convex up to 2/255 (slopes flatten), concave from 3/255 on."""
    slopes = [-0.9, -0.5, -0.2, -0.25, -0.3, -0.35, -0.4, -0.45, -0.5]
    return np.concatenate([[6.0], 6.0 + np.cumsum(slopes)])


def _standardized_noise(n: int, seed: int = 0) -> np.ndarray:
    """n numbers with mean exactly 0 and sample std (ddof=1) exactly 1."""
    xi = np.random.default_rng(seed).normal(size=n)
    xi -= xi.mean()
    return xi / xi.std(ddof=1)


def _concave_flags_ok(sel, lo: int, hi: int) -> bool:
    return all(sel.concave[k] for k in range(lo + 1, hi))


def test_selection_worked_example_of_the_docstring():
    sel = select_extractors([0, 2, 4, 6, 8], [5.0, 3.0, 2.6, 2.0, 1.2], Delta=8)
    assert sel.selected == [2.0, 4.0, 6.0, 8.0] and sel.chosen_range == (2.0, 8.0) and sel.eval_budget == 8.0
    np.testing.assert_allclose(sel.second_difference[1:-1], [0.4, -0.05, -0.05])
    assert sel.second_difference[0] is None and sel.second_difference[-1] is None
    assert sel.concave == [None, False, True, True, None]
    assert sel.reasons[0].startswith("out: a range reaching it would have 2 inside, where Delta-z is convex")
    assert sel.reasons[1].startswith("in: an end of the chosen range")
    assert sel.reasons[2].startswith("in: concave (d2=")
    assert sel.reasons[4].startswith("in (evaluation budget)")
    assert [r["selected"] for r in sel.as_rows()] == [False, True, True, True, True]
    # per example: SE 0.1 at 2/255 keeps 0.4 clearly convex; SE 0.25 makes it noise (0.4 <= 2 * 0.25)
    mean = np.array([5.0, 3.0, 2.6, 2.0, 1.2])
    n = 25
    for se, expected in ((0.1, [2.0, 4.0, 6.0, 8.0]), (0.25, [0.0, 2.0, 4.0, 6.0, 8.0])):
        values = np.repeat(mean[:, None], n, axis=1)
        values[1] += 2 * se * math.sqrt(n) * _standardized_noise(n)  # d2 at 2 per example: (v0 - 2 v1 + v2) / 4
        sel = select_extractors([0, 2, 4, 6, 8], values, Delta=8)
        assert sel.second_difference_se[1] == pytest.approx(se)
        assert sel.selected == expected and sel.n_examples == n


def test_selection_picks_the_endpoints_when_concave_everywhere():
    eps = np.array([0, 1, 2, 4, 5, 8, 9]) / 255  # uneven spacing
    curve = 3.0 - 50 * eps ** 2
    sel = select_extractors(eps, curve, Delta=8 / 255)
    np.testing.assert_allclose(sel.selected, eps)  # the smallest and the largest budget included
    assert all(sel.concave[1:-1]) and sel.chosen_range == (0.0, pytest.approx(9 / 255))
    # the same with per-example values (noise around the curve)
    values = curve[:, None] + 0.01 * np.random.default_rng(0).normal(size=(len(eps), 40))
    np.testing.assert_allclose(select_extractors(eps, values, Delta=8 / 255).selected, eps)
    # convex everywhere: only the evaluation budget and one neighbour (no interior budget at all)
    sel = select_extractors(eps, np.exp(-eps * 10), Delta=8 / 255)
    assert len(sel.selected) == 2 and 8 / 255 in sel.selected
    assert not any(sel.concave[1:-1])


def test_selection_excludes_a_convex_kink_outside_the_evaluation_budgets_range():
    # the paper's fig. 3 shape: convex at 1/255 and 2/255, concave from 3/255 on; evaluated at 8/255
    sel = select_extractors(PAPER_GRID, _paper_like_curve(), Delta=8 / 255)
    np.testing.assert_allclose(sel.selected, PAPER_GRID[2:])  # 2/255 is an end: its own d2 is not needed
    assert sel.second_difference[1] > 0 and sel.second_difference[2] > 0 and sel.second_difference[3] <= 0
    assert sel.concave[1:3] == [False, False] and all(sel.concave[3:9])
    assert sel.reasons[0].startswith("out: a range reaching it would have 2/255 inside")
    assert sel.reasons[1].startswith("out: a range reaching it would have 2/255 inside")
    assert sel.reasons[8].startswith("in (evaluation budget): concave")
    # the paper's own choice is 3/255..8/255: this rule keeps the ends 2/255 and 9/255 as well
    assert set(np.round(np.array(PAPER_SELECTED_EPS) * 255)) < set(np.round(np.array(sel.selected) * 255))
    # a convex kink above the evaluation budget: everything up to it, nothing beyond
    curve = 3.0 - 50 * np.array(PAPER_GRID) ** 2
    curve[8] -= 0.1  # d2 > 0 at 8/255, < 0 at 7/255 and 9/255
    sel = select_extractors(PAPER_GRID, curve, Delta=3 / 255)
    np.testing.assert_allclose(sel.selected, PAPER_GRID[:9])
    assert sel.reasons[9].startswith("out: a range reaching it would have 8/255 inside")


def test_selection_noise_within_two_standard_errors_is_not_convexity():
    eps = [0.0, 1.0, 2.0, 3.0, 4.0]
    mean = np.array([4.0, 3.0, 2.1, 1.1, 0.0])  # d2 = +0.1 at 1, -0.1 at 2 and 3
    n = 20
    xi = _standardized_noise(n)
    for s, concave_at_1 in ((0.5, True), (0.01, False)):
        values = np.repeat(mean[:, None], n, axis=1)
        values[1] += s * xi  # per example d2 at 1 is 0.1 - 2 s xi: SE = 2 s / sqrt(n)
        sel = select_extractors(eps, values, Delta=4.0)
        assert sel.second_difference[1] == pytest.approx(0.1)
        assert sel.second_difference_se[1] == pytest.approx(2 * s / math.sqrt(n))
        assert sel.concave[1] is concave_at_1
        assert sel.selected == (eps if concave_at_1 else eps[1:])
    # z sets how many standard errors: at s = 0.5, 2 SE = 0.447 absorbs 0.1 but 0.1 SE does not
    assert select_extractors(eps, values, Delta=4.0, z=0.0).selected == eps[1:]
    # the differences are paired: a large per-example offset, the same at every budget, changes nothing
    offset = 100 * np.random.default_rng(1).normal(size=n)
    paired = select_extractors(eps, values + offset, Delta=4.0)
    np.testing.assert_allclose(paired.second_difference_se[1:-1], sel.second_difference_se[1:-1], atol=1e-9)
    assert paired.selected == sel.selected and max(paired.std) > 50
    # 1-D means: SE = 0, the rule as stated (tol absorbs a known small convexity)
    assert select_extractors(eps, mean, Delta=4.0).selected == eps[1:]
    assert select_extractors(eps, mean, Delta=4.0, tol=0.1 + 1e-9).selected == eps


def test_second_difference_is_exact_on_uneven_grids():
    eps = np.array([0.0, 0.01, 0.05, 0.06, 0.1])
    # f = 3 eps^2 + eps: the second divided difference is f'' = 6 at every interior point
    sel = select_extractors(eps, 3 * eps ** 2 + eps, Delta=0.1)
    np.testing.assert_allclose(sel.second_difference[1:-1], [6.0, 6.0, 6.0], rtol=1e-9)
    assert len(sel.selected) == 2
    # a straight line on an uneven grid is flat (d2 = 0, counted concave); the naive
    # v- - 2v + v+ would call it convex
    line = select_extractors(eps, 2 * eps, Delta=0.0)
    np.testing.assert_allclose(line.second_difference[1:-1], 0, atol=1e-9)
    assert line.selected == pytest.approx(eps.tolist())
    # tol absorbs small convexity (measurement noise)
    assert select_extractors(eps, 3 * eps ** 2, Delta=0.1, tol=6.5).selected == pytest.approx(eps.tolist())


def test_selection_always_contains_the_evaluation_budget_and_is_the_widest():
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 9))
        eps = np.sort(rng.choice(np.arange(20), size=n, replace=False)) / 255
        per_example = rng.normal(size=(n, 5)) + np.cumsum(rng.normal(size=n))[:, None]
        Delta = float(rng.uniform(0, 20 / 255))
        sel = select_extractors(eps, per_example if trial % 2 else per_example.mean(axis=1), Delta=Delta)
        anchor = int(np.argmin(np.abs(eps - Delta)))
        assert sel.eval_budget == eps[anchor] and eps[anchor] in sel.selected
        lo, hi = eps.tolist().index(sel.selected[0]), eps.tolist().index(sel.selected[-1])
        assert sel.selected == eps[lo:hi + 1].tolist()  # contiguous
        if n >= 3:
            assert _concave_flags_ok(sel, lo, hi)
            widest = max(j - i for i in range(anchor + 1) for j in range(anchor, n) if _concave_flags_ok(sel, i, j))
            assert hi - lo == widest
        else:
            assert sel.selected == eps.tolist() and "fewer than 3 budgets" in sel.reasons[0]
    # without Delta: the widest concave range anywhere
    assert select_extractors(PAPER_GRID, _paper_like_curve()).selected == pytest.approx(PAPER_GRID[2:])


def test_selection_ties_go_near_delta_then_to_larger_budgets():
    eps = [0.0, 1.0, 2.0, 3.0, 4.0]
    kink = [4.0, 3.0, 2.0, 1.5, 1.0]  # convex only at 2: it can only be an end of the range
    assert select_extractors(eps, kink, Delta=2.0).selected == [2.0, 3.0, 4.0]  # equally near: larger
    assert select_extractors(eps, kink, Delta=1.9).selected == [0.0, 1.0, 2.0]  # centred nearer 1.9
    assert select_extractors(eps, kink, Delta=2.1).selected == [2.0, 3.0, 4.0]
    # float noise in the budgets (0.15 - 0.1 > 0.1 - 0.05) breaks no tie
    assert select_extractors([0.0, 0.1, 0.2], [2.0, 0.9, 0.4], Delta=0.1).selected == [0.1, 0.2]


def test_selection_with_fewer_than_three_budgets_chooses_all():
    sel = select_extractors([0.0, 0.1], [[1.0, 2.0], [0.5, 0.7]], Delta=0.1)
    assert sel.selected == [0.0, 0.1] and sel.second_difference == [None, None]
    assert sel.delta_z == pytest.approx([1.5, 0.6]) and sel.n_examples == 2
    assert all(r.startswith("fewer than 3 budgets") for r in sel.reasons)
    assert select_extractors([0.1], [2.0], Delta=0.3).selected == [0.1]


def test_selection_bad_inputs():
    with pytest.raises(ValueError, match=r"len\(delta_z\)=3"):
        select_extractors([0, 1, 2, 3], [1, 2, 3])
    with pytest.raises(ValueError, match=r"len\(delta_z\)=2"):
        select_extractors([0, 1, 2], np.ones((2, 5)))
    with pytest.raises(ValueError, match=r"eps must hold at least one budget, got eps=\[\]"):
        select_extractors([], [])
    with pytest.raises(ValueError, match=r"increasing order, got eps=\[0\.0, 2\.0, 1\.0\]"):
        select_extractors([0, 2, 1], [1, 2, 3])
    with pytest.raises(ValueError, match=r"eps must be one-dimensional"):
        select_extractors([[0, 1, 2]], [1, 2, 3])
    with pytest.raises(ValueError, match=r"delta_z must be finite"):
        select_extractors([0, 1, 2], [1, float("nan"), 3])
    with pytest.raises(ValueError, match=r"delta_z must be 1-D .* got delta_z with shape \(3, 2, 2\)"):
        select_extractors([0, 1, 2], np.ones((3, 2, 2)))
    with pytest.raises(ValueError, match=r"at least one example per budget, got delta_z with shape \(3, 0\)"):
        select_extractors([0, 1, 2], np.ones((3, 0)))
    with pytest.raises(ValueError, match=r"delta_z must be numbers"):
        select_extractors([0, 1, 2], ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"Delta must be a finite number >= 0, got Delta=-0\.1"):
        select_extractors([0, 1, 2], [1, 2, 3], Delta=-0.1)
    with pytest.raises(ValueError, match=r"Delta=True"):
        select_extractors([0, 1, 2], [1, 2, 3], Delta=True)
    with pytest.raises(ValueError, match=r"z must be a finite number >= 0, got z=nan"):
        select_extractors([0, 1, 2], [1, 2, 3], z=float("nan"))
    with pytest.raises(ValueError, match=r"z=-1"):
        select_extractors([0, 1, 2], [1, 2, 3], z=-1)
    with pytest.raises(ValueError, match=r"tol=nan"):
        select_extractors([0, 1, 2], [1, 2, 3], tol=float("nan"))


# ------------------------------------------------------------------------ the selection on a run

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, smoke_networks, one_thread):
    """The smoke preset's three digits extractors, with Delta-z on 16 images."""
    import dataclasses

    from conftest import copy_run

    from afs_kit.config import get_preset
    from afs_kit.run.pipeline import Run

    preset = dataclasses.replace(get_preset("smoke"), delta_z_examples=16)
    return Run(copy_run(smoke_networks, tmp_path_factory.mktemp("tiny-run") / "run"), preset, device="cpu",
               progress=False)


def test_run_delta_z_values_uses_validation_images(tiny_run):
    from afs_kit.data.batches import validation_split

    run = tiny_run
    budgets, values = run.delta_z_values()
    assert budgets == pytest.approx([0.0, 0.1, 0.2]) and values.shape == (3, 16)
    _, val_idx = validation_split(run.data, run.preset.data.val_fraction, seed=0)
    x_val = to_float(run.data.x_train[val_idx[:16]])
    x_test = to_float(run.data.x_test[:16])
    Delta = run.preset.evaluation.eps
    for b, row in zip(budgets, values):
        model = run.extractor(b)[0]
        on_val = delta_z(model, x_val, Delta, generator=torch.Generator().manual_seed(0)).numpy()
        on_test = delta_z(model, x_test, Delta, generator=torch.Generator().manual_seed(0)).numpy()
        np.testing.assert_allclose(row, on_val, rtol=1e-6)
        assert not np.allclose(row, on_test)


def test_run_selection_is_stored_with_the_new_fields_and_reused(tiny_run, monkeypatch):
    from afs_kit import studies
    from afs_kit.core.io import read_json, write_json

    run = tiny_run
    path = run.dir.root / "selection.json"
    path.unlink(missing_ok=True)
    vector = run.selected_subset()
    stored = read_json(path)
    assert stored["split"] == "validation" and stored["n_examples"] == 16 and stored["delta_z_examples"] == 16
    assert stored["Delta"] == run.preset.evaluation.eps and len(stored["std"]) == 3
    sel = stored["selection"]
    assert sel["eval_budget"] == pytest.approx(0.1) and vector[1] == "1"  # the evaluation budget is in
    assert vector == "".join("1" if b in sel["selected"] else "0" for b in stored["budgets"])
    assert len(sel["second_difference_se"]) == 3 and sel["second_difference_se"][1] >= 0
    assert len(sel["reasons"]) == 3 and sel["n_examples"] == 16

    def no_recompute():
        raise AssertionError("Delta-z recomputed although selection.json holds it")

    monkeypatch.setattr(run, "delta_z_values", no_recompute)
    assert run.selected_subset() == vector
    summary = studies.selection_summary(run)
    assert summary["std"] == stored["std"] and summary["split"] == "validation" and summary["n"] == 16
    assert len(studies.selection_rows(summary)) == 3
    assert "16 validation images" in studies.selection_text(summary)
    # a selection.json from before (test images, no std) is not reused
    write_json(path, {k: v for k, v in stored.items() if k not in ("split", "std")})
    with pytest.raises(AssertionError, match="recomputed"):
        run.selected_subset()
    monkeypatch.undo()
    assert run.selected_subset() == vector and read_json(path)["split"] == "validation"


def test_check_eq10():
    curve = _paper_like_curve()
    concave = check_eq10(PAPER_GRID[3:9], curve[3:9])
    assert concave.holds and concave.lhs < concave.rhs
    assert concave.lhs == pytest.approx(curve[3:9].mean())
    # uniform mean budget 5.5/255: the nearest network is the one at 5/255 (ties go to the smaller)
    assert concave.reference_eps == pytest.approx(5 / 255) and concave.rhs == pytest.approx(curve[5])
    convex = check_eq10([0, 1, 2], [4.0, 1.0, 0.0])
    assert not convex.holds and convex.lhs == pytest.approx(5 / 3) and convex.rhs == 1.0
    weighted = check_eq10([0, 1, 2], [4.0, 1.0, 0.0], lambdas=[0.1, 0.1, 0.8])
    assert weighted.reference_index == 2 and weighted.lhs == pytest.approx(0.5) and not weighted.holds
    with pytest.raises(ValueError, match=r"lambdas must be positive and sum to 1"):
        check_eq10([0, 1, 2], [3, 2, 1], lambdas=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"len\(lambdas\)=2"):
        check_eq10([0, 1, 2], [3, 2, 1], lambdas=[0.5, 0.5])


# ------------------------------------------------------------------------ t-SNE

def _clusters(n=300, d=80, k=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    centers = rng.normal(0, 4, (k, d))
    return (centers[labels] + rng.normal(0, 1, (n, d))).astype(np.float32), labels


def test_tsne_shape_determinism_and_quality():
    x, labels = _clusters()
    e1 = tsne_embedding(x, perplexity=20, seed=0)
    e2 = tsne_embedding(torch.from_numpy(x), perplexity=20, seed=0)
    e3 = tsne_embedding(x, perplexity=20, seed=1)
    assert e1.shape == (300, 2) and isinstance(e1, np.ndarray) and np.all(np.isfinite(e1))
    np.testing.assert_array_equal(e1, e2)
    assert not np.array_equal(e1, e3)
    assert trustworthiness_score(x, e1, n_neighbors=10) > 0.9
    # clusters stay apart: every point's nearest embedded neighbour is in its own cluster
    dist = ((e1[:, None] - e1[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    assert (labels[dist.argmin(1)] == labels).mean() > 0.98


def test_tsne_sklearn_route_and_subsampled_trustworthiness():
    x, _ = _clusters(n=200)
    e = tsne_embedding(x, perplexity=15, method="sklearn", seed=0)
    assert e.shape == (200, 2)
    np.testing.assert_array_equal(e, tsne_embedding(x, perplexity=15, method="sklearn", seed=0))
    full = trustworthiness_score(x, e, max_points=None)
    sub = trustworthiness_score(x, e, max_points=150, seed=0)
    assert full > 0.9 and sub > 0.9 and sub != full
    assert sub == trustworthiness_score(x, e, max_points=150, seed=0)


def test_tsne_bad_inputs():
    x, _ = _clusters(n=60)
    with pytest.raises(ValueError, match=r"perplexity=30"):
        tsne_embedding(x, perplexity=30)  # needs N > 3 * perplexity
    with pytest.raises(ValueError, match=r"features with shape \(60,\)"):
        tsne_embedding(x[:, 0])
    with pytest.raises(ValueError, match=r"method='umap'"):
        tsne_embedding(x, perplexity=5, method="umap")
    with pytest.raises(ValueError, match=r"embedding must have one row per feature row \(60\), got 59"):
        trustworthiness_score(x, x[:59, :2])


# ------------------------------------------------------------------------ the merger's weights

def test_importance_ratio_sums_to_one_and_follows_the_weight():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3 * 16, 10)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(10, 48).sign())  # every |w| = 1: equal blocks have equal mass
    dims = [16, 16, 16]
    r = importance_ratio(lin, dims)
    assert isinstance(r, np.ndarray) and r.shape == (3,)
    np.testing.assert_allclose(r, [1 / 3] * 3)
    with torch.no_grad():
        lin.weight[:, :16] *= 3  # block 0 now holds 3 of 5 parts of the mass
    np.testing.assert_allclose(importance_ratio(lin, dims), [0.6, 0.2, 0.2])
    # a plain matrix, uneven blocks, numpy: ratio = block mass / total mass
    w = np.random.default_rng(0).normal(size=(10, 30))
    r = importance_ratio(w, [5, 25])
    assert r.sum() == pytest.approx(1.0)
    assert r[0] == pytest.approx(np.abs(w[:, :5]).sum() / np.abs(w).sum())

    class HasWeight:  # anything with .weight (the lead's LinearMerger exposes one)
        weight = torch.from_numpy(w)
    np.testing.assert_allclose(importance_ratio(HasWeight(), [5, 25]), r)


def test_importance_ratio_bad_inputs():
    with pytest.raises(ValueError, match=r"sum to the merger's input width 48, got feature_dims=\[16, 16\]"):
        importance_ratio(torch.nn.Linear(48, 10), [16, 16])
    with pytest.raises(ValueError, match=r"feature_dims=\[0, 48\]"):
        importance_ratio(torch.nn.Linear(48, 10), [0, 48])
    with pytest.raises(ValueError, match=r"shape \(48,\)"):
        importance_ratio(torch.ones(48), [48])


def test_weight_stats_on_known_matrices():
    even = weight_stats(np.ones((10, 50)) * np.array([1, -1] * 25))
    assert even["top10_mass"] == pytest.approx(0.1)
    assert even["gini"] == pytest.approx(0.0, abs=1e-12) and even["hoyer"] == pytest.approx(0.0, abs=1e-12)
    one_hot = np.zeros((10, 50))
    one_hot[3, 7] = 2.0
    sparse = weight_stats(one_hot)
    assert sparse["top10_mass"] == 1.0 and sparse["hoyer"] == pytest.approx(1.0)
    assert sparse["gini"] == pytest.approx(1 - 1 / 500)
    rng = np.random.default_rng(0)
    g = rng.normal(size=(100, 1000))
    gauss, laplace = weight_stats(g), weight_stats(rng.laplace(size=(100, 1000)))
    scipy_stats = pytest.importorskip("scipy.stats")
    assert gauss["kurtosis"] == pytest.approx(scipy_stats.kurtosis(g, axis=None), rel=1e-9)
    assert abs(gauss["kurtosis"]) < 0.05 and laplace["kurtosis"] > 2.5  # Laplace: 3 in expectation
    assert laplace["top10_mass"] > gauss["top10_mass"] and laplace["gini"] > gauss["gini"]
    # Gini against its definition: mean absolute difference / (2 * mean)
    a = np.abs(rng.normal(size=300))
    ref = np.abs(a[:, None] - a[None]).mean() / (2 * a.mean())
    assert weight_stats(a.reshape(10, 30))["gini"] == pytest.approx(ref, rel=1e-9)
    with pytest.raises(ValueError, match=r"all zeros"):
        weight_stats(np.zeros((3, 3)))


# ------------------------------------------------------------------------ parameters and MACs (table 6)

def _meta(name: str, num_classes: int = 10):
    with torch.device("meta"):
        return build_model(name, num_classes)


@pytest.mark.parametrize("setting, models", [
    ("Baseline", lambda: _meta("wrn-28-10")),
    ("AFS", lambda: [_meta("wrn-28-10") for _ in range(6)]),
    ("Large model", lambda: _meta("wrn-28-30")),
])
def test_model_cost_matches_table6(setting, models):
    ref = next(r for r in TABLE6_ABLATION if r.setting == setting)
    cost = model_cost(models(), (3, 32, 32))
    assert cost["params"] / 1e6 == pytest.approx(ref.params_m, rel=0.01)
    assert cost["macs"] / 1e9 == pytest.approx(ref.macs_g, rel=0.01)
    assert cost["flops"] == 2 * cost["macs"]


def test_model_cost_real_and_meta_agree_and_model_is_untouched():
    torch.manual_seed(0)
    model = build_model("cnn-tiny", 10, in_channels=1).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    meta, real = model_cost(model, (1, 8, 8)), model_cost(model, (1, 8, 8), on_meta=False)
    assert meta == real
    assert meta["params"] == sum(p.numel() for p in model.parameters())
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.device.type == "cpu" for p in model.parameters())
    # a linear layer costs in * out MACs
    assert model_cost(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), (1, 8, 8))["macs"] == 640
    assert model_cost([model, model], (1, 8, 8))["macs"] == 2 * meta["macs"]
    with pytest.raises(ValueError, match=r"input_shape=\(32, 32\)"):
        model_cost(model, (32, 32))
    with pytest.raises(ValueError, match=r"model=\[\]"):
        model_cost([], (1, 8, 8))


# ------------------------------------------------------------------------ quoted tables

def test_quoted_tables_are_the_papers_cells():
    t4 = {r.method: r for r in TABLE4_CIFAR10}
    assert list(t4) == ["FAT", "TLA", "TRADES", "LBGAT+TRADES", "PGD-AT", "AFS(ours)"]
    assert (t4["AFS(ours)"].clean, t4["AFS(ours)"].pgd, t4["AFS(ours)"].aa, t4["AFS(ours)"].tradeoff) == \
        (90.93, 54.70, 53.05, 71.99)
    assert t4["TRADES"].tradeoff == 69.0
    t5 = {r.method: r for r in TABLE5_CIFAR100}
    pgd_at = t5["PGD-AT"]
    assert (pgd_at.clean, pgd_at.pgd, pgd_at.aa, pgd_at.tradeoff) == (None, 30.45, None, 43.63)
    for row in (*TABLE4_CIFAR10, *TABLE5_CIFAR100):
        assert row.source.startswith("quoted: Liu & Zhao") and ("table 4" in row.source or "table 5" in row.source)
    assert [r.eps for r in TABLE1_EXTRACTORS] == pytest.approx(PAPER_GRID)
    assert (TABLE1_EXTRACTORS[8].clean, TABLE1_EXTRACTORS[8].pgd10, TABLE1_EXTRACTORS[8].pgd20) == (85.15, 54.76, 54.06)
    assert all(r.source.endswith("table 1") for r in TABLE1_EXTRACTORS)
    assert [r.setting for r in TABLE6_ABLATION] == ["Baseline", "Rand.pert.", "Large model", "AFS"]
