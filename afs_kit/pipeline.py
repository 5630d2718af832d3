"""The stages over one run directory: what exists is loaded, what is missing is trained.

The command line and the notebooks both go through `Run`, so each notebook can run on its own
and a stage that finds its output made from the same config skips the work and says so.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch

from .config import (ATTACKS, Preset, budget_name, config_hash, format_budget, get_preset, preset_from_dict,
                     validate_preset)
from .data import Dataset, load_dataset
from .device import PRECISIONS, resolve_device
from .evaluation import evaluate, sanity_checks, write_evaluation
from .models import MODEL_NAMES, is_model_name
from .runs import RunDir, expect, load_checkpoint, read_json, write_json
from .stacking import (AFSModel, FeatureStack, LinearMerger, LogitAverage, merger_checkpoint, parse_subset,
                       save_merger, subset_vector, train_merger)
from .training import data_fingerprint, existing_extractor, limited, load_extractor, train_extractor

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def resolve_spec(spec: str) -> str:
    """`npz:`/`folder:` paths relative to the working folder, else to the project root (notebooks run in notebooks/)."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in ("npz", "folder") or Path(path).is_absolute() or Path(path).exists():
        return spec
    candidate = PROJECT_ROOT / path
    return f"{kind}:{candidate}" if candidate.exists() else spec


def check_model_name(name: str, what: str = "model") -> None:
    """Refuse an unknown architecture before anything is written (build_model would, but later)."""
    if not is_model_name(name):
        raise ValueError(f"unknown {what}={name!r}; known: {', '.join(MODEL_NAMES)} (or any 'wrn-D-K' with "
                         f"(D - 4) % 6 == 0, or 'cnn-tiny-xK' etc. for a K times wider small net)")


class Run:
    """One run directory with its preset; every stage reads and writes it."""

    def __init__(self, run_dir: str | Path, preset: Preset, device: str = "auto", progress: bool = True):
        validate_preset(preset)
        check_model_name(preset.extractor.model, "extractor.model")
        if preset.large_model is not None:
            check_model_name(preset.large_model, "large_model")
        for what in ("extractor", "merger", "evaluation"):
            cfg = getattr(preset, what)
            if cfg.precision not in PRECISIONS:
                raise ValueError(f"{what}.precision must be one of {', '.join(PRECISIONS)}, "
                                 f"got {what}.precision={cfg.precision!r}")
        self.dir = RunDir(run_dir)
        self.preset = preset
        self.device = resolve_device(device)
        self.progress = progress
        self._extractors: dict[Path, tuple[torch.nn.Module, dict]] = {}  # loaded once per Run

    @classmethod
    def open(cls, run_dir: str | Path, preset: str | Preset | None = None, device: str = "auto",
             progress: bool = True) -> Run:
        """An existing run keeps its preset; a new one needs `preset` (a name or a Preset)."""
        info = RunDir(run_dir).info_path
        if isinstance(preset, str):
            preset = get_preset(preset)
        if preset is None:
            if not info.is_file():
                raise ValueError(f"run={str(run_dir)!r} holds no run.json; start it with a --preset")
            preset = preset_from_dict(read_json(info)["preset"])
        return cls(run_dir, preset, device=device, progress=progress)

    # ------------------------------------------------------------ data
    @functools.cached_property
    def data(self) -> Dataset:
        return limited(load_dataset(resolve_spec(self.preset.data.spec), self.preset.data.root), self.preset.data)

    def test_set(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `n` test images as floats in [0,1] (all when None)."""
        n = len(self.data.y_test) if n is None else min(n, len(self.data.y_test))
        return self.data.x_test[:n].float().div(255), self.data.y_test[:n]

    def write_info(self) -> None:
        if not self.dir.info_path.is_file():
            write_json(self.dir.info_path, {"preset": dataclasses.asdict(self.preset),
                                            "data": data_fingerprint(self.data), "classes": list(self.data.classes)})

    def say(self, text: str) -> None:
        if self.progress:
            print(text)

    # ------------------------------------------------------------ extractors
    def extractor_config(self, eps: float):
        return dataclasses.replace(self.preset.extractor, eps=eps)

    def train_extractors(self, budgets=None) -> list[dict]:
        """Train every missing extractor of `budgets` (default: the preset's); one checkpoint each."""
        budgets = self.preset.budgets if budgets is None else tuple(budgets)
        if not budgets:
            raise ValueError(f"budgets must list at least one training budget, got budgets={budgets!r}")
        for eps in budgets:  # checked before anything is written
            if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps <= 1:
                raise ValueError(f"eps must be in [0, 1], got eps={eps!r}")
        for eps in budgets:  # a checkpoint made for other data or another model is refused before any write
            existing_extractor(self.extractor_config(eps), self.data, self.preset.data,
                               self.dir.extractor_dir(budget_name(eps)))
        self.write_info()
        out = []
        for eps in budgets:
            out.append(train_extractor(self.extractor_config(eps), self.data, self.preset.data,
                                       self.dir.extractor_dir(budget_name(eps)), self.device, self.progress))
        return out

    def train_ablation(self) -> dict | None:
        """Table 6 'Rand.pert.': one network with a budget drawn per batch from the preset's range."""
        rng = self.preset.ablation_budget_range
        if rng is None:
            return None
        cfg = dataclasses.replace(self.preset.extractor, eps=rng[1], eps_range=rng)
        return train_extractor(cfg, self.data, self.preset.data, self.dir.root / "ablation" / "random-budget",
                               self.device, self.progress)

    def train_large_model(self) -> dict | None:
        """Table 6 'Large model': a wider network, PGD-trained like the extractors at the evaluation budget."""
        if self.preset.large_model is None:
            return None
        cfg = dataclasses.replace(self.preset.extractor, model=self.preset.large_model,
                                  eps=self.preset.evaluation.eps)
        return train_extractor(cfg, self.data, self.preset.data, self.dir.root / "ablation" / "large-model",
                               self.device, self.progress)

    def extractor_checkpoints(self) -> list[tuple[float, Path]]:
        """(budget, path) of every finished extractor, sorted by budget."""
        found = []
        for name in self.dir.extractor_names():
            path = self.dir.extractor_dir(name) / "extractor.pt"
            found.append((self._budget_of(path), path))
        return sorted(found)

    def _budget_of(self, path: Path) -> float:
        if path not in self._extractors:
            model, ckpt = load_extractor(path, "cpu", self.data)
            # same data is not enough: an extractor of another architecture is not this run's
            expect(ckpt["config"], path, model=self.preset.extractor.model)
            self._extractors[path] = model, ckpt
        return self._extractors[path][1]["config"]["eps"]

    def budgets(self) -> list[float]:
        return [b for b, _ in self.extractor_checkpoints()]

    def extractor(self, eps: float) -> tuple[torch.nn.Module, dict]:
        for b, path in self.extractor_checkpoints():
            if abs(b - eps) < 1e-9:
                model, ckpt = self._extractors[path]
                return model.to(self.device).eval(), ckpt
        raise ValueError(f"eps={format_budget(eps)} has no trained extractor in {self.dir.root} "
                         f"(budgets: {', '.join(format_budget(b) for b in self.budgets())})")

    # ------------------------------------------------------------ subsets and mergers
    def delta_z_values(self):
        """Per-example Delta-z (eq. 8) of every extractor at the evaluation budget: (budgets, [n_budgets, N]).

        On the preset's `delta_z_examples` first test images; every extractor gets a generator seeded
        alike, so all see the same random starts and the curve is reproducible.
        """
        from .analysis import delta_z

        x, _ = self.test_set(self.preset.delta_z_examples)
        x = x.to(self.device)
        budgets = self.budgets()
        rows = [delta_z(self.extractor(b)[0], x, self.preset.evaluation.eps,
                        generator=torch.Generator(device=self.device).manual_seed(0)).cpu()
                for b in budgets]
        return budgets, torch.stack(rows).numpy()

    def selected_subset(self) -> str:
        """The binary vector the concavity rule chooses, stored in selection.json with the extractors'
        keys it was made from; redone when the run's extractors change."""
        from .analysis import select_extractors

        path = self.dir.root / "selection.json"
        keys = [self._extractors[p][1]["key"] for _, p in self.extractor_checkpoints()]
        if path.is_file():
            stored = read_json(path)
            if isinstance(stored, dict) and stored.get("extractor_keys") == keys:
                return stored["vector"]
        budgets, values = self.delta_z_values()
        dz = values.mean(axis=1).tolist()
        if len(budgets) < 3:
            # a second difference needs three budgets: nothing to choose from, every extractor is used
            sel = {"eps": budgets, "delta_z": dz, "second_difference": [None] * len(budgets),
                   "reasons": ["fewer than 3 budgets: the concavity rule needs three"] * len(budgets),
                   "selected": [], "tol": 0.0}
        else:
            sel = dataclasses.asdict(select_extractors(budgets, dz))
        chosen = [i for i, b in enumerate(budgets) if any(abs(b - s) < 1e-9 for s in sel["selected"])]
        write_json(path, {"budgets": budgets, "extractor_keys": keys, "delta_z": dz, "selection": sel,
                          "vector": subset_vector(chosen or list(range(len(budgets))), len(budgets))})
        return read_json(path)["vector"]

    def subset_indices(self, spec: str) -> list[int]:
        budgets = self.budgets()
        if not budgets:
            raise ValueError(f"run {self.dir.root} has no trained extractors yet; run train-extractors first")
        if spec == "selected":
            spec = self.selected_subset()
        return parse_subset(spec, budgets)

    def merger_name(self, indices: list[int], cfg) -> tuple[str, str]:
        budgets = self.budgets()
        keys = [self._extractors[p][1]["key"] for b, p in self.extractor_checkpoints()]
        key = config_hash(cfg, self.preset.data, [keys[i] for i in indices])
        vector = subset_vector(indices, len(budgets))
        return f"{vector}-alpha-{cfg.alpha:g}-{cfg.mix}-{key[:8]}", key

    def stack(self, indices: list[int]) -> FeatureStack:
        budgets = self.budgets()
        return FeatureStack([self.extractor(budgets[i])[0] for i in indices])

    def afs_model(self, subset: str = "all", alpha: float | None = None, mix: str | None = None) -> AFSModel:
        """The AFS model over `subset` with merger weight `alpha`; its merger is trained when missing."""
        indices = self.subset_indices(subset)
        cfg = self.preset.merger
        cfg = dataclasses.replace(cfg, alpha=cfg.alpha if alpha is None else alpha, mix=mix or cfg.mix)
        if not 0 <= cfg.alpha <= 1:
            raise ValueError(f"alpha (the clean-loss weight of eq. 5) must be in [0, 1], got alpha={cfg.alpha}")
        name, key = self.merger_name(indices, cfg)
        out_dir = self.dir.merger_dir(name)
        stack = self.stack(indices)
        final = out_dir / "merger.pt"
        if final.is_file():
            ckpt = load_checkpoint(final)
            expect(ckpt, final, kind="merger", key=key)
            merger = LinearMerger(stack.feature_dim, self.data.num_classes)
            merger.load_state_dict(ckpt["state_dict"], strict=True)
            self.say(f"merger {name}: found, skipping training")
            return AFSModel(stack, merger).to(self.device).eval()
        self.write_info()
        model, history = train_merger(stack, self.data, cfg, self.preset.data, out_dir, key, self.device,
                                      self.progress)
        names = [p.parent.name for _, p in self.extractor_checkpoints()]
        ckpt_keys = [self._extractors[p][1]["key"] for _, p in self.extractor_checkpoints()]
        save_merger(final, merger_checkpoint(model, cfg, key, [names[i] for i in indices],
                                             [ckpt_keys[i] for i in indices], data_fingerprint(self.data), history))
        return model.eval()

    def merger_names(self) -> list[str]:
        base = self.dir.root / "mergers"
        return sorted(p.name for p in base.iterdir() if (p / "merger.pt").is_file()) if base.is_dir() else []

    def logit_average(self, subset: str) -> LogitAverage:
        budgets = self.budgets()
        return LogitAverage([self.extractor(budgets[i])[0] for i in self.subset_indices(subset)])

    # ------------------------------------------------------------ evaluation
    def evaluate(self, name: str, model: torch.nn.Module, attacks=None, n_examples=None, sanity: bool | None = None,
                 model_info: dict | None = None) -> dict:
        """Evaluate `model` under the preset's protocol; skipped when the same evaluation exists.

        `sanity` (the gradient-masking checks, recorded in metrics.json): None runs them for stacked
        models (AFS models and logit averages), which must never be reported without them.
        """
        if sanity is None:
            sanity = isinstance(model, (AFSModel, LogitAverage))
        if n_examples is not None and (isinstance(n_examples, bool) or not isinstance(n_examples, int)
                                       or n_examples < 1):
            raise ValueError(f"n_examples must be an integer >= 1 or None, got n_examples={n_examples!r}")
        for a in attacks or ():
            if a not in ATTACKS:
                raise ValueError(f"unknown attack={a!r}; known: {', '.join(ATTACKS)}")
        cfg = self.preset.evaluation
        cfg = dataclasses.replace(cfg, attacks=tuple(attacks or cfg.attacks),
                                  n_examples=n_examples if n_examples is not None else cfg.n_examples)
        key = config_hash(cfg, model_info or {}, name, sanity)
        out_dir = self.dir.eval_dir(name)
        path = out_dir / "metrics.json"
        if path.is_file():
            metrics = read_json(path)
            if metrics.get("key") == key:
                self.say(f"evaluation {name}: found, skipping")
                return metrics
        x, y = self.test_set(cfg.n_examples)
        result = evaluate(model, x, y, cfg, self.device, self.progress)
        result["metrics"]["key"] = key
        if sanity:
            result["sanity"] = sanity_checks(model, x, y, cfg.eps, result["metrics"], device=self.device)
        metrics = write_evaluation(out_dir, result, model_info or {})
        self.say(f"evaluation {name}: " + ", ".join(f"{a} {metrics[a]:.1f}%" for a in ("clean",) + cfg.attacks
                                                     if a in metrics))
        return metrics
