"""Session-wide test settings: a private cache directory (the digit classifier is trained into it once per
session, and ~/.cache is never written by the tests)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FMZOO_CACHE", str(tmp_path_factory.mktemp("fmzoo_cache")))
        yield
