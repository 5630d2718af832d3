"""The headline sentences say when a merged model is exactly one of its members (its merger kept its start)."""
from __future__ import annotations

from afs_kit.studies.common import accuracy_row
from afs_kit.studies.tables import comparison_text


def _row(role: str, method: str, kept_epoch: int | None, tradeoff: float | None) -> dict:
    model = {"kind": "ensemble" if role != "baseline" else "extractor", "kept_epoch": kept_epoch,
             "init": "best-member", "floor": {"met": True, "below": [], "text": "floor met"}}
    row = accuracy_row({"clean": 40.0, "worst": 20.0, "ci95": {"clean": [37.0, 43.0], "worst": [17.5, 22.5]},
                        "model": model}, ())
    return {**row, "role": role, "method": method, "tradeoff": tradeoff, "clean_on_aa": 40.0, "aa": 20.0,
            "aa_attacks": ["apgd-ce"], "n_aa": 100}


def test_a_merger_that_kept_its_start_is_named_as_its_member():
    afs, base = _row("AFS", "AFS 011", 3, 30.0), _row("baseline", "baseline", None, 29.0)
    kept = _row("same-budget ensemble", "same-budget ensemble 2 x eps=8/255", 0, None)
    assert (afs["merger_kept"], kept["merger_kept"], base["merger_kept"]) == ("epoch 3", "start", None)
    text = comparison_text([afs, base, kept], [])
    assert ("same-budget ensemble 2 x eps=8/255: its merger kept its start, the head of its best member on "
            "validation") in text
    assert "AFS 011: its merger" not in text  # trained past its start: nothing to say
