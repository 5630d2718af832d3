"""Atomic writes, JSON and the one checkpoint format: nothing half-written is ever read back."""
from __future__ import annotations

import json
import os
import secrets
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointMismatch

FORMAT = "afs-kit/1"


def atomic_write(path: Path, write) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a kill leaves old or new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # not mkstemp: its files are 0600; os.open with 0o666 lets the umask decide, as for any new file
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if path.is_file():  # a rewritten file keeps its permissions
                os.chmod(f.fileno(), path.stat().st_mode & 0o7777)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    data = json.dumps(obj, indent=2, sort_keys=False, default=_json_default).encode()
    atomic_write(Path(path), lambda f: f.write(data + b"\n"))


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a truncated or foreign file gives a ValueError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointMismatch(f"{path} is not valid JSON ({err}); it may be truncated or foreign") from err


def save_checkpoint(path: str | Path, obj: dict) -> None:
    """The one checkpoint writer: a dict of tensors and plain containers, tagged and written atomically."""
    if not isinstance(obj, dict):
        raise CheckpointMismatch(f"a checkpoint must be a dict, got {type(obj).__name__}")
    payload = {"format": FORMAT, "torch_version": str(torch.__version__), **obj}
    atomic_write(Path(path), lambda f: torch.save(payload, f))


_REMAKE = ("delete the file and rerun the command that wrote it (train-extractors for an extractor, train-merger "
           "for a merger) to train it again")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The one reader. `weights_only=True`: a pickle payload that would run code is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise CheckpointMismatch(f"checkpoint {path} is not a torch zip archive (truncated or foreign file); "
                                 f"expected an afs-kit checkpoint written by afs_kit.runs.save_checkpoint; {_REMAKE}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or EOFError depending on damage
        raise CheckpointMismatch(f"checkpoint {path} could not be read safely as an afs-kit checkpoint "
                                 f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                                 f"refusing to load it; {_REMAKE}") from err
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointMismatch(f"checkpoint {path} has format {found!r}, expected {FORMAT!r}")
    return obj


def expect(ckpt: dict, path: str | Path, **wanted) -> None:
    """Refuse a checkpoint made for other data, class count or architecture than the run asks for."""
    differ = [key for key, value in wanted.items() if ckpt.get(key) != value]
    if differ:
        made = ", ".join(f"{key}={ckpt.get(key)!r}" for key in differ)
        needed = ", ".join(f"{key}={wanted[key]!r}" for key in differ)
        raise CheckpointMismatch(f"checkpoint {path} was made for {made}, but this run needs {needed}; refusing to use it")


