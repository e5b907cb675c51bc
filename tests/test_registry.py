"""Registry mechanics: registration from the params Literal, duplicates, suggestions, overrides, plugins."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Literal

import pytest

import zoo  # noqa: F401
from registry.core import Registry, tag_of
from registry.errors import DuplicateComponent, UnknownComponent
from registry.kinds import ALL, BACKBONES, SOLVERS
from registry.spec import rebuild, validate
from zoo.core.params import ZooParams


class _WidgetParams(ZooParams):
    type: Literal["widget"]
    size: int = 3


class _Widget:
    Params = _WidgetParams

    def __init__(self, params, **deps):
        self.params, self.deps = params, deps


def test_tag_comes_from_params_literal_and_build_passes_deps():
    reg: Registry = Registry("thing", "ThingSpec")
    reg.register(_Widget)
    assert reg.names() == ["widget"] and tag_of(_WidgetParams) == "widget"
    w = reg.build(_WidgetParams(type="widget"), width=7)
    assert w.deps == {"width": 7} and w.params.size == 3
    with pytest.raises(TypeError, match="collide"):
        reg.build(_WidgetParams(type="widget"), size=4)


def test_duplicate_tag_raises_and_override_restores():
    reg: Registry = Registry("thing", "ThingSpec")
    reg.register(_Widget)
    with pytest.raises(DuplicateComponent, match="already registered"):
        reg.register(type("Other", (), {"Params": _WidgetParams}))

    class Replacement(_Widget):
        pass

    with reg.override(Replacement):
        assert reg.get("widget") is Replacement
    assert reg.get("widget") is _Widget


def test_params_model_names_must_be_unique():
    reg: Registry = Registry("thing", "ThingSpec")
    reg.register(_Widget)
    other = type("_WidgetParams", (ZooParams,), {"__annotations__": {"type": Literal["gadget"]}})
    with pytest.raises(DuplicateComponent, match="unique names"):
        reg.register(type("Gadget", (), {"Params": other}))


def test_tiny_preset_required_where_asked():
    reg: Registry = Registry("model", "ModelSpec", require_tiny=True)

    class NoTiny(ZooParams):
        type: Literal["notiny"]
        presets = {"big": {}}

    with pytest.raises(TypeError, match="tiny"):
        reg.register(type("M", (), {"Params": NoTiny}))


def test_unknown_tag_lists_known_and_closest():
    with pytest.raises(UnknownComponent) as e:
        BACKBONES.get("sitt")
    assert "known: " in str(e.value) and "did you mean 'sit'" in str(e.value)


def test_every_kind_has_entries_and_sources():
    for kind, reg in ALL.items():
        assert reg.names(), f"no {kind} registered"
        for tag in reg.names():
            assert reg.source(tag) == "zoo"


def test_registry_list_cli():
    out = subprocess.run([sys.executable, "-m", "registry", "list"], capture_output=True, text=True, check=True).stdout
    assert "backbone" in out and "sit" in out and "XL/2" in out and "flow_matching" in out


def test_plugin_entry_point_with_fake_distribution(tmp_path, monkeypatch):
    """A distribution on sys.path that declares an ``fmzoo.plugins`` entry point gets its component
    registered, attributed to the distribution, and accepted in specs. Nothing is installed."""
    (tmp_path / "fake_zoo_plugin.py").write_text(textwrap.dedent('''
        from typing import Literal
        from pydantic import Field
        from registry.kinds import SOLVERS
        from zoo.core.params import ZooParams

        class MidpointSolverParams(ZooParams):
            type: Literal["midpoint"]
            steps: int = Field(10, gt=0, description="midpoint steps")

        @SOLVERS.register
        class Midpoint:
            Params = MidpointSolverParams
            def __init__(self, params):
                self.steps = params.steps
                self.nfe = 2 * params.steps
            def solve(self, velocity, noise, generator=None):
                import torch
                x, n = noise, self.steps
                for i in range(n):
                    t = torch.full((x.shape[0],), 1 - i / n, device=x.device)
                    xm = x - 0.5 / n * velocity(x, t)
                    x = x - 1 / n * velocity(xm, t - 0.5 / n)
                return x
    '''))
    dist = tmp_path / "fake_zoo_plugin-0.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-zoo-plugin\nVersion: 0.3\n")
    (dist / "entry_points.txt").write_text("[fmzoo.plugins]\nfake = fake_zoo_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from registry import plugins

    try:
        loaded = plugins.load_plugins()
        assert loaded["fake"] == "fake-zoo-plugin==0.3"
        assert "midpoint" in SOLVERS.names() and SOLVERS.source("midpoint") == "fake-zoo-plugin"
        from tests.helpers import tiny_spec_dict

        raw = tiny_spec_dict()
        raw["solver"] = {"type": "midpoint", "steps": 4}
        spec = validate(raw)
        assert SOLVERS.build(spec.solver).nfe == 8
    finally:
        SOLVERS._entries.pop("midpoint", None)
        SOLVERS._sources.pop("midpoint", None)
        plugins._loaded.pop("fake", None)
        sys.modules.pop("fake_zoo_plugin", None)
        rebuild()
    assert "midpoint" not in SOLVERS.names()


def test_broken_plugin_is_reported_with_its_distribution(tmp_path, monkeypatch):
    (tmp_path / "broken_zoo_plugin.py").write_text("raise ImportError('needs libfoo')\n")
    dist = tmp_path / "broken_zoo_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-zoo-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[fmzoo.plugins]\nbroken = broken_zoo_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from registry import plugins
    from registry.errors import SpecError

    with pytest.raises(SpecError, match="broken-zoo-plugin==1.0.*needs libfoo"):
        plugins.load_plugins()
    sys.modules.pop("broken_zoo_plugin", None)
