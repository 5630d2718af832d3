"""Delta-z, the selection rule, t-SNE, the merger's weights, parameter/MAC counts, the quoted tables."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from afs_kit.analysis import (PAPER_SELECTED_EPS, TABLE1_EXTRACTORS, TABLE4_CIFAR10, TABLE5_CIFAR100,
                              TABLE6_ABLATION, check_eq10, delta_z, delta_z_curve, importance_ratio,
                              model_cost, select_extractors, trustworthiness_score, tsne_embedding,
                              weight_stats)
from afs_kit.attacks import pgd
from afs_kit.data import iterate_batches, to_float
from afs_kit.models import build_model

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
    """Delta_z decreasing in the budget, convex up to 3/255 (slopes flatten), concave from 3/255 on."""
    slopes = [-0.9, -0.5, -0.2, -0.25, -0.3, -0.35, -0.4, -0.45, -0.5]
    return np.concatenate([[6.0], 6.0 + np.cumsum(slopes)])


def test_selection_reproduces_the_papers_choice():
    sel = select_extractors(PAPER_GRID, _paper_like_curve())
    np.testing.assert_allclose(sel.selected, PAPER_SELECTED_EPS)
    assert sel.second_difference[0] is None and sel.second_difference[-1] is None
    assert sel.second_difference[1] > 0 and sel.second_difference[2] > 0 and sel.second_difference[3] <= 0
    assert sel.reasons[0].startswith("end budget") and sel.reasons[9].startswith("end budget")
    assert sel.reasons[1].startswith("locally convex (d2=")
    assert sel.reasons[5].startswith("locally concave (d2=")
    rows = sel.as_rows()
    assert [r["selected"] for r in rows] == [False] * 3 + [True] * 6 + [False]


def test_selection_concave_everywhere_selects_every_interior_budget():
    eps = np.array([0, 1, 2, 4, 5, 8, 9]) / 255  # uneven spacing
    sel = select_extractors(eps, 3.0 - 50 * eps ** 2)
    np.testing.assert_allclose(sel.selected, eps[1:-1])
    sel = select_extractors(eps, np.exp(eps * 10))  # convex everywhere
    assert sel.selected == []


def test_second_difference_is_exact_on_uneven_grids():
    eps = np.array([0.0, 0.01, 0.05, 0.06, 0.1])
    # f = 3 eps^2 + eps: the second divided difference is f'' = 6 at every interior point
    sel = select_extractors(eps, 3 * eps ** 2 + eps)
    np.testing.assert_allclose(sel.second_difference[1:-1], [6.0, 6.0, 6.0], rtol=1e-9)
    # a straight line on an uneven grid is flat (d2 = 0, counted concave); the naive
    # v- - 2v + v+ would call it convex
    line = select_extractors(eps, 2 * eps)
    np.testing.assert_allclose(line.second_difference[1:-1], 0, atol=1e-9)
    assert line.selected == pytest.approx(eps[1:-1].tolist())
    # tol absorbs small convexity (measurement noise)
    assert select_extractors(eps, 3 * eps ** 2, tol=6.5).selected == pytest.approx(eps[1:-1].tolist())


def test_selection_bad_inputs():
    with pytest.raises(ValueError, match=r"len\(delta_z\)=3"):
        select_extractors([0, 1, 2, 3], [1, 2, 3])
    with pytest.raises(ValueError, match=r"eps must hold at least 3 budgets.*got eps=\[0\.0, 1\.0\]"):
        select_extractors([0, 1], [1, 2])
    with pytest.raises(ValueError, match=r"increasing order, got eps=\[0\.0, 2\.0, 1\.0\]"):
        select_extractors([0, 2, 1], [1, 2, 3])
    with pytest.raises(ValueError, match=r"delta_z must be finite"):
        select_extractors([0, 1, 2], [1, float("nan"), 3])
    with pytest.raises(ValueError, match=r"tol=nan"):
        select_extractors([0, 1, 2], [1, 2, 3], tol=float("nan"))


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
