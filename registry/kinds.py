"""The registries, one per component kind. Importing this module registers nothing;
``import zoo`` registers the built-ins and :func:`registry.plugins.load_plugins` the third-party ones."""
from __future__ import annotations

from registry.core import Registry

BACKBONES: Registry = Registry("backbone", "BackboneSpec", require_tiny=True)
OBJECTIVES: Registry = Registry("objective", "ObjectiveSpec")
TIMESTEPS: Registry = Registry("timesteps", "TimestepsSpec")
AUTOENCODERS: Registry = Registry("autoencoder", "AutoencoderSpec")
MODALITIES: Registry = Registry("modality", "ModalitySpec")
DATASETS: Registry = Registry("data", "DataSpec", require_tiny=True)
SOLVERS: Registry = Registry("solver", "SolverSpec")
ATTENTION: Registry = Registry("attention", "AttentionSpec")
METRICS: Registry = Registry("metric", "MetricSpec")
LR_SCHEDULES: Registry = Registry("lr_schedule", "LRScheduleSpec")
MASKS: Registry = Registry("mask", "MaskSpec")
TEACHERS: Registry = Registry("teacher", "TeacherSpec")
POSITIONS: Registry = Registry("position", "PositionSpec")
PARALLEL: Registry = Registry("parallel", "ParallelSpec")

ALL: dict[str, Registry] = {
    r.kind: r
    for r in (BACKBONES, OBJECTIVES, TIMESTEPS, AUTOENCODERS, MODALITIES, DATASETS, SOLVERS, ATTENTION, METRICS,
              LR_SCHEDULES, MASKS, TEACHERS, POSITIONS, PARALLEL)
}
