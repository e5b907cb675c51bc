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
