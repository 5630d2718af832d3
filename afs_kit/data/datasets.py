"""Data sets as uint8 tensors in memory, batched augmentation on the device, a fixed validation split.

The whole data set is held as tensors (airbench style): images uint8 ``[N, C, H, W]``, labels int64 ``[N]``.
``to_float`` / ``augment`` turn a batch into float32 pixels in [0, 1] on whatever device the batch lives on.

Specs understood by :func:`load_dataset`:

- ``"digits"``: scikit-learn's 8x8 digits, always offline (1,797 images, 1 channel). scikit-learn has no
  official split, so a fixed one is used: a stratified 80/20 split with ``random_state=0``.
- ``"cifar10"``, ``"cifar100"``: torchvision's files under ``root``; downloaded where the internet answers.
- ``"fashion-mnist"``: torchvision's files (``root/FashionMNIST/raw``) or the four IDX ``.gz`` files directly
  in ``root`` (the layout of Debian's ``dataset-fashion-mnist`` package, /usr/share/datasets/fashion-mnist).
- ``"npz:PATH"``: arrays ``x_train, y_train, x_test, y_test`` (images HWC, CHW or [N, H, W]), optional ``classes``.
- ``"folder:PATH"``: ``PATH/train/<class>/*`` and ``PATH/test/<class>/*`` (torchvision ImageFolder layout);
  PATH may be a ``.tar``/``.tar.gz``/``.tar.xz`` archive of that layout, unpacked once into ``root/archives``.
- ``"train-test:A|B"``: the training images of spec A and the test images of spec B (same classes and image
  size), e.g. training on the JPEG CIFAR-10 folder and testing on the lossless images of an npz.

``root`` defaults to ``$AFS_KIT_DATA``, else ``~/.cache/afs-kit/data``.
"""

from __future__ import annotations

import gzip
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch

from ..errors import BadInput
from .dataset import Dataset
from .folders import load_folder, unpacked

DATASET_SPECS = ("digits", "cifar10", "cifar100", "fashion-mnist", "npz:PATH", "folder:PATH", "train-test:A|B")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_REACH_TIMEOUT_S = 3.0  # the download check must fail fast on machines without internet

_FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}




def default_root() -> Path:
    """Where torchvision-style files live when no root is given: ``$AFS_KIT_DATA``, else ``~/.cache/afs-kit/data``."""
    env = os.environ.get("AFS_KIT_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "afs-kit" / "data"


def load_dataset(spec: str, root: str | Path | None = None) -> Dataset:
    """Load a data set by spec (see the module docstring) with its official train/test split unchanged.

    ``root`` is used by ``cifar10``, ``cifar100`` and ``fashion-mnist`` only; ``npz:`` and ``folder:`` carry
    their own path. Where a source gives no class names, the classes are named by number ("0", "1", ...).
    """
    if not isinstance(spec, str):
        raise BadInput(f"spec must be a string, one of {', '.join(DATASET_SPECS)}; got spec={spec!r}")
    root_path = Path(root).expanduser() if root is not None else None
    if spec == "digits":
        return _load_digits()
    if spec in ("cifar10", "cifar100"):
        return _load_cifar(spec, root_path or default_root())
    if spec == "fashion-mnist":
        return _load_fashion_mnist(root_path)
    if spec.startswith("train-test:"):
        return _load_train_test(spec, root)
    kind, sep, path = spec.partition(":")
    if sep and kind in ("npz", "folder"):
        if not path:
            raise BadInput(f"spec {kind}:PATH needs a path, got spec={spec!r}")
        if kind == "npz":
            return _load_npz(spec, Path(path).expanduser())

        given = Path(path).expanduser()
        folder = unpacked(given, root_path or default_root())
        return load_folder(spec, folder, from_archive=folder != given)
    raise BadInput(f"unknown data set spec={spec!r}; known specs: {', '.join(DATASET_SPECS)}")


# ----------------------------------------------------------------------------------------------- loaders


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # values 0..16 -> 0..255, rounded half up (8 -> 128)
    images = np.floor(bunch.images * (255.0 / 16.0) + 0.5).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    idx = np.arange(len(labels))
    # scikit-learn ships no split: a fixed stratified 80/20 one, in the original order within each part
    train_idx, test_idx = train_test_split(idx, test_size=0.2, random_state=0, stratify=labels)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return Dataset(
        name="digits",
        x_train=torch.from_numpy(images[train_idx]),
        y_train=torch.from_numpy(labels[train_idx]),
        x_test=torch.from_numpy(images[test_idx]),
        y_test=torch.from_numpy(labels[test_idx]),
        classes=tuple(str(c) for c in bunch.target_names),
    )


def _host_reachable(url: str, timeout: float = _REACH_TIMEOUT_S) -> tuple[bool, str]:
    """Whether the host of ``url`` accepts a TCP connection within ``timeout`` s, and why not.

    Runs in a daemon thread because name resolution ignores socket timeouts and can hang far longer.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    result: list[str] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append("")
        except OSError as err:  # reported to the caller through `result`
            result.append(f"{type(err).__name__}: {err}")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if not result:
        return False, f"{host}:{port} did not answer within {timeout:g} s"
    if result[0]:
        return False, f"{host}:{port} is unreachable ({result[0]})"
    return True, ""


def _load_cifar(spec: str, root: Path) -> Dataset:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if spec == "cifar10" else torchvision.datasets.CIFAR100
    folder = root / cls.base_folder
    if not folder.is_dir():
        ok, reason = _host_reachable(cls.url)
        if not ok:
            raise FileNotFoundError(
                f"{spec} files not found under root={str(root)!r} (expected the folder {str(folder)!r}) and the "
                f"download failed: {reason}. Put {cls.filename} extracted (the folder {cls.base_folder}) "
                f"under {str(root)!r}, or pass root= / set AFS_KIT_DATA to where the files are."
            )
        try:
            cls(str(root), train=True, download=True)
        except (OSError, RuntimeError) as err:
            raise RuntimeError(
                f"{spec}: download into root={str(root)!r} failed ({err}). Put {cls.filename} extracted "
                f"(the folder {cls.base_folder}) under {str(root)!r}."
            ) from err
    try:
        train, test = cls(str(root), train=True), cls(str(root), train=False)
    except RuntimeError as err:  # torchvision's message names no path; say which files failed
        raise RuntimeError(
            f"{spec} files in {str(folder)!r} are incomplete or corrupted ({err}). Replace them with "
            f"{cls.filename} extracted under root={str(root)!r}."
        ) from err
    return Dataset(
        name=spec,
        x_train=torch.from_numpy(train.data).permute(0, 3, 1, 2).contiguous(),
        y_train=torch.tensor(train.targets, dtype=torch.int64),
        x_test=torch.from_numpy(test.data).permute(0, 3, 1, 2).contiguous(),
        y_test=torch.tensor(test.targets, dtype=torch.int64),
        classes=tuple(train.classes),
    )


def _fashion_files(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in ``folder``, plain or gzipped, or None when any is missing."""
    found = {}
    for key, stem in _FASHION_FILES.items():
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    # header: two zero bytes, type code (0x08 = unsigned byte), number of dimensions, then big-endian sizes
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != expected_dims:
        raise BadInput(f"{path} is not an unsigned-byte IDX file with {expected_dims} dimensions")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=expected_dims, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * expected_dims)
    if data.size != int(np.prod(shape)):
        raise BadInput(f"{path}: header says shape {shape} but holds {data.size} bytes")
    return data.reshape(shape)


def _load_fashion_mnist(root: Path | None) -> Dataset:
    import torchvision

    cls = torchvision.datasets.FashionMNIST
    roots = [root] if root is not None else [default_root(), DEBIAN_FASHION_MNIST]
    # torchvision's layout first, then the gz files directly in the root (Debian's package)
    candidates = [folder for r in roots for folder in (r / cls.__name__ / "raw", r)]
    files = next((f for f in map(_fashion_files, candidates) if f is not None), None)
    if files is None:
        target = roots[0]
        url = cls.mirrors[0] + cls.resources[0][0]
        ok, reason = _host_reachable(url)
        if not ok:
            raise FileNotFoundError(
                f"fashion-mnist files not found in {', '.join(repr(str(c)) for c in candidates)} and the download "
                f"failed: {reason}. Put the four files {', '.join(s + '.gz' for s in _FASHION_FILES.values())} "
                f"in {str(target)!r} (or install Debian's dataset-fashion-mnist), or pass root=."
            )
        try:
            cls(str(target), train=True, download=True)
        except (OSError, RuntimeError) as err:
            raise RuntimeError(f"fashion-mnist: download into root={str(target)!r} failed ({err})") from err
        files = _fashion_files(target / cls.__name__ / "raw")
        if files is None:
            raise RuntimeError(f"fashion-mnist: download into root={str(target)!r} left no IDX files")
    arrays = {key: _read_idx(path, 3 if key.startswith("x") else 1) for key, path in files.items()}
    return Dataset(
        name="fashion-mnist",
        x_train=torch.from_numpy(arrays["x_train"].copy())[:, None],
        y_train=torch.from_numpy(arrays["y_train"].astype(np.int64)),
        x_test=torch.from_numpy(arrays["x_test"].copy())[:, None],
        y_test=torch.from_numpy(arrays["y_test"].astype(np.int64)),
        classes=tuple(cls.classes),
    )


def _images_to_nchw(x: np.ndarray, what: str) -> torch.Tensor:
    """uint8 images [N,H,W], [N,H,W,C] or [N,C,H,W] -> uint8 tensor [N,C,H,W]."""
    in_range = x.size == 0 or (x.min() >= 0 and x.max() <= 255)
    if not (x.dtype == np.uint8 or (np.issubdtype(x.dtype, np.integer) and in_range)):
        raise BadInput(f"{what} must hold uint8 pixels 0..255, got dtype={x.dtype}")
    x = x.astype(np.uint8, copy=False)
    if x.ndim == 3:
        return torch.from_numpy(np.ascontiguousarray(x[:, None]))
    if x.ndim != 4:
        raise BadInput(f"{what} must have shape [N,H,W], [N,H,W,C] or [N,C,H,W], got shape={x.shape}")
    # channels last when the last axis looks like channels, else channels first
    if x.shape[-1] in (1, 3, 4):
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    if x.shape[1] in (1, 3, 4):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise BadInput(f"{what} has no channel axis of size 1, 3 or 4 (first or last), got shape={x.shape}")


def _labels(y: np.ndarray, n_images: int, what: str) -> torch.Tensor:
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
        raise BadInput(f"{what} must be a 1-D integer array, got dtype={y.dtype}, shape={y.shape}")
    if len(y) != n_images:
        raise BadInput(f"{what} has {len(y)} labels but there are {n_images} images")
    if len(y) and y.min() < 0:
        raise BadInput(f"{what} must be >= 0, got a label {int(y.min())}")
    return torch.from_numpy(y.astype(np.int64))


def _classes_or_numbers(
    classes: tuple[str, ...] | None, y_train: torch.Tensor, y_test: torch.Tensor, where: str
) -> tuple[str, ...]:
    top = max([int(y.max()) for y in (y_train, y_test) if len(y)], default=-1)
    if classes is None:
        return tuple(str(i) for i in range(top + 1))
    if top >= len(classes):
        raise BadInput(f"{where}: labels must be < len(classes)={len(classes)}, got a label {top}")
    return classes


def _load_npz(spec: str, path: Path) -> Dataset:
    if not path.is_file():
        raise FileNotFoundError(f"npz file not found: {str(path)!r} (from spec={spec!r})")
    # allow_pickle=False: an npz is data, never code; class names must be a string array
    with np.load(path, allow_pickle=False) as npz:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in npz.files]
        if missing:
            raise BadInput(
                f"{str(path)!r} lacks the array(s) {', '.join(missing)}; it has {', '.join(npz.files) or 'none'}"
            )
        x_train = _images_to_nchw(npz["x_train"], f"x_train in {str(path)!r}")
        x_test = _images_to_nchw(npz["x_test"], f"x_test in {str(path)!r}")
        y_train = _labels(npz["y_train"], len(x_train), f"y_train in {str(path)!r}")
        y_test = _labels(npz["y_test"], len(x_test), f"y_test in {str(path)!r}")
        classes = tuple(str(c) for c in npz["classes"].reshape(-1)) if "classes" in npz.files else None
    classes = _classes_or_numbers(classes, y_train, y_test, repr(str(path)))
    return Dataset(name=spec, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, classes=classes)


def _load_train_test(spec: str, root) -> Dataset:
    train_spec, sep, test_spec = spec.removeprefix("train-test:").partition("|")
    if not (sep and train_spec and test_spec):
        raise BadInput(f"spec train-test:A|B needs two specs, got spec={spec!r}")
    train, test = load_dataset(train_spec, root), load_dataset(test_spec, root)
    if train.classes != test.classes or train.image_shape != test.image_shape:
        raise BadInput(f"spec={spec!r}: the two data sets differ in classes or image size ({train.classes}, "
                       f"{train.image_shape} vs {test.classes}, {test.image_shape})")
    return Dataset(name=spec, x_train=train.x_train, y_train=train.y_train, x_test=test.x_test, y_test=test.y_test,
                   classes=train.classes)
