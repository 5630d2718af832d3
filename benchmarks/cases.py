"""The six benchmark cases: the kit's own code path against the loop it replaces, same work, one run.

Each case returns a dict: name, kit_s, reference_s, ratio (reference_s / kit_s), the scores it compares,
kit_settings / reference_settings (equal except dtype and memory layout), target and meets_target.
One warm-up iteration per side is run and discarded before anything is timed.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from afs_kit.attacks.methods import autoattack, pgd
from afs_kit.config import DataConfig, ExtractorConfig, MergerConfig
from afs_kit.core.device import exact_fp32
from afs_kit.data.batches import channel_stats, to_float
from afs_kit.data.dataset import Dataset
from afs_kit.data.datasets import load_dataset
from afs_kit.explain.analysis import trustworthiness_score, tsne_embedding
from afs_kit.models.nets import build_model, model_from_checkpoint
from afs_kit.models.stack import AFSModel, FeatureStack, LinearMerger
from afs_kit.train.extractors import train_epoch, train_extractor
from afs_kit.train.merger import train_merger_epoch

from . import references as ref

EPS, STEP = 8 / 255, 2 / 255
# settings that may differ between the sides; everything else must be equal
MAY_DIFFER = {"implementation", "dtype", "memory_format"}
FLOP_IMAGES = 4  # images of the step whose FLOPs are counted (then scaled to the batch)
WARMUP_SHARE = 4  # the training cases' warm-up step runs on batch / 4 images: it warms the same code


@dataclasses.dataclass(frozen=True)
class Sizes:
    extractor_images: int        # training images of the timed extractor epoch (`model`, PGD-10)
    extractor_batch: int         # SGD batch of the extractor epoch
    merger_images: int           # training images of the timed merger epoch
    merger_batch: int            # merger batch (alpha 0.5: half clean, half PGD-10)
    merger_extractors: int       # `model` extractors in the stack
    pgd_images: int              # images of the timed PGD-20 call (one batch)
    pgd_accuracy_images: int     # test images on which the PGD robust accuracies are compared
    timed_repeats: int           # timed repetitions of the short cases (PGD); the median is reported
    aa_images: int               # images of the timed AutoAttack call
    tsne_points: int             # stacked feature vectors embedded by t-SNE
    cnn_epochs: int              # epochs of the small CNN the attack cases run on (FGSM-AT, 8/255)
    model: str = "wrn-16-4"      # the extractor network of the training and merger cases


QUICK = Sizes(extractor_images=256, extractor_batch=128, merger_images=128, merger_batch=64, merger_extractors=3,
              pgd_images=64, pgd_accuracy_images=500, timed_repeats=3, aa_images=32, tsne_points=2000,
              cnn_epochs=5)
FULL = Sizes(extractor_images=1024, extractor_batch=128, merger_images=500, merger_batch=100, merger_extractors=3,
             pgd_images=256, pgd_accuracy_images=1000, timed_repeats=5, aa_images=100, tsne_points=5000,
             cnn_epochs=5)
# on a GPU, the paper's scale: WRN-28-10 extractors, six in the merger's stack, AutoAttack on 1,000 images
# (not yet measured: no GPU was at hand when these were written)
GPU_QUICK = Sizes(extractor_images=512, extractor_batch=128, merger_images=500, merger_batch=100, merger_extractors=6,
                  pgd_images=500, pgd_accuracy_images=1000, timed_repeats=3, aa_images=1000, tsne_points=5000,
                  cnn_epochs=5, model="wrn-28-10")
GPU_FULL = dataclasses.replace(GPU_QUICK, extractor_images=2048, merger_images=2000, timed_repeats=5)

TARGETS = {  # ratio = reference_s / kit_s must reach this
    "extractor_epoch": 3.0,
    "merger_epoch": 3.0,
    "pgd_fp32_vs_torchattacks": 1.3,  # CPU: channels-last inside the kit's networks (1.62x on 2 Intel Xeon cores)
    "pgd_bf16_vs_torchattacks": 3.0,
    "autoattack_vs_pyautoattack": 1 / 1.1,
    "tsne_vs_sklearn": 3.0,  # 2.5 in --quick
}


def default_data_path() -> Path:
    env = os.environ.get("AFS_BENCH_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-mini.npz"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def _settings(implementation: str, *, model: str, batch: int | None, n_examples: int, steps: int | None, dtype: str,
              memory_format: str, ctx: Context, merger_mix: str | None = None, **extra) -> dict:
    return {"implementation": implementation, "model": model, "batch": batch, "n_examples": n_examples,
            "steps": steps, "dtype": dtype, "memory_format": memory_format, "threads": ctx.threads,
            "device": str(ctx.device), "merger_mix": merger_mix, **extra}


def _check_same_work(kit: dict, reference: dict) -> None:
    """The benchmark's own invariant: both sides do the same work (dtype and layout may differ)."""
    a = {k: v for k, v in kit.items() if k not in MAY_DIFFER}
    b = {k: v for k, v in reference.items() if k not in MAY_DIFFER}
    if a != b:
        raise RuntimeError(f"kit and reference settings differ beyond dtype/layout: {a} vs {b}")


def _result(name: str, kit_s: float, reference_s: float, kit_settings: dict, reference_settings: dict,
            target: float, extra_ok: bool = True, **fields) -> dict:
    _check_same_work(kit_settings, reference_settings)
    ratio = reference_s / kit_s
    return {"name": name, "kit_s": round(kit_s, 4), "reference_s": round(reference_s, 4), "ratio": round(ratio, 3),
            "target": round(target, 4), "meets_target": bool(ratio >= target and extra_ok), **fields,
            "kit_settings": kit_settings, "reference_settings": reference_settings}


class Context:
    """What the cases share: threads, device, the CIFAR-10 files, and the small CNNs (trained once)."""

    def __init__(self, sizes: Sizes, quick: bool, threads: int, device: torch.device, data_path: Path):
        self.sizes, self.quick, self.threads, self.device = sizes, quick, threads, device
        if not data_path.is_file():
            raise FileNotFoundError(f"the benchmarks need the CIFAR-10 file {data_path} (set AFS_BENCH_DATA)")
        self.data: Dataset = load_dataset(f"npz:{data_path}")
        self.workers = min(2, os.cpu_count() or 1)  # the authors' DataLoader workers on this machine
        self._cnns: dict[float, nn.Module] = {}
        self.setup_s = 0.0

    def cnn(self, eps: float) -> nn.Module:
        """cnn-small trained through the kit on the 4,000 CIFAR-10 training images (FGSM-AT at eps > 0)."""
        if eps not in self._cnns:
            epochs = self.sizes.cnn_epochs if eps > 0 else 2
            cfg = ExtractorConfig(model="cnn-small", trainer="fgsm", eps=eps, epochs=epochs, batch_size=128,
                                  lr=0.05, lr_milestones=(epochs - 1,), val_attack_steps=3, val_examples=200,
                                  precision="bf16", seed=0)
            data_cfg = DataConfig(spec=self.data.name, crop_padding=4, flip=True, val_fraction=0.05)
            t = time.perf_counter()
            with tempfile.TemporaryDirectory() as out:
                ckpt = train_extractor(cfg, self.data, data_cfg, out, device=str(self.device), progress=False)
            self.setup_s += time.perf_counter() - t
            model = model_from_checkpoint(ckpt, self.device)
            self._cnns[eps] = model
        return self._cnns[eps]


# ------------------------------------------------------------------------------------ FLOP/s

def matmul_peak_gflops(dtype: torch.dtype, device: torch.device, n: int = 3072, repeats: int = 3) -> float:
    """Achieved GFLOP/s of a big square matmul: the practical peak of this device for `dtype`."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b, device)[0] for _ in range(repeats))
    return 2 * n**3 / best / 1e9


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker, whose backward hooks break `autograd.grad`
    (which PGD uses); the total is all we need."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def _count_flops(fn) -> int:
    """FLOPs of fn() as torch.utils.flop_counter counts them (matmuls and convolutions, forward and backward)."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        fn()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------ extractor epoch

def extractor_epoch(ctx: Context) -> dict:
    s, dev = ctx.sizes, ctx.device
    n, batch = s.extractor_images, s.extractor_batch
    x_u8, y = ctx.data.x_train[:n], ctx.data.y_train[:n]
    mean, std = channel_stats(x_u8)
    cfg = ExtractorConfig(model=ctx.sizes.model, trainer="pgd", eps=EPS, attack_steps=10, step_size=STEP, batch_size=batch,
                          lr=0.1, momentum=0.9, weight_decay=5e-4, precision="bf16", seed=0)
    data_cfg = DataConfig(spec=ctx.data.name, crop_padding=4, flip=True)

    def fresh(fmt):
        torch.manual_seed(0)  # the same initial weights on both sides
        model = build_model(ctx.sizes.model, ctx.data.num_classes, mean=mean, std=std).to(dev, memory_format=fmt)
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    # kit: uint8 tensors on the device, batched augmentation, bf16 autocast, channels_last
    model, opt = fresh(torch.channels_last)
    order_gen, noise_gen = torch.Generator().manual_seed(0), torch.Generator(device=dev).manual_seed(1)
    xk, yk = x_u8.to(dev), y.to(dev)

    def kit_run(xs, ys):
        return train_epoch(model, opt, xs, ys, cfg, data_cfg, dev, order_gen, noise_gen).item()

    warm = batch // WARMUP_SHARE
    kit_run(xk[:warm], yk[:warm])  # warm-up: one step, discarded
    kit_s, kit_loss = _timed(lambda: kit_run(xk, yk), dev)
    # FLOPs grow linearly with the batch: count one step on a few images and scale
    kit_flops = _count_flops(lambda: kit_run(xk[:FLOP_IMAGES], yk[:FLOP_IMAGES])) * batch // FLOP_IMAGES

    # reference: the authors' loop, NCHW throughout
    ref_net, ref_opt = fresh(torch.contiguous_format)
    ref_model = ref.PlainLayout(ref_net)
    loader = ref.authors_loader(x_u8, y, batch, ctx.workers, seed=0)
    warm_loader = ref.authors_loader(x_u8[:warm], y[:warm], warm, ctx.workers, seed=0)
    ref.authors_extractor_epoch(ref_model, warm_loader, ref_opt, EPS, STEP, 10, dev)  # warm-up: one step

    def ref_run():
        return ref.authors_extractor_epoch(ref_model, loader, ref_opt, EPS, STEP, 10, dev)

    ref_s, ref_loss = _timed(ref_run, dev)
    small = ref.authors_loader(x_u8[:FLOP_IMAGES], y[:FLOP_IMAGES], FLOP_IMAGES, 0, seed=0)
    ref_flops = _count_flops(lambda: ref.authors_extractor_epoch(ref_model, small, ref_opt, EPS, STEP, 10, dev)) \
        * batch // FLOP_IMAGES

    steps = -(-n // batch)
    common = dict(model=ctx.sizes.model, batch=batch, n_examples=n, steps=10, ctx=ctx, attack="PGD-10 step 2/255 eps 8/255",
                  augmentation="crop 4 + flip")
    kit_set = _settings("afs_kit.train.extractors.train_epoch", dtype="bf16", memory_format="channels_last", **common)
    ref_set = _settings("authors' loop: PIL transforms + DataLoader(num_workers="
                        f"{ctx.workers}) + PGD with loss.backward()", dtype="fp32", memory_format="contiguous",
                        **common)
    bf16_peak = matmul_peak_gflops(torch.bfloat16, dev)
    fp32_peak = matmul_peak_gflops(torch.float32, dev)
    kit_gflops = kit_flops / (kit_s / steps) / 1e9
    return _result("extractor_epoch", kit_s, ref_s, kit_set, ref_set, TARGETS["extractor_epoch"],
                   kit_loss=round(kit_loss, 4), reference_loss=round(ref_loss, 4), compile_s=None,
                   kit_step_gflop=round(kit_flops / 1e9, 1), reference_step_gflop=round(ref_flops / 1e9, 1),
                   kit_gflops=round(kit_gflops, 1), reference_gflops=round(ref_flops / (ref_s / steps) / 1e9, 1),
                   bf16_matmul_peak_gflops=round(bf16_peak, 1), fp32_matmul_peak_gflops=round(fp32_peak, 1),
                   kit_fraction_of_bf16_peak=round(kit_gflops / bf16_peak, 3))


# ------------------------------------------------------------------------------------ merger epoch

def _calibrated_wrn(seed: int, x: torch.Tensor, mean, std, num_classes: int, name: str = "wrn-16-4") -> nn.Module:
    """A WRN (`name`) with its BatchNorm statistics set on real images (timing only; the weights stay random).

    Without it the eval-mode BatchNorm of an untrained net lets activations drift far from 1, which
    would time arithmetic on unrealistic numbers.
    """
    torch.manual_seed(seed)
    model = build_model(name, num_classes, mean=mean, std=std)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None  # cumulative average: one batch sets the statistics
    with torch.no_grad():
        model.train()(x)
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def merger_epoch(ctx: Context) -> dict:
    s, dev = ctx.sizes, ctx.device
    n, batch, k = s.merger_images, s.merger_batch, s.merger_extractors
    x_u8, y = ctx.data.x_train[:n], ctx.data.y_train[:n]
    mean, std = channel_stats(ctx.data.x_train)
    calib = to_float(ctx.data.x_train[-128:])
    extractors = [_calibrated_wrn(i, calib, mean, std, ctx.data.num_classes, ctx.sizes.model) for i in range(k)]
    num_classes = ctx.data.num_classes
    cfg = MergerConfig(alpha=0.5, mix="split", eps=EPS, attack_steps=10, step_size=STEP, batch_size=batch, lr=0.1,
                       momentum=0.9, weight_decay=5e-4, precision="bf16", seed=0)
    data_cfg = DataConfig(spec=ctx.data.name, crop_padding=4, flip=True)

    # kit: frozen FeatureStack (eval, no parameter gradients), bf16, channels_last, split mix as the authors
    stack = FeatureStack([copy.deepcopy(m) for m in extractors]).to(dev, memory_format=torch.channels_last)
    torch.manual_seed(0)
    merger = LinearMerger(stack.feature_dim, num_classes).to(dev)
    model = AFSModel(stack, merger)
    opt = torch.optim.SGD(merger.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    order_gen, noise_gen = torch.Generator().manual_seed(0), torch.Generator(device=dev).manual_seed(1)
    xk, yk = x_u8.to(dev), y.to(dev)

    def kit_run(xs, ys):
        return train_merger_epoch(model, opt, xs, ys, cfg, data_cfg, dev, order_gen, noise_gen).item()

    warm = batch // WARMUP_SHARE
    kit_run(xk[:warm], yk[:warm])  # warm-up: one step, discarded
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    kit_s, kit_loss = _timed(lambda: kit_run(xk, yk), dev)
    peak_mib = round(torch.cuda.max_memory_allocated(dev) / 2**20) if dev.type == "cuda" else None

    # reference: the authors' merger loop over the same extractors and the same initial merger
    ref_model = ref.AuthorsStack([ref.PlainLayout(copy.deepcopy(m)) for m in extractors], num_classes)
    torch.manual_seed(0)
    ref_model.merger = nn.Linear(stack.feature_dim, num_classes)
    ref_model = ref_model.to(dev)
    ref_opt = torch.optim.SGD(ref_model.merger.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loader = ref.authors_loader(x_u8, y, batch, ctx.workers, seed=0)
    warm_loader = ref.authors_loader(x_u8[:warm], y[:warm], warm, ctx.workers, seed=0)
    ref.authors_merger_epoch(ref_model, warm_loader, ref_opt, 0.5, EPS, STEP, 10, dev)  # warm-up: one step

    def ref_run():
        return ref.authors_merger_epoch(ref_model, loader, ref_opt, 0.5, EPS, STEP, 10, dev)

    ref_s, ref_loss = _timed(ref_run, dev)

    common = dict(model=f"{k} x {ctx.sizes.model} + linear merger", batch=batch, n_examples=n, steps=10, ctx=ctx,
                  merger_mix="split, alpha 0.5 (first half clean, rest PGD-10 against the whole stack)",
                  augmentation="crop 4 + flip")
    kit_set = _settings("afs_kit.train.merger.train_merger_epoch", dtype="bf16", memory_format="channels_last", **common)
    ref_set = _settings("authors' merger loop: PIL transforms + DataLoader, extractors eval with requires_grad",
                        dtype="fp32", memory_format="contiguous", **common)
    return _result("merger_epoch", kit_s, ref_s, kit_set, ref_set, TARGETS["merger_epoch"],
                   kit_loss=round(kit_loss, 4), reference_loss=round(ref_loss, 4), compile_s=None,
                   kit_peak_gpu_memory_mib=peak_mib)


# ------------------------------------------------------------------------------------ PGD-20

def _robust_accuracy(model, attack, x, y, batch: int = 250) -> float:
    """Percent of x classified correctly after `attack` (fp32 forward on the adversarial images)."""
    correct = 0
    for i in range(0, len(y), batch):
        x_adv = attack(x[i:i + batch], y[i:i + batch])
        with torch.no_grad():
            correct += int((model(x_adv.float()).argmax(1) == y[i:i + batch]).sum())
    return 100.0 * correct / len(y)


def pgd_cases(ctx: Context) -> list[dict]:
    """pgd_fp32_vs_torchattacks and pgd_bf16_vs_torchattacks on the adversarially trained cnn-small."""
    s, dev = ctx.sizes, ctx.device
    model = ctx.cnn(EPS)
    plain = ref.PlainLayout(model)  # torchattacks on the network as users run theirs: NCHW
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = to_float(ctx.data.x_test[:s.pgd_images]).to(dev)
    y = ctx.data.y_test[:s.pgd_images].to(dev)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    gen = torch.Generator(device=dev).manual_seed(0)

    def ieee(fn):  # the fp32 sides in IEEE fp32 alike (TF32 off on CUDA, where cuDNN would allow it)
        def run(xs, ys):
            with exact_fp32("fp32"):
                return fn(xs, ys)
        return run

    runs = {
        "reference": ieee(lambda xs, ys: ref.torchattacks_pgd(plain, xs, ys, EPS, STEP, 20)),
        "kit_fp32": ieee(lambda xs, ys: pgd(model, xs, ys, EPS, STEP, 20, precision="fp32", generator=gen)),
        "kit_bf16": lambda xs, ys: pgd(model_cl, xs.contiguous(memory_format=torch.channels_last), ys, EPS, STEP, 20,
                                       precision="bf16", generator=gen),
    }
    inputs = {"reference": x, "kit_fp32": x, "kit_bf16": x_cl}
    for name, run in runs.items():  # warm-up: one call per side, discarded
        run(inputs[name], y)
    times = {name: [] for name in runs}
    for _ in range(s.timed_repeats):  # interleaved, so drifting machine load hits all sides alike
        for name, run in runs.items():
            times[name].append(_timed(lambda: run(inputs[name], y), dev)[0])
    med = {name: statistics.median(ts) for name, ts in times.items()}

    # robust accuracy on more (lossless) test images than are timed, so that 1 point is 10 examples
    n_acc = min(s.pgd_accuracy_images, len(ctx.data.y_test))
    xa, ya = to_float(ctx.data.x_test[:n_acc]).to(dev), ctx.data.y_test[:n_acc].to(dev)
    with torch.no_grad():
        clean = 100.0 * float((model(xa).argmax(1) == ya).float().mean())
    acc = {name: _robust_accuracy(model, run, xa, ya) for name, run in runs.items()}

    common = dict(model="cnn-small (FGSM-AT 8/255 on CIFAR-10)", batch=s.pgd_images, n_examples=s.pgd_images,
                  steps=20, ctx=ctx, attack="PGD-20 Linf eps 8/255 step 2/255, uniform random start",
                  accuracy_examples=n_acc)
    ref_set = _settings("torchattacks.PGD", dtype="fp32", memory_format="contiguous", **common)
    kit_layout = "channels_last inside the network" if dev.type == "cpu" else "contiguous"
    fp32 = _result("pgd_fp32_vs_torchattacks", med["kit_fp32"], med["reference"],
                   _settings("afs_kit.attacks.pgd", dtype="fp32", memory_format=kit_layout, **common), ref_set,
                   1.0 if dev.type == "cuda" else TARGETS["pgd_fp32_vs_torchattacks"], clean_acc=round(clean, 2), kit_acc=acc["kit_fp32"],
                   reference_acc=acc["reference"], kit_times_s=times["kit_fp32"], reference_times_s=times["reference"],
                   compile_s=None)
    diff = abs(acc["kit_bf16"] - acc["reference"])
    bf16 = _result("pgd_bf16_vs_torchattacks", med["kit_bf16"], med["reference"],
                   _settings("afs_kit.attacks.pgd(precision='bf16')", dtype="bf16", memory_format="channels_last",
                             **common), ref_set,
                   TARGETS["pgd_bf16_vs_torchattacks"], extra_ok=diff <= 1.0, clean_acc=round(clean, 2),
                   kit_acc=acc["kit_bf16"], reference_acc=acc["reference"], kit_fp32_acc=acc["kit_fp32"],
                   acc_diff_points=round(diff, 2), acc_target="within 1 point of the fp32 figure",
                   kit_times_s=times["kit_bf16"], reference_times_s=times["reference"], compile_s=None)
    return [fp32, bf16]


# ------------------------------------------------------------------------------------ AutoAttack

def autoattack_case(ctx: Context) -> dict:
    s, dev = ctx.sizes, ctx.device
    model = ctx.cnn(EPS)
    x = to_float(ctx.data.x_test[:s.aa_images]).to(dev)
    y = ctx.data.y_test[:s.aa_images].to(dev)
    bs = s.aa_images

    def kit_run(xs, ys):
        return autoattack(model, xs, ys, EPS, version="standard", seed=0, batch_size=bs)[0]

    def ref_run(xs, ys):
        return ref.pyautoattack_flags(model, xs, ys, EPS, version="standard", seed=0, batch_size=bs, device=dev)

    # warm-up: the same call on one image per side (the call path, checks and allocations); a full
    # warm-up would double the case's minutes
    kit_run(x[:1], y[:1])
    ref_run(x[:1], y[:1])
    ref_s, ref_flags = _timed(lambda: ref_run(x, y), dev)
    kit_s, kit_flags = _timed(lambda: kit_run(x, y), dev)
    identical = bool(torch.equal(kit_flags.cpu(), ref_flags.cpu()))
    common = dict(model="cnn-small (FGSM-AT 8/255 on CIFAR-10)", batch=bs, n_examples=s.aa_images, steps=None,
                  ctx=ctx, attack="AutoAttack standard, Linf eps 8/255, seed 0")
    return _result("autoattack_vs_pyautoattack", kit_s, ref_s,
                   _settings("afs_kit.attacks.autoattack", dtype="fp32", memory_format="contiguous", **common),
                   _settings("pyautoattack.AutoAttack.run_standard_evaluation", dtype="fp32",
                             memory_format="contiguous", **common),
                   TARGETS["autoattack_vs_pyautoattack"], extra_ok=identical, flags_identical=identical,
                   kit_acc=100.0 * float(kit_flags.float().mean()),
                   reference_acc=100.0 * float(ref_flags.float().mean()), compile_s=None)


# ------------------------------------------------------------------------------------ t-SNE

def tsne_case(ctx: Context) -> dict:
    s, dev = ctx.sizes, ctx.device
    stack = FeatureStack([ctx.cnn(0.0), ctx.cnn(EPS)]).to(dev)
    images = torch.cat([ctx.data.x_train, ctx.data.x_test])[:s.tsne_points]
    with torch.no_grad():
        feats = torch.cat([stack(to_float(images[i:i + 500]).to(dev)) for i in range(0, len(images), 500)])
    feats = feats.float().cpu().numpy()
    threads = ctx.threads

    def kit_run(f):
        return tsne_embedding(f, seed=0, n_jobs=threads)

    def ref_run(f):
        return ref.sklearn_tsne(f, seed=0, n_jobs=threads)

    kit_run(feats[:500])  # warm-up on a slice per side
    ref_run(feats[:500])
    ref_s, ref_emb = _timed(lambda: ref_run(feats), dev)
    kit_s, kit_emb = _timed(lambda: kit_run(feats), dev)
    kit_tw = trustworthiness_score(feats, kit_emb)
    ref_tw = trustworthiness_score(feats, ref_emb)
    target = 2.5 if ctx.quick else TARGETS["tsne_vs_sklearn"]
    common = dict(model=f"features of cnn-small x2 stack (eps 0 and 8/255), dim {feats.shape[1]}", batch=None,
                  n_examples=s.tsne_points, steps=None, ctx=ctx, perplexity=30, seed=0)
    return _result("tsne_vs_sklearn", kit_s, ref_s,
                   _settings("afs_kit.explain.analysis.tsne_embedding (openTSNE, PCA-50, 125+250 iterations)",
                             dtype="float32", memory_format="numpy", **common),
                   _settings("sklearn.manifold.TSNE (defaults, raw features)", dtype="float32", memory_format="numpy",
                             **common),
                   target, extra_ok=kit_tw >= ref_tw - 0.02, kit_trustworthiness=round(kit_tw, 4),
                   reference_trustworthiness=round(ref_tw, 4), trustworthiness_target="kit >= reference - 0.02",
                   compile_s=None)


CASES = {
    "extractor_epoch": extractor_epoch,
    "merger_epoch": merger_epoch,
    "pgd": pgd_cases,  # pgd_fp32_vs_torchattacks and pgd_bf16_vs_torchattacks
    "autoattack_vs_pyautoattack": autoattack_case,
    "tsne_vs_sklearn": tsne_case,
}


def run_cases(ctx: Context, names: list[str], log=print) -> list[dict]:
    results = []
    for name in names:
        t = time.perf_counter()
        out = CASES[name](ctx)
        for r in out if isinstance(out, list) else [out]:
            results.append(r)
            log(f"{r['name']}: kit {r['kit_s']:.2f} s, reference {r['reference_s']:.2f} s, ratio {r['ratio']:.2f}x "
                f"(target {r['target']:.2f}x: {'met' if r['meets_target'] else 'NOT met'})")
        log(f"  [{name} took {time.perf_counter() - t:.0f} s]")
    return results
