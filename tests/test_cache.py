"""Latent caches: ``python -m runtime.cache``, the ``latent_shards`` data, identity refusal and statistics."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import runtime.cache as cache_mod
import zoo  # noqa: F401
from registry.errors import SpecError
from registry.kinds import AUTOENCODERS, DATASETS
from registry.spec import validate
from runtime.cache import build_cache
from runtime.compiler import compile_spec
from runtime.latents import latent_health
from storage.latent_cache import CacheMismatch, autoencoder_identity, shard_plan
from tests.helpers import tiny_spec_dict
from zoo.autoencoders.base import AutoencoderModule
from zoo.autoencoders.identity import IdentityAutoencoderParams
from zoo.data.latent_shards import LatentShards, noise_seed, without_cache_checks

ROOT = Path(__file__).resolve().parent.parent
N = 70  # samples in the tiny caches (3 shards of 30, 30, 10)
SOURCE = {"type": "digits", "preset": "tiny", "length": N}


class AffineAE(AutoencoderModule):
    """A small deterministic autoencoder with weights and a posterior: raw mean = GAIN * x + 0.5, logvar = -3."""

    Params = IdentityAutoencoderParams
    GAIN = 2.0

    def __init__(self, params):
        super().__init__()
        self.params = params
        self.gain = nn.Parameter(torch.tensor([self.GAIN]), requires_grad=False)
        self.bias = nn.Parameter(torch.tensor([0.5]), requires_grad=False)

    def moments(self, x):
        return x * self.gain.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1), torch.full_like(x, -3.0)

    def decode_raw(self, z):
        return (z - self.bias.view(1, -1, 1, 1)) / self.gain.view(1, -1, 1, 1)

    def published_stats(self):
        return 0.5, 2.0

    def encode(self, x):
        return (self.moments(x)[0] - 0.5) / 2.0

    def decode(self, z):
        return self.decode_raw(z * 2.0 + 0.5)


def spec_for(cache: Path, **data) -> object:
    return validate(tiny_spec_dict(data={"type": "latent_shards", "path": str(cache), "source": SOURCE, **data}))


def make(cache: Path, **kw) -> Path:
    with without_cache_checks():
        spec = spec_for(cache)
    return build_cache(spec, cache, shard_size=30, batch_size=16, progress=False, **kw)


@pytest.fixture
def affine():
    with AUTOENCODERS.override(AffineAE):
        yield


@pytest.fixture
def affine_cache(affine, tmp_path) -> Path:
    return make(tmp_path / "cache")


def source_batch():
    ds = DATASETS.build(validate(tiny_spec_dict(data=SOURCE)).data, split="train")
    return torch.stack([ds[i][0] for i in range(N)]), torch.tensor([ds[i][1] for i in range(N)])


# ----------------------------------------------------------------------------------------- shard plan
@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 500), size=st.integers(1, 64), ranks=st.integers(1, 9))
def test_shard_plan_covers_every_sample_exactly_once(n, size, ranks):
    plan = shard_plan(n, size, ranks)
    seen = sorted(i for s in plan for i in range(s.start, s.stop))
    assert seen == list(range(n))
    assert all(1 <= s.count <= size and 0 <= s.rank < ranks for s in plan)
    for r in range(ranks):
        mine = [s for s in plan if s.rank == r]
        assert [s.index for s in mine] == list(range(len(mine)))
        assert all(a.stop <= b.start for a, b in zip(mine, mine[1:]))  # disjoint, in order
    assert len({s.file for s in plan}) == len(plan)


def test_shard_plan_rejects_nonsense():
    with pytest.raises(ValueError):
        shard_plan(10, 0, 1)


# -------------------------------------------------------------------------------------------- identity
def test_identity_same_weights_same_hash_changed_weight_differs():
    p = IdentityAutoencoderParams(type="identity")
    a, b = AffineAE(p), AffineAE(p)
    assert autoencoder_identity(p, a) == autoencoder_identity(p, b)
    with torch.no_grad():
        b.bias += 1e-3
    assert autoencoder_identity(p, a)["weights_sha256"] != autoencoder_identity(p, b)["weights_sha256"]
    assert autoencoder_identity(p, AUTOENCODERS.build(p))["weights_sha256"] == "none"


# ---------------------------------------------------------------------------------- round trip + stats
def test_round_trip_decode_and_statistics(affine_cache):
    m = json.loads((affine_cache / "manifest.json").read_text())
    assert m["complete"] and m["num_samples"] == N and m["stored"] == "mean+logvar"
    assert [s["count"] for s in m["shards"]] == [30, 30, 10] and m["latent_shape"] == [1, 16, 16]
    x, y = source_batch()
    ae = AffineAE(IdentityAutoencoderParams(type="identity"))
    raw_mean, _ = ae.moments(x)
    flat = raw_mean.double().transpose(0, 1).reshape(1, -1)
    assert m["stats"]["source"] == "measured"
    assert m["stats"]["mean"] == pytest.approx(flat.mean(1).tolist(), rel=1e-9)
    assert m["stats"]["std"] == pytest.approx(flat.std(1, unbiased=False).tolist(), rel=1e-9)

    spec = spec_for(affine_cache)
    ds = DATASETS.build(spec.data, split="train")
    z = torch.stack([ds[i][0] for i in range(N)])
    assert [ds[i][1] for i in range(N)] == y.tolist()
    assert abs(float(z.mean())) < 1e-5 and float(z.std(unbiased=False)) == pytest.approx(1.0, rel=1e-5)
    g = compile_spec(spec, torch.device("cpu"))
    tokens = g.to_tokens(z, y)
    assert torch.equal(tokens.x0, g.modality.to_tokens(z))  # no encoder on cached latents
    direct = ae.decode_raw(raw_mean)
    assert torch.allclose(g.decode(tokens.x0), direct, atol=1e-5)
    assert torch.allclose(direct, x, atol=1e-5)
    assert latent_health(g, (z[:16], y[:16])) == []


def test_autoencoder_stats_are_the_published_ones(affine, tmp_path):
    out = make(tmp_path / "c", stats="autoencoder")
    st_ = json.loads((out / "manifest.json").read_text())["stats"]
    assert (st_["source"], st_["mean"], st_["std"]) == ("autoencoder", [0.5], [2.0])
    with pytest.raises(SpecError, match="measured"):  # the spec asks for measured statistics: refused
        spec_for(out)
    spec = spec_for(out, stats="autoencoder")
    x, y = source_batch()
    z = DATASETS.build(spec.data, split="train")[3][0]
    assert torch.allclose(z, ((2.0 * x[3] + 0.5) - 0.5) / 2.0, atol=1e-6)


def test_latent_health_flags_wrong_statistics(affine_cache):
    m = json.loads((affine_cache / "manifest.json").read_text())
    m["stats"]["std"] = [s / 50 for s in m["stats"]["std"]]  # a cache normalised with the wrong std
    (affine_cache / "manifest.json").write_text(json.dumps(m))
    g = compile_spec(spec_for(affine_cache), torch.device("cpu"))
    ds = DATASETS.build(g.spec.data, split="train")
    batch = (torch.stack([ds[i][0] for i in range(16)]), torch.zeros(16, dtype=torch.long))
    msgs = latent_health(g, batch)
    assert msgs and "unnormalised" in msgs[0] and "autoencoder.scale/shift" in msgs[0]


# ------------------------------------------------------------------------------------------- resuming
def test_interrupted_caching_resumes_without_duplicates(affine, tmp_path, monkeypatch):
    ref = make(tmp_path / "ref")
    real, calls = cache_mod._write_shard, []

    def flaky(path, tensors):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        calls.append(path.name)
        real(path, tensors)

    monkeypatch.setattr(cache_mod, "_write_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        make(tmp_path / "run")
    part = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert part["complete"] is False and len(list((tmp_path / "run").glob("shard_*"))) == 2
    with pytest.raises(Exception, match="incomplete"):
        DATASETS.build(_unchecked(tmp_path / "run"), split="train")
    written = []
    monkeypatch.setattr(cache_mod, "_write_shard", lambda p, t: (written.append(p.name), real(p, t)))
    make(tmp_path / "run")
    assert written == ["shard_00_00002.safetensors"]  # only the missing shard
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == sorted(p.name for p in ref.iterdir())  # no temporary or extra files
    for f in ref.glob("shard_*"):
        assert (tmp_path / "run" / f.name).read_bytes() == f.read_bytes()
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (ref, tmp_path / "run"))
    assert a == b


def _unchecked(cache: Path):
    """latent_shards params without the spec-level checks (for a cache that is deliberately incomplete)."""
    return LatentShards.Params(type="latent_shards", path=str(cache), source=SOURCE)


# ------------------------------------------------------------------------------------------ refusals
def test_other_autoencoder_in_the_directory_is_refused(affine_cache, monkeypatch):
    monkeypatch.setattr(AffineAE, "GAIN", 3.0)
    with pytest.raises(CacheMismatch) as e:
        make(affine_cache)
    msg = str(e.value)
    assert "identity" in msg and msg.count("weights_sha256=") == 2 and str(affine_cache) in msg
    # training with the changed weights is refused at compile time, naming both
    with pytest.raises(CacheMismatch) as e:
        compile_spec(spec_for(affine_cache), torch.device("cpu"))
    assert "cache:" in str(e.value) and "spec:" in str(e.value) and "re-cache" in str(e.value)


def test_cache_of_another_autoencoder_refused_at_compile(tmp_path):
    with AUTOENCODERS.override(AffineAE):
        spec = spec_for(make(tmp_path / "cache"))
    with pytest.raises(CacheMismatch) as e:  # the registered identity (no weights), not the one that cached
        compile_spec(spec, torch.device("cpu"))
    assert "AffineAE" in str(e.value) and "IdentityAutoencoder" in str(e.value)


def test_missing_cache_is_a_spec_error_at_data_path(tmp_path):
    raw = tiny_spec_dict(data={"type": "latent_shards", "path": str(tmp_path / "none")})
    with pytest.raises(SpecError) as e:
        validate(raw)
    assert any(p == "data.path" and "python -m runtime.cache" in m for p, m in e.value.problems)


# ---------------------------------------------------------------------------------- posterior samples
def test_posterior_sampling_is_deterministic_per_seed_index_epoch(affine_cache):
    ds = DATASETS.build(spec_for(affine_cache, sample_posterior=True).data, split="train")
    mean_ds = DATASETS.build(spec_for(affine_cache).data, split="train")
    a, b = ds[5][0], ds[5][0]
    assert torch.equal(a, b) and not torch.equal(a, mean_ds[5][0])
    assert not torch.equal(ds[5][0], ds[5 + N][0])  # draw 1 of sample 5 differs from draw 0
    assert ds[5 + N][1] == ds[5][1]
    mean, logvar, _ = ds.raw_item(5)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(noise_seed(0, 5, 0)))
    m, s = ds.stats
    assert torch.allclose(a, (mean + torch.exp(logvar / 2) * eps - m) / s, atol=1e-6)
    other = DATASETS.build(spec_for(affine_cache, sample_posterior=True, seed=1).data, split="train")
    assert not torch.equal(other[5][0], a)


def test_posterior_sampling_without_logvar_gives_the_mean(tmp_path):
    out = make(tmp_path / "c")  # identity autoencoder: no logvar stored
    assert json.loads((out / "manifest.json").read_text())["stored"] == "mean"
    post = DATASETS.build(spec_for(out, sample_posterior=True).data, split="train")
    plain = DATASETS.build(spec_for(out).data, split="train")
    assert all(torch.equal(post[i][0], plain[i][0]) for i in (0, 33, N - 1))


# ------------------------------------------------------------------------------------- torchrun + run
def test_torchrun_two_ranks_write_their_shards_and_one_manifest(tmp_path):
    if shutil.which("torchrun") is None and not _has_module("torch.distributed.run"):
        pytest.skip("torchrun unavailable")
    single = make(tmp_path / "single")
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(tiny_spec_dict(data={"type": "latent_shards", "path": str(tmp_path / "ddp"),
                                                         "source": SOURCE})))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "runtime.cache", str(spec_file), "--shard-size", "30", "--batch-size", "16"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = tmp_path / "ddp"
    names = sorted(p.name for p in ddp.glob("shard_*"))
    assert names == ["shard_00_00000.safetensors", "shard_00_00001.safetensors", "shard_01_00000.safetensors"]
    m = json.loads((ddp / "manifest.json").read_text())
    assert {s["rank"] for s in m["shards"]} == {0, 1} and m["complete"]
    assert m["stats"] == json.loads((single / "manifest.json").read_text())["stats"]
    a = DATASETS.build(spec_for(single).data, split="train")
    b = DATASETS.build(spec_for(ddp).data, split="train")
    assert all(torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] for i in range(N))


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.mark.slow  # trains through the CLI
def test_two_step_training_run_on_a_cache(affine_cache, tmp_path):
    from runtime.run import main

    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(tiny_spec_dict(
        data={"type": "latent_shards", "path": str(affine_cache), "source": SOURCE, "sample_posterior": True})))
    assert main([str(spec_file), "--out", str(tmp_path / "run"), "--set", "train.steps=2"]) == 0
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == [1, 2]
    assert (tmp_path / "run" / "samples" / "step_00000002.png").is_file()


@pytest.mark.slow  # trains through the CLI
def test_digit_metrics_and_ceiling_on_a_cache_without_source(affine_cache, tmp_path):
    """A cache named by its path alone still tells metrics what it encodes (the manifest's data spec): the digit
    metrics validate, and the real-data ceiling is measured on that data."""
    from registry.kinds import DATASETS as D
    from runtime.run import main

    raw = tiny_spec_dict(data={"type": "latent_shards", "path": str(affine_cache)})
    assert validate(raw).data.data_space().model_dump(mode="json") == \
        D.get(SOURCE["type"]).Params.model_validate(SOURCE).model_dump(mode="json")
    raw["eval"] = {"num_samples": 8, "metrics": [{"type": "class_accuracy"}]}
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(raw))
    assert main([str(spec_file), "--out", str(tmp_path / "run"), "--set", "train.steps=1",
                 "--set", "train.warmup_steps=0"]) == 0
    final = json.loads(sorted((tmp_path / "run" / "eval").glob("*.json"))[-1].read_text())
    assert final["real/class_accuracy"] >= 0.9 and 0.0 <= final["eval/class_accuracy"] <= 1.0
