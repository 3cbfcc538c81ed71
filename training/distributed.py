"""torchrun support: read its environment, pick a device and a backend, set the process up for it.

Run on one process as usual, or on N with
    torchrun --nproc-per-node N -m training ...
torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and the rendezvous address for
several nodes); we only read them. gloo on CPU, nccl on GPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.inference import configure_cpu_threads


@dataclass(frozen=True)
class Context:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup() -> Context:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    else:
        device = torch.device("cpu")
        # Processes on one machine share its cores; oversubscribing them is slower.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        # The service's CPU set-up, with this process's share of the cores: it also keeps freed
        # activation maps (up to 16 MB a map, made and dropped every step) in the process, so the
        # next step costs no page faults: 18% more images/s for the cifar preset on 2 cores
        # (median of 3; docs/training.md).
        configure_cpu_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Context(rank, local_rank, world_size, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def max_across_ranks(value: float, ctx: Context) -> float:
    """All ranks must agree on when a time budget runs out, or DDP deadlocks."""
    if not ctx.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()
