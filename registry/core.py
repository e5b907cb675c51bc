"""``Registry[T]``: one typed registry per component kind.

A component is a class with a class attribute ``Params`` naming its own, uniquely named pydantic
model (a :class:`zoo.core.params.ZooParams`) whose ``type`` field is a ``Literal``; that literal is
the tag written in specs. Registering is a class decorator::

    @BACKBONES.register
    class SiT(nn.Module):
        Params = SiTParams          # SiTParams.type: Literal["sit"]

Duplicates raise; tests swap an entry only inside ``with REG.override(cls):``.
"""
from __future__ import annotations

import contextlib
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Generic, Iterator, TypeVar, Union

from pydantic import Field

from registry.errors import DuplicateComponent, UnknownComponent

T = TypeVar("T")


def tag_of(params_model: type) -> str:
    """The ``Literal`` value of a params model's ``type`` field."""
    fld = params_model.model_fields.get("type")
    args = typing.get_args(fld.annotation) if fld is not None else ()
    if fld is None or typing.get_origin(fld.annotation) is not typing.Literal or len(args) != 1:
        raise TypeError(f"{params_model.__name__}.type must be a Literal with exactly one value")
    return str(args[0])


@dataclass
class Registry(Generic[T]):
    """Entries of one kind, by tag.

    Args:
        kind: the kind's name as used in messages and in ``python -m registry list`` (``backbone``).
        ref: the forward-reference name under which the union of this kind's params models is
            visible to other params models (``"AttentionSpec"``); see :func:`registry.spec.rebuild`.
        require_tiny: entries must offer a ``tiny`` preset (models that tests run at tiny size).
    """

    kind: str
    ref: str
    require_tiny: bool = False
    _entries: dict[str, type] = field(default_factory=dict)
    _sources: dict[str, str] = field(default_factory=dict)

    def register(self, cls: type[T] | None = None, *, source: str | None = None) -> Any:
        """Class decorator. ``source`` names the package an entry came from (default: its module's)."""

        def deco(c: type[T]) -> type[T]:
            params = getattr(c, "Params", None)
            if params is None:
                raise TypeError(f"{c.__name__} has no Params model; cannot register it as a {self.kind}")
            tag = tag_of(params)
            if tag in self._entries:
                prev = self._entries[tag]
                raise DuplicateComponent(
                    f"{self.kind} type {tag!r} is already registered by {prev.__module__}.{prev.__qualname__}"
                )
            for other_tag, other in self._entries.items():
                if other.Params.__name__ == params.__name__:
                    raise DuplicateComponent(
                        f"params model name {params.__name__!r} of {self.kind} {tag!r} is already used by "
                        f"{other_tag!r}; params models need unique names"
                    )
            if self.require_tiny and "tiny" not in params.presets:
                raise TypeError(f"{self.kind} {tag!r} must define a 'tiny' preset in {params.__name__}.presets")
            self._entries[tag] = c
            self._sources[tag] = source or c.__module__.split(".")[0]
            return c

        return deco(cls) if cls is not None else deco

    def get(self, tag: str) -> type[T]:
        try:
            return self._entries[tag]
        except KeyError:
            raise UnknownComponent(self.kind, tag, self._entries) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, type[T]]]:
        return iter(sorted(self._entries.items()))

    def source(self, tag: str) -> str:
        return self._sources[tag]

    def presets(self, tag: str) -> list[str]:
        return sorted(self.get(tag).Params.presets)

    def params_models(self) -> list[type]:
        return [c.Params for _, c in self.items()]

    def union(self) -> Any:
        """``Annotated[Union[...], Field(discriminator="type")]`` over every registered params model."""
        models = tuple(self.params_models())
        if not models:
            raise RuntimeError(f"no {self.kind} is registered")
        if len(models) == 1:
            return Annotated[models[0], Field(discriminator="type")]
        return Annotated[Union[models], Field(discriminator="type")]  # type: ignore[valid-type]

    def build(self, params: Any, **deps: Any) -> T:
        """``cls(params, **deps)``; a dep that shares a name with a params field is an error."""
        clash = set(deps) & set(type(params).model_fields)
        if clash:
            raise TypeError(f"{self.kind} {params.type!r}: runtime deps {sorted(clash)} collide with params fields")
        return self.get(params.type)(params, **deps)

    @contextlib.contextmanager
    def override(self, cls: type[T], *, source: str = "test") -> Iterator[None]:
        """Temporarily register (or replace) ``cls`` under its tag; restores the old entry on exit."""
        tag = tag_of(cls.Params)
        old, old_src = self._entries.get(tag), self._sources.get(tag)
        self._entries[tag], self._sources[tag] = cls, source
        try:
            yield
        finally:
            if old is None:
                self._entries.pop(tag, None)
                self._sources.pop(tag, None)
            else:
                self._entries[tag], self._sources[tag] = old, old_src  # type: ignore[assignment]
