"""Several processes under torchrun (issue 14), on the CPU with the gloo backend, launched exactly as the
README says: `torchrun --standalone --nproc_per_node=2 -m afs_kit -- <command> ...`. Each job is compared with
one process running the same command (both with one thread per process, as torchrun sets it, so both compute alike).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from afs_kit.app.cli import main
from afs_kit.core.io import load_checkpoint, read_json

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
SMOKE = ["--preset", "smoke", "--device", "cpu"]

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(*args: str, procs: int = 2, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={procs}", *extra, "-m", "afs_kit", "--", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)


def one_process(*args: str) -> int:
    """The command in this process (one thread, as each torchrun worker computes): a process start saved."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(list(args))
    finally:
        torch.set_num_threads(threads)


def extractors(run: Path) -> dict[str, dict]:
    return {p.parent.name: load_checkpoint(p) for p in sorted(run.glob("extractors/*/extractor.pt"))}


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=0, atol=atol, msg=k)


def smoke_extractors(run: Path, launch) -> Path:
    """The smoke run's three extractors, 2 epochs each, trained by `launch` (torchrun; the one-process side is the
    suite's shared `smoke_networks`)."""
    out = launch("train-extractors", *SMOKE, "--run", str(run), "--set", "extractor.epochs=2", "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def by_budgets(tmp_path_factory) -> Path:
    return smoke_extractors(tmp_path_factory.mktemp("two") / "run", torchrun)


def test_parallel_budgets_trains_each_budget_once_as_one_process_would(smoke_networks, by_budgets):
    one, two = extractors(smoke_networks), extractors(by_budgets)  # the suite's run: one process, one thread
    assert list(one) == list(two) == ["eps-0", "eps-0.1000", "eps-0.2000"]
    # budgets shared out in turn: 0 and 0.2 on rank 0, 0.1 on rank 1; each trained once, nothing else
    assert [two[n]["trained_by"] for n in two] == [{"rank": r, "world_size": 2, "parallel": "budgets"}
                                                   for r in (0, 1, 0)]
    for name in one:
        assert two[name]["key"] == one[name]["key"] and two[name]["history"] == one[name]["history"]
        assert_same_weights(one[name], two[name])  # bitwise: the same computation on one thread
    assert not list(by_budgets.rglob("last.pt"))


def test_parallel_data_equals_one_process_with_the_same_global_batch(tmp_path):
    """`mlp` (no BatchNorm) at budget 0 on digits without augmentation: nothing random in a step, so the mean of
    the two ranks' gradients over their halves of each batch is the gradient of the whole batch; the runs
    differ only in the order of floating-point sums (tolerance 1e-5)."""
    args = [*SMOKE, "--eps", "0", "--set", "extractor.model=mlp", "--set", "extractor.epochs=3",
            "--set", "extractor.precision=fp32", "--quiet"]
    assert one_process("train-extractors", "--run", str(tmp_path / "one"), *args) == 0
    two = torchrun("train-extractors", "--run", str(tmp_path / "two"), "--parallel", "data", *args)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = extractors(tmp_path / "one")["eps-0"], extractors(tmp_path / "two")["eps-0"]
    assert b["trained_by"] == {"rank": 0, "world_size": 2, "parallel": "data"}
    assert_same_weights(a, b, atol=1e-5)
    for ha, hb in zip(a["history"], b["history"]):
        assert abs(ha["train_loss"] - hb["train_loss"]) < 1e-5 and ha["val_clean"] == hb["val_clean"]


def test_sharded_evaluation_gives_one_process_flags(by_budgets, tmp_path):
    """A merger trained under torchrun; then an extractor evaluated by one process and by two ranks. With
    batches of 20 (each rank's contiguous share of the 40 examples is one of the one process's batches) both
    compute on the same batches, and PGD's starts are drawn per example: identical PGD flags. AutoAttack
    reseeds its random starts per call on the examples a rank holds, so its flags may differ where a start
    decides; they agree on at least 90% of the examples. (Batches of 1 made the same point in 45 s.)"""
    run = tmp_path / "run"
    shutil.copytree(by_budgets, run)
    merged = torchrun("train-merger", "--run", str(run), "--subset", "all", "--device", "cpu", "--quiet")
    assert merged.returncode == 0, merged.stderr[-3000:]
    ckpt = load_checkpoint(next(run.glob("mergers/*/merger.pt")))
    assert ckpt["health"]["passed"] or ckpt["history"][-1]["train_loss"] < 2.3
    for copy in ("one", "two"):
        shutil.copytree(run, tmp_path / copy)
    # an extractor: no masking checks (they run on rank 0 alone, the same in both), AutoAttack's two APGD attacks
    evaluate = ["evaluate", "--model", "extractor:0.1", "--attacks", "clean,pgd10,pgd20,aa", "--n", "40", "--device",
                "cpu", "--set", "evaluation.batch_size=20", "--set", "evaluation.aa_attacks=apgd-ce,apgd-dlr", "--quiet"]
    assert one_process(*evaluate[:1], "--run", str(tmp_path / "one"), *evaluate[1:]) == 0
    out = torchrun(*evaluate[:1], "--run", str(tmp_path / "two"), *evaluate[1:])
    assert out.returncode == 0, out.stderr[-3000:]
    records = {c: next((tmp_path / c).glob("eval/extractor-*")) for c in ("one", "two")}
    assert records["one"].name == records["two"].name
    flags = {c: load_checkpoint(r / "flags.pt")["flags"] for c, r in records.items()}
    metrics = {c: read_json(r / "metrics.json") for c, r in records.items()}
    assert (metrics["one"]["world_size"], metrics["two"]["world_size"]) == (1, 2)
    for attack in ("clean", "pgd10", "pgd20"):
        assert torch.equal(flags["one"][attack], flags["two"][attack]), attack
    assert (flags["one"]["aa"] == flags["two"]["aa"]).float().mean() >= 0.9


def said_once(out: subprocess.CompletedProcess, refusal: str) -> None:
    """A torchrun job refused: every rank refuses the same input, only rank 0 says so (torchrun's own failure
    report follows it)."""
    lines = [line for line in (out.stdout + out.stderr).splitlines() if ": error:" in line]
    assert out.returncode != 0 and len(lines) == 1 and refusal in lines[0], out.stderr[-3000:]


def test_bad_parallel_input_is_refused_before_anything_is_written(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train-extractors", *SMOKE, "--run", str(tmp_path / "a"), "--parallel", "nope"])
    assert exit_.value.code == 2 and "argument --parallel: invalid choice: 'nope'" in capsys.readouterr().err
    out = torchrun("train-extractors", *SMOKE, "--run", str(tmp_path / "b"), "--eps", "0.1", procs=2)
    said_once(out, "--parallel budgets with 2 processes for 1 budget would leave 1 idle")
    out = torchrun("train-extractors", *SMOKE, "--run", str(tmp_path / "c"), "--parallel", "data", procs=3)
    said_once(out, "extractor.batch_size=64, which the world size 3 does not divide")
    out = torchrun("train-extractors", *SMOKE, "--run", str(tmp_path / "d"), "--no-such-option")  # argparse's
    said_once(out, "afs-kit: error: unrecognized arguments: --no-such-option")
    assert not any((tmp_path / d).exists() for d in ("a", "b", "c", "d"))
