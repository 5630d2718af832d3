"""Moved to `afs_kit.core.device`; this import path stays for one release (the README and older notebooks use it)."""
from .core.device import *  # noqa: F401,F403
