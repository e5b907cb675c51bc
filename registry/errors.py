"""Errors raised while registering components and validating specs.

Every spec problem is a ``(json_path, message)`` pair so the CLI can print one line per problem,
``backbone.depth: Input should be greater than 0``, and exit with code 2 without a traceback.
"""
from __future__ import annotations

import difflib
from typing import Iterable


def closest(name: str, known: Iterable[str]) -> str | None:
    """The known name that looks most like ``name`` (difflib), or None when nothing is close."""
    hits = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return hits[0] if hits else None


class UnknownComponent(KeyError):
    """A tag that no registry entry has; the message lists the known tags and the closest one."""

    def __init__(self, kind: str, tag: str, known: Iterable[str]):
        known = sorted(known)
        near = closest(tag, known)
        hint = f"; did you mean {near!r}?" if near else ""
        self.message = f"unknown {kind} type {tag!r} (known: {', '.join(known) or 'none'}){hint}"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class DuplicateComponent(ValueError):
    """Raised when a tag is registered twice in one registry."""


class SpecError(Exception):
    """A spec that cannot run. ``problems`` holds ``(json_path, message)`` pairs, all of them."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [f"{path or '<root>'}: {msg}" for path, msg in self.problems]


class Root(str):
    """A JSON path from the spec's root, ``Root("data.sample_rate")``: what a component's ``problems`` yields for a
    fault it finds in another section. A plain ``str`` path is relative to the component ("" = the component)."""


class FieldError(ValueError):
    """A ValueError about one field of a component (raised by ``resolve`` and by checks the runtime repeats):
    ``path`` is relative to the component ("" = the component itself) or a :class:`Root`; the spec checker
    prefixes the component's own JSON path."""

    def __init__(self, path: str, message: str):
        self.path, self.message = path, message
        super().__init__(f"{path}: {message}" if path else message)


def join_path(prefix: str, path: str) -> str:
    """The JSON path of ``path`` inside the object at ``prefix``: ``("teachers.dino", "path")`` ->
    ``"teachers.dino.path"``, ``("eval.metrics", "[0]")`` -> ``"eval.metrics[0]"``; a :class:`Root` stays as it is."""
    if isinstance(path, Root) or not prefix:
        return path  # a Root stays a Root through every level
    if not path:
        return prefix
    return prefix + path if path.startswith("[") else f"{prefix}.{path}"


def under(prefix: str, problems: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """A component's ``(path, message)`` problems with each relative path placed under ``prefix``."""
    return [(join_path(prefix, p), m) for p, m in problems]
