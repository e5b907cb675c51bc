"""``train.parallel`` (ddp, fsdp2, hsdp) and sharded (format-3, DCP) checkpoints: 2-process gloo runs under
torchrun match one process, checkpoints reshard 2 -> 1 and 1 -> 2, a killed save leaves the last good
checkpoint, and nothing in a sharded checkpoint is unpickled."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import zoo  # noqa: F401
from registry.errors import SpecError
from registry.spec import validate
from runtime import run as run_cli
from runtime.tracking import read_jsonl
from storage import safe_state
from tests.helpers import AV_RUN_SETS, SPECS, tiny_spec_dict

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
FSDP2 = 'train.parallel={"type": "fsdp2"}'


def sit_spec(tmp: Path) -> Path:
    """Tiny SiT + Self-Flow on digits: 5 steps of 2 micro-batches, checkpoints at 3 and 5."""
    raw = tiny_spec_dict(objective={"type": "selfflow"}, sample={"n": 2})
    raw["train"].update(steps=5, grad_accum=2)
    p = tmp / "sit.json"
    p.write_text(json.dumps(raw))
    return p


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}


def weights(run: Path, step: int, name: str = "ema") -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step:08d}" / f"{name}.safetensors")


def assert_same(a: Path, b: Path, steps: list[int], step: int = 5) -> None:
    """Losses of ``steps`` within 1e-5 and the EMA (and weights) of ``step`` equal to fp32 rounding."""
    la, lb = losses(a), losses(b)
    for s in steps:
        assert lb[s] == pytest.approx(la[s], rel=1e-5, abs=1e-6), (s, la[s], lb[s])
    for name in ("ema", "model"):
        wa, wb = weights(a, step, name), weights(b, step, name)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")


def torchrun(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "runtime.run", *args], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


def cut_at(run: Path, tmp: Path, step: int) -> Path:
    """A copy of ``run`` as if it had stopped after its checkpoint ``step``."""
    out = tmp / f"{run.name}_cut"
    shutil.copytree(run, out)
    for p in (out / "checkpoints").iterdir():
        if p.name > f"step_{step:08d}":
            shutil.rmtree(p)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One process (fsdp2 on a one-rank mesh, and ddp) of the tiny SiT + Self-Flow spec."""
    tmp = tmp_path_factory.mktemp("parallel")
    spec = sit_spec(tmp)
    out = {"spec": spec, "tmp": tmp}
    for name, sets in (("ddp1", []), ("fsdp1", ["--set", FSDP2])):
        out[name] = tmp / name
        assert run_cli.main([str(spec), "--out", str(out[name]), *sets]) == 0
    return out


# ------------------------------------------------------------------------------------------------- spec
def test_parallel_is_a_registered_kind_with_checked_fields():
    base = tiny_spec_dict()
    assert validate(base).train.parallel.type == "ddp" and validate(base).train.activation_checkpointing is False
    ok = validate({**base, "train": {**base["train"], "activation_checkpointing": 2,
                                     "parallel": {"type": "hsdp", "shard_size": 2, "reshard_after_forward": False}}})
    assert ok.train.parallel.shard_size == 2 and ok.train.activation_checkpointing == 2
    for bad, path in (({"type": "fsdp3"}, "train.parallel.type"), ({"type": "hsdp", "shard_size": 0},
                                                                   "train.parallel.shard_size"),
                      ({"type": "fsdp2", "mixed_precision": "fp8"}, "train.parallel.mixed_precision")):
        with pytest.raises(SpecError) as e:
            validate({**base, "train": {**base["train"], "parallel": bad}})
        assert path in str(e.value), str(e.value)


def test_activation_checkpointing_keeps_names_and_gradients(one_thread):
    """Recomputed blocks give the same gradients and the same state-dict names."""
    from runtime.compiler import compile_spec
    from zoo.core.protocols import shard_units
    from zoo.core.types import StepContext, StepRNG
    from zoo.parallel import checkpoint_blocks

    spec = validate(tiny_spec_dict(objective={"type": "selfflow"}))
    grads = []
    for every in (0, 1):
        g = compile_spec(spec, torch.device("cpu"))
        keys = list(g.train_module.state_dict())
        if every:
            assert checkpoint_blocks(shard_units(g.backbone), every) == g.backbone.depth
        x = torch.randn(4, g.num_tokens, g.modality.token_dim, generator=torch.Generator().manual_seed(0))
        from zoo.core.types import TokenBatch

        out = g.train_module(TokenBatch(x, torch.arange(4)), StepContext(0, StepRNG(0, 0, 0, 0, 4, 4), ema=g.ema.module))
        out.loss.backward()
        assert list(g.train_module.state_dict()) == keys
        grads.append([p.grad.clone() for p in g.train_module.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------- equal to one process
@pytest.mark.slow
def test_fsdp2_on_one_process_equals_ddp(runs):
    assert_same(runs["ddp1"], runs["fsdp1"], [1, 2, 3, 4, 5])
    ck = runs["fsdp1"] / "checkpoints" / "step_00000005"
    assert json.loads((ck / "manifest.json").read_text())["format"] == 3 and (ck / "__0_0.distcp").is_file()


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_and_reshard_to_one(runs, tmp_path):
    """sit + selfflow: 2 ranks equal 1 over 5 steps (losses, EMA, weights); the 2-rank step-3 checkpoint resumes
    on 1 process (2 -> 1) with steps 4-5 equal to the uninterrupted run."""
    two = tmp_path / "fsdp2"
    torchrun(str(runs["spec"]), "--out", str(two), "--set", FSDP2)
    assert_same(runs["fsdp1"], two, [1, 2, 3, 4, 5])
    assert {p.name for p in (two / "checkpoints" / "step_00000003").glob("*.distcp")} == {"__0_0.distcp",
                                                                                            "__1_0.distcp"}
    resumed = cut_at(two, tmp_path, 3)
    assert run_cli.main([str(runs["spec"]), "--out", str(resumed), "--set", FSDP2, "--resume", "auto"]) == 0
    assert_same(runs["fsdp1"], resumed, [4, 5])


@pytest.mark.slow
def test_hsdp_with_activation_checkpointing_resumes_one_process_checkpoint_on_two(runs, tmp_path):
    """1 -> 2: the one-process step-3 checkpoint continues on a (2, 1) HSDP mesh with every block recomputed;
    steps 4-5 and the final EMA equal the uninterrupted run."""
    resumed = cut_at(runs["fsdp1"], tmp_path, 3)
    torchrun(str(runs["spec"]), "--out", str(resumed), "--set", 'train.parallel={"type": "hsdp", "shard_size": 1}',
             "--set", "train.activation_checkpointing=true", "--resume", "auto")
    assert_same(runs["fsdp1"], resumed, [4, 5])


@pytest.mark.slow
def test_fsdp2_mmdit_selfflow_on_av_tokens_two_processes_match_one(tmp_path):
    sets = [s for s in AV_RUN_SETS if not s.startswith(("train.steps", "train.checkpoint_every", "sample.n",
                                                        "eval."))]
    sets += ["train.steps=5", "train.checkpoint_every=5", "train.grad_accum=2", "sample.n=2", "eval.at_end=false"]
    argv = [str(SPECS / "selfflow_av.json")] + [a for s in sets for a in ("--set", s)]
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli.main(argv[:1] + ["--out", str(one)] + argv[1:]) == 0
    torchrun(*argv[:1], "--out", str(two), *argv[1:], "--set", FSDP2)
    assert_same(one, two, [1, 2, 3, 4, 5])


# ------------------------------------------------------------------------------------- atomicity, safety
@pytest.mark.slow
def test_killed_sharded_save_leaves_the_last_good_checkpoint(runs, tmp_path, monkeypatch):
    """The step-5 save dies after the shards are written (before the manifest): no step_00000005 appears and
    --resume auto continues from step 3 with the uninterrupted run's losses."""
    import runtime.parallel as par

    out = tmp_path / "run"
    real = par.full_weights
    calls = []

    def dying(module, *a, **k):
        calls.append(1)
        if len(calls) > 2:  # the step-3 save gathers model + EMA; the step-5 one dies on its first gather
            raise KeyboardInterrupt("killed")
        return real(module, *a, **k)

    monkeypatch.setattr(par, "full_weights", dying)
    with pytest.raises(KeyboardInterrupt):
        run_cli.main([str(runs["spec"]), "--out", str(out), "--set", FSDP2])
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names[-1] == "step_00000003" and "step_00000005" not in names, names
    monkeypatch.setattr(par, "full_weights", real)
    assert run_cli.main([str(runs["spec"]), "--out", str(out), "--set", FSDP2, "--resume", "auto"]) == 0
    assert_same(runs["fsdp1"], out, [4, 5])


class _Payload:
    """Unpickling this writes a marker file (it calls ``open``): it must never run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _rehash(ck: Path) -> None:
    """Rewrite the manifest so it records the planted files (an attacker who can write files can do that)."""
    man = json.loads((ck / "manifest.json").read_text())
    for name in man["files"]:
        man["files"][name] = {"bytes": (ck / name).stat().st_size, "sha256": safe_state.sha256_file(ck / name)}
    (ck / "manifest.json").write_text(json.dumps(man))


@pytest.mark.slow
@pytest.mark.parametrize("planted", [".metadata", "__0_0.distcp"])
def test_a_pickle_payload_in_a_sharded_checkpoint_is_never_run(runs, tmp_path, capsys, planted):
    """Every pickle a sharded resume reads (DCP's metadata, the shard file) replaced by a payload, the manifest
    re-hashed: the resume refuses with an error naming the file, and the payload never runs."""
    run = cut_at(runs["fsdp1"], tmp_path, 3)
    ck = run / "checkpoints" / "step_00000003"
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    if planted == ".metadata":
        (ck / planted).write_bytes(payload)
    else:  # a payload where every tensor of the shard file starts, so each read meets one
        from storage.sharded import read_metadata

        data = bytearray((ck / planted).read_bytes())
        starts = [i.offset for i in read_metadata(ck / ".metadata").storage_data.values() if i.relative_path == planted]
        assert starts
        for at in starts:
            data[at:at + len(payload)] = payload
        (ck / planted).write_bytes(bytes(data))
    _rehash(ck)
    code = run_cli.main([str(runs["spec"]), "--out", str(run), "--set", FSDP2, "--resume", str(ck)])
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists(), err
    assert planted in err or "not unpickled" in err or "weights_only" in err.lower(), err
