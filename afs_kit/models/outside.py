"""Extractors from outside the kit: RobustBench's model zoo and any network from images in [0, 1] to logits.

An outside network is stacked through the input of its final linear layer (its penultimate features). That
layer is found by running the network once on the run's images and taking the last `nn.Linear` called whose
output is the network's output (or the layer the user names). The features are taken with torchvision's
`create_feature_extractor` (torch.fx) when the network traces symbolically, else with a forward pre-hook on
that layer (data-dependent control flow defeats tracing); either way the add checks, on the run's images,
that the layer applied to the features gives the network's logits before anything is written.

RUN/outside/<name>/extractor.pt holds the weights and where the network came from (a RobustBench name, or a
"module:function" builder with its keyword arguments), so a reopened run rebuilds it without the original file.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..config import config_hash
from ..core.io import expect, load_checkpoint, save_checkpoint
from ..data.batches import to_float
from ..data.dataset import Dataset
from ..errors import BadInput

if TYPE_CHECKING:  # a type only: the run layer sits above this one
    from ..run.rundir import RunDir

NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_.+-]{0,79}\Z")
ZOO_DATASETS = {10: "cifar10", 100: "cifar100", 1000: "imagenet"}  # RobustBench's data set by class count
FX, HOOK = "torchvision create_feature_extractor (torch.fx)", "forward pre-hook"
_CHECK_IMAGES = 8  # training images the add runs the network on


def alias_autoattack() -> None:
    """robustbench 1.1.1 imports `autoattack`, the name of the authors' git package; PyPI ships the same code as
    `pyautoattack` (already imported by the kit). Where no `autoattack` is installed, that name (and its
    submodules) point to `pyautoattack`'s modules. Called just before the kit first imports robustbench, never at
    `import afs_kit`: users who never touch RobustBench keep their `sys.modules` as it was."""
    import importlib.util

    if "autoattack" in sys.modules or importlib.util.find_spec("autoattack") is not None:
        return
    importlib.import_module("pyautoattack")  # imports its submodules too

    for name, module in list(sys.modules.items()):
        if name == "pyautoattack" or name.startswith("pyautoattack."):
            sys.modules.setdefault(name[len("py"):], module)


class OutsideExtractor(nn.Module):
    """A frozen outside network: `features(x)` is the input of its final linear layer `head`, `forward(x)`
    the head applied to them (the network's logits, checked when it was added)."""

    def __init__(self, net: nn.Module, layer: str):
        super().__init__()
        net.eval().requires_grad_(False)
        self.layer = layer
        self.head = net.get_submodule(layer)
        self._kept = None
        try:
            self.body = create_body(net, layer)
            self.method = FX
        except Exception:  # any tracing failure: fall back to the hook
            self.body = net
            self.method = HOOK
            self.head.register_forward_pre_hook(self._keep_input)

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    @property
    def classifier(self) -> nn.Linear:
        return self.head

    def _keep_input(self, _module, args) -> None:
        self._kept = args[0]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == FX:
            return self.body(x)["features"]
        self.body(x)
        feats, self._kept = self._kept, None
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def create_body(net: nn.Module, layer: str) -> nn.Module:
    """The network up to the input of `layer`, by torchvision's feature extraction (raises when untraceable)."""
    from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor

    tracer = NodePathTracer()
    graph = tracer.trace(net)
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    if len(calls) != 1 or not isinstance(calls[0].args[0], torch.fx.Node):
        raise TypeError(f"{layer} is called {len(calls)} times in the traced graph")
    return create_feature_extractor(net, return_nodes={tracer.node_to_qualname[calls[0].args[0]]: "features"})


def final_linear(net: nn.Module, x: torch.Tensor, name: str) -> str:
    """The last `nn.Linear` called on `x` whose output is the network's output."""
    linears = {n: m for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    calls = []
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: calls.append((n, out))) for n, m in linears.items()]
    try:
        with torch.no_grad():
            logits = net(x)
    finally:
        for hook in hooks:
            hook.remove()
    for layer, out in reversed(calls):
        if isinstance(out, torch.Tensor) and out.shape == logits.shape and torch.equal(out, logits):
            return layer
    raise BadInput(f"model {name!r} has no nn.Linear whose output is its output (linear layers: "
                   f"{', '.join(linears) or 'none'}); its features cannot be taken automatically: name the layer "
                   f"(layer=..., --layer) or give a network that ends in a linear layer")


def build_network(source: dict) -> nn.Module:
    """A fresh (untrained) network of the architecture `source` names: a RobustBench zoo entry or a builder."""
    if source["kind"] == "robustbench":
        return zoo_entries(source["dataset"], source["threat_model"])[source["name"]]["model"]()
    module, _, attr = source["builder"].partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj(**source.get("kwargs", {}))


def check_builder(builder: str, kwargs: dict | None) -> dict:
    """The source of a builder "package.module:function" (any callable returning the network)."""
    if not isinstance(builder, str) or not re.fullmatch(r"[\w.]+:[\w.]+", builder):
        raise BadInput(f"builder must be 'package.module:function', got builder={builder!r}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise BadInput(f"kwargs must be a dict of the builder's keyword arguments, got kwargs={kwargs!r}")
    module, _, attr = builder.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise BadInput(f"builder={builder!r} cannot be imported ({err})") from None
    if not callable(obj):
        raise BadInput(f"builder={builder!r} is not callable")
    return {"kind": "builder", "builder": builder, "kwargs": dict(kwargs or {})}


def zoo_entries(dataset: str, threat_model: str) -> dict:
    """RobustBench's zoo for one data set and threat model: {name: {"model": builder, "gdrive_id": ...}}."""
    alias_autoattack()
    try:
        with warnings.catch_warnings():  # robustbench's own imports: pkg_resources and torch.jit.interface
            warnings.filterwarnings("ignore", message=".*(pkg_resources|torch.jit.interface).*")
            from robustbench.model_zoo import model_dicts
            from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    except ImportError as err:
        raise BadInput(f"robustbench is not installed ({err}); install the zoo extra: pip install 'afs-kit[zoo]'"
                       ) from None
    try:
        return model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)]
    except (ValueError, KeyError):
        raise BadInput(f"RobustBench has no zoo for dataset={dataset!r}, threat_model={threat_model!r}") from None


def load_zoo_model(name: str, model_dir: str | Path, dataset: str, threat_model: str = "Linf",
                   download: bool = False) -> tuple[nn.Module, dict]:
    """A RobustBench zoo model through `robustbench.load_model`, which downloads only when the file
    `model_dir/<dataset>/<threat_model>/<name>.pt` is missing: here that file must exist unless `download`."""
    entries = zoo_entries(dataset, threat_model)
    if name not in entries:
        close = difflib.get_close_matches(name, entries, n=3)
        raise BadInput(f"robustbench={name!r} is not in RobustBench's {dataset} {threat_model} zoo"
                       + (f"; did you mean {', '.join(close)}?" if close else f" ({len(entries)} models)"))
    import timm
    from robustbench import load_model

    path = Path(model_dir) / dataset / threat_model / f"{name}.pt"
    hosted = timm.is_model(f"{name.lower().replace('-', '_')}_{dataset}_{threat_model.lower()}")
    if not download and (hosted or not path.is_file()):
        where = "its weights come from the Hugging Face hub (through timm)" if hosted else \
            f"its weight file {path} is missing: put RobustBench's {name}.pt there (or give --model-dir)"
        raise BadInput(f"robustbench={name!r}: {where}, or add --download (download=True) to let RobustBench "
                       f"fetch it")
    net = load_model(name, model_dir=str(model_dir), dataset=dataset, threat_model=threat_model)
    return net, {"kind": "robustbench", "name": name, "dataset": dataset, "threat_model": threat_model}


def weights_digest(net: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in net.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_name(name) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or name.startswith("eps-"):
        raise BadInput(f"name must start with a letter and hold only letters, digits and _.+- (at most 80, not "
                       f"starting with 'eps-'), got name={name!r}")
    return name


def check_network(net, name: str, data: Dataset, layer: str | None) -> tuple[OutsideExtractor, torch.Tensor]:
    """The wrapped network after every check against the run's data; raises a ValueError naming what is wrong."""
    if not isinstance(net, nn.Module):
        raise BadInput(f"model must be a torch.nn.Module mapping images in [0, 1] to logits, got "
                       f"{type(net).__name__} for name={name!r}")
    net = net.cpu().eval()
    x = to_float(data.x_train[:_CHECK_IMAGES])
    shape, classes = tuple(x.shape[1:]), data.num_classes
    try:
        with torch.no_grad():
            logits = net(x)
    except Exception as err:  # any failure on the run's images is the user's to see
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BadInput(f"model {name!r} cannot take this run's images (shape [N, {', '.join(map(str, shape))}], "
                       f"values in [0, 1]): {type(err).__name__}: {first}") from None
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (len(x), classes):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise BadInput(f"model {name!r} returns {got} for {len(x)} images; this run needs logits of shape "
                       f"[N, {classes}] ({classes} classes of {data.name})")
    if layer is None:
        layer = final_linear(net, x, name)
    elif not isinstance(dict(net.named_modules()).get(layer), nn.Linear):
        found = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
        raise BadInput(f"layer={layer!r} is not an nn.Linear of model {name!r} (its linear layers: "
                       f"{', '.join(found) or 'none'})")
    wrapped = OutsideExtractor(net, layer)
    with torch.no_grad():
        feats = wrapped.features(x)
        again = wrapped.head(feats)
    if feats.dim() != 2 or not torch.allclose(again, logits, rtol=1e-4, atol=1e-4):
        raise BadInput(f"layer={layer!r} of model {name!r} does not give its logits from its input (features of "
                       f"shape {tuple(feats.shape)}); name the network's final linear layer")
    return wrapped, logits


def network_and_source(data: Dataset, model: nn.Module | None = None, name: str | None = None, *,
                       robustbench: str | None = None, model_dir: str | Path = "models", threat_model: str = "Linf",
                       download: bool = False, builder: str | None = None, kwargs: dict | None = None,
                       weights: str | Path | None = None) -> tuple[nn.Module, dict, str]:
    """(network, where it came from, name) for one of: `robustbench` (a zoo name; the name defaults to it),
    `model` (rebuilt by `builder`/`kwargs`, else by calling its class with `kwargs`), or `builder` alone
    (called with `kwargs`, then loaded from `weights` when given)."""
    if (robustbench is not None) + (model is not None) > 1 or (robustbench is not None and builder is not None):
        raise BadInput("give one of model, robustbench or builder (builder may come with model, to rebuild it)")
    if robustbench is not None:
        dataset = ZOO_DATASETS.get(data.num_classes)
        if dataset is None:
            raise BadInput(f"robustbench={robustbench!r}: RobustBench's zoos have 10, 100 or 1000 classes; this "
                           f"run's data {data.name} has {data.num_classes}")
        check_name(name or robustbench)
        net, source = load_zoo_model(robustbench, model_dir, dataset, threat_model, download)
        return net, source, name or robustbench
    if model is None and builder is None:
        raise BadInput("give a model, robustbench=<zoo name> or builder='package.module:function'")
    check_name(name)
    if model is not None:
        target = builder or f"{type(model).__module__}:{type(model).__qualname__}"
        return model, check_builder(target, kwargs), name
    source = check_builder(builder, kwargs)
    try:
        net = build_network(source)
    except Exception as err:  # the user's builder: say what it raised
        raise BadInput(f"builder={builder!r} with kwargs={kwargs or {}} failed: {type(err).__name__}: "
                       f"{err}") from None
    if weights is not None:
        load_weights(net, weights)
    return net, source, name


def load_weights(net: nn.Module, weights: str | Path) -> None:
    """A state dict file (or a checkpoint holding one under "state_dict"), read with weights_only=True."""
    path = Path(weights)
    if not path.is_file():
        raise BadInput(f"weights={str(weights)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        state = {k.removeprefix("module."): v for k, v in state.items()}
    except Exception as err:  # whatever went wrong, said in one line
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BadInput(f"weights={str(weights)!r} cannot be read as a state dict ({type(err).__name__}: {first})") \
            from None
    mismatch = first_mismatch(net.state_dict(), state)
    if mismatch:
        raise BadInput(f"weights={str(weights)!r} do not fit the network: {mismatch}")
    net.load_state_dict(state, strict=True)


def first_mismatch(wanted: dict, given: dict) -> str | None:
    """The first difference between a network's state dict and a file's, in one phrase (torch's own message puts
    it on a later line, after a header that says nothing): a missing or unexpected entry, or a shape."""
    for key, value in wanted.items():
        if key not in given:
            return f"{key} is missing from the file ({len(given)} entries)"
        if tuple(given[key].shape) != tuple(value.shape):
            return f"{key} has shape {tuple(given[key].shape)} in the file, {tuple(value.shape)} in the network"
    extra = [k for k in given if k not in wanted]
    return f"the file has entries the network lacks, first {extra[0]}" if extra else None


def prepare_outside(data: Dataset, model: nn.Module | None = None, name: str | None = None, *,
                    layer: str | None = None, **how) -> dict:
    """The checkpoint of an outside extractor after every check against the run's data (classes, image size,
    features) and a rebuild from its source alone; nothing is written (`save_outside` does)."""
    net, source, name = network_and_source(data, model, name, **how)
    wrapped, logits = check_network(net, name, data, layer)
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    ckpt = {"kind": "outside", "name": name, "source": source, "layer": wrapped.layer, "method": wrapped.method,
            "feature_dim": wrapped.feature_dim, "num_classes": data.num_classes,
            "input_shape": list(data.x_train.shape[1:]), "state_dict": state,
            "key": config_hash(source, wrapped.layer, weights_digest(net))}
    try:  # a reopened run must rebuild the same network from the source alone
        rebuilt, _ = rebuild(ckpt)
        with torch.no_grad():
            same = torch.allclose(rebuilt(to_float(data.x_train[:_CHECK_IMAGES])), logits, rtol=1e-4, atol=1e-4)
    except Exception as err:  # whatever went wrong, said in one line
        raise BadInput(f"model {name!r} cannot be rebuilt from {describe_source(source)} ({type(err).__name__}: "
                       f"{err}); give the builder ('package.module:function') and kwargs that make it") from None
    if not same:
        raise BadInput(f"model {name!r} rebuilt from {describe_source(source)} gives other logits; give the "
                       f"builder and kwargs that make this network")
    return ckpt


def save_outside(run_dir: RunDir, ckpt: dict, before_write=None) -> bool:
    """Write RUN/outside/<name>/extractor.pt (calling `before_write` first); False when the same network is
    already there under that name; a ValueError, with nothing written, when another network holds the name."""
    path = run_dir.outside_dir(ckpt["name"]) / "extractor.pt"
    if path.is_file():
        old = load_checkpoint(path)
        if old.get("key") == ckpt["key"]:
            return False
        raise BadInput(f"name={ckpt['name']!r} is taken in {run_dir.root} by another network "
                       f"({describe_source(old.get('source', {}))}); choose another name")
    if before_write is not None:
        before_write()
    save_checkpoint(path, ckpt)
    return True


def describe_source(source: dict) -> str:
    if source.get("kind") == "robustbench":
        return f"RobustBench {source['dataset']} {source['threat_model']} {source['name']}"
    kwargs = ", ".join(f"{k}={v!r}" for k, v in source.get("kwargs", {}).items())
    return f"{source.get('builder')}({kwargs})"


def rebuild(ckpt: dict) -> tuple[OutsideExtractor, dict]:
    net = build_network(ckpt["source"])
    net.load_state_dict(ckpt["state_dict"], strict=True)
    return OutsideExtractor(net, ckpt["layer"]), ckpt


def load_outside(path: str | Path, data: Dataset) -> tuple[OutsideExtractor, dict]:
    """An added extractor rebuilt from its checkpoint, refused when made for other classes or image sizes."""
    ckpt = load_checkpoint(path)
    expect(ckpt, path, kind="outside", num_classes=data.num_classes, input_shape=list(data.x_train.shape[1:]))
    return rebuild(ckpt)
