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


def random_inception_weights(path) -> str:
    """A random state dict in the layout of the FID Inception file (``pt_inception-2015-12-05-6726825d.pth``, the
    keys torch-fidelity's ``FeatureExtractorInceptionV3`` loads strictly), saved to ``path``: He-normal convolutions
    and random batch-norm statistics, so features have a sane scale after 17 blocks."""
    import torch

    from zoo.metrics.standard import fidelity_inception_class

    cls = fidelity_inception_class()

    class _Unloaded(cls):  # the constructor always loads a file; skip that to read the layout
        def load_state_dict(self, *a, **k):
            return None

    torch.save({}, path)
    net = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in net.state_dict().items():
        if k.endswith("conv.weight"):
            fan_in = v[0].numel()
            sd[k] = torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif k.endswith(("bn.weight", "bn.running_var")):
            sd[k] = 0.8 + 0.4 * torch.rand(v.shape, generator=g)
        elif k.endswith(("bn.bias", "bn.running_mean")):
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif k.startswith("fc."):
            sd[k] = 0.05 * torch.randn(v.shape, generator=g)
        else:
            sd[k] = v
    torch.save(sd, path)
    return str(path)
