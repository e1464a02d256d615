"""Typed method configurations: each option's type, default, allowed values and one-line help, in one dataclass.

A method declares ``@dataclass(frozen=True) class XConfig(MethodConfig)`` whose fields are made with :func:`option`.
Everything that reads options reads that class: ``prunekit methods`` (the listing), ``--option KEY=VALUE`` (text is
parsed to the field's type), the Python API (values are checked the same way), and the checkpoint manifest
(``to_dict``). An unknown option, a value of the wrong type, outside its allowed set or range is a one-line
:class:`PrunekitError` naming the option and what it accepts. Cross-option rules go in ``check``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prunekit.errors import PrunekitError

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_NONE = ("none", "null", "")


def option(default: Any, help: str, *, choices: tuple | None = None, minimum: float | None = None,
           above: float | None = None, maximum: float | None = None, below: float | None = None,
           internal: bool = False) -> Any:
    """A config field: ``minimum`` / ``maximum`` are inclusive bounds, ``above`` / ``below`` exclusive ones.
    ``internal`` options work but are hidden from ``prunekit methods`` (tuning knobs of the machinery)."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "minimum": minimum, "above": above,
                "maximum": maximum, "below": below, "internal": internal}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class OptionSpec:
    """One option as ``prunekit methods`` shows it and as parsing checks it."""

    name: str
    kind: type
    optional: bool  # None is allowed (and means "not set": e.g. solve it)
    default: Any
    help: str
    choices: tuple | None
    minimum: float | None
    above: float | None
    maximum: float | None
    below: float | None
    internal: bool

    @property
    def type_name(self) -> str:
        name = {bool: "bool", int: "int", float: "float", str: "str"}[self.kind]
        return f"{name} or none" if self.optional else name

    def accepts(self) -> str:
        """What the option takes, in words."""
        if self.choices:
            text = "one of " + ", ".join(str(choice) for choice in self.choices)
        elif self.kind is bool:
            text = "true or false"
        else:
            text = ("an integer" if self.kind is int else "a number" if self.kind is float else "text") + self._range()
        return text + (", or none" if self.optional else "")

    def _range(self) -> str:
        low = (f"[{self.minimum:g}" if self.minimum is not None else f"({self.above:g}" if self.above is not None
               else None)
        high = (f"{self.maximum:g}]" if self.maximum is not None else f"{self.below:g})" if self.below is not None
                else None)
        if low and high:
            return f" in {low}, {high}"
        if low:
            return f" {'>=' if low[0] == '[' else '>'} {low[1:]}"
        if high:
            return f" {'<=' if high[-1] == ']' else '<'} {high[:-1]}"
        return ""

    def parse(self, method: str, value: Any) -> Any:
        """``value`` (text from the command line, or a Python value) as this option's type, checked."""
        if self.optional and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
            return None
        try:
            parsed = _convert(self.kind, value)
        except (TypeError, ValueError):
            parsed = None
        if parsed is None or not self._allowed(parsed):
            raise PrunekitError(f"option {self.name}={value!r} of '{method}' is not valid: {self.name} takes "
                                f"{self.accepts()}")
        return parsed

    def _allowed(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if isinstance(value, float) and not math.isfinite(value):
            return False
        checks = ((self.minimum, lambda bound: value >= bound), (self.above, lambda bound: value > bound),
                  (self.maximum, lambda bound: value <= bound), (self.below, lambda bound: value < bound))
        return all(bound is None or holds(bound) for bound, holds in checks)


def _convert(kind: type, value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if kind is bool:
            lowered = text.lower()
            return True if lowered in _TRUE else False if lowered in _FALSE else None
        return kind(text) if kind in (int, float) else text
    if kind is bool:
        return value if isinstance(value, bool) else None
    if kind is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if kind is float:
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config (see the module docstring)."""

    @classmethod
    def options(cls) -> list[OptionSpec]:
        hints = typing.get_type_hints(cls)
        specs = []
        for field in dataclasses.fields(cls):
            kind, optional = _unwrap(hints[field.name], cls.__name__, field.name)
            meta = field.metadata
            if "help" not in meta:
                raise TypeError(f"{cls.__name__}.{field.name} must be declared with option(...)")
            specs.append(OptionSpec(field.name, kind, optional, field.default, meta["help"], meta["choices"],
                                    meta["minimum"], meta["above"], meta["maximum"], meta["below"],
                                    meta["internal"]))
        return specs

    @classmethod
    def from_options(cls, method: str, options: Mapping[str, Any] | None = None) -> MethodConfig:
        """The config with ``options`` (text or values) over the defaults; one-line errors for bad input."""
        specs = {spec.name: spec for spec in cls.options()}
        options = dict(options or {})
        unknown = sorted(set(options) - set(specs))
        if unknown:
            known = ", ".join(sorted(name for name, spec in specs.items() if not spec.internal)) or "none"
            raise PrunekitError(f"method '{method}' has no option '{unknown[0]}'; its options: {known}")
        config = cls(**{name: specs[name].parse(method, value) for name, value in options.items()})
        config.check(method)
        return config

    def check(self, method: str) -> None:
        """Rules between options; raise :class:`PrunekitError` naming them. Override where needed."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _unwrap(hint: Any, owner: str, name: str) -> tuple[type, bool]:
    """(base type, None allowed) of a field annotation: bool, int, float, str, or one of them ``| None``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        members = [member for member in typing.get_args(hint) if member is not type(None)]
        if len(members) == 1 and len(typing.get_args(hint)) == 2:
            return _unwrap(members[0], owner, name)[0], True
    if hint in (bool, int, float, str):
        return hint, False
    raise TypeError(f"{owner}.{name}: option types are bool, int, float, str or one of them | None, not {hint}")
