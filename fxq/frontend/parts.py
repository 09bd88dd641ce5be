"""Model parts: where no front-end traces a whole model (a detector's box decoding and NMS, Python that branches
on values), its largest sub-modules that do trace are quantized alone and the code around them runs float.

The parts are found top-down: a sub-module with weights is tried whole; if it fails, its own sub-modules are tried.
Each part calibrates on the inputs the float model gives it on the calibration data, recorded with forward hooks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils._pytree import tree_map

from fxq.data.images import Call, call_args

__all__ = ["children_with_weights", "record_calls"]

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.MultiheadAttention)


def children_with_weights(model: nn.Module, path: str) -> list[str]:
    """Dotted paths of the sub-modules right under `path` that hold a conv, linear or attention layer."""
    parent = model.get_submodule(path)
    found = []
    for name, child in parent.named_children():
        if any(isinstance(m, _WEIGHTED) for m in child.modules()):
            found.append(f"{path}.{name}" if path else name)
    return found


def record_calls(model: nn.Module, batches: Iterable, paths: list[str]) -> dict[str, list[Call] | None]:
    """The arguments each sub-module at `paths` gets while the float model runs over `batches` (every call: a layer
    applied at several sites gives several per batch). None for a module called with keyword arguments, which a
    part's graph cannot take."""
    calls: dict[str, list[Call] | None] = {p: [] for p in paths}

    def hook(path: str):
        def record(module, args, kwargs):
            if kwargs or calls[path] is None:
                calls[path] = None
            else:
                calls[path].append(Call(tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, args)))

        return record

    hooks = [model.get_submodule(p).register_forward_pre_hook(hook(p), with_kwargs=True) for p in paths]
    try:
        with torch.no_grad():
            for batch in batches:
                model(*call_args(batch))
    finally:
        for h in hooks:
            h.remove()
    return calls
