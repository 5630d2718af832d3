"""The one registry of evaluation attacks: each name's label, kind and step count, asked by evaluation, the
masking checks, tables, plots and widgets instead of spelling names. Adding an attack: one entry here and the
attack's own function in `methods`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import BadInput


@dataclass(frozen=True)
class EvalAttack:
    name: str        # the key of its flags and accuracy in metrics.json
    label: str       # its column title in tables and figures
    kind: str        # clean (no attack), pgd (white-box PGD from a random start), autoattack (pyautoattack)
    steps: int = 0   # PGD steps (0: not a PGD)


REGISTRY: dict[str, EvalAttack] = {a.name: a for a in (
    EvalAttack("clean", "clean", "clean"),
    EvalAttack("pgd10", "PGD-10", "pgd", 10),
    EvalAttack("pgd20", "PGD-20", "pgd", 20),
    EvalAttack("aa", "AutoAttack", "autoattack"),
)}
PGD_STEPS = {a.name: a.steps for a in REGISTRY.values() if a.kind == "pgd"}  # PGD name -> steps
PGD_ATTACKS = tuple(PGD_STEPS)  # the PGDs every table runs, weakest first
HEADLINE_PGD = max(PGD_STEPS, key=PGD_STEPS.get)  # the PGD tables and figures quote: the one with the most steps
AA_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")  # pyautoattack's attack names
AA_STANDARD = ["apgd-ce", "apgd-t", "fab-t", "square"]  # AutoAttack's standard version


def check_aa_attacks(names: Sequence[str]) -> None:
    """evaluation.aa_attacks names only pyautoattack's attacks (checked when a run opens its preset)."""
    for a in names:
        if a not in AA_ATTACKS:
            raise BadInput(f"unknown evaluation.aa_attacks entry {a!r}; known: {', '.join(AA_ATTACKS)}")


def attack_label(name: str) -> str:
    """The column title of an attack (or of `worst`), e.g. PGD-20."""
    if name == "worst":
        return "worst case"
    return REGISTRY[name].label if name in REGISTRY else name


def autoattack_name(attacks: Sequence[str] | None) -> str:
    """'AutoAttack' when its standard version ran; else which of its attacks, so nobody mistakes a
    cheaper subset for the full evaluation."""
    if not attacks or list(attacks) == AA_STANDARD:
        return "AutoAttack"
    return f"AutoAttack ({', '.join(a.upper() for a in attacks)} only)"
