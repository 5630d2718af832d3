"""Frozen configuration: data, extractor training, merger training, evaluation, and named presets.

Every field carries a comment with its unit. `asdict(cfg)` goes into every checkpoint and results
file, so a result can always be traced to the settings that made it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass

from .core.checks import check_choice, check_int, parse_value
from .errors import BadInput

TRAINERS = ("pgd", "fgsm", "trades")
LR_SCHEDULES = ("step", "cyclic")
MIXES = ("loss", "split")
MERGER_INITS = ("random", "zero", "logit-average", "best-member")  # where the merger's weights start
MERGER_KEEPS = ("best", "last")  # which weights a trained merger keeps
ATTACK_BN = ("train", "eval")
ATTACKS = ("clean", "pgd10", "pgd20", "aa")
SANITY_STRENGTHS = ("light", "quick", "full")
PARALLEL_MODES = ("budgets", "data")  # how a torchrun job shares out extractor training (afs_kit.distributed)


@dataclass(frozen=True)
class DataConfig:
    spec: str = "digits"              # load_dataset spec: digits, cifar10, cifar100, fashion-mnist, npz:PATH, folder:PATH
    root: str | None = None           # folder of torchvision files (None: $AFS_KIT_DATA or the cache folder)
    val_fraction: float = 0.1         # share of the training set held out for early stopping (never the test set)
    crop_padding: int = 0             # random-crop padding in pixels (4 for CIFAR), 0 = no crop
    flip: bool = False                # random horizontal flip (CIFAR yes; digits and clothes no)
    train_limit: int | None = None    # use only the first N training images (tiny presets); None = all


@dataclass(frozen=True)
class ExtractorConfig:
    model: str = "cnn-tiny"           # build_model name
    trainer: str = "pgd"              # pgd (Madry PGD-AT), fgsm (FGSM with random start), trades
    eps: float = 0.0                  # training budget (Linf, pixel scale [0,1]); 0 = standard training
    eps_range: tuple[float, float] | None = None  # draw a budget per batch from [lo, hi] (table 6 "Rand.pert.")
    attack_steps: int = 10            # PGD steps while training
    step_size: float | None = None    # PGD step (eta); None = eps / 4
    trades_beta: float = 6.0          # TRADES weight of the KL term
    attack_bn: str = "train"          # BatchNorm mode while crafting training attacks: "train" (batch statistics,
                                      # running statistics updated by every attack forward pass) as the authors
                                      # and Rice et al.; "eval" (running statistics, untouched) as TRADES and HAT
    epochs: int = 65                  # passes over the training split
    batch_size: int = 128             # examples per SGD step
    lr: float = 0.1                   # initial SGD learning rate
    momentum: float = 0.9             # SGD momentum
    weight_decay: float = 5e-4        # L2 penalty
    lr_schedule: str = "step"         # step: lr, times lr_gamma at each milestone (Madry, Rice); cyclic: one
                                      # cycle per run, 0 -> lr at 2/5 of the steps -> 0, moved every batch (Wong
                                      # et al. 2020's fast adversarial training; milestones unused)
    lr_milestones: tuple[int, ...] = (50, 60)  # epochs where the learning rate drops (step schedule)
    lr_gamma: float = 0.1             # factor of each drop
    val_attack_steps: int = 10        # PGD steps of the early-stopping check on the validation split
    val_examples: int = 1000          # validation examples checked each epoch (at most)
    seed: int = 0                     # seeds weights, data order, augmentation and random starts
    precision: str = "bf16"           # bf16 autocast (fp32 master weights) or fp32


@dataclass(frozen=True)
class MergerConfig:
    alpha: float = 0.5                # weight of the clean loss in eq. 5 (1 - alpha on the adversarial loss)
    mix: str = "loss"                 # loss: eq. 5 on every example; split: first alpha share clean (authors' code)
    eps: float = 8 / 255              # budget of the PGD examples the merger trains on
    attack_steps: int = 10            # PGD steps against the whole stacked model
    step_size: float | None = None    # PGD step; None = eps / 4 (2/255 at 8/255)
    epochs: int = 5                   # the paper trains the merger 5 epochs
    batch_size: int = 100             # the authors' merger batch
    lr: float = 2.0                   # SGD rate of the first `lr_drop_epoch` epochs; with normalize_lr in units
                                      # of 1/E||f||^2 (the step is lr / E||f||^2, stable below 4 (1 + momentum)),
                                      # else as is (1/feature units^2; the authors: 0.1)
    normalize_lr: bool = True         # divide lr by E||f||^2, the mean squared norm of the stacked clean features
                                      # (measured once on training images): SGD on a linear layer is stable only
                                      # for lr * ||f||^2 below a constant; False = the authors' raw lr
    lr_drop_epoch: int = 2            # from this epoch on the rate is lr * 0.1 (authors: 0.1 for two epochs, then 0.01)
    momentum: float = 0.9             # SGD momentum
    weight_decay: float = 5e-4        # L2 penalty on the merger
    seed: int = 0                     # seeds the merger's init, data order and random starts
    precision: str = "bf16"           # autocast of the attack and forward passes while training
    init: str = "best-member"         # random (nn.Linear's draw; the authors'), zero, logit-average (starts as eq. 9),
                                      # best-member (the classifier of the member with the lowest validation eq. 5 loss)
    min_steps: int = 0                # at least this many SGD steps: epochs and lr_drop_epoch are stretched alike
    val_attack_steps: int = 10        # PGD steps of the validation score checked after every epoch (fp32)
    val_examples: int | None = None   # validation images of those checks; None = the whole validation split
    standardize: bool = False         # SGD in standardized feature coordinates, folded back into one linear layer
    keep: str = "best"                # best: the weights best on the validation checks (the init among them);
                                      # last: the final ones, as the authors' code


@dataclass(frozen=True)
class EvalConfig:
    eps: float = 8 / 255              # evaluation budget (Linf)
    step_size: float | None = None    # PGD step; None = eps / 4 (2/255 at 8/255, the paper's protocol)
    attacks: tuple[str, ...] = ATTACKS  # which of clean, pgd10, pgd20, aa to run
    n_examples: int | None = None     # first N test examples; None = all
    aa_examples: int | None = None    # AutoAttack in reports (tables 4-5) on the first N; None = as n_examples
    batch_size: int = 200             # examples per attack batch
    budgets: tuple[float, ...] = ()   # robustness-vs-budget curve (fig. 5a); () = a default grid up to 2x eps
    seed: int = 0                     # seeds PGD random starts and AutoAttack
    precision: str = "fp32"           # reported robust accuracies come from fp32 attacks
    sanity_strength: str = "quick"    # gradient-masking checks: quick (200 examples, Square 1,000 queries), full,
                                      # or light (100, 200 queries, one restart of the converged check: the demo's)
    sanity_examples: int | None = None  # examples the quick checks use; None = the strength's (200 for quick)
    aa_attacks: tuple[str, ...] = ()  # AutoAttack's attacks; () = its standard version (APGD-CE, APGD-T, FAB-T,
                                      # Square); a list (e.g. apgd-ce,apgd-dlr) runs pyautoattack's "custom"
                                      # version: cheaper and weaker, recorded in metrics.json and named in reports
    chunk_size: int = 250             # each attack runs over chunks of this many examples, each saved when done:
                                      # a killed evaluation resumes at its first unfinished chunk


@dataclass(frozen=True)
class Preset:
    name: str                          # preset name, used for reports/<name>/
    data: DataConfig                   # which data and how it is augmented
    extractor: ExtractorConfig         # template for each extractor; eps is set per budget
    budgets: tuple[float, ...]         # training budgets eps_i, one extractor each
    merger: MergerConfig               # merger training
    evaluation: EvalConfig             # evaluation protocol
    alphas: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)  # table 2 alpha sweep
    subsets: tuple[str, ...] = ("all",)  # table 3 subsets (binary vectors or "all")
    default_subset: str = "all"        # the headline AFS model's extractors; presets with 3+ budgets use the
                                       # concavity rule's choice ("selected"), as the paper's headline does
    ablation_budget_range: tuple[float, float] | None = None  # table 6 random-budget network; None = skip
    large_model: str | None = None     # table 6 "Large model": a wider network PGD-trained at the evaluation budget
    tsne_examples: int = 1000          # test examples embedded for fig. 4
    delta_z_examples: int = 200        # validation examples for Delta-z and the selection rule (fig. 3)
    zoo: tuple[str, ...] = ()          # RobustBench models `add-extractor` stacks with (or instead of) the budgets


def k255(k: float) -> float:
    return k / 255


_CIFAR_DATA = dict(crop_padding=4, flip=True)

PRESETS: dict[str, Preset] = {
    # tests: seconds per stage; the AFS model still learns. The light masking checks and AutoAttack's two APGD
    # attacks (as the CPU presets): the smoke report, which the notebook tests share, took 131 s with the quick
    # checks and the standard version (Square's 5,000 queries and FAB-T most of notebook 07's 42 s). Then the
    # checks on 50 examples (100): they were still 50 s of the report's 102 s of work (cProfile, Intel Xeon); and
    # the evaluations on 60 test digits (100) with fig. 5a's curve at 4 budgets (5): `make test` on 2 Intel cores
    # was CPU-bound end to end, so every test that evaluates a smoke model pays for these
    "smoke": Preset(
        name="smoke",
        data=DataConfig(spec="digits"),
        extractor=ExtractorConfig(model="cnn-tiny", epochs=2, batch_size=64, lr=0.05, lr_milestones=(),
                                  attack_steps=5, val_attack_steps=5, val_examples=200),
        budgets=(0.0, 0.1, 0.2),
        # lr 2: its old raw 0.05 was 2.2. One epoch from the best member (2): a smoke report trains 5 mergers, the
        # suite about 20, each epoch 13 steps and a validation check (1 of a merger's 4 s)
        merger=MergerConfig(eps=0.1, epochs=1, attack_steps=5, batch_size=100),
        evaluation=EvalConfig(eps=0.1, n_examples=60, batch_size=100, budgets=(0.0, 0.1, 0.2, 0.3),
                              sanity_strength="light", sanity_examples=50, aa_attacks=("apgd-ce", "apgd-dlr")),
        alphas=(0.0, 0.5, 1.0),
        subsets=("101", "all"),
        ablation_budget_range=(0.1, 0.2),
        large_model="cnn-tiny-x2",
        tsne_examples=200,
        delta_z_examples=50,
    ),
    # make demo: the whole pipeline on digits in 3 minutes on 2 CPU cores: every table and figure drawn, every
    # model masking-checked, on settings cut for time (what the demo's numbers are good for: showing the pipeline
    # and its checks; not a result). Measured before the cut (AMD EPYC, 2 idle cores): 396 s, of which 01 77 s
    # (training 49 s), 04 78 s, 05 99 s, 07 122 s; the masking checks, not the attacks, were most of every
    # evaluation (7-network stack: 30 s of checks, half of them the converged check's PGD-100 x 2 x CE/CW, against
    # 2.5 s for its PGD-10/20 on 360 digits); then, with the rule's 4-network stack, AutoAttack's standard version
    # (59 s of notebook 07's 112, Square's 5,000 queries 35 s of it). Cut: masking checks on 100 examples (200),
    # alphas 0, 0.5, 1 (five), subsets selected, 1000001, all (four), extractors 10 epochs (15), mergers 6 epochs
    # (8), AutoAttack on 100 examples (200) with APGD-CE and APGD-DLR only, as the CPU presets run it; then (248 s
    # with those cuts, a masking check still about 3 times its model's attacks) the "light" masking checks: 100
    # examples, Square 500 queries, one restart of the converged check's PGD-100 (two). Then (258 s on 2 idle
    # Intel Xeon cores without AMX, the smallest-margin check added; 17 masking checks were about half of it, each
    # bound by per-call overhead on 50-100 tiny images, Square's queries 40% of a check): the light checks on 50
    # examples with Square at 200 queries, extractors 8 epochs (10), mergers 4 epochs (6): 178 s on that machine.
    "demo": Preset(
        name="demo",
        data=DataConfig(spec="digits"),
        extractor=ExtractorConfig(model="cnn-tiny", epochs=8, batch_size=64, lr=0.05, lr_milestones=(6,),
                                  attack_steps=7, val_attack_steps=7, val_examples=200),
        budgets=(0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3),
        # digits has ~1,400 training images: 14 merger steps an epoch, so more epochs than the paper's 5
        # lr 8 in units of 1/E||f||^2 (E||f||^2 = 163, so the old raw 0.05): validation PGD-10 71.8, 71.8,
        # 73.9, 75.4% at lr 1, 2, 4, 8 from a random start; the loss falls at every one. 6 epochs from the
        # best member (16 from a random start before, 8 until the 3-minute cut): each epoch's validation check
        # costs about a third of an epoch
        merger=MergerConfig(eps=0.15, epochs=4, lr_drop_epoch=3, attack_steps=7, lr=8.0),
        evaluation=EvalConfig(eps=0.15, aa_examples=100, aa_attacks=("apgd-ce", "apgd-dlr"), sanity_strength="light",
                              sanity_examples=50, budgets=(0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)),
        alphas=(0.0, 0.5, 1.0),
        subsets=("selected", "1000001", "all"),
        default_subset="selected",
        ablation_budget_range=(0.05, 0.3),
        large_model="cnn-tiny-x2",
        tsne_examples=360,
        delta_z_examples=200,
    ),
    # real Fashion-MNIST, small CNN: about an hour on 2 CPU cores (measured: 56 min for the whole report from
    # nothing on 2 idle Intel Xeon cores in fp32 (01 16 min, 04 9 min, 05 12 min, 07 19 min); 48 min earlier, in
    # bf16 at one thread on cores shared with other jobs; at most 1.7 GB). Cut from the first version (7 budgets,
    # 10,000 images, 4 merger epochs of PGD-7, standard AutoAttack through 7 networks: its notebook 07 alone ran 25 min
    # before the job was stopped) as cifar10-mini was: 5,000 images, five budgets, mergers 2 epochs of PGD-5,
    # 500 test images with AutoAttack's APGD-CE and APGD-DLR, masking checks on 100. Trained in fp32, as cifar10-mini:
    # a bf16 training step of cnn-small took 1.3x an fp32 one on a CPU without AMX or AVX512-BF16.
    "fashion-mnist": Preset(
        name="fashion-mnist",
        data=DataConfig(spec="fashion-mnist", train_limit=5000),
        extractor=ExtractorConfig(model="cnn-small", epochs=6, batch_size=128, lr=0.05, lr_milestones=(5,),
                                  attack_steps=5, val_attack_steps=7, val_examples=500, precision="fp32"),
        budgets=(0.0, 0.025, 0.05, 0.1, 0.15),
        merger=MergerConfig(eps=0.1, epochs=2, attack_steps=5, lr_drop_epoch=1, precision="fp32"),
        evaluation=EvalConfig(eps=0.1, n_examples=500, aa_examples=500, aa_attacks=("apgd-ce", "apgd-dlr"),
                              sanity_examples=100, budgets=(0.0, 0.025, 0.05, 0.1, 0.15, 0.2)),
        alphas=(0.0, 0.5, 1.0),
        subsets=("selected", "10001", "all"),
        default_subset="selected",
        ablation_budget_range=(0.025, 0.15),
        large_model="cnn-small-x2",
        tsne_examples=500,
    ),
    # real CIFAR-10 (lossless 4,000 train / 1,000 test), five budgets 0..8/255, evaluated at 8/255, 2 seeds.
    # One seed on all 1,000 test images under the earlier settings (bf16, AutoAttack on 500, quick checks, alphas
    # 0, 0.5, 1) took about 2 h 40 min on 2 shared cores, over the 2 hours allowed for two seeds. Cut, in this
    # order (the merger's training untouched): AutoAttack on the first 250 test images (500), the alpha sweep at 0
    # and 0.5 (alpha = 1 is the clean-only end, which the 0/255 single network already marks), and the "light"
    # masking checks (Square 200 queries, not 1,000; the converged check's PGD-100 with one restart, not two,
    # which also halves the stronger attack a failed check runs on every image), on 100 images. Measured with
    # them for the committed two-seed report (2 idle Intel Xeon cores without AMX, fp32 training, inputs
    # channels-last), in two invocations: notebook 01 for both seeds 43 min (10 extractors: 1.6 min at 0,
    # 3.0-4.2 min adversarial; each evaluated on the 1,000 images in 30-50 s where its checks pass, 1.5-2 min where
    # `converged` fails), 02 and 03 20 s, 04 11 min (resuming an alpha = 0 merger the first invocation had
    # partly trained; a merger epoch through the rule's two networks takes 2 min), 05 18 min, 07 49 min (both
    # seeds' controls, table 6's networks, AutoAttack): about 2 h 10 min in all, a little over the target. Most
    # of an evaluation is the stronger PGD that a failed `converged` check runs (PGD-100, CE and CW, on the
    # examples PGD-10/20 left standing). Evaluations are saved chunk by chunk, so the report resumes across
    # invocations. What was cut earlier to fit, and why (each measured on 1 core):
    # - extractors: FGSM with a random start and a cyclic rate (Wong et al. 2020), 15 epochs: 1.7 min at 8/255
    #   (val clean 43.5%, PGD-10 26.5%) where 10 epochs of PGD-5 took 3.5 min for 37.0% / 22.5%;
    #   20 epochs gained 2 points for 50% more time. cnn-cifar pools after its first conv (half the MACs).
    # - training in fp32, extractors and mergers: on 2 Intel Xeon cores without AMX or AVX512-BF16 (bf16 emulated)
    #   a bf16 training step of cnn-cifar took 1.65x an fp32 one (7.9 against 4.8 ms per image), and an extractor
    #   about 4.5 min; fp32 also trains the same networks on every CPU.
    # - mergers: from the best member (lowest validation eq. 5 loss), 4 epochs against PGD-5 through the whole
    #   stack (one epoch of PGD-10 through five networks costs more than training one extractor), the rate
    #   divided by 10 for the last; the weights kept are the best of the 5 validation checks (the start among
    #   them). Rate 0.5 in units of 1/E||f||^2, chosen on the validation split at alpha = 0.5 (score 32.5 after
    #   one epoch at 0.5 against 32.0 at 2, the earlier rate; at alpha = 0 no rate from 0.02 to 2 beat the start).
    # - evaluation on all 1,000 test images, AutoAttack on the first 250 and APGD-CE and APGD-DLR only: the
    #   standard version took 191 s for 100 images through ONE network (APGD-T's 9 targets, FAB-T and
    #   Square's 5,000 queries on every robust image), hours through five. Square still runs, 200 queries,
    #   in the masking checks, which use 100 images instead of 200.
    # - the headline AFS model is the concavity rule's stack ("selected", chosen on validation images by
    #   notebook 02), as in the paper; table 3 adds the full stack.
    "cifar10-mini": Preset(
        name="cifar10-mini",
        data=DataConfig(spec="npz:../shared/data/cifar10-mini.npz", **_CIFAR_DATA),
        extractor=ExtractorConfig(model="cnn-cifar", trainer="fgsm", lr_schedule="cyclic", epochs=15, batch_size=128,
                                  lr=0.2, val_attack_steps=10, val_examples=200, precision="fp32"),
        budgets=tuple(k255(k) for k in range(0, 9, 2)),
        merger=MergerConfig(eps=k255(8), epochs=4, attack_steps=5, lr_drop_epoch=3, lr=0.5, precision="fp32"),
        evaluation=EvalConfig(eps=k255(8), n_examples=1000, aa_examples=250, aa_attacks=("apgd-ce", "apgd-dlr"),
                              sanity_strength="light", sanity_examples=100,
                              budgets=tuple(k255(k) for k in (0, 2, 4, 8, 12, 16))),
        alphas=(0.0, 0.5),
        subsets=("selected", "all"),
        default_subset="selected",
        ablation_budget_range=(k255(3), k255(8)),
        large_model="cnn-cifar-x2",
        tsne_examples=500,
    ),
    # real CIFAR-10 on one GPU in about 20 minutes (not yet measured: no GPU was at hand when it was written), in
    # stages that resume (one extractor, one merger, one evaluation at a time): PreActResNet-18 extractors with
    # FGSM-RS and the cyclic rate of Wong et al. 2020 (15 epochs) on all 50,000 training images, which exist here
    # only as JPEG (fine for training); evaluation on the 1,000 lossless test images of cifar10-mini.npz (JPEG
    # moves 23% of the pixels by more than 8/255: never for a robust figure). Mergers: 2 epochs of PGD-5.
    "cifar10-fast": Preset(
        name="cifar10-fast",
        data=DataConfig(spec="train-test:folder:../shared/data/cifar10-jpeg.tar.xz|npz:../shared/data/cifar10-mini.npz",
                        val_fraction=0.02, **_CIFAR_DATA),
        extractor=ExtractorConfig(model="preact-resnet18", trainer="fgsm", lr_schedule="cyclic", epochs=15,
                                  batch_size=128, lr=0.2, val_attack_steps=10, val_examples=500),
        budgets=tuple(k255(k) for k in range(0, 9, 2)),
        merger=MergerConfig(eps=k255(8), epochs=2, attack_steps=5, lr_drop_epoch=1),
        evaluation=EvalConfig(eps=k255(8), n_examples=1000, budgets=tuple(k255(k) for k in (0, 2, 4, 8, 12, 16))),
        alphas=(0.0, 0.5, 1.0),
        subsets=("selected", "all"),
        default_subset="selected",
        ablation_budget_range=(k255(3), k255(8)),
        large_model=None,
        tsne_examples=1000,
    ),
    # the paper, WRN-28-10, authors' schedule: a GPU job
    "paper-cifar10": Preset(
        name="paper-cifar10",
        data=DataConfig(spec="cifar10", val_fraction=0.02, **_CIFAR_DATA),
        extractor=ExtractorConfig(model="wrn-28-10", step_size=k255(2), attack_bn="train"),  # the authors' BN mode
        budgets=tuple(k255(k) for k in range(0, 10)),
        merger=MergerConfig(),
        evaluation=EvalConfig(budgets=tuple(k255(k) for k in (0, 2, 4, 6, 8, 10, 12, 16))),
        subsets=("100000001", "100010001", "101010101", "111111111", "0001111110"),
        default_subset="selected",
        ablation_budget_range=(k255(3), k255(8)),
        large_model="wrn-28-30",
        tsne_examples=2000,
    ),
}
# section 2.2's "models enhanced by other defense methods": five RobustBench CIFAR-10 Linf models at 8/255 (a
# standard WRN-28-10, fast AT, PGD-AT twice, TRADES; none uses extra data) stacked by a merger trained 5 epochs
# against PGD-10 through all five. A GPU job: `afs-kit add-extractor --preset zoo-cifar10 --model-dir DIR
# [--download]`, then train-merger and `evaluate --model afs --model outside` (paired tests on the same images).
PRESETS["zoo-cifar10"] = dataclasses.replace(
    PRESETS["paper-cifar10"], name="zoo-cifar10", budgets=(), subsets=("all",), default_subset="all",
    alphas=(0.0, 0.5, 1.0), ablation_budget_range=None, large_model=None, merger=MergerConfig(lr_drop_epoch=4),
    zoo=("Standard", "Wong2020Fast", "Engstrom2019Robustness", "Zhang2019Theoretically", "Rice2020Overfitting"))
# CIFAR-100 with the authors' CIFAR-10 recipe unchanged (table 5), only the data differ
PRESETS["paper-cifar100"] = dataclasses.replace(
    PRESETS["paper-cifar10"], name="paper-cifar100",
    data=dataclasses.replace(PRESETS["paper-cifar10"].data, spec="cifar100"))


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise BadInput(f"unknown preset={name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def override(preset: Preset, assignments: list[str] | tuple[str, ...]) -> Preset:
    """Apply `section.field=value` (or a top-level `field=value`) overrides to a preset."""
    for item in assignments:
        if "=" not in item:
            raise BadInput(f"override must look like section.field=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        section, _, fname = key.rpartition(".")
        if section and (section not in {f.name for f in dataclasses.fields(preset)}
                        or not dataclasses.is_dataclass(getattr(preset, section))):
            raise BadInput(f"unknown config section in override {key!r}; sections: data, extractor, merger, evaluation")
        target = getattr(preset, section) if section else preset
        hints = typing.get_type_hints(type(target))
        if fname not in hints:
            raise BadInput(f"unknown config field {key!r}; {type(target).__name__} has: {', '.join(hints)}")
        value = parse_value(text, hints[fname], key)
        new = dataclasses.replace(target, **{fname: value})
        preset = dataclasses.replace(preset, **{section: new}) if section else new
    validate_preset(preset)
    return preset


def _check_unit(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise BadInput(f"{name} must be in [0, 1], got {name}={value!r}")


def validate_preset(p: Preset) -> None:
    """Every check that can be made before anything is written."""
    if not p.budgets and not p.zoo:
        raise BadInput("budgets must list at least one training budget (or zoo a RobustBench model), got budgets=()")
    for eps in p.budgets:
        _check_unit(eps, "eps")
    if len(set(p.budgets)) != len(p.budgets):
        raise BadInput(f"budgets must be distinct, got budgets={p.budgets}")
    for a in p.alphas:
        _check_unit(a, "alpha")
    e, m, v = p.extractor, p.merger, p.evaluation
    check_choice("trainer", e.trainer, TRAINERS)
    if e.attack_bn not in ATTACK_BN:
        raise BadInput(f"unknown extractor.attack_bn={e.attack_bn!r}; known: {', '.join(ATTACK_BN)}")
    if e.lr_schedule not in LR_SCHEDULES:
        raise BadInput(f"unknown extractor.lr_schedule={e.lr_schedule!r}; known: {', '.join(LR_SCHEDULES)}")
    check_choice("merger.init", m.init, MERGER_INITS)
    check_choice("merger.keep", m.keep, MERGER_KEEPS)
    check_int("merger.min_steps", m.min_steps, 0)
    check_int("merger.val_attack_steps", m.val_attack_steps, 1)
    if m.val_examples is not None:
        check_int("merger.val_examples", m.val_examples, 1)
    if m.mix not in MIXES:
        raise BadInput(f"unknown mix={m.mix!r}; known: {', '.join(MIXES)}")
    if v.sanity_strength not in SANITY_STRENGTHS:
        raise BadInput(f"unknown evaluation.sanity_strength={v.sanity_strength!r}; "
                       f"known: {', '.join(SANITY_STRENGTHS)}")
    for a in v.attacks:
        check_choice("attack", a, ATTACKS)
    if v.sanity_examples is not None:
        check_int("evaluation.sanity_examples", v.sanity_examples, 1)
    check_int("evaluation.chunk_size", v.chunk_size, 1)
    _check_unit(m.alpha, "alpha")
    for name, value in (("merger.eps", m.eps), ("evaluation.eps", v.eps), ("data.val_fraction", p.data.val_fraction)):
        _check_unit(value, name)
    if e.eps_range is not None:
        lo, hi = e.eps_range
        if not (0 <= lo <= hi <= 1):
            raise BadInput(f"eps_range must satisfy 0 <= lo <= hi <= 1, got eps_range={e.eps_range}")
    for name, value in (("extractor.epochs", e.epochs), ("extractor.batch_size", e.batch_size),
                        ("extractor.attack_steps", e.attack_steps), ("merger.epochs", m.epochs),
                        ("merger.batch_size", m.batch_size), ("merger.attack_steps", m.attack_steps),
                        ("evaluation.batch_size", v.batch_size), ("extractor.val_attack_steps", e.val_attack_steps)):
        if value < 1:
            raise BadInput(f"{name} must be >= 1, got {name}={value}")
    for name, value in (("extractor.step_size", e.step_size), ("merger.step_size", m.step_size),
                        ("evaluation.step_size", v.step_size)):
        if value is not None and value <= 0:
            raise BadInput(f"{name} (the PGD step size) must be > 0, got {name}={value}")
    if v.n_examples is not None and v.n_examples < 1:
        raise BadInput(f"evaluation.n_examples must be >= 1 or None, got evaluation.n_examples={v.n_examples}")
    if v.aa_examples is not None and v.aa_examples < 1:
        raise BadInput(f"evaluation.aa_examples must be >= 1 or None, got evaluation.aa_examples={v.aa_examples}")
    for name, value in (("extractor.lr", e.lr), ("merger.lr", m.lr)):
        if value <= 0:
            raise BadInput(f"{name} must be > 0, got {name}={value}")


def step_size(eps: float, step: float | None) -> float:
    """The PGD step: the given one, else a quarter of the budget (2/255 at 8/255)."""
    return step if step is not None else eps / 4


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# Cache keys that survive new fields. A key hashes the fields each class had when keys were introduced
# (listed here by hand, so a field added later is NOT in them) plus any later field only where its value differs
# from its default: a new field left at its default keeps every old key, so it orphans no run. These tuples
# must never change; tests/test_cache_keys.py pins the keys of every preset.
_KEYED_FIELDS: dict[type, tuple[str, ...]] = {
    DataConfig: ("spec", "root", "val_fraction", "crop_padding", "flip", "train_limit"),
    ExtractorConfig: ("model", "trainer", "eps", "eps_range", "attack_steps", "step_size", "trades_beta",
                      "attack_bn", "epochs", "batch_size", "lr", "momentum", "weight_decay", "lr_schedule",
                      "lr_milestones", "lr_gamma", "val_attack_steps", "val_examples", "seed", "precision"),
    MergerConfig: ("alpha", "mix", "eps", "attack_steps", "step_size", "epochs", "batch_size", "lr",
                   "normalize_lr", "lr_drop_epoch", "momentum", "weight_decay", "seed", "precision", "init",
                   "min_steps", "val_attack_steps", "val_examples", "standardize", "keep"),
    EvalConfig: ("eps", "step_size", "attacks", "n_examples", "aa_examples", "batch_size", "budgets", "seed",
                 "precision", "sanity_strength", "sanity_examples", "aa_attacks", "chunk_size"),
    Preset: ("name", "data", "extractor", "budgets", "merger", "evaluation", "alphas", "subsets",
             "default_subset", "ablation_budget_range", "large_model", "tsne_examples", "delta_z_examples", "zoo"),
}
# What a config computes with the same settings: bump a class's version when its code makes something else from
# them (a new default behaviour), so a result made the old way is never reused as the new. Version 1 adds
# nothing to the key (today's keys); a later one enters it as "__recipe__": n.
_RECIPE_VERSIONS: dict[type, int] = {DataConfig: 1, ExtractorConfig: 1, MergerConfig: 1, EvalConfig: 1, Preset: 1}


def _class_entry(table: dict, cls: type):
    """The entry of `cls` or of its nearest listed base (a subclass keys as its parent); None if none."""
    for klass in cls.__mro__:
        if klass in table:
            return table[klass]
    return None


def _key_value(value):
    """`dataclasses.asdict`'s value for the JSON of a key, with each dataclass as `_key_fields` of it."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _key_fields(value)
    if isinstance(value, (list, tuple)):
        return [_key_value(v) for v in value]  # JSON writes tuples as lists, as asdict's did
    if isinstance(value, dict):
        return {k: _key_value(v) for k, v in value.items()}
    return value


def _key_json(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _key_fields(cfg) -> dict:
    """The dict a config's key hashes: its keyed fields, a later field only where it differs from its default
    (compared as the key's JSON, so 1 and 1.0 or True differ as they would in the key), and "__recipe__" above
    version 1. A dataclass not in _KEYED_FIELDS (a test's own) keys all its fields, as asdict."""
    if isinstance(cfg, type):
        raise TypeError(f"config_hash takes config instances, got the class {cfg.__name__}")  # as asdict
    keyed = _class_entry(_KEYED_FIELDS, type(cfg))
    out = {}
    for f in dataclasses.fields(cfg):
        value = _key_value(getattr(cfg, f.name))
        if keyed is not None and f.name not in keyed:
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:  # no default to stay silent at: always keyed
                default = dataclasses.MISSING
            if default is not dataclasses.MISSING and _key_json(value) == _key_json(_key_value(default)):
                continue
        out[f.name] = value
    version = _class_entry(_RECIPE_VERSIONS, type(cfg)) or 1
    if version != 1:
        out["__recipe__"] = version
    return out


def config_hash(*parts) -> str:
    """A short stable hash of configs (dataclasses or plain containers), keying what a stage made.

    A dataclass part hashes as `_key_fields` (keys survive new fields left at their defaults; a recipe version
    bump changes them); a plain part hashes as it is, as before."""
    blob = _key_json([_key_fields(p) if dataclasses.is_dataclass(p) else p for p in parts])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# what `budget_name(0)` was before budget 0 lost its unit (runs made then keep their folders)
LEGACY_ZERO_NAME = "eps-0-255"


def budget_name(eps: float) -> str:
    """The extractor's folder and record name: `eps-8-255` for multiples of 1/255, else `eps-0.1000`; budget 0
    is `eps-0` in either unit (it was `eps-0-255`, which read oddly beside `eps-0.1000`)."""
    k = eps * 255
    if k == 0:
        return "eps-0"
    if abs(k - round(k)) < 1e-6 and k <= 32:
        return f"eps-{round(k)}-255"
    return f"eps-{eps:.4f}"


def budget_label(eps: float) -> str:
    """An extractor's name in every table and figure: its training budget, "eps=8/255" or "eps=0.1"."""
    return f"eps={format_budget(eps)}"


def format_budget(eps: float) -> str:
    k = eps * 255
    if abs(k - round(k)) < 1e-6 and eps != 0 and eps < 0.2:
        return f"{round(k)}/255"
    return f"{eps:g}"



def _from_fields(cls, values: dict):
    """Rebuild a dataclass from JSON, where tuples came back as lists."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise BadInput(f"unknown {cls.__name__} fields {sorted(unknown)}")
    out = {}
    for k, v in values.items():
        if isinstance(v, list):
            v = tuple(v)
        sub = hints[k]
        if dataclasses.is_dataclass(sub) and isinstance(v, dict):
            v = _from_fields(sub, v)
        out[k] = v
    return cls(**out)


def preset_from_dict(values: dict) -> Preset:
    return _from_fields(Preset, values)
