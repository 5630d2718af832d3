"""Layer 4: PGD, AutoAttack through pyautoattack, Square, and the one registry of evaluation attacks."""
from .methods import autoattack, pgd, random_starts, square_attack

__all__ = ["autoattack", "pgd", "random_starts", "square_attack"]
