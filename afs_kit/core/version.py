"""Which code made a result: the git commit of the checkout ("-dirty" when tracked files have
uncommitted changes), else the installed package's version. Stored in run.json, every
metrics.json and summary.json, so a number can be traced to the code as well as to its config.

`afs-kit report` captures it once and hands it to every notebook through AFS_KIT_CODE_VERSION, so a
report that spans a commit is not split in two.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import subprocess
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

ENV = "AFS_KIT_CODE_VERSION"
ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def _from_git() -> str | None:
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("diff", "--quiet", "HEAD", "--", "afs_kit", "notebooks").returncode != 0
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip()[:12] + ("-dirty" if dirty else "")


def code_version() -> str:
    """`AFS_KIT_CODE_VERSION` when a report set it, else the checkout's commit, else `afs-kit <version>`."""
    if os.environ.get(ENV):
        return os.environ[ENV]
    found = _from_git()
    if found:
        return found
    try:
        return f"afs-kit {metadata.version('afs-kit')}"
    except metadata.PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def pinned_code_version() -> Iterator[str]:
    """Fix the code version (in the environment, which notebook kernels inherit) for the duration."""
    old = os.environ.get(ENV)
    os.environ[ENV] = code_version()
    try:
        yield os.environ[ENV]
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


class VersionAction(argparse.Action):
    """`afs-kit --version`: the package's version and the code's (git commit, "-dirty"), computed only when asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the package and code versions and exit", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            package = metadata.version("afs-kit")
        except metadata.PackageNotFoundError:
            package = "(not installed)"
        code = code_version()
        print(f"afs-kit {package}" + ("" if code == f"afs-kit {package}" else f" (code {code})"))
        parser.exit(0)
