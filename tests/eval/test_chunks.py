"""Evaluation in chunks that survive: each finished chunk of examples is saved, and an interrupted
evaluation resumes at its first unfinished chunk with the flags an uninterrupted one gives."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import quick_cnn

from afs_kit.app.cli import main
from afs_kit.config import EvalConfig, get_preset
from afs_kit.core.io import load_checkpoint, read_json
from afs_kit.eval import evaluation
from afs_kit.eval.evaluation import evaluate
from afs_kit.run.pipeline import Run

CFG = EvalConfig(eps=0.1, attacks=("clean", "pgd10", "aa"), aa_attacks=("apgd-ce",), batch_size=50, chunk_size=30)


class Stop(Exception):
    """An interruption between two chunks (what a kill leaves on disk: every finished chunk saved)."""


@pytest.fixture(scope="module")
def model_and_data(digits, one_thread):
    x, y = digits.x_test[:100].float() / 255, digits.y_test[:100]
    return quick_cnn(digits), x, y


@pytest.mark.parametrize("attack, stop_after", [("pgd10", 2), ("aa", 1)])
def test_an_interrupted_evaluation_resumes_at_its_first_unfinished_chunk(model_and_data, attack, stop_after,
                                                                        capsys):
    model, x, y = model_and_data
    whole = evaluate(model, x, y, CFG, "cpu", progress=False)
    saved = []

    def save_then_stop(state):
        saved.append(state)
        if state["chunks_done"].get(attack) == stop_after:
            raise Stop

    with pytest.raises(Stop):
        evaluate(model, x, y, CFG, "cpu", progress=False, on_chunk=save_then_stop)
    state = saved[-1]
    assert state["chunks"] == 4 and state["chunks_done"][attack] == stop_after
    resumed = evaluate(model, x, y, CFG, "cpu", progress=True, record={"partial": state})
    assert f"resuming {attack} at chunk {stop_after + 1}/4" in capsys.readouterr().out
    for a in ("clean", "pgd10", "aa", "worst"):
        assert torch.equal(resumed["flags"][a], whole["flags"][a]), a
    assert resumed["metrics"]["aa_breakdown"] == whole["metrics"]["aa_breakdown"]


def test_pgd_in_chunks_gives_the_flags_of_one_pass(model_and_data):
    """PGD's starts are drawn per example: the chunk size changes nothing."""
    model, x, y = model_and_data
    one = evaluate(model, x, y, dataclasses.replace(CFG, attacks=("clean", "pgd10"), chunk_size=100), "cpu", False)
    many = evaluate(model, x, y, dataclasses.replace(CFG, attacks=("clean", "pgd10"), chunk_size=7), "cpu", False)
    assert torch.equal(one["flags"]["pgd10"], many["flags"]["pgd10"])


def test_a_run_keeps_its_chunks_and_says_partial_until_finished(tmp_path, monkeypatch, capsys):
    preset = dataclasses.replace(get_preset("smoke"), evaluation=dataclasses.replace(
        get_preset("smoke").evaluation, chunk_size=20, n_examples=60))
    run = Run(tmp_path / "run", preset, device="cpu", progress=False)
    run.train_extractors(budgets=[0.1])
    shutil.copytree(tmp_path / "run", tmp_path / "twin")
    twin = Run(tmp_path / "twin", preset, device="cpu", progress=False)
    model = run.extractor(0.1)[0]
    real, calls = evaluation.attack_flags, []

    def interrupted(*args, **kwargs):  # Ctrl-C while PGD-20 works on its third chunk
        calls.append(args[3])
        if calls.count("pgd20") == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "attack_flags", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run.evaluate("extractor-x", model, attacks=["pgd10", "pgd20"])
    (folder,) = (tmp_path / "run" / "eval").iterdir()
    on_disk = read_json(folder / "metrics.json")
    assert on_disk["partial"] is True and on_disk["chunks_done"] == {"pgd10": 3, "pgd20": 2}
    assert on_disk["attacks"] == [] and "pgd20" not in on_disk, "no unfinished number is written"
    monkeypatch.setattr(evaluation, "attack_flags", real)
    run.progress = True
    resumed = run.evaluate("extractor-x", model, attacks=["pgd10", "pgd20"])
    assert "resuming pgd20 at chunk 3/3" in capsys.readouterr().out
    assert "partial" not in resumed and not (folder / "partial.pt").exists()
    whole = twin.evaluate("extractor-x", twin.extractor(0.1)[0], attacks=["pgd10", "pgd20"])
    flags = load_checkpoint(folder / "flags.pt")["flags"]
    twin_flags = load_checkpoint(next((tmp_path / "twin" / "eval").iterdir()) / "flags.pt")["flags"]
    assert all(torch.equal(flags[a], twin_flags[a]) for a in ("clean", "pgd10", "pgd20", "worst"))
    assert resumed["worst"] == whole["worst"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, one_thread):
    """A smoke run with its 0.1 extractor (one epoch), trained through the command line (in this process)."""
    run = tmp_path_factory.mktemp("chunks") / "run"
    assert main(["train-extractors", "--preset", "smoke", "--run", str(run), "--eps", "0.1", "--set",
                 "extractor.epochs=1", "--device", "cpu", "--quiet"]) == 0
    return run


def _processes_naming(path: Path) -> list[int]:
    """The pids of the processes whose command line names `path` (Linux's /proc)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if str(path).encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
    return pids


@pytest.mark.slow
# PGD killed under torchrun (two processes) and resumed by one; AutoAttack killed and resumed by one process (PGD
# killed and resumed by one process alike was a third case: the torchrun one holds it, 13 s less)
@pytest.mark.parametrize("attacks, procs", [("clean,aa", 1), ("clean,pgd20", 2)])
def test_a_sigkilled_evaluation_resumes_where_its_chunks_end(cli_run, tmp_path, attacks, procs):
    """SIGKILL after at least two saved chunks (of PGD-20, or of AutoAttack's APGD-CE), then the same command
    again: it says where it resumes and ends with the flags of an evaluation never killed. With `procs` 2 the
    killed job ran under torchrun with two processes (the whole job killed, as a preempted node is) and one
    process resumes it: PGD's starts are drawn per example, so the flags are still an unbroken run's."""
    import signal
    import subprocess
    import sys
    import time

    attack = attacks.split(",")[1]
    for copy in ("killed", "whole"):
        shutil.copytree(cli_run, tmp_path / copy)
    argv = ["evaluate", "--model", "extractor:0.1", "--attacks", attacks, "--n", "40", "--device", "cpu",
            "--set", "evaluation.chunk_size=10", "--set", "evaluation.batch_size=1",
            "--set", "evaluation.aa_attacks=apgd-ce"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def command(copy):
        return [sys.executable, "-m", "afs_kit", argv[0], "--run", str(tmp_path / copy), *argv[1:]]

    first = command("killed")
    if procs > 1:
        first = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={procs}", "-m",
                 "afs_kit", "--", *first[3:]]
    proc = subprocess.Popen(first, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    partial = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((tmp_path / "killed" / "eval").glob("*/partial.pt"))
        if found:
            try:
                state = load_checkpoint(found[0])
            except Exception:  # caught while being replaced: look again
                state = {}
            if state.get("chunks_done", {}).get(attack, 0) >= 2:
                partial = found[0]
                break
        time.sleep(0.02)
    assert partial is not None, "the evaluation ended before two chunks could be seen"
    # the launcher and every worker (torchrun starts its workers in sessions of their own): what a preempted node does
    for pid in [proc.pid, *_processes_naming(tmp_path / "killed")]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert read_json(partial.parent / "metrics.json")["partial"] is True
    again = subprocess.run(command("killed"), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert re.search(rf"resuming {attack} at chunk \d+/4", again.stdout + again.stderr)
    # the unbroken evaluation: in this process (one thread, as the module's), a process start saved
    assert main([argv[0], "--run", str(tmp_path / "whole"), *argv[1:], "--quiet"]) == 0
    flags = {c: load_checkpoint(next((tmp_path / c / "eval").glob("*/flags.pt")))["flags"] for c in ("killed", "whole")}
    for a in ("clean", attack, "worst"):
        assert torch.equal(flags["killed"][a], flags["whole"][a]), a
    assert not partial.exists() and "partial" not in read_json(partial.parent / "metrics.json")
