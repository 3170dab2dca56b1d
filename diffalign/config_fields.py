"""The pieces a config section is made of: :func:`setting` (a dataclass field with its limits and allowed values as
metadata), :class:`Checker` (the one-line errors naming the file and dotted key) and :func:`check_section` (every
field's declared limits and choices, checked in one walk).

A section is a plain dataclass, defined next to the code it configures; its checks are declared on the fields::

    @dataclass
    class SOARConfig:
        num_aux_points: int = setting(6, ge=1)
        sde_type: Literal["simple", "sde", "flow_sde", "cps"] = "flow_sde"
        advantage: str = setting("group", choices="diffalign.losses.advantages:ADVANTAGE_METHODS")

``Literal`` annotations are the allowed values; ``choices="module:NAME"`` takes them from the registry that owns
them (resolved when a config is validated, so reading a config file never imports the model code); a bound's message
says ``'soar.num_aux_points' must be >= 1, got 0``. Only this module and the standard library are imported here.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from diffalign.errors import DiffalignError

LIMIT = "diffalign.limit"
CHOICES = "diffalign.choices"


class ConfigError(DiffalignError, ValueError):
    """An invalid config file or override; the message names the source, the dotted key and what to do."""


@dataclasses.dataclass(frozen=True)
class Limit:
    """Bounds of a number (``ge``/``gt`` below, ``le``/``lt`` above) and a note that explains them."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    note: str = ""

    def holds(self, value: float) -> bool:
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )

    def requirement(self, optional: bool) -> str:
        """``>= 1``, ``in [0, 1)``, ``> 0 (the paper uses 1.5)``, ``>= 1 or null``."""
        low = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        high = (self.le, "]") if self.le is not None else (self.lt, ")") if self.lt is not None else None
        if low and high:
            text = f"in {low[0]}{_num(low[1])}, {_num(high[0])}{high[1]}"
        elif low:
            text = f"{'>=' if low[0] == '[' else '>'} {_num(low[1])}"
        else:
            assert high is not None
            text = f"{'<=' if high[1] == ']' else '<'} {_num(high[0])}"
        if optional:
            text += " or null"
        return f"{text} ({self.note})" if self.note else text


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def setting(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Any = dataclasses.MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    note: str = "",
    choices: Sequence[str] | str | None = None,
) -> Any:
    """A dataclass field whose value :func:`check_section` checks: the bounds (``note`` explains them in the error)
    and ``choices`` (a sequence, or ``"module:NAME"`` naming the registry that owns the valid values)."""
    metadata: dict[str, Any] = {}
    if any(b is not None for b in (ge, gt, le, lt)):
        metadata[LIMIT] = Limit(ge, gt, le, lt, note)
    if choices is not None:
        metadata[CHOICES] = choices if isinstance(choices, str) else tuple(choices)
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def owned_names(spec: str) -> tuple[str, ...] | None:
    """The names ``"module:NAME"`` (a registry dict or a tuple) defines, or None when the module is not importable.

    Allowed values that a module implements (``online.advantage``, ``online.policy_loss``, samplers) come from that
    module, so a newly registered one is valid without a second list.
    """
    module, _, name = spec.partition(":")
    try:
        return tuple(getattr(importlib.import_module(module), name))
    except ImportError:
        return None


class Checker:
    """Reads dotted keys of a config and raises :class:`ConfigError` naming where each key was set."""

    def __init__(self, config: Any, origins: Mapping[str, str], source: str) -> None:
        self.config, self.origins, self.source = config, origins, source

    def value(self, key: str) -> Any:
        obj: Any = self.config
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj

    def fail(self, key: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"{self.origins.get(key, self.source)}: {message}")

    def one_of(self, key: str, allowed: Sequence[str], *, optional: bool = False) -> None:
        value = self.value(key)
        if (value is None and optional) or value in allowed:
            return
        close = difflib.get_close_matches(str(value), list(allowed), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        listed = ", ".join(f"'{a}'" for a in allowed) + (" or null" if optional else "")
        self.fail(key, f"'{key}' must be one of {listed}; got {value!r}{hint}")

    def check(self, key: str, ok: bool, requirement: str) -> None:
        if not ok:
            self.fail(key, f"'{key}' must be {requirement}, got {self.value(key)!r}")

    def changed(self, key: str, default: Any) -> bool:
        """Whether ``key`` was set and differs from ``default`` (a saved config repeats the defaults)."""
        return key in self.origins and self.value(key) != default


def literal_values(tp: Any) -> tuple[Any, ...] | None:
    """The values of a ``Literal[...]`` annotation (also inside ``X | None``), else None."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if typing.get_origin(arg) is Literal:
                return typing.get_args(arg)
    return None


def _optional(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def check_section(c: Checker, prefix: str, section: Any, fields: Sequence[str] | None = None) -> None:
    """Check every field of the dataclass ``section`` (at dotted ``prefix``; only ``fields`` when given) against its
    ``Literal`` annotation, its ``choices`` and its ``Limit``, in field order."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        if fields is not None and f.name not in fields:
            continue
        key, value, tp = f"{prefix}.{f.name}", getattr(section, f.name), hints[f.name]
        allowed = literal_values(tp)
        spec = f.metadata.get(CHOICES)
        if spec is not None:
            allowed = owned_names(spec) if isinstance(spec, str) else spec
        if allowed is not None:
            c.one_of(key, allowed, optional=_optional(tp))
        limit = f.metadata.get(LIMIT)
        if limit is not None and value is not None and not limit.holds(value):
            c.check(key, False, limit.requirement(_optional(tp)))


__all__ = ["Checker", "ConfigError", "Limit", "check_section", "literal_values", "owned_names", "setting"]
