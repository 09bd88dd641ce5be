"""How the processes of a data-parallel run start: under torchrun (one node or many) each process joins the group
torchrun describes in its environment; `fxq ... --nproc N` starts N processes on this machine through
torch.distributed.run itself (torchrun --standalone), so there is no scheduler of fxq's own."""

from __future__ import annotations

import os
import signal
from datetime import timedelta

import torch
import torch.distributed as dist

from fxq.dist.world import World
from fxq.errors import ConfigError, RankLost

__all__ = ["launched", "join", "launch"]

TIMEOUT = timedelta(minutes=30)  # a collective waits this long for a rank that neither answers nor dies


def launched() -> bool:
    """Whether this process is one of several torchrun started (WORLD_SIZE > 1 in its environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: torch.device) -> tuple[World, torch.device]:
    """Join torchrun's process group (NCCL for a CUDA device, gloo for the CPU); each rank of a node takes its own
    GPU (LOCAL_RANK). Alone: World() and the device as given."""
    if not launched():
        return World(), device
    if not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return World.current(), device


def launch(argv: list[str], nproc: int) -> None:
    """Run `fxq argv` (without --nproc) as `nproc` processes on this machine (torchrun --standalone). A process
    that fails ends the run with one RankLost naming the rank that failed first (torchrun stops the others)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if nproc < 2:
        raise ConfigError(f"--nproc {nproc}: give 2 or more processes, or leave it out for one")
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "fxq"])
    args.training_script_args = list(argv)  # set, not parsed: torchrun's parser would take --start for its own
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        raise RankLost(f"rank {rank} of {nproc} {_ended(failure.exitcode)}, and the run stopped") from None


def _ended(code: int) -> str:
    if code < 0:
        try:
            return f"was stopped by {signal.Signals(-code).name}"
        except ValueError:
            return f"was stopped by signal {-code}"
    return "ended with an error (printed above)" if code == 2 else f"exited with code {code}"
