"""Tests for afs_kit.models.nets: sizes against the paper, the feature/classifier contract, normalization
inside the model, checkpoint round trips, channels_last / bf16, argument checks, and that a small net learns."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from afs_kit.models.nets import MODEL_NAMES, build_model

# Networks cheap enough for a forward pass on 2 CPU cores; the big WRNs are checked on the meta device.
CHEAP = ("wrn-16-4", "preact-resnet18", "cnn-tiny", "cnn-small", "cnn-cifar", "mlp")
# The two residual nets get 16x16 inputs (a quarter of the work of 32x32).
SIDE = {"wrn-16-4": 16, "preact-resnet18": 16}


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    # Built on the meta device: shapes only, no memory (WRN-28-30 would be 1.3 GB in fp32).
    with torch.device("meta"):
        return build_model(name, num_classes, **kwargs)


def images(n: int = 4, c: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def cheap_model(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, 10, **kwargs).eval()


# ------------------------------------------------------------------ sizes

@pytest.mark.parametrize("name, millions", [("wrn-28-10", 36.47), ("wrn-28-30", 328.0)])
def test_wrn_parameter_counts_match_paper_table6(name, millions):
    model = meta_model(name)
    assert next(model.parameters()).is_meta
    assert n_params(model) == pytest.approx(millions * 1e6, rel=0.01)


def test_wrn_34_10_and_preact_resnet18_sizes_match_the_literature():
    # 46.16 M (WRN-34-10 in TRADES/MART tables) and 11.17 M (PreActResNet-18, 10 classes).
    assert n_params(meta_model("wrn-34-10")) == pytest.approx(46.16e6, rel=0.01)
    assert n_params(meta_model("preact-resnet18")) == pytest.approx(11.17e6, rel=0.01)


def test_cnn_cifar_is_under_0p3_million_parameters_and_small_nets_are_small():
    assert n_params(meta_model("cnn-cifar")) <= 300_000
    assert 10_000 <= n_params(meta_model("cnn-tiny", in_channels=1)) <= 20_000
    assert n_params(meta_model("cnn-small", in_channels=1)) < n_params(meta_model("cnn-cifar"))


@pytest.mark.parametrize("depth, widen", [(28, 10), (10, 2), (16, 4), (34, 10)])
def test_wrn_layout_follows_depth_and_width(depth, widen):
    model = meta_model(f"wrn-{depth}-{widen}")
    n = (depth - 4) // 6
    stages = (model.block1, model.block2, model.block3)
    assert [len(s) for s in stages] == [n, n, n]
    assert [s[-1].conv2.out_channels for s in stages] == [16 * widen, 32 * widen, 64 * widen]
    assert model.conv1.out_channels == 16
    assert model.feature_dim == 64 * widen == model.classifier.in_features
    # No dropout anywhere (the paper's WRNs use none).
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    # 3x3 convs: 1 stem + 2 per block; 1x1 projection shortcuts only where width or stride changes.
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(m.kernel_size == (3, 3) for m in convs) == 1 + 6 * n
    assert sum(m.kernel_size == (1, 1) for m in convs) == (3 if widen > 1 else 2)


def test_preact_resnet18_layout():
    model = meta_model("preact-resnet18")
    layers = (model.layer1, model.layer2, model.layer3, model.layer4)
    assert [len(layer) for layer in layers] == [2, 2, 2, 2]
    assert [layer[0].conv1.out_channels for layer in layers] == [64, 128, 256, 512]
    assert [layer[0].conv1.stride for layer in layers] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    assert model.feature_dim == 512 and model.bn.num_features == 512


def test_fixed_names_are_listed_and_all_build():
    assert set(CHEAP) | {"wrn-28-10", "wrn-34-10", "wrn-28-30"} == set(MODEL_NAMES)
    for name in MODEL_NAMES:
        model = meta_model(name, num_classes=7)
        assert isinstance(model.classifier, nn.Linear)
        assert model.classifier.out_features == 7
        assert model.classifier.in_features == model.feature_dim


# ------------------------------------------------------------------ the feature / classifier contract

@pytest.mark.parametrize("name", CHEAP)
def test_forward_is_classifier_of_features(name):
    model = cheap_model(name)
    x = images(3, h=SIDE.get(name, 32), w=SIDE.get(name, 32))
    with torch.no_grad():
        feats, logits = model.features(x), model(x)
    assert feats.shape == (3, model.feature_dim)
    assert logits.shape == (3, 10)
    torch.testing.assert_close(logits, model.classifier(feats))
    # Features come after the final ReLU.
    assert feats.min() >= 0


@pytest.mark.parametrize("name", ["cnn-tiny", "cnn-small", "cnn-cifar"])
@pytest.mark.parametrize("c, h, w", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 9, 13)])
def test_small_nets_accept_any_input_of_at_least_8x8(name, c, h, w):
    model = cheap_model(name, in_channels=c)
    with torch.no_grad():
        out = model(images(2, c, h, w))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_wrn_and_preact_accept_gray_and_other_sizes():
    for name in ("wrn-10-1", "preact-resnet18"):
        model = cheap_model(name, in_channels=1)
        with torch.no_grad():
            assert model(images(2, 1, 12, 12)).shape == (2, 10)


def test_input_gradient_flows_through_a_frozen_extractor():
    # What the attacks and the stacking code need: d loss / d x with the parameters frozen.
    model = cheap_model("cnn-cifar").requires_grad_(False)
    x = images(2).requires_grad_(True)
    (grad,) = torch.autograd.grad(model.features(x).sum(), x)
    assert grad.shape == x.shape and grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------ normalization inside

@pytest.mark.parametrize("name", ["cnn-tiny", "cnn-cifar", "wrn-10-1"])
def test_normalization_is_done_inside_with_buffers(name):
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    model = cheap_model(name, mean=mean, std=std)
    assert model.mean.shape == (1, 3, 1, 1) and model.std.shape == (1, 3, 1, 1)
    assert {"mean", "std"} <= set(model.state_dict())
    assert "mean" not in dict(model.named_parameters())
    torch.testing.assert_close(model.mean.flatten(), torch.tensor(mean))
    # Same weights, identity normalization, fed the normalized input by hand: same logits.
    plain = build_model(name, 10, mean=[0.0] * 3, std=[1.0] * 3).eval()
    state = model.state_dict()
    state["mean"], state["std"] = plain.mean.clone(), plain.std.clone()
    plain.load_state_dict(state, strict=True)
    x = images(3)
    manual = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(manual), rtol=1e-4, atol=1e-5)


def test_default_normalization_is_half_per_channel():
    model = meta_model("cnn-small", in_channels=1)
    assert model.model_kwargs["mean"] == [0.5] and model.model_kwargs["std"] == [0.5]
    model = cheap_model("cnn-tiny")
    torch.testing.assert_close(model.mean, torch.full((1, 3, 1, 1), 0.5))
    torch.testing.assert_close(model.std, torch.full((1, 3, 1, 1), 0.5))


def test_numpy_integers_are_accepted_and_stored_as_plain_ints():
    import numpy as np

    model = meta_model("cnn-tiny", num_classes=np.int64(10), in_channels=np.int64(1))
    assert type(model.model_kwargs["num_classes"]) is int and type(model.model_kwargs["in_channels"]) is int


def test_mean_and_std_accept_tensors_and_tuples():
    model = build_model("cnn-tiny", 10, in_channels=2, mean=torch.tensor([0.1, 0.2]), std=(0.3, 0.4))
    assert model.model_kwargs["mean"] == pytest.approx([0.1, 0.2])
    assert model.model_kwargs["std"] == pytest.approx([0.3, 0.4])
    assert all(type(v) is float for v in model.model_kwargs["mean"] + model.model_kwargs["std"])


# ------------------------------------------------------------------ round trips

@pytest.mark.parametrize("name", CHEAP)
def test_model_kwargs_rebuilds_an_identical_model(name, tmp_path):
    model = cheap_model(name, seed=1, mean=[0.4, 0.45, 0.5], std=[0.2, 0.25, 0.3])
    kwargs = model.model_kwargs
    assert kwargs == json.loads(json.dumps(kwargs))  # plain Python values only
    assert kwargs["name"] == name and kwargs["num_classes"] == 10 and kwargs["in_channels"] == 3
    # Through a weights_only checkpoint, the way the training code stores it.
    path = tmp_path / "ckpt.pt"
    torch.save({"model_kwargs": kwargs, "state_dict": model.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    torch.manual_seed(2)  # different initial weights, so equality below comes from the state dict
    rebuilt = build_model(**ckpt["model_kwargs"])
    rebuilt.load_state_dict(ckpt["state_dict"], strict=True)
    rebuilt.eval()
    x = images(2, h=SIDE.get(name, 32), w=SIDE.get(name, 32))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_model_kwargs_is_a_copy():
    model = meta_model("cnn-tiny")
    model.model_kwargs["mean"][0] = 9.0
    model.model_kwargs["name"] = "other"
    assert model.model_kwargs["mean"][0] == 0.5 and model.model_kwargs["name"] == "cnn-tiny"


def test_wrn_initialization_follows_reference_code():
    model = cheap_model("wrn-16-4")
    conv = model.block3[0].conv1  # 128 -> 256, 3x3: fan_out = 9 * 256
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 256)), rel=0.05)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any() for m in bns)
    assert not model.classifier.bias.any()


# ------------------------------------------------------------------ memory formats and precision

@pytest.mark.parametrize("name", CHEAP)
def test_channels_last_and_bf16_autocast_match_fp32(name):
    model = cheap_model(name)
    x = images(4, h=SIDE.get(name, 32), w=SIDE.get(name, 32))
    with torch.no_grad():
        ref = model(x)
        model_cl = cheap_model(name).to(memory_format=torch.channels_last)
        out_cl = model_cl(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf16 = model_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_cl, ref, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(out_bf16).all()
    scale = ref.abs().max().item() + 1e-3
    assert (out_bf16.float() - ref).abs().max().item() <= 0.1 * scale


def test_bf16_autocast_backward_to_the_input_is_finite():
    model = cheap_model("cnn-small").to(memory_format=torch.channels_last)
    x = images(4).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = torch.arange(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x).float(), y)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# ------------------------------------------------------------------ argument checks

@pytest.mark.parametrize("kwargs, words", [
    (dict(name="resnet50", num_classes=10), ["resnet50", "wrn-28-10", "cnn-tiny"]),
    (dict(name="wrn-27-10", num_classes=10), ["wrn-27-10", "D=27"]),
    (dict(name="wrn-4-10", num_classes=10), ["D=4"]),
    (dict(name="wrn-28-0", num_classes=10), ["K=0"]),
    (dict(name="WRN-28-10x", num_classes=10), ["WRN-28-10x"]),
    (dict(name="cnn-tiny", num_classes=1), ["num_classes=1"]),
    (dict(name="cnn-tiny", num_classes=2.5), ["num_classes=2.5"]),
    (dict(name="cnn-tiny", num_classes=10, in_channels=0), ["in_channels=0"]),
    (dict(name="cnn-tiny", num_classes=10, in_channels=1, mean=[0.5, 0.5]), ["mean=[0.5, 0.5]", "in_channels=1"]),
    (dict(name="cnn-tiny", num_classes=10, std=[0.5, 0.0, 0.5]), ["std=[0.5, 0.0, 0.5]"]),
    (dict(name="cnn-tiny", num_classes=10, std=[0.5, -1.0, 0.5]), ["std=[0.5, -1.0, 0.5]"]),
    (dict(name="cnn-tiny", num_classes=10, in_channels=1, mean=0.5), ["mean=0.5"]),
    (dict(name="cnn-tiny", num_classes=10, in_channels=1, mean=[float("nan")]), ["mean=[nan]"]),
    (dict(name="cnn-tiny", num_classes=10, in_channels=1, std=["x"]), ["std=['x']"]),
])
def test_bad_arguments_raise_value_error_naming_the_value(kwargs, words):
    with pytest.raises(ValueError) as info:
        with torch.device("meta"):
            build_model(**kwargs)
    for word in words:
        assert word in str(info.value)


# ------------------------------------------------------------------ it learns

def test_cnn_tiny_learns_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [0,1], 1x8x8
    y = torch.tensor(digits.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=gen)
    train_idx, test_idx = perm[:1300], perm[1300:]
    torch.manual_seed(0)
    model = build_model("cnn-tiny", 10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    for _ in range(200):
        idx = train_idx[torch.randint(len(train_idx), (64,), generator=gen)]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[test_idx]).argmax(1) == y[test_idx]).float().mean().item()
    assert acc > 0.85
