"""Training methods by name: what ``train.method`` can be, which trainer runs it and which config sections it reads.

Each module of this package registers its methods with :func:`register_method` and defines the config sections they
own (dataclasses whose fields carry their limits, :mod:`diffalign.config_fields`); :mod:`diffalign.config` builds the
``Config`` schema from them and ``diffalign.trainers.run`` starts the registered trainer. A new method is a module
here (its section, its checks, its registration), its trainer, and its tests. The modules here import no model
code, so reading a config stays fast; the trainer is imported only when the run starts.

Causal-LM and diffusion methods may share a name (``grpo``): the key is ``(family, name)``, the family coming from
``model.backbone`` (``causal_lm`` is the LLM family).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from diffalign.config_fields import Checker

Family = Literal["diffusion", "llm"]
FAMILIES: tuple[Family, ...] = ("diffusion", "llm")


@dataclass(frozen=True)
class Method:
    """One ``train.method`` value of a family.

    ``trainer`` is ``"module:attr"``: a trainer class or a factory ``config -> trainer`` (run as
    ``attr(config).train()``), or a function ``config -> TrainResult`` that runs the whole method (SAIL's rounds).
    ``sections`` maps each config section the method reads, besides the common ones (model, data, lora, optim, train
    and, when ``default_loss`` is set, loss), to the settings classes of that section it reads: a section several
    methods read (``online``) is the union of their classes. ``default_loss`` is
    ``loss.name`` when left out (None: the method takes its objective from its own section and takes no ``loss``
    keys); ``losses(registry)`` the loss names it can train (None: only ``default_loss``). ``uses_reference``: whether
    ``train.reference`` means anything to it. ``validate(checker)`` checks what the field limits cannot express
    (relations between keys). ``defaults`` maps dotted keys of a shared section to this method's own default, used
    when the config leaves the key out (DiffusionNFT samples with the ODE sampler and no CFG, Flow-GRPO with the
    SDE sampler and CFG 4.5: one key, one meaning, a default per method)."""

    name: str
    family: Family
    trainer: str
    sections: Mapping[str, tuple[type, ...]] = field(default_factory=dict)
    default_loss: str | None = None
    losses: Callable[[Mapping[str, Any]], tuple[str, ...]] | None = None
    uses_reference: bool = True
    validate: Callable[[Checker], None] | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def reads(self, section: str) -> bool:
        """Whether a run of this method reads config section ``section``."""
        common = ("model", "data", "lora", "optim", "train") + (("loss",) if self.default_loss else ())
        return section in common or section in self.sections

    def trainer_object(self) -> Any:
        """The imported trainer class, factory or run function that ``trainer`` names."""
        module, _, attr = self.trainer.partition(":")
        return getattr(importlib.import_module(module), attr)

    def run(self, config: Any) -> Any:
        """Import the trainer and train with ``config``; returns its ``TrainResult``."""
        made = self.trainer_object()(config)
        return made.train() if callable(getattr(made, "train", None)) else made


_METHODS: dict[tuple[Family, str], Method] = {}
_discovered = False


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry; a second method with the same family and name is an error."""
    if method.family not in FAMILIES:
        raise ValueError(f"method {method.name!r}: family must be one of {FAMILIES}, got {method.family!r}")
    key = (method.family, method.name)
    if key in _METHODS and _METHODS[key] != method:
        raise ValueError(f"{method.family} method {method.name!r} is registered twice")
    _METHODS[key] = method
    return method


def _discover() -> None:
    """Import every module of this package once (each registers its methods)."""
    global _discovered
    if not _discovered:
        _discovered = True
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
            importlib.import_module(f"{__name__}.{info.name}")


def methods() -> tuple[Method, ...]:
    """Every registered method, diffusion first, in registration order."""
    _discover()
    return tuple(sorted(_METHODS.values(), key=lambda m: FAMILIES.index(m.family)))


def method_names(family: Family | None = None) -> tuple[str, ...]:
    """The ``train.method`` values of ``family`` (all families: each name once)."""
    return tuple(dict.fromkeys(m.name for m in methods() if family in (None, m.family)))


def get_method(name: str, family: Family) -> Method | None:
    """The method ``name`` of ``family``, or None."""
    _discover()
    return _METHODS.get((family, name))


def section_classes() -> dict[str, type]:
    """Config section name -> its dataclass: for a section several methods read, one dataclass with every field of
    their settings classes (the first registered class's fields first)."""
    parts: dict[str, list[type]] = {}
    readers: dict[str, list[str]] = {}
    for method in methods():
        for section, classes in method.sections.items():
            known = parts.setdefault(section, [])
            known.extend(cls for cls in classes if cls not in known)
            readers.setdefault(section, []).append(f"{method.name} ({method.family})")
    out: dict[str, type] = {}
    for section, classes in parts.items():
        # a class another one extends brings no field of its own (and would break the method resolution order)
        classes = [cls for cls in classes if not any(o is not cls and issubclass(o, cls) for o in classes)]
        if len(classes) == 1:
            out[section] = classes[0]
            continue
        name = f"{section.title().replace('_', '')}Config"
        cls = dataclasses.make_dataclass(name, [], bases=tuple(reversed(classes)))
        cls.__module__ = __name__
        cls.__doc__ = (
            f"Read by train.method {', '.join(readers[section])}: each method reads the keys of its own settings "
            "classes, grouped below (a key two methods share means the same to both)."
        )
        out[section] = cls
    return out


def section_fields(method: Method, section: str) -> tuple[str, ...] | None:
    """The fields of ``section`` that ``method`` reads (None: the whole section)."""
    classes = method.sections.get(section)
    if not classes:
        return None
    return tuple(dict.fromkeys(f.name for cls in classes for f in dataclasses.fields(cls)))


__all__ = [
    "FAMILIES",
    "Method",
    "get_method",
    "method_names",
    "methods",
    "register_method",
    "section_classes",
    "section_fields",
]
