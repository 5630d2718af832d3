"""The headline's control that is a model of its own: the same-budget ensemble (the other control, the logit
average of eq. 9, is `Run.logit_average`)."""
from __future__ import annotations

import dataclasses

from ..config import budget_name, config_hash, format_budget
from ..core.checks import check_int, check_real
from ..models.stack import AFSModel, FeatureStack
from ..train.merger import load_or_train_merger


def same_budget_ensemble(run, eps: float, size: int, alpha: float | None = None) -> tuple[AFSModel, str]:
    """`size` networks all trained at budget `eps`: `run`'s own and those of its next seeds (`Run.seed_run`:
    existing seed runs are reused, a missing network is trained there alone), stacked and merged by the merger
    training of AFS. Does AFS win by the diversity of its budgets, or only by having `size` networks? Returns
    (model, name); the merger lives in RUN/controls/<name>/."""
    check_int("size", size, 1, what="(networks in the same-budget ensemble)")
    cfg = dataclasses.replace(run.preset.merger, alpha=run.preset.merger.alpha if alpha is None else alpha)
    check_real("alpha", cfg.alpha, 0, 1)
    runs = [run.seed_run(seed) for seed in run.seeds(size)]
    for member in runs:
        member.train_extractors(budgets=[eps])
    extractors, ckpts = zip(*(member.extractor(eps) for member in runs))
    keys, names = [c["key"] for c in ckpts], [f"seed-{r.seed}/{budget_name(eps)}" for r in runs]
    key = config_hash(cfg, run.preset.data, keys)
    name = f"same-budget-{budget_name(eps)}-x{size}-alpha-{cfg.alpha:g}-{cfg.mix}-{key[:8]}"
    out_dir = run.dir.control_dir(name)
    with run.writing(not (out_dir / "merger.pt").is_file()):
        model, trained = load_or_train_merger(FeatureStack([m.to(run.device) for m in extractors]), run.data, cfg,
                                              run.preset.data, out_dir, key, names, keys, run.device, run.progress,
                                              run.world)
    run.say(f"same-budget ensemble {name} ({size} x {format_budget(eps)}, seeds "
            f"{', '.join(str(r.seed) for r in runs)}): " + ("trained" if trained else "found"))
    return model, name
