"""Spec files, the generated JSON Schema, path-precise errors and ``--set``."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import zoo  # noqa: F401
from registry.errors import SpecError
from registry.schema import build_schema, render, validate_with_jsonschema
from registry.spec import load_spec, parse_set, resolved_dict, set_path, validate
from tests.helpers import SPECS, load_raw, tiny_spec_dict

SPEC_FILES = sorted(p.name for p in SPECS.glob("*.json") if p.name != "schema.json")
ROOT = SPECS.parent


@pytest.fixture(scope="module")
def schema() -> dict:
    return build_schema()


@pytest.fixture(scope="module")
def vae_runs(tmp_path_factory) -> dict[str, str]:
    """Specs that name a trained autoencoder run (``runs/vae_digits``, made by ``specs/vae_digits.json``) are
    checked against a 1-step run of that spec made here, since a fresh checkout has no ``runs/``."""
    from runtime import run as run_cli

    out: dict[str, str] = {}
    for name in ("vae_digits", "vae_audio"):
        run = tmp_path_factory.mktemp(name) / "run"
        sets = ["train.steps=1", "train.warmup_steps=0", "train.batch_size=2", "train.checkpoint_every=1",
                "eval.at_end=false", "sample.n=2", "log.progress=false", "log.tensorboard=false",
                "backbone.channels=[8,8]", "backbone.groups=4"]
        argv = [str(SPECS / f"{name}.json"), "--out", str(run)] + [a for s in sets for a in ("--set", s)]
        assert run_cli.main(argv) == 0
        out[f"runs/{name}"] = str(run)
    return out


def shipped_raw(name: str, vae_runs: dict[str, str]) -> dict:
    """A shipped spec, its ``autoencoder.run`` (if any) pointed at the matching test run."""
    raw = load_raw(name)
    ae = raw.get("autoencoder", {})
    if "run" in ae:
        ae["run"] = vae_runs[ae["run"]]
    return raw


@pytest.mark.parametrize("name", SPEC_FILES)
def test_shipped_specs_validate_with_pydantic_and_jsonschema(name, schema, vae_runs):
    raw = shipped_raw(name, vae_runs)
    assert raw.get("$schema") == "./schema.json"
    assert validate_with_jsonschema(raw, schema) == []
    spec = validate(raw)
    assert spec.name == Path(name).stem


@pytest.mark.parametrize("name", SPEC_FILES)
def test_resolving_is_idempotent(name, vae_runs):
    once = resolved_dict(validate(shipped_raw(name, vae_runs)))
    assert resolved_dict(validate(once)) == once
    assert validate_with_jsonschema(once) == []


def test_checked_in_schema_is_current(schema):
    assert (SPECS / "schema.json").read_text() == render(schema), "run `python -m registry.schema`"
    r = subprocess.run([sys.executable, "-m", "registry.schema", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_schema_check_fails_when_stale(tmp_path):
    stale = tmp_path / "schema.json"
    stale.write_text("{}\n")
    r = subprocess.run([sys.executable, "-m", "registry.schema", "--check", "--out", str(stale)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "stale" in r.stderr


def test_preset_then_explicit_override():
    spec = validate(tiny_spec_dict(backbone={"type": "sit", "preset": "B/2", "depth": 3}))
    assert (spec.backbone.hidden, spec.backbone.heads, spec.backbone.depth, spec.backbone.patch) == (768, 12, 3, 2)


BAD = [  # (section edits, expected JSON path, text the message must contain)
    ({"backbone": {"type": "sit", "preset": "tiny", "depht": 3}}, "backbone.depht", "did you mean 'depth'"),
    ({"backbone": {"type": "sitt"}}, "backbone.type", "did you mean 'sit'"),
    ({"backbone": {"type": "sit", "preset": "XL2"}}, "backbone.preset", "did you mean 'XL/2'"),
    ({"backbone": {"type": "sit", "preset": "tiny", "depth": 0}}, "backbone.depth", "greater than"),
    ({"objective": {"type": "flow_matching", "timesteps": {"type": "lognormal"}}}, "objective.timesteps.type",
     "did you mean 'logit_normal'"),
    ({"objective": {"type": "flow_matching", "timesteps": {"type": "shifted", "shift": 3.0, "base": {"type": "unifrm"}}}},
     "objective.timesteps.base.type", "did you mean 'uniform'"),
    ({"train": {"steps": 10, "batch_size": 10, "grad_accum": 3}}, "train.grad_accum", "not divisible"),
    ({"train": {"steps": -1, "batch_size": 8}}, "train.steps", "greater than 0"),
    ({"train": {"steps": 5, "batch_size": 8, "batchsize": 8}}, "train.batchsize", "did you mean 'batch_size'"),
    ({"data": {"type": "digits", "size": 18}, "backbone": {"type": "sit", "preset": "tiny", "patch": 4}},
     "backbone.patch", "18"),
    ({"eval": {"metrics": [{"type": "class_acuracy"}]}}, "eval.metrics[0].type", "did you mean 'class_accuracy'"),
    ({"sample": {"labels": [3, 12]}}, "sample.labels", "12"),
    ({"version": 2}, "version", "1"),
    ({"solver": {"steps": 3}}, "solver", "missing 'type'"),
]


@pytest.mark.parametrize("edits,path,text", BAD, ids=[b[1] for b in BAD])
def test_bad_specs_fail_at_the_expected_json_path(edits, path, text):
    with pytest.raises(SpecError) as e:
        validate(tiny_spec_dict(**edits))
    hits = [msg for p, msg in e.value.problems if p == path]
    assert hits, f"no problem at {path}: {e.value.problems}"
    assert any(text in m for m in hits), hits


def test_missing_section_and_all_problems_reported_at_once():
    raw = tiny_spec_dict()
    del raw["backbone"]
    raw["train"]["lr"] = -1
    with pytest.raises(SpecError) as e:
        validate(raw)
    paths = {p for p, _ in e.value.problems}
    assert {"backbone", "train.lr"} <= paths


def test_jsonschema_rejects_what_pydantic_rejects(schema):
    assert validate_with_jsonschema(tiny_spec_dict(backbone={"type": "sit", "depht": 3}), schema)
    assert validate_with_jsonschema(tiny_spec_dict(backbone={"type": "sitt"}), schema)
    assert validate_with_jsonschema(tiny_spec_dict(), schema) == []


def test_set_parses_json_else_string_and_creates_objects():
    raw = tiny_spec_dict()
    for item in ["train.steps=12", "backbone.depth=2", "name=renamed", "objective.timesteps={\"type\": \"uniform\"}",
                 "train.ema.decay=0.5"]:
        set_path(raw, *parse_set(item))
    spec = validate(raw)
    assert (spec.train.steps, spec.backbone.depth, spec.name, spec.train.ema.decay) == (12, 2, "renamed", 0.5)
    assert spec.objective.timesteps.type == "uniform"
    with pytest.raises(SpecError, match="not an object"):
        set_path(raw, "name.x", 1)
    with pytest.raises(SpecError, match="KEY=VALUE"):
        parse_set("train.steps")


def test_load_spec_errors(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1,\n "name": }')
    with pytest.raises(SpecError, match=r"bad.json:2:\d+: invalid JSON"):
        load_spec(bad)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.run", *args], cwd=ROOT, capture_output=True, text=True)


def test_cli_bad_spec_exits_2_with_paths_and_no_traceback(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(tiny_spec_dict(backbone={"type": "sit", "preset": "tiny", "depht": 3},
                                           train={"steps": 10, "batch_size": 10, "grad_accum": 3})))
    r = _run_cli(str(p))
    assert r.returncode == 2
    assert "error: backbone.depht: unknown field; did you mean 'depth'?" in r.stderr
    assert "Traceback" not in r.stderr
    r = _run_cli(str(p), "--set", "backbone.depht=null", "--set", "train.grad_accum=2", "--dry-run")
    assert r.returncode == 2 and "backbone.depht" in r.stderr and "train.grad_accum" not in r.stderr
    r = _run_cli(str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("name", ["repa_imagenet256_xl2", "selfflow_imagenet256_xl2"])
def test_objective_recipes_dry_run_with_their_extra_cost(name):
    r = _run_cli(f"specs/{name}.json", "--dry-run")
    assert r.returncode == 0, r.stderr
    step = next(ln for ln in r.stdout.splitlines() if ln.startswith("train FLOPs / step"))
    assert float(step.split()[4].replace(",", "")) > 182.2  # more than vanilla XL/2's 182.2 TFLOP
    assert "objective parameters    0" not in r.stdout  # projector heads are trained and counted


def test_cli_dry_run_prints_resolved_spec_params_and_flops():
    r = _run_cli("specs/fm_imagenet256_xl2.json", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert '"preset": "XL/2"' in r.stdout and "backbone parameters" in r.stdout
    assert "forward FLOPs / sample  237.2 GFLOP" in r.stdout and "59.3 TFLOP/sample" in r.stdout
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("backbone parameters"))
    assert 670e6 < int(line.split()[-1].replace(",", "")) < 680e6


@pytest.mark.parametrize("objective", ["selfflow", "repa"])
def test_switching_method_is_one_field(objective):
    """The digits specs declare the same teachers, so objective.type alone switches the method."""
    raw = load_raw("fm_digits_tiny.json")
    raw["objective"]["type"] = objective
    spec = validate(raw)
    assert spec.objective.type == objective
    if objective == "repa":
        assert spec.objective.encoders == ["digits"] and spec.objective.align_depth == 4
    else:
        assert (spec.objective.student_block, spec.objective.teacher_block) == (2, 4)


def test_repa_without_teachers_says_where():
    raw = tiny_spec_dict(objective={"type": "repa"})
    with pytest.raises(SpecError) as e:
        validate(raw)
    assert e.value.problems[0][0] == "objective.encoders" and "teachers" in e.value.problems[0][1]


def test_short_run_clips_the_warmup_with_one_warning():
    r = _run_cli("specs/selfflow_av.json", "--set", "train.steps=12", "--dry-run")
    assert r.returncode == 0, r.stderr
    warning = "warning: train.warmup_steps 100 > train.steps 12; warm-up clipped to 12 steps"
    assert r.stderr.count(warning) == 1, r.stderr
    assert json.loads(r.stdout[: r.stdout.index("\n}\n") + 2])["train"]["warmup_steps"] == 12


STREAM_KEYED = [  # --set edits of specs/selfflow_av.json naming the stream 'vidio' in a dict keyed by modality
    ("objective.mask.ratio.vidio", 0.2),
    ("objective.modality_weights.vidio", 2.0),
    ("autoencoder.parts.vidio", {"type": "identity"}),
]


@pytest.mark.parametrize("path,value", STREAM_KEYED, ids=[p for p, _ in STREAM_KEYED])
def test_dicts_keyed_by_modality_refuse_unknown_streams(path, value):
    raw = load_raw("selfflow_av.json")
    set_path(raw, path, value)
    with pytest.raises(SpecError) as e:
        validate(raw)
    assert e.value.problems == [(path, "unknown modality 'vidio' (known: audio, video); did you mean 'video'?")]


def test_flow_matching_weights_and_exact_count_ratio_are_keyed_by_modality():
    raw = load_raw("fm_av.json")
    raw["objective"]["modality_weights"] = {"audi": 1.0}
    with pytest.raises(SpecError) as e:
        validate(raw)
    assert ("objective.modality_weights.audi", "unknown modality 'audi' (known: audio, video); did you mean 'audio'?") \
        in e.value.problems
    raw = load_raw("selfflow_av.json")
    raw["objective"]["mask"] = {"type": "exact_count", "ratio": {"video": 0.1, "audio": 0.5, "image": 0.25}}
    with pytest.raises(SpecError, match=r"objective.mask.ratio.image: unknown modality 'image'"):
        validate(raw)
    raw["objective"]["mask"]["type"] = "bernoulli"  # the paper's table names every modality: accepted
    assert validate(raw).objective.mask.ratio["image"] == 0.25


def test_cli_unknown_modality_exits_2_with_did_you_mean():
    r = _run_cli("specs/selfflow_av.json", "--set", "objective.mask.ratio.vidio=0.2", "--dry-run")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error: objective.mask.ratio.vidio: unknown modality 'vidio' (known: audio, video); did you mean 'video'?" \
        in r.stderr


def test_mmdit_unknown_field_points_at_its_block_counts():
    raw = load_raw("selfflow_av.json")
    raw["backbone"]["depht"] = 3
    with pytest.raises(SpecError) as e:
        validate(raw)
    assert e.value.problems == [("backbone.depht", "unknown field; did you mean 'double_blocks' or 'single_blocks'? "
                                                   "(mmdit has no 'depth')")]
    raw["backbone"] = {**load_raw("selfflow_av.json")["backbone"], "hiden": 3}
    with pytest.raises(SpecError, match="backbone.hiden: unknown field; did you mean 'hidden'"):
        validate(raw)


def test_imagenet_recipes_differ_only_where_the_papers_do():
    """SiT (7M steps, no clipping), REPA and Self-Flow (4M steps, clip 1; REPA samples the VAE posterior and reads
    raw images for its encoder): every other training and data setting is shared. ``precision: auto`` is bf16
    autocast on the GPUs these recipes need (Self-Flow's README: bf16; REPA's fp16 has no setting here)."""
    fm, sf, repa = (load_raw(f"{n}_imagenet256_xl2.json") for n in ("fm", "selfflow", "repa"))
    papers = {"train": {"steps", "grad_clip"}, "data": {"sample_posterior", "raw"}}
    for section, allowed in papers.items():
        for other in (sf, repa):
            keys = set(fm[section]) | set(other[section])
            differ = {k for k in keys if fm[section].get(k) != other[section].get(k)}
            assert differ <= allowed, (other["name"], section, differ - allowed)
    assert sf["train"] == repa["train"] and fm["train"]["precision"] == "auto"
    for section in set(fm) - {"name", "objective", "teachers", "train", "data", "$schema"}:
        assert fm[section] == sf[section] == repa[section], section
