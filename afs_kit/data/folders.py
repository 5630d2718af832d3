"""Image folders (torchvision's ImageFolder layout, PATH/train/<class>/*, PATH/test/<class>/*) and archives
of them, decoded into one uint8 tensor per split; `data.load_dataset("folder:PATH")` calls this."""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from ..core.io import atomic_write
from ..errors import BadInput
from .dataset import Dataset

ARCHIVES = (".tar", ".tar.gz", ".tgz", ".tar.xz")


def _read_bytes(path: str) -> torch.Tensor:
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)  # bytearray: a writable buffer


def _decode_images(paths: list[str], where: Path) -> torch.Tensor:
    """Decode image files into one uint8 tensor [N,C,H,W]; all images must have the same size.

    torchvision's decoders: about 3x faster than PIL on small JPEGs (60,000 CIFAR-10 JPEGs in a few seconds).
    torchvision 0.29 deprecates them in favour of TorchCodec, which this project does not depend on; the
    deprecation warning (one per image) is silenced here only.
    """
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    datas = [_read_bytes(p) for p in paths]
    images: list[torch.Tensor] = []
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"The image decoding .* TorchVision are deprecated", category=DeprecationWarning
        )
        # JPEGs (magic bytes FF D8) in one call of the list form of decode_jpeg; other formats one by one
        is_jpeg = [len(d) > 2 and d[:2].tolist() == [0xFF, 0xD8] for d in datas]
        jpeg_datas = [d for d, j in zip(datas, is_jpeg) if j]
        jpegs = iter(decode_jpeg(jpeg_datas, mode=ImageReadMode.UNCHANGED) if jpeg_datas else [])
        for d, j in zip(datas, is_jpeg):
            images.append(next(jpegs) if j else decode_image(d, mode=ImageReadMode.UNCHANGED))
    # one channel count for all: grey when every image is grey, else RGB (grey repeated, alpha dropped)
    target_c = 1 if {int(img.shape[0]) for img in images} <= {1, 2} else 3
    for i, img in enumerate(images):
        if img.shape[0] != target_c:
            images[i] = img[:1].expand(3, -1, -1) if (target_c == 3 and img.shape[0] < 3) else img[:target_c]
    size = images[0].shape[1:]
    for p, img in zip(paths, images):
        if img.shape[1:] != size:
            raise BadInput(
                f"images in {str(where)!r} must share one size (no resizing is done): {p} is "
                f"{tuple(img.shape[1:])}, {paths[0]} is {tuple(size)}"
            )
    return torch.stack(images)


def _check_split_dir(split_dir: Path) -> None:
    layout = "(layout PATH/train/<class>/*, PATH/test/<class>/*)"
    if not split_dir.is_dir():
        raise BadInput(f"folder data set needs {str(split_dir)!r} {layout}")
    if not any(p.is_dir() for p in split_dir.iterdir()):
        raise BadInput(f"no class folders in {str(split_dir)!r} {layout}")


def _image_folder(split_dir: Path) -> tuple[list[str], list[int], list[str]]:
    from torchvision.datasets import ImageFolder

    # ImageFolder for the listing and the class names only (the loader is never called); decoding is ours
    folder = ImageFolder(str(split_dir), loader=str, allow_empty=True)
    empty = sorted(set(folder.classes) - {folder.classes[t] for _, t in folder.samples})
    if empty:
        raise BadInput(f"class folders without images in {str(split_dir)!r}: {empty}")
    return [p for p, _ in folder.samples], [t for _, t in folder.samples], list(folder.classes)


def unpacked(path: Path, root: Path) -> Path:
    """A folder as it is, or an archive of one unpacked once into root/archives/<name>-<size> (atomically)."""
    if not path.name.endswith(ARCHIVES) or not path.is_file():
        return path
    import tarfile

    target = root / "archives" / f"{path.name.split('.')[0]}-{path.stat().st_size}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=target.parent)
        try:
            with tarfile.open(path) as tar:
                tar.extractall(tmp, filter="data")  # "data": no absolute paths, links out or devices
            os.replace(tmp, target)  # the folder appears whole or not at all
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


# beside an unpacked archive (whose files never change): its decoded images, so each stage of a run (one process
# each) reads them in a second instead of decoding 60,000 JPEGs again (7 s on 2 CPU cores)
DECODED = "decoded.pt"


def load_folder(spec: str, path: Path, from_archive: bool = False) -> Dataset:
    """The images of an ImageFolder layout; `from_archive`: `path` is an archive `unpacked` (decoded once)."""
    if not path.is_dir():
        raise FileNotFoundError(f"image folder not found: {str(path)!r} (from spec={spec!r})")
    cache = path.with_name(path.name + "." + DECODED) if from_archive else None
    if cache is not None and cache.is_file():
        saved = torch.load(cache, weights_only=True)
        return Dataset(name=spec, **saved["arrays"], classes=tuple(saved["classes"]))
    _check_split_dir(path / "train")
    _check_split_dir(path / "test")
    train_paths, train_labels, classes = _image_folder(path / "train")
    test_paths, test_labels, test_classes = _image_folder(path / "test")
    if test_classes != classes:
        # ImageFolder numbers classes by sorted folder name per split: different folders would shift labels
        raise BadInput(
            f"class folders differ between {str(path / 'train')!r} and {str(path / 'test')!r}: "
            f"{sorted(set(classes) ^ set(test_classes))}"
        )
    x_train = _decode_images(train_paths, path / "train")
    x_test = _decode_images(test_paths, path / "test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise BadInput(
            f"train and test images in {str(path)!r} differ in shape: {tuple(x_train.shape[1:])} vs "
            f"{tuple(x_test.shape[1:])}"
        )
    arrays = dict(x_train=x_train, y_train=torch.tensor(train_labels, dtype=torch.int64), x_test=x_test,
                  y_test=torch.tensor(test_labels, dtype=torch.int64))
    if cache is not None:  # whole or not at all
        atomic_write(cache, lambda f: torch.save({"arrays": arrays, "classes": list(classes)}, f))
    return Dataset(name=spec, **arrays, classes=tuple(classes))
