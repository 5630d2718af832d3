"""Accuracy under attack with per-example flags, robustness curves, trade-off, gradient-masking checks.

Every attack targets the model it is given as a whole: for an AFS model that is the stack of
extractors and the merger together. An attack's robust flag is ANDed with the clean flag (an
example already misclassified is never counted as robust), and `worst` is the AND over all attacks.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..attacks.methods import autoattack, random_starts
from ..attacks.registry import PGD_STEPS
from ..config import ATTACKS, EvalConfig, step_size
from ..core.checks import check_choice
from ..core.device import exact_fp32, matmul_precision, model_device, resolve_device
from ..core.distributed import World
from ..core.io import load_checkpoint, save_checkpoint, write_json
from ..core.stats import compare, examples_hash, interval_of, percent
from ..errors import BadInput
from .flags import check_eval_inputs, correct_flags, pgd_flags, robust_where


def attack_flags(model, x, y, attack: str, cfg: EvalConfig, clean: torch.Tensor, progress: bool = False,
                 part: slice | None = None, n: int | None = None) -> dict:
    """One attack of an evaluation on (x, y), already on the model's device: `{"flags": robust AND
    clean}`, plus `aa_breakdown` for AutoAttack. `part`, `n`: x is the share `part` of the evaluation's `n`
    examples (a rank's, under torchrun)."""
    check_choice("attack", attack, (*PGD_STEPS, "aa"))
    if attack in PGD_STEPS:
        # PGD-10 and PGD-20 start from the same points: the longer attack goes on where the shorter began
        starts = random_starts(x, cfg.eps, cfg.seed, "pgd", part, n)
        # only the clean-correct examples: a misclassified one is not robust whatever the attack does
        standing = clean.nonzero().flatten()
        flags = torch.zeros_like(clean)
        if len(standing):
            flags[standing] = pgd_flags(model, x[standing], y[standing], cfg.eps, step_size(cfg.eps, cfg.step_size),
                                        PGD_STEPS[attack], cfg.batch_size, precision=cfg.precision,
                                        progress=progress, desc=attack, starts=starts[standing])
        return {"flags": flags}
    robust, _, breakdown = autoattack(model, x, y, cfg.eps, seed=cfg.seed, batch_size=cfg.batch_size,
                                      return_breakdown=True, attacks=cfg.aa_attacks or None,
                                      say=(lambda line: print(line, flush=True)) if progress else None)
    return {"flags": clean & robust.to(x.device), "aa_breakdown": breakdown}


def chunk_seed(seed: int, chunk: int) -> int:
    """AutoAttack's seed for chunk `chunk` of an evaluation: the evaluation's seed for the first, so an
    evaluation of one chunk is what it always was; a resumed run draws what an uninterrupted one draws."""
    return seed + 1_000_003 * chunk


def evaluate(model, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig, device: str | None = None,
             progress: bool = True, record: dict | None = None, world: World = World(), on_chunk=None) -> dict:
    """Clean, PGD-10, PGD-20 and AutoAttack (as configured) on the first `cfg.n_examples` examples.

    Returns `{"metrics": {...}, "flags": {attack: BoolTensor}}`; accuracies in percent. `metrics`
    holds every accuracy, `worst` (the per-example AND over every attack run: the headline robust
    accuracy), `ci95` (the 95% Wilson interval of each), `examples` (their count and a hash of their
    indices, so that a paired test can show it compares the same examples) and, where AutoAttack
    ran, `aa_breakdown` (how many examples each of its attacks broke).

    `record` (an earlier result on the same examples and settings) is extended: only the attacks it
    lacks run, every earlier attack is kept, and `worst` is recomputed over all of them.

    Each attack runs over chunks of `cfg.chunk_size` examples; after each finished chunk `on_chunk(state)`
    gets what is done so far (`state`: the flags of clean and every attack, those of the attack under way
    filled up to its last finished chunk, `chunks_done` per attack, `chunks`, `aa_breakdown`) to save it;
    such a state as `record["partial"]` resumes at the first unfinished chunk. PGD's random starts are
    drawn per example (`random_starts`) and AutoAttack's seed per chunk (`chunk_seed`), so resumed flags
    are an uninterrupted run's.

    Runs on `device` (None: the model's), with TF32 off for fp32 (`metrics["matmul_precision"]` says
    which arithmetic); the flags come back on x's device. Under torchrun (`world`) each rank attacks its
    contiguous share of every chunk and the flags are gathered back in their order on every rank.
    """
    for a in cfg.attacks:
        check_choice("attack", a, ATTACKS)
    home = x.device
    dev = model_device(model, x.device) if device is None else resolve_device(device)
    n = len(y) if cfg.n_examples is None else min(cfg.n_examples, len(y))
    x, y = x[:n].to(dev).contiguous(), y[:n].to(dev)
    check_eval_inputs(x, y)
    model = model.to(dev).eval()
    size = cfg.chunk_size
    chunks = max(1, -(-n // size))

    def gathered(f: torch.Tensor) -> torch.Tensor:
        return torch.cat(world.gather(f.cpu()))

    state = (record or {}).get("partial")
    if state is not None and (len(state["flags"]["clean"]) != n or state["chunks"] != chunks):
        state = None  # saved under other settings: start the attacks again
    if record is not None and record.get("flags"):
        flags, done = dict(record["flags"]), list(record["metrics"]["attacks"])
        extra = {k: record["metrics"][k] for k in ("aa_breakdown",) if k in record["metrics"]}
        if len(flags["clean"]) != n:
            raise BadInput(f"the evaluation record holds {len(flags['clean'])} examples, not n_examples={n}")
    elif state is not None:
        flags, done, extra = {"clean": state["flags"]["clean"]}, ["clean"], {}
    else:
        part = world.shard(n)
        flags, extra, done = {"clean": gathered(correct_flags(model, x[part], y[part], cfg.batch_size))}, {}, ["clean"]
    chunks_done = {a: k for a, k in (state or {}).get("chunks_done", {}).items() if a not in done}
    for a, k in chunks_done.items():  # attacks whose every chunk was saved
        if k == chunks:
            flags[a], done = state["flags"][a], [*done, a]
    if state is not None and "aa_breakdown" in state:
        extra.setdefault("aa_breakdown", state["aa_breakdown"])
    clean = flags["clean"].to(dev)
    for name in cfg.attacks:
        if name in done:
            continue
        first = chunks_done.get(name, 0)
        robust = state["flags"][name].clone() if first else torch.zeros(n, dtype=torch.bool)
        if first and progress and world.main:
            print(f"resuming {name} at chunk {first + 1}/{chunks}", flush=True)
        bar = tqdm(total=n, initial=min(n, first * size), desc=name, unit="example", disable=not progress,
                   leave=False)
        breakdown = dict((state or {}).get("aa_breakdown", {})) if first and name == "aa" else {}
        for k in range(first, chunks):
            lo, hi = k * size, min(n, (k + 1) * size)
            share = world.shard(hi - lo)
            part = slice(lo + share.start, lo + share.stop)  # this rank's examples of the chunk
            chunk_cfg = cfg if name in PGD_STEPS else dataclasses.replace(cfg, seed=chunk_seed(cfg.seed, k))
            with exact_fp32(cfg.precision):
                out = attack_flags(model, x[part], y[part], name, chunk_cfg, clean[part], progress, part, n)
            robust[lo:hi] = gathered(out.pop("flags"))
            if name == "aa":  # each rank counted what it broke (one gather on every rank, empty shares too)
                for counted in world.gather(out.get("aa_breakdown", {})):
                    for a, count in counted.items():
                        breakdown[a] = breakdown.get(a, 0) + count
            chunks_done[name] = k + 1
            bar.update(hi - lo)
            if on_chunk is not None:
                saved = {**flags, name: robust}
                on_chunk({"flags": saved, "chunks_done": {a: chunks for a in done if a != "clean"} | chunks_done,
                          "chunks": chunks, **({"aa_breakdown": breakdown} if breakdown else {})})
        bar.close()
        flags[name] = robust
        if name == "aa":
            extra["aa_breakdown"] = breakdown
        done.append(name)
    metrics = {**summarize(flags), **extra}  # refreshes flags["worst"]
    metrics.update(n=n, examples={"first": n, "hash": examples_hash(torch.arange(n))}, eps=cfg.eps,
                   step_size=step_size(cfg.eps, cfg.step_size), attacks=_ordered(done), seed=cfg.seed,
                   precision=cfg.precision, matmul_precision=matmul_precision(cfg.precision))
    return {"metrics": metrics, "flags": {a: f.to(home) for a, f in flags.items()}}


def _ordered(attacks: list[str]) -> list[str]:
    """Attack names in the protocol's order (clean, PGD-10, PGD-20, AutoAttack), added ones after."""
    known = [a for a in ATTACKS if a in attacks]
    return known + [a for a in attacks if a not in known]


def summarize(flags: dict[str, torch.Tensor]) -> dict:
    """Accuracies (percent), `worst` and their 95% intervals from per-example flags; `flags` gets
    `worst` (the AND of the clean flag and every attack's) added or refreshed."""
    flags.pop("worst", None)
    worst = flags["clean"].clone()
    for a, f in flags.items():
        worst &= f
    flags["worst"] = worst
    out = {a: percent(f) for a, f in flags.items()}
    out["ci95"] = {a: list(interval_of(f)) for a, f in flags.items()}
    if "aa" in flags:
        # clean and AutoAttack on the same examples (tables 4-5)
        out["tradeoff"] = tradeoff(out["clean"], out["aa"])
    return out


def protocol_attacks_beyond(held, attacks) -> list[str]:
    """The protocol attacks (`config.ATTACKS`: PGD-10, PGD-20, AutoAttack) a record holds beyond those asked for;
    the stronger attacks that failed masking checks joined to `worst` are never among them."""
    return [a for a in held if a in ATTACKS and a != "clean" and a not in attacks]


def flags_over(flags: dict[str, torch.Tensor], attacks) -> dict[str, torch.Tensor]:
    """Per-example flags as if only `attacks` (and the attacks failed checks joined) had been run, `worst`
    recomputed: a record that also holds AutoAttack, added for tables 4-5, gives a PGD table the same measure as
    that table's other rows."""
    extra = protocol_attacks_beyond(flags, attacks)
    if not extra:
        return flags
    kept = {a: f for a, f in flags.items() if a not in extra and a != "worst"}
    summarize(kept)
    return kept


def metrics_over(metrics: dict, flags: dict[str, torch.Tensor], attacks) -> dict:
    """An evaluation record's metrics as if only `attacks` had been run (`flags_over`); "left_out" names the
    protocol attacks it holds beyond them. The masking checks are the record's."""
    extra = protocol_attacks_beyond(metrics["attacks"], attacks)
    if not extra:
        return metrics
    dropped = {*extra, "worst", "ci95", "tradeoff", "aa_breakdown"}
    out = {k: v for k, v in metrics.items() if k not in dropped}
    out.update(summarize(flags_over(flags, attacks)))
    out["attacks"] = [a for a in metrics["attacks"] if a not in extra]
    out["left_out"] = extra
    return out


def add_attack(result: dict, name: str, robust: torch.Tensor) -> dict:
    """Add one more attack's robust flags to an `evaluate` result: accuracies, `worst` and intervals
    are recomputed from every flag, so the headline number stays the per-example worst case."""
    flags = result["flags"]
    flags[name] = flags["clean"] & robust.cpu()
    result["metrics"].update(summarize(flags))
    result["metrics"]["attacks"] = [*result["metrics"]["attacks"], name]
    return result


def tradeoff(clean: float, aa: float) -> float:
    """Tables 4-5: the mean of clean and AutoAttack accuracy."""
    return (clean + aa) / 2


def robustness_curve(model, x, y, budgets, steps: int = 20, batch_size: int = 200, seed: int = 0,
                     precision: str = "fp32", device: str = "auto", progress: bool = False) -> list[dict]:
    """Accuracy (percent) under PGD-`steps` at each budget, step a quarter of the budget (fig. 5a).

    Budgets are attacked from the smallest up, each on the examples still robust at the one before:
    a perturbation within a smaller budget lies within every larger one, so an example broken there
    is broken here too. The curve is exact for those examples and never rises.
    """
    dev = resolve_device(device)
    x, y = x.to(dev), y.to(dev)
    model = model.to(dev).eval()
    gen = torch.Generator(device=dev).manual_seed(seed)
    robust = correct_flags(model, x, y, batch_size)
    accuracy = {}
    for eps in sorted(set(float(b) for b in budgets)):
        if eps > 0:
            robust = robust_where(robust, x, y, lambda xs, ys, eps=eps: pgd_flags(
                model, xs, ys, eps, eps / 4, steps, batch_size, precision=precision, generator=gen,
                progress=progress, desc=f"eps {eps:.3g}"))
        accuracy[eps] = percent(robust)
    return [{"eps": float(eps), "accuracy": accuracy[float(eps)]} for eps in budgets]


def write_evaluation(out_dir: str | Path, result: dict, model_info: dict) -> dict:
    """`metrics.json` (accuracies, settings, the model's config) and the per-example flags beside it."""
    out_dir = Path(out_dir)
    metrics = {**result["metrics"], "model": model_info}
    if "sanity" in result:
        metrics["sanity"] = result["sanity"]
    save_checkpoint(out_dir / "flags.pt", {"kind": "flags", "flags": result["flags"]})
    write_json(out_dir / "metrics.json", metrics)
    (out_dir / "partial.pt").unlink(missing_ok=True)  # finished: the chunks' state has served
    return metrics


def save_partial(out_dir: str | Path, key: str, state: dict, metrics: dict | None) -> None:
    """After each finished chunk: the flags so far (`partial.pt`) and a `metrics.json` that says
    `"partial": true` with `chunks_done` per attack; the finished attacks' numbers (of an earlier record)
    stay as they were, and nothing shows the unfinished attack as a number."""
    out_dir = Path(out_dir)
    save_checkpoint(out_dir / "partial.pt", {"kind": "partial-flags", "key": key, **state})
    write_json(out_dir / "metrics.json", {**(metrics or {"attacks": []}), "key": key, "partial": True,
                                          "chunks_done": state["chunks_done"], "chunks": state["chunks"]})


def load_partial(out_dir: str | Path, key: str) -> dict | None:
    """The saved state of an unfinished evaluation of `key` in `out_dir`, else None."""
    path = Path(out_dir) / "partial.pt"
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    return state if state.get("key") == key else None


def more_pgd_steps(held: list[str], added: list[str]) -> bool:
    """Whether `added` brings a PGD with more steps than any in `held`: the masking checks, sized by
    the strongest reported PGD, must then be made again."""
    def steps(attacks):
        return max((PGD_STEPS[a] for a in attacks if a in PGD_STEPS), default=0)
    return steps(added) > steps(held)


def paired_comparisons(run_dir, done: list[tuple[tuple, dict]]) -> list[str]:
    """Each AFS model (kind "merger") against every other model evaluated on the same examples: the paired
    test of clean and of worst-case accuracy, one sentence each (`done`: (model_info's kind and what, metrics))."""
    def flags(metrics):
        return load_checkpoint(run_dir.eval_dir(metrics["name"]) / "flags.pt")["flags"]

    lines = []
    for what_a, a in done:
        for what_b, b in done:
            if what_a[0] == "merger" and what_b[0] != "merger" and a["examples"] == b["examples"]:
                fa, fb = flags(a), flags(b)
                lines += [f"{acc}: " + compare(fa[acc], fb[acc], a["model_name"], b["model_name"])["text"]
                          for acc in ("clean", "worst")]
    return lines


