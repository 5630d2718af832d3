"""Moved to `afs_kit.app.cli`; this import path stays for one release (the README and older notebooks use it)."""
from .app.cli import *  # noqa: F401,F403
