"""Moved to `afs_kit.models.stack` and `afs_kit.train.merger`; this import path stays for one release (the README and older notebooks use it)."""
from .models.stack import *  # noqa: F401,F403
from .train.merger import *  # noqa: F401,F403
