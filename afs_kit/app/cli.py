"""The `afs-kit` command: train extractors, train a merger, evaluate, render reports.

Every argument is validated before the run directory is locked or anything is written; bad input
exits with status 2 and one line on stderr naming the value.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path

from ..attacks.registry import HEADLINE_PGD, PGD_ATTACKS, REGISTRY
from ..config import ATTACKS, PARALLEL_MODES, PRESETS, format_budget, get_preset, override, preset_from_dict
from ..core.checks import parse_eps_list, parse_unit
from ..core.device import resolve_device
from ..core.distributed import World, check_parallel, init as init_world, job_lock, shutdown
from ..core.io import expect, load_checkpoint, read_json
from ..core.version import VersionAction
from ..data.batches import data_fingerprint
from ..errors import AfsKitError, BadInput
from ..eval.estimate import estimate_run
from ..eval.evaluation import paired_comparisons
from ..models.outside import prepare_outside
from ..models.stack import FeatureStack, subset_vector
from ..run.export import export_model
from ..run.pipeline import SAME_CODE_ENV, Run
from ..run.rundir import RunDir, default_run_dir, model_name
from ..train.merger import load_merger
from .readme import write
from .reports import PARAMETERS, run_report

INTERRUPTED = "afs-kit: interrupted; run the same command again to resume (finished stages are kept)"

# the last lines of each command's --help
EXAMPLES = {
    "train-extractors": ["afs-kit train-extractors --preset demo",
                         "afs-kit train-extractors --preset smoke --run runs/try --set extractor.epochs=3"],
    "train-merger": ["afs-kit train-merger --run runs/demo",
                     "afs-kit train-merger --run runs/demo --subset 1010101 --alpha 0.5"],
    "evaluate": [f"afs-kit evaluate --run runs/demo --model afs --attacks clean,{HEADLINE_PGD}",
                 f"afs-kit evaluate --run runs/demo --model extractor:0.1 --attacks clean,{PGD_ATTACKS[0]} --n 500"],
    "add-extractor": ["afs-kit add-extractor --preset zoo-cifar10 --model-dir models",
                      "afs-kit add-extractor --run runs/demo --builder torchvision.models:resnet18 "
                      "--kwargs '{\"num_classes\": 10}' --weights resnet18.pt --name resnet18"],
    "export": ["afs-kit export --run runs/demo --model afs:0001100-alpha-0.5-loss-1a2b3c4d --out exported/demo"],
    "report": ["afs-kit report --preset demo", "afs-kit report --readme"],
    "presets": ["afs-kit presets"],
}


RANK_EXIT_DELAY_S = 2.0


def _first_rank() -> bool:
    """Whether this process speaks for the job: always, but under torchrun only rank 0 (every rank refuses the
    same bad input; one line is enough)."""
    return os.environ.get("RANK", "0") == "0"


def _say(message: str) -> None:
    """One line on stderr from rank 0; another rank about to exit waits a moment instead, since torchrun stops
    every worker as soon as one exits and rank 0 would not get to say why."""
    if _first_rank():
        print(message, file=sys.stderr)
    else:
        time.sleep(RANK_EXIT_DELAY_S)


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage errors only rank 0 prints under torchrun (subcommands inherit the class)."""

    def error(self, message: str):
        if _first_rank():
            self.print_usage(sys.stderr)
        _say(f"{self.prog}: error: {message}")
        self.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="afs-kit", description="Adversarial Feature Stacking (Liu & Zhao): train "
                "extractors at several budgets, stack them, train the merger, attack the whole model.")
    p.add_argument("--version", action=VersionAction)
    p.add_argument("--same-code", action="store_true", help="refuse cached evaluations made by another commit "
                   "(default: reuse them with a one-line note naming both commits)")
    subparsers = p.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:  # every command's help ends with examples
        epilog = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[name])
        if name == "report":
            epilog = ("notebook parameters (-p NAME=VALUE):\n"
                      + "\n".join(f"  {k:14s}{v.meaning}" for k, v in PARAMETERS.items()) + "\n\n" + epilog)
        return subparsers.add_parser(name, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     **kwargs)

    def common(sp, needs_run=False):
        sp.add_argument("--run", required=needs_run,
                        help="run directory (required)" if needs_run else "run directory (default runs/<preset> in the "
                        "project)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a preset field, e.g. --set extractor.epochs=3 (repeatable)")
        sp.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
        sp.add_argument("--quiet", action="store_true", help="no progress bars or messages")

    sp = command("train-extractors", help="PGD-AT one extractor per budget (resumes, skips finished ones)")
    sp.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (required for a new run)")
    sp.add_argument("--eps", help="comma-separated budgets in [0,1], decimals or k/255 (default: the preset's)")
    sp.add_argument("--ablation", action="store_true", help="also train table 6's random-budget network and large model")
    sp.add_argument("--parallel", choices=PARALLEL_MODES, help="under torchrun: budgets (default; the ranks share the "
                    "budgets out, no gradient traffic) or data (each extractor on every rank, DistributedDataParallel)")
    seeds_option(sp)
    common(sp)

    sp = command("add-extractor", help="add networks from outside the kit (RobustBench's zoo, any builder) as "
                 "extractors: no training; they stack with the kit's own")
    sp.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (required for a new run)")
    sp.add_argument("--robustbench", metavar="NAME[,NAME...]", help="RobustBench zoo models (default: the "
                    "preset's zoo list when no --builder is given)")
    sp.add_argument("--model-dir", default="models", help="RobustBench's model_dir: the weights are read from "
                    "MODEL_DIR/<dataset>/<threat model>/<name>.pt (default ./models, as in RobustBench)")
    sp.add_argument("--threat-model", default="Linf", help="RobustBench threat model (default Linf)")
    sp.add_argument("--download", action="store_true", help="let RobustBench download missing weights")
    sp.add_argument("--builder", metavar="MODULE:FUNCTION", help="any callable returning an nn.Module from images "
                    "in [0, 1] to logits, e.g. torchvision.models:resnet18")
    sp.add_argument("--kwargs", metavar="JSON", help="the builder's keyword arguments as a JSON object")
    sp.add_argument("--weights", metavar="FILE", help="a state dict for the builder's network")
    sp.add_argument("--name", help="the extractor's name in the run (required with --builder)")
    sp.add_argument("--layer", help="the network's final linear layer (default: found by running it once)")
    common(sp)

    sp = command("train-merger", help="train the linear merger over a subset of the run's extractors")
    sp.add_argument("--subset", help="'all', 'selected', a binary vector (leftmost = smallest budget) or budgets")
    sp.add_argument("--alpha", help="weight of the clean loss in eq. 5, in [0,1] (default: the preset's)")
    sp.add_argument("--mix", choices=("loss", "split"), help="loss: eq. 5; split: authors' clean/adv batch split")
    seeds_option(sp)
    common(sp, needs_run=True)

    sp = command("evaluate", help="clean, PGD-10, PGD-20 and AutoAttack; writes metrics.json")
    sp.add_argument("--model", action="append", default=[], metavar="MODEL",
                    help="afs (every trained AFS model; the default), afs:<merger folder>, extractors, "
                         "extractor:<budget>, outside (every added extractor), outside:<name>, avg:<subset> "
                         "(logit averaging, eq. 9); repeatable; AFS models are compared with the others by paired "
                         "tests on the same examples")
    sp.add_argument("--attacks", help=f"comma-separated subset of {','.join(REGISTRY)}")
    sp.add_argument("--n", type=int, help="number of test examples (default: the preset's, all if unset)")
    sp.add_argument("--sanity", action="store_true", help="run the gradient-masking sanity checks for single "
                    "extractors too (always on for AFS models and logit averages)")
    sp.add_argument("--sanity-full", action="store_true", help="the checks at full strength: every evaluated "
                    "example and Square with 5,000 queries (default: 200 examples, 1,000 queries)")
    sp.add_argument("--estimate", action="store_true", help="print each attack's passes and the estimated wall "
                    "time (from the model's measured time per image), then stop: nothing runs or is written")
    common(sp, needs_run=True)

    sp = command("export", help="an AFS model as one self-contained checkpoint and a RobustBench-style card")
    sp.add_argument("--model", required=True, help="afs:<merger folder> (see the run's mergers/)")
    sp.add_argument("--out", required=True, help="folder for model.pt and card.json (afs_kit.load_model reads it)")
    common(sp, needs_run=True)

    sp = command("report", help="execute the notebook sequence with papermill into reports/<preset>/")
    sp.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (required unless --readme)")
    sp.add_argument("--readme", action="store_true", help="instead: write reports/README.md from every "
                    "reports/*/summary.json (or --out's parent folder)")
    sp.add_argument("--out", help="report folder (default reports/<preset>)")
    sp.add_argument("--run", help="run directory (default runs/<preset>)")
    sp.add_argument("-p", dest="params", action="append", default=[], metavar="NAME=VALUE",
                    help="notebook parameter override (repeatable)")
    seeds_option(sp)
    sp.add_argument("--device", default="auto")

    command("presets", help="list the presets")
    return p


def seeds_option(sp) -> None:
    sp.add_argument("--seeds", help="train (and report) K seeds in one run directory: the run's own seed and the "
                    "next K-1, each other seed in RUN/seeds/seed-<s>/ (default 1)")


def _seed_count(args) -> int:
    text = getattr(args, "seeds", None)
    if text is None:
        return 1
    try:
        count = int(text)
    except ValueError:
        raise BadInput(f"--seeds must be an integer >= 1, got seeds={text!r}") from None
    if count < 1:
        raise BadInput(f"--seeds must be an integer >= 1, got seeds={text!r}")
    return count


def _check_run_path(run_dir) -> None:
    """A run directory that is a file (or lies under one) is refused before anything is made."""
    if run_dir is None:
        return
    run_dir = Path(run_dir)
    for path in (run_dir, *run_dir.parents):
        if path.exists():
            if path.is_dir():
                return
            where = "is a file" if path == run_dir else f"lies under {path}, which is a file"
            raise BadInput(f"--run={run_dir} {where}, not a run directory")


def _preset_for(args):
    """The preset of a new run (--preset) or of an existing one (run.json), with --set applied."""
    _check_run_path(args.run)
    run_dir = Path(args.run) if args.run else None
    stored = None
    info_path = RunDir(run_dir).info_path if run_dir is not None else None
    if info_path is not None and info_path.is_file():
        info = read_json(info_path)
        if not isinstance(info, dict) or not isinstance(info.get("preset"), dict):
            raise BadInput(f"{info_path} holds no preset; it is not an afs-kit run.json")
        stored = preset_from_dict(info["preset"])
    name = getattr(args, "preset", None)
    if name is not None:
        preset = get_preset(name)
        if stored is not None and stored.name != preset.name:
            raise BadInput(f"run {run_dir} was made with preset={stored.name!r}, not preset={name!r}")
        preset = stored or preset
    elif stored is not None:
        preset = stored
    elif args.command in ("train-extractors", "add-extractor"):
        raise BadInput(f"run={str(run_dir)!r} holds no run.json; give --preset to start a new run")
    else:  # train-merger and evaluate take no --preset: a run starts with train-extractors
        there = "no run there yet" if run_dir.is_dir() else "no such directory"
        raise BadInput(f"run={str(run_dir)!r} holds no run.json ({there}); start the run with "
                       f"`afs-kit train-extractors --preset <name> --run {run_dir}` first")
    preset = override(preset, args.overrides)

    run_dir = run_dir or default_run_dir(preset.name)
    _check_run_path(run_dir)
    return preset, run_dir


def _models_to_evaluate(run, specs: list[str]):
    """(name, (kind, what)) for each --model; validated before anything is written."""
    out = []
    for spec in specs or ["afs"]:
        kind, sep, arg = spec.partition(":")
        if kind == "afs" and not arg:
            names = run.merger_names()
            if not names:
                raise BadInput(f"run {run.dir.root} has no trained merger; run train-merger first")
            out += [(model_name("afs", n), ("merger", n)) for n in names]
        elif kind == "afs":
            if arg not in run.merger_names():
                raise BadInput(f"model={spec!r}: no merger folder {arg!r} in {run.dir.mergers_dir}")
            out.append((model_name("afs", arg), ("merger", arg)))
        elif kind == "extractors":
            out += [(model_name("extractor", b), ("extractor", b)) for b in run.budgets()]
        elif kind == "extractor":
            eps = parse_unit(arg, "model")
            run.extractor(eps)  # raises a ValueError naming the budget when missing
            out.append((model_name("extractor", eps), ("extractor", eps)))
        elif kind == "outside":
            names = [arg] if arg else run.dir.outside_names()
            for name in names:
                run.outside(name)  # raises a ValueError naming it when missing
            out += [(model_name("outside", n), ("outside", n)) for n in names]
        elif kind == "avg":
            if sep and not arg.strip():  # "avg:" names an empty subset; bare "avg" means all
                raise BadInput(f"model={spec!r} names an empty subset; use avg:all, avg:<binary vector> "
                               f"or avg:<budgets>")
            indices = run.subset_indices(arg or "all")
            out.append((model_name("avg", subset_vector(indices, len(run.members()))), ("avg", arg or "all")))
        else:
            raise BadInput(f"unknown model={spec!r}; use afs, afs:<folder>, extractors, extractor:<budget>, "
                           f"outside, outside:<name>, avg:<subset>")
    return out


def _build(run, what):
    """The model a --model names; a merger is refused unless it was trained on this run's extractors."""
    kind, arg = what
    if kind == "extractor":
        return run.extractor(arg)[0]
    if kind == "outside":
        return run.outside(arg)[0]
    if kind == "avg":
        return run.logit_average(arg)
    path = run.dir.merger_dir(arg) / "merger.pt"
    ckpt = load_checkpoint(path)
    expect(ckpt, path, kind="merger", **data_fingerprint(run.data))
    found = {p.parent.name: p for _, p in run.members()}
    names, keys = ckpt.get("extractors") or [], ckpt.get("extractor_keys") or []
    if not names or len(names) != len(keys):
        raise BadInput(f"checkpoint {path} does not say which extractors it stacks; refusing to use it")
    for name, key in zip(names, keys):
        if name not in found:
            raise BadInput(f"checkpoint {path} stacks extractor {name!r}, which {run.dir.root} "
                           f"does not hold; refusing to use it")
        have = run.member(found[name])[1]["key"]
        if have != key:
            raise BadInput(f"checkpoint {path} was trained on another extractor {name!r} (key {key}, this run's "
                           f"is {have}); refusing to use it: retrain the merger")
    stack = FeatureStack([run.member(found[n])[0] for n in names])
    return load_merger(path, stack, run.data.num_classes, **data_fingerprint(run.data))[0]


def _add_extractors(run: Run, args, job: Job) -> int:
    """Every network is loaded and checked before the run directory is locked or anything is written."""
    import json

    try:
        kwargs = json.loads(args.kwargs) if args.kwargs is not None else None
    except json.JSONDecodeError as err:
        raise BadInput(f"--kwargs must be a JSON object, got kwargs={args.kwargs!r} ({err})") from None
    if args.builder is not None:
        if args.name is None:  # a builder's network has no name of its own (a zoo model's name is its entry)
            raise BadInput(f"--name is required with --builder (the extractor's name in the run), got "
                           f"builder={args.builder!r} without --name")
        how = [dict(builder=args.builder, kwargs=kwargs, weights=args.weights, name=args.name)]
    else:
        names = args.robustbench.split(",") if args.robustbench is not None else list(run.preset.zoo)
        if not names or not all(n.strip() for n in names):
            raise BadInput(f"give --robustbench NAME[,NAME...] or --builder (preset {run.preset.name!r} lists no "
                           f"zoo models), got robustbench={args.robustbench!r}")
        if args.name is not None and len(names) > 1:
            raise BadInput(f"--name names one extractor, got name={args.name!r} for {len(names)} zoo models")
        how = [dict(robustbench=n.strip(), model_dir=args.model_dir, threat_model=args.threat_model,
                    download=args.download, name=args.name) for n in names]
    run.data  # a missing data set fails here, before anything is written
    ready = [prepare_outside(run.data, layer=args.layer, **h) for h in how]
    with run.dir.lock():
        for ckpt in ready:
            run.save_extractor(ckpt)
    return 0


def _presets(args) -> int:
    for name, p in PRESETS.items():
        what = (f"model={p.extractor.model} budgets={','.join(format_budget(b) for b in p.budgets)}" if p.budgets
                else f"RobustBench zoo={','.join(p.zoo)}")
        print(f"{name:15s} data={p.data.spec} {what} eval eps={format_budget(p.evaluation.eps)}")
    return 0


def _report(args) -> int:
    if args.readme:
        print(f"wrote {write(Path(args.out) if args.out else Path('reports'))}")
        return 0
    if args.preset is None:
        raise BadInput("report needs --preset (or --readme)")
    _check_run_path(args.run)
    params = [*args.params, f"SEEDS={_seed_count(args)}"] if args.seeds is not None else args.params
    return run_report(args.preset, out=args.out, run_dir=args.run, params=params, device=args.device)


@dataclasses.dataclass(frozen=True)
class Job:
    """What a command on a run knows besides its arguments: this process's place in the job, the seeds."""
    world: World
    seeds: int
    parallel: str | None


def _train_extractors(run: Run, args, job: Job) -> int:
    # `is not None`: an empty --eps '' is refused, not read as "the preset's budgets"
    budgets = parse_eps_list(args.eps) if args.eps is not None else run.preset.budgets
    run.data  # a missing data set fails here, before anything is written
    with job_lock(run.dir):
        for seed in run.seeds(job.seeds):
            if job.seeds > 1:
                run.say(f"seed {seed} ({run.seed_run(seed).dir.root}):")
            seeded = run.seed_run(seed)
            seeded.train_extractors(budgets, parallel=job.parallel)
            if args.ablation and job.world.main:  # table 6's two networks: on rank 0
                seeded.train_ablation()
                seeded.train_large_model()
    return 0


def _train_merger(run: Run, args, job: Job) -> int:
    alpha = parse_unit(args.alpha, "alpha") if args.alpha is not None else None
    subset = args.subset if args.subset is not None else run.preset.default_subset
    seeded = [run.seed_run(s) for s in run.seeds(job.seeds)]
    for r in seeded:
        if not r.members():
            raise BadInput(f"run {r.dir.root} has no trained extractors; run train-extractors"
                           f"{f' --seeds {job.seeds}' if job.seeds > 1 else ''} first")
        if subset != "selected":
            r.subset_indices(subset)  # validates the subset against the run's extractors
    with job_lock(run.dir):
        for r in seeded:
            r.afs_model(subset, alpha=alpha, mix=args.mix)
    return 0


def _evaluate(run: Run, args, job: Job) -> int:
    attacks = None
    if args.attacks is not None:
        attacks = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
        if not attacks:
            raise BadInput(f"attacks must name at least one of {','.join(ATTACKS)}, got attacks={args.attacks!r}")
        override(run.preset, [f"evaluation.attacks={','.join(attacks)}"])  # validates the names
    if args.n is not None and args.n < 1:
        raise BadInput(f"--n must be >= 1, got n={args.n}")
    if args.sanity_full:
        run.preset = override(run.preset, ["evaluation.sanity_strength=full"])
    # every model is built (and its checkpoints checked) before the lock is taken
    targets = [(name, what, _build(run, what)) for name, what in _models_to_evaluate(run, args.model)]
    if args.estimate:  # before anything runs; nothing is written and no lock is taken
        print("\n".join(estimate_run(run, [(n, m) for n, _, m in targets], attacks, args.n, args.sanity)))
        return 0
    # one process: each evaluation takes the run's lock only if it has something to write, so a complete run
    # answers from a read-only place; under torchrun rank 0 holds it for the job, as every rank must know
    with job_lock(run.dir) if job.world.distributed else contextlib.nullcontext():
        done = [(what, run.evaluate(name, model, attacks=attacks, n_examples=args.n,
                                    # None: the pipeline runs the sanity checks for every stacked model
                                    sanity=True if args.sanity else None, model_info=run.model_info(*what)))
                for name, what, model in targets]
    for line in paired_comparisons(run.dir, done) if job.world.main else ():
        run.result(line)
    return 0


def _export(run: Run, args, job: Job) -> int:
    if not args.model.startswith("afs:"):
        raise BadInput(f"--model must be afs:<merger folder>, got model={args.model!r}")
    run.result(f"exported to {export_model(run, args.model.removeprefix('afs:'), args.out)}")
    return 0


COMMANDS_WITHOUT_RUN = {"presets": _presets, "report": _report}
COMMANDS_ON_A_RUN = {"train-extractors": _train_extractors, "train-merger": _train_merger, "evaluate": _evaluate,
                     "add-extractor": _add_extractors, "export": _export}


def run_command(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.same_code:  # read by Run.evaluate, here and in the report's notebook kernels
        os.environ[SAME_CODE_ENV] = "1"
    if args.command in COMMANDS_WITHOUT_RUN:
        return COMMANDS_WITHOUT_RUN[args.command](args)
    seeds = _seed_count(args)
    preset, run_dir = _preset_for(args)
    w, device = init_world(resolve_device(args.device))  # one process, or this rank of a torchrun job
    parallel = getattr(args, "parallel", None) or ("budgets" if w.distributed else None)
    if w.distributed and args.command == "train-extractors":
        check_parallel(parallel, w.size, parse_eps_list(args.eps) if args.eps is not None else preset.budgets,
                       preset.extractor.batch_size)
    run = Run(run_dir, preset, device=device, progress=not args.quiet and w.main)
    return COMMANDS_ON_A_RUN[args.command](run, args, Job(w, seeds, parallel))


def _run_and_leave(argv: list[str]) -> int:
    """`run_command`, then out of the torchrun job's process group (if it joined one), however it ended."""
    try:
        return run_command(argv)
    finally:
        if "torch.distributed" in sys.modules:
            shutdown()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--"]:  # `torchrun ... -m afs_kit -- <command>` may hand the separator on
        argv = argv[1:]
    try:
        return _run_and_leave(argv)
    except AfsKitError as err:  # the kit's own errors carry their exit code (errors.py)
        _say(f"afs-kit: error: {err}")
        return err.exit_code
    except FileNotFoundError as err:
        _say(f"afs-kit: error: {err}")
        return 2
    except KeyboardInterrupt:  # Ctrl-C: every stage writes atomically, so what finished is kept
        # a Ctrl-C that landed inside an exec(<string>) (dataclasses, torch's lazy imports) leaves CPython's
        # "unhandled KeyboardInterrupt" flag set, so `python -m` would die by SIGINT (status -2) even though
        # it was handled here; evaluating any string resets that flag
        exec("None")  # pylint: disable=exec-used
        _say(INTERRUPTED)  # under torchrun every rank is interrupted; one line is enough
        return 130
    except (PermissionError, FileExistsError, NotADirectoryError) as err:
        # RunLock names an unwritable run directory in its message; elsewhere, one line naming the path
        _say(f"afs-kit: error: {err.strerror.lower()}: {err.filename}" if err.filename and err.strerror else
             f"afs-kit: error: {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
