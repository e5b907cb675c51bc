"""Issue 5's promise: one spec moves between pixel space, an in-project learned latent space and a pretrained
diffusers autoencoder by changing ``autoencoder`` alone."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from runtime import run as run_cli
from runtime.compiler import components_from_checkpoint
from runtime.tracking import read_jsonl
from tests.test_diffusers_ae import tiny_kl

SPECS = Path(__file__).resolve().parent.parent / "specs"
TINY = ["train.steps=2", "train.warmup_steps=0", "train.batch_size=4", "train.checkpoint_every=2",
        "eval.at_end=false", "sample.n=4", "solver.steps=2", "log.every=1", "log.progress=false",
        "log.tensorboard=false", "backbone.hidden=32", "backbone.depth=2", "backbone.heads=2"]


def _run(spec: Path, out: Path, sets: list[str]) -> int:
    return run_cli.main([str(spec), "--out", str(out)] + [a for s in sets for a in ("--set", s)])


@pytest.fixture(scope="module")
def autoencoders(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("swap")
    vae = tmp / "vae_digits"  # a 1-step run of the shipped AE spec
    assert _run(SPECS / "vae_digits.json", vae, ["train.steps=1", "train.warmup_steps=0", "train.batch_size=2",
                                                  "train.checkpoint_every=1", "eval.at_end=false", "sample.n=2",
                                                  "log.progress=false", "log.tensorboard=false",
                                                  "backbone.channels=[8,8]", "backbone.groups=4"]) == 0
    kl = tiny_kl(in_channels=1, out_channels=1, scaling_factor=0.5)  # 1-channel, downsample 2
    kl.save_pretrained(tmp / "kl")
    return {"pixels": {"type": "identity"},
            "learned": {"type": "conv_vae", "run": str(vae)},
            "pretrained": {"type": "diffusers", "class_name": "AutoencoderKL", "path": str(tmp / "kl")}}


@pytest.mark.parametrize("kind,tokens", [("pixels", 256), ("learned", 16), ("pretrained", 64)])
def test_only_the_autoencoder_changes(kind, tokens, autoencoders, tmp_path):
    raw = json.loads((SPECS / "selfflow_digits_latent.json").read_text())
    raw["autoencoder"] = autoencoders[kind]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(raw))
    out = tmp_path / "run"
    assert _run(spec, out, TINY) == 0
    resolved = json.loads((out / "spec.resolved.json").read_text())
    shipped = json.loads((SPECS / "selfflow_digits_latent.json").read_text())
    assert resolved["modality"]["type"] == shipped["modality"]["type"] and resolved["data"]["size"] == 32
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)
    assert (out / "samples" / "step_00000002.png").is_file()
    graph, _ = components_from_checkpoint(out, torch.device("cpu"))
    assert graph.num_tokens == tokens
    x = graph.decode(torch.zeros(1, graph.num_tokens, graph.modality.token_dim))
    assert tuple(x.shape) == (1, 1, 32, 32)


def test_audio_flow_in_a_learned_audio_latent(tmp_path):
    """The audio counterpart: Self-Flow on the latent of a (1-step) ``vae_audio`` run writes playable WAVs."""
    vae = tmp_path / "vae_audio"
    assert _run(SPECS / "vae_audio.json", vae, ["train.steps=1", "train.warmup_steps=0", "train.batch_size=2",
                                                 "train.checkpoint_every=1", "eval.at_end=false", "sample.n=2",
                                                 "log.progress=false", "log.tensorboard=false",
                                                 "backbone.channels=[8,8]", "backbone.groups=4"]) == 0
    out = tmp_path / "flow"
    sets = [s for s in TINY if not s.startswith("backbone.")] + [
        f"autoencoder.run={vae}", "autoencoder.stats_samples=16", "backbone.hidden=32", "backbone.double_blocks=1",
        "backbone.single_blocks=1"]
    assert _run(SPECS / "selfflow_audio_latent.json", out, sets) == 0
    graph, _ = components_from_checkpoint(out, torch.device("cpu"))
    assert graph.latent_shape == (8, 250) and graph.num_tokens == 50  # 4000 samples / 16, patches of 5
    wavs = sorted((out / "samples" / "step_00000002").glob("*.wav"))
    assert len(wavs) == 4 and all(w.stat().st_size > 8000 for w in wavs)
