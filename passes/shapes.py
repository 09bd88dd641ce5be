"""PropagateShapes: record every node's output shape and dtype (node.meta["tensor_meta"]) from one batch."""

from __future__ import annotations

import torch
from torch.fx import GraphModule
from torch.fx.passes.shape_prop import ShapeProp

from fxq.errors import GraphCheckFailed
from fxq.ir.passbase import FxqPass, PassResult

__all__ = ["PropagateShapes"]


class PropagateShapes(FxqPass):
    """Run torch.fx's ShapeProp on an example batch; annotate needs to know which outputs are float tensors."""

    def __init__(self, example_inputs: tuple):
        self.example_inputs = example_inputs

    def call(self, gm: GraphModule) -> PassResult:
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*self.example_inputs)
        except Exception as e:
            shapes = [tuple(x.shape) for x in self.example_inputs if isinstance(x, torch.Tensor)]
            raise GraphCheckFailed(
                f"propagate_shapes: the traced model failed on an example batch of shape {shapes}: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Check the input size the model "
                f"expects (e.g. --image-size) and that the data matches it"
            ) from e
        return PassResult(gm, modified=False)
