"""One writer per run directory, whoever writes: every stage that writes (library, notebooks, widgets,
command line) takes the run's lock and a second writer is refused with the holder named; reading a run
takes no lock; a stage inside another, or a notebook kernel of `afs-kit report`, shares its holder's lock."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from afs_kit.config import get_preset
from afs_kit.run.pipeline import Run
from afs_kit.run.rundir import RunDir, writer

SMOKE = get_preset("smoke")
PRESET = dataclasses.replace(SMOKE, extractor=dataclasses.replace(SMOKE.extractor, epochs=1),
                             merger=dataclasses.replace(SMOKE.merger, epochs=1))


@pytest.fixture
def held_elsewhere(tmp_path):
    """A run with its extractors and one evaluation, and another process holding its lock."""
    run = Run(tmp_path / "run", PRESET, device="cpu", progress=False)
    run.train_extractors()
    run.evaluate("extractor-x", run.extractor(0.1)[0], attacks=["pgd10"], n_examples=20)
    code = ("import sys, time; from afs_kit.run.rundir import RunLock; RunLock(sys.argv[1]).__enter__(); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run.dir.root)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline().strip() == "held"
    yield run, proc
    proc.kill()
    proc.wait()
    proc.stdout.close()


def test_a_library_stage_that_writes_is_refused_while_another_process_writes(held_elsewhere):
    run, proc = held_elsewhere
    with pytest.raises(RuntimeError, match=f"in use by pid {proc.pid} on "):
        run.afs_model("all", alpha=0.3)
    assert not list(run.dir.mergers_dir.glob("*/merger.pt")) and not list(run.dir.mergers_dir.glob("*/last.pt"))
    with pytest.raises(RuntimeError, match=f"in use by pid {proc.pid}"):
        run.dir.update_summary("texts", {})
    with pytest.raises(RuntimeError, match=f"in use by pid {proc.pid}"):
        run.evaluate("extractor-x", run.extractor(0.1)[0], attacks=["pgd10", "pgd20"], n_examples=20)


def test_reading_a_run_takes_no_lock(held_elsewhere):
    run, _ = held_elsewhere
    again = run.evaluate("extractor-x", run.extractor(0.1)[0], attacks=["pgd10"], n_examples=20)
    assert again["attacks"] == ["clean", "pgd10"]
    assert run.train_extractors()  # everything found: nothing to write


def test_a_stage_inside_a_stage_shares_the_lock_and_children_may_inherit_it(tmp_path):
    root = tmp_path / "run"
    with writer(root):
        with writer(root):  # e.g. the command line's job lock around a library stage
            assert (root / ".lock").is_file()
        assert (root / ".lock").is_file()
    assert not (root / ".lock").exists()
    with RunDir(root).lock(children=True):  # what afs-kit report does for its notebook kernels
        child = subprocess.run([sys.executable, "-c", "import sys; from afs_kit.run.rundir import writer\n"
                                "with writer(sys.argv[1]): print('shared')", str(root)],
                               capture_output=True, text=True, timeout=120)
        assert child.stdout.strip() == "shared", child.stderr[-2000:]
    assert "AFS_KIT_RUN_LOCKED_BY_PARENT" not in os.environ
