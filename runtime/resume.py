"""What ``runtime.run --resume`` continues from, decided before any tensor is loaded.

:func:`plan` returns a :class:`Plan` (the checkpoint directory, its step, lines to print) or None (a fresh
start), or raises :class:`Refused` with the lines to print (exit 2). A checkpoint can be resumed when

1. it verifies (:func:`storage.checkpoint.verify_checkpoint`: manifest, sizes, SHA-256, headers, JSON);
2. its resolved spec can continue as the new one (:func:`spec_changes`): a change of what the weights, the
   data order or the noise depend on is refused with the JSON paths; cadence, length and optimizer
   hyper-parameters (:data:`RESUMABLE`) go through with a note; a new batch size only if the saved data
   position is a whole number of new micro-batches;
3. its tensors fit the model the new spec builds (:func:`fit_problem`: names and shapes of the weights, the
   EMA and the AdamW moments, read from safetensors headers and ``optimizer.json``; the model is built on
   the meta device, no memory).

``--resume auto`` (and ``--resume RUN_DIR``) takes the newest checkpoint that passes 1 and 3 and names each
newer one it skipped; a failed 2 is refused at once (it is the user's change, not damage). With none left
it refuses, naming every checkpoint and its fault; starting over is done by moving ``checkpoints/`` away or
passing another ``--out``. ``--resume CHECKPOINT_DIR`` refuses on the first fault.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.spec import resolved_dict
from storage import safe_state
from storage.checkpoint import CheckpointError, _legacy, _read_json, _step_dirs, verify_checkpoint

RESUMABLE = ("name", "train.steps", "train.lr", "train.warmup_steps", "train.lr_schedule", "train.grad_clip",
             "train.betas", "train.weight_decay", "train.eps", "train.precision", "train.device", "train.compile",
             "train.ema.decay", "train.ema.warmup_steps", "train.parallel", "train.activation_checkpointing", "train.checkpoint_every", "train.keep_checkpoints",
             "train.max_consecutive_skips", "data.num_workers", "solver", "sample", "eval", "log")
"""Spec paths (and everything under them) a resumed run may change."""
BATCH = ("train.batch_size", "train.grad_accum")


class Refused(Exception):
    """The resume cannot go ahead; ``lines`` say why (printed as ``error: <line>``, exit 2)."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass
class Plan:
    path: Path                     # the checkpoint directory to load
    step: int                      # its step
    notes: list[str] = field(default_factory=list)  # skipped checkpoints and let-through spec changes


@dataclass
class Template:
    """Tensor shapes the new spec's model expects: ``model``/``ema`` state dicts, trainable parameters."""

    model: dict[str, tuple[int, ...]]
    ema: dict[str, tuple[int, ...]] | None
    params: list[tuple[int, ...]]
    names: list[str] = field(default_factory=list)  # of the trainable parameters, in the same order

    @classmethod
    def of(cls, spec: Any) -> "Template":
        import torch

        from runtime.compiler import compile_spec

        g = compile_spec(spec, torch.device("meta"))
        shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}  # noqa: E731
        trained = [(n, p) for n, p in g.train_module.named_parameters() if p.requires_grad]
        return cls(shapes(g.train_module.state_dict()), shapes(g.ema.state_dict()) if g.ema is not None else None,
                   [tuple(p.shape) for _, p in trained], [n for n, _ in trained])


# ------------------------------------------------------------------------------------------ spec
def diff_paths(a: Any, b: Any, path: str = "") -> list[str]:
    """JSON paths (``train.ema.decay``, ``eval.metrics[0].type``) where ``a`` and ``b`` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            out += diff_paths(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in diff_paths(x, y, f"{path}[{i}]")]
    same = a == b and isinstance(a, bool) == isinstance(b, bool)
    return [] if same else [path]


def _get(d: Any, path: str) -> Any:
    for part in path.replace("[", ".[").split("."):
        if part.startswith("["):
            i = int(part[1:-1])
            d = d[i] if isinstance(d, list) and i < len(d) else None
        else:
            d = d.get(part) if isinstance(d, dict) else None
    return d


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith((p + ".", p + "[")) for p in prefixes)


def _show(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."


def spec_changes(saved: dict, new: dict, samples_seen: int | None) -> tuple[list[str], list[str]]:
    """``(refused, allowed)`` lines for the differences between the checkpoint's resolved spec and the new
    one (both as resolved dicts). ``samples_seen``: the saved data position (None: unknown)."""
    refused, allowed = [], []
    for p in diff_paths(saved, new):
        line = f"{p}: {_show(_get(saved, p))} in the checkpoint, {_show(_get(new, p))} now"
        if _under(p, RESUMABLE):
            allowed.append(line)
        elif _under(p, BATCH):
            tr = new.get("train", {})
            micro = int(tr.get("batch_size", 0)) // max(int(tr.get("grad_accum", 1)), 1)
            if samples_seen is None or micro <= 0 or samples_seen % micro:
                refused.append(f"{line}; the saved data position ({samples_seen} samples) is not a whole number of "
                               f"micro-batches of {micro}")
            else:
                allowed.append(line)
        else:
            refused.append(line)
    return refused, allowed


def _normalised(saved: dict) -> dict:
    """The saved spec as the current code resolves it (new fields get their defaults); as saved if it no
    longer validates (then every difference is reported)."""
    from registry.errors import SpecError
    from registry.spec import resolved_dict, validate

    try:
        return resolved_dict(validate(saved))
    except (SpecError, ValueError, TypeError):
        return saved


def _samples_seen(ck: Path) -> int | None:
    from runtime.data import sampler_state

    try:
        loader = safe_state.join(_read_json(ck / "state.json")["loader"], {})
        return int(sampler_state(loader[0])["samples_seen"])
    except (CheckpointError, KeyError, IndexError, TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------- tensors
class _Shape:
    def __init__(self, shape: list[int]):
        self.shape = tuple(shape)


def _mismatch(have: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]]) -> str | None:
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    more = lambda xs: f" (and {len(xs) - 1} more)" if len(xs) > 1 else ""  # noqa: E731
    if missing:
        return f"missing tensor {missing[0]}{more(missing)}"
    if extra:
        return f"unexpected tensor {extra[0]}{more(extra)}"
    for k in want:
        if have[k] != want[k]:
            return f"{k} has shape {list(have[k])}, the model needs {list(want[k])}"
    return None


def _header_shapes(f: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v["shape"]) for k, v in safe_state.safetensors_header(f).items() if k != "__metadata__"}


def fit_problem(ck: Path, want: Template) -> str | None:
    """``<file>: <fault>`` if the (verified, format 2) checkpoint ``ck`` does not fit ``want``, else None."""
    bad = _mismatch(_header_shapes(ck / "model.safetensors"), want.model)
    if bad:
        return f"{ck / 'model.safetensors'}: {bad}"
    if want.ema is not None:
        if not (ck / "ema.safetensors").is_file():
            return f"{ck}: no ema.safetensors, but the spec trains an EMA"
        bad = _mismatch(_header_shapes(ck / "ema.safetensors"), want.ema)
        if bad:
            return f"{ck / 'ema.safetensors'}: {bad}"
    if _read_json(ck / "manifest.json").get("format") == 3:
        return _shard_problem(ck, want)
    f = ck / "optimizer.json"
    try:
        shapes = {k: _Shape(list(v)) for k, v in _header_shapes(ck / "optimizer.safetensors").items()}
        opt = safe_state.join(_read_json(f), shapes)
        groups, state = opt["param_groups"], opt["state"]
        n = sum(len(g["params"]) for g in groups)
        if n != len(want.params):
            return f"{f}: {n} parameters, the model trains {len(want.params)}"
        for i, st in state.items():
            for name, v in st.items():
                if isinstance(v, _Shape) and v.shape and v.shape != want.params[i]:
                    return (f"{f}: state {name} of parameter {i} has shape {list(v.shape)}, the parameter "
                            f"{list(want.params[i])}")
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        return f"{f}: not an optimizer state of this model ({type(e).__name__}: {str(e)[:80]})"
    return None


def _shard_problem(ck: Path, want: Template) -> str | None:
    """``<file>: <fault>`` if the DCP shards of a format-3 checkpoint do not hold this model's weights, EMA and
    AdamW moments with these shapes (read from ``.metadata`` without unpickling, :mod:`storage.sharded`)."""
    from storage.sharded import shard_shapes

    f = ck / ".metadata"
    try:
        have = shard_shapes(ck)
    except ValueError as e:
        return str(e)
    parts = {"model": want.model, "ema": want.ema or {}}
    parts["optim"] = {f"{n}.{m}": s for n, s in zip(want.names, want.params) for m in ("exp_avg", "exp_avg_sq")}
    for part, shapes in parts.items():
        saved = {k[len(part) + 1:]: v for k, v in have.items() if k.startswith(part + ".")}
        if part == "optim":
            saved = {k: v for k, v in saved.items() if not k.endswith(".step")}
        bad = _mismatch(saved, shapes)
        if bad:
            return f"{f}: {part} {bad}"
    return None


# ------------------------------------------------------------------------------------------- plan
def _check(ck: Path, spec: Any, new: dict, template: list, what: str) -> tuple[str | None, list[str]]:
    """(fault, notes) for one candidate; raises Refused for a spec that cannot continue."""
    try:
        man = verify_checkpoint(ck)
    except CheckpointError as e:
        return str(e), []
    except OSError as e:
        return f"{ck}: {e.strerror or e}", []
    refused, allowed = spec_changes(_normalised(_read_json(ck / "spec.resolved.json")), new, _samples_seen(ck))
    if refused:
        raise Refused([f"{what}: the spec differs from {ck.name}'s where a run cannot continue "
                       f"(undo the changes, or start a new run with another --out):"] + [f"  {r}" for r in refused])
    if man["format"] == 1:
        try:
            _legacy(ck / "optimizer.pt", "cpu")
            _legacy(ck / "state.pt", "cpu")
        except CheckpointError as e:
            return str(e), []
        return None, []  # a format-1 state that torch.load(weights_only=True) reads; shapes are checked on load
    if not template:
        template.append(Template.of(spec))
    fault = fit_problem(ck, template[0])
    return fault, ([f"resuming {ck.name} with spec changes: " + "; ".join(allowed)] if allowed and not fault else [])


def _pick(root: Path, spec: Any, what: str, fresh_if_empty: bool) -> Plan | None:
    dirs = _step_dirs(root)
    if not dirs:
        if fresh_if_empty:
            return None
        raise Refused([f"{what}: {root} holds no checkpoints"])
    new, template, notes, faults = resolved_dict(spec), [], [], []
    for step, ck in dirs:
        fault, more = _check(ck, spec, new, template, what)
        if fault is None:
            return Plan(ck, step, notes + more)
        faults.append(f"  {ck.name}: {fault}")
        notes.append(f"skipping checkpoint {ck.name}: {fault}")
    raise Refused([f"{what}: no checkpoint in {root} can be resumed; to start over, move {root} away or pass "
                   f"another --out:"] + faults)


def plan(arg: str | None, run_dir: Path, spec: Any) -> Plan | None:
    """The checkpoint ``--resume arg`` continues (see the module docstring); None: a fresh start."""
    root = Path(run_dir) / "checkpoints"
    if arg is None:
        if _step_dirs(root):
            raise Refused([f"{run_dir} already holds checkpoints; pass --resume auto to continue it or --out for a "
                           f"new run"])
        return None
    if arg == "auto":
        return _pick(root, spec, "--resume auto", fresh_if_empty=True)
    p = Path(arg)
    what = f"--resume {arg}"
    if (p / "manifest.json").exists() or (p / "spec.resolved.json").is_file() and not (p / "checkpoints").is_dir():
        fault, notes = _check(p, spec, resolved_dict(spec), [], what)
        if fault:
            raise Refused([f"{what}: {fault}"])
        return Plan(p, int(_read_json(p / "manifest.json")["step"]), notes)
    if (p / "checkpoints").is_dir():
        return _pick(p / "checkpoints", spec, what, fresh_if_empty=False)
    raise Refused([f"{what}: neither a checkpoint directory (no manifest.json) nor a run directory (no checkpoints/)"])
