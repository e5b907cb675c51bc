"""``python -m runtime.bench --suite gpu --smoke``: the GPU acceptance suite's code at tiny sizes on CPU."""
from __future__ import annotations

import json

import torch

from runtime import bench


def test_gpu_suite_smoke_writes_every_section(tmp_path, capsys):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert bench.main(["--suite", "gpu", "--smoke", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(n)
    report = json.loads((tmp_path / "suite.json").read_text())
    rows = report["rows"]
    sections = list(dict.fromkeys(r["section"] for r in rows))
    assert sections == ["gpu tests", "attention", "training step", "ratios", "sampling", "parallel (1 process)",
                        "total"]
    par = {r["parallel"]: r for r in rows if r["section"] == "parallel (1 process)"}
    assert set(par) == {"ddp", "fsdp2"} and all(r["step_ms"] > 0 for r in par.values())
    import torch.distributed as dist
    assert not dist.is_initialized()  # the suite's own one-rank group is gone again
    steps = [r for r in rows if r["section"] == "training step"]
    assert {(r["objective"], r["mode"]) for r in steps} == {(o, m) for o in ("vanilla", "selfflow", "repa")
                                                            for m in ("eager", "compiled")}
    for r in steps:
        assert r["step_ms"] > 0 and 0 < r["MFU"] < 1 and r["kernel"].startswith("sdpa/")
        assert abs(r["MFU"] * report["peak_TFLOPs"] - r["TFLOPs"]) <= 1e-9 * max(1.0, r["TFLOPs"])
    attn = [r for r in rows if r["section"] == "attention"]
    assert {r["head_dim"] for r in attn} == {72, 64} and all(r.get("equal") for r in attn)
    assert len([r for r in rows if r["section"] == "sampling"]) == 2
    md = (tmp_path / "suite.md").read_text()
    assert "| objective | mode | batch | step_ms | samples_per_s | TFLOPs | MFU |" in md
    assert "[training step] objective=repa, mode=compiled" in capsys.readouterr().out
