"""The command line refuses every row of issue 7's input list: exit status 2, one line on stderr that
names the argument and the value, and nothing written (an existing run directory stays byte for byte
the same, a new one is not created, a report folder is not made).

Library-side refusals of the same rows are in test_reliability.py; here the command line is driven
in-process through `afs_kit.app.cli.main` and, for a few rows, as `python -m afs_kit` in a subprocess.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import chmod_tree, snapshot, unwritable_prefix

from afs_kit.app.cli import main

RUN, NEW, OUT, BAD = "{run}", "{new}", "{out}", "{bad}"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A smoke run with its three extractors, one epoch each (a few seconds)."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    argv = ["train-extractors", "--preset", "smoke", "--run", str(run_dir), "--set", "extractor.epochs=1",
            "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    assert len(list(run_dir.glob("extractors/*/extractor.pt"))) == 3
    return run_dir


@pytest.fixture
def box(tmp_path, trained_run, monkeypatch) -> dict[str, str]:
    """A private copy of the trained run in a fresh folder, also the working folder (so a default
    `runs/` or `reports/` would show up in the snapshot too)."""
    shutil.copytree(trained_run, tmp_path / "run", copy_function=shutil.copy2)
    monkeypatch.chdir(tmp_path)
    return {"root": str(tmp_path), "run": str(tmp_path / "run"), "new": str(tmp_path / "new-run"),
            "out": str(tmp_path / "report")}


def fill(argv: list[str], box: dict[str, str], bad: Path) -> list[str]:
    return [a.replace(RUN, box["run"]).replace(NEW, box["new"]).replace(OUT, box["out"]).replace(BAD, str(bad))
            for a in argv]


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as err:  # argparse's own usage errors
        code = err.code
    return code, capsys.readouterr().err


def new_run(*extra: str) -> list[str]:
    return ["train-extractors", "--preset", "smoke", "--run", NEW, "--device", "cpu", *extra]


def merger(*extra: str) -> list[str]:
    return ["train-merger", "--run", RUN, "--device", "cpu", *extra]


def evaluate(*extra: str) -> list[str]:
    return ["evaluate", "--run", RUN, "--device", "cpu", "--model", "extractors", *extra]


def report(*extra: str) -> list[str]:
    return ["report", "--preset", "smoke", "--run", RUN, "--out", OUT, "--device", "cpu", *extra]


# (argv, a regular expression the stderr line must match: it names the argument and the value)
ROWS = [
    # eps outside [0, 1]
    pytest.param(new_run("--eps", "1.5"), r"eps must be in \[0, 1\], got eps='1.5'", id="eps-above"),
    pytest.param(new_run("--eps=-0.1"), r"eps must be in \[0, 1\], got eps='-0.1'", id="eps-negative"),
    pytest.param(new_run("--eps", "0.1,abc"), r"eps must be a number .*, got eps='abc'", id="eps-text"),
    pytest.param(new_run("--eps", ""), r"eps must list at least one budget, got eps=''", id="eps-empty"),
    pytest.param(new_run("--eps", "0.1,0.1"), r"eps lists a budget twice \(0.1\), got eps='0.1,0.1'", id="eps-twice"),
    pytest.param(new_run("--set", "evaluation.eps=2"), r"evaluation.eps must be in \[0, 1\], got evaluation.eps=2.0",
                 id="eps-set-evaluation"),
    pytest.param(new_run("--set", "budgets=0,1.5"), r"eps must be in \[0, 1\], got eps=1.5", id="eps-set-budgets"),
    pytest.param(merger("--set", "merger.eps=-0.1"), r"merger.eps=-0.1", id="eps-set-merger"),
    pytest.param(evaluate("--set", "evaluation.eps=1.5"), r"evaluation.eps=1.5", id="eps-evaluate"),
    # alpha outside [0, 1] (the merger's clean-loss weight) and a PGD step size that is not positive
    pytest.param(merger("--alpha", "1.5"), r"alpha must be in \[0, 1\], got alpha='1.5'", id="alpha-above"),
    pytest.param(merger("--alpha=-0.5"), r"alpha='-0.5'", id="alpha-negative"),
    pytest.param(merger("--set", "merger.alpha=2"), r"alpha must be in \[0, 1\], got alpha=2.0", id="alpha-set"),
    pytest.param(evaluate("--set", "evaluation.step_size=0"), r"evaluation.step_size=0.0", id="step-size-zero"),
    # negative or zero steps
    pytest.param(new_run("--set", "extractor.attack_steps=0"), r"extractor.attack_steps must be >= 1, got "
                 r"extractor.attack_steps=0", id="steps-zero"),
    pytest.param(new_run("--set", "extractor.attack_steps=-3"), r"extractor.attack_steps=-3", id="steps-negative"),
    pytest.param(new_run("--set", "extractor.val_attack_steps=0"), r"extractor.val_attack_steps=0",
                 id="steps-validation"),
    pytest.param(merger("--set", "merger.attack_steps=0"), r"merger.attack_steps=0", id="steps-merger"),
    pytest.param(new_run("--set", "extractor.epochs=0"), r"extractor.epochs=0", id="epochs-zero"),
    # an empty subset
    pytest.param(merger("--subset", ""), r"subset must not be empty", id="subset-blank"),
    pytest.param(merger("--subset", "000"), r"subset='000' selects no extractor \(an empty subset\)",
                 id="subset-zeros"),
    pytest.param(evaluate("--model", "avg:"), r"model='avg:' names an empty subset", id="subset-avg-empty"),
    # a binary vector longer than the extractor list or with characters other than 0 and 1
    pytest.param(merger("--subset", "1111"), r"subset='1111' has 4 digits but the run has only 3 extractors",
                 id="subset-too-long"),
    pytest.param(evaluate("--model", "avg:0101"), r"subset='0101' has 4 digits", id="subset-too-long-avg"),
    pytest.param(merger("--subset", "01x"), r"subset='01x' is neither 'all', a binary vector", id="subset-01x"),
    # a subset naming missing extractors
    pytest.param(merger("--subset", "0,0.3"), r"subset='0,0.3' names budget 0.3, which has no extractor",
                 id="subset-missing"),
    pytest.param(evaluate("--model", "extractor:0.3"), r"eps=0.3 has no trained extractor", id="extractor-missing"),
    pytest.param(["train-merger", "--run", NEW, "--device", "cpu"], r"run='.*new-run' holds no run.json",
                 id="run-missing"),
    # unknown presets, datasets, models
    pytest.param(["train-extractors", "--preset", "bogus", "--run", NEW], r"unknown preset='bogus'",
                 id="preset-unknown"),
    pytest.param(["train-extractors", "--preset", "demo", "--run", RUN, "--device", "cpu"],
                 r"made with preset='smoke', not preset='demo'", id="preset-other"),
    pytest.param(["report", "--preset", "bogus", "--run", RUN, "--out", OUT], r"unknown preset='bogus'",
                 id="preset-report"),
    pytest.param(new_run("--set", "data.spec=mnist-ish"), r"unknown data set spec='mnist-ish'", id="dataset-new"),
    pytest.param(merger("--set", "data.spec=bogus"), r"spec='bogus'", id="dataset-run"),
    pytest.param(new_run("--set", "data.spec=npz:" + BAD + "/absent.npz"), r"npz file not found: '.*absent.npz'",
                 id="dataset-npz-absent"),
    pytest.param(new_run("--set", "extractor.model=nope"), r"unknown extractor.model='nope'", id="model-new"),
    pytest.param(merger("--set", "extractor.model=nope"), r"unknown extractor.model='nope'", id="model-run"),
    pytest.param(evaluate("--model", "nope"), r"unknown model='nope'", id="model-evaluate"),
    pytest.param(evaluate("--model", "afs:nope"), r"model='afs:nope': no merger folder 'nope'", id="model-afs"),
    # an npz with missing arrays or labels out of range; an image folder with no classes
    pytest.param(new_run("--set", "data.spec=npz:" + BAD + "/missing.npz"),
                 r"missing.npz' lacks the array\(s\) x_test, y_test", id="npz-arrays"),
    pytest.param(new_run("--set", "data.spec=npz:" + BAD + "/labels.npz"),
                 r"labels.npz': labels must be < len\(classes\)=2, got a label 5", id="npz-labels"),
    pytest.param(new_run("--set", "data.spec=folder:" + BAD + "/empty"), r"no class folders in '.*empty/train'",
                 id="folder-no-classes"),
    pytest.param(new_run("--set", "data.spec=folder:" + BAD + "/no-splits"), r"needs '.*no-splits/train'",
                 id="folder-no-splits"),
    # a batch size of zero
    pytest.param(new_run("--set", "extractor.batch_size=0"), r"extractor.batch_size must be >= 1, got "
                 r"extractor.batch_size=0", id="batch-size-extractor"),
    pytest.param(merger("--set", "merger.batch_size=0"), r"merger.batch_size=0", id="batch-size-merger"),
    pytest.param(evaluate("--set", "evaluation.batch_size=0"), r"evaluation.batch_size=0", id="batch-size-evaluate"),
    # a device that does not exist
    pytest.param(new_run("--device", "cuda:7"), r"device='cuda:7'", id="device-cuda-7"),
    pytest.param(new_run("--device", "tpu"), r"device must be 'auto', 'cpu' or 'cuda\[:N\]', got device='tpu'",
                 id="device-tpu"),
    pytest.param(evaluate("--device", "tpu"), r"device='tpu'", id="device-evaluate"),
    pytest.param(merger("--device", "cuda:x"), r"device='cuda:x'", id="device-merger"),
    pytest.param(report("--device", "tpu"), r"device='tpu'", id="device-report"),
    # papermill parameters with unknown names (and values of the wrong kind)
    pytest.param(report("-p", "nope=1"), r"unknown notebook parameter 'nope'", id="param-unknown"),
    pytest.param(report("-p", "nope"), r"notebook parameter must look like NAME=VALUE, got 'nope'",
                 id="param-no-value"),
    pytest.param(report("-p", "N_EVAL=0"), r"parameter N_EVAL must be >= 1, got N_EVAL='0'", id="param-value"),
    # values a notebook would only trip over later: checked before the first notebook runs
    pytest.param(report("-p", "DEVICE=tpu"), r"device='tpu'", id="param-device"),
    pytest.param(report("-p", "BUDGETS=0,1.5"), r"parameter BUDGETS must list numbers in \[0, 1\], got BUDGETS='0,1.5'",
                 id="param-budgets"),
    pytest.param(report("-p", "ALPHA=2"), r"ALPHA must be in \[0, 1\], got ALPHA='2'", id="param-alpha"),
    pytest.param(report("-p", "ALPHAS=0,-0.5"), r"ALPHAS must list numbers in \[0, 1\], got ALPHAS='0,-0.5'",
                 id="param-alphas"),
    pytest.param(report("-p", "SUBSET=01x"), r"parameter SUBSET: subset='01x'", id="param-subset-chars"),
    pytest.param(report("-p", "SUBSETS=1111"), r"parameter SUBSETS: subset='1111' has 4 digits", id="param-subsets-long"),
    # evaluate's own arguments
    pytest.param(evaluate("--n", "0"), r"--n must be >= 1, got n=0", id="n-zero"),
    pytest.param(evaluate("--n", "-5"), r"n=-5", id="n-negative"),
    pytest.param(evaluate("--n", "abc"), r"argument --n: invalid int value: 'abc'", id="n-text"),
    pytest.param(evaluate("--attacks", "pgd10,fgsm"), r"unknown attack='fgsm'", id="attack-unknown"),
    pytest.param(evaluate("--attacks", ","), r"attacks must name at least one .*, got attacks=','",
                 id="attack-empty"),
    pytest.param(merger("--mix", "nope"), r"argument --mix: invalid choice: 'nope'", id="mix-unknown"),
    # seed counts (issue 12)
    pytest.param(new_run("--seeds", "0"), r"--seeds must be an integer >= 1, got seeds='0'", id="seeds-zero"),
    pytest.param(new_run("--seeds=-2"), r"--seeds must be an integer >= 1, got seeds='-2'", id="seeds-negative"),
    pytest.param(merger("--seeds", "1.5"), r"--seeds must be an integer >= 1, got seeds='1.5'", id="seeds-fraction"),
    pytest.param(merger("--seeds", "2"), r"seeds/seed-1 has no trained extractors; run train-extractors --seeds 2",
                 id="seeds-untrained"),
    pytest.param(report("--seeds", "0"), r"--seeds must be an integer >= 1, got seeds='0'", id="seeds-report"),
    # export (issue 26): only a trained AFS model, named as its merger folder
    pytest.param(["export", "--run", RUN, "--model", "extractor:0.1", "--out", OUT],
                 r"--model must be afs:<merger folder>, got model='extractor:0.1'", id="export-not-afs"),
    pytest.param(["export", "--run", RUN, "--model", "afs:nope", "--out", OUT],
                 r"model=afs:nope names no trained merger in .* \(trained: none\)", id="export-no-merger"),
]


@pytest.mark.parametrize("argv, message", ROWS)
def test_bad_input_exits_2_names_it_and_writes_nothing(argv, message, box, bad_data, capsys):
    argv = fill(argv, box, bad_data)
    before = snapshot(box["root"])
    code, err = run_main(argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert snapshot(box["root"]) == before, "the command wrote something"
    assert not Path(box["new"]).exists() and not Path(box["out"]).exists()


def test_the_rows_cover_every_command():
    commands = {p.values[0][0] for p in ROWS}
    assert commands == {"train-extractors", "train-merger", "evaluate", "report", "export"}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow  # a real `python -m afs_kit` process per case: make test-fast skips them
@pytest.mark.parametrize("argv, message", [
    pytest.param(new_run("--eps", "1.5"), r"^afs-kit: error: eps must be in \[0, 1\], got eps='1.5'$", id="eps"),
    pytest.param(merger("--subset", "01x"), r"^afs-kit: error: subset='01x' is neither", id="subset"),
    pytest.param(report("-p", "nope=1"), r"^afs-kit: error: unknown notebook parameter 'nope'", id="param"),
])
def test_the_installed_command_exits_2_with_one_line(argv, message, box, bad_data):
    """`python -m afs_kit` as a user runs it: status 2 and one error line, no traceback."""
    argv = fill(argv, box, bad_data)
    before = snapshot(box["root"])
    proc = subprocess.run([sys.executable, "-m", "afs_kit", *argv], cwd=box["root"], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), proc.stderr
    assert proc.stdout == ""
    assert snapshot(box["root"]) == before
    assert not Path(box["new"]).exists() and not Path(box["out"]).exists()


def test_a_good_command_still_runs_after_the_refusals(box, capsys):
    """The checks refuse bad input only: the same run evaluates when asked properly; `--quiet` silences the
    progress, never the results."""
    argv = ["evaluate", "--run", box["run"], "--device", "cpu", "--model", "extractor:0.1", "--attacks", "clean",
            "--n", "20", "--quiet"]
    assert main(argv) == 0
    assert len(list((Path(box["run"]) / "eval").glob("*/metrics.json"))) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("evaluation extractor-") and "clean " in out[0], out


def test_evaluate_writes_worst_intervals_and_the_examples_hash(box):
    import json

    from afs_kit.core.stats import confidence_interval, examples_hash

    argv = ["evaluate", "--run", box["run"], "--device", "cpu", "--model", "extractor:0.1", "--attacks", "pgd10",
            "--n", "40", "--quiet"]
    assert main(argv) == 0
    (path,) = (Path(box["run"]) / "eval").glob("*/metrics.json")
    m = json.loads(path.read_text())
    assert set(m["ci95"]) == {"clean", "pgd10", "worst"} and m["worst"] <= m["pgd10"] <= m["clean"]
    for name in ("clean", "pgd10", "worst"):
        assert m["ci95"][name] == pytest.approx(list(confidence_interval(round(m[name] * 40 / 100), 40)))
    assert m["examples"] == {"first": 40, "hash": examples_hash(range(40))}
    assert m["code_version"], "every result names the code that made it"


def test_estimate_counts_each_attack_times_the_model_and_writes_nothing(box, capsys):
    before = snapshot(box["root"])
    argv = ["evaluate", "--run", box["run"], "--device", "cpu", "--model", "extractor:0.1", "--attacks",
            "clean,pgd20", "--n", "40", "--sanity", "--estimate"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "pgd20: 21 forward + 20 backward passes per example" in out and "x 40 examples" in out
    assert "masking checks (light)" in out and "if `converged` fails, 200 more" in out  # smoke's light checks
    assert re.search(r"^  estimated wall time: (under 1 s|[0-9.]+ (s|min|h))", out, re.M), out
    assert snapshot(box["root"]) == before, "an estimate runs nothing and writes nothing"


def test_seeds_train_one_complete_run_per_seed_inside_the_run_directory(box):
    run = box["run"]
    argv = ["train-extractors", "--run", run, "--device", "cpu", "--quiet", "--seeds", "2", "--eps", "0,0.1",
            "--set", "extractor.epochs=1"]
    assert main(argv) == 0
    seeded = Path(run) / "seeds" / "seed-1"
    assert len(list(seeded.glob("extractors/*/extractor.pt"))) == 2
    from afs_kit.core.io import load_checkpoint

    ckpt = load_checkpoint(next(seeded.glob("extractors/*/extractor.pt")))
    assert ckpt["config"]["seed"] == 1


def _record(box, n):
    import json

    (path,) = (Path(box["run"]) / "eval").glob(f"extractor-eps-0.1000--n{n}--*/metrics.json")
    return json.loads(path.read_text())


def test_a_later_evaluation_adds_its_attacks_and_never_replaces_the_record(box, capsys):
    """Issue: `evaluate --attacks clean` replaced a metrics.json holding PGD and AutoAttack."""
    base = ["evaluate", "--run", box["run"], "--device", "cpu", "--model", "extractor:0.1", "--n", "30"]
    assert main([*base, "--attacks", "pgd10"]) == 0
    first = _record(box, 30)
    assert main([*base, "--attacks", "clean"]) == 0
    assert "found clean, pgd10" in capsys.readouterr().out
    assert _record(box, 30) == first, "a cheaper request reuses the record as it is"
    assert main([*base, "--attacks", "pgd20"]) == 0
    m = _record(box, 30)
    assert m["attacks"] == ["clean", "pgd10", "pgd20"]
    assert m["pgd10"] == first["pgd10"], "the earlier attack is kept, not run again"
    assert m["worst"] <= min(m["pgd10"], m["pgd20"]) and set(m["ci95"]) == {"clean", "pgd10", "pgd20", "worst"}


def test_the_command_line_and_the_notebooks_share_one_evaluation(box, capsys):
    from afs_kit.run.pipeline import Run
    from afs_kit.studies import evaluate_extractor

    argv = ["evaluate", "--run", box["run"], "--device", "cpu", "--model", "extractor:0.1", "--attacks",
            "clean,pgd10", "--n", "30", "--sanity"]
    assert main(argv) == 0
    capsys.readouterr()
    run = Run.open(box["run"], device="cpu")
    m = evaluate_extractor(run, 0.1, ("clean", "pgd10"), n_examples=30)
    assert "found clean, pgd10" in capsys.readouterr().out
    assert m == _record(box, 30)
    # and the other way round: what a notebook evaluated, the command line finds
    evaluate_extractor(run, 0.2, ("clean", "pgd10"), n_examples=30)
    capsys.readouterr()
    assert main([*argv[:6], "extractor:0.2", *argv[7:]]) == 0
    assert "found clean, pgd10" in capsys.readouterr().out


# ---------------------------------------------------------------- the command line's own failures (UX issue)
def afs_kit(*argv: str, cwd, prefix: tuple[str, ...] = (), timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -m afs_kit ARGV` as a user runs it (optionally under `prefix`, e.g. setpriv)."""
    return subprocess.run([*prefix, sys.executable, "-m", "afs_kit", *argv], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def in_process(*argv: str, cwd) -> subprocess.CompletedProcess:
    """The same command through `main` in this process (what `python -m afs_kit` runs, without its 2 s start):
    the exit status and what it printed, as `afs_kit` gives them; `--help` exits through SystemExit."""
    import contextlib
    import io

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as exit_:
                code = exit_.code
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(list(argv), code, out.getvalue(), err.getvalue())


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The refusal: status 2, exactly one `afs-kit: error:` line on stderr, no traceback."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("afs-kit: error: "), proc.stderr
    return lines[0]


COMMANDS = {  # every command that takes --run, with what it needs besides
    "train-extractors": ["train-extractors", "--preset", "smoke", "--device", "cpu"],
    "train-merger": ["train-merger", "--device", "cpu"],
    "evaluate": ["evaluate", "--model", "extractors", "--attacks", "clean", "--n", "10", "--device", "cpu"],
    "report": ["report", "--preset", "smoke", "--out", OUT, "--device", "cpu"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("under", [False, True], ids=["file", "under-a-file"])
def test_a_run_that_is_a_file_exits_2_naming_it(command, under, box):
    """Was a 15-line FileExistsError traceback."""
    afile = Path(box["root"]) / "afile"
    afile.write_text("not a run\n")
    run = afile / "sub" if under else afile
    before = snapshot(box["root"])
    line = one_error_line(in_process(*fill(COMMANDS[command], box, Path()), "--run", str(run), cwd=box["root"]))
    expected = f"--run={run} lies under {afile}, which is a file" if under else f"--run={run} is a file"
    assert f"{expected}, not a run directory" in line
    assert snapshot(box["root"]) == before and not Path(box["out"]).exists()


@pytest.mark.slow  # a real `python -m afs_kit` process per case: make test-fast skips them
@pytest.mark.parametrize("command", COMMANDS)
def test_a_read_only_run_directory_exits_2_naming_it(command, box):
    """Was a PermissionError traceback on RUN/.lock."""
    run = Path(box["run"])
    chmod_tree(run, writable=False)
    try:
        prefix = unwritable_prefix(run)
        before = snapshot(box["root"])
        line = one_error_line(afs_kit(*fill(COMMANDS[command], box, Path()), "--run", str(run), cwd=box["root"],
                                      prefix=prefix))
        assert f"run directory {run} is not writable" in line
        assert snapshot(box["root"]) == before and not Path(box["out"]).exists()
    finally:
        chmod_tree(run, writable=True)


@pytest.mark.slow  # a real `python -m afs_kit` process: make test-fast skips it
def test_a_read_only_run_answers_a_cached_evaluate_without_the_lock(box):
    """Reading never needs write access: a colleague's finished run on a read-only mount."""
    argv = ["evaluate", "--model", "extractor:0.1", "--attacks", "pgd10", "--n", "20", "--device", "cpu"]
    assert main([argv[0], "--run", box["run"], *argv[1:], "--quiet"]) == 0
    run = Path(box["run"])
    chmod_tree(run, writable=False)
    try:
        prefix = unwritable_prefix(run)
        before = snapshot(box["root"])
        out = afs_kit(argv[0], "--run", str(run), *argv[1:], cwd=box["root"], prefix=prefix)
        assert out.returncode == 0, out.stderr
        assert "found clean, pgd10" in out.stdout + out.stderr
        assert snapshot(box["root"]) == before
    finally:
        chmod_tree(run, writable=True)


@pytest.mark.parametrize("command", ["train-merger", "evaluate"])
@pytest.mark.parametrize("exists", [False, True], ids=["missing", "empty"])
def test_a_command_without_preset_says_to_train_extractors_first(command, exists, box):
    """train-merger and evaluate take no --preset, so they must not ask for one."""
    run = Path(box["new"])
    if exists:
        run.mkdir()
    before = snapshot(box["root"])
    line = one_error_line(in_process(*COMMANDS[command], "--run", str(run), cwd=box["root"]))
    assert f"run={str(run)!r} holds no run.json" in line and f"train-extractors --preset <name> --run {run}" in line
    assert "give --preset" not in line
    assert snapshot(box["root"]) == before and run.exists() == exists


@pytest.mark.slow  # a real `python -m afs_kit` process per case: make test-fast skips them
def test_version_names_the_package_and_the_code(tmp_path):
    from importlib import metadata

    from afs_kit.core.version import _from_git, code_version

    # the commit as the command sees it now (this process caches its own, and a commit may land meanwhile)
    _from_git.cache_clear()
    expected = code_version()
    proc = afs_kit("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith(f"afs-kit {metadata.version('afs-kit')}") and expected in proc.stdout
    assert len(proc.stdout.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["train-extractors", "train-merger", "evaluate", "report", "presets"])
def test_every_help_ends_with_examples(command, tmp_path):
    proc = in_process(command, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    head, sep, tail = proc.stdout.rpartition("examples:\n")
    assert sep and "options:" in head, proc.stdout
    examples = tail.strip().splitlines()
    assert 1 <= len(examples) <= 2 and all(e.strip().startswith(f"afs-kit {command}") for e in examples), tail


@pytest.mark.parametrize("argv", [["train-merger"], ["evaluate", "--model", "extractor:0.1", "--attacks", "clean"]],
                         ids=["train-merger", "evaluate"])
def test_a_truncated_checkpoint_is_named_with_what_to_do(argv, box):
    path = Path(box["run"]) / "extractors" / "eps-0.1000" / "extractor.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    before = snapshot(box["root"])
    line = one_error_line(in_process(*argv, "--run", box["run"], "--device", "cpu", cwd=box["root"]))
    assert str(path) in line and "delete the file and rerun" in line and "train it again" in line
    assert snapshot(box["root"]) == before


@pytest.mark.slow
def test_ctrl_c_exits_130_with_one_line_and_keeps_the_run_resumable(tmp_path):
    """Was a 30-line KeyboardInterrupt traceback."""
    import signal
    import time

    run = tmp_path / "run"
    argv = [sys.executable, "-m", "afs_kit", "train-extractors", "--preset", "smoke", "--run", str(run), "--set",
            "extractor.epochs=50", "--device", "cpu", "--quiet"]
    # SIGINT as a terminal sends it, whatever disposition this test process inherited
    proc = subprocess.Popen(argv, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not (run / "run.json").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.05)
        time.sleep(0.5)  # inside training
        assert proc.poll() is None, "training finished before the interrupt"
        proc.send_signal(signal.SIGINT)
        for _ in range(5):
            try:
                _, err = proc.communicate(timeout=10)
                break
            except subprocess.TimeoutExpired:
                # rarely, the KeyboardInterrupt is raised inside a C-level attribute lookup in torch that
                # clears it; the user then presses Ctrl-C again, and so does this test
                proc.send_signal(signal.SIGINT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("afs-kit: interrupted; run the same command again to resume "
                                            "(finished stages are kept)"), err
    assert not (run / ".lock").exists() and not list(run.rglob("*.tmp")), "the interrupt left debris"


def test_help_lists_the_notebook_parameters_and_claims_no_default_it_lacks(capsys):
    from afs_kit.app.reports import PARAMETERS

    with pytest.raises(SystemExit):
        main(["report", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in PARAMETERS)
    for command in ("train-merger", "evaluate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "default runs/" not in capsys.readouterr().out


def test_same_code_refuses_an_evaluation_made_by_another_commit(box, monkeypatch):
    import json

    from afs_kit.run.pipeline import SAME_CODE_ENV

    monkeypatch.setenv(SAME_CODE_ENV, "")  # undone after the test, whatever main() sets
    argv = ["evaluate", "--run", box["run"], "--device", "cpu", "--model", "extractor:0.1", "--attacks", "clean",
            "--n", "20", "--quiet"]
    assert main(argv) == 0
    (path,) = (Path(box["run"]) / "eval").glob("*/metrics.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), "code_version": "0123abc"}))
    assert main(argv) == 0, "without the flag the record is reused (with a note)"
    assert main(["--same-code", *argv]) == 2
