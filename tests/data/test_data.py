"""Tests for afs_kit.data (the package) on real data: scikit-learn's digits, the CIFAR-10 files in ../shared/data, and
Debian's Fashion-MNIST package."""

from __future__ import annotations

import re
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
from conftest import JPEG_ARCHIVE, MINI_NPZ

from afs_kit.data import datasets as afs_data
from afs_kit.data.batches import augment, iterate_batches, to_float, validation_split
from afs_kit.data.dataset import Dataset
from afs_kit.data.datasets import load_dataset

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
JPEG_PER_CLASS = 50  # files 0000-0049 of each class: the test stays quick, the archive is still read for real

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

needs_fashion = pytest.mark.skipif(
    not afs_data.DEBIAN_FASHION_MNIST.is_dir(),
    reason=f"{afs_data.DEBIAN_FASHION_MNIST} absent (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def mini() -> Dataset:
    if not MINI_NPZ.is_file():
        pytest.skip(f"real CIFAR-10 sample absent: {MINI_NPZ}")
    return load_dataset(f"npz:{MINI_NPZ}")


@pytest.fixture(scope="module")
def raw_mini() -> dict[str, np.ndarray]:
    if not MINI_NPZ.is_file():
        pytest.skip(f"real CIFAR-10 sample absent: {MINI_NPZ}")
    with np.load(MINI_NPZ) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not JPEG_ARCHIVE.is_file():
        pytest.skip(f"CIFAR-10 JPEG archive absent: {JPEG_ARCHIVE}")
    out = tmp_path_factory.mktemp("cifar10-jpeg")
    # streamed: an xz archive has no index, so every member is read; only the first files of each class are written
    with tarfile.open(JPEG_ARCHIVE, "r|xz") as tar:
        for member in tar:
            if member.isfile() and int(PurePosixPath(member.name).stem) < JPEG_PER_CLASS:
                tar.extract(member, out, filter="data")
    return out


def write_npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return f"npz:{path}"


def check_dataset(ds: Dataset) -> None:
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == torch.uint8 and x.dim() == 4 and tuple(x.shape[1:]) == ds.image_shape
        assert y.dtype == torch.int64 and y.shape == (len(x),)
        assert int(y.min()) >= 0 and int(y.max()) < ds.num_classes


# ------------------------------------------------------------------------------------------- loaders


def test_digits_values_split_and_determinism() -> None:
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    check_dataset(ds)
    ref = load_digits()
    assert len(ds.x_train) + len(ds.x_test) == 1797 and len(ds.x_test) == 360
    assert ds.image_shape == (1, 8, 8) and ds.classes == tuple(str(i) for i in range(10))
    assert int(ds.x_train.max()) == 255 and int(ds.x_train.min()) == 0
    # every pixel is round(v * 255 / 16) of the original 0..16 value
    all_x = torch.cat([ds.x_train, ds.x_test]).double()
    levels = torch.tensor([np.floor(v * 255 / 16 + 0.5) for v in range(17)], dtype=torch.float64)
    assert torch.isin(all_x, levels).all()
    assert all_x.sum() == pytest.approx(np.floor(ref.images * 255 / 16 + 0.5).sum())
    # the split is stratified: the test set holds 20% of each class (to within one image)
    ref_counts = np.bincount(ref.target, minlength=10)
    test_counts = torch.bincount(ds.y_test, minlength=10).numpy()
    assert np.abs(test_counts - 0.2 * ref_counts).max() <= 1
    assert (torch.bincount(ds.y_train, minlength=10).numpy() + test_counts == ref_counts).all()
    again = load_dataset("digits")
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_test, ds.y_test)


def test_cifar10_mini_npz(mini: Dataset, raw_mini: dict[str, np.ndarray]) -> None:
    check_dataset(mini)
    assert mini.x_train.shape == (4000, 3, 32, 32) and mini.x_test.shape == (1000, 3, 32, 32)
    assert mini.classes == CIFAR10_CLASSES and mini.num_classes == 10
    counts = torch.bincount(mini.y_test, minlength=10)
    assert int(counts.min()) >= 86 and int(counts.max()) <= 112
    # HWC in the file, CHW in memory, pixels unchanged
    assert np.array_equal(mini.x_train.permute(0, 2, 3, 1).numpy(), raw_mini["x_train"])
    assert np.array_equal(mini.y_test.numpy(), raw_mini["y_test"].astype(np.int64))
    assert "train=4000" in repr(mini) and "num_classes=10" in repr(mini)


def test_npz_layouts_and_numbered_classes(tmp_path: Path, raw_mini: dict[str, np.ndarray]) -> None:
    x_hwc, y = raw_mini["x_train"][:40], raw_mini["y_train"][:40]
    x_chw = x_hwc.transpose(0, 3, 1, 2)
    hwc = load_dataset(write_npz(tmp_path / "hwc.npz", x_train=x_hwc, y_train=y, x_test=x_hwc[:8], y_test=y[:8]))
    chw = load_dataset(write_npz(tmp_path / "chw.npz", x_train=x_chw, y_train=y, x_test=x_chw[:8], y_test=y[:8]))
    assert torch.equal(hwc.x_train, chw.x_train) and hwc.image_shape == (3, 32, 32)
    # no class names: max label + 1 classes, named by number
    assert hwc.classes == tuple(str(i) for i in range(int(y[:40].max()) + 1))
    grey = x_hwc[..., 0]
    names = np.array(CIFAR10_CLASSES)
    spec = write_npz(tmp_path / "grey.npz", x_train=grey, y_train=y, x_test=grey[:8], y_test=y[:8], classes=names)
    ds = load_dataset(spec)
    assert ds.image_shape == (1, 32, 32) and torch.equal(ds.x_train[:, 0], torch.from_numpy(grey))
    assert ds.classes == CIFAR10_CLASSES


def test_folder_cifar10_jpeg(jpeg_folder: Path, raw_mini: dict[str, np.ndarray]) -> None:
    ds = load_dataset(f"folder:{jpeg_folder}")
    check_dataset(ds)
    assert ds.classes == CIFAR10_CLASSES
    assert ds.x_train.shape == (10 * JPEG_PER_CLASS, 3, 32, 32) and ds.x_test.shape == (10 * JPEG_PER_CLASS, 3, 32, 32)
    assert (torch.bincount(ds.y_train) == JPEG_PER_CLASS).all() and (torch.bincount(ds.y_test) == JPEG_PER_CLASS).all()
    # file NNNN of a class is that class's NNNN-th image in the official order: compare with the lossless images
    for split in ("train", "test"):
        x_jpeg, y_jpeg = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        x_ref, y_ref = raw_mini[f"x_{split}"], raw_mini[f"y_{split}"]
        for c in range(10):
            jpeg = x_jpeg[y_jpeg == c].permute(0, 2, 3, 1).double()
            ref = torch.from_numpy(x_ref[y_ref == c][:JPEG_PER_CLASS]).double()
            err = (jpeg - ref).abs().mean(dim=(1, 2, 3))  # per image, in 0..255 pixel units
            shifted = (jpeg - ref.roll(1, dims=0)).abs().mean(dim=(1, 2, 3))
            # JPEG quality 75 costs a few levels per pixel; a different image costs tens
            assert float(err.max()) < 20 and float(err.mean()) < 10, (split, c)
            assert float(shifted.mean()) > 3 * float(err.mean()), (split, c)


@needs_fashion
def test_fashion_mnist_debian_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = load_dataset("fashion-mnist", root=afs_data.DEBIAN_FASHION_MNIST)
    check_dataset(ds)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.classes[0] == "T-shirt/top" and ds.classes[-1] == "Ankle boot" and ds.num_classes == 10
    assert (torch.bincount(ds.y_train) == 6000).all() and (torch.bincount(ds.y_test) == 1000).all()
    assert int(ds.x_train.max()) == 255 and 0.2 < float(to_float(ds.x_test).mean()) < 0.4
    # no root and an empty default root: the Debian folder is found
    monkeypatch.setenv("AFS_KIT_DATA", str(tmp_path))
    assert torch.equal(load_dataset("fashion-mnist").y_test, ds.y_test)


def test_cifar10_offline_error_names_root(tmp_path: Path) -> None:
    reachable, _ = afs_data._host_reachable("https://www.cs.toronto.edu/")
    if reachable:
        pytest.skip("the CIFAR-10 host answers here: the offline error cannot happen")
    with pytest.raises((FileNotFoundError, RuntimeError), match=re.escape(str(tmp_path))) as info:
        load_dataset("cifar10", root=tmp_path)
    assert "download failed" in str(info.value) and "cifar-10-batches-py" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_cifar_corrupted_folder_names_path(tmp_path: Path) -> None:
    (tmp_path / "cifar-100-python").mkdir()
    with pytest.raises(RuntimeError, match=re.escape(str(tmp_path / "cifar-100-python"))):
        load_dataset("cifar100", root=tmp_path)


# ------------------------------------------------------------------------------------------ bad input


def test_unknown_spec_lists_known_specs() -> None:
    with pytest.raises(ValueError, match=r"spec='cifar-10'.*digits, cifar10, cifar100, fashion-mnist, npz:PATH"):
        load_dataset("cifar-10")
    with pytest.raises(ValueError, match=r"needs a path, got spec='npz:'"):
        load_dataset("npz:")


def test_npz_errors(tmp_path: Path, raw_mini: dict[str, np.ndarray]) -> None:
    x, y = raw_mini["x_test"][:20], raw_mini["y_test"][:20].astype(np.int64)
    spec = write_npz(tmp_path / "no_labels.npz", x_train=x, y_train=y, x_test=x)
    with pytest.raises(ValueError, match=r"no_labels\.npz.*lacks the array\(s\) y_test"):
        load_dataset(spec)
    bad = y.copy()
    bad[3] = -1
    with pytest.raises(ValueError, match=r"y_train in .*negative\.npz.* must be >= 0, got a label -1"):
        load_dataset(write_npz(tmp_path / "negative.npz", x_train=x, y_train=bad, x_test=x, y_test=y))
    few = np.array(["a", "b", "c"])
    with pytest.raises(ValueError, match=rf"labels must be < len\(classes\)=3, got a label {y.max()}"):
        load_dataset(write_npz(tmp_path / "few.npz", x_train=x, y_train=y, x_test=x, y_test=y, classes=few))
    with pytest.raises(ValueError, match=r"y_test in .* has 19 labels but there are 20 images"):
        load_dataset(write_npz(tmp_path / "count.npz", x_train=x, y_train=y, x_test=x, y_test=y[:19]))
    with pytest.raises(ValueError, match=r"x_train in .* must hold uint8 pixels 0\.\.255, got dtype=float32"):
        load_dataset(write_npz(tmp_path / "float.npz", x_train=x.astype(np.float32), y_train=y, x_test=x, y_test=y))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent.npz"))):
        load_dataset(f"npz:{tmp_path / 'absent.npz'}")


def test_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(ValueError, match=rf"no class folders in '{re.escape(str(tmp_path / 'train'))}'"):
        load_dataset(f"folder:{tmp_path}")
    other = tmp_path / "other"
    (other / "train" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match=rf"needs '{re.escape(str(other / 'test'))}'"):
        load_dataset(f"folder:{other}")
    (other / "test" / "cat").mkdir(parents=True)
    where = re.escape(str(other / "train"))
    with pytest.raises(ValueError, match=rf"class folders without images in '{where}': \['cat'\]"):
        load_dataset(f"folder:{other}")


def test_dataset_checks_its_fields() -> None:
    x, y = torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match=r"x_train must be uint8 \[N, C, H, W\], got dtype=torch.float32"):
        Dataset("t", x.float(), y, x, y, ("a", "b"))
    with pytest.raises(ValueError, match=r"y_test must be in \[0, 0\] for 1 classes, got labels in \[0, 1\]"):
        Dataset("t", x, y * 0, x, y, ("a",))
    with pytest.raises(ValueError, match=r"x_train has 4 images but y_train has 3 labels"):
        Dataset("t", x, y[:3], x, y, ("a", "b"))


# ---------------------------------------------------------------------------------- validation split


def test_validation_split_stratified(mini: Dataset) -> None:
    train_idx, val_idx = validation_split(mini, fraction=0.1, seed=0)
    assert train_idx.dtype == torch.int64 and val_idx.dtype == torch.int64
    assert torch.equal(torch.sort(torch.cat([train_idx, val_idx])).values, torch.arange(len(mini.x_train)))
    assert torch.equal(train_idx, train_idx.sort().values) and torch.equal(val_idx, val_idx.sort().values)
    counts = torch.bincount(mini.y_train, minlength=10)
    val_counts = torch.bincount(mini.y_train[val_idx], minlength=10)
    assert val_counts.tolist() == [round(0.1 * int(n)) for n in counts]  # each class in proportion
    again = validation_split(mini, fraction=0.1, seed=0)
    assert torch.equal(again[1], val_idx)
    assert not torch.equal(validation_split(mini, fraction=0.1, seed=1)[1], val_idx)
    assert len(validation_split(mini, fraction=0.25)[1]) == sum(round(0.25 * int(n)) for n in counts)


def test_validation_split_unstratified_warns(mini: Dataset) -> None:
    # class 0 keeps a single training image: stratification is impossible
    keep = torch.cat([torch.nonzero(mini.y_train == 0).flatten()[:1], torch.nonzero(mini.y_train != 0).flatten()[:99]])
    ds = Dataset("one-of-class-0", mini.x_train[keep], mini.y_train[keep], mini.x_test, mini.y_test, mini.classes)
    with pytest.warns(UserWarning, match=r"\['airplane'\] have a single training image"):
        train_idx, val_idx = validation_split(ds, fraction=0.2, seed=3)
    assert len(val_idx) == 20 and len(set(train_idx.tolist()) & set(val_idx.tolist())) == 0
    assert torch.equal(torch.sort(torch.cat([train_idx, val_idx])).values, torch.arange(100))


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1])
def test_validation_split_bad_fraction(fraction: float) -> None:
    ds = load_dataset("digits")
    with pytest.raises(ValueError, match=rf"fraction must be in \(0, 1\), got fraction={re.escape(repr(fraction))}"):
        validation_split(ds, fraction=fraction)


# -------------------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("device", DEVICES)
def test_augment_invariants_and_determinism(mini: Dataset, device: str) -> None:
    x = mini.x_train[:64].to(device)
    out = augment(x, crop_padding=4, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float32 and out.device == x.device
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    same = augment(x, crop_padding=4, flip=True, generator=torch.Generator().manual_seed(0))
    other = augment(x, crop_padding=4, flip=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, same) and not torch.equal(out, other)
    assert torch.equal(augment(x, crop_padding=0, flip=False), to_float(x))
    if device != "cpu":  # a CPU generator gives the same batch on every device
        ref = augment(x.cpu(), crop_padding=4, flip=True, generator=torch.Generator().manual_seed(0))
        assert torch.equal(out.cpu(), ref)


def test_augment_flip_flips_some(mini: Dataset) -> None:
    x = mini.x_train[:64]
    out = augment(x, crop_padding=0, flip=True, generator=torch.Generator().manual_seed(0))
    plain, mirrored = to_float(x), to_float(x).flip(-1)
    is_plain = (out == plain).flatten(1).all(1)
    is_mirrored = (out == mirrored).flatten(1).all(1)
    assert (is_plain | is_mirrored).all()
    assert 10 < int((is_mirrored & ~is_plain).sum()) < 54  # about half, out of 64


def test_augment_crop_shift_within_padding(mini: Dataset) -> None:
    p = 3
    x = mini.x_train[:32]
    out = augment(x, crop_padding=p, flip=False, generator=torch.Generator().manual_seed(5))
    padded = torch.nn.functional.pad(to_float(x), (p, p, p, p))
    h, w = x.shape[-2:]
    shifts = set()
    for i in range(len(x)):
        found = [
            (dy - p, dx - p)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + h, dx : dx + w])
        ]
        assert found, f"image {i} is no shift of at most {p} pixels of its input"
        shifts.add(found[0])
    assert len(shifts) > 5  # offsets really vary per image


def test_augment_bad_input(mini: Dataset) -> None:
    with pytest.raises(ValueError, match=r"crop_padding must be an integer >= 0, got crop_padding=-1"):
        augment(mini.x_train[:2], crop_padding=-1, flip=False)
    with pytest.raises(ValueError, match=r"x must be uint8 \[B, C, H, W\], got dtype=torch.float32"):
        augment(to_float(mini.x_train[:2]), crop_padding=4, flip=True)
    with pytest.raises(ValueError, match=r"x must be a uint8 tensor, got dtype=torch.float32"):
        to_float(torch.zeros(2))


# ------------------------------------------------------------------------------------------ batches


def test_iterate_batches() -> None:
    batches = list(iterate_batches(10, 4, shuffle=False))
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [len(b) for b in iterate_batches(10, 4, shuffle=False, drop_last=True)] == [4, 4]
    shuffled = list(iterate_batches(103, 10, shuffle=True, generator=torch.Generator().manual_seed(0)))
    flat = torch.cat(shuffled)
    assert flat.dtype == torch.int64 and torch.equal(flat.sort().values, torch.arange(103))
    assert not torch.equal(flat, torch.arange(103))
    again = torch.cat(list(iterate_batches(103, 10, shuffle=True, generator=torch.Generator().manual_seed(0))))
    assert torch.equal(flat, again)
    assert list(iterate_batches(0, 4, shuffle=True)) == []
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got batch_size=0"):
        iterate_batches(10, 0, shuffle=False)
    with pytest.raises(ValueError, match=r"n must be an integer >= 0, got n=-1"):
        iterate_batches(-1, 4, shuffle=False)


def test_an_unpacked_archive_is_decoded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The images of an unpacked archive (which never change) are decoded by the first stage and read back by
    every later one; a folder given as a folder is always decoded (its files may change)."""
    import tarfile

    from PIL import Image

    from afs_kit.data import folders

    layout = tmp_path / "layout"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (layout / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(layout / split / c / f"{i}.png")
    archive = tmp_path / "pets.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for child in sorted(layout.iterdir()):
            tar.add(child, arcname=child.name)
    first = load_dataset(f"folder:{archive}", root=tmp_path / "root")
    (cache,) = (tmp_path / "root" / "archives").glob(f"*.{folders.DECODED}")
    monkeypatch.setattr(folders, "_decode_images", lambda *a: pytest.fail("decoded again"))
    again = load_dataset(f"folder:{archive}", root=tmp_path / "root")
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(again, field), getattr(first, field)), field
    assert again.classes == first.classes == ("cat", "dog") and cache.is_file()
    with pytest.raises(pytest.fail.Exception, match="decoded again"):
        load_dataset(f"folder:{tmp_path / 'root' / 'archives' / cache.name.split('.')[0]}")
