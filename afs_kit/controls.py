"""Moved to `afs_kit.run.controls`; this import path stays for one release (the README and older notebooks use it)."""
from .run.controls import *  # noqa: F401,F403
