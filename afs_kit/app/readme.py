"""`reports/README.md`, written from each report's `summary.json` (`afs-kit report --readme`).

No number or verdict in it is typed by hand: tables come from the rows the notebooks stored, the
sentences are the ones the notebooks generated from the same numbers (`summary.json["texts"]`),
and a report made before a field existed says so instead of inventing it. A test regenerates the
file and fails when it differs from the committed one.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..attacks.registry import HEADLINE_PGD, PGD_ATTACKS, attack_label, autoattack_name
from ..config import format_budget, get_preset
from ..core.io import atomic_write
from ..explain.frontier import frontier_text

HEADER = """# reports/

Executed notebooks, their HTML, figures and `summary.json`, written by `afs-kit report --preset P`
into `reports/P/`. **This page is generated** from each report's `summary.json` by
`afs-kit report --readme`; do not edit it by hand (a test fails when it and the summaries disagree).

Every accuracy is on test examples, in percent, with its 95% Wilson interval; "worst case" is the
per-example worst over every attack run on those examples (PGD-10, PGD-20, AutoAttack where it ran,
and the stronger PGD of the `converged` check where that check failed); "better" or "worse" is said
only where an exact McNemar test on the same examples gives p < 0.05. Masking checks: see
`afs_kit/masking.py`; training health: final training loss below chance and not rising.
"""


def _pct(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _cell(row: dict, key: str) -> str:
    """`value [lo-hi]` where the report recorded an interval, else the value alone."""
    value = row.get(key)
    if value is None:
        return "-"
    ci = row.get(f"{key}_ci")
    if isinstance(ci, (list, tuple)):  # [lo, hi]; reports made before intervals were numbers hold "lo-hi"
        ci = f"{ci[0]:.1f}-{ci[1]:.1f}"
    return f"{value:.1f} [{ci}]" if ci else f"{value:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _describe(name: str) -> str:
    try:
        p = get_preset(name)
    except ValueError:
        return name
    budgets = ", ".join(format_budget(b) for b in p.budgets)
    return (f"data `{p.data.spec}`, {len(p.budgets)} x {p.extractor.model} at budgets {budgets}, "
            f"evaluation at eps {format_budget(p.evaluation.eps)}")


def report_section(name: str, summary: dict) -> str:
    """One report's section: status, headline table, extractor table and the generated sentences."""
    out = [f"## [`{name}/`]({name}/) - {_describe(summary.get('preset', name))}", ""]
    seconds = summary.get("stage_seconds", {})
    wall = sum(seconds.values()) / 60
    if summary.get("partial"):
        failed = summary.get("failed") or {}
        out.append(f"**Partial**: stopped in notebook `{failed.get('notebook', '?')}` with "
                   f"`{failed.get('error', 'no error recorded')}` after {wall:.1f} min of notebooks "
                   f"({', '.join(seconds) or 'none'} ran). Finish it with `afs-kit report --preset {name}`.")
    else:
        out.append(f"Complete: {len(seconds)} notebooks in {wall:.1f} min of wall time in the invocation that "
                   f"finished it (a stage that found its results on disk takes seconds: "
                   f"{', '.join(f'{k} {v / 60:.1f} min' for k, v in seconds.items())}).")
    seeds = (summary.get("seeds") or {}).get("seeds") or []
    out.append(f"Seeds: {', '.join(str(s) for s in seeds)} (tables 1 and 4-5 give the mean and min-max over them; "
               f"the other tables are seed {seeds[0]})." if len(seeds) > 1 else
               "Seeds: one; no spread over seeds is measured, so a difference between two models says nothing "
               "about a new seed (the intervals and paired tests cover the test examples only).")
    if "comparison" in summary:
        rows = summary["comparison"]
        if not any("worst" in r for r in rows):
            out += ["", "_This report was made before intervals, the worst case and the masking checks were "
                        "recorded; regenerate it for them._"]

        out += ["", "### Tables 4-5: the headline", "",
                _table(["role", "model", "clean", attack_label(HEADLINE_PGD), autoattack_name(rows[0].get("aa_attacks")), "worst case",
                        "trade-off (clean+AA)/2", "n / n AA",
                        "masking checks", "training", "merger floor"],
                       [[r.get("role", "-"), r["method"], _cell(r, "clean"), _cell(r, HEADLINE_PGD), _cell(r, "aa"),
                         _cell(r, "worst"), _pct(r.get("tradeoff")), f"{r.get('n')} / {r.get('n_aa') or '-'}",
                         r.get("sanity", "-"), r.get("health", "-"), r.get("floor", "-")] for r in rows])]
        frontier = summary.get("frontier")
        if frontier is None:
            out += ["", "_No distance above the single networks' frontier in this summary.json (made before it "
                        "was measured)._"]
        else:
            out += ["", f"**Frontier ({frontier['verdict']})**: " + frontier_text(frontier, "robustness under "
                                                                                  "every PGD attack")]
    if "extractors" in summary:
        out += ["", "### Table 1: the extractors", "",
                _table(["budget", "clean", *map(attack_label, PGD_ATTACKS), "worst case", "masking checks", "training"],
                       [[r["budget"], _cell(r, "clean"), *(_cell(r, a) for a in PGD_ATTACKS), _cell(r, "worst"),
                         r.get("sanity", "-"), r.get("health", "-")] for r in summary["extractors"]])]
    texts = summary.get("texts") or {}
    if texts:
        out += ["", "### What the numbers say (generated by the notebooks)", ""]
        out += [f"- **{section}**: {text}" for section, text in texts.items()]
    else:
        out += ["", "_No generated sentences are recorded in this summary.json (made before they were)._"]
    return "\n".join(out)


def render(reports_dir: str | Path) -> str:
    """The whole README from every `reports_dir/*/summary.json`, in name order."""
    reports_dir = Path(reports_dir)
    sections = [report_section(p.parent.name, json.loads(p.read_text(encoding="utf-8")))
                for p in sorted(reports_dir.glob("*/summary.json"))]
    if not sections:
        raise FileNotFoundError(f"no */summary.json in {reports_dir}: run afs-kit report --preset P first")
    return HEADER + "\n" + "\n\n".join(sections) + "\n"


def write(reports_dir: str | Path) -> Path:
    """Write `reports_dir/README.md` (atomically) and return its path."""
    path = Path(reports_dir) / "README.md"
    text = render(reports_dir).encode("utf-8")
    atomic_write(path, lambda f: f.write(text))
    return path
