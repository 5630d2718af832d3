"""Moved to `afs_kit.explain.analysis`, `afs_kit.explain.paper` and `afs_kit.explain.selection`; this import path stays for one release (the README and older notebooks use it)."""
from .explain.analysis import *  # noqa: F401,F403
from .explain.paper import *  # noqa: F401,F403
from .explain.selection import *  # noqa: F401,F403
