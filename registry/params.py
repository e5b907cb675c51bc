"""``ZooParams``: the base of every component's params model (re-exported as ``zoo.core.params``).

Params are frozen pydantic models that forbid unknown keys. A component may offer named presets
(``presets = {"tiny": {...}, "B/2": {...}}``); a spec writes ``{"type": "sit", "preset": "B/2",
"depth": 8}`` and gets the preset's values with the explicit fields on top. The resolved spec keeps
every value explicit (and the preset name, for the record), so re-validating it is a no-op.
"""
from __future__ import annotations

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
    """Base params model: ``extra="forbid"``, frozen, every field described, numbers checked."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    presets: ClassVar[dict[str, dict[str, Any]]] = {"tiny": {}}
    field_aliases: ClassVar[dict[str, tuple[str, ...]]] = {}
    """Names other components use for what this one calls otherwise (mmdit: ``{"depth": ("double_blocks",
    "single_blocks")}``); an unknown field close to one points at these fields."""

    preset: str | None = Field(
        default=None,
        description="Named preset whose values fill the fields not given explicitly (see `python -m registry list`).",
    )

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
