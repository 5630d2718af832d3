"""The device contract (issue 15): attacks, evaluations and the masking checks run on the model's device,
whatever device the caller's tensors are on, and hand their results back on the caller's device; fp32
attacks run with TF32 off. `make test-gpu` runs this file with AFS_TEST_DEVICE=cuda, where the model sits
on the GPU and the tensors on the CPU (and the other way round); here, on the CPU, both are the CPU.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchattacks
from conftest import copy_run, quick_cnn

from afs_kit import autoattack, build_model, evaluate, load_dataset, pgd, sanity_checks
from afs_kit.config import EvalConfig
from afs_kit.core.device import exact_fp32

DEVICE = torch.device(os.environ.get("AFS_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and DEVICE.index is None and torch.cuda.is_available():
    DEVICE = torch.device("cuda", torch.cuda.current_device())  # as tensors report it: cuda != cuda:0
OTHER = torch.device("cpu") if DEVICE.type == "cuda" else DEVICE  # where the caller's tensors live
README = Path(__file__).resolve().parents[2] / "README.md"
EPS, ALPHA = 0.1, 0.025

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                 reason="AFS_TEST_DEVICE=cuda but CUDA is not available")]


@pytest.fixture(scope="module")
def model_and_data():
    """cnn-tiny after 150 SGD steps on digits, on DEVICE; 64 test digits on the caller's device."""
    data = load_dataset("digits")
    net = quick_cnn(data)
    return net.to(DEVICE), data.x_test[:64].float().div(255).to(OTHER), data.y_test[:64].to(OTHER)


def test_pgd_runs_on_the_models_device_and_answers_on_the_callers(model_and_data):
    model, x, y = model_and_data
    here = pgd(model, x, y, EPS, ALPHA, 10, generator=torch.Generator(device=DEVICE).manual_seed(0))
    there = pgd(model, x.to(DEVICE), y.to(DEVICE), EPS, ALPHA, 10,
                generator=torch.Generator(device=DEVICE).manual_seed(0))
    assert here.device == x.device and there.device == DEVICE
    torch.testing.assert_close(here, there.to(OTHER), rtol=0, atol=0)
    assert (here - x).abs().max() <= EPS + 1e-6


def test_pgd_matches_torchattacks_on_the_device(model_and_data):
    model, x, y = model_and_data
    x, y = x.to(DEVICE), y.to(DEVICE)
    # cuDNN's default backward kernels add in no fixed order: a gradient near 0 can change sign between two
    # identical calls (on an H100 a few pixels differed by 2 steps); its deterministic kernels make both equal
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        with exact_fp32("fp32"):
            ref = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=10, random_start=False)(x, y)
        ours = pgd(model, x, y, EPS, ALPHA, 10, random_start=False)
    assert (ours - ref).abs().max() <= 1e-5


def test_autoattack_answers_on_the_callers_device_with_pyautoattacks_flags(model_and_data):
    from pyautoattack import AutoAttack

    if DEVICE == OTHER:
        pytest.skip("one device: tests/attacks/test_attacks.py makes this comparison (standard AutoAttack, 18 s)")
    model, x, y = model_and_data
    x, y = x[:24], y[:24]
    robust, x_adv = autoattack(model, x, y, EPS, version="standard", seed=0)
    assert robust.device == y.device and x_adv.device == x.device
    direct = AutoAttack(model, norm="Linf", eps=EPS, version="standard", seed=0, device=str(DEVICE))
    direct.verbose = False
    with exact_fp32("fp32"):
        x_ref, y_ref = direct.run_standard_evaluation(x.to(DEVICE), y.to(DEVICE), batch_size=500)
    assert torch.equal(robust, (y_ref == y.to(DEVICE)).to(y.device))
    torch.testing.assert_close(x_adv, x_ref.to(x.device), rtol=0, atol=0)


def test_evaluate_and_the_masking_checks_follow_the_model(model_and_data):
    model, x, y = model_and_data
    cfg = EvalConfig(eps=EPS, n_examples=32, attacks=("clean", "pgd10"), batch_size=32)
    result = evaluate(model, x, y, cfg, progress=False)
    assert {f.device for f in result["flags"].values()} == {x.device}
    assert result["metrics"]["matmul_precision"].startswith("fp32 (IEEE")
    checks = sanity_checks(model, x[:32], y[:32], EPS, result["metrics"], n=32, flags=result["flags"])
    assert set(checks["checks"]) >= {"converged", "blackbox_not_stronger", "nonzero_gradients"}


class Recorder(nn.Module):
    """Records, at each forward, whether TF32 was allowed for matmuls and cuDNN convolutions."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, set()

    def forward(self, x):
        self.seen.add((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return self.net(x)


def test_fp32_attacks_run_with_tf32_off_and_the_setting_is_restored(model_and_data):
    model, x, y = model_and_data
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    recorder = Recorder(model)
    evaluate(recorder, x, y, EvalConfig(eps=EPS, n_examples=16, attacks=("clean", "pgd10")), progress=False)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    attack_calls = recorder.seen - {before}  # the clean pass runs outside the attacks
    assert attack_calls == {(False, False)} or recorder.seen == {(False, False)}


def test_bf16_pgd_on_the_device_stays_in_the_ball(model_and_data):
    model, x, y = model_and_data
    x_adv = pgd(model.to(memory_format=torch.channels_last), x, y, EPS, ALPHA, 10, precision="bf16",
                generator=torch.Generator(device=DEVICE).manual_seed(0))
    assert x_adv.dtype == x.dtype and x_adv.device == x.device
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1


@pytest.mark.skipif(DEVICE.type != "cuda", reason="host-device synchronization exists only on CUDA")
def test_a_pgd_step_does_not_synchronize_with_the_host(model_and_data):
    model, x, y = model_and_data
    x, y = x.to(DEVICE), y.to(DEVICE)
    pgd(model, x, y, EPS, ALPHA, 1)  # warm up (one host sync before the loop reads the labels' range)
    torch.cuda.set_sync_debug_mode("error")
    try:
        from afs_kit.attacks.methods import _pgd_run
        _pgd_run(model, x, y, EPS, ALPHA, 5, "Linf", True, "ce", "fp32", None, 10)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_checked_inputs_skip_only_the_checks(model_and_data):
    model, x, y = model_and_data
    args = (model, x, y, EPS, ALPHA, 5)
    plain = pgd(*args, generator=torch.Generator(device=DEVICE).manual_seed(0))
    trusted = pgd(*args, generator=torch.Generator(device=DEVICE).manual_seed(0), checked=True)
    assert torch.equal(plain, trusted)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="host-device synchronization exists only on CUDA")
@pytest.mark.parametrize("trainer", ["pgd", "fgsm", "trades"])
def test_a_training_step_does_not_synchronize_with_the_host(model_and_data, trainer):
    from afs_kit.config import ExtractorConfig
    from afs_kit.train.extractors import training_loss

    _, x, y = model_and_data
    x, y = x.to(DEVICE), y.to(DEVICE)
    net = build_model("cnn-tiny", 10, in_channels=1).to(DEVICE).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    cfg = ExtractorConfig(model="cnn-tiny", trainer=trainer, eps=EPS, attack_steps=3)
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def step():
        loss = training_loss(net, x, y, EPS, cfg, DEVICE, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: lazy optimizer state, cuDNN's choices
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.slow
def test_the_readme_tour_runs_as_written(tmp_path, smoke_networks):
    """The README's Python tour, with a trained smoke run instead of the demo (train_extractors loads them) and 20
    test images instead of 500 (its standard AutoAttack and quick checks were 52 s of the suite on 60)."""
    copy_run(smoke_networks, tmp_path / "run")
    block = README.read_text().split("**The library**, for your own loops:", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    assert 'Run.open("runs/demo", "demo")' in code and "run.test_set(500)" in code
    code = code.replace('Run.open("runs/demo", "demo")', f'Run.open({str(tmp_path / "run")!r}, "smoke")')
    code = code.replace("run.test_set(500)", "run.test_set(20)")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # pylint: disable=exec-used
    assert scope["x"].device == scope["x_adv"].device == scope["run"].device
    assert scope["robust"].shape == (20,) and "passed" in scope["checks"]


@pytest.mark.slow
def test_cifar10_fast_runs_end_to_end_with_small_overrides(tmp_path, capsys):
    """The GPU preset as a user runs it, shrunk by --set to a CPU minute: a JPEG training folder unpacked from its
    archive (real CIFAR-10 JPEGs, 32 per class and split, repacked as the real archive is: unpacking all 60,000
    cost 22 of this test's 70 s; the H100 check unpacks the real one) and the lossless test images, both
    extractors, the merger, an evaluation with the light masking checks (on 10 of its 20 examples)."""
    import tarfile

    from conftest import JPEG_ARCHIVE, MINI_NPZ

    from afs_kit.app.cli import main
    from afs_kit.config import get_preset

    if not (JPEG_ARCHIVE.is_file() and MINI_NPZ.is_file()):
        pytest.skip(f"the CIFAR-10 files beside the project are absent: {JPEG_ARCHIVE}, {MINI_NPZ}")
    assert get_preset("cifar10-fast").extractor.model == "preact-resnet18"
    archive = tmp_path / "cifar10-jpeg.tar.xz"
    with tarfile.open(JPEG_ARCHIVE, "r|xz") as real, tarfile.open(archive, "w:xz", preset=0) as small:
        for member in real:  # streamed: an xz archive has no index
            if member.isdir() or int(Path(member.name).stem) < 32:
                small.addfile(member, real.extractfile(member) if member.isfile() else None)
    spec = f"train-test:folder:{archive}|npz:{MINI_NPZ}"
    run, device = str(tmp_path / "run"), ["--device", str(DEVICE)]
    shrink = ["--set", f"data.spec={spec}", "--set", f"data.root={tmp_path / 'data'}", "--set", "data.train_limit=128",
              "--set", "budgets=0,8/255", "--set", "extractor.model=cnn-cifar", "--set", "extractor.epochs=1",
              "--set", "extractor.val_examples=50", "--set", "merger.epochs=1", "--set", "merger.attack_steps=2",
              "--set", "evaluation.sanity_strength=light", "--set", "evaluation.sanity_examples=10"]
    assert main(["train-extractors", "--preset", "cifar10-fast", "--run", run, "--quiet", *shrink, *device]) == 0
    assert main(["train-merger", "--run", run, "--subset", "all", "--quiet", *device]) == 0
    assert main(["evaluate", "--run", run, "--model", "afs", "--attacks", "clean,pgd10", "--n", "20", *device]) == 0
    out = capsys.readouterr().out
    assert re.search(r"evaluation afs-11-alpha-0.5-\S+: clean \d+\.\d% \[", out), out
    metrics = next((tmp_path / "run" / "eval").glob("afs-*/metrics.json")).read_text()
    assert '"matmul_precision": "fp32 (IEEE' in metrics and '"n": 20' in metrics


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: the benchmarks would run")
def test_gpu_benchmarks_without_cuda_exit_2_with_one_line():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "benchmarks", "--device", "cuda", "--quick"], capture_output=True,
                         text=True, cwd=README.parent)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "python -m benchmarks: device='cuda' was asked for, but CUDA is not available on this machine"]


def test_make_test_gpu_says_what_it_does_without_cuda():
    import subprocess

    if torch.cuda.is_available():
        pytest.skip("CUDA is here: make test-gpu would run the tests")
    out = subprocess.run(["sh", "gpu/test-gpu.sh"], capture_output=True, text=True, cwd=README.parent,
                         env={**os.environ, "GPU_PYTHON": "python-that-does-not-exist"})
    assert out.returncode == 0 and "no CUDA on this machine" in out.stdout


def test_the_gpu_check_skips_in_one_line_without_cuda():
    import subprocess

    if torch.cuda.is_available():
        pytest.skip("CUDA is here: gpu/check.sh would run the whole check")
    out = subprocess.run(["bash", "gpu/check.sh"], capture_output=True, text=True, cwd=README.parent,
                         env={**os.environ, "GPU_PYTHON": "python-that-does-not-exist"})
    assert out.returncode == 0 and out.stderr == ""
    assert out.stdout.splitlines() == ["gpu/check.sh: no CUDA on this machine (no Python whose torch sees a GPU): skipped"]


def test_gpu_wheels_lose_their_examples_and_the_record_follows(tmp_path):
    """pyautoattack's wheel carries a 44 MB demo model; trimmed, what pip would install is the rest, exactly."""
    import importlib.util
    import zipfile

    spec = importlib.util.spec_from_file_location("trim_wheels", README.parent / "gpu" / "trim_wheels.py")
    trim_wheels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trim_wheels)
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    record = "pkg/__init__.py,sha256=x,1\npkg/examples/model.pt,sha256=y,4096\npkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/__init__.py", "x")
        z.writestr("pkg/examples/model.pt", b"0" * 4096)
        z.writestr("pkg-1.0.dist-info/RECORD", record)
    assert trim_wheels.trim(wheel) > 0 and trim_wheels.trim(wheel) == 0  # the second time: nothing to drop
    with zipfile.ZipFile(wheel) as z:
        assert z.namelist() == ["pkg/__init__.py", "pkg-1.0.dist-info/RECORD"]
        assert "examples" not in z.read("pkg-1.0.dist-info/RECORD").decode()


def test_bf16_training_on_a_cpu_that_emulates_it_is_said_once():
    """bf16 matmul without AVX512-BF16 or AMX is emulated (63 against 300 GFLOP/s fp32 on such a Xeon): training in
    bf16 there says so once per process, naming the fp32 settings; a CPU with either, or fp32, says nothing."""
    import platform
    import warnings

    from afs_kit.core import device

    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and platform.machine() == "x86_64":
        flags = set(cpuinfo.read_text().split())
        assert device.emulated_bf16() == (not {"avx512_bf16", "amx_tile"} & flags)
    device._say_emulated_bf16.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for precision in ("bf16", "bf16", "fp32"):
            device.prepare_training(torch.device("cpu"), precision)
    said = [str(w.message) for w in caught if "emulated" in str(w.message)]
    assert len(said) == (1 if device.emulated_bf16() else 0), said
    assert all("--set extractor.precision=fp32 --set merger.precision=fp32" in m for m in said)
