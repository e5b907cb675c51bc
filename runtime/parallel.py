"""What the loop does differently when ``train.parallel`` shards the model (fsdp2, hsdp; :mod:`zoo.parallel`):
checkpoints through ``torch.distributed.checkpoint`` (:mod:`storage.sharded`, format 3), resumes that reshard to
the current world size, and a full, unsharded copy of the weights for sampling and evaluation on rank 0.

Every function here is collective: all ranks call it together."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from runtime.compiler import RunComponents, compile_spec
from runtime.distributed import DistInfo
from storage.checkpoint import save_checkpoint, staging_dir
from storage.sharded import full_weights, load_shards, save_shards


def save_sharded(root: Path, step: int, graph: RunComponents, opt: torch.optim.Optimizer, info: DistInfo, *,
                 state: dict, spec: dict, meta: dict, keep: int) -> None:
    """Write ``root/step_<step>`` as a format-3 checkpoint: rank 0 makes the staging directory, every rank writes
    its shards into it, the weights are gathered to rank 0 for the consolidated ``model``/``ema.safetensors``,
    and rank 0 finishes the directory atomically (:func:`storage.checkpoint.save_checkpoint`)."""
    where = [str(staging_dir(root, step)) if info.is_main else None]
    if info.enabled:
        dist.broadcast_object_list(where, src=0)
    tmp = Path(where[0])
    ema = graph.ema.module if graph.ema is not None else None
    groups = save_shards(tmp, graph.train_module, ema, opt)
    model_sd = full_weights(graph.train_module)
    ema_sd = full_weights(ema) if ema is not None else None
    if info.is_main:
        save_checkpoint(root, step, model=model_sd, ema=ema_sd, optimizer={"param_groups": groups}, state=state,
                        spec=spec, meta=meta, keep=keep, staged=tmp)


def restore_sharded(ck: Path, graph: RunComponents, opt: torch.optim.Optimizer, param_groups: list[dict],
                    hyper: dict[str, Any]) -> None:
    """Load the format-3 checkpoint ``ck`` into the model, EMA and optimizer as they are sharded now (any
    ``train.parallel``, any world size); ``hyper`` (betas, eps, weight_decay of the spec) replaces the saved ones.
    ValueError naming the file that does not fit."""
    groups = [{**g, **hyper, "betas": tuple(hyper.get("betas", g.get("betas", (0.9, 0.999))))} for g in param_groups]
    load_shards(ck, graph.train_module, graph.ema.module if graph.ema is not None else None, opt, groups)


def unsharded(graph: RunComponents, info: DistInfo) -> RunComponents | None:
    """Rank 0: ``graph`` with the trainable module and EMA replaced by plain, unsharded copies holding the full
    weights (gathered once, here); None on the other ranks. Sampling and evaluation run on these copies, so
    they need no collective calls. The copies are built on the run's device with the run's own spec (the same
    attention backend), costing one full model (+ EMA) of memory on rank 0 while they live."""
    ema = graph.ema.module if graph.ema is not None else None
    model_sd = full_weights(graph.train_module)
    ema_sd = full_weights(ema) if ema is not None else None
    if not info.is_main:
        return None
    devices = [graph.device.index or 0] if graph.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # compile_spec seeds the global RNG; the run's must not change
        fresh = compile_spec(graph.spec, graph.device, with_ema=ema is not None, load_frozen=False,
                             load_teachers=False)
    fresh.train_module.load_state_dict(model_sd)
    if ema_sd is not None:
        fresh.ema.load_state_dict(ema_sd, graph.ema.updates)
    return dataclasses.replace(graph, train_module=fresh.train_module, ema=fresh.ema)
