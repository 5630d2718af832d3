"""The stages over one run directory: what exists is loaded, what is missing is trained.

The command line and the notebooks both go through `Run`, so each notebook can run on its own
and a stage that finds its output made from the same config skips the work and says so.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from pathlib import Path

import torch

from ..attacks.registry import check_aa_attacks
from ..config import (ATTACKS, PARALLEL_MODES, Preset, budget_name, config_hash, format_budget, get_preset,
                      preset_from_dict, step_size, validate_preset)
from ..core.checks import check_choice, check_int, check_real, duration, is_int
from ..core.device import PRECISIONS, resolve_device
from ..core.distributed import World, world
from ..core.io import expect, load_checkpoint, read_json, write_json
from ..core.version import code_version
from ..data.batches import data_fingerprint, limited
from ..data.dataset import Dataset
from ..data.datasets import load_dataset
from ..errors import BadInput
from ..eval.evaluation import (add_attack, evaluate, load_partial, metrics_over, more_pgd_steps, save_partial,
                               summarize, write_evaluation)
from ..eval.masking import aa_checks, attacks_joining_worst, checked_examples, sanity_checks
from ..explain.selection import run_delta_z, run_selection
from ..models.nets import check_model_name
from ..models.outside import describe_source, load_outside, prepare_outside, save_outside
from ..models.stack import AFSModel, FeatureStack, LogitAverage, parse_subset, subset_vector
from ..train.extractors import existing_extractor, load_extractor, step_passes, train_extractor
from ..train.merger import load_or_train_merger
from .rundir import PROJECT_ROOT, RunDir

# set to 1 (afs-kit --same-code) to refuse cached evaluations made by another commit instead of reusing them
SAME_CODE_ENV = "AFS_KIT_SAME_CODE"


def resolve_spec(spec: str) -> str:
    """`npz:`/`folder:` paths relative to the working folder, else to the project root (notebooks run in notebooks/)."""
    if spec.startswith("train-test:"):
        train, _, test = spec.removeprefix("train-test:").partition("|")
        return f"train-test:{resolve_spec(train)}|{resolve_spec(test)}"
    kind, sep, path = spec.partition(":")
    if not sep or kind not in ("npz", "folder") or Path(path).is_absolute() or Path(path).exists():
        return spec
    candidate = PROJECT_ROOT / path
    return f"{kind}:{candidate}" if candidate.exists() else spec


def checks_stale(checks: dict | None, cfg, model: torch.nn.Module) -> bool:
    """Whether an evaluation record's masking checks must be made again: none, another strength, or made before
    the smallest-margin check or (for a stack) the stack's own attacks."""
    return (checks is None or checks.get("strength") != cfg.sanity_strength
            or "smallest_margin_not_stronger" not in checks["checks"]
            or (isinstance(model, AFSModel) and len(model.stack.extractors) > 1
                and "stack_attacks_not_stronger" not in checks["checks"]))


class Run:
    """One run directory with its preset; every stage reads and writes it."""

    def __init__(self, run_dir: str | Path, preset: Preset, device: str = "auto", progress: bool = True):
        validate_preset(preset)
        check_aa_attacks(preset.evaluation.aa_attacks)
        check_model_name(preset.extractor.model, "extractor.model")
        if preset.large_model is not None:
            check_model_name(preset.large_model, "large_model")
        for what in ("extractor", "merger", "evaluation"):
            cfg = getattr(preset, what)
            if cfg.precision not in PRECISIONS:
                raise BadInput(f"{what}.precision must be one of {', '.join(PRECISIONS)}, "
                               f"got {what}.precision={cfg.precision!r}")
        self.dir = RunDir(run_dir)
        self.preset = preset
        self.device = resolve_device(device)
        self.progress = progress
        self.world = world()  # this process's rank and the job's size under torchrun (one process: World())
        self._extractors: dict[Path, tuple[torch.nn.Module, dict]] = {}  # loaded once per Run

    @classmethod
    def open(cls, run_dir: str | Path, preset: str | Preset | None = None, device: str = "auto",
             progress: bool = True) -> Run:
        """An existing run keeps its preset; a new one needs `preset` (a name or a Preset)."""
        info = RunDir(run_dir).info_path
        if isinstance(preset, str):
            preset = get_preset(preset)
        if preset is None:
            if not info.is_file():
                raise BadInput(f"run={str(run_dir)!r} holds no run.json; start it with a --preset")
            preset = preset_from_dict(read_json(info)["preset"])
        return cls(run_dir, preset, device=device, progress=progress)

    # ------------------------------------------------------------ data
    @functools.cached_property
    def data(self) -> Dataset:
        spec = self.preset.data.spec
        # named as the preset writes it: a checkpoint's data must not depend on the folder a kernel runs in
        return limited(dataclasses.replace(load_dataset(resolve_spec(spec), self.preset.data.root), name=spec),
                       self.preset.data)

    def test_set(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `n` test images as floats in [0,1] on the run's device, where its models are (all when
        None; all, with a note, when fewer exist)."""
        if n is not None and n > len(self.data.y_test):
            self.say(f"asked for {n} test examples; {self.data.name} has {len(self.data.y_test)}: using all of them")
        n = len(self.data.y_test) if n is None else min(n, len(self.data.y_test))
        return self.data.x_test[:n].to(self.device).float().div(255), self.data.y_test[:n].to(self.device)

    def write_info(self) -> None:
        if not self.dir.info_path.is_file():
            write_json(self.dir.info_path, {"preset": dataclasses.asdict(self.preset),
                                            "data": data_fingerprint(self.data), "classes": list(self.data.classes),
                                            "code_version": code_version()})

    def say(self, text: str) -> None:
        """A progress message (silenced with progress=False, `--quiet`)."""
        if self.progress:
            print(text)

    def result(self, text: str) -> None:
        """A result (an evaluation's numbers, a paired test): printed by rank 0 even when progress is off."""
        if self.world.main:
            print(text)

    # ------------------------------------------------------------ seeds
    @property
    def seed(self) -> int:
        return self.preset.extractor.seed

    def seeds(self, count: int) -> list[int]:
        """`count` training seeds: this run's own seed, then the next ones (seed, seed + 1, ...)."""
        check_int("seeds", count, 1, what="(how many training seeds)")
        return [self.seed + i for i in range(count)]

    def seed_run(self, seed: int) -> Run:
        """The same preset trained with another seed, inside this run directory.

        Layout: this run's own seed is the run directory itself (as before seeds existed); every other
        seed s is a complete run in `seeds/seed-<s>/` whose extractor, merger and evaluation seeds are s.
        So `--seeds 3` on a run of seed 0 trains seeds 0, 1 and 2; the notebooks' SEED picks the first.
        """
        check_int("seed", seed, 0)
        if seed == self.seed:
            return self
        p = self.preset
        preset = dataclasses.replace(p, extractor=dataclasses.replace(p.extractor, seed=seed),
                                     merger=dataclasses.replace(p.merger, seed=seed),
                                     evaluation=dataclasses.replace(p.evaluation, seed=seed))
        return Run(self.dir.seed_dir(seed), preset, device=self.device, progress=self.progress)

    def writing(self, needed: bool = True):
        """The run's lock while a stage writes (`runs.writer`, shared by stages inside stages); taken by rank 0, whose
        job lock covers every rank under torchrun; nothing to write (`needed` False) takes nothing."""
        return self.dir.lock() if needed and self.world.main else contextlib.nullcontext()

    # ------------------------------------------------------------ extractors
    def extractor_config(self, eps: float):
        return dataclasses.replace(self.preset.extractor, eps=eps)

    def train_extractors(self, budgets=None, parallel: str | None = None) -> list[dict]:
        """Train every missing extractor of `budgets` (default: the preset's); one checkpoint each. Under
        torchrun, `parallel` "budgets" shares the missing budgets out among the ranks (each trains its own,
        no gradient traffic); "data" trains each one on every rank under DistributedDataParallel."""
        budgets = self.preset.budgets if budgets is None else tuple(budgets)
        if not budgets:
            raise BadInput(f"budgets must list at least one training budget, got budgets={budgets!r}" + (
                f"; preset {self.preset.name} stacks RobustBench models: `afs-kit add-extractor`" if self.preset.zoo
                else ""))
        for eps in budgets:  # checked before anything is written
            check_real("eps", eps, 0, 1)
        # a checkpoint made for other data or another model is refused before any write
        out = {eps: existing_extractor(self.extractor_config(eps), self.data, self.preset.data,
                                       self.dir.extractor_dir(budget_name(eps))) for eps in budgets}
        w = self.world if parallel is not None else World()
        if parallel is not None:
            check_choice("parallel", parallel, PARALLEL_MODES)
        found = [eps for eps, ckpt in out.items() if ckpt is not None]
        todo = [eps for eps, ckpt in out.items() if ckpt is None]
        with self.writing(bool(todo) or not self.dir.info_path.is_file()):
            if w.main:  # run.json is shared: rank 0 writes it before any rank trains
                self.write_info()
            w.barrier()
            mine = todo[w.rank::w.size] if parallel == "budgets" else todo
            if found:  # one line for what is on disk, not one per extractor
                self.say(f"extractors {', '.join(format_budget(e) for e in found)}: found in {self.dir.root}")
            started = time.monotonic()
            # time left in proportion to each network's passes per step: a budget-0 network trains 2-11x
            # faster than an attacked one (on an H100 a per-network average said 66 s where 80 s were left)
            passes = [step_passes(self.extractor_config(eps), eps) for eps in mine]
            for k, eps in enumerate(mine):
                done = time.monotonic() - started
                eta = "" if k == 0 else f", {duration(done / sum(passes[:k]) * sum(passes[k:]))} left for all"
                self.say(f"extractor {k + 1} of {len(mine)} to train (eps {format_budget(eps)}){eta}")
                out[eps] = train_extractor(self.extractor_config(eps), self.data, self.preset.data,
                                           self.dir.extractor_dir(budget_name(eps)), self.device, self.progress,
                                           world=w if parallel == "data" else World(),
                                           trained_by={"rank": w.rank, "world_size": w.size, "parallel": parallel})
            w.barrier()  # the other ranks' extractors are on disk now
        return [out[eps] or existing_extractor(self.extractor_config(eps), self.data, self.preset.data,
                                               self.dir.extractor_dir(budget_name(eps))) for eps in budgets]

    def train_ablation(self) -> dict | None:
        """Table 6 'Rand.pert.': one network with a budget drawn per batch from the preset's range."""
        rng = self.preset.ablation_budget_range
        return None if rng is None else self._train_extra("random-budget", eps=rng[1], eps_range=rng)

    def train_large_model(self) -> dict | None:
        """Table 6 'Large model': a wider network, PGD-trained like the extractors at the evaluation budget."""
        wide = self.preset.large_model
        return None if wide is None else self._train_extra("large-model", model=wide, eps=self.preset.evaluation.eps)

    def _train_extra(self, which: str, **changes) -> dict:
        cfg, out_dir = dataclasses.replace(self.preset.extractor, **changes), self.dir.ablation_dir(which)
        found = existing_extractor(cfg, self.data, self.preset.data, out_dir)  # a finished one is read, no lock
        if found is not None:
            return found
        with self.writing():
            return train_extractor(cfg, self.data, self.preset.data, out_dir, self.device, self.progress)

    def extractor_checkpoints(self) -> list[tuple[float, Path]]:
        """(budget, path) of every finished extractor, sorted by budget."""
        paths = [self.dir.extractor_dir(name) / "extractor.pt" for name in self.dir.extractor_names()]
        return sorted((self._budget_of(path), path) for path in paths)

    def _budget_of(self, path: Path) -> float:
        if path not in self._extractors:
            model, ckpt = load_extractor(path, "cpu", self.data)
            # same data is not enough: an extractor of another architecture is not this run's
            expect(ckpt["config"], path, model=self.preset.extractor.model)
            self._extractors[path] = model, ckpt
        return self._extractors[path][1]["config"]["eps"]

    def budgets(self) -> list[float]:
        return [b for b, _ in self.extractor_checkpoints()]

    def members(self) -> list[tuple[str, Path]]:
        """(label, checkpoint) of every extractor a subset can stack, in the order of subset vectors: the kit's
        own by budget (labels like 8/255), then those added from outside the kit by name (`add_extractor`)."""
        return ([(format_budget(b), p) for b, p in self.extractor_checkpoints()]
                + [(n, self.dir.outside_dir(n) / "extractor.pt") for n in self.dir.outside_names()])

    def member(self, path: Path) -> tuple[torch.nn.Module, dict]:
        """The extractor (on the run's device, eval mode) and checkpoint of one of `members()`."""
        if path not in self._extractors:
            if path.parent.parent.name == "outside":
                self._extractors[path] = load_outside(path, self.data)
            else:
                self._budget_of(path)
        model, ckpt = self._extractors[path]
        return model.to(self.device).eval(), ckpt

    def outside(self, name: str) -> tuple[torch.nn.Module, dict]:
        if name not in (added := self.dir.outside_names()):
            raise BadInput(f"name={name!r} names no extractor added to {self.dir.root} (added: "
                           f"{', '.join(added) or 'none'}); add it with add-extractor first")
        return self.member(self.dir.outside_dir(name) / "extractor.pt")

    def add_extractor(self, model: torch.nn.Module | None = None, name: str | None = None, **how) -> dict:
        """Add a network from outside the kit as an extractor of this run (no training): `model` (any nn.Module from
        images in [0, 1] to logits; `builder`/`kwargs` say how to rebuild it when its class alone cannot),
        `robustbench="Wong2020Fast"` (with `model_dir`, `download`) or `builder="pkg.mod:fn"` (with `kwargs`,
        `weights`); `layer` names its final linear layer when it is not found. Every check runs before any write."""
        ckpt = prepare_outside(self.data, model, name, **how)
        self.save_extractor(ckpt)
        return ckpt

    def save_extractor(self, ckpt: dict) -> None:
        """Write an outside extractor `prepare_outside` made (run.json first, for a new run) and say so."""
        with self.writing():
            added = save_outside(self.dir, ckpt, before_write=self.write_info)
        where = f"added to {self.dir.outside_dir(ckpt['name'])}" if added else "already in this run"
        self.say(f"extractor {ckpt['name']} ({describe_source(ckpt['source'])}, {ckpt['feature_dim']} features "
                 f"by {ckpt['method']}): {where}")

    def extractor(self, eps: float) -> tuple[torch.nn.Module, dict]:
        for b, path in self.extractor_checkpoints():
            if abs(b - eps) < 1e-9:
                model, ckpt = self._extractors[path]
                return model.to(self.device).eval(), ckpt
        raise BadInput(f"eps={format_budget(eps)} has no trained extractor in {self.dir.root} "
                       f"(budgets: {', '.join(format_budget(b) for b in self.budgets())})")

    # ------------------------------------------------------------ subsets and mergers
    def delta_z_values(self):
        """Per-example Delta-z (eq. 8) of every extractor on validation images: (budgets, [n_budgets, N])."""
        return run_delta_z(self)

    def selected_subset(self) -> str:
        """The concavity rule's choice as a binary vector, stored in selection.json (`selection.run_selection`)."""
        return run_selection(self)

    def subset_indices(self, spec: str) -> list[int]:
        """Indices into `members()` of the extractors `spec` names: all, selected, a binary vector, budgets or names."""
        budgets, members = self.budgets(), self.members()
        if not members:
            raise BadInput(f"run {self.dir.root} has no trained extractors yet; run train-extractors first")
        names = [label for label, _ in members[len(budgets):]]
        if spec == "selected":
            spec = self.selected_subset() + "0" * len(names)
            if names:
                self.say(f"subset selected: the concavity rule needs training budgets, so it leaves out "
                         f"{', '.join(names)} (stack them with an explicit subset)")
        return parse_subset(spec, budgets, names)

    def merger_name(self, indices: list[int], cfg) -> tuple[str, str]:
        members = self.members()
        key = config_hash(cfg, self.preset.data, [self.member(members[i][1])[1]["key"] for i in indices])
        vector = subset_vector(indices, len(members))
        return f"{vector}-alpha-{cfg.alpha:g}-{cfg.mix}-{key[:8]}", key

    def stack(self, indices: list[int]) -> FeatureStack:
        members = self.members()
        return FeatureStack([self.member(members[i][1])[0] for i in indices])

    def afs_model(self, subset: str = "all", alpha: float | None = None, mix: str | None = None) -> AFSModel:
        """The AFS model over `subset` with merger weight `alpha`; its merger is trained when missing."""
        indices = self.subset_indices(subset)
        cfg = self.preset.merger
        cfg = dataclasses.replace(cfg, alpha=cfg.alpha if alpha is None else alpha, mix=mix or cfg.mix)
        if not 0 <= cfg.alpha <= 1:
            raise BadInput(f"alpha (the clean-loss weight of eq. 5) must be in [0, 1], got alpha={cfg.alpha}")
        name, key = self.merger_name(indices, cfg)
        out_dir, found = self.dir.merger_dir(name), self.members()
        missing = not (out_dir / "merger.pt").is_file()
        with self.writing(missing):
            if missing and self.world.main:
                self.write_info()
            model, trained = load_or_train_merger(
                self.stack(indices), self.data, cfg, self.preset.data, out_dir, key,
                [found[i][1].parent.name for i in indices], [self.member(found[i][1])[1]["key"] for i in indices],
                self.device, self.progress, self.world)
        stacked = ", ".join(found[i][0] for i in indices)
        floor = load_checkpoint(out_dir / "merger.pt").get("floor") if trained and self.world.main else None
        self.say(f"merger {name} (subset {subset} = {stacked}, alpha {cfg.alpha:g}): "
                 + (f"trained, saved in {out_dir}" if trained else f"found in {out_dir}")
                 + (f"; {floor['text']} (validation, n = {floor['n']})" if floor else ""))
        return model

    def merger_names(self) -> list[str]:
        base = self.dir.mergers_dir
        return sorted(p.name for p in base.iterdir() if (p / "merger.pt").is_file()) if base.is_dir() else []

    def logit_average(self, subset: str) -> LogitAverage:
        members = self.members()
        return LogitAverage([self.member(members[i][1])[0] for i in self.subset_indices(subset)])

    def model_info(self, kind: str, what) -> dict:
        """What an evaluation record says of its model (and, through "key"/"keys", who it is):
        kind "extractor" (a budget), "outside" (a name), "merger" (a merger folder) or "avg" (a subset); stacked
        models name the extractors they stack."""
        if kind == "extractor":
            ckpt = self.extractor(what)[1]
            return {"kind": kind, "eps": what, "key": ckpt["key"], "health": ckpt.get("health")}
        if kind == "outside":
            ckpt = self.outside(what)[1]
            return {"kind": kind, "name": what, "key": ckpt["key"], "source": ckpt["source"]}
        if kind in ("merger", "ensemble"):
            folder = self.dir.merger_dir(what) if kind == "merger" else self.dir.control_dir(what)
            ckpt = load_checkpoint(folder / "merger.pt")
            choice = ckpt.get("choice", {})
            return {"kind": kind, "name": what, "health": ckpt.get("health"), "extractors": ckpt.get("extractors"),
                    "floor": ckpt.get("floor"), "init": choice.get("init"), "kept_epoch": choice.get("kept_epoch"),
                    "converged": choice.get("converged")}
        members, indices = self.members(), self.subset_indices(what)
        return {"kind": kind, "subset": subset_vector(indices, len(members)),
                "extractors": [members[i][1].parent.name for i in indices],
                "keys": [self.member(members[i][1])[1]["key"] for i in indices]}

    # ------------------------------------------------------------ evaluation
    def _evaluation_record(self, out_dir: Path, key: str) -> dict | None:
        """The record in `out_dir` when it was made of this model under these settings (the saved chunks of an
        unfinished evaluation under "partial"), else None."""
        path = out_dir / "metrics.json"
        metrics = read_json(path) if path.is_file() else {}
        if metrics.get("key") != key:
            if metrics:
                self.say(f"evaluation {out_dir.name}: made for another model under this name, evaluating again")
            return None
        made_by, now = metrics.get("code_version", "unknown"), code_version()
        if made_by != now:
            if os.environ.get(SAME_CODE_ENV) == "1":
                raise BadInput(f"evaluation {out_dir} was made by code {made_by}, not {now}, and {SAME_CODE_ENV}=1 "
                               f"(--same-code) refuses it; delete that folder to evaluate again")
            self.say(f"evaluation {out_dir.name}: made by code {made_by}, reused by {now}")
        partial, held = load_partial(out_dir, key), (out_dir / "flags.pt").is_file()
        if not (held or partial):
            return None
        flags = load_checkpoint(out_dir / "flags.pt")["flags"] if held else {}
        finished = {k: v for k, v in metrics.items() if k not in ("partial", "chunks_done", "chunks")}
        return {"metrics": finished if held else {**finished, "attacks": []}, "partial": partial,
                "flags": {a: f for a, f in flags.items() if a in metrics["attacks"]}}

    def _record_cut_from_more(self, name: str, n: int, settings: dict, identity: dict, cfg,
                              model: torch.nn.Module) -> tuple[dict | None, str | None]:
        """The finished record of the same model under the same settings on the most test images above `n`, cut to
        its first `n` (the same images: PGD's random starts are drawn per example), and that record's folder name;
        (None, None) when there is none. AutoAttack on a subset (tables 4-5) then adds only its own attack to the
        PGD flags and masking checks the full evaluation made: nothing is attacked twice, and one model's checks
        read the same in both records. Only where those checks ran on examples among the first `n`; AutoAttack's
        own flags are never cut (its per-attack counts are of the whole record), and never checks that would be
        made again (another strength): the stronger attacks they added would then be added twice."""
        settings_key = config_hash(settings)
        for size in (s for s in self.dir.evaluation_sizes(name, settings_key) if s > n):
            folder = self.dir.evaluation_name(name, size, settings_key)
            record = self._evaluation_record(self.dir.eval_dir(folder), config_hash(settings, identity, name, size))
            if record is None or not record["flags"]:
                continue
            checks = record["metrics"].get("sanity")
            if checks is not None and ((checks.get("n") or size) > n or checks_stale(checks, cfg, model)):
                continue
            kept = [a for a in record["metrics"]["attacks"] if a != "aa"]
            flags = {a: record["flags"][a][:n] for a in kept}
            metrics = {**summarize(dict(flags)), "attacks": kept}
            if checks is not None:
                metrics["sanity"] = checks
            return {"metrics": metrics, "partial": None, "flags": flags}, folder
        return None, None

    def evaluate(self, name: str, model: torch.nn.Module, attacks=None, n_examples=None, sanity: bool | None = None,
                 model_info: dict | None = None) -> dict:
        """Evaluate model `name` under the preset's protocol on the first `n_examples` test images.

        One record per model and settings (RUN/eval/<name>--n<N>--<settings>): attacks it holds are reused, missing
        ones added (never replacing it), `worst` recomputed over all; the metrics returned are over the attacks
        asked for (`metrics_over`: a PGD table's row leaves out the AutoAttack another table added). Each finished
        chunk of examples is saved, so a killed evaluation resumes there. `sanity` (the masking checks): None runs
        them for stacked models, which are never reported without them. A record of another model under the same
        name (a retrained one) is replaced."""
        if sanity is None:
            sanity = isinstance(model, (AFSModel, LogitAverage))
        if n_examples is not None and not (is_int(n_examples) and n_examples >= 1):
            raise BadInput(f"n_examples must be an integer >= 1 or None, got n_examples={n_examples!r}")
        for a in attacks or ():
            check_choice("attack", a, ATTACKS)
        cfg = self.preset.evaluation
        x, y = self.test_set(n_examples if n_examples is not None else cfg.n_examples)
        cfg = dataclasses.replace(cfg, attacks=tuple(attacks or cfg.attacks), n_examples=len(y))
        settings = {k: getattr(cfg, k) for k in ("eps", "step_size", "batch_size", "seed", "precision",
                                                 "aa_attacks")}
        folder = self.dir.evaluation_name(name, len(y), config_hash(settings))
        # the model's identity: its checkpoint key(s) where given (a merger's name carries its own)
        identity = {k: v for k, v in (model_info or {}).items() if k in ("key", "keys")}
        key = config_hash(settings, identity, name, len(y))
        out_dir = self.dir.eval_dir(folder)
        record = self._evaluation_record(out_dir, key)
        cut_from = None
        if record is None or not record["flags"]:  # none yet, or AutoAttack on a cut record killed: resumed
            cut, cut_from = self._record_cut_from_more(name, len(y), settings, identity, cfg, model)
            if cut is not None:
                record = {**cut, "partial": (record or {}).get("partial")}
        held = record["metrics"]["attacks"] if record else []
        old_checks = (record or {}).get("metrics", {}).get("sanity")
        missing = [a for a in cfg.attacks if a not in held]
        stale_checks = sanity and checks_stale(old_checks, cfg, model)
        if not missing and not stale_checks and cut_from is None:
            self.say(f"evaluation {folder}: found {', '.join(held)}")
            return metrics_over(record["metrics"], record["flags"], cfg.attacks)
        with self.writing():
            if cut_from is not None:
                self.say(f"evaluation {folder}: {', '.join(held)} and the masking checks from {cut_from} (its first "
                         f"{len(y)} examples); adding {', '.join(missing) or 'nothing'}")
            elif held:
                self.say(f"evaluation {folder}: found {', '.join(held)}; adding "
                         f"{', '.join(missing) or 'masking checks'}")
            so_far = {"attacks": held, "code_version": code_version(), "name": folder,
                      **(record["metrics"] if held else {})}
            save = (lambda state: save_partial(out_dir, key, state, so_far)) if self.world.main else None
            result = evaluate(model, x, y, cfg, self.device, self.progress, record=record, world=self.world,
                              on_chunk=save)
            result["flags"] = {a: f.cpu() for a, f in result["flags"].items()}  # as the record on disk holds them
            result["metrics"].update(key=key, name=folder, model_name=name, code_version=code_version(),
                                     world_size=self.world.size)
            if cut_from is not None:
                result["metrics"]["cut_from"] = cut_from
            if not self.world.main:  # under torchrun rank 0 alone runs the masking checks and writes the record
                return self.world.broadcast(None)
            if sanity and (stale_checks or more_pgd_steps(held, missing)):
                self.say(f"evaluation {folder}: gradient-masking checks ({cfg.sanity_strength}) ...")
                # a stack's members trained below the budget (outside ones carry no budget)
                alpha, budget = step_size(cfg.eps, cfg.step_size), {id(m): c.get("config", {}).get("eps", cfg.eps)
                                                                    for m, c in self._extractors.values()}
                below = [i for i, m in enumerate(model.stack.extractors if isinstance(model, AFSModel) else []) if
                         budget.get(id(m), cfg.eps) < cfg.eps - 1e-12]
                checks = sanity_checks(model, x, y, cfg.eps, result["metrics"], seed=cfg.seed, device=self.device,
                                       flags=result["flags"], strength=cfg.sanity_strength, step=alpha, below=below,
                                       n=checked_examples(cfg), say=self.say)
                # a failed check's stronger attack joins `worst`, run (as AutoAttack chains its attacks) on every
                # example the others left standing: the record's pgdN ("stack", "smallest margin") is all of them
                gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
                for attack, robust in attacks_joining_worst(model, x.to(self.device), y.to(self.device), cfg.eps, alpha,
                                                            checks, result["flags"]["worst"].to(self.device), gen,
                                                            cfg.batch_size, self.progress, below).items():
                    add_attack(result, attack, robust)
                result["sanity"] = checks
            elif old_checks is not None:
                # checks made before these attacks were added; those comparing AutoAttack with PGD are redone
                result["sanity"] = aa_checks(old_checks, result["metrics"], result["flags"])
            metrics = write_evaluation(out_dir, result, model_info or {})
            shown = dict.fromkeys(a for a in ("clean", *metrics["attacks"], "worst") if a in metrics)
            checks = metrics.get("sanity")
            self.result(f"evaluation {name}: " + ", ".join(
                f"{a} {metrics[a]:.1f}% [{metrics['ci95'][a][0]:.1f}-{metrics['ci95'][a][1]:.1f}]" for a in shown)
                + ("" if checks is None else "; masking checks " + (
                    "passed" if checks["passed"] else "FAILED: " + ", ".join(checks["failed"]))))
            return self.world.broadcast(metrics_over(metrics, result["flags"], cfg.attacks))
