"""The README's zoo-entry example runs as written, and its commands name things that exist."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

import zoo  # noqa: F401
from registry.kinds import SOLVERS
from registry.spec import rebuild, validate
from tests.helpers import tiny_spec_dict

README = Path(__file__).resolve().parent.parent / "README.md"


def _example() -> str:
    text = README.read_text()
    block = text.split("<!-- example:start -->")[1].split("<!-- example:end -->")[0]
    return block.strip().removeprefix("```python").removesuffix("```")


def test_readme_example_registers_a_working_solver():
    ns: dict = {}
    try:
        exec(compile(_example(), "README.md", "exec", dont_inherit=True), ns)
        rebuild()
        spec = validate(tiny_spec_dict(solver={"type": "midpoint", "steps": 8}))
        solver = SOLVERS.build(spec.solver)
        assert solver.nfe == 16
        # data N(2, 0.5^2), noise N(0, 1): exact velocity field of the linear path; midpoint is 2nd order
        mu, s = 2.0, 0.5

        def v(x, t):
            tt = t.view(-1, 1, 1).double()
            var = (1 - tt) ** 2 * s**2 + tt**2
            return (-mu + (tt - (1 - tt) * s**2) / var * (x - (1 - tt) * mu)).to(x.dtype)

        x1 = torch.randn(64, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        errs = [(SOLVERS.build(validate(tiny_spec_dict(solver={"type": "midpoint", "steps": n})).solver)
                 .solve(v, x1) - (mu + s * x1)).abs().max().item() for n in (8, 16)]
        assert errs[1] < errs[0] / 3.0  # ~4x smaller per halving for a 2nd-order method
    finally:
        SOLVERS._entries.pop("midpoint", None)
        SOLVERS._sources.pop("midpoint", None)
        rebuild()


def test_readme_example_as_one_new_file_is_found(tmp_path):
    """Inside the repository the example is one new module under ``zoo/``: ``zoo.load_builtins`` finds it on disk
    (here a folder added to the package's path stands in for a new file in ``zoo/``)."""
    (tmp_path / "midpoint_example.py").write_text(_example())
    zoo.__path__.append(str(tmp_path))
    try:
        assert "zoo.midpoint_example" in zoo.load_builtins()
        assert validate(tiny_spec_dict(solver={"type": "midpoint", "steps": 3})).solver.steps == 3
    finally:
        zoo.__path__.remove(str(tmp_path))
        sys.modules.pop("zoo.midpoint_example", None)
        SOLVERS._entries.pop("midpoint", None)
        SOLVERS._sources.pop("midpoint", None)
        rebuild()


def test_readme_commands_name_existing_files():
    text = README.read_text()
    for spec in set(re.findall(r"specs/[\w.]+\.json", text)):
        assert (README.parent / spec).is_file(), spec
    assert "python -m pytest -q" in text and "python -m pytest -q" in (README.parent / ".ci" / "run").read_text()
