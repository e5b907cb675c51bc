"""Evaluation at scale (runtime.sharded_eval): per-sample seeding, 1 vs 2 gloo processes, resume from shards,
online == offline, the ADM-style npz / PNG outputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import zoo  # noqa: F401
from runtime import evaluate as evaluate_cli
from runtime import run as run_cli
from runtime import sharded_eval
from runtime.compiler import components_from_checkpoint
from runtime.sample import generate_indexed, indexed_labels
from runtime.tracking import read_jsonl
from runtime.train import Evaluator
from tests.helpers import tiny_spec_dict
from zoo.core.types import SampleNoise, normal_like, sample_seed

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")
METRICS = [{"type": "class_accuracy"}, {"type": "classifier_fd", "num_real": 50}]


@pytest.fixture(scope="module")
def sde_run(tmp_path_factory) -> Path:
    """A 6-step tiny run with the SDE solver (per-sample solver noise) and an in-loop evaluation at step 6."""
    d = tmp_path_factory.mktemp("sharded")
    spec = tiny_spec_dict(solver={"type": "euler_maruyama", "steps": 3},
                          eval={"at_end": False, "every": 6, "num_samples": 10, "batch_size": 4, "metrics": METRICS})
    (d / "spec.json").write_text(json.dumps(spec))
    assert run_cli.main([str(d / "spec.json"), "--out", str(d / "run")]) == 0
    return d / "run"


def test_sample_noise_rows_do_not_depend_on_the_batch():
    a = SampleNoise(7, [0, 1, 2, 3]).randn((4, 5, 3))
    b = torch.cat([SampleNoise(7, [0, 1]).randn((2, 5, 3)), SampleNoise(7, [2, 3]).randn((2, 5, 3))])
    assert torch.equal(a, b)
    assert torch.equal(SampleNoise(7, [3]).randn((1, 5, 3))[0], a[3])
    assert not torch.equal(SampleNoise(8, [3]).randn((1, 5, 3))[0], a[3])
    assert sample_seed(0, 1) != sample_seed(1, 0) and sample_seed(0, 1, "label") != sample_seed(0, 1)
    g = SampleNoise(7, [0, 1])
    first, second = normal_like(g, (2, 4), torch.float64, "cpu"), normal_like(g, (2, 4), torch.float64, "cpu")
    assert not torch.equal(first, second)  # each sample's generator advances
    with pytest.raises(ValueError, match="2 samples"):
        g.randn((3, 4))


def test_labels_come_from_seed_and_index():
    assert indexed_labels([0, 1, 12], 10).tolist() == [0, 1, 2]
    assert indexed_labels([5], 10, [3, 4]).tolist() == [4]
    u = indexed_labels(list(range(200)), 10, seed=3, mode="uniform")
    assert torch.equal(u[50:60], indexed_labels(list(range(50, 60)), 10, seed=3, mode="uniform"))
    assert not torch.equal(u, indexed_labels(list(range(200)), 10, seed=4, mode="uniform"))
    assert set(u.tolist()) == set(range(10))
    assert indexed_labels([0], 0) is None


def test_plan_gives_every_chunk_to_exactly_one_rank():
    plan = sharded_eval.SamplePlan(num=10, batch_size=4, seed=0)
    assert plan.num_chunks == 3 and plan.chunk_indices(2) == [8, 9]
    for world in (1, 2, 3, 4):
        got = sorted(c for r in range(world) for c in plan.chunks_of(r, world))
        assert got == [0, 1, 2]


def test_shards_store_a_tensor_kept_by_several_metrics_once(tmp_path):
    x = torch.randn(3, 2)
    sharded_eval._write_chunk(tmp_path, 0, {"m0.sample": x, "m1.sample": x.detach(), "m2.part": x[:, :1],
                                            "index": torch.arange(3)})
    got = sharded_eval.load_chunk(sharded_eval._shard_path(tmp_path, 0))
    assert set(got) == {"m0.sample", "m1.sample", "m2.part", "index"}
    assert torch.equal(got["m1.sample"], x) and torch.equal(got["m2.part"], x[:, :1])


def test_generate_indexed_is_per_sample(sde_run):
    """The SDE samples of indices 0..5 in one batch equal those made in two batches (fp32 tolerance: the
    network's batch size differs), and differ from another seed's."""
    graph, _ = components_from_checkpoint(sde_run, torch.device("cpu"))
    lab = lambda idx: indexed_labels(idx, graph.num_classes)  # noqa: E731
    whole = generate_indexed(graph, list(range(6)), lab, seed=5)
    parts = torch.cat([generate_indexed(graph, [0, 1, 2], lab, seed=5), generate_indexed(graph, [3, 4, 5], lab, seed=5)])
    assert whole.shape == (6, 1, 16, 16)
    torch.testing.assert_close(whole, parts, atol=1e-5, rtol=1e-5)
    assert (generate_indexed(graph, list(range(6)), lab, seed=6) - whole).abs().max() > 1e-2


def _metric_rows(run: Path, step: int) -> dict[str, float]:
    return next(r for r in read_jsonl(run / "metrics.jsonl") if r.get("step") == step and "eval/classifier_fd" in r)


@pytest.mark.slow  # two torchrun launches (~15 s)
def test_one_and_two_gloo_processes_write_identical_bytes(sde_run, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    outs = {}
    for procs in (1, 2):
        d = tmp_path / f"p{procs}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               "-m", "runtime.evaluate", str(sde_run), "--save-npz", str(d / "s.npz"), "--shards", str(d / "shards"),
               "--keep-shards", "--no-progress"]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[procs] = (d, r.stdout)
    (a, out_a), (b, out_b) = outs[1], outs[2]
    assert (a / "s.npz").read_bytes() == (b / "s.npz").read_bytes()
    chunks = sorted(p.name for p in (a / "shards").glob("chunk_*.safetensors"))
    assert chunks == [f"chunk_{c:07d}.safetensors" for c in range(3)]
    for name in chunks:
        assert (a / "shards" / name).read_bytes() == (b / "shards" / name).read_bytes(), name
    assert out_a.splitlines()[1:] == out_b.splitlines()[1:]  # the printed numbers
    with np.load(a / "s.npz") as z:
        assert z["arr_0"].shape == (10, 16, 16, 3) and z["arr_0"].dtype == np.uint8
        assert z["arr_1"].tolist() == indexed_labels(list(range(10)), 10).tolist()


def test_offline_equals_online_and_npz_png_hold_the_samples(sde_run, tmp_path):
    """``runtime.evaluate --num 10`` (the in-loop N) gives exactly the in-loop numbers; the npz and the PNGs hold the
    quantised samples of indices 0..9."""
    online = _metric_rows(sde_run, 6)
    npz, png = tmp_path / "s.npz", tmp_path / "png"
    assert evaluate_cli.main([str(sde_run), "--num", "10", "--save-npz", str(npz), "--save-png", str(png),
                              "--shards", str(tmp_path / "sh"), "--no-progress"]) == 0
    offline = json.loads((sde_run / "eval" / "step_00000006.json").read_text())
    for k in ("eval/class_accuracy", "eval/classifier_fd"):
        assert offline[k] == online[k], k
    assert not (tmp_path / "sh").exists()  # removed after a complete evaluation
    graph, _ = components_from_checkpoint(sde_run, torch.device("cpu"))
    lab = lambda idx: indexed_labels(idx, graph.num_classes)  # noqa: E731
    want = sharded_eval.quantized_nhwc(torch.cat([generate_indexed(graph, [0, 1, 2, 3], lab, seed=10_000),
                                                  generate_indexed(graph, [4, 5, 6, 7], lab, seed=10_000),
                                                  generate_indexed(graph, [8, 9], lab, seed=10_000)])).numpy()
    with np.load(npz) as z:
        assert np.array_equal(z["arr_0"], want)
    from PIL import Image

    assert sorted(p.name for p in png.iterdir()) == [f"{i:06d}.png" for i in range(10)]
    assert np.array_equal(np.asarray(Image.open(png / "000007.png").convert("RGB")), want[7])


def test_interrupted_evaluation_resumes_from_its_shards(sde_run, tmp_path, monkeypatch):
    graph, ck = components_from_checkpoint(sde_run, torch.device("cpu"))
    ev = Evaluator(graph, tmp_path / "run", tracker=None)
    plan = ev.sample_plan(num=10, batch_size=3)  # 4 chunks
    full = ev.evaluate(ck.step, plan=plan, shards=tmp_path / "a")

    real_make, calls = sharded_eval._make_chunk, []

    def stop_after_two(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(a[3])
        return real_make(*a, **k)

    monkeypatch.setattr(sharded_eval, "_make_chunk", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(ck.step, plan=plan, shards=tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").glob("chunk_*")) == ["chunk_0000000.safetensors",
                                                                       "chunk_0000001.safetensors"]
    calls.clear()
    monkeypatch.setattr(sharded_eval, "_make_chunk", lambda *a, **k: (calls.append(a[3]), real_make(*a, **k))[1])
    resumed = ev.evaluate(ck.step, plan=plan, shards=tmp_path / "b")
    assert calls == [2, 3]  # only the missing chunks were sampled
    assert resumed == full

    other = ev.sample_plan(num=10, batch_size=3, seed=1)
    (tmp_path / "c").mkdir()
    ev.evaluate(ck.step, plan=plan, shards=tmp_path / "c", keep_shards=True)
    with pytest.raises(ValueError, match=r"another evaluation .*plan"):
        ev.evaluate(ck.step, plan=other, shards=tmp_path / "c")
