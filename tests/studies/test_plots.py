"""Every figure function returns a detached Figure with the expected, labelled axes; save_figure is atomic."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from afs_kit import plots
from afs_kit.explain.analysis import importance_ratio
from afs_kit.explain.paper import TABLE4_CIFAR10
from afs_kit.explain.selection import select_extractors

EPS = np.arange(10) / 255


def _check(fig, n_axes: int) -> None:
    import matplotlib.pyplot as plt

    assert isinstance(fig, Figure)
    assert len(fig.axes) == n_axes
    for ax in fig.axes:
        assert ax.get_xlabel() and ax.get_ylabel()
    # nothing left in pyplot's global state: notebooks show the returned figure once, scripts leak nothing
    assert plt.get_fignums() == []
    fig.canvas.draw()  # renders without error


def test_clean_vs_robust_draws_the_paper_beside_the_kit_at_its_own_scale():
    fig = plots.plot_clean_vs_robust({"AFS (kit)": (88.0, 50.0), "PGD-AT (kit)": (82.0, 49.0)})
    _check(fig, 2)
    # the paper's points in a panel of their own, one legend entry each (no labels on points: none overlap),
    # and a caption saying they are another scale
    quoted = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert "FAT" in quoted and len(quoted) == len(TABLE4_CIFAR10)
    assert not fig.axes[0].texts and not fig.axes[1].texts
    assert any("another scale" in t.get_text() for t in fig.texts)
    # the kit's own models: one colour and one legend entry each, named
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "AFS (kit)" in legend and "PGD-AT (kit)" in legend
    colours = {c.get_label(): tuple(c.lines[0].get_color()) for c in fig.axes[0].containers}
    assert set(colours) == {"AFS (kit)", "PGD-AT (kit)"} and len(set(colours.values())) == 2
    assert "PGD-20" in fig.axes[0].get_ylabel()
    # a 0.35-point gap is not blown up to fill the axes
    close = plots.plot_clean_vs_robust({"a": (98.85, 70.0), "b": (99.20, 70.3)}, reference=None, n=1000)
    lo, hi = close.axes[0].get_xlim()
    assert hi - lo >= plots.MIN_SPAN and 0 <= lo and hi <= 100
    _check(plots.plot_clean_vs_robust(None, robust="aa"), 1)
    with pytest.raises(ValueError, match=r"robust='cw'"):
        plots.plot_clean_vs_robust(robust="cw")
    with pytest.raises(ValueError, match=r"results\['x'\] must be \(clean, robust\)"):
        plots.plot_clean_vs_robust({"x": (1.0, 2.0, 3.0)})


def test_fig1_draws_the_singles_frontier_and_keeps_labels_apart():
    from afs_kit.explain.frontier import envelope

    corners = envelope([(10.0, 60.0), (20.0, 50.0), (30.0, 30.0)]).tolist()
    fig = plots.plot_clean_vs_robust({"AFS": (57.0, 21.0)}, reference=None, frontier=corners, n=500)
    line = [ln for ln in fig.axes[0].lines if ln.get_label() == "single networks' frontier"]
    assert len(line) == 1
    # x is clean, y robust: flat (vertical here) below the most accurate network, then its corners
    assert line[0].get_xdata().tolist() == [60.0, 60.0, 50.0, 30.0]
    assert line[0].get_ydata().tolist() == [0.0, 10.0, 20.0, 30.0]
    # a model drawn on exactly another's point (a merger that kept its member's head) says so in the legend,
    # since its marker is covered; models apart keep their plain names
    fig = plots.plot_clean_vs_robust({"ensemble": (41.5, 19.1), "eps=8/255": (41.5, 19.1), "eps=0": (60.7, 1.2)},
                                     reference=None, n=1000)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["ensemble", "eps=8/255 (the same point as ensemble)", "eps=0"]


def test_one_colour_per_extractor_in_every_figure_and_a_marker_only_stacked_models_use():
    colours = plots.extractor_colours([0.0, 0.1, 0.3])
    assert list(colours) == ["eps=0", "eps=0.1", "eps=0.3"]
    fig1 = plots.plot_clean_vs_robust({"eps=0": (90.0, 1.0), "eps=0.3": (70.0, 40.0), "AFS 101, alpha=0.5": (80.0, 35.0),
                                       "logit average (eq. 9) 101": (78.0, 30.0)}, reference=None, colours=colours)
    fig5a = plots.plot_robustness_vs_budget([0.0, 0.1], {"AFS (alpha=0.5)": [80.0, 35.0], "eps=0.3": [70.0, 40.0],
                                                         "eps=0": [90.0, 1.0]}, colours=colours)
    rng = np.random.default_rng(0)
    fig6 = plots.plot_weight_histograms({"(a) network eps=0.1": rng.normal(size=(10, 8)),
                                         "(b) network eps=0.3": rng.normal(size=(10, 8)),
                                         "(c) AFS merger 101, alpha=0.5": rng.normal(size=(10, 16))}, colours=colours)
    drawn = {}
    for fig in (fig1, fig5a):
        for c in fig.axes[0].containers:
            line = c.lines[0]
            drawn.setdefault(c.get_label(), set()).add((tuple(np.round(to_rgb(line.get_color()), 6)),
                                                         line.get_marker()))
    for ax in fig6.axes:
        drawn.setdefault(ax.get_title().split("\n")[0], set()).add(
            (tuple(np.round(ax.patches[0].get_facecolor()[:3], 6)), "hist"))
    rgb = {name: tuple(np.round(to_rgb(c), 6)) for name, c in colours.items()}
    assert {c for c, _ in drawn["eps=0.3"]} == {c for c, _ in drawn["(b) network eps=0.3"]} == {rgb["eps=0.3"]}
    assert {c for c, _ in drawn["eps=0"]} == {rgb["eps=0"]} and {c for c, _ in drawn["(a) network eps=0.1"]} == {rgb["eps=0.1"]}
    # stacked models: a star for AFS, a diamond for a control, in colours no extractor has
    assert {m for _, m in drawn["AFS 101, alpha=0.5"]} == {"*"} and {m for _, m in drawn["AFS (alpha=0.5)"]} == {"*"}
    assert {m for _, m in drawn["logit average (eq. 9) 101"]} == {"D"} and {m for _, m in drawn["eps=0"]} == {"o"}
    stacked = {c for name in ("AFS 101, alpha=0.5", "AFS (alpha=0.5)", "logit average (eq. 9) 101")
               for c, _ in drawn[name]}
    assert not stacked & set(rgb.values())


def test_delta_z_figure_marks_selected():
    curve = 6 + np.concatenate([[0], np.cumsum([-0.9, -0.5, -0.2, -0.25, -0.3, -0.35, -0.4, -0.45, -0.5])])
    sel = select_extractors(EPS, curve)
    fig = plots.plot_delta_z(EPS, curve, std=np.full(10, 0.1), selected=sel, Delta=8 / 255)
    _check(fig, 1)
    stars = [c for c in fig.axes[0].collections if c.get_label() == "selected"]
    assert len(stars) == 1 and len(stars[0].get_offsets()) == len(sel.selected)
    assert "8/255" in fig.axes[0].get_title() and "1/255" in fig.axes[0].get_xlabel()
    # budgets that are not multiples of 1/255 (digits, Fashion-MNIST) are drawn as the tables print them
    fig = plots.plot_delta_z([0, 0.05, 0.1, 0.15], [1.0, 0.8, 0.7, 0.65], Delta=0.15)
    assert "/255" not in fig.axes[0].get_title() + fig.axes[0].get_xlabel()
    assert "Delta = 0.15" in fig.axes[0].get_title() and max(fig.axes[0].lines[0].get_xdata()) == 0.15
    with pytest.raises(ValueError, match=r"len\(mean\)=9"):
        plots.plot_delta_z(EPS, curve[:9])


def test_tsne_figure_has_one_panel_per_embedding_and_a_class_legend():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 50)
    embs = [rng.normal(size=(50, 2)) for _ in range(3)]
    fig = plots.plot_tsne(embs, labels, class_names=["cat", "dog", "ship"], titles=["net-3", "net-8", "concat"])
    _check(fig, 3)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["cat", "dog", "ship"]
    assert [ax.get_title() for ax in fig.axes] == ["net-3", "net-8", "concat"]
    with pytest.raises(ValueError, match=r"embeddings\[1\] must have one value per entry of labels \(50\)"):
        plots.plot_tsne([embs[0], embs[1][:40]], labels)
    with pytest.raises(ValueError, match=r"class_names must name every class"):
        plots.plot_tsne(embs, labels, class_names=["cat"])


def test_robustness_importance_alpha_and_histogram_figures():
    budgets = np.arange(0, 17, 2) / 255
    acc = {"AFS": np.linspace(90, 20, 9), "network-3": np.linspace(92, 5, 9)}
    _check(plots.plot_robustness_vs_budget(budgets, acc), 1)
    with pytest.raises(ValueError, match=r"accuracies\['AFS'\] must have one value per entry of budgets"):
        plots.plot_robustness_vs_budget(budgets[:3], acc)

    w = torch.randn(10, 6 * 8)
    ratios = {0.0: importance_ratio(w, [8] * 6), 0.5: importance_ratio(w.abs() + 1, [8] * 6)}
    fig = plots.plot_importance_ratios(ratios, [f"{k}/255" for k in range(3, 9)])
    _check(fig, 1)
    assert len(fig.axes[0].patches) == 12  # 6 extractors x 2 alphas
    with pytest.raises(ValueError, match=r"extractor_labels must have one label per extractor \(6\)"):
        plots.plot_importance_ratios(ratios, ["a"])

    fig = plots.plot_alpha_tradeoff([0.0, 0.5, 1.0], [90.1, 91.0, 92.6], [56.2, 54.6, 48.2], [54.9, 53.3, 46.8])
    _check(fig, 1)
    assert len(fig.axes[0].lines) == 3
    with pytest.raises(ValueError, match=r"pgd10 must have one value per entry of alphas"):
        plots.plot_alpha_tradeoff([0.0, 0.5], [1, 2], [1, 2, 3])

    fig = plots.plot_weight_histograms({"network-1": torch.nn.Linear(16, 10), "AFS merger": torch.randn(10, 96)})
    _check(fig, 2)
    assert all("top-10%" in ax.get_title() and "Gini" in ax.get_title() for ax in fig.axes)
    assert fig.axes[0].get_xlim() == fig.axes[1].get_xlim()  # one x-axis: the panels' shapes compare
    with pytest.raises(ValueError, match=r"bins=0"):
        plots.plot_weight_histograms({"a": w}, bins=0)


def test_save_figure_writes_png_atomically(tmp_path):
    fig = plots.plot_alpha_tradeoff([0, 1], [90, 92], [55, 50])
    out = plots.save_figure(fig, tmp_path / "sub" / "table2.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["table2.png"]  # no temporary left behind
    with pytest.raises(ValueError, match=r"path must end in \.png, got path='.*fig\.pdf'"):
        plots.save_figure(fig, tmp_path / "fig.pdf")


def test_returned_figure_displays_once_in_a_notebook():
    # a figure returned as a cell's value shows exactly once: not as text (a bare Figure), not twice
    # (a pyplot figure still registered is shown again when the cell ends)
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from afs_kit import plots\n"
                                          "plots.plot_alpha_tradeoff([0, 1], [90, 92], [55, 50])")]
    nbclient.NotebookClient(nb, timeout=60, kernel_name="python3").execute()
    outputs = nb.cells[0].outputs
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1, outputs
