"""Third-party zoo entries through package entry points.

A package adds components by declaring, in its ``pyproject.toml``::

    [project.entry-points."fmzoo.plugins"]
    my_zoo = "my_zoo.components"      # a module that registers entries on import

:func:`load_plugins` imports every such module (explicitly, once, from ``runtime.run``; never on
``import registry``), records which distribution each entry came from, and rebuilds the spec model.
"""
from __future__ import annotations

import contextlib
from importlib.metadata import entry_points
from typing import Iterator

from registry.errors import SpecError

GROUP = "fmzoo.plugins"
_loaded: dict[str, str] = {}  # entry-point name -> "dist==version"


@contextlib.contextmanager
def _attributing(source: str) -> Iterator[None]:
    """Entries registered inside this block are attributed to ``source`` (the plugin's distribution)."""
    from registry.kinds import ALL

    before = {k: set(r.names()) for k, r in ALL.items()}
    yield
    for k, r in ALL.items():
        for tag in set(r.names()) - before[k]:
            r._sources[tag] = source


def load_plugins(group: str = GROUP) -> dict[str, str]:
    """Import every plugin module of ``group``; returns ``{entry point: "dist==version"}``.

    A plugin that fails to import raises :class:`SpecError` naming the distribution and the error.
    """
    import zoo  # noqa: F401  (built-ins first, so a plugin can extend them)
    from registry.spec import rebuild

    for ep in entry_points(group=group):
        if ep.name in _loaded:
            continue
        dist = f"{ep.dist.name}=={ep.dist.version}" if ep.dist else ep.value
        try:
            with _attributing(ep.dist.name if ep.dist else ep.value):
                ep.load()
        except Exception as e:  # report, with the distribution's name, whatever the plugin raised
            raise SpecError([("", f"plugin {ep.name!r} from {dist} failed to load: {type(e).__name__}: {e}")]) from e
        _loaded[ep.name] = dist
    rebuild()
    return dict(_loaded)
