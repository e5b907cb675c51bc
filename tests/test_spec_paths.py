"""Structural spec paths: every component's ``problems(spec)`` is called at every nesting level, its paths are
relative to it (or a ``Root``) and the checker places them under the component's JSON path; resolve errors carry
their field as a ``FieldError``."""
from __future__ import annotations

from typing import Any

import pytest

from registry.errors import FieldError, Root, SpecError, join_path, under
from registry.kinds import AUTOENCODERS, LR_SCHEDULES, METRICS, OBJECTIVES, TEACHERS, TIMESTEPS
from registry.spec import components, validate
from tests.helpers import load_raw, tiny_spec_dict


def test_join_path_and_under():
    assert join_path("teachers.dino", "path") == "teachers.dino.path"
    assert join_path("eval.metrics", "[2]") == "eval.metrics[2]"
    assert join_path("autoencoder", "") == "autoencoder"
    assert join_path("", "data") == "data"
    root = join_path("autoencoder.parts.audio", Root("data.sample_rate"))
    assert root == "data.sample_rate" and isinstance(root, Root)
    assert join_path("autoencoder", root) == "data.sample_rate"  # a Root stays a Root through every level
    assert under("objective", [("mask.ratio", "a"), ("", "b"), (Root("train.steps"), "c")]) == [
        ("objective.mask.ratio", "a"), ("objective", "b"), ("train.steps", "c")]
    e = FieldError("align_depth", "set it")
    assert isinstance(e, ValueError) and (e.path, e.message, str(e)) == ("align_depth", "set it", "align_depth: set it")


def test_components_are_found_at_every_level():
    spec = validate(load_raw("repa_digits_tiny.json"))
    paths = {p: type(c).__name__ for p, c in components(spec)}
    for path in ("modality", "data", "autoencoder", "backbone", "objective", "objective.timesteps", "solver",
                 "teachers.digits", "train.lr_schedule", "eval.metrics[0]", "eval.metrics[1]"):
        assert path in paths, (path, sorted(paths))
    av = {p for p, _ in components(validate(load_raw("fm_av.json")))}
    assert {"autoencoder.parts.video", "autoencoder.parts.audio"} <= av


def _patched(monkeypatch: pytest.MonkeyPatch, params: type, calls: list[str]) -> None:
    """``params.problems`` reports one fault at field ``bad`` (relative) and one at ``Root("sample.n")``."""

    def problems(self: Any, spec: Any):
        calls.append(self.type)
        yield "bad", f"fault of {self.type}"
        yield Root("sample.n"), f"{self.type} points elsewhere"

    monkeypatch.setattr(params, "problems", problems)


@pytest.mark.parametrize("spec_name, registry, tag, path", [
    ("fm_av.json", AUTOENCODERS, "spectrogram", "autoencoder.parts.audio"),      # a streams part
    ("repa_digits_tiny.json", TEACHERS, "classifier", "teachers.digits"),        # a teacher
    ("repa_digits_tiny.json", METRICS, "classifier_fd", "eval.metrics[1]"),      # a metric
    ("repa_digits_tiny.json", TIMESTEPS, "logit_normal", "objective.timesteps"),  # an objective's sub-object
    ("repa_digits_tiny.json", LR_SCHEDULES, "cosine", "train.lr_schedule"),      # the learning-rate schedule
])
def test_nested_problems_are_called_and_placed_at_their_path(monkeypatch, spec_name, registry, tag, path):
    calls: list[str] = []
    _patched(monkeypatch, registry.get(tag).Params, calls)
    with pytest.raises(SpecError) as e:
        validate(load_raw(spec_name))
    assert calls == [tag]
    assert (f"{path}.bad", f"fault of {tag}") in e.value.problems
    assert ("sample.n", f"{tag} points elsewhere") in e.value.problems


def test_a_streams_part_that_cannot_take_its_stream_is_named():
    raw = load_raw("fm_av.json")
    raw["autoencoder"]["parts"]["audio"]["hop"] = 48  # 4000 samples are no multiple of 48
    with pytest.raises(SpecError) as e:
        validate(raw)
    assert [p for p, m in e.value.problems if "not a multiple of hop 48" in m] == ["autoencoder.parts.audio"]


def test_metric_and_teacher_problems_name_their_entry():
    raw = tiny_spec_dict(eval={"at_end": False, "metrics": [{"type": "class_accuracy"},
                                                             {"type": "linear_probe", "block": 99}]})
    with pytest.raises(SpecError) as e:
        validate(raw)
    assert e.value.problems == [("eval.metrics[1]", "linear_probe block 99 > backbone depth 4")]
    raw = tiny_spec_dict(teachers={"v": {"type": "vit", "preset": "tiny", "heads": 5, "weights": None}})
    with pytest.raises(SpecError) as e:
        validate(raw)
    assert [p for p, _ in e.value.problems] == ["teachers.v.weights", "teachers.v.heads"]


def test_resolve_errors_carry_their_field(monkeypatch):
    params = OBJECTIVES.get("flow_matching").Params

    def resolve(self: Any, spec: Any):
        raise FieldError("label_dropout", "cannot derive it")

    monkeypatch.setattr(params, "resolve", resolve)
    with pytest.raises(SpecError) as e:
        validate(tiny_spec_dict())
    assert e.value.problems == [("objective.label_dropout", "cannot derive it")]

    def plain(self: Any, spec: Any):
        raise ValueError("objective.x: no path is parsed out of a message")

    monkeypatch.setattr(params, "resolve", plain)
    with pytest.raises(SpecError) as e:
        validate(tiny_spec_dict())
    assert e.value.problems == [("objective", "objective.x: no path is parsed out of a message")]
