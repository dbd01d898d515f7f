"""Verification sharded over processes under `torchrun`: (rank, world) from the environment, gloo on CPU and
nccl on GPU, the ranks' tallies gathered on rank 0."""
from __future__ import annotations

import os


def distributed() -> tuple[int, int]:
    """(rank, world) under torchrun (gloo on CPU, nccl on GPU); (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def leave_distributed(world: int) -> None:
    """Destroy the process group once the last collective is done: left to the interpreter's exit,
    gloo's threads could outlive it ("terminate called without an active exception", SIGABRT)."""
    if world <= 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def gather(obj, world: int):
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


