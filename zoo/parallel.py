"""``train.parallel``: how the trainable module is spread over the processes of a ``torchrun`` job.

* ``ddp`` (default): every rank holds the whole model, its EMA copy and the AdamW state; gradients are
  all-reduced (``DistributedDataParallel``). One process: the plain module.
* ``fsdp2``: PyTorch's ``fully_shard`` on a 1-D device mesh over all ranks, once per transformer block
  (:func:`zoo.core.protocols.shard_units`) and once at the root (the train module: embedders, output head,
  objective heads). Parameters, gradients and AdamW moments become DTensors sharded on dim 0; a block's
  weights are all-gathered just before it runs. The EMA copy is sharded the same way, so the EMA update
  works shard by shard and Self-Flow's teacher pass gathers only the blocks it runs.
* ``hsdp``: ``fully_shard`` on a 2-D mesh ``(replicate, shard)``: shard within a group of ``shard_size``
  ranks (a node), replicate across groups (gradients all-reduced between them).

The pattern (blocks, then root; a 2-D mesh for HSDP) follows torchtitan's ``parallelize`` functions
(github.com/pytorch/torchtitan) and the ``torch.distributed.fsdp.fully_shard`` documentation.
Activation checkpointing (``train.activation_checkpointing``, :func:`checkpoint_blocks`) works with all three.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, ClassVar, ContextManager, Literal

import torch
from pydantic import Field
from torch import nn

from registry.kinds import PARALLEL
from zoo.core.params import ZooParams
from zoo.core.protocols import shard_units


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: the local shard of a DTensor, ``t`` itself otherwise (no communication)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A replicated or partial DTensor (e.g. a clipped global norm) as a plain tensor; others unchanged."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def checkpoint_blocks(blocks: list[nn.Module], every: int) -> int:
    """Activation checkpointing: every ``every``-th block (the 1st, the ``1 + every``-th, ...) keeps only its
    inputs in forward and recomputes its activations in backward (``torch.utils.checkpoint``, non-reentrant).
    The block's ``forward`` is wrapped in place, so state-dict names do not change. Returns the blocks wrapped."""
    from torch.utils.checkpoint import checkpoint

    n = 0
    for i, block in enumerate(blocks):
        if i % every == 0:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)  # type: ignore[method-assign]
            n += 1
    return n


class Parallelism:
    """The base of every ``train.parallel`` entry; the loop calls only these methods.

    deps: none. ``wrap`` is called once, after the module and its EMA copy exist and before the optimizer
    is built (sharding replaces the parameters)."""

    sharded: ClassVar[bool] = False
    """True when each rank holds only a shard of the weights: checkpoints are written with
    ``torch.distributed.checkpoint`` (one file per rank, resharded on load) and evaluation gathers full weights."""

    def __init__(self, params: Any, **deps: Any):
        self.params = params

    def wrap(self, module: nn.Module, ema: nn.Module | None, device: torch.device, world_size: int) -> nn.Module:
        """Shard or replicate ``module`` (and ``ema``, in place); returns what the loop calls ``forward`` on."""
        raise NotImplementedError

    def accumulate(self, model: nn.Module, sync: bool) -> ContextManager:
        """Context of one micro-batch's backward: gradients are reduced over ranks only when ``sync``."""
        return contextlib.nullcontext()

    def settle(self, *modules: nn.Module) -> None:
        """Leave each parameter of ``modules`` as its local shard (after a forward without backward, e.g. the
        EMA teacher pass, FSDP keeps the root gathered); no-op when nothing is sharded."""

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm over all ranks' gradients; returns the norm before clipping (0-d)."""
        return full_value(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def optimizer_device(self, device: torch.device) -> torch.device:
        """Where the optimizer state lives (the CPU when it is offloaded)."""
        return device


class DDPParams(ZooParams):
    """Data parallel: the whole model on every rank."""

    type: Literal["ddp"] = Field(..., description="DistributedDataParallel: every rank holds the whole model, EMA and "
                                                  "AdamW state; gradients all-reduced (the default).")


@PARALLEL.register
class DDPParallel(Parallelism):
    Params = DDPParams

    def wrap(self, module: nn.Module, ema: nn.Module | None, device: torch.device, world_size: int) -> nn.Module:
        if world_size == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)

    def accumulate(self, model: nn.Module, sync: bool) -> ContextManager:
        return contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()


class FSDP2Params(ZooParams):
    """Fully sharded data parallel (FSDP2, ``fully_shard``) over all ranks."""

    type: Literal["fsdp2"] = Field(..., description="fully_shard per transformer block and at the root: parameters, "
                                                    "gradients, AdamW state and EMA sharded over all ranks.")
    reshard_after_forward: bool = Field(True, description="Free a block's gathered weights after its forward (gather "
                                                          "again for backward: less memory, more communication).")
    mixed_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 gathered parameters with fp32 gradient reduction on CUDA, fp32 on CPU.")
    offload_optimizer: bool = Field(False, description="Keep the sharded parameters, gradients and AdamW state in CPU "
                                                       "memory (the optimizer step runs on the CPU).")


@PARALLEL.register
class FSDP2Parallel(Parallelism):
    Params = FSDP2Params
    sharded = True

    def mesh(self, device: torch.device, world_size: int) -> Any:
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))

    def _options(self, device: torch.device, world_size: int) -> dict[str, Any]:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

        p = self.params
        opts: dict[str, Any] = {"mesh": self.mesh(device, world_size)}
        if p.mixed_precision == "bf16" or (p.mixed_precision == "auto" and device.type == "cuda"):
            opts["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if p.offload_optimizer:
            opts["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
        return opts

    def wrap(self, module: nn.Module, ema: nn.Module | None, device: torch.device, world_size: int) -> nn.Module:
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard

        if not dist.is_initialized():
            raise RuntimeError(f"train.parallel {self.params.type!r} needs a process group (runtime.distributed.init)")
        opts = self._options(device, world_size)
        for block in shard_units(module.backbone):
            fully_shard(block, reshard_after_forward=self.params.reshard_after_forward, **opts)
        fully_shard(module, reshard_after_forward=False, **opts)  # the root is gathered again at once for backward
        if ema is not None:
            ema_opts = {k: v for k, v in opts.items() if k != "offload_policy"}
            for block in shard_units(ema):
                fully_shard(block, reshard_after_forward=True, **ema_opts)
            fully_shard(ema, reshard_after_forward=True, **ema_opts)
        return module

    def accumulate(self, model: nn.Module, sync: bool) -> ContextManager:
        model.set_requires_gradient_sync(sync)  # FSDP2's no_sync: gradients stay unreduced until the last micro-batch
        return contextlib.nullcontext()

    def settle(self, *modules: nn.Module) -> None:
        from torch.distributed.fsdp import FSDPModule

        for module in modules:
            for m in module.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()

    def optimizer_device(self, device: torch.device) -> torch.device:
        return torch.device("cpu") if self.params.offload_optimizer else device


class HSDPParams(FSDP2Params):
    """Hybrid sharding: shard within groups of ``shard_size`` ranks, replicate across them."""

    type: Literal["hsdp"] = Field(..., description="fully_shard on a 2-D mesh (replicate, shard): shard within a node, "
                                                   "replicate across nodes.")
    shard_size: int | None = Field(None, gt=0, description="Ranks per shard group; null = processes per node "
                                                           "(torchrun's LOCAL_WORLD_SIZE).")


@PARALLEL.register
class HSDPParallel(FSDP2Parallel):
    Params = HSDPParams

    def mesh(self, device: torch.device, world_size: int) -> Any:
        from torch.distributed.device_mesh import init_device_mesh

        shard = self.params.shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if world_size % shard:
            raise ValueError(f"train.parallel.shard_size: {world_size} processes do not split into groups of {shard}")
        return init_device_mesh(device.type, (world_size // shard, shard), mesh_dim_names=("replicate", "shard"))
