"""afs-kit: Adversarial Feature Stacking (Liu & Zhao), notebook-first.

The public API: `Run` (a run directory and its preset: every stage), `PRESETS`, `load_dataset`,
`build_model`, `pgd`, `autoattack`, `evaluate` (clean, PGD and AutoAttack with `worst` and
intervals), `sanity_checks` (the gradient-masking checks), `export_model` and `load_model` (an AFS model
as one self-contained checkpoint with a RobustBench-style card, and back).
"""
from .attacks.methods import autoattack, pgd
from .config import PRESETS
from .core.version import code_version
from .data.datasets import load_dataset
from .eval.evaluation import evaluate
from .eval.masking import sanity_checks
from .models.nets import build_model
from .run.export import export_model, load_model
from .run.pipeline import Run

__all__ = ["Run", "PRESETS", "load_dataset", "build_model", "pgd", "autoattack", "evaluate", "sanity_checks",
           "export_model", "load_model", "code_version"]
