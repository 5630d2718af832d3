"""summary.json["seeds"] names exactly the seeds its tables hold, also after a table is made again with fewer."""
import json
from types import SimpleNamespace

from afs_kit.run.rundir import RunDir
from afs_kit.studies.common import seeds_summary


def test_a_table_made_again_with_one_seed_leaves_no_stale_seed(tmp_path):
    run = SimpleNamespace(dir=RunDir(tmp_path))  # seeds_summary reads and writes only the run directory
    seeds_summary(run, {"extractors": {0: [{"clean": 1.0}], 1: [{"clean": 2.0}]}})
    seeds_summary(run, {"comparison": {0: [{"clean": 3.0}], 1: [{"clean": 4.0}]}})
    assert json.loads((tmp_path / "summary.json").read_text())["seeds"]["seeds"] == [0, 1]
    seeds_summary(run, {"extractors": {0: [{"clean": 1.0}]}, "comparison": {0: [{"clean": 3.0}]}})
    stored = json.loads((tmp_path / "summary.json").read_text())["seeds"]
    assert stored == {"seeds": [0], "extractors": {"0": [{"clean": 1.0}]}, "comparison": {"0": [{"clean": 3.0}]}}
