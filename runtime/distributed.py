"""Process-group setup for ``torchrun`` (gloo on CPU, nccl on CUDA) and the few collectives the loop needs.
Without torchrun's environment everything degrades to a single process."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(want: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA (this process's local GPU) when available, else CPU."""
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init(device_pref: str = "auto", group: bool = False) -> DistInfo:
    """Join the process group that torchrun describes in the environment, if any. ``group``: a single process
    (no torchrun) gets a process group of its own too (an in-memory store), for a sharded ``train.parallel``
    whose one-rank device mesh needs one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local)
    if (world > 1 or group) and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if world > 1:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistInfo(rank, world, local, device)


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t)
        t /= info.world_size
    return t


def all_true(flag: bool, info: DistInfo) -> bool:
    """True only if ``flag`` is True on every rank."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def all_min(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Element-wise minimum of ``t`` over all ranks (``t`` itself with one process); no host sync."""
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Element-wise maximum of ``t`` over all ranks (``t`` itself with one process); no host sync."""
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def shutdown(info: DistInfo) -> None:
    """Leave the process group :func:`init` joined (also a single process's own)."""
    if dist.is_initialized():
        dist.destroy_process_group()
