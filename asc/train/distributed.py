"""torchrun integration: one process per device, gloo on CPU and NCCL on CUDA.

``torchrun --nproc_per_node N -m asc train ...`` sets the usual environment variables; without
them training runs as a single process and every helper here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from asc.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' picks this process's GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        found = torch.cuda.device_count()
        raise ConfigError(f"train.device={name}: this machine has {found or 'no'} CUDA GPU{'s' if found != 1 else ''} "
                          "torch can use; set train.device=auto or cpu")
    return device


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun), readable after the group is gone."""
    return int(os.environ.get("RANK", "0"))


def setup(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes, or return a single-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = launched_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        dist.init_process_group(backend=backend)
    return DistContext(rank, world_size, local_rank, resolved)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def broadcast_object(ctx: DistContext, value: object) -> object:
    """Rank 0's ``value`` on every rank."""
    if not ctx.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(ctx: DistContext, value: object) -> list[object]:
    if not ctx.enabled:
        return [value]
    boxes: list[object] = [None] * ctx.world_size
    dist.all_gather_object(boxes, value)
    return boxes


def sync_buffers(ctx: DistContext, module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, so after the last step every rank holds
    statistics updated by its own shard; this makes the replicas identical again.
    """
    if ctx.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def teardown(ctx: DistContext) -> None:
    """Leave the process group once every rank is done with it (a barrier, then destroy)."""
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
