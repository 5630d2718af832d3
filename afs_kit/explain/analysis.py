"""Analysis: t-SNE (fig. 4), the merger's weights (fig. 5b, 6) and parameter and MAC counts (table 6).

Everything returns arrays, small dataclasses or dicts; `afs_kit.plots` turns them into figures. The
selection rule and Delta-z live in `afs_kit.selection`, the paper's quoted numbers in `afs_kit.paper`;
both are re-exported here, where earlier versions had them.
"""
from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn

from ..core.checks import check_int, check_real, is_int
from ..core.device import eval_mode as _eval_mode
from ..errors import BadInput

__all__ = ["tsne_embedding", "trustworthiness_score", "importance_ratio", "weight_array", "weight_stats",
           "model_cost"]


# ------------------------------------------------------------------------------------ helpers

def _to_numpy_2d(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise BadInput(f"{name} must be a 2-D array [N, D], got {name} with shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise BadInput(f"{name} must be numeric, got {name}.dtype={arr.dtype}")
    return arr


# ------------------------------------------------------------------------------------ t-SNE (fig. 4)

TSNE_METHODS = ("auto", "opentsne", "sklearn")


def tsne_embedding(features, n_components: int = 2, perplexity: float = 30.0, seed: int = 0,
                   pca_dim: int | None = 50, method: str = "auto", n_jobs: int = 1,
                   early_iter: int = 125, n_iter: int = 250) -> np.ndarray:
    """A seeded t-SNE embedding [N, n_components] of `features` [N, D] (numpy or tensor).

    Where D > pca_dim the features are first reduced to `pca_dim` principal components (scikit-learn
    PCA, seeded); t-SNE's perplexity neighbourhoods barely change, and the neighbour search gets much
    cheaper. The embedding starts from the (seeded) PCA layout, which keeps the global arrangement.

    method: "opentsne" (openTSNE: FFT-interpolated gradients, Linderman et al. 2019, from 2,000 points
    on, Barnes-Hut below; exact neighbours up to 20,000 points; learning rate N/12, Belkina et al.
    2019, which converges in far fewer iterations than scikit-learn's 1,000: `early_iter` iterations
    with exaggeration 12, then `n_iter` without; on 5,000 points about 3-5x faster in wall time than
    scikit-learn's plain TSNE with the same trustworthiness), "sklearn" (scikit-learn's Barnes-Hut
    TSNE on the reduced features, max_iter = early_iter + n_iter but at least 250; about 2.5x faster
    than the plain one, trustworthiness up to 0.015 lower), or "auto": openTSNE when installed, else
    scikit-learn.
    n_jobs: threads (-1: all cores). The default 1: on two cores shared with other work a second
    thread gained about 15% when the machine was idle and lost about 50% when it was busy.
    Same inputs and seed give the same embedding.
    """
    if method not in TSNE_METHODS:
        raise BadInput(f"method must be one of {TSNE_METHODS}, got method={method!r}")
    x = _to_numpy_2d(features, "features").astype(np.float32, copy=False)
    n, d = x.shape
    if not np.all(np.isfinite(x)):
        raise BadInput("features must be finite, got NaN or inf entries")
    n_components = check_int("n_components", n_components, 1, 3)
    check_real("perplexity", perplexity, 0, low_open=True, finite=False)
    if n < 3 * perplexity + 1:
        raise BadInput(f"perplexity must be below (N - 1) / 3 = {(n - 1) / 3:.4g} for N={n} points, "
                       f"got perplexity={perplexity}")
    if pca_dim is not None:
        pca_dim = check_int("pca_dim", pca_dim, n_components)
    seed = check_int("seed", seed, 0)
    early_iter = check_int("early_iter", early_iter, 0)
    n_iter = check_int("n_iter", n_iter, 1)

    from sklearn.decomposition import PCA  # heavy imports only when used

    if pca_dim is not None and d > pca_dim and n > pca_dim:
        x = PCA(n_components=pca_dim, random_state=seed).fit_transform(x).astype(np.float32)
    if method == "auto":
        method = "opentsne" if importlib.util.find_spec("openTSNE") is not None else "sklearn"

    if method == "opentsne":
        from openTSNE import TSNEEmbedding, affinity, initialization

        # exact neighbours are cheap at these sizes and keep the result independent of Annoy's trees
        knn = "exact" if n <= 20_000 else "annoy"
        aff = affinity.PerplexityBasedNN(x, perplexity=float(perplexity), method=knn, n_jobs=n_jobs,
                                         random_state=seed, verbose=False)
        init = initialization.pca(x, n_components=n_components, random_state=seed)
        # ints_in_interval=2: a coarser interpolation grid once the embedding has spread out; about
        # 2x faster after the exaggeration phase at the same trustworthiness
        # FFT's grid costs the same for 300 points as for 3,000; Barnes-Hut is the faster one below 2,000
        gradient = "bh" if n < 2000 else "fft"
        emb = TSNEEmbedding(init, aff, negative_gradient_method=gradient, ints_in_interval=2, n_jobs=n_jobs,
                            random_state=seed, verbose=False)
        if early_iter:
            emb = emb.optimize(early_iter, exaggeration=12, momentum=0.5)
        emb = emb.optimize(n_iter, momentum=0.8)
        return np.asarray(emb, dtype=np.float64).copy()

    from sklearn.manifold import TSNE

    tsne = TSNE(n_components=n_components, perplexity=float(perplexity), init="pca", random_state=seed,
                max_iter=max(250, early_iter + n_iter), n_jobs=n_jobs,
                method="barnes_hut" if n_components < 4 else "exact")
    return np.asarray(tsne.fit_transform(x), dtype=np.float64)


def trustworthiness_score(features, embedding, n_neighbors: int = 10, max_points: int | None = 2000,
                          seed: int = 0) -> float:
    """scikit-learn's trustworthiness (1 = every embedding neighbour is a true neighbour).

    Its cost grows with N^2, so above `max_points` it is computed on a seeded random subsample of
    `max_points` rows (neighbours then taken within the subsample, in both spaces); None: all rows.
    """
    from sklearn.manifold import trustworthiness

    x = _to_numpy_2d(features, "features")
    e = _to_numpy_2d(embedding, "embedding")
    if len(x) != len(e):
        raise BadInput(f"embedding must have one row per feature row ({len(x)}), got {len(e)} rows")
    # below N/2: the largest integer is (N - 1) // 2
    n_neighbors = check_int("n_neighbors", n_neighbors, 1, (len(x) - 1) // 2, what=f"below N/2 for N={len(x)}")
    if max_points is not None and len(x) > max_points:
        if max_points <= 2 * n_neighbors:
            raise BadInput(f"max_points must exceed 2 * n_neighbors, got max_points={max_points}")
        rows = np.sort(np.random.default_rng(seed).choice(len(x), size=max_points, replace=False))
        x, e = x[rows], e[rows]
    return float(trustworthiness(x, e, n_neighbors=n_neighbors))


# ------------------------------------------------------------------------------------ the merger's weights

def weight_array(weight, name: str = "weight") -> np.ndarray:
    w = getattr(weight, "weight", weight)  # nn.Linear, LinearMerger, or the matrix itself
    if isinstance(w, torch.Tensor):
        w = w.detach().float().cpu().numpy()
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2:
        raise BadInput(f"{name} must be a 2-D matrix [classes, features], got {name} with shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise BadInput(f"{name} must be finite, got NaN or inf entries")
    return w


def importance_ratio(merger, feature_dims: Sequence[int]) -> np.ndarray:
    """Fig. 5b: per extractor, the sum of |W| over its block of columns, divided by the sum of all |W|.

    `merger`: anything with a `.weight` of shape [classes, sum(feature_dims)] (nn.Linear, the AFS
    merger) or that matrix itself. Returns one float per extractor, summing to 1.
    """
    w = weight_array(merger, "merger.weight")
    dims = list(feature_dims)
    if not dims or not all(is_int(d) and d >= 1 for d in dims):
        raise BadInput(f"feature_dims must be positive integers, got feature_dims={dims!r}")
    if sum(dims) != w.shape[1]:
        raise BadInput(f"feature_dims must sum to the merger's input width {w.shape[1]}, "
                       f"got feature_dims={dims} (sum {sum(dims)})")
    mass = np.abs(w).sum(axis=0)
    bounds = np.cumsum([0, *dims])
    blocks = np.array([mass[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])
    total = blocks.sum()
    if total == 0:
        raise BadInput("merger.weight must not be all zeros (the ratios would be 0/0)")
    return blocks / total


def weight_stats(weight) -> dict[str, float]:
    """Sparsity statistics of a weight matrix (fig. 6): how much the classifier leans on a few entries.

    Returns a dict of floats:
      n: entries; mean_abs, std: of the entries;
      top10_mass: share of sum |W| held by the largest 10% of |W| (0.1 for equal magnitudes, -> 1 sparse);
      gini: Gini coefficient of |W| (0 for equal magnitudes, -> 1 when one entry holds everything);
      kurtosis: excess kurtosis of W (0 for a Gaussian; heavy tails, i.e. a few large weights, > 0);
      hoyer: Hoyer's sparsity (sqrt(n) - ||W||_1/||W||_2) / (sqrt(n) - 1) in [0, 1].
    """
    w = weight_array(weight).ravel()
    n = w.size
    a = np.sort(np.abs(w))
    total = a.sum()
    if n < 2 or total == 0:
        raise BadInput(f"weight must have at least 2 entries and not be all zeros, "
                       f"got shape {w.shape}, sum |W|={total}")
    k = max(1, int(math.ceil(0.1 * n)))
    top10 = a[-k:].sum() / total
    # Gini of sorted magnitudes: 1 - 2 * (area under the Lorenz curve)
    cum = np.cumsum(a)
    gini = float((n + 1 - 2 * (cum / total).sum()) / n)
    centered = w - w.mean()
    var = np.mean(centered ** 2)
    kurt = float(np.mean(centered ** 4) / var ** 2 - 3) if var > 0 else 0.0
    hoyer = float((math.sqrt(n) - total / np.sqrt((a ** 2).sum())) / (math.sqrt(n) - 1))
    return {"n": float(n), "mean_abs": float(a.mean()), "std": float(w.std()), "top10_mass": float(top10),
            "gini": gini, "kurtosis": kurt, "hoyer": hoyer}


# ------------------------------------------------------------------------------------ cost (table 6)

def _single_cost(model: nn.Module, input_shape: tuple[int, ...], on_meta: bool) -> dict[str, int]:
    from torch.func import functional_call
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with _eval_mode(model), torch.no_grad():
        if on_meta:
            # shape-only twins of every parameter and buffer: no weights are read or allocated, so even
            # WRN-28-30 (328 M parameters) costs nothing; the model itself is untouched
            state = {k: torch.empty_like(v, device="meta") for k, v in
                     [*model.named_parameters(), *model.named_buffers()]}
            x = torch.empty((1, *input_shape), device="meta")
            with counter:
                functional_call(model, state, (x,), strict=False)
        else:
            ref = next(iter([*model.parameters(), *model.buffers()]), None)
            device = ref.device if ref is not None else torch.device("cpu")
            x = torch.zeros((1, *input_shape), device=device)
            with counter:
                model(x)
    flops = int(counter.get_total_flops())
    return {"params": int(params), "flops": flops, "macs": flops // 2}


def model_cost(model: nn.Module | Sequence[nn.Module], input_shape: Sequence[int],
               on_meta: bool = True) -> dict[str, int]:
    """Parameters and multiply-accumulates of one forward pass of ONE example (table 6).

    MACs = flops / 2 with flops from `torch.utils.flop_counter.FlopCounterMode` (convolutions and
    matrix products; normalization, activations and pooling are not counted, as in the paper's
    numbers). With on_meta=True the pass runs on the meta device (shapes only), so it needs neither
    memory nor time; on_meta=False runs a real zero input on the model's device (for models whose
    forward does something the meta device cannot). A list of models (e.g. the extractors of a
    stack) gives the sum. For an AFS model itself, `params` counts every registered parameter,
    including the extractors' own (unused) classifiers.

    input_shape: (C, H, W) of one image, e.g. (3, 32, 32).
    Returns {"params", "macs", "flops"} as ints.
    """
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(is_int(s) and s >= 1 for s in shape):
        raise BadInput(f"input_shape must be (C, H, W) of positive integers, got input_shape={input_shape!r}")
    shape = tuple(int(s) for s in shape)
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise BadInput(f"model must be an nn.Module or a non-empty list of them, got model={model!r}")
    total = {"params": 0, "macs": 0, "flops": 0}
    for m in models:
        for k, v in _single_cost(m, shape, on_meta).items():
            total[k] += v
    return total
