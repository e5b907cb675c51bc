"""Session-wide test settings: a private cache directory (the digit classifier is trained into it once per
session, and ~/.cache is never written by the tests); a few-step run of the main job shared by the tests that
read a run directory."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import AV_RUN_SETS, SPECS


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FMZOO_CACHE", str(tmp_path_factory.mktemp("fmzoo_cache")))
        yield


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP hand-offs make
    every op take milliseconds: run the test single-threaded and restore the setting afterwards
    (``pytestmark = pytest.mark.usefixtures("one_thread")`` in a module)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def av_run(tmp_path_factory, _private_cache) -> Path:
    """The run directory of ``specs/selfflow_av.json`` with ``tests.helpers.AV_RUN_SETS`` (report included)."""
    from runtime import run as run_cli

    out = tmp_path_factory.mktemp("av") / "run"
    argv = [str(SPECS / "selfflow_av.json"), "--out", str(out)]
    for s in AV_RUN_SETS:
        argv += ["--set", s]
    assert run_cli.main(argv) == 0
    return out
