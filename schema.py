"""What a config field allows, declared once on its type, and the one check that reads the declaration.

    optimizer: Literal["adamw", "muon"] = "adamw"          # one of these values
    lr: Annotated[float, Range(gt=0)] = 3e-4               # a number > 0
    val_every: Optional[PositiveInt] = 100                 # an integer >= 1, or null

`check(key, value, hint)` returns the value in its field's type or raises a one-line ValueError naming the
key, what it allows and the value; `allowed(hint)` is that "what it allows" text, which is also the "allowed"
column of docs/CONFIG_REFERENCE.md (tests/test_docs.py compares the two). config.py checks every YAML key
with it and model.ModelConfig its own fields, so a rule cannot read differently in two places.
"""

import math
from dataclasses import dataclass, fields
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

NoneType = type(None)


@dataclass(frozen=True)
class Range:
    """The valid numbers of a field: `Annotated[float, Range(ge=0, lt=1)]` is a number in [0, 1)."""

    ge: float | None = None  # >= this
    gt: float | None = None  # > this
    le: float | None = None  # <= this
    lt: float | None = None  # < this

    def __contains__(self, x) -> bool:
        return ((self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt)
                and (self.le is None or x <= self.le) and (self.lt is None or x < self.lt))

    def __str__(self) -> str:
        low, high = (self.ge if self.gt is None else self.gt), (self.le if self.lt is None else self.lt)
        if low is not None and high is not None:
            return f"in {'(' if self.gt is not None else '['}{low}, {high}{')' if self.lt is not None else ']'}"
        if low is not None:
            return f"{'>' if self.gt is not None else '>='} {low}"
        return f"{'<' if self.lt is not None else '<='} {high}"


PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]
PositiveFloat = Annotated[float, Range(gt=0)]


class _NotAllowed(Exception):
    """A value outside its type or its allowed values; `check` turns it into the one message."""


def check(key: str, value: Any, hint) -> Any:
    """`value` as type `hint` (an int where a float is expected, "32" for YAML's 32 where a string is), or a
    ValueError: 'KEY must be ALLOWED, got VALUE'."""
    try:
        return _convert(key, value, hint)
    except _NotAllowed:
        raise ValueError(f"{key} must be {allowed(hint) or type_name(hint)}, got {value!r}") from None


def check_fields(obj, prefix: str) -> None:
    """Check every field of the dataclass instance `obj` against its declared type (converting in place)."""
    hints = get_type_hints(type(obj), include_extras=True)
    for f in fields(obj):
        setattr(obj, f.name, check(prefix + f.name, getattr(obj, f.name), hints[f.name]))


def _convert(key: str, value: Any, hint) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:  # a type and its Range
        number = _convert(key, value, args[0])
        if number not in args[1]:
            raise _NotAllowed
        return number
    if origin is Literal:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # `precision: 32` (a YAML number) means the string "32"
        if value not in args:
            raise _NotAllowed
        return value
    if origin is Union:
        if value is None and NoneType in args:
            return None
        for option in args:
            try:
                return _convert(key, value, option)
            except _NotAllowed:
                pass
        raise _NotAllowed
    if hint is list or origin is list:
        if not isinstance(value, list):
            raise _NotAllowed
        return [check(f"{key}[{i}]", item, args[0]) for i, item in enumerate(value)] if args else value
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)  # an int, or a string: YAML reads 3e-4 as one
        except ValueError:
            raise _NotAllowed from None
        if not math.isfinite(number):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
        return number
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):  # bool is an int subclass; 1.5 would truncate
            raise _NotAllowed
        if not -2**63 <= value < 2**63:
            raise ValueError(f"{key} is {value}: far beyond anything this project can run (and beyond a 64-bit "
                             "integer)")
    elif not isinstance(value, hint):
        raise _NotAllowed
    return value


def allowed(hint) -> str:
    """What a type allows beyond its type name, in words ('adamw or muon', 'a number in [0, 1)'); '' if nothing."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return _either([str(a) for a in args])
    if origin is Annotated:
        return f"{'an integer' if args[0] is int else 'a number'} {args[1]}"
    if origin is list and args:
        return f"a list, each {allowed(args[0])}" if allowed(args[0]) else ""
    if origin is Union:
        options = [a for a in args if a is not NoneType]
        if not any(allowed(a) for a in options):
            return ""
        return _either([allowed(a) or type_name(a) for a in options] + (["null"] if NoneType in args else []))
    return ""


def type_name(hint) -> str:
    """How messages and the reference write a type: int, float or null, int or str, list."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        return type_name(args[0])
    if origin is Literal:
        return type(args[0]).__name__
    if origin is Union:
        names = list(dict.fromkeys(type_name(a) for a in args if a is not NoneType))
        return " or ".join(names + (["null"] if NoneType in args else []))
    return "list" if hint is list or origin is list else hint.__name__


def _either(words: list[str]) -> str:
    """['a', 'b', 'c'] -> 'a, b or c'."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"
