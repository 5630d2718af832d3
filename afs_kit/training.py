"""Moved to `afs_kit.train.progress` and `afs_kit.train.extractors`; this import path stays for one release (the README and older notebooks use it)."""
from .train.extractors import *  # noqa: F401,F403
from .train.progress import *  # noqa: F401,F403
