"""``ZooParams``: the base of every component's params model (re-exported as ``zoo.core.params``).

Params are frozen pydantic models that forbid unknown keys. A component may offer named presets
(``presets = {"tiny": {...}, "B/2": {...}}``); a spec writes ``{"type": "sit", "preset": "B/2",
"depth": 8}`` and gets the preset's values with the explicit fields on top. The resolved spec keeps
every value explicit (and the preset name, for the record), so re-validating it is a no-op.
"""
from __future__ import annotations

import difflib
from typing import Any, ClassVar, Iterable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from registry.errors import closest
from registry.numeric import TypeMismatch, check_range, check_raw


class CheckedNumbers(BaseModel):
    """Every field of every spec model: no bool for a number (nor a number for a bool), no string for either,
    finite floats within float32, integers within int64 (:mod:`registry.numeric`)."""

    model_config = ConfigDict(allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _strict_types(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        by_key = {f.alias or n: f for n, f in cls.model_fields.items()} | dict(cls.model_fields)
        errors = []
        for key, value in data.items():
            field = by_key.get(key) if isinstance(key, str) else None
            if field is None:
                continue
            try:
                check_raw(value, field.annotation)
            except TypeMismatch as e:
                errors.append(InitErrorDetails(type=PydanticCustomError("strict_type", str(e)), loc=(key, *e.loc),
                                               input=value))
        if errors:  # raised as a ValidationError, pydantic keeps each error's field in its location
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return data

    @field_validator("*", mode="after")
    @classmethod
    def _finite_in_range(cls, value: Any) -> Any:
        check_range(value)
        return value


class ZooParams(CheckedNumbers):
    """Base params model: ``extra="forbid"``, frozen, every field described, numbers checked.

    Optional hooks are declared once, with their defaults, here and on the per-kind bases of
    :mod:`zoo.core.params` (each lists its own in ``hooks``); the runtime calls them without probing. A subclass
    attribute whose name is one letter or two off a declared hook (``problem``, ``stream_rate``) is a TypeError
    when the class is defined, so a misspelt hook cannot silently fall back to the default.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())
    hooks: ClassVar[tuple[str, ...]] = ("problems", "resolve", "warnings")

    presets: ClassVar[dict[str, dict[str, Any]]] = {"tiny": {}}
    field_aliases: ClassVar[dict[str, tuple[str, ...]]] = {}
    """Names other components use for what this one calls otherwise (mmdit: ``{"depth": ("double_blocks",
    "single_blocks")}``); an unknown field close to one points at these fields."""

    preset: str | None = Field(
        default=None,
        description="Named preset whose values fill the fields not given explicitly (see `python -m registry list`).",
    )

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        declared = {h for k in cls.__mro__ for h in vars(k).get("hooks", ())}
        for name in [*vars(cls), *vars(cls).get("__annotations__", {})]:
            if name.startswith("_") or name in declared:
                continue
            near = difflib.get_close_matches(name, declared, n=1, cutoff=0.85)
            if near:
                raise TypeError(f"{cls.__name__}.{name}: not a hook of its kind; did you mean {near[0]!r}? "
                                f"(declared: {', '.join(sorted(declared))})")

    def problems(self, spec: Any) -> Iterable[tuple[str, str]]:
        """Spec rules this component checks across sections: ``(json_path, message)`` pairs (none by default)."""
        return ()

    def resolve(self, spec: Any) -> "ZooParams":
        """These params with defaults that depend on other sections filled in (unchanged by default); the resolved
        spec holds the result. A ValueError says why a value cannot be derived."""
        return self

    def warnings(self, spec: Any) -> Iterable[str]:
        """Lines printed to stderr before the run starts: legal but doubtful settings (none by default)."""
        return ()

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("preset"), str) and data["preset"] in cls.presets:
            return {**cls.presets[data["preset"]], **data}
        return data

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str | None) -> str | None:
        if v is not None and v not in cls.presets:
            near = closest(v, cls.presets)
            hint = f"; did you mean {near!r}?" if near else ""
            raise ValueError(f"unknown preset {v!r} (known: {', '.join(sorted(cls.presets))}){hint}")
        return v


class Settings(CheckedNumbers):
    """Base for untagged spec sections (``train``, ``sample``, ...): forbid unknown keys, frozen, numbers checked."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class StreamKeys:
    """Marks a dict field keyed by the run's modality streams, ``Annotated[dict[str, float], StreamKeys()]``:
    the spec checker refuses a key that names none of ``spec.modality.segment_names`` (nor ``also``)."""

    def __init__(self, also: Iterable[str] = ()):
        self.also = frozenset(also)
