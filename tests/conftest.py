"""Fixtures shared by several test files."""
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's 8x8 digits as the kit loads them (always offline)."""
    from afs_kit.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="module")
def one_thread():
    # the test machine's cores are shared; one thread avoids oversubscription and is faster here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> Path:
    """An npz without test arrays, one with labels beyond its classes, image folders without classes."""
    root = tmp_path_factory.mktemp("bad-data")
    x = np.zeros((10, 8, 8), np.uint8)
    np.savez(root / "missing.npz", x_train=x, y_train=np.zeros(10, np.int64))
    np.savez(root / "labels.npz", x_train=x, y_train=np.full(10, 5), x_test=x[:4], y_test=np.zeros(4, np.int64),
             classes=np.array(["a", "b"]))
    (root / "empty" / "train").mkdir(parents=True)
    (root / "empty" / "test").mkdir(parents=True)
    (root / "no-splits").mkdir()
    return root
