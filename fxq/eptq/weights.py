"""The distillation's weight per interest tensor: lambda_z from the LFH (EPTQ), all alike, or the output alone."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx import GraphModule

from fxq.config import LossWeights
from fxq.errors import GraphCheckFailed
from fxq.ir.meta import q
from fxq.ir.taps import interest_nodes

__all__ = ["interest_weights"]


def interest_weights(
    gm: GraphModule, kind: LossWeights, with_output: bool, output_share: float | None = None
) -> Tensor:
    """lambda_z per interest tensor (the output first when `with_output`), scaled to mean 1; with `output_share`
    the output's weight is set so that it holds that share of their sum."""
    z = interest_nodes(gm)
    if kind is LossWeights.OUTPUT:
        if not with_output:
            raise GraphCheckFailed(
                "loss_weights='output' measures the model output, but this model does not return one tensor; "
                "use 'lfh' or 'mean'"
            )
        w = torch.zeros(len(z) + 1)
        w[0] = 1.0
        return w / w.mean()
    if kind is LossWeights.MEAN:
        w = torch.ones(len(z))
    else:
        missing = [n.name for n in z if q(n).lfh_weight is None]
        if missing:
            raise GraphCheckFailed(
                f"rounding: no LFH weight on interest tensors {missing[:3]}; run the LFH pass on the float graph "
                f"first, or use loss_weights='mean'"
            )
        w = torch.tensor([q(n).lfh_weight for n in z], dtype=torch.float32)
    if with_output:  # the output: the largest trace of all (J = I)
        w = torch.cat([w.max().reshape(1) if len(w) else torch.ones(1), w])
    if not bool(w.any()):  # one tensor alone has log-normalised weight 0: then all count alike
        w = torch.ones_like(w)
    if output_share is not None:
        if not with_output:
            raise GraphCheckFailed(
                "output_share sets the model output's weight, but this model does not return one tensor; leave it None"
            )
        hidden = float(w[1:].sum())
        w[0] = output_share / (1 - output_share) * hidden if hidden > 0 else 1.0  # no hidden tensor: the output alone
    return w / w.mean()  # mean 1: the LFH and plain-mean runs share lr and lambda_reg
