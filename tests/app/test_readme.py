"""reports/README.md is generated from the reports' summary.json, so the two cannot disagree."""
import json
from pathlib import Path

import pytest

from afs_kit.app import readme
from afs_kit.app.cli import main

REPORTS = Path(__file__).resolve().parents[2] / "reports"


def test_the_committed_readme_is_what_the_summaries_give():
    committed = (REPORTS / "README.md").read_text(encoding="utf-8")
    assert committed == readme.render(REPORTS), (
        "reports/README.md disagrees with the reports' summary.json: regenerate it with `afs-kit report --readme`")


def _summary(**extra) -> dict:
    row = {"role": "AFS", "method": "AFS 111, alpha=0.5", "clean": 91.25, "clean_ci": "88.0-93.7", "pgd20": 60.0,
           "pgd20_ci": "55.1-64.7", "aa": 55.5, "aa_ci": "48.6-62.2", "worst": 54.5, "worst_ci": "47.6-61.2",
           "tradeoff": 73.0, "n": 400, "n_aa": 200, "sanity": "passed", "health": "ok"}
    return {"preset": "smoke", "partial": False, "stage_seconds": {"01_extractors": 60.0, "07_comparison": 120.0},
            "comparison": [row], "texts": {"headline (tables 4-5)": "AFS vs B: no significant difference (p = 0.3)"},
            **extra}


def test_the_readme_quotes_numbers_intervals_and_sentences_from_the_summary(tmp_path):
    (tmp_path / "smoke").mkdir()
    (tmp_path / "smoke" / "summary.json").write_text(json.dumps(_summary()))
    assert main(["report", "--readme", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "| AFS 111, alpha=0.5 | 91.2 [88.0-93.7] | 60.0 [55.1-64.7] | 55.5 [48.6-62.2] | 54.5 [47.6-61.2] | 73.0 |" \
        in text
    assert "no significant difference (p = 0.3)" in text and "3.0 min" in text and "Seeds: one" in text
    # a changed number in summary.json changes the README: the committed-README test above would fail
    (tmp_path / "smoke" / "summary.json").write_text(json.dumps(_summary(comparison=[
        {**_summary()["comparison"][0], "aa": 56.5}])))
    assert readme.render(tmp_path) != text


def test_a_partial_report_says_where_it_stopped(tmp_path):
    (tmp_path / "smoke").mkdir()
    (tmp_path / "smoke" / "summary.json").write_text(json.dumps(_summary(
        partial=True, failed={"notebook": "07_comparison", "error": "DeadKernelError: Kernel died"})))
    text = readme.render(tmp_path)
    assert "**Partial**: stopped in notebook `07_comparison` with `DeadKernelError: Kernel died`" in text


def test_no_summaries_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*/summary.json in"):
        readme.render(tmp_path)


def test_the_public_api_and_the_code_version(tmp_path, monkeypatch):
    import afs_kit
    from afs_kit.core.version import ENV, code_version, pinned_code_version

    for name in ("Run", "PRESETS", "load_dataset", "build_model", "pgd", "autoattack", "evaluate", "sanity_checks"):
        assert hasattr(afs_kit, name)
    monkeypatch.delenv(ENV, raising=False)
    version = code_version()
    assert version and version != "unknown"
    with pinned_code_version() as pinned:
        assert pinned == version and code_version() == version
    monkeypatch.setenv(ENV, "abc123")
    assert code_version() == "abc123", "a report's pinned version wins"
