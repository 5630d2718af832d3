"""The bf16 attack path: on a fixed adversarially trained model, PGD under bf16 autocast finds the same
robust accuracy as fp32 (within 1 point) and still projects onto the eps-ball and [0, 1].

The speed side of bf16 is measured in benchmarks/ (pgd_bf16_vs_torchattacks), not here.
"""
from __future__ import annotations

import pytest
import torch

from afs_kit.attacks.methods import pgd
from afs_kit.config import DataConfig, ExtractorConfig
from afs_kit.data.batches import to_float
from afs_kit.data.datasets import load_dataset
from afs_kit.models.nets import model_from_checkpoint
from afs_kit.train.extractors import train_extractor

EPS, STEP, STEPS = 0.1, 0.025, 10


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """cnn-tiny, PGD-trained at eps 0.1 on digits (seeded, a few seconds), and all 1,797 digit images.

    All images, train and test: this compares two precisions of one attack on one fixed model, and
    1,797 examples make 1 point 18 images, well above the run-to-run spread of bf16 rounding.
    """
    torch.manual_seed(0)
    data = load_dataset("digits")
    cfg = ExtractorConfig(model="cnn-tiny", trainer="pgd", eps=EPS, attack_steps=3, epochs=6, batch_size=64,
                          lr=0.05, lr_milestones=(5,), val_attack_steps=3, val_examples=100, precision="fp32", seed=0)
    ckpt = train_extractor(cfg, data, DataConfig(spec="digits"), out_dir=tmp_path_factory.mktemp("bf16"), device="cpu", progress=False)
    model = model_from_checkpoint(ckpt)
    x = to_float(torch.cat([data.x_train, data.x_test]))
    y = torch.cat([data.y_train, data.y_test])
    return model, x, y


def _robust_accuracy(model, x, y, precision: str) -> tuple[float, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)  # the same random starts for both precisions
    x_adv = torch.cat([pgd(model, x[i:i + 500], y[i:i + 500], EPS, STEP, STEPS, precision=precision, generator=gen)
                       for i in range(0, len(y), 500)])
    with torch.no_grad():  # scored in fp32, as the kit reports robust accuracy
        acc = 100.0 * (model(x_adv).argmax(1) == y).float().mean().item()
    return acc, x_adv


def test_bf16_pgd_robust_accuracy_matches_fp32(trained):
    model, x, y = trained
    with torch.no_grad():
        clean = 100.0 * (model(x).argmax(1) == y).float().mean().item()
    acc32, _ = _robust_accuracy(model, x, y, "fp32")
    acc16, _ = _robust_accuracy(model, x, y, "bf16")
    # a model for which the number means something: it learned, and the attack bites but not fully
    assert clean > 80, f"clean accuracy {clean:.1f}%"
    assert 20 < acc32 < clean - 5, f"fp32 PGD robust accuracy {acc32:.1f}% (clean {clean:.1f}%)"
    assert abs(acc16 - acc32) <= 1.0, f"bf16 PGD {acc16:.2f}% vs fp32 PGD {acc32:.2f}% on {len(y)} examples"


def test_bf16_pgd_projects(trained):
    model, x, y = trained
    x, y = x[:500], y[:500]
    _, x_adv = _robust_accuracy(model, x, y, "bf16")
    assert x_adv.dtype == x.dtype and x_adv.shape == x.shape
    assert (x_adv - x).abs().max().item() <= EPS + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert (x_adv != x).any()  # it moved


def test_bf16_pgd_channels_last_matches_contiguous(trained):
    """The kit's bf16 fast path runs channels_last; the layout must not change the attack's outcome."""
    model, x, y = trained
    x, y = x[:300], y[:300]
    model_cl = model.to(memory_format=torch.channels_last)
    try:
        gen = torch.Generator().manual_seed(1)
        a = pgd(model_cl, x.contiguous(memory_format=torch.channels_last), y, EPS, STEP, STEPS,
                precision="bf16", generator=gen)
    finally:
        model.to(memory_format=torch.contiguous_format)
    gen = torch.Generator().manual_seed(1)
    b = pgd(model, x, y, EPS, STEP, STEPS, precision="bf16", generator=gen)
    with torch.no_grad():
        acc_a = (model(a.contiguous()).argmax(1) == y).float().mean().item()
        acc_b = (model(b).argmax(1) == y).float().mean().item()
    assert abs(acc_a - acc_b) * 100 <= 2.0
