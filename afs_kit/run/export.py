"""A stacked model as others load it: one self-contained checkpoint (every member's architecture and
weights, the merger) and a model card in RobustBench's conventions (`afs-kit export`); `load_model`
rebuilds the model in eval mode from the checkpoint alone (weights only, strict), so that
`robustbench.eval.benchmark(model, ...)` or any loop can evaluate it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..core.io import load_checkpoint, read_json, save_checkpoint, write_json
from ..core.version import code_version
from ..errors import BadInput
from ..models.nets import model_from_checkpoint
from ..models.stack import AFSModel, FeatureStack, build_merger

CARD, WEIGHTS = "card.json", "model.pt"
PAPER = "Liu & Zhao, Towards Both Accurate and Robust Neural Networks without Extra Data"


def _members(run, merger: dict) -> list[dict]:
    """Each stacked extractor's checkpoint (the kit's own: an architecture the kit rebuilds by name)."""
    out = []
    for name in merger["extractors"]:
        path = run.dir.extractor_dir(name) / "extractor.pt"
        if not path.is_file():
            raise BadInput(f"model stacks {name!r}, which is not one of the kit's extractors in {run.dir.root} "
                           f"(added from outside the kit?); export rebuilds only the kit's own architectures")
        out.append(load_checkpoint(path))
    return out


def _evaluations(run, merger_name: str) -> list[dict]:
    """Every finished evaluation record of the merger's model in the run."""
    found = [read_json(p) for p in sorted((run.dir.root / "eval").glob(f"afs-{merger_name}--n*/metrics.json"))]
    return [m for m in found if not m.get("partial")]


def _aa_version(metrics: dict) -> str:
    """Which AutoAttack ran (its attacks, from the record) and the package that ran it."""
    from importlib.metadata import version

    attacks = list(metrics.get("aa_breakdown", {}))
    which = "standard" if attacks == ["apgd-ce", "apgd-t", "fab-t", "square"] else "custom: " + ", ".join(attacks)
    return f"{which} (pyautoattack {version('pyautoattack')})"


def model_card(run, merger_name: str, merger: dict, members: list[dict]) -> dict:
    """RobustBench's fields for the model: clean and AutoAttack accuracy from the run's largest evaluation
    that ran AutoAttack (else its largest, with no AutoAttack number), the masking checks' verdicts and the
    code version."""
    records = _evaluations(run, merger_name)
    with_aa = [m for m in records if "aa" in m["attacks"]]
    best = max(with_aa or records, key=lambda m: m["n"], default=None)
    cfg = run.preset.evaluation
    archs = [m["model_kwargs"]["name"] for m in members]
    budgets = [m["config"]["eps"] for m in members]
    checks = (best or {}).get("sanity")
    return {
        "name": f"AFS {merger_name}", "reference": PAPER, "dataset": run.data.name, "threat_model": "Linf",
        "eps": cfg.eps, "clean_acc": None if best is None else round(best["clean"], 2),
        "autoattack_acc": round(best["aa"], 2) if best and "aa" in best else None,
        "autoattack_version": _aa_version(best) if with_aa else None,
        "worst_case_acc": None if best is None else round(best["worst"], 2),
        "n_examples": None if best is None else best["n"], "number_forward_passes": len(members),
        "additional_data": False,
        "architecture": f"{len(members)} x {'/'.join(dict.fromkeys(archs))} (PGD-trained at budgets "
                        f"{', '.join(f'{b:.4g}' for b in budgets)}) + one linear merger",
        "masking_checks": None if checks is None else {"passed": checks["passed"], "failed": checks["failed"]},
        "merger_floor": (merger.get("floor") or {}).get("met"), "alpha": merger["config"]["alpha"],
        "code_version": code_version(), "evaluation": None if best is None else best["name"],
    }


def export_model(run, merger_name: str, out: str | Path) -> Path:
    """Write `out/model.pt` (self-contained) and `out/card.json` for the AFS model of merger folder
    `merger_name` in `run`; every check runs before anything is written. Returns `out`."""
    path = run.dir.merger_dir(merger_name) / "merger.pt"
    if not path.is_file():
        raise BadInput(f"model=afs:{merger_name} names no trained merger in {run.dir.root} (trained: "
                       f"{', '.join(run.merger_names()) or 'none'})")
    merger = load_checkpoint(path)
    members = _members(run, merger)
    bundle = {"kind": "afs-model", "num_classes": run.data.num_classes, "code_version": code_version(),
              "members": [{"name": name, "model_kwargs": m["model_kwargs"], "state_dict": m["state_dict"]}
                          for name, m in zip(merger["extractors"], members)],
              "merger": {"state_dict": merger["state_dict"], "feature_dims": merger["feature_dims"]}}
    card = model_card(run, merger_name, merger, members)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / WEIGHTS, bundle)
    write_json(out / CARD, card)
    return out


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> AFSModel:
    """The exported model of `folder` (its `model.pt`), rebuilt strictly from weights only, in eval mode."""
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: export a model with afs-kit export --out {folder}")
    bundle = load_checkpoint(path)
    if bundle.get("kind") != "afs-model":
        raise BadInput(f"{path} is not an exported AFS model (kind={bundle.get('kind')!r})")
    stack = FeatureStack([model_from_checkpoint(m) for m in bundle["members"]])
    if list(stack.feature_dims) != list(bundle["merger"]["feature_dims"]):
        raise BadInput(f"{path}: the members give features of sizes {list(stack.feature_dims)}, the merger "
                       f"expects {list(bundle['merger']['feature_dims'])}")
    merger = build_merger(stack.feature_dim, bundle["num_classes"])
    merger.load_state_dict(bundle["merger"]["state_dict"], strict=True)
    return AFSModel(stack, merger).to(device).eval()
