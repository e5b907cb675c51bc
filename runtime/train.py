"""The training loop: read top to bottom.

One optimizer step = ``grad_accum`` micro-batches (forward + backward, DDP gradient sync on the last one),
then clip, a finiteness check, AdamW, EMA. A step whose loss or gradient is not finite is skipped without
touching weights, optimizer state or EMA, and counted; too many in a row stop the run with the last good
checkpoint intact. After every update the largest weight magnitude is measured on the device; the next
step's one host sync reads it (with that step's loss and gradient flags), and a checkpoint is written only
after reading it too: an update that made a weight non-finite or absurd (see :class:`Stepper`) stops the run
before anything is saved. All per-step randomness comes from ``StepRNG(seed, step, micro)``, so a resumed
run and a run on N processes see the same noise for the same sample and step.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from registry.kinds import DATASETS, METRICS, PARALLEL
from registry.spec import resolved_dict
from storage.checkpoint import (CheckpointError, checkpoint_format, load_checkpoint, rng_state, save_checkpoint,
                                set_rng_state)
from runtime.compiler import RunComponents
from runtime.data import build_loader, collate_pairs, restore_loader
from runtime.media_out import Written, real_indices, write_clip_readings, write_samples
from runtime.iofault import WRITE_ERRORS, write_fault
from runtime.distributed import DistInfo, all_max, all_min, all_reduce_mean, barrier
from runtime.latents import latent_health
from runtime.optim import LearningRate, build_optimizer
from runtime.parallel import restore_sharded, save_sharded, unsharded
from runtime.sample import default_labels, generate
from runtime.sharded_eval import SamplePlan, evaluate_sharded
from runtime.tracking import Tracker
from zoo.core.protocols import shard_units, skipped_samples
from zoo.parallel import checkpoint_blocks, local_tensor
from zoo.core.types import StepContext, StepRNG, TokenBatch


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many consecutive non-finite steps); the message says why."""


class BadUpdate(RuntimeError):
    """The last applied update left a weight non-finite or beyond :data:`WEIGHT_LIMIT`; it cannot be undone."""


WEIGHT_LIMIT = 1e4
"""An update is bad when afterwards max |w| > WEIGHT_LIMIT * max(1, max |w| when the Stepper first ran)."""


class Stepper:
    """Runs optimizer steps on a graph; shared by the loop and ``runtime.bench``."""

    def __init__(self, graph: RunComponents, info: DistInfo):
        self.graph, self.info, tr = graph, info, graph.spec.train
        tm = graph.train_module
        self.parallel = PARALLEL.build(tr.parallel)  # ddp, fsdp2, hsdp (zoo.parallel)
        if tr.activation_checkpointing:
            checkpoint_blocks(shard_units(tm.backbone), int(tr.activation_checkpointing))
        self.compiled = tm.compile_step() if tr.compile else None  # "loss" (the whole step's graph) or "backbone"
        self.model = self.parallel.wrap(tm, graph.ema.module if graph.ema is not None else None, info.device,
                                        info.world_size)
        self.params = [p for p in tm.parameters() if p.requires_grad]  # after wrap: sharded ones are DTensors
        self.opt = build_optimizer(self.params, tr, self.parallel.optimizer_device(info.device))
        self.lr = LearningRate(tr)
        self.accum, self.seed = tr.grad_accum, tr.seed
        self.micro = tr.batch_size // tr.grad_accum          # all ranks together
        self.local = self.micro // info.world_size            # this rank
        self.clip = tr.grad_clip if tr.grad_clip is not None else math.inf
        self.limit: torch.Tensor | None = None    # 0-d, on the device: the bound on max |w|
        self.w_max: torch.Tensor | None = None    # 0-d, max |w| after the last applied update (not yet read)

    @torch.no_grad()
    def _max_weight(self) -> torch.Tensor:
        """max |w| over this rank's trainable weights (its shards when sharded), a 0-d float32 tensor on the
        device (NaN if any is NaN); no sync."""
        local = [t for t in (local_tensor(p) for p in self.params) if t.numel()]
        if not local:
            return torch.zeros((), device=self.graph.device)
        return torch.stack([n.float() for n in torch._foreach_norm(local, math.inf)]).max().to(self.graph.device)

    def _raise_bad(self, w_max: float) -> None:
        what = "non-finite" if not math.isfinite(w_max) else f"as large as {w_max:.3g} (limit {float(self.limit):.3g})"
        raise BadUpdate(f"the update made a weight {what}; check train.lr ({self.graph.spec.train.lr:g}) and "
                        f"train.weight_decay ({self.graph.spec.train.weight_decay:g})")

    def _weights_ok(self) -> torch.Tensor:
        """0-d bool on the device: the last applied update left max |w| within the limit (True before any)."""
        if self.w_max is None:
            return torch.ones((), dtype=torch.bool, device=self.graph.device)
        return self.w_max <= self.limit

    def check_weights(self) -> None:
        """Read the pending weight check (one host sync); :class:`BadUpdate` if the last update was bad."""
        if self.w_max is not None and not bool(all_min(self._weights_ok()[None].float(), self.info)[0]):
            self._raise_bad(float(self.w_max))

    def step(self, step: int, batches: list) -> tuple[bool, dict[str, torch.Tensor]]:
        """One optimizer step over ``batches``: ``grad_accum`` data pairs ``(x, y)``, or ready
        ``TokenBatch``es (benchmarks on synthetic latents). Returns (applied, metrics); raises
        :class:`BadUpdate` (before touching anything) if the previous update left bad weights."""
        g, info = self.graph, self.info
        if self.limit is None:  # the largest weight over all ranks' shards
            self.limit = WEIGHT_LIMIT * all_max(self._max_weight(), info).clamp(min=1.0)
        lr = self.lr.apply(self.opt, step)
        sums: dict[str, torch.Tensor] = {}
        for m, batch in enumerate(batches):
            tokens = batch if isinstance(batch, TokenBatch) else g.to_tokens(*batch)
            rng = StepRNG(self.seed, step, m, info.rank * self.local, self.local, self.micro, g.device)
            ctx = StepContext(step, rng, ema=g.ema.module if g.ema is not None else None)
            # no gradient reduction over ranks until the last micro-batch
            with self.parallel.accumulate(self.model, sync=m == self.accum - 1):
                with g.autocast():
                    out = self.model(tokens, ctx)
                (out.loss / self.accum).backward()
            for k, v in {"loss": out.loss, **out.metrics}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / self.accum
        norm = self.parallel.clip_grad_norm(self.params, self.clip)  # the global norm over all ranks' shards
        # one host sync per step: every rank must agree before anything is touched
        flags = all_min(torch.stack([torch.isfinite(norm), torch.isfinite(sums["loss"]), self._weights_ok()]).float(),
                        info).tolist()
        if not flags[2]:
            self.opt.zero_grad(set_to_none=True)
            self._raise_bad(float(self.w_max))
        ok = bool(flags[0] and flags[1])
        if ok:
            self.opt.step()
            if g.ema is not None:
                self.parallel.settle(g.train_module, g.ema.module)  # every parameter its local shard again
                g.ema.update(g.backbone)
            self.w_max = self._max_weight()
        self.opt.zero_grad(set_to_none=True)
        return ok, {**sums, "grad_norm": norm.detach().float(), "lr": torch.tensor(lr)}


def train(graph: RunComponents, run_dir: Path, info: DistInfo, resume: Path | None = None) -> dict[str, Any]:
    spec, tr = graph.spec, graph.spec.train
    stepper = Stepper(graph, info)
    dataset = DATASETS.build(spec.data, split="train")
    loader = build_loader(dataset, global_batch=tr.batch_size, grad_accum=tr.grad_accum, rank=info.rank,
                          world_size=info.world_size, seed=tr.seed, num_workers=spec.data.num_workers)
    start, skipped = 0, 0
    last_good = resume  # what the stop messages name: the newest checkpoint known to be good
    if resume is not None:
        start, skipped = restore(graph, stepper, loader, resume, info)
    # resume_step = the checkpoint's step (0 for a fresh start): drops lines a crashed run wrote after it
    tracker = Tracker(run_dir, tensorboard=spec.log.tensorboard, enabled=info.is_main, resume_step=start)
    if info.is_main:  # unnormalised latents (wrong scale/shift or cache statistics) are said before step 1
        probe = collate_pairs([dataset[i] for i in range(min(tr.batch_size, len(dataset)))])
        for warning in latent_health(graph, probe):
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    evaluator = Evaluator(graph, run_dir, tracker) if info.is_main else None

    def checkpoint(step: int) -> None:
        loader_state = loader.state_dict()
        states = [None] * info.world_size if info.enabled else [loader_state]
        if info.enabled:
            dist.all_gather_object(states, loader_state)
        state = {"step": step, "skipped_steps": skipped, "loader": states, "rng": rng_state(),
                 "ema_updates": graph.ema.updates if graph.ema is not None else 0}
        if stepper.parallel.sharded:  # every rank writes its shards (format 3, runtime.parallel)
            save_sharded(run_dir / "checkpoints", step, graph, stepper.opt, info, state=state, spec=resolved_dict(spec),
                         meta=run_meta(graph, info), keep=tr.keep_checkpoints)
        elif info.is_main:
            save_checkpoint(
                run_dir / "checkpoints", step, model=graph.train_module.state_dict(),
                ema=graph.ema.state_dict() if graph.ema is not None else None, optimizer=stepper.opt.state_dict(),
                state=state, spec=resolved_dict(spec), meta=run_meta(graph, info), keep=tr.keep_checkpoints)
        barrier(info)

    def for_eval() -> RunComponents | None:
        """What rank 0 samples and evaluates: the graph itself, or (sharded) full copies gathered once now."""
        if not stepper.parallel.sharded:
            return graph if info.is_main else None
        plain = unsharded(graph, info)
        if evaluator is not None:
            evaluator.graph = plain
        return plain

    data, skipped_before = iter(loader), skipped
    window: dict[str, torch.Tensor] = {}
    n_window, consecutive, t_window, last_logged = 0, 0, time.perf_counter(), start
    bar = tqdm(total=tr.steps, initial=start, disable=not (info.is_main and spec.log.progress), dynamic_ncols=True,
               desc=spec.name, unit="step", mininterval=0.1 if sys.stderr.isatty() else 30.0)
    for step in range(start, tr.steps):
        try:
            ok, metrics = stepper.step(step, [next(data) for _ in range(tr.grad_accum)])
        except BadUpdate as e:
            tracker.close()
            raise TrainingStopped(f"stopped after step {step}: {e}; nothing after it was saved; "
                                  f"{good_note(last_good)}") from None
        if ok:
            consecutive = 0
            n_window += 1
            for k, v in metrics.items():
                window[k] = window.get(k, 0.0) + v
        else:
            skipped, consecutive = skipped + 1, consecutive + 1
            if info.is_main:
                bar.write(f"step {step + 1}: non-finite loss or gradient; step skipped ({consecutive} in a row)")
            if consecutive >= tr.max_consecutive_skips:
                tracker.scalars(step + 1, {"skipped_steps": skipped})
                tracker.close()
                raise TrainingStopped(
                    f"stopped at step {step + 1}: {consecutive} consecutive steps had a non-finite loss or gradient "
                    f"(train.max_consecutive_skips = {tr.max_consecutive_skips}); {good_note(last_good)}")
        done = step + 1
        bar.update(1)
        if done % spec.log.every == 0 or done == tr.steps:
            dt = time.perf_counter() - t_window
            vals = {k: float(all_reduce_mean(v / max(n_window, 1), info)) for k, v in window.items()}
            vals.update(skipped_steps=skipped, steps_per_s=(done - last_logged) / dt,
                        samples_per_s=(done - last_logged) * tr.batch_size / dt)
            skipped_data = skipped_samples(dataset)  # samples a bad media file could not give (on_error: skip)
            if skipped_data is not None:
                vals["skipped_samples"] = skipped_data
            tracker.scalars(done, vals)
            bar.set_postfix(loss=f"{vals.get('loss', float('nan')):.4f}", refresh=False)
            window, n_window, t_window, last_logged = {}, 0, time.perf_counter(), done
        if spec.sample.every and done % spec.sample.every == 0 and for_eval() is not None:
            evaluator.preview(done)
        if spec.eval.every and done % spec.eval.every == 0 and spec.eval.metrics:
            if for_eval() is not None:
                evaluator.evaluate(done)
            barrier(info)
        if done % tr.checkpoint_every == 0 or done == tr.steps:
            try:
                stepper.check_weights()
            except BadUpdate as e:
                tracker.close()
                raise TrainingStopped(f"stopped after step {done}: {e}; its checkpoint was not written; "
                                      f"{good_note(last_good)}") from None
            try:
                checkpoint(done)
            except WRITE_ERRORS as e:  # disk full, EFBIG, read-only: the earlier checkpoints are untouched
                tracker.close()
                raise TrainingStopped(f"stopped after step {done}: its checkpoint could not be written "
                                      f"({write_fault(e, run_dir / 'checkpoints')}); {good_note(last_good)}") from None
            last_good = run_dir / "checkpoints" / f"step_{done:08d}"
    bar.close()
    if tr.steps > start and skipped - skipped_before == tr.steps - start:
        tracker.close()
        raise TrainingStopped(f"all {tr.steps - start} steps of this run had a non-finite loss or gradient and were "
                              f"skipped: nothing was learned (check train.lr and the data)")
    result: dict[str, Any] = {"steps": tr.steps, "skipped_steps": skipped}
    if for_eval() is not None:
        print(preview_note(graph), flush=True)
        result["samples"] = evaluator.preview(tr.steps, final=True)
        if spec.eval.at_end and spec.eval.metrics:
            print(eval_note(evaluator), flush=True)
            result["metrics"] = evaluator.evaluate(tr.steps, with_real=True)
    barrier(info)
    tracker.close()
    return result


def good_note(last_good: Path | None) -> str:
    """The end of a stop message: where to resume from."""
    if last_good is None:
        return "no checkpoint was written before it (nothing to resume)"
    return f"the last good checkpoint is in {last_good}"


def restore(graph: RunComponents, stepper: Stepper, loader: Any, resume: Path, info: DistInfo) -> tuple[int, int]:
    """Load the checkpoint ``resume`` into the model, EMA, optimizer, loader and RNGs; returns (step, skipped).
    The spec's AdamW hyper-parameters replace the saved ones (a resume may change them).
    :class:`storage.checkpoint.CheckpointError` if anything in it does not fit."""
    tr = graph.spec.train
    sharded = checkpoint_format(resume) == 3
    if stepper.parallel.sharded and not sharded:
        raise CheckpointError(resume, f"written by an unsharded run (train.parallel ddp); train.parallel "
                                      f"{tr.parallel.type!r} resumes only sharded checkpoints (resume with ddp)")
    ck = load_checkpoint(resume, map_location=graph.device, weights=not sharded)
    hyper = {"betas": tuple(tr.betas), "eps": tr.eps, "weight_decay": tr.weight_decay}
    try:
        if sharded:  # DCP reshards to this run's world size and train.parallel (runtime.parallel)
            restore_sharded(resume, graph, stepper.opt, ck.optimizer["param_groups"], hyper)
            if graph.ema is not None:
                graph.ema.updates = int(ck.state["ema_updates"])
        else:
            graph.train_module.load_state_dict(ck.model)
            if graph.ema is not None:
                graph.ema.load_state_dict(ck.ema, int(ck.state["ema_updates"]))
            stepper.opt.load_state_dict(ck.optimizer)
            for group in stepper.opt.param_groups:
                group.update(**hyper)
        states = ck.state["loader"]
        restore_loader(loader, states[info.rank] if len(states) == info.world_size else states[0])
        set_rng_state(ck.state["rng"])
        return int(ck.step), int(ck.state["skipped_steps"])
    except (RuntimeError, KeyError, IndexError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        lines = str(e).strip().splitlines() or [type(e).__name__]
        detail = lines[min(1, len(lines) - 1)].strip()[:200]  # the first mismatch, not the "Error(s) in" header
        raise CheckpointError(resume, f"does not fit this run ({detail})") from None


def _kind(spec: Any) -> str:
    """What one sample is, for messages: images, or clips (video, audio, both)."""
    shape = spec.data.data_space().sample_shape()
    return "images" if isinstance(shape, tuple) and len(shape) == 3 else "clips"


def preview_note(graph: RunComponents) -> str:
    """``sampling 10 preview clips (euler, 25 NFE)...``: said before the end-of-run samples."""
    spec = graph.spec
    if graph.train_module.objective.reconstructs:  # reconstructions, not a flow
        return f"writing {spec.sample.n} preview {_kind(spec)}..."
    return f"sampling {spec.sample.n} preview {_kind(spec)} ({spec.solver.type}, {graph.solver.nfe} NFE)..."


def eval_note(evaluator: "Evaluator") -> str:
    """``evaluating av_agreement, ... on 100 generated clips, then on up to 100 real ones (the ceiling)...``"""
    spec = evaluator.graph.spec
    n, kind = spec.eval.num_samples, _kind(spec)
    on = f" on {n} generated {kind}, then on up to {n} real ones (the ceiling)" if evaluator.on_samples else ""
    return f"evaluating {', '.join(m.type for m in spec.eval.metrics)}{on}..."


class Evaluator:
    """Preview grids and metrics, on rank 0, with their own seeded RNGs (the training RNG is never touched)."""

    def __init__(self, graph: RunComponents, run_dir: Path, tracker: Tracker | None):
        self.graph, self.run_dir, self.tracker = graph, run_dir, tracker
        spec = graph.spec
        self.metrics = [METRICS.build(m, data_params=spec.data.data_space(), device=graph.device)
                        for m in spec.eval.metrics]
        self.on_samples = [m for m in self.metrics if not m.uses_model]
        self.on_samples_json = [e.model_dump(mode="json") for m, e in zip(self.metrics, spec.eval.metrics)
                                if not m.uses_model]
        self.on_model = [m for m in self.metrics if m.uses_model]

    def _generate(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = self.graph.spec.sample
        labels = default_labels(n, self.graph.num_classes, s.labels)
        images = generate(self.graph, n, labels, cfg_scale=s.cfg_scale, guidance_low=s.guidance_low,
                          guidance_high=s.guidance_high, seed=seed, use_ema=s.use_ema)
        return images, labels

    def preview(self, step: int, final: bool = False) -> Written:
        """Samples of ``sample.n`` under ``samples/step_<step>``: a PNG sheet for images; MP4 (with audio and a
        poster), WAV, GIF and a contact sheet for clips (:mod:`runtime.media_out`). ``final`` (the end of the
        run) adds, for clips, real held-out clips of the same labels under ``samples/real/`` and, for
        data whose metrics read clips one by one (``Metric.clip_readings``, e.g. ``bouncing_digits_av``'s AV metrics),
        what they read in each clip (``clips.json`` in both folders)."""
        s = self.graph.spec.sample
        samples, labels = self._generate(s.n, s.seed)
        rates = self.graph.spec.data.stream_rates()
        nrow = min(self.graph.num_classes, s.n) or None
        written = write_samples(samples, labels, rates, self.run_dir / "samples", f"step_{step:08d}",
                                nrow=nrow, tracker=self.tracker, step=step)
        if final and (written.mp4 or written.wav):
            self._real_clips(samples, written, nrow)
        return written

    def _real_clips(self, samples: Any, written: Written, nrow: int | None) -> None:
        """Real eval clips of ``written``'s labels to ``samples/real/``; per-clip readings beside both sets."""
        data = self.graph.spec.data.data_space()
        real = DATASETS.build(data, split="eval")
        idx = real_indices(real, written.labels)
        got = None
        if idx:
            x, y = collate_pairs([real[i] for i in idx])
            rates = data.stream_rates()
            got = write_samples(x, y if written.labels[0] is not None else None, rates, self.run_dir / "samples",
                                "real", nrow=nrow)
        for metric in self.on_samples:  # the first sample metric that reads clips one by one (Metric.clip_readings)
            readings = metric.clip_readings(samples)
            if readings is not None:
                write_clip_readings(readings, written)
                if got is not None:
                    write_clip_readings(metric.clip_readings(x), got)
                break

    def sample_plan(self, num: int | None = None, seed: int | None = None, batch_size: int | None = None,
                    label_mode: str = "cycle") -> SamplePlan:
        """The samples evaluation draws: ``eval.num_samples`` in chunks of ``eval.batch_size``, seed
        ``sample.seed + 10000``, the spec's guidance and labels (overrides for the offline command)."""
        spec = self.graph.spec
        s, e = spec.sample, spec.eval
        return SamplePlan(num=num or e.num_samples, batch_size=batch_size or e.batch_size,
                          seed=s.seed + 10_000 if seed is None else seed, cfg_scale=s.cfg_scale,
                          guidance_low=s.guidance_low, guidance_high=s.guidance_high,
                          labels=tuple(s.labels) if s.labels else None, label_mode=label_mode, use_ema=s.use_ema)

    def evaluate(self, step: int, with_real: bool = False, *, plan: SamplePlan | None = None,
                 info: DistInfo = DistInfo(), shards: Path | None = None, save_npz: Path | None = None,
                 save_png: Path | None = None, keep_shards: bool = False,
                 progress: bool = False) -> dict[str, float]:
        """Sample metrics on ``plan``'s generated samples (default :meth:`sample_plan`), streamed through
        :func:`runtime.sharded_eval.evaluate_sharded` over the ranks of ``info`` into ``shards`` (default
        ``eval/shards_step_<step>``, removed when complete unless ``keep_shards``), and, ``with_real``, on as many
        real held-out samples (the ceiling); model metrics (linear probes) on the EMA model. Rank 0 gets the values,
        writes them to ``eval/step_<step>.json`` and logs them; the other ranks get {}. The in-loop call and
        ``python -m runtime.evaluate`` both come here, so equal plans give equal numbers."""
        plan = plan or self.sample_plan()
        vals: dict[str, float] = {}
        if self.on_samples:
            folder = shards or self.run_dir / "eval" / f"shards_step_{step:08d}"
            got = evaluate_sharded(self.graph, self.on_samples, self.on_samples_json, plan, folder, info,
                                   save_npz=save_npz, save_png=save_png, progress=progress, keep=keep_shards)
            vals.update({f"eval/{k}": v for k, v in (got or {}).items()})
        if not info.is_main:
            return {}
        for m in self.on_model:
            vals.update({f"eval/{k}": v for k, v in m.evaluate_model(self.graph).items()})
        if with_real and self.on_samples:  # a latent cache: the ceiling is measured on the data it encodes
            real = DATASETS.build(self.graph.spec.data.data_space(), split="eval")
            idx = list(range(min(plan.num, len(real))))
            parts: list[list[dict[str, torch.Tensor]]] = [[] for _ in self.on_samples]
            ys = []
            for i in range(0, len(idx), plan.batch_size):
                x, y = collate_pairs([real[j] for j in idx[i:i + plan.batch_size]])
                ys.append(y)
                for j, m in enumerate(self.on_samples):
                    parts[j].append(m.sample_features(x, y))
            y_all = None if ys[0] is None else torch.cat(ys)
            for j, m in enumerate(self.on_samples):
                feats = {k: torch.cat([p[k] for p in parts[j]]) for k in parts[j][0]}
                vals.update({f"real/{k}": v for k, v in m.from_features(feats, y_all).items()})
        if self.tracker is not None:
            self.tracker.scalars(step, vals)
        (self.run_dir / "eval").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "eval" / f"step_{step:08d}.json").write_text(json.dumps(vals, indent=2) + "\n")
        return vals


def run_meta(graph: RunComponents, info: DistInfo) -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for pkg in ("fmzoo", "torch", "pydantic", "torchdata", "safetensors"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    from registry.plugins import _loaded

    return {"versions": versions, "plugins": dict(_loaded), "device": str(graph.device), "world_size": info.world_size,
            "attention": graph.attention, "attention_kernel": graph.attention_kernel, "autocast": str(graph.autocast_dtype),
            "compiled": bool(graph.spec.train.compile)}
