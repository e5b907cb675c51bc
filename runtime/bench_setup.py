"""What ``runtime.bench`` and the GPU suite (:mod:`runtime.suite`) both time: one spec's graph, stepper and fixed
batches, drawn once so the loader is not timed."""
from __future__ import annotations

from typing import Any

import torch


def prepare(path: str, spec: Any, synthetic: bool) -> dict[str, Any]:
    """Run components, stepper and fixed batches of one spec (``synthetic``: random tokens, images and encoders)."""
    from registry.kinds import DATASETS
    from runtime.compiler import compile_spec
    from runtime.data import build_loader
    from runtime.distributed import DistInfo, pick_device
    from runtime.train import Stepper
    from zoo.core.types import TokenBatch

    device = pick_device(spec.train.device)
    graph = compile_spec(spec, device, load_frozen=not synthetic, random_teachers=synthetic)
    stepper = Stepper(graph, DistInfo(device=device))
    tr = spec.train
    if synthetic:
        gen, micro = torch.Generator().manual_seed(tr.seed), tr.batch_size // tr.grad_accum
        raw = bool(graph.teachers) and isinstance(graph.input_shape, tuple)

        def one() -> TokenBatch:
            x0 = torch.randn(micro, graph.num_tokens, graph.modality.token_dim, generator=gen)
            y = torch.randint(0, max(graph.num_classes, 1), (micro,), generator=gen) if graph.num_classes else None
            images = torch.rand((micro, *graph.input_shape), generator=gen) * 2 - 1 if raw else None
            return TokenBatch(x0.to(device), None if y is None else y.to(device),
                              None if images is None else images.to(device))

        batches = [one() for _ in range(tr.grad_accum)]
    else:
        loader = build_loader(DATASETS.build(spec.data, split="train"), global_batch=tr.batch_size,
                              grad_accum=tr.grad_accum, rank=0, world_size=1, seed=tr.seed, num_workers=0)
        it = iter(loader)
        batches = [next(it) for _ in range(tr.grad_accum)]
    return {"path": path, "spec": spec, "graph": graph, "stepper": stepper, "batches": batches, "times": [], "peak": 0}
