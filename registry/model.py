"""The root ``Spec`` model: the untagged sections (``train``, ``sample``, ``eval``, ``log``) and :func:`rebuild`,
which builds the model from the components registered now.

Nested choices inside params models (an attention backend inside a backbone, a timestep distribution
inside an objective) are written as forward references to a registry's union name, e.g.
``attention: "AttentionSpec | None"``; :func:`rebuild` resolves every such reference against the
entries registered now, so a plugin's new entry is accepted everywhere its kind is. This module imports no
component: ``zoo`` calls :func:`rebuild` once its modules are registered.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field

from registry.kinds import ALL, AUTOENCODERS, LR_SCHEDULES, PARALLEL, SOLVERS
from registry.params import Settings


class EMASettings(Settings):
    decay: float = Field(0.9999, ge=0.0, lt=1.0, description="EMA decay per optimizer step (SiT/REPA/Self-Flow: 0.9999).")
    warmup_steps: int = Field(
        0, ge=0, description="If > 0, the decay at update n is min(decay, (1 + n) / (warmup_steps + n)); 0 = constant decay."
    )


class TrainSettings(Settings):
    steps: int = Field(..., gt=0, description="Optimizer steps in the run.")
    batch_size: int = Field(..., gt=0, le=2**20, description="Global batch size (all ranks and accumulation micro-steps "
                                                               "together); at most 2^20.")
    grad_accum: int = Field(1, gt=0, description="Micro-steps accumulated per optimizer step.")
    lr: float = Field(1e-4, gt=0, description="Base AdamW learning rate (REPA/SiT: 1e-4).")
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(
        (0.9, 0.999), description="AdamW betas, each in [0, 1).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up from 0, in optimizer steps.")
    lr_schedule: "LRScheduleSpec" = Field(default_factory=lambda: LR_SCHEDULES.get("constant").Params(type="constant"),
                                          description="Learning-rate schedule after warm-up.")
    grad_clip: float | None = Field(1.0, gt=0, description="Max global gradient norm; null disables clipping.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast on CUDA, fp32 on CPU (bf16 backward is slow on CPUs).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available.")
    ema: EMASettings = Field(default_factory=EMASettings, description="EMA of the backbone (evaluated; Self-Flow's teacher).")
    seed: int = Field(0, ge=0, description="Seed of initialisation, data order and per-step noise (0 to 2^63 - 1).")
    checkpoint_every: int = Field(1000, gt=0, description="Save a checkpoint every this many steps (and at the end).")
    keep_checkpoints: int = Field(3, gt=0, description="Keep the newest this many checkpoints.")
    max_consecutive_skips: int = Field(
        20, gt=0, description="Stop the run after this many consecutive steps skipped for a non-finite loss or gradient.")
    parallel: "ParallelSpec" = Field(default_factory=lambda: PARALLEL.get("ddp").Params(type="ddp"),
                                     description="How the model is spread over torchrun's processes: ddp (replicated), "
                                                 "fsdp2 (sharded) or hsdp (sharded within a node, replicated across).")
    activation_checkpointing: bool | Annotated[int, Field(ge=1)] = Field(
        False, description="Recompute transformer blocks' activations in backward instead of keeping them: true = every "
                           "block, N = every N-th block (1st, N+1-th, ...); any train.parallel.")
    compile: bool = Field(False, description="torch.compile the whole training loss (student, teacher pass, heads; the random draws stay eager) as one graph; slow first step; off on CPU by default.")


class SampleSettings(Settings):
    every: int | None = Field(None, gt=0, description="Write a preview sample grid every this many steps (null = only at the end).")
    n: int = Field(16, gt=0, le=10_000, description="Samples per preview / per `runtime.sample` call (at most 10,000).")
    cfg_scale: float = Field(1.0, ge=0, description="Classifier-free guidance scale w in v_u + w (v_c - v_u); 1 = off.")
    guidance_low: float = Field(0.0, ge=0, le=1, description="Guidance applies for t in [low, high] (RF time).")
    guidance_high: float = Field(1.0, ge=0, le=1, description="Upper end of the guidance interval (REPA: 0.7).")
    seed: int = Field(0, ge=0, description="Seed of the sampling noise (independent of the training RNG; 0 to 2^63 - 1).")
    labels: list[int] | None = Field(None, description="Class labels to sample; null cycles 0, 1, ..., num_classes - 1.")
    use_ema: bool = Field(True, description="Sample from the EMA weights.")


class EvalSettings(Settings):
    every: int | None = Field(None, gt=0, description="Evaluate every this many steps (null = only at the end).")
    at_end: bool = Field(True, description="Evaluate once after the last step.")
    num_samples: int = Field(200, gt=0, le=100_000, description="Generated samples per evaluation (streamed into "
                                                               "metric features batch by batch; at most 100,000).")
    batch_size: int = Field(256, gt=0, description="Samples per sampling batch (chunk) in evaluation; the same value "
                                                   "gives the same samples on any number of processes.")
    metrics: list["MetricSpec"] = Field(default_factory=list, description="Metrics to compute.")


class LogSettings(Settings):
    every: int = Field(10, gt=0, description="Log scalars every this many steps.")
    tensorboard: bool = Field(True, description="Write tensorboard events under tb/.")
    progress: bool = Field(True, description="Show a progress bar.")


SECTION_MODELS: list[type[pydantic.BaseModel]] = [TrainSettings, SampleSettings, EvalSettings]


class SpecBase(Settings):
    schema_: str | None = Field(None, alias="$schema", description="Path of the JSON Schema, for editors.")
    version: Literal[1] = Field(..., description="Spec format version.")
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="Run name; default run dir runs/<name>.")

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @pydantic.field_validator("name")
    @classmethod
    def _plain_file_name(cls, v: str) -> str:
        """The pattern keeps out '/', but '.' and '..' would make runs/<name> the runs folder or its parent."""
        if set(v) <= {"."}:
            raise ValueError(f"{v!r} is not a plain file name; the run directory is runs/<name>")
        return v


def _no_entries(kind: str) -> type[pydantic.BaseModel]:
    """Placeholder for a kind with no entries: rejects every value, instead of breaking the models naming it."""

    def reject(cls, data: Any) -> Any:
        raise ValueError(f"no {kind} type is registered")

    return pydantic.create_model(f"No_{kind}", __validators__={
        "reject": pydantic.model_validator(mode="before")(classmethod(reject))})


def _namespace() -> dict[str, Any]:
    return {r.ref: r.union() if r.names() else _no_entries(r.kind) for r in ALL.values()}


_SPEC_MODEL: type[SpecBase] | None = None


def rebuild() -> type[SpecBase]:
    """Resolve every registry forward reference and build the root ``Spec`` model (call after registering)."""
    global _SPEC_MODEL
    ns = _namespace()
    models = [m for r in ALL.values() for m in r.params_models()] + SECTION_MODELS
    for _ in range(2):  # twice: a model rebuilt first may embed one rebuilt later
        for m in models:
            m.model_rebuild(force=True, _types_namespace=ns)
        ns = _namespace()
    sections = {
        "modality": (ns["ModalitySpec"], Field(..., description="How latents become tokens.")),
        "data": (ns["DataSpec"], Field(..., description="Training data.")),
        "autoencoder": (ns["AutoencoderSpec"], Field(
            default_factory=lambda: AUTOENCODERS.get("identity").Params(type="identity"), description="Frozen autoencoder.")),
        "backbone": (ns["BackboneSpec"], Field(..., description="The trained network.")),
        "teachers": (dict[str, ns["TeacherSpec"]], Field(  # type: ignore[valid-type]
            default_factory=dict, description="Frozen external encoders by local name (REPA's targets); objectives "
                                              "refer to them by that name.")),
        "objective": (ns["ObjectiveSpec"], Field(..., description="Training objective.")),
        "solver": (ns["SolverSpec"], Field(
            default_factory=lambda: SOLVERS.get("euler").Params(type="euler"), description="Sampler.")),
        "train": (TrainSettings, Field(..., description="Optimisation, precision, EMA, checkpoints.")),
        "sample": (SampleSettings, Field(default_factory=SampleSettings, description="Sampling and guidance.")),
        "eval": (EvalSettings, Field(default_factory=EvalSettings, description="Evaluation metrics and cadence.")),
        "log": (LogSettings, Field(default_factory=LogSettings, description="Logging.")),
    }
    _SPEC_MODEL = pydantic.create_model("Spec", __base__=SpecBase, **sections)  # type: ignore[call-overload]
    return _SPEC_MODEL


def current() -> type[SpecBase] | None:
    """The model the last :func:`rebuild` made (None before the first)."""
    return _SPEC_MODEL
