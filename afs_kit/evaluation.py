"""Moved to `afs_kit.eval.flags` and `afs_kit.eval.evaluation` and `afs_kit.eval.masking`; this import path stays for one release (the README and older notebooks use it)."""
from .eval.evaluation import *  # noqa: F401,F403
from .eval.flags import *  # noqa: F401,F403
from .eval.masking import *  # noqa: F401,F403
