"""The root ``Spec`` model, built from the registries, and ``load_spec``: JSON -> validated Spec.

Nested choices inside params models (an attention backend inside a backbone, a timestep distribution
inside an objective) are written as forward references to a registry's union name, e.g.
``attention: "AttentionSpec | None"``; :func:`rebuild` resolves every such reference against the
entries registered now, so a plugin's new entry is accepted everywhere its kind is.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from functools import cache
from typing import Annotated, Any, Iterable, Literal, get_args

import pydantic
from pydantic import Field

from registry.errors import SpecError, closest
from registry.kinds import ALL, AUTOENCODERS, LR_SCHEDULES, SOLVERS
from registry.params import Settings, StreamKeys

SPEC_VERSION = 1


class EMASettings(Settings):
    decay: float = Field(0.9999, ge=0.0, lt=1.0, description="EMA decay per optimizer step (SiT/REPA/Self-Flow: 0.9999).")
    warmup_steps: int = Field(
        0, ge=0, description="If > 0, the decay at update n is min(decay, (1 + n) / (warmup_steps + n)); 0 = constant decay."
    )


class TrainSettings(Settings):
    steps: int = Field(..., gt=0, description="Optimizer steps in the run.")
    batch_size: int = Field(..., gt=0, le=2**20, description="Global batch size (all ranks and accumulation micro-steps "
                                                               "together); at most 2^20.")
    grad_accum: int = Field(1, gt=0, description="Micro-steps accumulated per optimizer step.")
    lr: float = Field(1e-4, gt=0, description="Base AdamW learning rate (REPA/SiT: 1e-4).")
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(
        (0.9, 0.999), description="AdamW betas, each in [0, 1).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up from 0, in optimizer steps.")
    lr_schedule: "LRScheduleSpec" = Field(default_factory=lambda: LR_SCHEDULES.get("constant").Params(type="constant"),
                                          description="Learning-rate schedule after warm-up.")
    grad_clip: float | None = Field(1.0, gt=0, description="Max global gradient norm; null disables clipping.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast on CUDA, fp32 on CPU (bf16 backward is slow on CPUs).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available.")
    ema: EMASettings = Field(default_factory=EMASettings, description="EMA of the backbone (evaluated; Self-Flow's teacher).")
    seed: int = Field(0, ge=0, description="Seed of initialisation, data order and per-step noise (0 to 2^63 - 1).")
    checkpoint_every: int = Field(1000, gt=0, description="Save a checkpoint every this many steps (and at the end).")
    keep_checkpoints: int = Field(3, gt=0, description="Keep the newest this many checkpoints.")
    max_consecutive_skips: int = Field(
        20, gt=0, description="Stop the run after this many consecutive steps skipped for a non-finite loss or gradient.")
    compile: bool = Field(False, description="torch.compile the whole training loss (student, teacher pass, heads; the random draws stay eager) as one graph; slow first step; off on CPU by default.")


class SampleSettings(Settings):
    every: int | None = Field(None, gt=0, description="Write a preview sample grid every this many steps (null = only at the end).")
    n: int = Field(16, gt=0, le=10_000, description="Samples per preview / per `runtime.sample` call (at most 10,000).")
    cfg_scale: float = Field(1.0, ge=0, description="Classifier-free guidance scale w in v_u + w (v_c - v_u); 1 = off.")
    guidance_low: float = Field(0.0, ge=0, le=1, description="Guidance applies for t in [low, high] (RF time).")
    guidance_high: float = Field(1.0, ge=0, le=1, description="Upper end of the guidance interval (REPA: 0.7).")
    seed: int = Field(0, ge=0, description="Seed of the sampling noise (independent of the training RNG; 0 to 2^63 - 1).")
    labels: list[int] | None = Field(None, description="Class labels to sample; null cycles 0, 1, ..., num_classes - 1.")
    use_ema: bool = Field(True, description="Sample from the EMA weights.")


class EvalSettings(Settings):
    every: int | None = Field(None, gt=0, description="Evaluate every this many steps (null = only at the end).")
    at_end: bool = Field(True, description="Evaluate once after the last step.")
    num_samples: int = Field(200, gt=0, le=100_000, description="Generated samples per evaluation (held in memory "
                                                               "together; at most 100,000).")
    metrics: list["MetricSpec"] = Field(default_factory=list, description="Metrics to compute.")


class LogSettings(Settings):
    every: int = Field(10, gt=0, description="Log scalars every this many steps.")
    tensorboard: bool = Field(True, description="Write tensorboard events under tb/.")
    progress: bool = Field(True, description="Show a progress bar.")


SECTION_MODELS: list[type[pydantic.BaseModel]] = [TrainSettings, SampleSettings, EvalSettings]


class SpecBase(Settings):
    schema_: str | None = Field(None, alias="$schema", description="Path of the JSON Schema, for editors.")
    version: Literal[1] = Field(..., description="Spec format version.")
    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="Run name; default run dir runs/<name>.")

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @pydantic.field_validator("name")
    @classmethod
    def _plain_file_name(cls, v: str) -> str:
        """The pattern keeps out '/', but '.' and '..' would make runs/<name> the runs folder or its parent."""
        if set(v) <= {"."}:
            raise ValueError(f"{v!r} is not a plain file name; the run directory is runs/<name>")
        return v


def _no_entries(kind: str) -> type[pydantic.BaseModel]:
    """Placeholder for a kind with no entries: rejects every value, instead of breaking the models naming it."""

    def reject(cls, data: Any) -> Any:
        raise ValueError(f"no {kind} type is registered")

    return pydantic.create_model(f"No_{kind}", __validators__={
        "reject": pydantic.model_validator(mode="before")(classmethod(reject))})


def _namespace() -> dict[str, Any]:
    return {r.ref: r.union() if r.names() else _no_entries(r.kind) for r in ALL.values()}


_SPEC_MODEL: type[SpecBase] | None = None


def rebuild() -> type[SpecBase]:
    """Resolve every registry forward reference and build the root ``Spec`` model (call after registering)."""
    global _SPEC_MODEL
    ns = _namespace()
    models = [m for r in ALL.values() for m in r.params_models()] + SECTION_MODELS
    for _ in range(2):  # twice: a model rebuilt first may embed one rebuilt later
        for m in models:
            m.model_rebuild(force=True, _types_namespace=ns)
        ns = _namespace()
    sections = {
        "modality": (ns["ModalitySpec"], Field(..., description="How latents become tokens.")),
        "data": (ns["DataSpec"], Field(..., description="Training data.")),
        "autoencoder": (ns["AutoencoderSpec"], Field(
            default_factory=lambda: AUTOENCODERS.get("identity").Params(type="identity"), description="Frozen autoencoder.")),
        "backbone": (ns["BackboneSpec"], Field(..., description="The trained network.")),
        "teachers": (dict[str, ns["TeacherSpec"]], Field(  # type: ignore[valid-type]
            default_factory=dict, description="Frozen external encoders by local name (REPA's targets); objectives "
                                              "refer to them by that name.")),
        "objective": (ns["ObjectiveSpec"], Field(..., description="Training objective.")),
        "solver": (ns["SolverSpec"], Field(
            default_factory=lambda: SOLVERS.get("euler").Params(type="euler"), description="Sampler.")),
        "train": (TrainSettings, Field(..., description="Optimisation, precision, EMA, checkpoints.")),
        "sample": (SampleSettings, Field(default_factory=SampleSettings, description="Sampling and guidance.")),
        "eval": (EvalSettings, Field(default_factory=EvalSettings, description="Evaluation metrics and cadence.")),
        "log": (LogSettings, Field(default_factory=LogSettings, description="Logging.")),
    }
    _SPEC_MODEL = pydantic.create_model("Spec", __base__=SpecBase, **sections)  # type: ignore[call-overload]
    return _SPEC_MODEL


def spec_model() -> type[SpecBase]:
    import zoo  # noqa: F401  (registers the built-ins and builds the model, if nobody has yet)

    return _SPEC_MODEL or rebuild()


# ----------------------------------------------------------------------------------------------- errors
def _json_path(loc: tuple, raw: Any) -> str:
    """pydantic ``loc`` -> dotted JSON path, dropping the union-tag steps (``backbone.sit.depth`` -> ``backbone.depth``)."""
    parts: list[str] = []
    node = raw
    for step in loc:
        if isinstance(node, dict) and isinstance(step, str) and step not in node and node.get("type") == step:
            continue  # discriminated-union tag
        if isinstance(step, int):
            parts.append(f"[{step}]")
        else:
            parts.append(("." if parts else "") + str(step))
        if isinstance(node, dict):
            node = node.get(step)
        elif isinstance(node, list) and isinstance(step, int) and step < len(node):
            node = node[step]
        else:
            node = None
    return "".join(parts)


def _holder(loc: tuple, raw: Any) -> Any:
    """The raw object that holds ``loc[-1]`` (union-tag steps skipped)."""
    node = raw
    for step in loc[:-1]:
        if isinstance(node, dict) and step in node:
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and step < len(node):
            node = node[step]
    return node


def _known_fields(loc: tuple, raw: Any) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """Field names allowed in the object that holds ``loc[-1]``, and the ``field_aliases`` of its params (best
    effort, for "did you mean")."""
    node = _holder(loc, raw)
    if isinstance(node, dict) and "type" in node:
        models = [c.Params for r in ALL.values() for t, c in r.items() if t == node["type"]]
        return (sorted({f for m in models for f in m.model_fields}),
                {a: fs for m in models for a, fs in getattr(m, "field_aliases", {}).items()})
    top = {"train": TrainSettings, "sample": SampleSettings, "eval": EvalSettings, "log": LogSettings}
    if len(loc) == 2 and loc[0] in top:
        return list(top[loc[0]].model_fields), {}
    if len(loc) == 1:
        return [f if f != "schema_" else "$schema" for f in spec_model().model_fields], {}
    return [], {}


def _unknown_field(name: str, loc: tuple, raw: Any) -> str:
    """``unknown field; did you mean 'depth'?``; a name close to another component's field that this one
    spells otherwise (``field_aliases``) points at this one's fields."""
    fields, aliases = _known_fields(loc, raw)
    near = closest(name, [*fields, *aliases])
    if near in aliases and near not in fields:
        holder = _holder(loc, raw)  # a dict with a "type": _known_fields found aliases only there
        return f"unknown field; did you mean {' or '.join(map(repr, aliases[near]))}? ({holder['type']} has no {near!r})"
    return "unknown field" + (f"; did you mean {near!r}?" if near else "")


def problems_from_validation(err: pydantic.ValidationError, raw: Any) -> list[tuple[str, str]]:
    out = []
    for e in err.errors(include_url=False):
        loc, typ, ctx = tuple(e["loc"]), e["type"], e.get("ctx") or {}
        path = _json_path(loc, raw)
        if typ == "union_tag_invalid":
            known = [t.strip().strip("'") for t in str(ctx.get("expected_tags", "")).split(",")]
            tag = str(ctx.get("tag"))
            near = closest(tag, known)
            msg = f"unknown type {tag!r} (known: {', '.join(known)})" + (f"; did you mean {near!r}?" if near else "")
            path = (path + ".type") if path else "type"
        elif typ == "union_tag_not_found":
            msg = "missing 'type' (every component is {\"type\": ..., ...})"
        elif typ == "extra_forbidden":
            msg = _unknown_field(str(loc[-1]), loc, raw)
        else:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
        out.append((path, msg))
    return out


# ------------------------------------------------------------------------------------ cross-field rules
def cross_problems(spec: Any) -> list[tuple[str, str]]:
    """Rules spanning sections, checked before any tensor exists. Components add their own through a
    ``problems(spec) -> Iterable[(json_path, message)]`` method on their params model."""
    out: list[tuple[str, str]] = []
    tr = spec.train
    if tr.batch_size % tr.grad_accum:
        out.append(("train.grad_accum", f"batch_size {tr.batch_size} is not divisible by grad_accum {tr.grad_accum}"))
    if spec.sample.guidance_low > spec.sample.guidance_high:
        out.append(("sample.guidance_low", "guidance_low must not exceed guidance_high"))
    ncls = spec.data.num_classes
    if spec.sample.labels is not None:
        bad = [y for y in spec.sample.labels if not 0 <= y < max(ncls, 1)]
        if bad:
            out.append(("sample.labels", f"labels {bad} are outside 0..{ncls - 1}"))
    out += stream_key_problems(spec)
    for section in RESOLVED_SECTIONS:
        out += list(_component_problems(getattr(spec, section), spec))
    for name, teacher in spec.teachers.items():
        out += [(p or f"teachers.{name}", msg) for p, msg in _component_problems(teacher, spec)]
    for i, m in enumerate(spec.eval.metrics):
        out += [(p or f"eval.metrics[{i}]", msg) for p, msg in _component_problems(m, spec)]
    return list(dict.fromkeys(out))  # two components may see the same fault: say it once


def _component_problems(params: Any, spec: Any) -> Iterable[tuple[str, str]]:
    fn = getattr(params, "problems", None)
    return fn(spec) if fn is not None else ()


@cache
def _stream_keyed(model: type[pydantic.BaseModel]) -> dict[str, StreamKeys]:
    """The fields of ``model`` marked :class:`StreamKeys` (on the field or on a member of its union)."""
    out = {}
    for name, info in model.model_fields.items():
        marks, stack = [m for m in info.metadata if isinstance(m, StreamKeys)], [info.annotation]
        while stack and not marks:
            args = get_args(stack.pop())
            marks = [a for a in args if isinstance(a, StreamKeys)]
            stack += [a for a in args if not isinstance(a, StreamKeys)]
        if marks:
            out[name] = marks[0]
    return out


def stream_key_problems(spec: Any) -> list[tuple[str, str]]:
    """Every key of a :class:`StreamKeys` dict, anywhere in the spec, names a modality stream of the run."""
    names = tuple(getattr(spec.modality, "segment_names", ()))
    out: list[tuple[str, str]] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, pydantic.BaseModel):
            marked = _stream_keyed(type(node))
            for field in type(node).model_fields:
                value, sub = getattr(node, field), f"{path}.{field}" if path else field
                if field in marked and isinstance(value, dict):
                    for key in value:
                        if key not in names and key not in marked[field].also:
                            near = closest(key, names)
                            out.append((f"{sub}.{key}", f"unknown modality {key!r} (known: {', '.join(sorted(names))})"
                                        + (f"; did you mean {near!r}?" if near else "")))
                walk(value, sub)
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    if names:
        walk(spec, "")
    return out


# ------------------------------------------------------------------------------------------ loading
def set_path(raw: dict, dotted: str, value: Any) -> None:
    """``--set a.b.c=VALUE``: set a nested key of the raw JSON (creating objects on the way)."""
    keys = dotted.split(".")
    node = raw
    for i, k in enumerate(keys[:-1]):
        nxt = node.get(k) if isinstance(node, dict) else None
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise SpecError([(".".join(keys[: i + 1]), f"--set {dotted}: not an object, cannot set a field inside it")])
        node = nxt
    node[keys[-1]] = value


def parse_set(item: str) -> tuple[str, Any]:
    """``"a.b=VALUE"`` -> ``("a.b", value)``; VALUE is parsed as JSON, else kept as a string."""
    if "=" not in item:
        raise SpecError([("", f"--set {item!r}: expected KEY=VALUE")])
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or "" in key.split("."):
        raise SpecError([("", f"--set {item[:80]!r}: KEY must be a dotted field path such as train.steps")])
    try:
        value = parse_json_text(text, f"--set {key}")
    except _NotJSON:
        value = text
    return key, value


MAX_SPEC_BYTES = 16 * 2**20
MAX_DEPTH = 64  # shipped specs nest 5 levels; far deeper input only exhausts the parser's recursion


class _NotJSON(Exception):
    def __init__(self, e: json.JSONDecodeError):
        self.e = e


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (iterative: safe on any depth the parser returned)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, d)
            stack += [(v, d + 1) for v in (node.values() if isinstance(node, dict) else node)]
    return deepest


def parse_json_text(text: str, where: str) -> Any:
    """JSON text -> value; :class:`SpecError` naming ``where`` for input the parser cannot take (nesting past
    :data:`MAX_DEPTH`, integer literals past Python's digit limit); ``_NotJSON`` for plain invalid JSON."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise _NotJSON(e) from None
    except RecursionError:
        raise SpecError([("", f"{where}: JSON nested too deeply (at most {MAX_DEPTH} levels)")]) from None
    except ValueError:  # "Exceeds the limit (4300 digits) for integer string conversion"
        limit = sys.get_int_max_str_digits()
        m = re.search(r"\d{%d,}" % (limit + 1), text)
        at = f" ({len(m.group()):,} digits at line {text.count(chr(10), 0, m.start()) + 1})" if m else ""
        raise SpecError([("", f"{where}: integer literal too long{at}; at most {limit} digits")]) from None
    if _depth(value) > MAX_DEPTH:
        raise SpecError([("", f"{where}: JSON nested too deeply (at most {MAX_DEPTH} levels)")])
    return value


def _decode(data: bytes, p: Path) -> str:
    """Spec bytes -> text: UTF-8 (a leading BOM is allowed); UTF-16/32 and binary files are refused, naming the file."""
    if b"\x00" in data:
        enc = json.detect_encoding(data)
        kind = f"{enc.upper()} text" if enc != "utf-8" else "a binary file (it holds NUL bytes)"
        raise SpecError([("", f"{p}: not UTF-8 JSON: looks like {kind}; save the spec as UTF-8")])
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise SpecError([("", f"{p}:{line}:{col}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                              f"save the spec as UTF-8")]) from None


def read_json(path: str | Path) -> dict:
    """A spec file -> its raw JSON object; every fault (missing, unreadable, not UTF-8, not JSON, too deep, not an
    object) is a one-line :class:`SpecError` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise SpecError([("", f"spec file not found: {p}" if not p.exists() else f"{p}: not a file")])
    try:
        size = p.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError([("", f"{p}: {size:,} bytes is too large for a spec (at most {MAX_SPEC_BYTES:,})")])
        data = p.read_bytes()
    except OSError as e:
        raise SpecError([("", f"{p}: cannot read: {e.strerror or e}")]) from None
    try:
        raw = parse_json_text(_decode(data, p), str(p))
    except _NotJSON as n:
        e = n.e
        raise SpecError([("", f"{p}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}")]) from None
    if not isinstance(raw, dict):
        raise SpecError([("", f"{p}: the spec must be a JSON object")])
    return raw


RESOLVED_SECTIONS = ("modality", "data", "autoencoder", "backbone", "objective", "solver")


def resolve_defaults(spec: Any) -> Any:
    """Fill defaults that depend on other sections (e.g. Self-Flow's tap blocks from the backbone depth): a
    component's params may define ``resolve(spec) -> params``; the resolved spec then holds explicit values."""
    updates: dict[str, Any] = {}
    for section in RESOLVED_SECTIONS:
        fn = getattr(getattr(spec, section), "resolve", None)
        if fn is not None:
            updates[section] = fn(spec)
    if any(hasattr(t, "resolve") for t in spec.teachers.values()):
        updates["teachers"] = {k: t.resolve(spec) if hasattr(t, "resolve") else t for k, t in spec.teachers.items()}
    return spec.model_copy(update=updates) if updates else spec


def clip_warmup(spec: Any) -> Any:
    """A warm-up longer than the run (a short smoke run of a long spec) is clipped to ``train.steps``, with a
    warning on stderr; the resolved spec holds the clipped value."""
    tr = spec.train
    if tr.warmup_steps <= tr.steps:
        return spec
    sys.stderr.write(f"warning: train.warmup_steps {tr.warmup_steps} > train.steps {tr.steps}; "
                     f"warm-up clipped to {tr.steps} steps\n")
    return spec.model_copy(update={"train": tr.model_copy(update={"warmup_steps": tr.steps})})


def validate(raw: dict) -> Any:
    """Raw JSON object -> validated ``Spec``; raises :class:`SpecError` listing every problem."""
    try:
        spec = spec_model().model_validate(raw)
    except pydantic.ValidationError as e:
        raise SpecError(problems_from_validation(e, raw)) from None
    try:
        spec = resolve_defaults(clip_warmup(spec))
    except ValueError as e:  # a resolve hook that cannot derive a value says why, as "json.path: message"
        path, sep, msg = str(e).partition(": ")
        raise SpecError([(path, msg) if sep and " " not in path else ("", str(e))]) from None
    probs = cross_problems(spec)
    if probs:
        raise SpecError(probs)
    return spec


def load_spec(path: str | Path, sets: Iterable[str] = ()) -> Any:
    raw = read_json(path)
    for item in sets:
        set_path(raw, *parse_set(item))
    return validate(raw)


def resolved_dict(spec: Any) -> dict:
    """The resolved spec: every default and preset value explicit, ready for ``spec.resolved.json``."""
    d = spec.model_dump(mode="json", by_alias=True)
    d.pop("$schema", None)
    return d
