"""Strict, finite numbers for every spec field, checked once on the params base classes.

pydantic's lax mode reads ``true`` as 1, ``"5"`` as 5 and ``1`` as ``true``, and accepts numbers no run can use
(NaN, Infinity, integers past 64 bits, floats past float32). :func:`check_raw` refuses a bool or a string where
a field wants a number (and a number or string where it wants a bool) before pydantic coerces it;
:func:`check_range` refuses non-finite floats, floats beyond float32 and integers beyond int64 after it.
"""
from __future__ import annotations

import math
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

INT_MAX = 2**63 - 1
FLOAT_MAX = 3.4028234663852886e38  # the largest float32: weights, lr and scales all end up in float32 tensors


def _members(ann: Any) -> list[Any]:
    """The members of a union (``Annotated`` and ``Optional`` unwrapped), else ``[ann]``."""
    while get_origin(ann) is Annotated:
        ann = get_args(ann)[0]
    if get_origin(ann) in (Union, types.UnionType):
        return [m for a in get_args(ann) for m in _members(a)]
    return [ann]


def _accepts(members: list[Any]) -> set[str]:
    """JSON kinds the members take: ``number``, ``bool``, ``str``, ``other`` (containers, models, anything)."""
    out: set[str] = set()
    for m in members:
        if m is bool:
            out.add("bool")
        elif m in (int, float):
            out.add("number")
        elif get_origin(m) is Literal:
            out |= {"bool" if isinstance(a, bool) else "number" if isinstance(a, (int, float)) else "str"
                    for a in get_args(m)}
        elif m is type(None):
            continue
        elif isinstance(m, type) and (issubclass(m, (list, tuple, dict, BaseModel))) or get_origin(m) is not None:
            out.add("other")
        else:  # str, Path, Any, ...
            out |= {"str", "other"}
    return out


def _shown(v: Any) -> str:
    return "true" if v is True else "false" if v is False else repr(v)


class TypeMismatch(ValueError):
    """A raw value of the wrong JSON type; ``loc`` is its position inside the field (list indices, dict keys)."""

    def __init__(self, msg: str, loc: tuple = ()):
        super().__init__(msg)
        self.loc = loc


def check_raw(value: Any, ann: Any, loc: tuple = ()) -> None:
    """Refuse a bool given for a number, a string for a number, a number or string for a bool, an integer-valued
    float beyond int64 for an integer (recursing into lists, tuples and dicts): :class:`TypeMismatch`."""
    members = _members(ann)
    kinds = _accepts(members)
    if isinstance(value, bool):
        if "bool" not in kinds and "number" in kinds:
            raise TypeMismatch(f"expected a number, got {_shown(value)}", loc)
    elif isinstance(value, (int, float)):
        if kinds == {"bool"}:
            raise TypeMismatch(f"expected true or false, got {_shown(value)}", loc)
        if isinstance(value, float) and float not in members and int in members and abs(value) > INT_MAX:
            raise TypeMismatch(f"integer out of range: {value:g} (at most 2^63 - 1 in magnitude)", loc)
    elif isinstance(value, str):
        if "str" not in kinds and "other" not in kinds and kinds & {"number", "bool"}:
            want = "a number" if "number" in kinds else "true or false"
            raise TypeMismatch(f"expected {want}, got the string {value!r}", loc)
    elif isinstance(value, (list, tuple)):
        for m in members:
            origin, args = get_origin(m), get_args(m)
            if origin is tuple and args and args[-1] is not Ellipsis and len(args) == len(value):
                for i, (v, a) in enumerate(zip(value, args)):
                    check_raw(v, a, (*loc, i))
                return
            if origin in (list, tuple) and args:
                for i, v in enumerate(value):
                    check_raw(v, args[0], (*loc, i))
                return
    elif isinstance(value, dict):
        for m in members:
            if get_origin(m) is dict and len(get_args(m)) == 2:
                for k, v in value.items():
                    check_raw(v, get_args(m)[1], (*loc, k))
                return


def check_range(value: Any, where: str = "") -> None:
    """Refuse NaN, Infinity, floats beyond float32 and integers beyond int64, anywhere in a validated value
    (params models inside it check their own fields)."""
    at = f" (at {where})" if where else ""
    if isinstance(value, bool) or isinstance(value, BaseModel):
        return
    if isinstance(value, int):
        if abs(value) > INT_MAX:
            shown = value if value.bit_length() <= 128 else f"a {value.bit_length()}-bit integer"
            raise ValueError(f"integer out of range: {shown} (at most 2^63 - 1 in magnitude){at}")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value}{at}")
        if abs(value) > FLOAT_MAX:
            raise ValueError(f"number out of range: {value:.3e} (at most {FLOAT_MAX:.4e}, the largest float32){at}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_range(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            check_range(v, f"{where}.{k}")
