"""`afs-kit report`: the notebook sequence executed with papermill, and the notebooks' parameters.

`run_report` executes `notebooks/NN_*.ipynb` in order into `reports/<preset>/`: the executed
notebooks, their HTML, every figure as PNG and `summary.json` (each notebook's part, from
RUN/summary.json, plus the wall time of each stage). What the notebooks compute is in
`afs_kit.studies`.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from ..config import get_preset
from ..core.checks import parse_value
from ..core.device import resolve_device
from ..core.io import read_json, write_json
from ..core.version import pinned_code_version
from ..errors import BadInput
from ..models.stack import parse_subset
from ..run.rundir import PROJECT_ROOT, SUMMARY_OVERLAY_ENV, RunDir, default_run_dir

NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
NOTEBOOKS = ("01_extractors", "02_delta_z", "03_tsne", "04_merger_alpha", "05_subsets", "06_weights",
             "07_comparison")


class Parameter(NamedTuple):
    """A notebook parameter: the type `checks.parse_value` parses `-p NAME=VALUE` into (the parser of
    `--set` too), the range each number must lie in (a key of RULES, or None) and what it means."""
    type: object
    rule: str | None
    meaning: str


# rule -> (test of one number, the words of the message)
RULES = {"count": (lambda v: v >= 1, ">= 1"), "int": (lambda v: v >= 0, ">= 0"),
         "unit": (lambda v: 0 <= v <= 1, "in [0, 1]")}

# Every name a notebook's `parameters` cell may hold. `afs-kit report -p` accepts exactly these; a count
# is an integer >= 1, a unit a number in [0, 1], lists are lists as in the notebooks.
PARAMETERS: dict[str, Parameter] = {
    "PRESET": Parameter(str, None, "preset name (afs-kit report sets it from --preset)"),
    "RUN_DIR": Parameter(str | None, None, "run directory; None: runs/<preset> under the project root"),
    "DEVICE": Parameter(str, None, "auto (CUDA when present), cpu or cuda[:N]"),
    "SEED": Parameter(int, "int", "seed of extractor, merger and evaluation (0: the preset's); t-SNE too"),
    "SEEDS": Parameter(int, "count", "training seeds in one run directory: SEED and the next SEEDS-1 (tables 1 "
                                     "and 4-5 give the mean and min-max over them)"),
    "BUDGETS": Parameter(list[float] | None, "unit", "training budgets, one extractor each; None: the preset's"),
    "N_EVAL": Parameter(int | None, "count", "test examples for clean and PGD accuracy; None: the preset's"),
    "N_AA": Parameter(int | None, "count", "test examples for AutoAttack; None: the preset's "
                                           "evaluation.aa_examples (at most N_EVAL)"),
    "TSNE_EXAMPLES": Parameter(int | None, "count", "test examples embedded by t-SNE; None: the preset's"),
    "ALPHAS": Parameter(list[float] | None, "unit", "alpha sweep of the merger (table 2); None: the preset's"),
    "ALPHA": Parameter(float | None, "unit", "alpha of the main AFS model; None: the preset's merger alpha"),
    "SUBSET": Parameter(str | None, None, "extractors of the main AFS model; None: the preset's default subset"),
    "SUBSETS": Parameter(list[str] | None, None, "subsets of table 3 (binary vectors, 'all', 'selected'); "
                                                 "None: the preset's"),
    "ABLATION": Parameter(bool, None, "train and compare the random-budget network of table 6"),
    "FIGURES_DIR": Parameter(str | None, None, "where PNG figures go; None: RUN/figures (the report sets its own)"),
    "INTERACTIVE": Parameter(bool, None, "show the ipywidgets explorers (the report sets False)"),
}


# ============================================================================ parameters

def parse_parameter(name: str, text: str):
    """One `-p NAME=VALUE` value, parsed by `checks.parse_value` (as `--set` values are) into the
    parameter's type, then checked against its rule; nothing is eval'd.

    Lists are comma-separated (`0,0.5,1`, `101,all`) or JSON (`["3/255,8/255", "all"]`); numbers
    may be fractions (`8/255`); None is `None`.
    """
    if name not in PARAMETERS:
        raise BadInput(f"unknown notebook parameter {name!r}; known: {', '.join(PARAMETERS)}")
    tp, rule, _ = PARAMETERS[name]
    try:
        value = parse_value(text, tp, name)
    except ValueError as err:
        raise BadInput(f"parameter {err}") from err
    if isinstance(value, list) and not value:
        raise BadInput(f"parameter {name} must list at least one value, got {name}={text!r}")
    if rule is not None and value is not None:
        ok, words = RULES[rule]
        many = isinstance(value, list)
        if not all(ok(v) for v in (value if many else [value])):
            raise BadInput(f"parameter {name} must {'list numbers' if many else 'be'} {words}, got {name}={text!r}")
    return value


def parse_parameters(assignments: Sequence[str]) -> dict:
    """`["NAME=VALUE", ...]` -> {NAME: value}; an unknown name or a bad value raises a ValueError naming it."""
    out = {}
    for item in assignments:
        if "=" not in item:
            raise BadInput(f"notebook parameter must look like NAME=VALUE, got {item!r}")
        name, text = item.split("=", 1)
        name = name.strip()
        out[name] = parse_parameter(name, text)
    return out


# ============================================================================ afs-kit report

def notebook_parameters(path: str | Path) -> dict:
    """The names and literal values of a notebook's one `parameters` cell."""
    import ast

    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise BadInput(f"notebook {path} must have exactly one cell tagged 'parameters', found {len(cells)}")
    values = {}
    for node in ast.parse(cells[0].source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise BadInput(f"the parameters cell of {path} must hold only NAME = literal lines, got "
                           f"{ast.unparse(node)!r}")
        values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def notebook_paths(folder: str | Path | None = None) -> list[Path]:
    folder = Path(folder) if folder is not None else NOTEBOOKS_DIR
    paths = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no notebooks NN_name.ipynb in {folder}")
    return paths


def _relative(path: str | Path, start: Path = PROJECT_ROOT) -> str:
    """`path` relative to `start`: committed reports name no folder of the machine that made them."""
    return os.path.relpath(Path(path).resolve(), start.resolve())


def _write_html(notebook: Path, html: Path) -> None:
    """The executed notebook's HTML, after papermill's record of where it read and wrote the notebook is
    made relative to the project."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(notebook), as_version=4)
    record = nb.metadata.get("papermill", {})
    for key in ("input_path", "output_path"):
        if record.get(key):
            record[key] = _relative(record[key])
    nbformat.write(nb, str(notebook))
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    html.write_text(body, encoding="utf-8")


def _write_summary(out: Path, run_dir: Path, extra: dict) -> None:
    summary_path = RunDir(run_dir).summary_path
    summary = read_json(summary_path) if summary_path.is_file() else {}
    write_json(out / "summary.json", {**summary, **extra})


def check_parameter_values(values: dict, preset, device: str) -> None:
    """What a notebook would only find out later: the device exists, subsets fit the budgets."""
    resolve_device(values.get("DEVICE", device))
    budgets = values.get("BUDGETS") or preset.budgets
    for name in ("SUBSET", "SUBSETS"):
        specs = values.get(name)
        for spec in [specs] if isinstance(specs, str) else specs or []:
            if spec != "selected":
                try:
                    parse_subset(spec, sorted(budgets))
                except ValueError as err:
                    raise BadInput(f"parameter {name}: {err}") from err


def run_report(preset: str, out: str | Path | None = None, run_dir: str | Path | None = None,
               params: Sequence[str] = (), device: str = "auto", notebooks: str | Path | None = None,
               log=print) -> int:
    """Execute the notebook sequence with papermill into `out` (default reports/<preset>).

    Everything is checked before the first notebook runs (preset, parameter names and values, the
    notebooks' own parameters, the run directory's lock); a bad one raises a ValueError. Each
    notebook gets only the parameters its `parameters` cell declares. A failing notebook stops the
    report: exit status 1, its name and cell on stderr, and summary.json says `"partial": true`.
    Returns 0 when every notebook ran.
    """
    import papermill as pm

    values = parse_parameters(params)
    if "PRESET" in values and values["PRESET"] != preset:
        raise BadInput(f"parameter PRESET={values['PRESET']!r} contradicts --preset {preset}")
    check_parameter_values(values, get_preset(preset), device)
    seed = values.get("SEED", 0)
    run_dir = Path(values["RUN_DIR"] if values.get("RUN_DIR") is not None else
                   run_dir if run_dir is not None else default_run_dir(preset, seed))
    out = Path(out) if out is not None else Path("reports") / preset
    run_dir, out = run_dir.resolve(), out.resolve()
    paths = notebook_paths(notebooks)
    declared = {p.stem: notebook_parameters(p) for p in paths}
    for stem, names in declared.items():
        unknown = set(names) - set(PARAMETERS)
        if unknown:
            raise BadInput(f"notebook {stem} declares parameters {sorted(unknown)} that afs-kit report does not know")
    info = run_dir / "run.json"
    if info.is_file():
        stored = read_json(info).get("preset", {}).get("name")
        if stored != preset:
            raise BadInput(f"run {run_dir} was made with preset={stored!r}, not preset={preset!r}")
    # the kernels run in the notebooks' folder: the paths they get are relative to it, so the executed
    # notebooks (their injected parameters cell) name no absolute folder of this machine
    here = paths[0].parent
    base = {"PRESET": preset, "DEVICE": device, "INTERACTIVE": False, **values}
    base["RUN_DIR"] = _relative(run_dir, here)
    info = {"preset": preset, "run": _relative(run_dir), "parameters": values}
    stage_seconds: dict[str, float] = {}
    read_only = run_dir.is_dir() and not RunDir(run_dir).writable()
    # one writer per run directory: the notebooks' kernels write into it while the report holds the lock
    # (taken first: a run in use elsewhere is refused before the report folder is touched); a run this
    # process cannot write is only read, without the lock, and its report is made aside (`_reading_only`)
    # one code version for the whole report, whatever is committed while it runs (the kernels inherit it)
    with (_reading_only(run_dir, out) if read_only else RunDir(run_dir).lock(children=True)) as staged, \
            pinned_code_version() as version, _one_kernel(here) as kernel:
        final, out = out, staged or out
        if values.get("FIGURES_DIR") is None:  # the report's own figures folder (made aside for a read-only run)
            base["FIGURES_DIR"] = _relative(out / "figures", here)
        info["code_version"] = version
        _clear_report(out, paths)
        _write_summary(out, run_dir, {"partial": True, "stage_seconds": stage_seconds, **info})
        for path in paths:
            stem = path.stem
            given = {k: v for k, v in base.items() if k in declared[stem]}
            executed = out / f"{stem}.ipynb"
            log(f"report {preset}: {stem} ...")
            start = time.perf_counter()
            try:
                kernel.fresh_namespace()
                pm.execute_notebook(str(path), str(executed), parameters=given, cwd=str(path.parent),
                                    # a bar over each notebook's cells, unless the caller silenced the log
                                    # (none for a read-only run, which may yet be refused in one line)
                                    progress_bar=log is print and not read_only, kernel_name="python3",
                                    km=kernel.manager)
            except pm.PapermillExecutionError as err:
                if read_only and err.ename == "PermissionError":  # a stage had to write: nothing is kept
                    raise PermissionError(f"run directory {run_dir} is not writable, and the report needs to write "
                                          f"to it ({stem}, cell {err.cell_index}); make it writable or report "
                                          f"a copy") from None
                stage_seconds[stem] = round(time.perf_counter() - start, 2)
                failure = {"notebook": stem, "cell": err.cell_index, "execution_count": err.exec_count,
                           "error": f"{err.ename}: {err.evalue}"}
                _write_html(executed, out / f"{stem}.html")
                _write_summary(out, run_dir, {"partial": True, "failed": failure, "stage_seconds": stage_seconds,
                                              **info})
                print(f"afs-kit: report {preset} failed in notebook {stem}, cell {err.cell_index} "
                      f"(execution count {err.exec_count}): {err.ename}: {err.evalue}; partial report in {final}",
                      file=sys.stderr)
                _publish(staged, final, paths)
                return 1
            except BaseException as err:
                # a dead kernel, a timeout, an interrupt: the report says where it stopped, then the error goes on
                stage_seconds[stem] = round(time.perf_counter() - start, 2)
                failure = {"notebook": stem, "cell": None, "error": f"{type(err).__name__}: {err}"}
                _write_summary(out, run_dir, {"partial": True, "failed": failure, "stage_seconds": stage_seconds,
                                              **info})
                raise
            stage_seconds[stem] = round(time.perf_counter() - start, 2)
            _write_html(executed, out / f"{stem}.html")
            _write_summary(out, run_dir, {"partial": True, "stage_seconds": stage_seconds, **info})
            log(f"report {preset}: {stem} done in {stage_seconds[stem]:.1f} s")
        _write_summary(out, run_dir, {"partial": False, "stage_seconds": stage_seconds, **info})
        _publish(staged, final, paths)
    log(f"report {preset}: {len(paths)} notebooks in {sum(stage_seconds.values()):.1f} s -> {final}")
    return 0


# run in the report's kernel before each notebook: the namespace as a new kernel's (the modules stay imported),
# no figure left open, and the warnings' once-per-place records cleared so each notebook shows its own warnings
_RESET = ("get_ipython().run_line_magic('reset', '-f')\n"
          "import matplotlib.pyplot, warnings\n"
          "matplotlib.pyplot.close('all')\n"
          "_filters = list(warnings.filters); warnings.resetwarnings(); warnings.filters[:] = _filters\n"
          "del _filters")


class _Kernel(NamedTuple):
    manager: object  # jupyter_client's KernelManager

    def fresh_namespace(self) -> None:
        client = self.manager.client()
        client.start_channels()
        try:
            client.wait_for_ready(timeout=60)
            reply = client.execute_interactive(_RESET, silent=True, store_history=False, timeout=60,
                                               output_hook=lambda _msg: None)
            if reply["content"]["status"] != "ok":
                raise RuntimeError(f"the report's kernel could not reset its namespace: {reply['content']}")
        finally:
            client.stop_channels()


@contextlib.contextmanager
def _one_kernel(cwd: Path) -> Iterator[_Kernel]:
    """One kernel for the whole report, each notebook in a fresh namespace of it (`_RESET`): a kernel's start,
    its imports (torch, matplotlib, the kit, scikit-learn) and the data's first load cost about 4 s, paid once
    instead of once per notebook (the smoke report: 7 notebooks). Started in the notebooks' folder, after the
    caller has set the environment its kernels inherit (the code version, a read-only run's overlay)."""
    from jupyter_client.manager import KernelManager

    manager = KernelManager(kernel_name="python3")
    # the kernel's own log stays out of the report: its transport warning, and "KeyboardInterrupt caught in
    # kernel", an ERROR line ipykernel logs when the SIGINT jupyter_client sends a kernel it shuts down lands
    # before the shutdown request (seen under load, after a refusal)
    manager.start_kernel(cwd=str(cwd), extra_arguments=["--IPKernelApp.log_level=CRITICAL"])
    try:
        yield _Kernel(manager)
    finally:
        manager.shutdown_kernel(now=True)


def _publish(staged: Path | None, out: Path, paths: Sequence[Path]) -> None:
    """A read-only run's report, made aside, into `out` (nothing to do for a report made in place)."""
    if staged is not None:
        _clear_report(out, paths)
        shutil.copytree(staged, out, dirs_exist_ok=True)


@contextlib.contextmanager
def _reading_only(run_dir: Path, out: Path) -> Iterator[Path]:
    """A report of a run this process cannot write: the notebooks' summary.json goes to a copy of the report's
    own (`SUMMARY_OVERLAY_ENV`), and the report is made in a temporary folder that becomes `out` only when
    every notebook ran, so a run that still needs writing is refused with nothing written."""
    staging = Path(tempfile.mkdtemp(prefix="afs-kit-report-"))
    overlay = staging / "run-summary"
    overlay.mkdir()
    if (run_dir / "summary.json").is_file():
        shutil.copy2(run_dir / "summary.json", overlay / "summary.json")
    old = os.environ.get(SUMMARY_OVERLAY_ENV)
    os.environ[SUMMARY_OVERLAY_ENV] = f"{run_dir}::{overlay}"
    try:
        yield staging / out.name
    finally:
        os.environ.pop(SUMMARY_OVERLAY_ENV) if old is None else os.environ.__setitem__(SUMMARY_OVERLAY_ENV, old)
        shutil.rmtree(staging, ignore_errors=True)


def _clear_report(out: Path, paths: Sequence[Path]) -> None:
    """Remove what an earlier report left in `out` (only the files a report writes), so a partial
    report never shows an older run's later notebooks or figures as its own."""
    out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        for suffix in (".ipynb", ".html"):
            (out / f"{path.stem}{suffix}").unlink(missing_ok=True)
    for png in (out / "figures").glob("*.png"):
        png.unlink()
    (out / "figures").mkdir(exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)

__all__ = ["PARAMETERS", "Parameter", "RULES", "NOTEBOOKS", "NOTEBOOKS_DIR", "parse_parameter", "parse_parameters",
           "run_report", "notebook_parameters", "notebook_paths"]
