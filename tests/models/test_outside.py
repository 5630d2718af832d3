"""Extractors from outside the kit (issue 16), offline, on digits at CIFAR-10's shape: a RobustBench zoo
architecture with weights this test writes where RobustBench reads them, loaded through
`robustbench.load_model`, and a torchvision ResNet-18, both stacked with a kit extractor, a merger trained
and evaluated; every bad input refused with nothing written.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from conftest import snapshot

from afs_kit import PRESETS, Run
from afs_kit.app.cli import main
from afs_kit.config import override
from afs_kit.errors import BadInput
from afs_kit.models.outside import FX, HOOK
from afs_kit.models.stack import parse_subset

ZOO_NAME = "Wong2020Fast"  # PreActResNet-18, the smallest of the preset's zoo models


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory, digits) -> str:
    """Real images at CIFAR-10's shape: 32 training and 40 test digits, 8x8 scaled 4x to 32x32, in 3 channels
    (scikit-learn ships them, so the test never depends on a data file beside the project)."""
    def shaped(x):
        return x.repeat_interleave(4, 2).repeat_interleave(4, 3).expand(-1, 3, -1, -1).numpy()

    path = tmp_path_factory.mktemp("tiny") / "tiny.npz"
    np.savez(path, x_train=shaped(digits.x_train[:32]), y_train=digits.y_train[:32].numpy(),
             x_test=shaped(digits.x_test[:40]), y_test=digits.y_test[:40].numpy(), classes=np.array(digits.classes))
    return f"npz:{path}"


@pytest.fixture(scope="module")
def preset(tiny_cifar):
    # two ResNet-18s at 32x32 on 2 CPU cores: the merger's attacks and validation checks kept short (with PGD-10
    # checks on the whole validation split its training was 51 s of this module's 75; then 17 s of 35, 11 of them
    # its one batch of 64 training images: now 32)
    return override(PRESETS["smoke"], [f"data.spec={tiny_cifar}", "budgets=0.0", "extractor.epochs=1",
                                       "merger.epochs=1", "merger.attack_steps=2", "merger.val_attack_steps=2",
                                       "merger.val_examples=20", "evaluation.n_examples=10",
                                       "evaluation.attacks=clean,pgd10"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """Random weights for the zoo architecture, written at model_dir/cifar10/Linf/<name>.pt as RobustBench reads."""
    from afs_kit.models.outside import build_network

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    net = build_network({"kind": "robustbench", "name": ZOO_NAME, "dataset": "cifar10", "threat_model": "Linf"})
    (root / "cifar10" / "Linf").mkdir(parents=True)
    torch.save(net.state_dict(), root / "cifar10" / "Linf" / f"{ZOO_NAME}.pt")
    return root


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, preset, model_dir, one_thread) -> Run:
    """A kit extractor (budget 0), the zoo model and a torchvision ResNet-18 in one run."""
    run = Run(tmp_path_factory.mktemp("mixed") / "run", preset, device="cpu", progress=False)
    run.train_extractors()
    run.add_extractor(robustbench=ZOO_NAME, model_dir=model_dir)
    torch.manual_seed(1)
    run.add_extractor(torchvision.models.resnet18(num_classes=10), "resnet18", builder="torchvision.models:resnet18",
                      kwargs={"num_classes": 10})
    return run


def test_zoo_weights_come_from_robustbench_path(mixed_run, model_dir):
    from robustbench import load_model

    reference = load_model(ZOO_NAME, model_dir=str(model_dir), dataset="cifar10", threat_model="Linf")
    added, ckpt = mixed_run.outside(ZOO_NAME)
    assert ckpt["source"] == {"kind": "robustbench", "name": ZOO_NAME, "dataset": "cifar10", "threat_model": "Linf"}
    x, _ = mixed_run.test_set(8)
    with torch.no_grad():
        torch.testing.assert_close(added(x), reference.eval()(x), rtol=1e-5, atol=1e-5)


def test_features_are_the_final_linear_input(mixed_run):
    x, _ = mixed_run.test_set(8)
    for name, layer in ((ZOO_NAME, "linear"), ("resnet18", "fc")):
        model, ckpt = mixed_run.outside(name)
        assert (ckpt["layer"], ckpt["method"], model.feature_dim) == (layer, FX, 512)
        with torch.no_grad():
            feats = model.features(x)
            torch.testing.assert_close(model.classifier(feats), model(x))
        assert feats.shape == (8, 512)
        assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_reopened_run_rebuilds_outside_extractors(mixed_run):
    reopened = Run.open(mixed_run.dir.root, device="cpu", progress=False)
    assert [label for label, _ in reopened.members()] == ["0", ZOO_NAME, "resnet18"]
    x, _ = mixed_run.test_set(8)
    for name in (ZOO_NAME, "resnet18"):
        with torch.no_grad():
            torch.testing.assert_close(reopened.outside(name)[0](x), mixed_run.outside(name)[0](x))


@pytest.mark.slow
def test_mixed_stack_trains_and_evaluates(mixed_run):
    model = mixed_run.afs_model("all")
    assert model.stack.feature_dims == [mixed_run.extractor(0.0)[0].feature_dim, 512, 512]
    name = mixed_run.merger_names()[0]
    assert name.startswith("111-")
    metrics = mixed_run.evaluate(f"afs-{name}", model, model_info=mixed_run.model_info("merger", name))
    assert metrics["model"]["extractors"] == ["eps-0", ZOO_NAME, "resnet18"]
    assert set(metrics["attacks"]) == {"clean", "pgd10"} and "sanity" in metrics and metrics["n"] == 10
    # a subset by names and budgets: the kit's extractor and the zoo model
    assert mixed_run.subset_indices(f"0,{ZOO_NAME}") == [0, 1]
    assert mixed_run.model_info("avg", "101")["extractors"] == ["eps-0", "resnet18"]


def test_selection_leaves_outside_extractors_out(mixed_run, capsys):
    mixed_run.progress = True
    try:
        assert mixed_run.subset_indices("selected") == [0]
    finally:
        mixed_run.progress = False
    assert f"leaves out {ZOO_NAME}, resnet18" in capsys.readouterr().out


def test_subset_names_parse():
    assert parse_subset("all", [0.0, 0.1], ["a", "b"]) == [0, 1, 2, 3]
    assert parse_subset("b,0.1", [0.0, 0.1], ["a", "b"]) == [1, 3]
    assert parse_subset("0001", [0.0, 0.1], ["a", "b"]) == [3]
    with pytest.raises(ValueError, match=r"subset='c' is neither 'all'.*extractor names \(a, b\)"):
        parse_subset("c", [0.0, 0.1], ["a", "b"])


class Branching(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so the features come from a forward pre-hook."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = self.body(x)
        return self.head(h if h.sum() > 0 else -h)


def test_untraceable_network_uses_a_hook(tmp_path, preset):
    run = Run(tmp_path / "run", preset, device="cpu", progress=False)
    ckpt = run.add_extractor(Branching(), "branching")
    assert (ckpt["layer"], ckpt["method"], ckpt["source"]["builder"]) == ("head", HOOK, "test_outside:Branching")
    model = run.outside("branching")[0]
    x, _ = run.test_set(4)
    x.requires_grad_(True)
    model(x).sum().backward()  # the hooked features carry gradients: attacks go through them
    assert x.grad is not None and x.grad.abs().sum() > 0


class Wide(nn.Module):
    """Logits of the wrong shape for the run (12 classes)."""

    def __init__(self, classes: int = 12):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


BAD_INPUT = [
    pytest.param(dict(model=Wide(), name="wide"), r"model 'wide' returns \(8, 12\) for 8 images; this run needs "
                 r"logits of shape \[N, 10\]", id="classes"),
    pytest.param(dict(model=nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10)), name="small"),
                 r"model 'small' cannot take this run's images \(shape \[N, 3, 32, 32\]", id="input-size"),
    pytest.param(dict(model=nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10), nn.Softmax(1)), name="soft"),
                 r"model 'soft' has no nn.Linear whose output is its output", id="no-final-linear"),
    pytest.param(dict(robustbench="Wong2020Fats"), r"robustbench='Wong2020Fats' is not in RobustBench's cifar10 "
                 r"Linf zoo; did you mean Wong2020Fast", id="unknown-zoo-name"),
    pytest.param(dict(robustbench="Rice2020Overfitting", model_dir="{tmp}/none"), r"robustbench="
                 r"'Rice2020Overfitting': its weight file .*none/cifar10/Linf/Rice2020Overfitting.pt is missing: put "
                 r"RobustBench's Rice2020Overfitting.pt there .* or add --download", id="missing-weights"),
    pytest.param(dict(model=Wide(10), name="eps-8"), r"name must start with a letter .* got name='eps-8'",
                 id="name"),
    pytest.param(dict(model=Wide(10), name="wide", layer="nope"), r"layer='nope' is not an nn.Linear of model "
                 r"'wide' \(its linear layers: fc\)", id="layer"),
    pytest.param(dict(builder="torchvision.models:nope", name="x"), r"builder='torchvision.models:nope' cannot be "
                 r"imported", id="builder"),
    pytest.param(dict(model=Wide(10), name="wide", builder="test_outside:Wide", kwargs={"classes": 12}),
                 r"model 'wide' cannot be rebuilt from test_outside:Wide\(classes=12\)", id="rebuild"),
]


@pytest.mark.parametrize("how, message", BAD_INPUT)
def test_bad_input_is_refused_with_nothing_written(tmp_path, preset, how, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    before = snapshot(tmp_path)
    how = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in how.items()}
    with pytest.raises(ValueError, match=message):
        Run(run_dir, preset, device="cpu", progress=False).add_extractor(**how)
    assert snapshot(tmp_path) == before


def test_cli_add_extractor(tmp_path, preset, model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = preset.data.spec
    common = ["--set", f"data.spec={spec}", "--device", "cpu"]
    # a missing weight file: exit 2, one line saying where to put it, no run directory made
    assert main(["add-extractor", "--preset", "smoke", "--run", "run", "--robustbench", "Standard",
                 "--model-dir", str(tmp_path / "none"), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Standard.pt is missing: put RobustBench's Standard.pt there" in err
    assert not (tmp_path / "run").exists()
    assert main(["add-extractor", "--preset", "smoke", "--run", "run", "--builder", "torchvision.models:resnet18",
                 *common]) == 2
    assert "--name is required with --builder" in capsys.readouterr().err
    assert main(["add-extractor", "--preset", "smoke", "--run", "run", "--builder", "torchvision.models:resnet18",
                 "--kwargs", "{not json", "--name", "r", *common]) == 2
    assert "--kwargs must be a JSON object, got kwargs='{not json'" in capsys.readouterr().err
    # a zoo-only run: add, merge, evaluate with paired tests against the zoo model
    assert main(["add-extractor", "--preset", "smoke", "--run", "run", "--robustbench", ZOO_NAME,
                 "--model-dir", str(model_dir), *common]) == 0
    assert f"extractor {ZOO_NAME} (RobustBench cifar10 Linf {ZOO_NAME}, 512 features" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "run.json").read_text())["preset"]["data"]["spec"] == spec
    assert main(["train-merger", "--run", "run", "--subset", "selected", "--device", "cpu"]) == 2
    assert "subset 'selected' needs extractors trained by the kit" in capsys.readouterr().err


def test_zoo_preset_and_import_order():
    p = PRESETS["zoo-cifar10"]
    assert p.budgets == () and p.merger.epochs == 5 and len(p.zoo) == 5 and p.data.spec == "cifar10"
    # robustbench imports `autoattack` and `pkg_resources`: `import afs_kit` alone leaves sys.modules as it was,
    # and the kit's first use of RobustBench (or `alias_autoattack()`) makes `import robustbench` resolve
    code = ("import sys, afs_kit; assert 'autoattack' not in sys.modules; "
            "from afs_kit.models.outside import zoo_entries; zoo_entries('cifar10', 'Linf'); "
            "import robustbench; print(robustbench.load_model.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "load_model"


def test_weights_of_another_shape_name_the_first_mismatch(tmp_path, preset):
    """Was torch's header line only ("Error(s) in loading state_dict for Wide:"), the mismatch hidden below it."""
    torch.save(Wide(12).state_dict(), tmp_path / "w.pt")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(BadInput, match=r"weights='.*w.pt' do not fit the network: fc.weight has shape \(12, 3072\) "
                                       r"in the file, \(10, 3072\) in the network"):
        Run(run_dir, preset, device="cpu", progress=False).add_extractor(
            name="wide", builder="test_outside:Wide", kwargs={"classes": 10}, weights=tmp_path / "w.pt")
    assert snapshot(tmp_path) == before
