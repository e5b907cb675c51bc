"""Sampling: a pure function of (graph, solver, noise, labels, guidance), shared by the training loop
and the CLI ``python -m runtime.sample CHECKPOINT_OR_RUN_DIR [--n N] [--steps S] [--cfg W] [--solver T]``,
which needs nothing but the checkpoint (its ``spec.resolved.json`` and weights)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from zoo.solvers.guidance import guided


def default_labels(n: int, num_classes: int, labels: list[int] | None = None) -> torch.Tensor | None:
    """``labels`` repeated to length ``n``, or 0, 1, ..., num_classes - 1 cycled; None if unconditional."""
    if num_classes == 0:
        return None
    base = labels if labels else list(range(num_classes))
    return torch.tensor([base[i % len(base)] for i in range(n)], dtype=torch.long)


@torch.no_grad()
def generate(graph: Any, n: int, labels: torch.Tensor | None, *, solver: Any = None, cfg_scale: float = 1.0,
             guidance_low: float = 0.0, guidance_high: float = 1.0, seed: int = 0, use_ema: bool = True,
             batch_size: int = 256) -> Any:
    """``n`` samples in data space ``(n, *input_shape)`` (a dict of such tensors by stream for multi-stream
    data), clamped to [-1, 1]. The noise comes from a generator seeded with ``seed`` (never the training RNG),
    drawn on the CPU so it is device-independent."""
    from runtime.compiler import tree_map

    objective = graph.train_module.objective
    if objective.reconstructs:  # not a generative flow (autoencoder training): reconstructions of held-out data
        return objective.reconstruct(graph, n, labels, use_ema=use_ema)
    net = graph.ema.module if (use_ema and graph.ema is not None) else graph.backbone
    was_training = net.training
    net.eval()
    solver = solver or graph.solver
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, graph.num_tokens, graph.modality.token_dim, generator=gen)
    out = []
    for i in range(0, n, batch_size):
        x1 = noise[i : i + batch_size].to(graph.device)
        y = labels[i : i + batch_size].to(graph.device) if labels is not None else None

        def model(x, t, yy):
            with graph.autocast():
                return net(x, t, yy).pred.float()

        v = guided(model, y, net.null_label, cfg_scale, guidance_low, guidance_high)
        x0 = solver.solve(v, x1, generator=torch.Generator(graph.device).manual_seed(seed + 1 + i))
        out.append(tree_map(lambda v: v.clamp(-1, 1).cpu(), graph.decode(x0)))
    net.train(was_training)
    if isinstance(out[0], dict):
        return {k: torch.cat([o[k] for o in out]) for k in out[0]}
    return torch.cat(out)


def indexed_labels(indices: list[int], num_classes: int, labels: list[int] | None = None, seed: int = 0,
                   mode: str = "cycle") -> torch.Tensor | None:
    """Labels ``(B,)`` of the samples with global ``indices``, each from ``(seed, index)`` alone: ``cycle``
    (``labels``, else 0 .. num_classes - 1, repeated by index, as :func:`default_labels`) or ``uniform`` (a uniform
    draw from sample ``index``'s own label generator, the ADM / REPA ``sample_ddp.py`` protocol); None if
    unconditional."""
    if num_classes == 0:
        return None
    if mode == "uniform":
        from zoo.core.types import sample_seed

        base = labels if labels else list(range(num_classes))
        draws = [int(torch.randint(len(base), (), generator=torch.Generator().manual_seed(sample_seed(seed, i, "label"))))
                 for i in indices]
        return torch.tensor([base[d] for d in draws], dtype=torch.long)
    if mode != "cycle":
        raise ValueError(f"label mode must be 'cycle' or 'uniform', got {mode!r}")
    base = labels if labels else list(range(num_classes))
    return torch.tensor([base[i % len(base)] for i in indices], dtype=torch.long)


@torch.no_grad()
def generate_indexed(graph: Any, indices: list[int], label_of: Callable[[list[int]], torch.Tensor | None], *,
                     seed: int, cfg_scale: float = 1.0, guidance_low: float = 0.0, guidance_high: float = 1.0,
                     use_ema: bool = True) -> Any:
    """The samples with global ``indices`` (one batch), ``(B, *input_shape)`` in [-1, 1] (a dict by stream for
    multi-stream data), with labels ``label_of(indices)`` ``(B,)`` (None: unconditional). Sample ``i``'s initial
    noise and every stochastic solver draw come from its own generator (:class:`zoo.core.types.SampleNoise`,
    seeded by ``(seed, i)``), so a sample does not depend on which batch, rank or number of processes makes it.
    Reconstructing objectives give the rows ``indices`` of ``objective.reconstruct(graph, max(indices) + 1,
    label_of(0 .. max(indices)))`` (held-out data in order)."""
    from runtime.compiler import tree_map
    from zoo.core.types import SampleNoise

    objective = graph.train_module.objective
    if objective.reconstructs:
        upto = max(indices) + 1
        rec = objective.reconstruct(graph, upto, label_of(list(range(upto))), use_ema=use_ema)
        return tree_map(lambda v: v[torch.tensor(indices)], rec)
    labels = label_of(list(indices))
    net = graph.ema.module if (use_ema and graph.ema is not None) else graph.backbone
    was_training = net.training
    net.eval()
    rng = SampleNoise(seed, indices)
    x1 = rng.randn((len(indices), graph.num_tokens, graph.modality.token_dim), torch.float32, graph.device)
    y = labels.to(graph.device) if labels is not None else None

    def model(x, t, yy):
        with graph.autocast():
            return net(x, t, yy).pred.float()

    v = guided(model, y, net.null_label, cfg_scale, guidance_low, guidance_high)
    x0 = graph.solver.solve(v, x1, generator=rng)
    out = tree_map(lambda v: v.clamp(-1, 1).cpu(), graph.decode(x0))
    net.train(was_training)
    return out


# ------------------------------------------------------------------------------------------------ CLI
def solver_override(saved: dict, solver: str | None, steps: int | None) -> dict:
    """The spec's solver section with the command line's ``--solver``/``--steps`` on top. Options not given
    keep the spec's values; another type keeps the fields it shares with the spec's type by inheritance
    (euler <-> heun: ``steps``, ``shift``) and gets its own defaults for the rest."""
    from registry.kinds import SOLVERS

    out = dict(saved)
    if solver and solver != saved.get("type"):
        out = {"type": solver}
        if solver in SOLVERS.names() and saved.get("type") in SOLVERS.names():
            shared = _shared_fields(SOLVERS.get(saved["type"]).Params, SOLVERS.get(solver).Params)
            out.update({k: v for k, v in saved.items() if k in shared})
    if steps:
        out["steps"] = steps
    return out


def _shared_fields(a: type, b: type) -> set[str]:
    """Fields that ``a`` and ``b`` inherit from one params class of their own kind (not ``ZooParams``'s
    ``preset``): the same meaning in both."""
    from registry.params import ZooParams

    def owners(cls: type) -> dict[str, type]:
        return {f: next((k for k in cls.__mro__ if f in vars(k).get("__annotations__", {})), cls)
                for f in cls.model_fields}

    oa, ob = owners(a), owners(b)
    return {f for f in oa if f in ob and oa[f] is ob[f] and oa[f] is not ZooParams}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.sample", description=__doc__)
    ap.add_argument("path", type=Path, help="a checkpoint directory (checkpoints/step_*) or a run directory")
    ap.add_argument("--n", type=int, default=None, help="number of samples (default: the spec's sample.n)")
    ap.add_argument("--steps", type=int, default=None, help="solver steps (default: the spec's)")
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the spec's)")
    ap.add_argument("--solver", default=None, help="solver type, e.g. euler, heun, euler_maruyama (default: the spec's; "
                                                   "euler <-> heun keep the spec's steps and shift)")
    ap.add_argument("--labels", default=None, help="comma-separated class labels to cycle")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--raw", action="store_true", help="use the trained (non-EMA) weights")
    ap.add_argument("--out", type=Path, default=None,
                    help="output PNG (default: <run>/samples/<checkpoint>_<solver>_<nfe>nfe_cfg<w>.png); clips also get "
                         "MP4/WAV files in a folder of the same name and a GIF")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    import zoo  # noqa: F401
    from registry.errors import SpecError
    from storage.checkpoint import CheckpointError
    from runtime.compiler import components_from_checkpoint
    from runtime.distributed import pick_device

    def edit(raw: dict) -> None:
        raw["solver"] = solver_override(raw["solver"], args.solver, args.steps)

    try:
        graph, ck = components_from_checkpoint(args.path, pick_device(args.device), edit)
    except (FileNotFoundError, SpecError, CheckpointError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    spec, ck_dir = graph.spec, ck.path
    s = spec.sample
    n = args.n or s.n
    wanted = [int(v) for v in args.labels.split(",")] if args.labels else s.labels
    labels = default_labels(n, graph.num_classes, wanted)
    cfg = s.cfg_scale if args.cfg is None else args.cfg
    images = generate(graph, n, labels, cfg_scale=cfg, guidance_low=s.guidance_low, guidance_high=s.guidance_high,
                      seed=s.seed if args.seed is None else args.seed, use_ema=not args.raw)
    # inside a run directory, next to the training samples (checkpoint directories get pruned)
    where = ck_dir.parent.parent / "samples" if ck_dir.parent.name == "checkpoints" else ck_dir
    out = args.out or where / f"{ck_dir.name}_{spec.solver.type}_{graph.solver.nfe}nfe_cfg{cfg:g}.png"
    from runtime.media_out import write_samples

    rates = spec.data.stream_rates()
    written = write_samples(images, labels, rates, out.parent, out.stem, nrow=graph.num_classes or None)
    out = written.sheet if not written.mp4 and not written.wav else f"{written.sheet} and {out.parent / out.stem}/"
    print(f"{n} samples from {ck_dir} (step {ck.step}, {spec.solver.type}, {graph.solver.nfe} NFE, cfg {cfg:g}"
          f"{', EMA' if not args.raw else ''}) -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
