"""Small shared builders for tests."""
from __future__ import annotations

import copy
import json
from pathlib import Path

SPECS = Path(__file__).resolve().parent.parent / "specs"
AV_RUN_SETS = ["train.steps=3", "train.warmup_steps=1", "train.batch_size=4", "train.checkpoint_every=3",
               "sample.n=4", "solver.steps=2", "eval.num_samples=6", "log.every=1", "log.progress=false",
               "data.length=64", "backbone.hidden=32", "backbone.double_blocks=1", "backbone.single_blocks=2"]
"""``--set`` edits that make ``specs/selfflow_av.json`` a seconds-long run (3 steps, a tiny backbone)."""


def tiny_spec_dict(**overrides) -> dict:
    """A tiny, fast CPU spec as a raw dict (``overrides`` replace whole top-level sections)."""
    raw = {
        "version": 1,
        "name": "test_tiny",
        "modality": {"type": "image"},
        "data": {"type": "digits", "preset": "tiny"},
        "autoencoder": {"type": "identity"},
        "backbone": {"type": "sit", "preset": "tiny"},
        "objective": {"type": "flow_matching"},
        "solver": {"type": "euler", "steps": 4},
        "train": {"steps": 6, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 3, "keep_checkpoints": 5,
                  "ema": {"decay": 0.9}},
        "sample": {"n": 10},
        "eval": {"at_end": False},
        "log": {"every": 1, "progress": False},
    }
    raw.update(copy.deepcopy(overrides))
    return raw


def load_raw(name: str) -> dict:
    return json.loads((SPECS / name).read_text())
