"""Spec input the parser or the run cannot take is one line and exit 2 before anything runs (issue 14 items 8
and 9): unreadable spec files, hostile ``--set`` values, and numbers no run can use (NaN, Infinity, bools as
numbers, seeds and sizes past what the run handles)."""
from __future__ import annotations

import json
import math

import pytest

import zoo  # noqa: F401
from registry.errors import SpecError
from registry.kinds import ALL
from registry.params import CheckedNumbers
from registry.spec import SECTION_MODELS, load_spec, read_json, validate
from tests.helpers import load_raw, tiny_spec_dict

CLIS = ["run", "cache", "bench"]


def unreadable(tmp_path) -> dict:
    """name -> (path, expected message part) of spec files no parser reads."""
    out = {}

    def put(name, data: bytes, msg):
        p = tmp_path / f"{name}.json"
        p.write_bytes(data)
        out[name] = (p, msg)

    put("binary", bytes(range(200, 256)) * 4, r"binary\.json:1:1: not UTF-8 text \(byte 0xc8\)")
    put("latin1", '{"version": 1, "name": "café"}'.encode("latin-1"), r"latin1\.json:1:28: not UTF-8 text")
    put("utf16", json.dumps(tiny_spec_dict()).encode("utf-16-le"), r"utf16\.json: not UTF-8 JSON: looks like UTF-16-LE")
    put("nul", b'{"version": 1}\x00\x00', r"nul\.json: not UTF-8 JSON: looks like a binary file")
    put("deep", b"[" * 100_000 + b"]" * 100_000, r"deep\.json: JSON nested too deeply \(at most 64 levels\)")
    put("deep_obj", b'{"a":' * 80 + b"1" + b"}" * 80, r"deep_obj\.json: JSON nested too deeply")
    put("bigint", b'{"version": ' + b"9" * 5000 + b"}", r"bigint\.json: integer literal too long \(5,000 digits at "
                                                           r"line 1\); at most 4300 digits")
    return out


def test_unreadable_spec_files_are_one_line(tmp_path):
    for name, (path, msg) in unreadable(tmp_path).items():
        with pytest.raises(SpecError, match=msg) as e:
            read_json(path)
        assert len(e.value.lines()) == 1 and "\n" not in e.value.lines()[0], name


def test_a_utf8_bom_is_accepted(tmp_path):
    p = tmp_path / "bom.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(tiny_spec_dict()).encode())
    assert load_spec(p).name == "test_tiny"


@pytest.mark.parametrize("cli", CLIS)
def test_every_cli_refuses_unreadable_specs_with_exit_2(tmp_path, capsys, cli):
    import importlib

    main = importlib.import_module(f"runtime.{cli}").main
    for name, (path, _) in unreadable(tmp_path).items():
        assert main([str(path)]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and path.name in err, (name, err)


@pytest.mark.parametrize("value, msg", [
    ("9" * 5000, "--set train.steps: integer literal too long"),
    ("[" * 100_000, "--set train.steps: JSON nested too deeply"),
    ("[" * 70 + "]" * 70, "--set train.steps: JSON nested too deeply"),
])
def test_hostile_set_values_are_one_line(tmp_path, value, msg):
    p = tmp_path / "spec.json"
    p.write_text(json.dumps(tiny_spec_dict()))
    with pytest.raises(SpecError, match=msg.replace("(", r"\(")):
        load_spec(p, [f"train.steps={value}"])
    for bad in ("=3", "train..steps=3", ".x=1"):
        with pytest.raises(SpecError, match="KEY must be a dotted field path"):
            load_spec(p, [bad])


def _tiny(**train):
    raw = tiny_spec_dict()
    raw["train"].update(train)
    return raw


def _with(raw: dict, path: str, value) -> dict:
    node = raw
    *parents, last = path.split(".")
    for k in parents:
        node = node.setdefault(k, {})
    node[last] = value
    return raw


NAN, INF = math.nan, math.inf
CASES = [  # (spec raw, JSON path, value, message part)
    ("tiny", "train.betas", [0.9, 1.0], "less than 1"),
    ("tiny", "train.betas", [NAN, 0.999], "finite number"),
    ("tiny", "train.betas", [True, 0.999], "expected a number, got true"),
    ("tiny", "train.seed", -1, "greater than or equal to 0"),
    ("tiny", "train.seed", 2**63, "integer out of range"),
    ("tiny", "sample.seed", 2**64, "integer out of range"),
    ("tiny", "sample.seed", -5, "greater than or equal to 0"),
    ("tiny", "train.lr", 1e39, "the largest float32"),
    ("tiny", "train.lr", NAN, "finite number"),
    ("tiny", "train.lr", INF, "finite number"),
    ("tiny", "train.lr", True, "expected a number, got true"),
    ("tiny", "train.lr", "1e-3", "expected a number, got the string '1e-3'"),
    ("tiny", "train.batch_size", 2**64, "less than or equal to 1048576"),
    ("tiny", "train.batch_size", 2**40, "less than or equal to 1048576"),
    ("tiny", "train.steps", False, "expected a number, got false"),
    ("tiny", "train.compile", 1, "expected true or false, got 1"),
    ("tiny", "eval.num_samples", 1e30, "integer out of range"),
    ("tiny", "eval.num_samples", 10**7, "less than or equal to 100000"),
    ("tiny", "sample.cfg_scale", NAN, "finite number"),
    ("tiny", "sample.labels", [1, True], "expected a number, got true"),
    ("tiny", "objective.timesteps", {"type": "logit_normal", "mean": NAN}, "finite number"),
    ("tiny", "version", True, "expected a number, got true"),
    ("selfflow_av", "objective.gamma", INF, "finite number"),
    ("selfflow_av", "objective.modality_weights", {"audio": NAN}, "finite number"),
    ("selfflow_av", "modality.video_patch", [2, 4.0e300, 4], "integer out of range"),
]


@pytest.mark.parametrize("base, path, value, msg", CASES, ids=[f"{p}={v!r}"[:60] for _, p, v, _ in CASES])
def test_numbers_no_run_can_use_are_refused_at_their_path(base, path, value, msg):
    raw = tiny_spec_dict() if base == "tiny" else load_raw(f"{base}.json")
    with pytest.raises(SpecError) as e:
        validate(_with(raw, path, value))
    lines = e.value.lines()
    assert len(lines) == 1 and lines[0].startswith(path) and msg in lines[0], lines


def test_dry_run_refuses_what_the_run_would_crash_on(tmp_path, capsys):
    from runtime import run as run_cli

    p = tmp_path / "spec.json"
    p.write_text(json.dumps(tiny_spec_dict()))
    for item in (f"train.seed={2**63}", "train.betas=[0.9,1.0]", "train.lr=Infinity", "eval.num_samples=1e30"):
        assert run_cli.main([str(p), "--dry-run", "--set", item]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {item.split('=')[0]}"), err


def test_the_largest_seeds_run():
    """Seeds are offset (data epochs, eval draws, sampler batches): the bound 2^63 - 1 leaves room for them."""
    import torch

    from runtime.compiler import compile_spec
    from runtime.data import build_loader
    from runtime.sample import generate
    from registry.kinds import DATASETS

    spec = validate(_tiny(seed=2**63 - 1))
    g = compile_spec(spec, torch.device("cpu"))
    loader = build_loader(DATASETS.build(spec.data, split="train"), global_batch=8, grad_accum=1, rank=0,
                          world_size=1, seed=spec.train.seed, num_workers=0)
    assert len(next(iter(loader))[1]) == 8
    x = generate(g, 2, torch.tensor([0, 1]), seed=2**63 - 1 + 10_000, batch_size=1)
    assert torch.isfinite(x).all()


def test_every_spec_model_checks_its_numbers():
    """The check is central: every params model and every section model derives from ``CheckedNumbers``."""
    models = [m for r in ALL.values() for m in r.params_models()] + SECTION_MODELS
    assert models and all(issubclass(m, CheckedNumbers) for m in models)
