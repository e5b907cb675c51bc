"""Checkpoints that execute nothing and lose nothing good (issue 14, items 1, 2b, 6 at the file level): no
pickle in the format, old pickles read only with weights_only=True, SHA-256 verification of every file,
rotation that counts only verified checkpoints, and faults named by file."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from storage import safe_state
from storage.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint,
                                save_checkpoint, verify_checkpoint)
from tests.test_checkpoint import _save, _trained


class Payload:
    """Unpickling this creates ``marker`` (a stand-in for any code a crafted pickle runs)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_format1(ck: Path, marker: Path) -> None:
    """Turn the checkpoint directory ``ck`` into a format-1 one whose ``optimizer.pt``/``state.pt`` are
    crafted pickles, with a manifest made to match (sizes are all format 1 records)."""
    for name in ("optimizer.json", "optimizer.safetensors", "state.json", "state.safetensors"):
        (ck / name).unlink(missing_ok=True)
    torch.save({"state": {}, "param_groups": [], "x": Payload(marker)}, ck / "optimizer.pt")
    torch.save({"step": 99, "rng": Payload(marker)}, ck / "state.pt")
    files = {p.name: p.stat().st_size for p in sorted(ck.iterdir()) if p.name != "manifest.json"}
    step = int(ck.name.split("_")[1])
    (ck / "manifest.json").write_text(json.dumps({"format": 1, "step": step, "files": files}))


def rehash(ck: Path) -> None:
    """Rewrite the manifest to match the files as they are now (damage a careful forger would hide)."""
    man = json.loads((ck / "manifest.json").read_text())
    man["files"] = {n: {"bytes": (ck / n).stat().st_size, "sha256": safe_state.sha256_file(ck / n)}
                    for n in man["files"]}
    (ck / "manifest.json").write_text(json.dumps(man))


def garble(f: Path, at: int | None = None) -> None:
    """Overwrite bytes in the middle of ``f`` with garbage, keeping its size."""
    raw = bytearray(f.read_bytes())
    at = len(raw) // 2 if at is None else at
    raw[at:at + 8] = b"\xff\x00garbl\xfe"[: len(raw[at:at + 8])]
    f.write_bytes(bytes(raw))


def test_the_format_holds_no_pickle_and_round_trips_types(tmp_path):
    path = _save(tmp_path, 3, state={"rng": {"t": torch.arange(4, dtype=torch.uint8)}, "t": (1, 2.5, None),
                                     "k": {0: "int key", "s": float("inf")}})
    assert not list(path.glob("*.pt"))
    for name in ("state.json", "optimizer.json"):
        json.loads((path / name).read_text())  # plain JSON
        with pytest.raises(pickle.UnpicklingError):
            pickle.loads((path / name).read_bytes())
    ck = load_checkpoint(path)
    assert ck.state["t"] == (1, 2.5, None) and ck.state["k"] == {0: "int key", "s": float("inf")}
    assert torch.equal(ck.state["rng"]["t"], torch.arange(4, dtype=torch.uint8))
    assert all(isinstance(k, int) for k in ck.optimizer["state"])  # param indices stay ints
    with pytest.raises(TypeError, match="cannot be stored without pickle"):
        _save(tmp_path, 4, state={"bad": object()})


def test_a_planted_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "PWNED"
    good = _save(tmp_path / "ck", 2)
    evil = _save(tmp_path / "ck", 5)
    plant_format1(evil, marker)
    verify_checkpoint(evil)  # sizes match: it passes as a format-1 checkpoint
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: a pickle of an older fmzoo .*weights_only=True"):
        load_checkpoint(evil)
    ck = load_checkpoint(evil, training_state=False)  # weights and spec: safetensors and JSON only
    assert ck.step == 5 and ck.optimizer == {} and ck.model
    assert latest_checkpoint(tmp_path / "ck") == evil and load_checkpoint(good).step == 2
    assert not marker.exists()


def test_same_size_damage_is_caught_by_the_hash_and_named(tmp_path):
    root = tmp_path / "ck"
    for name in ("model.safetensors", "optimizer.safetensors", "state.json", "optimizer.json", "spec.resolved.json",
                 "meta.json", "state.safetensors"):
        ck = _save(root, 1)
        garble(ck / name, at=(ck / name).stat().st_size - 12)
        with pytest.raises(CheckpointError, match=rf"step_00000001/{name}: SHA-256 differs"):
            verify_checkpoint(ck)


@pytest.mark.parametrize("damage", ["state_json", "wrong_shape", "missing_state_tensor", "truncated_header"])
def test_damage_with_a_matching_manifest_is_still_named(tmp_path, damage):
    ck = _save(tmp_path, 1)
    from safetensors.torch import load_file, save_file

    if damage == "state_json":
        garble(ck / "state.json", at=0)
        want = r"state\.json: not readable JSON"
    elif damage == "wrong_shape":  # a consistent file whose header lies about a shape
        raw = bytearray((ck / "model.safetensors").read_bytes())
        n = int.from_bytes(raw[:8], "little")
        hdr = json.loads(raw[8:8 + n])
        key = next(k for k in hdr if k != "__metadata__")
        hdr[key]["shape"] = [1]  # shorter JSON, padded with spaces as safetensors does
        raw[8:8 + n] = json.dumps(hdr, separators=(",", ":")).encode().ljust(n)
        (ck / "model.safetensors").write_bytes(bytes(raw))
        want = r"model\.safetensors: tensor .* malformed header entry"
    elif damage == "missing_state_tensor":
        t = load_file(ck / "optimizer.safetensors")
        t.pop(sorted(t)[0])
        save_file(t, ck / "optimizer.safetensors")
        want = r"optimizer\.safetensors: has no tensor .* \(optimizer\.json refers to it\)"
    else:
        (ck / "ema.safetensors").write_bytes(b"\x01")
        want = r"ema\.safetensors: too short"
    rehash(ck)
    with pytest.raises(CheckpointError, match=want):
        verify_checkpoint(ck)


def test_rotation_never_deletes_because_of_a_checkpoint_that_does_not_verify(tmp_path):
    m, opt = _trained()
    first = _save(tmp_path, 1, keep=2, m=m, opt=opt)
    second = _save(tmp_path, 2, keep=2, m=m, opt=opt)
    garble(second / "model.safetensors")  # same size: only the hash sees it
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001", "step_00000002"]  # cheap check passes
    third = _save(tmp_path, 3, keep=2, m=m, opt=opt)
    # 3 and 1 are the two newest that verify; 2 is not counted, so 1 stays (the old code deleted it).
    assert first.is_dir() and second.is_dir() and third.is_dir()
    assert latest_checkpoint(tmp_path) == third
    fourth = _save(tmp_path, 4, keep=2, m=m, opt=opt)
    assert not first.exists() and not second.exists() and third.is_dir() and fourth.is_dir()


def test_a_save_that_does_not_verify_is_never_installed(tmp_path, monkeypatch):
    from storage import checkpoint as ckpt

    prev = _save(tmp_path, 1)
    real = ckpt.verify_checkpoint

    def failing(path, **kw):
        if ".tmp-" in Path(path).name:
            raise CheckpointError(Path(path) / "model.safetensors", "simulated fault")
        return real(path, **kw)

    monkeypatch.setattr(ckpt, "verify_checkpoint", failing)
    with pytest.raises(CheckpointError, match="simulated fault"):
        _save(tmp_path, 2, keep=1)
    assert [p.name for p in tmp_path.iterdir()] == [prev.name]


def test_manifest_cannot_point_outside_the_checkpoint(tmp_path):
    ck = _save(tmp_path / "ck", 1)
    (tmp_path / "secret").write_text("x")
    man = json.loads((ck / "manifest.json").read_text())
    man["files"]["../../secret"] = {"bytes": 1, "sha256": "0"}
    (ck / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="not a file of the checkpoint"):
        verify_checkpoint(ck)


def test_save_checkpoint_api_is_unchanged_for_converted_runs(tmp_path):
    path = save_checkpoint(tmp_path, 0, model={"w": torch.ones(2)}, ema=None, optimizer={}, state={"converted": True},
                           spec={"name": "x"}, meta={}, keep=0)
    ck = load_checkpoint(path)
    assert ck.optimizer == {} and ck.state == {"converted": True} and ck.ema is None


def test_other_torch_files_are_read_with_weights_only(tmp_path):
    """runtime.convert (allow-list: argparse.Namespace) and teacher weights read pickles with weights_only=True:
    a crafted one is refused and runs nothing."""
    from runtime.convert import ConversionError, load_source
    from zoo.teachers.common import WeightsMismatch, read_state_dict

    marker = tmp_path / "PWNED"
    src = tmp_path / "release.pt"
    torch.save({"ema": {"w": torch.ones(1)}, "args": Payload(marker)}, src)
    with pytest.raises(ConversionError, match="weights_only=True"):
        load_source(src, fmt="sit")
    with pytest.raises(WeightsMismatch, match="weights_only=True"):
        read_state_dict(src, "teacher", "a state dict")
    assert not marker.exists()
