"""The kit's typed errors: the command line maps them to exit codes by type, and importing the kit changes
nothing outside it (no `autoattack` alias until RobustBench is used)."""
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from afs_kit import errors
from afs_kit.app import cli
from afs_kit.core.checks import parse_unit
from afs_kit.run.rundir import RunLock

CLI_SOURCE = Path(cli.__file__).read_text()


def test_import_afs_kit_leaves_sys_modules_without_autoattack():
    code = "import sys, afs_kit; print('autoattack' in sys.modules, 'robustbench' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_every_kit_error_is_also_the_builtin_a_user_would_catch():
    assert issubclass(errors.BadInput, ValueError) and issubclass(errors.CheckpointMismatch, errors.BadInput)
    assert issubclass(errors.RunInUse, RuntimeError)
    assert all(issubclass(e, errors.AfsKitError) and e.exit_code == 2
               for e in (errors.BadInput, errors.CheckpointMismatch, errors.RunInUse))


def test_the_command_line_maps_types_not_message_text():
    assert "in use by" not in CLI_SOURCE and "except AfsKitError" in CLI_SOURCE


def test_a_held_lock_raises_run_in_use_naming_the_holder(tmp_path):
    # the command line's exit 2 for it is tested end to end in tests/run/test_one_writer.py
    (tmp_path / "run").mkdir()
    with RunLock(tmp_path / "run"):
        with pytest.raises(errors.RunInUse, match="in use by"):
            RunLock(tmp_path / "run").__enter__()


def test_a_bad_argument_is_bad_input_naming_it():
    with pytest.raises(errors.BadInput, match="eps.*nine"):
        parse_unit("nine", "eps")


def test_a_kit_warning_is_one_line_without_a_source_path():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        errors.warn("SANITY CHECKS FAILED: converged -- do not trust it ({'reported': 50.0})")
    (w,) = caught
    assert issubclass(w.category, RuntimeWarning)  # `pytest.warns(RuntimeWarning)` and users' filters still match
    # no source file to quote (Python prints `afs-kit:0: AfsKitWarning: ...`), and the finding in one line
    assert (w.filename, w.lineno, w.line) == ("afs-kit", 0, None) and "\n" not in str(w.message)
    assert str(w.message) == "SANITY CHECKS FAILED: converged -- do not trust it ({'reported': 50.0})"
