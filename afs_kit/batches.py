"""Moved to `afs_kit.data.batches`; this import path stays for one release (the README and older notebooks use it)."""
from .data.batches import *  # noqa: F401,F403
