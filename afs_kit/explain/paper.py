"""The paper's published numbers (Liu & Zhao), quoted for comparison in the reports; nothing here is
computed. Tables 1, 4, 5 and 6 and the budgets of section 3.1.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ReferenceRow", "ExtractorRow", "CostRow", "TABLE1_EXTRACTORS", "TABLE4_CIFAR10", "TABLE5_CIFAR100",
           "TABLE6_ABLATION", "PAPER_SELECTED_EPS"]

_PAPER = "Liu & Zhao, Towards Both Accurate and Robust Neural Networks without Extra Data"


@dataclass(frozen=True)
class ReferenceRow:
    """One method's published numbers (%). None where the paper gives no value; nothing is derived."""
    method: str
    dataset: str
    clean: float | None
    pgd: float | None
    aa: float | None
    tradeoff: float | None  # mean of clean and AA, as the paper computes it
    source: str


@dataclass(frozen=True)
class ExtractorRow:
    """Table 1: one WRN-28-10 adversarially trained at `eps` on CIFAR-10 (%)."""
    name: str
    eps: float
    clean: float
    pgd10: float
    pgd20: float
    source: str = f"quoted: {_PAPER}, table 1"


@dataclass(frozen=True)
class CostRow:
    """Table 6: one ablation setting on CIFAR-10 (parameters in M, MACs in G, accuracies %)."""
    setting: str
    params_m: float
    macs_g: float
    clean: float
    pgd20: float
    source: str = f"quoted: {_PAPER}, table 6"


_T4 = f"quoted: {_PAPER}, table 4"
_T5 = f"quoted: {_PAPER}, table 5"

#: Table 4, CIFAR-10, WRN-34-10 (PGD at 8/255; AA = AutoAttack). Quoted, not recomputed.
TABLE4_CIFAR10: tuple[ReferenceRow, ...] = (
    ReferenceRow("FAT", "cifar10", 84.39, 57.12, 53.51, 68.95, _T4),
    ReferenceRow("TLA", "cifar10", 86.21, 50.03, 47.41, 66.81, _T4),
    ReferenceRow("TRADES", "cifar10", 84.92, 56.43, 53.08, 69.0, _T4),
    ReferenceRow("LBGAT+TRADES", "cifar10", 81.98, 57.78, 53.14, 67.56, _T4),
    ReferenceRow("PGD-AT", "cifar10", 85.77, 55.53, 52.08, 68.92, _T4),
    ReferenceRow("AFS(ours)", "cifar10", 90.93, 54.70, 53.05, 71.99, _T4),
)

#: Table 5, CIFAR-100. The PGD-AT row gives only PGD and the trade-off; the rest stays None.
TABLE5_CIFAR100: tuple[ReferenceRow, ...] = (
    ReferenceRow("LBGAT+TRADES", "cifar100", 60.43, 35.50, 29.34, 44.88, _T5),
    ReferenceRow("PGD-AT", "cifar100", None, 30.45, None, 43.63, _T5),
    ReferenceRow("AFS(ours)", "cifar100", 70.54, 29.03, 27.36, 48.95, _T5),
)

#: Table 1, CIFAR-10: network-k trained with PGD-AT at k/255.
TABLE1_EXTRACTORS: tuple[ExtractorRow, ...] = tuple(
    ExtractorRow(f"network-{k}", k / 255, clean, pgd10, pgd20)
    for k, (clean, pgd10, pgd20) in enumerate([
        (94.62, 0.0, 0.0), (93.92, 15.10, 10.71), (93.50, 31.48, 27.41), (92.16, 39.12, 36.64),
        (91.17, 44.63, 42.65), (90.21, 47.76, 46.12), (88.52, 50.16, 48.76), (87.30, 52.88, 51.74),
        (85.15, 54.76, 54.06), (83.85, 55.02, 54.37),
    ])
)

#: Table 6, CIFAR-10 ablations.
TABLE6_ABLATION: tuple[CostRow, ...] = (
    CostRow("Baseline", 36.47, 5.24, 85.15, 54.06),
    CostRow("Rand.pert.", 36.47, 5.24, 89.02, 49.73),
    CostRow("Large model", 328.0, 47.04, 87.67, 54.08),
    CostRow("AFS", 218.82, 31.44, 91.01, 53.94),
)

#: Section 3.1: the budgets the paper selects from 0/255..9/255 (networks 3 to 8).
PAPER_SELECTED_EPS: tuple[float, ...] = tuple(k / 255 for k in range(3, 9))
