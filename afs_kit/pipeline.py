"""Moved to `afs_kit.run.pipeline`; this import path stays for one release (the README and older notebooks use it)."""
from .run.pipeline import *  # noqa: F401,F403
