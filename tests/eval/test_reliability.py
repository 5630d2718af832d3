"""Reliability: checkpoints that cannot run code or be mistaken, kills that lose at most an epoch,
bad input that writes nothing, and sanity checks that catch masked gradients.

Library calls here; the command line's exit statuses are in test_cli.py. The kill tests run the real
`afs-kit` command in a subprocess and SIGKILL it mid-epoch.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import copy_run

from afs_kit.app.cli import main
from afs_kit.attacks.methods import pgd
from afs_kit.config import EvalConfig, get_preset, override
from afs_kit.core.device import resolve_device
from afs_kit.core.io import FORMAT, load_checkpoint, read_json, save_checkpoint, write_json
from afs_kit.data.batches import iterate_batches
from afs_kit.data.datasets import load_dataset
from afs_kit.eval.evaluation import evaluate
from afs_kit.eval.masking import aa_checks, sanity_checks
from afs_kit.models.nets import build_model
from afs_kit.models.stack import parse_subset
from afs_kit.run.pipeline import Run
from afs_kit.run.rundir import RunLock
from afs_kit.train.extractors import train_extractor
from afs_kit.train.merger import train_merger

SMOKE = get_preset("smoke")


def tree(root: Path) -> dict[str, tuple[int, int]] | None:
    """Every path under `root` with its mtime and size: equal snapshots mean nothing was written."""
    root = Path(root)
    if not root.exists():
        return None
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, smoke_networks) -> Path:
    """A folder holding a trained smoke run (`run/`): three extractors and the merger over all of them."""
    box = tmp_path_factory.mktemp("reliability")
    run = Run(copy_run(smoke_networks, box / "run"), SMOKE, device="cpu", progress=False)
    run.afs_model("all")
    return box


@pytest.fixture(scope="module")
def run(sandbox) -> Run:
    return Run.open(sandbox / "run", device="cpu", progress=False)


# ---------------------------------------------------------------- the one checkpoint format

def test_checkpoint_round_trip_is_atomic_and_tagged(tmp_path):
    obj = {"state_dict": {"w": torch.randn(3, 4), "n": torch.tensor(7)}, "history": [{"epoch": 0, "loss": 1.5}],
           "config": {"eps": 8 / 255, "milestones": [50, 60], "name": None}, "rng": torch.Generator().get_state()}
    path = tmp_path / "sub" / "a.pt"
    save_checkpoint(path, obj)
    back = load_checkpoint(path)
    assert back["format"] == FORMAT and back["torch_version"] == str(torch.__version__)
    assert torch.equal(back["state_dict"]["w"], obj["state_dict"]["w"])
    assert back["history"] == obj["history"] and back["config"] == obj["config"]
    assert torch.equal(back["rng"], obj["rng"])
    assert [p.name for p in path.parent.iterdir()] == ["a.pt"], "no temporary file is left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask, "a new file gets the usual permissions"
    os.chmod(path, 0o640)
    save_checkpoint(path, obj)
    assert path.stat().st_mode & 0o777 == 0o640, "a rewritten file keeps its permissions"
    with pytest.raises(ValueError, match="must be a dict"):
        save_checkpoint(path, [1, 2])


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "a.pt"
    save_checkpoint(path, {"x": torch.ones(2)})
    before = path.read_bytes()
    with pytest.raises(Exception):  # torch cannot pickle a lambda; the write fails half-way
        save_checkpoint(path, {"x": torch.zeros(2), "f": lambda: 0})
    assert path.read_bytes() == before
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(2))
    json_path = tmp_path / "m.json"
    write_json(json_path, {"a": 1})
    with pytest.raises(TypeError):
        write_json(json_path, {"a": object()})
    assert read_json(json_path) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "m.json"]


class _Payload:
    """Unpickling this runs code: it opens (creates) the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_checkpoint_that_runs_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "pwned"
    for name, obj in [("bare.pt", _Payload(marker)),
                      ("tagged.pt", {"format": FORMAT, "state_dict": {}, "extra": _Payload(marker)})]:
        path = tmp_path / name
        torch.save(obj, path)
        with pytest.raises(ValueError, match=f"{path}.*refusing to load it"):
            load_checkpoint(path)
        assert not marker.exists(), "the payload must never run"
    # the payload is live: the unsafe loader runs it (which is why the kit never uses it)
    torch.load(tmp_path / "tagged.pt", weights_only=False)
    assert marker.exists()


def test_a_truncated_checkpoint_names_the_file(sandbox, tmp_path):
    good = (sandbox / "run" / "extractors" / "eps-0.1000" / "extractor.pt").read_bytes()
    for n in (0, 100, len(good) // 2, len(good) - 10):
        path = tmp_path / f"cut-{n}.pt"
        path.write_bytes(good[:n])
        with pytest.raises(ValueError) as err:
            load_checkpoint(path)
        assert str(path) in str(err.value) and "expected an afs-kit checkpoint" in str(err.value)
    json_path = tmp_path / "cut.json"
    json_path.write_text('{"clean": 93.0, "pgd')
    with pytest.raises(ValueError, match=f"{json_path} is not valid JSON"):
        read_json(json_path)


def test_a_foreign_file_names_the_file_and_the_format(tmp_path):
    rng = np.random.default_rng(0)
    cases = {"random.pt": rng.bytes(5000), "json.pt": json.dumps({"state_dict": [1, 2]}).encode()}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
    with zipfile.ZipFile(tmp_path / "zip.pt", "w") as z:  # a zip archive, but not a torch one
        z.writestr("notes.txt", "hello")
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "plain.pt")  # torch, but untagged
    for name in ("random.pt", "json.pt", "zip.pt", "plain.pt"):
        path = tmp_path / name
        with pytest.raises(ValueError) as err:
            load_checkpoint(path)
        assert str(path) in str(err.value) and ("afs-kit" in str(err.value)), str(err.value)
    with pytest.raises(ValueError, match="format None, expected 'afs-kit/1'"):
        load_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def _copy_run(src: Path, dst: Path, keep=("run.json", "extractors")) -> Path:
    dst.mkdir(parents=True)
    for name in keep:
        s = src / name
        shutil.copytree(s, dst / name) if s.is_dir() else shutil.copy2(s, dst / name)
    return dst


def _planted(sandbox: Path, dst: Path) -> Path:
    """A new run folder holding a digits cnn-tiny extractor.pt that it did not make."""
    (dst / "extractors").mkdir(parents=True)
    shutil.copytree(sandbox / "run" / "extractors" / "eps-0.1000", dst / "extractors" / "eps-0.1000")
    return dst


def test_a_checkpoint_for_another_architecture_or_data_is_refused(sandbox, tmp_path, capsys):
    digits = load_dataset("digits")
    keep = digits.y_train < 5, digits.y_test < 5
    np.savez(tmp_path / "five.npz", x_train=digits.x_train[keep[0]].numpy(), y_train=digits.y_train[keep[0]].numpy(),
             x_test=digits.x_test[keep[1]].numpy(), y_test=digits.y_test[keep[1]].numpy())
    np.savez(tmp_path / "ten.npz", x_train=digits.x_train.numpy(), y_train=digits.y_train.numpy(),
             x_test=digits.x_test.numpy(), y_test=digits.y_test.numpy())
    cases = [
        (["--set", "extractor.model=cnn-small"], r"model='cnn-tiny', but this run needs model='cnn-small'"),
        (["--set", f"data.spec=npz:{tmp_path / 'five.npz'}"], r"made for dataset='digits', num_classes=10, but .* num_classes=5;"),
        (["--set", f"data.spec=npz:{tmp_path / 'ten.npz'}"], r"made for dataset='digits', but this run needs dataset='npz:"),
    ]
    for i, (extra, message) in enumerate(cases):
        run_dir = _planted(sandbox, tmp_path / f"run{i}")
        argv = ["train-extractors", "--preset", "smoke", "--run", str(run_dir), "--eps", "0.1", "--quiet",
                "--device", "cpu", *extra]
        before = tree(run_dir)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "extractor.pt" in err and re.search(message, err), err
        assert tree(run_dir) == before
        # the stages that only read extractors refuse it too
        preset = override(SMOKE, extra[1:])
        with pytest.raises(ValueError, match=message):
            Run(run_dir, preset, device="cpu", progress=False).budgets()
        assert tree(run_dir) == before


def test_a_merger_over_other_extractors_is_refused(sandbox, tmp_path, capsys):
    """Retrain one extractor under a stored merger: evaluating that merger must fail, not mix weights."""
    run_dir = _copy_run(sandbox / "run", tmp_path / "run", keep=("run.json", "extractors", "mergers"))
    other = dataclasses.replace(SMOKE.extractor, eps=0.1, seed=1)
    train_extractor(other, load_dataset("digits"), SMOKE.data, tmp_path / "other", device="cpu", progress=False)
    shutil.copy2(tmp_path / "other" / "extractor.pt", run_dir / "extractors" / "eps-0.1000" / "extractor.pt")
    before = tree(run_dir)
    assert main(["evaluate", "--run", str(run_dir), "--quiet", "--device", "cpu", "--attacks", "clean"]) == 2
    err = capsys.readouterr().err
    assert "merger.pt was trained on another extractor 'eps-0.1000'" in err, err
    assert tree(run_dir) == before


# ---------------------------------------------------------------- kills lose at most one epoch

# make test-gpu runs the kill tests on CUDA (AFS_TEST_DEVICE=cuda), with the settings bitwise equality needs there
DEVICE = os.environ.get("AFS_TEST_DEVICE", "cpu")


def _afs_kit(*args: str) -> list[str]:
    return [sys.executable, "-m", "afs_kit", *args, "--device", DEVICE]


def _env() -> dict[str, str]:
    # one thread: both runs compute alike, and tiny models run fastest on one core
    cuda = {"AFS_KIT_DETERMINISTIC": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"} if DEVICE == "cuda" else {}
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **cuda}


def _kill_when(cmd: list[str], appears: Path | None, glob_root: Path | None = None, pattern: str = "") -> None:
    """Start `cmd`, wait until the first epoch's last.pt exists, then SIGKILL it inside the next epoch."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            found = appears.is_file() if appears is not None else any(glob_root.glob(pattern))
            if found or proc.poll() is not None:
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        time.sleep(0.05)  # into the next epoch
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _all_files_load(root: Path) -> None:
    """No file of the run is corrupt: every checkpoint loads, every JSON parses."""
    for p in root.rglob("*.pt"):
        load_checkpoint(p)
    for p in root.rglob("*.json"):
        read_json(p)


@pytest.mark.slow
def test_a_killed_extractor_training_resumes_and_matches_an_unkilled_one(tmp_path):
    args = ["train-extractors", "--preset", "smoke", "--eps", "0.1", "--set", "extractor.epochs=3"]
    victim, reference = tmp_path / "victim", tmp_path / "reference"
    ref = subprocess.Popen(_afs_kit(*args, "--run", str(reference), "--quiet"), env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out_dir = victim / "extractors" / "eps-0.1000"
    _kill_when(_afs_kit(*args, "--run", str(victim)), out_dir / "last.pt")
    assert not (out_dir / "extractor.pt").exists(), "killed before the end"
    killed_at = load_checkpoint(out_dir / "last.pt")["epoch"]
    assert killed_at in (0, 1)
    _all_files_load(victim)

    again = subprocess.run(_afs_kit(*args, "--run", str(victim)), env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from {out_dir / 'last.pt'} after epoch {killed_at + 1}/3" in again.stdout, again.stdout
    assert f"epoch {killed_at + 1}/3:" not in again.stdout, "the finished epoch is not trained again"
    assert ref.wait() == 0, ref.stderr.read().decode()[-2000:]
    ref.stdout.close(), ref.stderr.close()
    _all_files_load(victim)
    assert not (out_dir / "last.pt").exists()
    resumed = load_checkpoint(out_dir / "extractor.pt")
    whole = load_checkpoint(reference / "extractors" / "eps-0.1000" / "extractor.pt")
    assert resumed["key"] == whole["key"] and len(resumed["history"]) == 3
    assert resumed["history"] == whole["history"]
    assert resumed["state_dict"].keys() == whole["state_dict"].keys()
    for k, v in whole["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k


@pytest.mark.slow
def test_a_killed_merger_training_resumes_and_matches_an_unkilled_one(sandbox, tmp_path):
    victim = _copy_run(sandbox / "run", tmp_path / "victim")
    reference = _copy_run(sandbox / "run", tmp_path / "reference")
    args = ["train-merger", "--subset", "all", "--set", "merger.epochs=3"]
    ref = subprocess.Popen(_afs_kit(*args, "--run", str(reference), "--quiet"), env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _kill_when(_afs_kit(*args, "--run", str(victim)), None, victim / "mergers", "*/last.pt")
    (last,) = (victim / "mergers").glob("*/last.pt")
    assert not (last.parent / "merger.pt").exists()
    killed_at = load_checkpoint(last)["epoch"]
    _all_files_load(victim)

    again = subprocess.run(_afs_kit(*args, "--run", str(victim)), env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from {last} after epoch {killed_at + 1}/3" in again.stdout, again.stdout
    assert ref.wait() == 0, ref.stderr.read().decode()[-2000:]
    ref.stdout.close(), ref.stderr.close()
    _all_files_load(victim)
    resumed = load_checkpoint(last.parent / "merger.pt")
    whole = load_checkpoint(reference / "mergers" / last.parent.name / "merger.pt")
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]
    assert resumed["history"] == whole["history"]
    for k, v in whole["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k


def test_a_lock_refuses_a_second_writer_and_dies_with_its_holder(tmp_path):
    with RunLock(tmp_path) as lock:
        assert lock.held and (tmp_path / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(RuntimeError, match=f"in use by pid {os.getpid()} on "):
            RunLock(tmp_path).__enter__()
    assert not (tmp_path / ".lock").exists()
    # a holder killed with SIGKILL cannot release anything: the kernel drops its lock
    code = ("import sys, time; from afs_kit.run.rundir import RunLock; RunLock(sys.argv[1]).__enter__(); "
            "print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match=f"in use by pid {proc.pid} on "):
            RunLock(tmp_path).__enter__()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    with RunLock(tmp_path) as lock:
        assert lock.held


# ---------------------------------------------------------------- bad input: a ValueError, nothing written

def _library_cases(run: Run, sandbox: Path, bad_data: Path):
    """(id, call, message) for each row of the input list, as a library user meets it."""
    model = run.extractor(0.1)[0]
    x, y = run.test_set(8)
    data = run.data
    new = sandbox / "new-run"

    def with_extractor(**kw):
        return lambda: train_extractor(dataclasses.replace(SMOKE.extractor, **kw), data, SMOKE.data,
                                       new / "extractors" / "x", device="cpu", progress=False)

    def new_run(**sections):
        return lambda: Run(new, dataclasses.replace(SMOKE, **sections), device="cpu", progress=False).train_extractors()

    return [
        ("eps-run", lambda: run.train_extractors([0.1, 1.5]), r"eps must be in \[0, 1\], got eps=1.5"),
        ("eps-negative", lambda: run.train_extractors([-0.1]), r"eps must be in \[0, 1\], got eps=-0.1"),
        ("eps-extractor", with_extractor(eps=2.0), r"eps must be in \[0, 1\], got eps=2.0"),
        ("eps-pgd", lambda: pgd(model, x, y, 1.5, 0.1, 5), r"eps must be in \[0, 1\] for Linf, got eps=1.5"),
        ("alpha-run", lambda: run.afs_model("all", alpha=1.5), r"alpha=1.5"),
        ("alpha-merger", lambda: train_merger(run.stack([0, 1]), data, dataclasses.replace(SMOKE.merger, alpha=-0.5),
                                              SMOKE.data, new / "m", device="cpu", progress=False), r"alpha=-0.5"),
        ("steps-zero-pgd", lambda: pgd(model, x, y, 0.1, 0.025, 0), r"steps must be an integer >= 1, got steps=0"),
        ("steps-negative", with_extractor(attack_steps=-3), r"attack_steps=-3"),
        ("steps-zero-preset", lambda: override(SMOKE, ["merger.attack_steps=0"]), r"merger.attack_steps=0"),
        ("subset-empty", lambda: run.afs_model("000"), r"subset='000' selects no extractor \(an empty subset\)"),
        ("subset-blank", lambda: run.afs_model(""), r"subset must not be empty"),
        ("subset-too-long", lambda: run.afs_model("1111"), r"subset='1111' has 4 digits but the run has only 3"),
        ("subset-characters", lambda: run.afs_model("1x1"), r"subset='1x1' is neither"),
        ("subset-missing", lambda: run.afs_model("0,0.3"), r"subset='0,0.3' names budget 0.3, which has no"),
        ("subset-missing-parse", lambda: parse_subset("2/255", [0.0, 1 / 255]), r"2/255"),
        ("extractor-missing", lambda: run.extractor(0.3), r"eps=0.3 has no trained extractor"),
        ("preset", lambda: Run.open(run.dir.root, "bogus"), r"unknown preset='bogus'"),
        ("dataset", lambda: load_dataset("bogus"), r"spec='bogus'"),
        ("dataset-run", new_run(data=dataclasses.replace(SMOKE.data, spec="mnist-ish")), r"spec='mnist-ish'"),
        ("model", lambda: build_model("resnet-9000", 10), r"name='resnet-9000'"),
        ("model-run", new_run(extractor=dataclasses.replace(SMOKE.extractor, model="resnet-9000")),
         r"extractor.model='resnet-9000'"),
        ("npz-arrays", lambda: load_dataset(f"npz:{bad_data / 'missing.npz'}"),
         rf"{bad_data / 'missing.npz'}' lacks the array\(s\) x_test, y_test"),
        ("npz-labels", lambda: load_dataset(f"npz:{bad_data / 'labels.npz'}"),
         rf"{bad_data / 'labels.npz'}'.*labels must be < len\(classes\)=2, got a label 5"),
        ("folder-classes", lambda: load_dataset(f"folder:{bad_data / 'empty'}"), r"no class folders in '.*empty/train'"),
        ("batch-size", lambda: list(iterate_batches(10, 0, shuffle=False)), r"batch_size=0"),
        ("batch-size-extractor", with_extractor(batch_size=0), r"batch_size=0"),
        ("batch-size-eval", lambda: evaluate(model, x, y, EvalConfig(batch_size=0, attacks=("pgd10",)), "cpu", False),
         r"batch_size=0"),
        ("device", lambda: resolve_device("cuda:7" if torch.cuda.is_available() else "cuda"), r"device='cuda"),
        ("device-run", lambda: Run(run.dir.root, SMOKE, device="tpu"), r"device='tpu'"),
        ("n-examples", lambda: run.evaluate("x", model, n_examples=0), r"n_examples=0"),
        ("attack", lambda: run.evaluate("x", model, attacks=["pgd10", "fgsm"]), r"attack='fgsm'"),
        ("sanity-n", lambda: sanity_checks(model, x, y, 0.1, n=0, device="cpu"), r"n=0"),
        ("override", lambda: override(SMOKE, ["bogus.x=1"]), r"'bogus.x'"),
    ]


def test_bad_library_input_is_refused_and_writes_nothing(run, sandbox, bad_data):
    cases = _library_cases(run, sandbox, bad_data)
    assert len({c[0] for c in cases}) == len(cases)
    for name, call, message in cases:
        before = tree(sandbox)
        with pytest.raises(ValueError, match=message):
            call()
        assert tree(sandbox) == before, f"{name}: wrote into {sandbox}"
        assert not (sandbox / "new-run").exists(), name


# ---------------------------------------------------------------- evaluations that cannot be fooled easily

class _Quantize(nn.Module):
    """x -> round(4x)/4: no effect on what a digit is, but torch.round has a zero gradient everywhere."""

    def forward(self, x):
        return torch.round(x * 4) / 4


class _Wrapped(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner


class _Noisy(_Wrapped):
    """Stochastic gradients: a random input transform in every forward pass, eval mode or not."""

    def forward(self, x):
        return self.inner((x + 0.1 * torch.randn_like(x)).clamp(0, 1))


class _Scaled(_Wrapped):
    """Vanishing gradients: logits x 1e4 saturate the softmax, so cross-entropy's gradient is exactly 0."""

    def forward(self, x):
        return 1e4 * self.inner(x)


class _ReversedGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return -grad


class _LyingBackward(_Wrapped):
    """A backward pass that does not match the forward pass: the input gradient points the wrong way."""

    def forward(self, x):
        return self.inner(_ReversedGradient.apply(x))


@pytest.fixture(scope="module")
def honest(run, one_thread):
    """The smoke AFS model, its first 200 test digits and its PGD-10/PGD-20 evaluation (flags included)."""
    x, y = run.test_set(200)
    afs = run.afs_model("all")
    cfg = dataclasses.replace(SMOKE.evaluation, n_examples=200, attacks=("pgd10", "pgd20"))
    return afs, x, y, evaluate(afs, x, y, cfg, device="cpu", progress=False)


def test_an_honest_model_passes_every_masking_check(run, honest):
    # the standard-trained network at a budget where PGD-20 has converged: honest gradients, and no
    # check may cry wolf. (At eps 0.1 the 2-epoch smoke networks keep ~44% against PGD-20 and ~40%
    # against PGD-100 with CW: `converged` rightly fails there, and the stronger figure is reported.)
    _, x, y, _ = honest
    model, eps = run.extractor(0.0)[0], 0.2
    cfg = dataclasses.replace(SMOKE.evaluation, eps=eps, n_examples=200, attacks=("pgd10", "pgd20"))
    result = evaluate(model, x, y, cfg, device="cpu", progress=False)
    good = sanity_checks(model, x, y, eps, result["metrics"], device="cpu", flags=result["flags"],
                         sources={"eps 0.1": run.extractor(0.1)[0]})
    assert good["passed"] and good["failed"] == [], good
    assert good["n"] == 200 and good["strength"] == "quick" and good["checks"]["converged"]["restarts"] == 2
    assert set(good["checks"]) == {"converged", "blackbox_not_stronger", "transfer_not_stronger", "monotone_in_budget",
                                   "large_budget_breaks", "nonzero_gradients", "deterministic_eval_mode",
                                   "smallest_margin_not_stronger"}
    closest = good["checks"]["smallest_margin_not_stronger"]
    # the points it chose from: every correctly classified example's, from the checks' attacks (or still clean)
    assert sum(closest["chosen_from"].values()) == int(result["flags"]["clean"][:200].sum())
    assert {"PGD-100 ce", "PGD-100 cw", "Square 1000", "transfer eps 0.1"} >= set(closest["chosen_from"]) - {"clean"}
    assert closest["other"] <= closest["reported"] + 1e-9, "it goes on only from what every other attack left"
    # the demo's light checks: the same checks on 100 examples, the converged check's PGD restarted once
    light = sanity_checks(model, x, y, eps, result["metrics"], device="cpu", flags=result["flags"], strength="light")
    assert light["passed"] and light["n"] == 100 and light["strength"] == "light"
    assert light["checks"]["converged"]["restarts"] == 1 and "x 1 restart," in light["checks"]["converged"]["attack"]


def test_a_stacked_model_is_checked_against_transfer_from_its_own_parts(honest):
    afs, x, y, result = honest
    out = sanity_checks(afs, x[:50], y[:50], SMOKE.evaluation.eps, result["metrics"], device="cpu",
                        flags={a: f[:50] for a, f in result["flags"].items()}, strength="light")
    assert set(out["checks"]["transfer_not_stronger"]["per_source"]) == {
        "extractor 0", "extractor 1", "extractor 2", "logit average"}


# (form, how to break the model, the check that must fail)
@pytest.mark.parametrize("form, broken, caught_by", [
    ("shattered gradients", lambda afs: nn.Sequential(_Quantize(), afs), {"nonzero_gradients"}),
    ("stochastic gradients", _Noisy, {"deterministic_eval_mode"}),
    # the CW margin loss of the stronger attack does not saturate: it breaks what CE-PGD could not move
    ("vanishing gradients", _Scaled, {"converged"}),
    ("backward does not match forward", _LyingBackward, {"blackbox_not_stronger", "transfer_not_stronger"}),
])
def test_each_form_of_gradient_masking_fails_a_check(run, honest, form, broken, caught_by):
    afs, x, y, _ = honest
    model = broken(afs)
    # a wrapped model is not recognised as a stack: its surrogate is the extractor at the evaluation budget
    with pytest.warns(RuntimeWarning, match="SANITY CHECKS FAILED"):
        out = sanity_checks(model, x, y, SMOKE.evaluation.eps, device="cpu", sources={"eps 0.1": run.extractor(0.1)[0]},
                            strength="light")  # 100 examples: each form is caught there too (the quick checks: 20 s each)
    assert not out["passed"]
    assert caught_by <= set(out["failed"]), (form, out["failed"])


def test_an_attack_that_has_not_converged_fails_the_converged_check(honest):
    afs, x, y, _ = honest
    eps = SMOKE.evaluation.eps
    # PGD whose 20 steps of eps/200 cannot leave a tenth of the ball
    cfg = dataclasses.replace(SMOKE.evaluation, n_examples=200, attacks=("pgd10", "pgd20"), step_size=eps / 200)
    weak = evaluate(afs, x, y, cfg, device="cpu", progress=False)
    with pytest.warns(RuntimeWarning, match="converged"):
        out = sanity_checks(afs, x, y, eps, weak["metrics"], device="cpu", flags=weak["flags"], step=eps / 200,
                            strength="light")
    check = out["checks"]["converged"]
    assert not check["passed"] and check["p"] < 0.05 and check["other"] < check["reported"]
    assert check["steps"] == 100, "5x the steps of the strongest reported PGD (PGD-20)"


def test_autoattack_above_pgd_on_the_same_examples_fails(honest):
    afs, x, y, result = honest
    flags = dict(result["flags"])
    flags["aa"] = flags["clean"].clone()  # an "AutoAttack" that broke nothing PGD broke
    with pytest.warns(RuntimeWarning, match="aa_not_above_pgd"):
        out = sanity_checks(afs, x, y, SMOKE.evaluation.eps, result["metrics"], n=50, device="cpu", flags=flags,
                            strength="light")
    assert "aa_not_above_pgd" in out["failed"]
    # from the percentages alone where no flags are given (the same rule as the checks apply, without running
    # every other check again)
    with pytest.warns(RuntimeWarning, match="aa_not_above_pgd"):
        odd = aa_checks({"checks": {}, "n": 100, "strength": "light"}, {"aa": 60.0, "pgd20": 40.0, "n": 100}, None)
    assert "aa_not_above_pgd" in odd["failed"]


def test_batchnorm_left_in_training_mode_is_flagged(run):
    x, y = run.test_set(100)

    class TrainModeBN(nn.Module):  # a model whose eval() is ignored: BatchNorm uses the batch's statistics
        def __init__(self, inner):
            super().__init__()
            self.inner, self.bn = inner, nn.BatchNorm1d(10)

        def train(self, mode=True):
            super().train(mode)
            self.bn.train(True)
            return self

        def forward(self, x):
            return self.bn(self.inner(x))

    with pytest.warns(RuntimeWarning, match="deterministic_eval_mode"):
        out = sanity_checks(TrainModeBN(run.extractor(0.1)[0]), x, y, 0.1, device="cpu")
    assert "deterministic_eval_mode" in out["failed"]
    assert out["checks"]["deterministic_eval_mode"]["eval_mode"] is False


def test_stacked_models_are_evaluated_with_sanity_checks_by_default(run):
    afs = run.afs_model("all")
    m = run.evaluate("afs-default", afs, attacks=["pgd10"])
    assert set(m["sanity"]["checks"]) >= {"converged", "blackbox_not_stronger", "transfer_not_stronger"}
    assert m["sanity"]["n"] == min(SMOKE.evaluation.n_examples, SMOKE.evaluation.sanity_examples)
    assert m["worst"] <= m["pgd10"] and m["ci95"]["worst"][0] <= m["worst"] <= m["ci95"]["worst"][1]
    if not m["sanity"]["checks"]["converged"]["passed"]:  # then the stronger attack is what is reported
        # run only on the examples PGD-10 left standing: its flags are the worst case itself
        assert "pgd50" in m["attacks"] and m["worst"] == pytest.approx(m["pgd50"])
    assert read_json(run.dir.eval_dir(m["name"]) / "metrics.json")["sanity"] == m["sanity"]
    single = run.evaluate("single-default", run.extractor(0.1)[0], attacks=["pgd10"])
    assert "sanity" not in single
    assert "sanity" in run.evaluate("single-asked", run.extractor(0.1)[0], attacks=["pgd10"], sanity=True)



def test_an_evaluation_made_by_other_code_is_reused_with_a_note_or_refused_on_request(run, monkeypatch, capsys):
    from afs_kit.run.pipeline import SAME_CODE_ENV

    model = run.extractor(0.1)[0]
    m = run.evaluate("other-code", model, attacks=["clean"], n_examples=20)
    path = run.dir.eval_dir(m["name"]) / "metrics.json"
    write_json(path, {**read_json(path), "code_version": "0123abc"})
    run.progress = True
    try:
        again = run.evaluate("other-code", model, attacks=["clean"], n_examples=20)
        assert again["clean"] == m["clean"]
        assert f"made by code 0123abc, reused by {m['code_version']}" in capsys.readouterr().out
        monkeypatch.setenv(SAME_CODE_ENV, "1")
        with pytest.raises(ValueError, match=r"made by code 0123abc, not .*--same-code.* refuses it; delete"):
            run.evaluate("other-code", model, attacks=["clean"], n_examples=20)
    finally:
        run.progress = False
