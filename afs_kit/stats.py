"""Moved to `afs_kit.core.stats`; this import path stays for one release (the README and older notebooks use it)."""
from .core.stats import *  # noqa: F401,F403
