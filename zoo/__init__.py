"""The zoo: built-in components. Importing this package registers every built-in entry (the explicit
list below, so a reader can grep where a tag comes from) and builds the spec model."""
from __future__ import annotations

import importlib

_BUILTINS = [
    "zoo.layers.attention",
    "zoo.layers.positions",
    "zoo.objectives.timesteps",
    "zoo.objectives.flow_matching",
    "zoo.objectives.masks",
    "zoo.objectives.selfflow",
    "zoo.objectives.repa",
    "zoo.objectives.autoencoder",
    "zoo.teachers.vit",
    "zoo.teachers.efficientnet",
    "zoo.teachers.digit_classifier",
    "zoo.backbones.sit",
    "zoo.backbones.converted",
    "zoo.backbones.mmdit",
    "zoo.autoencoders.identity",
    "zoo.autoencoders.audio",
    "zoo.autoencoders.streams",
    "zoo.autoencoders.diffusers_ae",
    "zoo.autoencoders.conv_vae",
    "zoo.autoencoders.clip_vae",
    "zoo.modalities.image",
    "zoo.modalities.media",
    "zoo.data.digits",
    "zoo.data.image_folder",
    "zoo.data.bouncing_av",
    "zoo.data.media_folders",
    "zoo.data.latent_shards",
    "zoo.solvers.ode",
    "zoo.solvers.sde",
    "zoo.metrics.classifier",
    "zoo.metrics.linear_probe",
    "zoo.metrics.av",
    "zoo.lr_schedules",
]

for _m in _BUILTINS:
    importlib.import_module(_m)

from registry.spec import rebuild as _rebuild  # noqa: E402

_rebuild()
