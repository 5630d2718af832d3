"""The run directory: atomic writes, the one checkpoint format, config keys and a writer's lock.

Layout of a run directory::

    RUN/run.json                            preset, data spec, classes (written once)
    RUN/extractors/eps-8-255/last.pt        resume point, rewritten after every epoch
    RUN/extractors/eps-8-255/extractor.pt   the early-stopped weights + config + metrics
    RUN/outside/<name>/extractor.pt         an extractor from outside the kit (RobustBench, any network)
    RUN/mergers/<subset>-alpha-0.5/merger.pt
    RUN/eval/<model>/metrics.json, flags.pt
    RUN/figures/*.png, RUN/summary.json
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import Any

from ..config import LEGACY_ZERO_NAME, budget_name
from ..core.io import read_json, write_json
from ..errors import BadInput, RunInUse


class RunLock:
    """One writer per run directory: a second run is refused with the holder named.

    An advisory `flock` on RUN/.lock: the kernel drops it when its holder dies, however it dies,
    so a SIGKILLed run never leaves a lock behind (no pid guessing, no stale-lock races). The file
    holds "pid N on HOST" of the holder, for the message.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        if self.held:
            raise RuntimeError(f"the lock {self.path} is already held by this RunLock")
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process that is starting"
                os.close(fd)
                raise RunInUse(f"run directory {self.path.parent} is in use by {holder}; "
                                   f"wait for it to finish") from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file between our open and our lock
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            self._fd = fd
            return self

    def _open(self) -> int:
        """The lock file's descriptor (made, with the run directory, when missing); a run directory that
        cannot be written or is a file gives a one-line error naming it."""
        root = self.path.parent
        try:
            root.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_CREAT | os.O_RDWR, 0o666)
        except PermissionError:
            what = f"is not writable (cannot write {self.path})" if root.is_dir() else "cannot be created here"
            raise PermissionError(f"run directory {root} {what}: permission denied; make it writable or use "
                                  f"another run directory") from None
        except (FileExistsError, NotADirectoryError):
            raise BadInput(f"run directory {root} is a file, not a directory (or lies under one)") from None

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            # unlink while still locked, so a waiter that opened the old file sees it is gone and retries
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


# the run directories this process writes, with how many stages hold each (a stage inside another shares its lock)
_HELD: dict[Path, int] = {}
# run directories a parent process holds for its children (`afs-kit report`'s notebook kernels), os.pathsep-separated
INHERITED_ENV = "AFS_KIT_RUN_LOCKED_BY_PARENT"


@contextlib.contextmanager
def writer(run_dir: str | Path, children: bool = False):
    """This process as the run directory's one writer while a stage writes: its lock taken (a second writer
    elsewhere is refused with the holder named), or shared when a stage of this process, or the parent that
    started it with `children=True`, holds it already. Reading never takes it."""
    root = Path(run_dir).resolve()
    inherited = os.environ.get(INHERITED_ENV, "").split(os.pathsep)
    if root in _HELD or str(root) in inherited:
        _HELD[root] = _HELD.get(root, 0) + 1
        try:
            yield
        finally:
            _HELD[root] -= 1
            if not _HELD[root]:
                del _HELD[root]
        return
    with RunLock(root):
        _HELD[root] = 1
        old = os.environ.get(INHERITED_ENV)
        if children:
            os.environ[INHERITED_ENV] = os.pathsep.join(filter(None, [old, str(root)]))
        try:
            yield
        finally:
            del _HELD[root]
            if children:
                os.environ.pop(INHERITED_ENV) if old is None else os.environ.__setitem__(INHERITED_ENV, old)


PROJECT_ROOT = Path(__file__).resolve().parents[2]
# "RUN::FOLDER": a report of a run it cannot write keeps the notebooks' summary.json (their sentences, the
# seeds' rows) under FOLDER instead of RUN; set by `app.reports` and inherited by the notebooks' kernels
SUMMARY_OVERLAY_ENV = "AFS_KIT_SUMMARY_OVERLAY"


def _summary_overlay(root: Path) -> Path | None:
    value = os.environ.get(SUMMARY_OVERLAY_ENV)
    if not value:
        return None
    run, folder = value.split("::", 1)
    try:
        return Path(folder) / Path(root).resolve().relative_to(Path(run).resolve())
    except ValueError:  # another run than the report's
        return None


def default_run_dir(preset: str, seed: int = 0) -> Path:
    """The one default run directory of the command line, the reports and the notebooks:
    `runs/<preset>` (`runs/<preset>-seed<s>` for another notebook SEED) under the project when the kit
    runs from its checkout (notebooks execute in notebooks/, the command line anywhere), else under
    the working directory."""
    root = PROJECT_ROOT if (PROJECT_ROOT / "pyproject.toml").is_file() else Path.cwd()
    return root / "runs" / (preset if seed == 0 else f"{preset}-seed{seed}")


def model_name(kind: str, what) -> str:
    """A model's name in evaluation records, the same from the command line and the notebooks:
    extractor-eps-8-255, afs-<merger folder>, avg-<subset vector>, ablation-<which>."""
    return f"extractor-{budget_name(what)}" if kind == "extractor" else f"{kind}-{what}"


def _or_legacy(folder: Path, name: str) -> Path:
    """`folder / name`, or, for budget 0's extractor folder and its records, the folder a run made before budget 0
    was renamed holds for it (`LEGACY_ZERO_NAME`)."""
    path, zero = folder / name, budget_name(0)
    if (name == zero or name.startswith(f"extractor-{zero}--")) and not path.exists():
        legacy = folder / name.replace(zero, LEGACY_ZERO_NAME, 1)
        if legacy.exists():
            return legacy
    return path


class RunDir:
    """Paths inside one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def info_path(self) -> Path:
        return self.root / "run.json"

    def extractor_dir(self, name: str) -> Path:
        return _or_legacy(self.extractors_dir, name)

    def outside_dir(self, name: str) -> Path:
        """An extractor added from outside the kit (`outside.add_outside`)."""
        return self.root / "outside" / name

    def outside_names(self) -> list[str]:
        base = self.root / "outside"
        return sorted(p.name for p in base.iterdir() if (p / "extractor.pt").is_file()) if base.is_dir() else []

    def merger_dir(self, name: str) -> Path:
        return self.mergers_dir / name

    def control_dir(self, name: str) -> Path:
        """A control model's merger (the same-budget ensemble): beside the mergers, never one of their subsets."""
        return self.root / "controls" / name

    def seed_dir(self, seed: int) -> Path:
        """Another training seed's complete run inside this one."""
        return self.root / "seeds" / f"seed-{seed}"

    def ablation_dir(self, which: str) -> Path:
        """Table 6's extra networks: "random-budget", "large-model"."""
        return self.root / "ablation" / which

    @property
    def selection_path(self) -> Path:
        """The concavity rule's choice, made on validation images."""
        return self.root / "selection.json"

    def curve_path(self, key: str) -> Path:
        """One cached robustness-vs-budget curve (fig. 5a)."""
        return self.root / "analysis" / "curves" / f"{key}.json"

    @property
    def mergers_dir(self) -> Path:
        return self.root / "mergers"

    @property
    def extractors_dir(self) -> Path:
        return self.root / "extractors"

    def eval_dir(self, name: str) -> Path:
        """The folder of evaluation record `name` (see `evaluation_name`)."""
        return _or_legacy(self.root / "eval", name)

    @staticmethod
    def evaluation_name(model: str, n_examples: int, settings_key: str) -> str:
        """The one name of `model`'s evaluation record on the first `n_examples` test images under
        the settings hashed in `settings_key` (budget, step, seed, precision): the command line and
        the notebooks call this alike, so each reuses the other's attacks."""
        return f"{model}--n{n_examples}--{settings_key[:6]}"

    def evaluation_sizes(self, model: str, settings_key: str) -> list[int]:
        """The example counts of `model`'s evaluation records under `settings_key`, largest first."""
        root, prefix, suffix = self.root / "eval", f"{model}--n", f"--{settings_key[:6]}"
        counts = (p.name[len(prefix):-len(suffix)] for p in (root.iterdir() if root.is_dir() else ())
                  if p.name.startswith(prefix) and p.name.endswith(suffix))
        return sorted((int(c) for c in counts if c.isdigit()), reverse=True)

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def summary_path(self) -> Path:
        overlay = _summary_overlay(self.root)
        return (overlay or self.root) / "summary.json"

    def writable(self) -> bool:
        """Whether this process may write the (existing) run directory: a colleague's run on a read-only
        mount or in another user's folder is read without the lock."""
        return os.access(self.root, os.W_OK)

    def lock(self, children: bool = False):
        """The run directory's lock for a stage that writes (`writer`)."""
        return writer(self.root, children)

    def extractor_names(self) -> list[str]:
        """Names of the extractors that finished training."""
        base = self.extractors_dir
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if (p / "extractor.pt").is_file())

    def update_summary(self, key: str, value: Any) -> None:
        """Each notebook or stage writes its part of summary.json (a read-only run's report: its own copy)."""
        with self.lock() if _summary_overlay(self.root) is None else contextlib.nullcontext():
            summary = read_json(self.summary_path) if self.summary_path.is_file() else {}
            summary[key] = value
            write_json(self.summary_path, summary)
