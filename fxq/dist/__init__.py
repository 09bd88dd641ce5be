"""Data-parallel runs over torch.distributed: the World a process runs in and the collectives stages merge with
(fxq.dist.world), and how a run's processes start (fxq.dist.launch)."""

from fxq.dist.world import World

__all__ = ["World"]
