"""afs-kit: Adversarial Feature Stacking (Liu & Zhao), notebook-first.

The public API: `Run` (a run directory and its preset: every stage), `PRESETS`, `load_dataset`,
`build_model`, `pgd`, `autoattack`, `evaluate` (clean, PGD and AutoAttack with `worst` and
intervals), `sanity_checks` (the gradient-masking checks), `export_model` and `load_model` (an AFS model
as one self-contained checkpoint with a RobustBench-style card, and back).
"""
from .attacks import autoattack, pgd
from .config import PRESETS
from .data import load_dataset
from .evaluation import evaluate, sanity_checks
from .export import export_model, load_model
from .models import build_model
from .outside import alias_autoattack
from .pipeline import Run
from .version import code_version

# robustbench imports `autoattack`; where only PyPI's `pyautoattack` is installed, that name points to it
alias_autoattack()

__all__ = ["Run", "PRESETS", "load_dataset", "build_model", "pgd", "autoattack", "evaluate", "sanity_checks",
           "export_model", "load_model", "code_version"]
