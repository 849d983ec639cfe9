"""Running under ``torchrun``: which rank this process is, the process group, and the few
collectives the training loop and the pipeline need.

torchrun (or any launcher) sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT. Training joins a
process group (gloo on the CPU, NCCL on GPUs) and runs DistributedDataParallel; certification splits
its images over the ranks without talking to the others. Outside a launcher everything here is a
no-op for a world of one.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def launched_ranks() -> tuple[int, int]:
    """(rank, world size) when started by torchrun (or any launcher setting RANK and WORLD_SIZE), else (0, 1)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0, 1
    return (rank, world) if world > 1 and 0 <= rank < world else (0, 1)


def is_main_process() -> bool:
    return launched_ranks()[0] == 0


def active() -> bool:
    """A process group of more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_process_group(device: torch.device) -> bool:
    """Join the launcher's process group (once); NCCL for a CUDA device, gloo otherwise. Returns
    whether this process is part of a group of more than one rank."""
    if launched_ranks()[1] == 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(minutes=30), **kwargs)
    return dist.get_world_size() > 1


def destroy_process_group() -> None:
    """Leave the process group (at the end of a torchrun pipeline)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sum of ``values`` over the ranks (the values themselves for one process)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def rank_slice(n: int) -> slice:
    """This rank's contiguous share of ``n`` items (sizes differ by at most one)."""
    if not active():
        return slice(0, n)
    rank, world = dist.get_rank(), dist.get_world_size()
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))
