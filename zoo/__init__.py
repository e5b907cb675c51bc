"""The zoo: built-in components. Importing this package imports every module below it, found on disk (so a new
entry inside the repository is one new file under ``zoo/``), and builds the spec model. Third-party packages
register theirs through the ``fmzoo.plugins`` entry points (:mod:`registry.plugins`)."""
from __future__ import annotations

import importlib
import pkgutil

from registry.model import rebuild


def load_builtins() -> list[str]:
    """Import every module of this package (sorted by name; importing one twice is a no-op) and rebuild the spec
    model; returns the module names."""
    names = sorted(m.name for m in pkgutil.walk_packages(__path__, prefix=f"{__name__}."))
    for name in names:
        importlib.import_module(name)
    rebuild()
    return names


BUILTINS = load_builtins()
"""The modules :func:`load_builtins` found when the package was first imported."""
