"""Fixtures and helpers shared by several test files (tests/ is on the path: `from conftest import ...`)."""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# the files beside the project (../shared/data); a GPU machine, which does not see them, gets copies in the
# checkout (gpu/check.sh sets AFS_KIT_SHARED_DATA)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest workers on the two cores: one thread each (and in every process they start), or
    # PyTorch's threads spin against each other
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

SHARED_DATA = Path(os.environ.get("AFS_KIT_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
MINI_NPZ = SHARED_DATA / "cifar10-mini.npz"
JPEG_ARCHIVE = SHARED_DATA / "cifar10-jpeg.tar.xz"


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's 8x8 digits as the kit loads them (always offline)."""
    from afs_kit.data.datasets import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def smoke_networks(tmp_path_factory) -> Path:
    """A run folder holding the smoke preset's networks, trained once for the whole `make test` (both xdist workers;
    the first to ask trains, the other waits on a lock): copy it (`copy_run`) before use. The three extractors, and
    what the report's notebook 07 stacks besides them: table 6's two networks and the same-budget ensemble's members
    (seeds 1 and 2 at the baseline budget). Six test files trained these same networks again, each. Trained with
    one thread, as a `python -m afs_kit` process under torchrun computes: the distributed tests compare bitwise."""
    from filelock import FileLock

    from afs_kit.config import get_preset
    from afs_kit.run.pipeline import Run
    from afs_kit.studies.common import baseline_budget

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the workers' common folder
    run_dir, done = shared / "smoke-networks" / "run", shared / "smoke-networks" / "done"
    with FileLock(str(shared / "smoke-networks.lock")):
        if not done.is_file():
            shutil.rmtree(run_dir, ignore_errors=True)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                run = Run(run_dir, get_preset("smoke"), device="cpu", progress=False)
                run.train_extractors()
                run.train_ablation()
                run.train_large_model()
                for seed in run.seeds(len(run.preset.budgets))[1:]:
                    run.seed_run(seed).train_extractors(budgets=[baseline_budget(run)])
            finally:
                torch.set_num_threads(threads)
            done.write_text("")
    return run_dir


def copy_run(trained: Path, to: Path) -> Path:
    """A copy of a trained run folder at `to`, mtimes kept."""
    shutil.copytree(trained, to, copy_function=shutil.copy2)
    return to


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


def quick_cnn(data):
    """cnn-tiny after 150 SGD steps on the digits' training images (a few seconds): about 97% clean accuracy,
    in eval mode."""
    import torch.nn.functional as F

    from afs_kit.models.nets import build_model

    x, y = data.x_train.float() / 255, data.y_train
    torch.manual_seed(0)
    net = build_model("cnn-tiny", 10, in_channels=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(150):
        idx = torch.randint(len(y), (64,), generator=gen)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def snapshot(root: str | Path) -> dict[str, tuple]:
    """Every path under `root`: files by content hash, size and mtime; folders by mtime (a file made and
    removed again, like a lock, changes its folder's mtime)."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        if p.is_dir():
            out[str(p.relative_to(root))] = ("dir", st.st_mtime_ns)
        else:
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns)
    return out


def unwritable_prefix(folder: Path) -> tuple[str, ...]:
    """How to run a command that cannot write `folder` (made read-only): nothing for a plain user; as
    root (where chmod stops no write), setpriv dropping the capability that overrides permissions."""
    if os.geteuid() != 0:
        return ()
    prefix = ("setpriv", "--inh-caps=-dac_override,-dac_read_search",
              "--bounding-set=-dac_override,-dac_read_search")
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only folder cannot be simulated")
    probe = subprocess.run([*prefix, sys.executable, "-c", "import os, sys; sys.exit(os.access(sys.argv[1], os.W_OK))",
                            str(folder)], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"running as root and setpriv cannot drop CAP_DAC_OVERRIDE: {probe.stderr!r}")
    return prefix


def chmod_tree(root: Path, writable: bool) -> None:
    for p in [root, *root.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod(mode | 0o200 if writable else mode & ~0o222)


# The files whose tests take longest, first: `make test` gives whole files to its two workers in collection order
# (--no-loadscope-reorder; xdist's own order, most tests first, started the one-test torchrun restart file last),
# so the long ones start at once and the short ones fill in at the end
LONGEST_FIRST = ("run/test_distributed_restart.py", "app/test_notebooks.py", "run/test_distributed.py", "eval/test_reliability.py", "core/test_device.py",
                 "app/test_browser.py", "eval/test_chunks.py", "models/test_outside.py", "app/test_cli.py",
                 "run/test_pipeline.py", "attacks/test_attacks.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        path = item.path.as_posix()
        return next((i for i, name in enumerate(LONGEST_FIRST) if path.endswith(name)), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: each file keeps its own order
