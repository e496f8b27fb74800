"""Process-group set-up for the trainers: torchrun's env:// rendezvous, one process otherwise."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from beit.errors import TrainingError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        """In place over the ranks ("sum" or "max"); a no-op in one process."""
        if self.enabled:
            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device_arg: str) -> Dist:
    """torchrun's env:// rendezvous when WORLD_SIZE > 1: NCCL on GPUs, gloo on CPUs; one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device_arg.startswith("cuda") or (device_arg == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise TrainingError("--device cuda but CUDA is not available")
    if want_cuda:
        device = torch.device(device_arg) if ":" in device_arg else torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo", init_method="env://")
    return Dist(rank, world, local, device)


def shutdown() -> None:
    """Destroy the process group if one is up (a gloo group left alive at exit can abort the process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
