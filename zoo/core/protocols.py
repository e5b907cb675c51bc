"""The contract of each component kind. Constructors are ``cls(params, **deps)``; deps are runtime
values the compiler passes by keyword (never the name of a params field).

Shapes: ``B`` batch, ``N`` tokens, ``P`` token dim (channels x patch area), ``D`` backbone width.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from zoo.core.types import BackboneOut, LossOut, StepContext, StepRNG, TokenBatch

Velocity = Callable[[Tensor, Tensor], Tensor]
"""``v(x, t)``: ``x`` ``(B, N, P)``, ``t`` ``(B,)`` in RF time -> velocity ``(B, N, P)``."""


@runtime_checkable
class Backbone(Protocol):
    """deps: ``token_dim: int, grid: tuple[int, ...], num_classes: int`` (0 = unconditional) and
    ``layout: TokenLayout`` (:mod:`zoo.core.layout`: modality segments and token coordinates).

    Class labels are ``0 .. num_classes - 1``; ``null_label == num_classes`` is the CFG null row.
    ``forward(x (B,N,P), t (B,), (B,N) or GroupedTimes, y (B,) | None, taps=(), stop_after=None) -> BackboneOut``
    (:class:`zoo.core.time.GroupedTimes`: ``(B, G)`` times and each token's group, static shapes);
    ``taps`` are 1-based block indices whose outputs go into ``features``; with ``stop_after=k`` the
    blocks after ``k`` (and the output head) are skipped and ``pred`` is None.

    One optional method, declared here with its default and called only through :func:`shard_units`:
    ``shard_units() -> list[nn.Module]`` -- the transformer blocks in order, each called as a module inside
    ``forward`` (``train.parallel`` fsdp2/hsdp shards each one, ``train.activation_checkpointing`` recomputes
    them); absent: none (only the whole backbone is sharded, as one unit).
    """

    depth: int
    hidden: int
    null_label: int

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None, *, taps: tuple[int, ...] = (),
                stop_after: int | None = None, attn_mask: Tensor | None = None) -> BackboneOut:
        """``attn_mask``: optional bool ``(B, N, N)``, True where a token may attend (Self-Flow's
        attention separation)."""
        ...

    def flops(self, num_tokens: int) -> float:
        """Forward FLOPs (2 per multiply-accumulate) for one sample of ``num_tokens`` tokens."""
        ...


@runtime_checkable
class Attention(Protocol):
    """``attn(q, k, v, mask=None)``: ``q, k, v`` ``(B, N, H, Dh)`` -> ``(B, N, H, Dh)``; ``mask`` optional
    bool ``(B, N, N)``, True where attention is allowed."""

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor: ...


@runtime_checkable
class Modality(Protocol):
    """deps: ``backbone_patch: int | None`` (the backbone's patch size, if it has one), ``latent_shape`` (a tuple, or a dict of
    tuples per stream) and ``time_step_s`` (seconds per latent time step, per stream; for media).
    Layout between latents and tokens; ``layout`` (:class:`zoo.core.layout.TokenLayout`) names the
    segments and token coordinates, ``token_dim == layout.token_dim``."""

    token_dim: int
    grid: tuple[int, ...]
    layout: Any

    def to_tokens(self, z: Tensor) -> Tensor: ...        # (B, *latent_shape) -> (B, N, P)
    def from_tokens(self, tokens: Tensor) -> Tensor: ...  # (B, N, P) -> (B, *latent_shape)


@runtime_checkable
class Autoencoder(Protocol):
    """Frozen. ``encode`` ``(B, *input_shape)`` -> ``(B, *latent_shape)``; ``decode`` the inverse.
    Params declare ``latent_shape(input_shape)`` so specs are checked before anything is built."""

    def encode(self, x: Tensor) -> Tensor: ...
    def decode(self, z: Tensor) -> Tensor: ...


@runtime_checkable
class Timesteps(Protocol):
    """A distribution on [0, 1] given by its inverse CDF, so draws are ``icdf(U(0, 1))``."""

    def icdf(self, u: Tensor) -> Tensor: ...
    def sample(self, rng: StepRNG, *shape: int) -> Tensor: ...


@runtime_checkable
class Objective(Protocol):
    """An ``nn.Module`` (its own parameters, e.g. projector heads, are trained and saved with the
    backbone). ``forward(student, batch, ctx) -> LossOut``; it owns timestep sampling, noising,
    targets, label dropout, feature taps and auxiliary losses.

    deps (keywords; an objective takes the ones it needs and ignores the rest through ``**deps``):
    ``hidden``, ``depth`` (backbone width and block count), ``grid`` (token grid), ``teachers`` (frozen
    modules by spec name; empty on the meta device) and ``teacher_params`` (their params, always given).
    Optional ``extra_forward_flops(backbone, num_tokens) -> float``: FLOPs per sample it adds (a teacher
    pass), counted by ``--dry-run`` and ``runtime.bench``. Implementations derive from :class:`ObjectiveModule`,
    which declares the optional hooks."""

    def forward(self, student: torch.nn.Module, batch: TokenBatch, ctx: StepContext) -> LossOut: ...


class ObjectiveModule(nn.Module):
    """Base of every objective: its optional hooks, declared once with their defaults.

    ``needs_raw``: the objective reads ``TokenBatch.raw`` (data space) even without teachers.
    ``reconstructs``: it trains an autoencoder, not a flow; samples are then :meth:`reconstruct`'s reconstructions
    of held-out data, never a solver's output."""

    needs_raw: ClassVar[bool] = False
    reconstructs: ClassVar[bool] = False

    def extra_forward_flops(self, backbone: nn.Module, num_tokens: int) -> float:
        """FLOPs per sample it adds to ``3 x backbone forward`` (a teacher pass, projector heads); 0 by default."""
        return 0.0

    def reconstruct(self, graph: Any, n: int, labels: Tensor | None, *, use_ema: bool = True) -> Any:
        """``n`` reconstructions ``(n, *input_shape)`` in [-1, 1] of held-out samples with ``labels`` (objectives
        with ``reconstructs`` only)."""
        raise NotImplementedError(f"{type(self).__name__} trains a flow: sample it with a solver")


class Metric:
    """Base of every metric. ``metric(samples, labels) -> {name: value}`` on generated data-space samples; with
    ``uses_model`` instead ``metric.evaluate_model(graph) -> {name: value}`` on the model itself (linear probes)."""

    uses_model: ClassVar[bool] = False
    higher_is_better: ClassVar[bool | None] = None
    """Whether a larger value is better (accuracies, agreement: True; distances, offsets: False); None when
    undeclared. Read through :meth:`directions` (seed studies compare methods with it)."""

    @classmethod
    def directions(cls, params: Any) -> dict[str, bool]:
        """Name of every value the metric returns for ``params`` -> whether a larger value is better. The default
        fits a metric returning one value named after its ``type`` (``{params.type: higher_is_better}``); a
        metric whose names depend on its params or whose values differ in direction overrides it."""
        return {} if cls.higher_is_better is None else {params.type: cls.higher_is_better}

    def clip_readings(self, samples: Any) -> list[dict[str, Any]] | None:
        """What this metric reads in each sample, one JSON-ready dict per sample, for the report to show beside
        the clip (e.g. the digit a clip's video and audio read as); None (the default) when it reads nothing
        per sample."""
        return None

    def sample_features(self, samples: Any, labels: Tensor | None) -> dict[str, Tensor]:
        """The streaming interface: what this metric keeps of one batch of ``B`` generated samples, ``{name: (B,
        ...)}`` CPU tensors, row ``b`` for sample ``b``. Evaluation at scale (:mod:`runtime.sharded_eval`) calls
        it batch by batch, writes the rows to shards and hands their concatenation, in sample-index order, to
        :meth:`from_features`. The default keeps the samples themselves (``{"sample": x}``, or ``{"sample.<stream>":
        x}`` per stream of multi-stream samples): right for metrics whose inputs are small."""
        if isinstance(samples, dict):
            return {f"sample.{k}": v.detach().cpu() for k, v in samples.items()}
        return {"sample": samples.detach().cpu()}

    def from_features(self, features: dict[str, Tensor], labels: Tensor | None) -> dict[str, float]:
        """``{name: value}`` from all samples' :meth:`sample_features` rows (concatenated in sample-index order)
        and their labels ``(N,)`` (None when unconditional). The default calls the metric on the kept samples."""
        if "sample" in features:
            return self(features["sample"], labels)
        return self({k[len("sample."):]: v for k, v in features.items()}, labels)


class Dataset(Protocol):
    """What ``DATASETS.build(params, split=...)`` returns: a map-style dataset, ``len(ds)`` samples and
    ``ds[i] -> (sample, label)`` (``sample`` one data-space tensor or a dict of streams, ``label`` an int or -1).

    Two optional attributes, declared here with their defaults and read only through :func:`epoch_indexed` and
    :func:`skipped_samples` (so this is the one place a reader finds them):

    * ``epoch_indexed: bool = False`` -- the loader hands out ``epoch * len(ds) + i`` instead of ``i``, so a
      dataset can draw anew each epoch (a latent cache sampling its posteriors);
    * ``skipped_samples: int`` (absent: not counted) -- samples a bad media file could not give and another
      file stood in for (``on_error: skip``), logged as ``skipped_samples`` in the run's metrics.
    """

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Any: ...


def shard_units(backbone: Any) -> list[torch.nn.Module]:
    """``backbone.shard_units()`` (:class:`Backbone`): its transformer blocks in order; [] when it declares none."""
    units = getattr(backbone, "shard_units", None)
    return list(units()) if callable(units) else []


def epoch_indexed(dataset: Any) -> bool:
    """``dataset.epoch_indexed`` (:class:`Dataset`), False when the dataset does not declare it."""
    return bool(getattr(dataset, "epoch_indexed", False))


def skipped_samples(dataset: Any) -> int | None:
    """``dataset.skipped_samples`` (:class:`Dataset`), None for datasets that do not count skipped samples."""
    value = getattr(dataset, "skipped_samples", None)
    return None if value is None else int(value)


@runtime_checkable
class DrawnObjective(Objective, Protocol):
    """An objective whose randomness is drawn apart from its loss (``flow_matching``, ``selfflow``, ``repa``), so
    that ``train.compile`` traces the whole loss as one graph: ``forward(student, batch, ctx) ==
    loss(student, batch, draw(student, batch, ctx.rng), ctx.ema)``. ``draw`` makes every generator call
    (eager); ``loss`` is tensor code without host synchronisation (``torch.compile(fullgraph=True)`` works)."""

    def draw(self, student: torch.nn.Module, batch: TokenBatch, rng: StepRNG) -> Any: ...
    def loss(self, student: torch.nn.Module, batch: TokenBatch, draws: Any, ema: torch.nn.Module | None) -> LossOut: ...


@runtime_checkable
class TokenMask(Protocol):
    """Which tokens get the second timestep (Self-Flow's Dual-Timestep Scheduling).
    ``sample(rng, num_tokens) -> (B, N) bool`` (True = the token is in the second-timestep group)."""

    def sample(self, rng: StepRNG, num_tokens: int) -> Tensor: ...


@runtime_checkable
class Teacher(Protocol):
    """A frozen external encoder (REPA's target), an ``nn.Module`` in eval mode with its own preprocessing.
    deps: ``input_shape`` (one data sample) and ``token_grid`` (the generator's token grid).
    ``features(raw (B, *input_shape) in [-1, 1], grid=None) -> (B, M, F)``: patch features, row-major on
    ``params.feature_grid(input_shape, grid)``; params declare ``feature_dim`` (and optionally ``flops``) so
    shapes and costs are known before any weights load."""

    def features(self, raw: Tensor, grid: tuple[int, ...] | None = None) -> Tensor: ...


@runtime_checkable
class Solver(Protocol):
    """``solve(velocity, noise, generator=None) -> x0``: integrates from t = 1 (``noise`` ``(B, N, P)``) to
    t = 0. ``nfe`` is the number of velocity evaluations it makes. ``generator`` (stochastic solvers) is a
    ``torch.Generator`` or a :class:`zoo.core.types.SampleNoise` (one generator per sample: draw through
    :func:`zoo.core.types.normal_like`)."""

    nfe: int

    def solve(self, velocity: Velocity, noise: Tensor, generator: Any = None) -> Tensor: ...


@runtime_checkable
class LRSchedule(Protocol):
    """``factor(step, total_steps, warmup_steps) -> float`` multiplies the base learning rate."""

    def factor(self, step: int, total_steps: int, warmup_steps: int) -> float: ...
