"""The notebook sequence: committed clean and thin, parameters that `afs-kit report -p` accepts, and the
whole sequence executed by papermill on the smoke preset through `afs-kit report`."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys

import nbformat
import pytest
from conftest import chmod_tree, copy_run, snapshot, unwritable_prefix

from afs_kit.app.cli import main
from afs_kit.app.reports import (NOTEBOOKS, NOTEBOOKS_DIR, PARAMETERS, notebook_parameters, parse_parameter,
                                 parse_parameters)
from afs_kit.config import get_preset
from afs_kit.run.rundir import PROJECT_ROOT

# what each notebook must leave behind: its figures and its part of summary.json
FIGURES = {
    "01_extractors": ["table1_extractors.png"],
    "02_delta_z": ["fig3_delta_z.png"],
    "03_tsne": ["fig4_tsne.png"],
    "04_merger_alpha": ["table2_alpha.png", "fig5a_robustness.png", "fig5b_importance.png"],
    "05_subsets": ["table3_subsets.png"],
    "06_weights": ["fig6_weights.png"],
    "07_comparison": ["fig1_tradeoff.png"],
}
SUMMARY = {"01_extractors": ["extractors"], "02_delta_z": ["selection"], "03_tsne": ["tsne"],
           "04_merger_alpha": ["alpha_sweep"], "05_subsets": ["subsets"], "06_weights": ["weights"],
           "07_comparison": ["comparison", "paired", "frontier", "cost"]}
# tiny settings for the smoke run: AutoAttack (the slow part) on a handful of images
SMOKE_PARAMS = ["N_AA=6", "TSNE_EXAMPLES=100"]


def _notebook(name: str):
    return nbformat.read(str(NOTEBOOKS_DIR / f"{name}.ipynb"), as_version=4)


def _as_text(value) -> str:
    """A parameter value written as a user types it after `-p NAME=`."""
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


# ------------------------------------------------------------------------ the notebooks as committed

def test_the_sequence_is_complete():
    found = sorted(p.stem for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    assert found == list(NOTEBOOKS) == list(FIGURES)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs_and_thin(name):
    nb = _notebook(name)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown", "a notebook opens with what it reproduces and needs"
    assert "Needs:" in nb.cells[0].source
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [] and cell.execution_count is None, f"{name}: commit the notebook without outputs"
        tree = ast.parse(cell.source)
        defined = [type(n).__name__ for n in ast.walk(tree)
                   if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))]
        assert not defined, f"{name}: a notebook holds no def/class/lambda (put it in afs_kit), found {defined}"
        if "parameters" not in cell.metadata.get("tags", []):  # the parameters cell is one literal per line
            assert len(cell.source.splitlines()) <= 8, f"{name}: cells stay short:\n{cell.source}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_one_parameters_cell_of_literals_accepted_by_report(name):
    nb = _notebook(name)
    code = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[0], f"{name}: the first code cell, and only it, is `parameters`"
    values = notebook_parameters(NOTEBOOKS_DIR / f"{name}.ipynb")  # raises unless every line is NAME = literal
    assert {"PRESET", "RUN_DIR", "DEVICE", "SEED", "INTERACTIVE", "FIGURES_DIR"} <= set(values)
    assert values["INTERACTIVE"] is True and values["PRESET"] == "demo"
    for key, value in values.items():
        assert key in PARAMETERS, f"{name}: parameter {key} is unknown to afs-kit report"
        assert parse_parameter(key, _as_text(value)) == value, f"{name}: -p {key}={_as_text(value)} round trip"
    # the derived values come in the next cell, where the parameters are used
    assert "studies.open_run(PRESET, RUN_DIR, DEVICE" in code[1].source


# ------------------------------------------------------------------------ parameters on the command line

def test_parameter_values_are_literals_parsed_without_eval():
    assert parse_parameters(["ALPHAS=0,0.5,8/255", "N_EVAL=None", "SEED=3", "INTERACTIVE=false",
                             "SUBSETS=101,all", "ALPHA=0.25", "PRESET='smoke'"]) == {
        "ALPHAS": [0.0, 0.5, 8 / 255], "N_EVAL": None, "SEED": 3, "INTERACTIVE": False,
        "SUBSETS": ["101", "all"], "ALPHA": 0.25, "PRESET": "smoke"}
    assert parse_parameter("ALPHAS", "[0.1, 0.2]") == [0.1, 0.2]
    assert parse_parameter("SUBSETS", '["3/255,8/255", "all"]') == ["3/255,8/255", "all"]
    assert parse_parameter("BUDGETS", "None") is None
    # code is never run: it is either not a value of the kind, or stays an inert string
    with pytest.raises(ValueError, match="SEED must be an integer"):
        parse_parameter("SEED", "__import__('os').getpid()")
    with pytest.raises(ValueError, match="ALPHAS"):
        parse_parameter("ALPHAS", "[0.1, 'a']")
    with pytest.raises(ValueError, match="SEED must not be None"):
        parse_parameter("SEED", "None")
    with pytest.raises(ValueError, match="INTERACTIVE must be True or False"):
        parse_parameter("INTERACTIVE", "maybe")
    with pytest.raises(ValueError, match="N_AA must be >= 1"):
        parse_parameter("N_AA", "0")
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_parameters(["ALPHA"])


def test_parameters_and_set_values_share_one_parser(monkeypatch):
    """`-p NAME=VALUE` and `--set section.field=value` are parsed by the same function, config.parse_value."""
    from afs_kit import config
    from afs_kit.app import reports

    assert config.parse_value("8/255", float, "eps") == 8 / 255
    assert config.parse_value('["3/255,8/255", "all"]', tuple[str, ...], "subsets") == ("3/255,8/255", "all")
    assert config.parse_value('[0.5, "8/255"]', list[float] | None, "x") == [0.5, 8 / 255]
    assert config.parse_value("null", int | None, "n") is None
    real, calls = config.parse_value, []

    def spy(text, tp, name):
        calls.append(name)
        return real(text, tp, name)

    monkeypatch.setattr(config, "parse_value", spy)
    monkeypatch.setattr(reports, "parse_value", spy)
    preset = config.override(get_preset("smoke"), ['evaluation.budgets=["8/255", 0.5]'])
    assert preset.evaluation.budgets == (8 / 255, 0.5)
    assert parse_parameter("ALPHAS", '["8/255", 0.5]') == [8 / 255, 0.5]
    assert calls[0] == "evaluation.budgets" and "ALPHAS" in calls


def test_report_rejects_unknown_parameter_before_anything_runs(tmp_path, capsys):
    out, run_dir = tmp_path / "report", tmp_path / "run"
    code = main(["report", "--preset", "smoke", "--out", str(out), "--run", str(run_dir), "-p", "ALPHA=0.5",
                 "-p", "ALHPA=0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "ALHPA" in err, err
    assert not out.exists() and not run_dir.exists(), "nothing may be written before the parameters are checked"
    assert main(["report", "--preset", "smoke", "--out", str(out), "-p", "N_EVAL=ten"]) == 2
    assert "N_EVAL must be an integer" in capsys.readouterr().err
    assert main(["report", "--preset", "smoke", "--out", str(out), "-p", "PRESET=demo"]) == 2
    assert "contradicts --preset" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------ the sequence executed

@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory, smoke_networks):
    """`afs-kit report --preset smoke` once: every notebook through papermill into a tmp folder, on a copy of the
    suite's trained smoke networks (the notebooks load them; training is tested where it is the subject)."""
    root = tmp_path_factory.mktemp("smoke-report")
    out, run_dir = root / "report", copy_run(smoke_networks, root / "run")
    # tiny models: one thread per kernel avoids oversubscribing a small shared machine
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        argv = ["report", "--preset", "smoke", "--out", str(out), "--run", str(run_dir), "--device", "cpu"]
        for p in SMOKE_PARAMS:
            argv += ["-p", p]
        code = main(argv)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old
    return {"code": code, "out": out, "run": run_dir,
            "summary": json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}}


@pytest.mark.slow
def test_report_runs_every_notebook(smoke_report):
    out, summary = smoke_report["out"], smoke_report["summary"]
    assert smoke_report["code"] == 0, summary.get("failed")
    assert summary["partial"] is False and "failed" not in summary and not os.path.isabs(summary["run"])
    assert list(summary["stage_seconds"]) == list(NOTEBOOKS)
    assert all(s > 0 for s in summary["stage_seconds"].values())
    for name in NOTEBOOKS:
        nb = nbformat.read(str(out / f"{name}.ipynb"), as_version=4)
        assert not nb.metadata.papermill.get("exception"), name
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.execution_count is not None for c in code), f"{name}: every cell ran"
        assert not [o for c in code for o in c.outputs if o.output_type == "error"], name
        injected = [c for c in code if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1 and "INTERACTIVE = False" in injected[0].source
        # paths relative to the notebooks' folder: a committed report names no folder of the machine
        relative = os.path.relpath(smoke_report["run"], NOTEBOOKS_DIR)
        assert f'RUN_DIR = "{relative}"' in injected[0].source
        text = (out / f"{name}.ipynb").read_text()
        assert f'"{smoke_report["run"].parent}' not in text, "an absolute path"
        # warnings too (their default form starts with the source file's path)
        assert str(PROJECT_ROOT) not in text, f"{name}: a path of this machine in the executed notebook"
        assert not os.path.isabs(nb.metadata.papermill["input_path"])
        # the figures are shown inline as well as saved
        assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), f"{name}: no inline figure"
        html = (out / f"{name}.html").read_text()
        assert nb.cells[0].source.splitlines()[0].lstrip("# ") in html and "<img" in html


@pytest.mark.parametrize("name", NOTEBOOKS)
@pytest.mark.slow
def test_each_notebook_wrote_its_figures_and_summary(smoke_report, name):
    for fig in FIGURES[name]:
        path = smoke_report["out"] / "figures" / fig
        assert path.is_file(), f"{name} did not write {fig}"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for key in SUMMARY[name]:
        assert smoke_report["summary"].get(key), f"{name} did not write summary[{key!r}]"


@pytest.mark.slow
def test_summary_holds_the_numbers_of_every_table(smoke_report):
    s, preset = smoke_report["summary"], get_preset("smoke")
    for key in ("extractors", "selection", "alpha_sweep", "subsets", "comparison", "cost", "stage_seconds"):
        assert key in s
    one = 100 / preset.evaluation.n_examples + 1e-4  # one example, in percent (float32 means: 1e-4 of slack)
    assert [r["eps"] for r in s["extractors"]] == list(preset.budgets)
    for r in s["extractors"]:
        assert r["clean"] + one >= r["pgd10"] and r["pgd10"] + one >= r["pgd20"] >= 0
    assert len(s["selection"]["vector"]) == len(preset.budgets) and set(s["selection"]["vector"]) <= {"0", "1"}
    assert [r["alpha"] for r in s["alpha_sweep"]["rows"]] == list(preset.alphas)
    for r in s["alpha_sweep"]["rows"]:
        # every row carries its masking checks' verdict, the worst case and intervals beside the numbers
        assert r["sanity"] == "passed" or r["sanity"].startswith("FAILED: ")
        assert r["worst"] <= min(r["pgd10"], r["pgd20"]) + 1e-4
        assert r["health"] == "ok" or r["health"].startswith("FLAGGED: ")
        lo, hi = r["worst_ci"]  # intervals are two numbers a program can read
        assert lo <= r["worst"] <= hi and abs(sum(r["importance"]) - 1) < 1e-6
        # each masking check with its verdict and the numbers behind it; each merger's floor
        assert r["masking"]["passed"] == r["sanity_passed"] and r["masking"]["checks"]["converged"]["reported"] >= 0
        assert isinstance(r["floor_verdict"]["met"], bool)
    assert set(s["texts"]) >= {"extractors (table 1)", "alpha (table 2)", "headline (tables 4-5)"}
    assert s["code_version"] and s["code_version"] != "unknown"
    assert s["seeds"]["seeds"] == [0] and set(s["seeds"]["comparison"]) == {"0"}
    assert {p["measure"] for p in s["paired"]} == {"clean", "worst"} and all(0 <= p["p"] <= 1 for p in s["paired"])
    assert [r["subset"] for r in s["subsets"]] == ["101", "111"]
    afs = s["comparison"][0]
    assert afs["method"].startswith("AFS") and afs["n_aa"] == 6 and afs["aa"] <= afs["clean"] + 1e-6
    # one headline row, stacking the preset's default subset on every evaluated test image; both controls
    roles = [r["role"] for r in s["comparison"]]
    assert roles.count("AFS") == 1 and roles[0] == "AFS" and afs["n"] == preset.evaluation.n_examples
    assert afs["subset"] == "1" * len(preset.budgets) == s["comparison"][roles.index("logit average")]["subset"]
    ensemble = s["comparison"][roles.index("same-budget ensemble")]
    assert ensemble["extractors"] == afs["extractors"] and ensemble["n"] == afs["n"]
    assert ensemble["masking"]["checks"] and isinstance(ensemble["floor_verdict"]["met"], bool)
    assert {"logit average", "same-budget ensemble"} <= {p["role"] for p in s["paired"]}
    # what the stacks' own attacks and the smallest-margin attack broke beyond PGD, one row per model compared
    gains = s["attack_gains"]
    assert [g["method"] for g in gains] == [r["method"] for r in s["comparison"]]
    assert gains[0]["stack_attacks"].count("member ") == len(preset.budgets) and gains[0]["checked"] >= 1
    for g, r in zip(gains, s["comparison"]):
        closest = r["masking"]["checks"]["smallest_margin_not_stronger"]
        assert g["smallest_margin"] == closest["broke_beyond_reported"] >= g["beyond_every_check"] >= 0
        assert g["smallest_margin_in_worst"] == ("no" if closest["passed"] else "yes")
    f = s["frontier"]
    assert f["n"] == afs["n"] and f["verdict"] in ("above", "below", "on", "right of the range")
    assert set(f["singles"]) == {f"eps={b:g}" for b in preset.budgets} and f["corners"]
    assert f["distance"] is None or f["position"] != "right"
    assert (f["ci95"] is None) == (f["verdict"] == "right of the range")
    assert afs["tradeoff"] is not None and afs["clean"] >= 60, "the smoke AFS model must still learn"
    settings = [r["setting"] for r in s["cost"]]
    assert [t.split(" ")[0] for t in settings] == ["Baseline", "Rand.pert.", "Large", "AFS"]
    assert s["cost"][2]["params"] > 2 * s["cost"][0]["params"], "the large model is twice as wide"
    assert s["cost"][-1]["params"] > 2 * s["cost"][0]["params"], "AFS stacks three networks"
    assert s["tsne"]["n"] == 100 and len(s["tsne"]["trustworthiness"]) == 3


@pytest.mark.slow
def test_the_reports_sentences_follow_the_paired_test(smoke_report):
    """A difference the exact McNemar test does not find significant is never called a win or a loss:
    every "better"/"worse" in a generated sentence carries its p, and that p is below 0.05."""
    import re

    s = smoke_report["summary"]
    for p in s["paired"]:
        called = re.search(r"is (better|worse) than", p["text"])
        if p["p"] < 0.05:
            assert called and called.group(1) == p["verdict"], p["text"]
            assert (p["verdict"] == "better") == (p["only_a"] > p["only_b"]), p
        else:
            assert not called and p["verdict"] == "no significant difference", p["text"]
    sentences = " ".join(s["texts"].values())
    verdicts = re.findall(r"is (better|worse) than .*?p = ([0-9.e+-]+)", sentences)
    wins = re.findall(r"\b(?:is|are) (?:better|worse) than\b", sentences)
    assert len(verdicts) == len(wins), "every better/worse in the report comes with its p"
    assert all(float(p) < 0.05 for _, p in verdicts), verdicts
    for claim in re.findall(r"no significant difference \(.*?p = ([0-9.e+-]+)", sentences):
        assert float(claim) >= 0.05
    assert not re.search(r"\b(beats?|wins?|outperforms?|loses)\b", sentences), "only the paired test decides"


@pytest.mark.slow
def test_subset_explorer_answers_from_cache_and_trains_on_demand(smoke_report, capsys):
    """The checkboxes outside a browser: a trained subset answers at once, a new one waits for the button."""
    from afs_kit import widgets
    from afs_kit.studies import merger_exists, open_run

    run = open_run("smoke", smoke_report["run"], device="cpu", progress=True)  # the log lines stay out anyway
    explorer = widgets.subset_explorer(run)
    boxes, button = explorer.children[0].children, explorer.children[1]
    assert [b.description for b in boxes] == ["0", "0.1", "0.2"] and all(b.value for b in boxes)
    assert "subset=111 alpha=0.5" in capsys.readouterr().out
    boxes[1].value = False  # 101: trained by notebook 05
    assert "subset=101 alpha=0.5: clean" in capsys.readouterr().out
    assert not merger_exists(run, "001", 0.5)
    boxes[0].value = False  # 001: never trained
    assert "subset 001 has no merger yet" in capsys.readouterr().out
    button.click()
    out = capsys.readouterr().out
    assert "subset=001 alpha=0.5: clean" in out and merger_exists(run, "001", 0.5)
    assert not [line for line in out.splitlines() if line.startswith(("evaluation ", "merger "))], out
    boxes[2].value = False
    assert "tick at least one extractor" in capsys.readouterr().out


@pytest.mark.slow
def test_the_alpha_explorer_greys_out_what_belongs_to_another_alpha(smoke_report):
    """The slider on an alpha without a merger: the text, curve and bars still drawn are the last alpha's, so
    they are greyed out and the status names their alpha; back on a trained alpha, they are redrawn in full."""
    from afs_kit import widgets
    from afs_kit.studies import open_run

    run = open_run("smoke", smoke_report["run"], device="cpu", progress=False)
    explorer = widgets.alpha_explorer(run, value=0.5)
    slider, _button, status = explorer.children[1].children
    out = explorer.children[-1]
    assert widgets.STALE_CLASS not in out._dom_classes and status.value == ""
    slider.value = 0.8  # no merger: nothing trains, the drawing stays, greyed out
    assert widgets.STALE_CLASS in out._dom_classes
    assert "alpha=0.8 has no merger yet" in status.value and "greyed out below: alpha=0.5" in status.value
    slider.value = 1.0  # trained by notebook 04: drawn again, in full
    assert widgets.STALE_CLASS not in out._dom_classes and status.value == ""


@pytest.mark.slow
def test_a_read_only_complete_run_answers_a_cached_report_without_the_lock(smoke_report, tmp_path):
    """Reading never needs write access: a colleague's finished run on a read-only mount gives its report, made
    without writing a byte into the run (the notebooks' sentences kept in the report's own summary.json)."""
    assert smoke_report["code"] == 0
    run, out = tmp_path / "colleague-run", tmp_path / "my-report"
    shutil.copytree(smoke_report["run"], run, copy_function=shutil.copy2)
    # the first and the last notebook (a kernel each costs seconds; the others read the run alike)
    chosen = tmp_path / "notebooks"
    chosen.mkdir()
    for name in (NOTEBOOKS[0], NOTEBOOKS[-1]):
        shutil.copy2(NOTEBOOKS_DIR / f"{name}.ipynb", chosen)
    chmod_tree(run, writable=False)
    try:
        prefix = unwritable_prefix(run)
        before = snapshot(run)
        code = (f"import sys; from afs_kit.app.reports import run_report; sys.exit(run_report('smoke', out={str(out)!r}, "
                f"run_dir={str(run)!r}, params={SMOKE_PARAMS!r}, device='cpu', notebooks={str(chosen)!r}))")
        proc = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert snapshot(run) == before
        summary = json.loads((out / "summary.json").read_text())
        assert summary["partial"] is False and summary["texts"] and all(
            smoke_report["summary"]["texts"][k] == v for k, v in summary["texts"].items())
        assert summary["comparison"] == smoke_report["summary"]["comparison"]
        assert all((out / f"{name}.html").is_file() for name in (NOTEBOOKS[0], NOTEBOOKS[-1]))
        made = sorted(p.name for p in (out / "figures").glob("*.png"))
        assert "fig1_tradeoff.png" in made and set(made) <= {p.name for p in (smoke_report["out"] / "figures").glob("*.png")}
    finally:
        chmod_tree(run, writable=True)


@pytest.mark.slow
def test_failing_notebook_stops_a_partial_report(smoke_report, tmp_path, capsys):
    """Duplicate budgets fail in the first notebook: the report stops there and says it is partial."""
    out = tmp_path / "partial"
    (out / "figures").mkdir(parents=True)
    (out / "07_comparison.ipynb").write_text("{}")  # an earlier report's files must not pass for this one's
    (out / "figures" / "fig1_tradeoff.png").write_bytes(b"old")
    code = main(["report", "--preset", "smoke", "--out", str(out), "--run", str(smoke_report["run"]),
                 "--device", "cpu", "-p", "BUDGETS=[0.1, 0.1]"])
    err = capsys.readouterr().err
    assert code == 1
    assert "01_extractors" in err and "cell" in err and "budgets must be distinct" in err, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["partial"] is True
    assert summary["failed"]["notebook"] == "01_extractors" and isinstance(summary["failed"]["cell"], int)
    assert "budgets must be distinct" in summary["failed"]["error"]
    assert (out / "01_extractors.ipynb").is_file() and (out / "01_extractors.html").is_file()
    assert not (out / "02_delta_z.ipynb").exists(), "the report stops at the failing notebook"
    assert not (out / "07_comparison.ipynb").exists() and not list((out / "figures").iterdir())


def test_report_refuses_a_run_in_use(tmp_path, capsys):
    from afs_kit.run.rundir import RunLock

    out, run_dir = tmp_path / "report", tmp_path / "run"
    with RunLock(run_dir):
        code = main(["report", "--preset", "smoke", "--out", str(out), "--run", str(run_dir)])
    assert code == 2 and "in use by" in capsys.readouterr().err
    assert not out.exists()
