"""Choices as `Literal` types, checked once by the dataclass that owns the field.

    @dataclass
    class DropRopeConfig:
        qk_norm: QkNorm = "qk"
        def __post_init__(self):
            check_choices(self, "drop_rope")

`check_choices` reads the dataclass's type hints, so the allowed values are written once, in the
Literal; it accepts `Literal[...]`, `Literal[...] | None` and `list[Literal[...]]` fields and raises a
SpecError naming the field, the bad value and the choices.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Literal

from drope_ops.errors import SpecError


def literal_values(tp) -> tuple | None:
    """The values of a Literal type (None allowed if the type is Optional), else None."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and args:
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and typing.get_origin(inner[0]) is Literal:
            return (*typing.get_args(inner[0]), None)
    return None


def check_choices(obj, section: str) -> None:
    """Raise SpecError for the first field of dataclass `obj` whose value is not among its Literal's."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        tp, value = hints[f.name], getattr(obj, f.name)
        if typing.get_origin(tp) is list and typing.get_args(tp):
            allowed = literal_values(typing.get_args(tp)[0])
            values = list(value or [])
        else:
            allowed, values = literal_values(tp), [value]
        if allowed is None:
            continue
        bad = [v for v in values if v not in allowed]
        if bad:
            shown = ", ".join("null" if a is None else repr(a) for a in allowed)
            raise SpecError(f"{section}.{f.name}={bad[0]!r}: choose one of {shown}")
