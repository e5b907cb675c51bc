"""``load_spec``: JSON -> validated ``Spec`` (the model: :mod:`registry.model`), and the spec's problems as
``(json_path, message)`` pairs."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from functools import cache
from typing import Any, Iterable, Iterator, get_args

import pydantic

from registry.errors import FieldError, SpecError, closest, join_path, under
from registry.kinds import ALL
from registry.model import (SECTION_MODELS, EvalSettings, LogSettings, SampleSettings, SpecBase,  # noqa: F401
                            TrainSettings, current, rebuild)
from registry.params import StreamKeys, ZooParams


def spec_model() -> type[SpecBase]:
    """The root model with every built-in registered: importing ``zoo`` registers them and builds it."""
    import zoo  # noqa: F401

    return current() or rebuild()


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
                {a: fs for m in models for a, fs in m.field_aliases.items()})
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
    ``problems(spec) -> Iterable[(path, message)]`` method on their params model, at any nesting level (see
    :func:`component_problems`)."""
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
    out += component_problems(spec)
    return list(dict.fromkeys(out))  # two components may see the same fault: say it once


def components(spec: Any) -> Iterator[tuple[str, ZooParams]]:
    """Every component of the spec with its JSON path, at every nesting level (``autoencoder.parts.audio``,
    ``teachers.dino``, ``eval.metrics[0]``, ``objective.timesteps``, ``train.lr_schedule``), parents first."""

    def walk(node: Any, path: str) -> Iterator[tuple[str, ZooParams]]:
        if isinstance(node, ZooParams):
            yield path, node
        if isinstance(node, pydantic.BaseModel):
            for field in type(node).model_fields:
                yield from walk(getattr(node, field), join_path(path, field))
        elif isinstance(node, dict):
            for key, value in node.items():
                yield from walk(value, join_path(path, str(key)))
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                yield from walk(value, join_path(path, f"[{i}]"))

    fields = type(spec).model_fields
    for section in [*RESOLVED_SECTIONS, "teachers", *(f for f in fields if f not in RESOLVED_SECTIONS + ("teachers",))]:
        yield from walk(getattr(spec, section), section)


def component_problems(spec: Any) -> list[tuple[str, str]]:
    """Each component's ``problems(spec)`` (paths relative to it, or :class:`Root`) under its JSON path, and what
    the autoencoder cannot take of the data samples (``input_problems``; a ``streams`` autoencoder passes each
    part its stream)."""
    out: list[tuple[str, str]] = []
    for path, params in components(spec):
        out += under(path, params.problems(spec))
        if path == "autoencoder":
            out += under(path, params.input_problems(spec.data.sample_shape(), spec))
    return out


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
    names = tuple(spec.modality.segment_names)
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
    component's params ``resolve(spec) -> params`` hook fills them; the resolved spec then holds explicit values.
    A ValueError from a hook is a :class:`SpecError` at the component's path (a :class:`FieldError`: at its field)."""

    def resolved(params: Any, path: str) -> Any:
        try:
            return params.resolve(spec)
        except FieldError as e:
            raise SpecError([(join_path(path, e.path), e.message)]) from None
        except ValueError as e:
            raise SpecError([(path, str(e))]) from None

    updates: dict[str, Any] = {section: resolved(getattr(spec, section), section) for section in RESOLVED_SECTIONS}
    updates["teachers"] = {k: resolved(t, f"teachers.{k}") for k, t in spec.teachers.items()}
    return spec.model_copy(update=updates)


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
    spec = resolve_defaults(clip_warmup(spec))
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
