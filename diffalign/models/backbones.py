"""The diffusion backbones by name: what each needs in a pipeline folder, how it is recognised and loaded, and the
defaults the trainers take from it.

A :class:`Backbone` entry holds everything about a family that is not in its adapter class: the subfolders a local
folder must have, a detection rule on the pipeline's components (with a priority, so the most specific rule wins:
SD3's ``transformer`` before SDXL's ``text_encoder_2`` before SD, which takes any pipeline), its build function, the
``model.*`` fields it reads and the build keyword each becomes, its default LoRA targets and the ``model.*`` fields
that shape the latent / text-embedding cache. :func:`~diffalign.models.loading.load_adapter`,
:func:`~diffalign.models.loading.adapter_from_config` and the trainers only go through the registry.

:meth:`Backbone.load` opens the pipeline as a :class:`~diffalign.models.components.Source` of the entry (its name and
required subfolders, the common ``from_pretrained`` keywords) and hands it to ``build(src, **options)``, which reads
the components and returns the adapter; :func:`backbone_loader` makes a backbone's public ``load_<name>_adapter``.

Each built-in backbone registers itself in its own module, listed once in :data:`BUILTIN_MODULES`; more come from
:func:`register_backbone` in code or from a plugin's ``register()`` (:mod:`diffalign.plugins`), loaded the first time
a name is not found, the names are listed, or a pipeline's backbone is detected.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from diffalign.errors import DiffalignError
from diffalign.models.components import Source, hub_model_index, present, resolve_pretrained
from diffalign.models.diffusion import DiffusionAdapter
from diffalign.models.lora import DEFAULT_TARGET_MODULES
from diffalign.plugins import check_name, load_plugins

#: The modules that register the built-in backbones when imported: the one place a new built-in is listed.
BUILTIN_MODULES = (
    "diffalign.models.sd",
    "diffalign.models.sdxl",
    "diffalign.models.sd3",
    "diffalign.models.flux",
    "diffalign.models.qwen_image",
    "diffalign.models.z_image",
)

#: ``model.backbone`` value that detects the backbone from the pipeline's components.
AUTO = "auto"

#: The ``cache_options`` of the built-in backbones: the cache fingerprint has held these fields for every backbone
#: since before the registry, so keeping them keeps the caches written then valid.
BUILTIN_CACHE_OPTIONS = ("load_t5", "max_sequence_length")

_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


class UnknownBackboneError(DiffalignError, ValueError):
    """A ``model.backbone`` name that is not registered (the message names the closest one and all valid ones)."""


def _any_pipeline(components: Mapping[str, Any]) -> bool:
    return True


def build_parameters(build: Callable[..., DiffusionAdapter]) -> list[inspect.Parameter]:
    """The named parameters of a build function after its source: the options it takes, as keyword-only ones."""
    parameters = list(inspect.signature(build).parameters.values())[1:]
    return [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in parameters if p.kind not in _VARIADIC]


def returned_class(build: Callable[..., Any]) -> Any:
    """What the return annotation of ``build`` names (``None`` where it has none, or it does not resolve)."""
    try:
        return typing.get_type_hints(build).get("return")
    except Exception:  # noqa: BLE001 - any annotation that does not evaluate (NameError, TypeError, ...)
        return None


@dataclass(frozen=True)
class Backbone:
    """One diffusion backbone family.

    Attributes:
        name: the ``model.backbone`` value (also the label in its error messages, upper-cased).
        build: ``build(src, **options)`` → the adapter, from the components of ``src``, a
            :class:`~diffalign.models.components.Source` of this entry (see :meth:`load`). Its signature declares
            the rest by default: the keywords after ``src`` are the options, the return annotation the adapter class.
        required: the subfolders a local pipeline folder must have.
        adapter_class: the :class:`~diffalign.models.diffusion.DiffusionAdapter` subclass ``build`` returns; by
            default the class its return annotation names.
        detect: the detection rule: a component name (the pipeline has it), or a callable on a mapping component
            name → its class name (``"FluxTransformer2DModel"``; ``True`` where no class name is recorded) for the
            components the pipeline has; the default takes any pipeline.
        priority: rules are tried from the highest priority down; the first that accepts the pipeline wins.
        options: ``model.<field>`` name → the build keyword it is passed as (the fields this backbone reads); by
            default every keyword of ``build`` after the source, read from the ``model.*`` field of its own name.
        lora_targets: the LoRA target modules when ``lora.target_modules`` is null.
        cache_options: the ``model.<field>`` names that shape the cached encoder outputs (after ``model.backbone``
            in the cache fingerprint).
    """

    name: str
    build: Callable[..., DiffusionAdapter]
    required: tuple[str, ...]
    adapter_class: type[DiffusionAdapter] | None = None
    detect: Callable[[Mapping[str, Any]], bool] | str = _any_pipeline
    priority: int = 0
    options: Mapping[str, str] | None = None
    lora_targets: tuple[str, ...] = DEFAULT_TARGET_MODULES
    cache_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_name("backbone", self.name)
        if self.name == AUTO:
            raise ValueError(f"backbone name {AUTO!r} is reserved for detection; pick another name")
        if self.adapter_class is None:
            object.__setattr__(self, "adapter_class", returned_class(self.build))
        if not (isinstance(self.adapter_class, type) and issubclass(self.adapter_class, DiffusionAdapter)):
            raise TypeError(f"backbone {self.name!r}: adapter_class must be a DiffusionAdapter subclass")
        if not callable(self.build) or not (callable(self.detect) or isinstance(self.detect, str)):
            raise TypeError(f"backbone {self.name!r}: build and detect must be callable (or detect a component name)")
        for attribute in ("required", "lora_targets", "cache_options"):
            object.__setattr__(self, attribute, tuple(getattr(self, attribute)))
        options = {p.name: p.name for p in build_parameters(self.build)} if self.options is None else self.options
        object.__setattr__(self, "options", MappingProxyType(dict(options)))

    def accepts(self, components: Mapping[str, Any]) -> bool:
        """Whether the detection rule takes a pipeline with these components (name → present)."""
        if isinstance(self.detect, str):
            return bool(components.get(self.detect))
        return self.detect(components)

    def load(
        self,
        pretrained: str | os.PathLike,
        *,
        revision: str | None = None,
        variant: str | None = None,
        torch_dtype: torch.dtype | None = None,
        local_files_only: bool = False,
        **options: Any,
    ) -> DiffusionAdapter:
        """``build`` on ``pretrained`` (a diffusers folder or hub id) read as this backbone; ``options`` are build
        keywords. ``torch_dtype`` applies to every model component (``None`` keeps the stored dtype); ``variant``
        selects e.g. ``diffusion_pytorch_model.fp16.safetensors``; a local folder never contacts the hub."""
        src = Source(
            pretrained,
            self.name,
            self.required,
            revision=revision,
            variant=variant,
            torch_dtype=torch_dtype,
            local_files_only=local_files_only,
        )
        return self.build(src, **options)

    @property
    def denoiser_subfolder(self) -> str:
        """The denoiser's subfolder in a pipeline folder (``unet``, ``transformer``), from the adapter class."""
        return self.adapter_class.denoiser_subfolder

    def cache_fingerprint(self, model: Any) -> str:
        """The part of the latent / text-embedding cache key that ``model`` (a ``ModelConfig``) sets:
        ``model.backbone`` and the :attr:`cache_options` fields, joined by ``:``."""
        return ":".join([str(model.backbone), *(str(getattr(model, name)) for name in self.cache_options)])


#: Registered backbones by name.
BACKBONES: dict[str, Backbone] = {}


def register_backbone(backbone: Backbone, *, replace: bool = False) -> Backbone:
    """Add ``backbone`` to the registry and return it. Registering an equal entry again is a no-op; a different one
    under a taken name needs ``replace=True``."""
    taken = BACKBONES.get(backbone.name)
    if taken is not None and taken != backbone and not replace:
        raise ValueError(f"backbone {backbone.name!r} is already registered ({taken!r}); pass replace=True to override")
    BACKBONES[backbone.name] = backbone
    return backbone


def _by_priority() -> list[Backbone]:
    """Registered backbones from the highest priority down (ties: the first registered first)."""
    return sorted(BACKBONES.values(), key=lambda b: -b.priority)


def backbone_names() -> tuple[str, ...]:
    """Every registered backbone name, plugins' included, from the least specific (lowest priority) up."""
    load_plugins()
    return tuple(b.name for b in sorted(BACKBONES.values(), key=lambda b: b.priority))


def __getattr__(name: str) -> Any:
    """``BACKBONE_NAMES``: :func:`backbone_names` at the moment it is read."""
    if name == "BACKBONE_NAMES":
        return backbone_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_backbone(name: str) -> Backbone:
    """The backbone registered as ``name``; an unknown name raises :class:`UnknownBackboneError` naming the closest."""
    if name not in BACKBONES:
        load_plugins()
    if name in BACKBONES:
        return BACKBONES[name]
    valid = backbone_names()
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownBackboneError(
        f"unknown backbone {name!r} (check model.backbone in your config).{hint} Valid names: {AUTO} (detect it), "
        f"{', '.join(valid)}."
    )


def backbone_of_components(components: Mapping[str, Any]) -> Backbone:
    """The backbone of a pipeline with these components (name → present): the highest-priority rule that accepts."""
    load_plugins()
    for backbone in _by_priority():
        if backbone.accepts(components):
            return backbone
    raise ValueError(
        f"no registered backbone recognises a pipeline with components {sorted(k for k, v in components.items() if v)}"
        "; set model.backbone to one of " + ", ".join(backbone_names())
    )


def _index_components(model_index: Mapping[str, Any]) -> dict[str, Any]:
    """Component name → its class name (``model_index.json``'s ``[library, class]``), or whether it is present."""
    out: dict[str, Any] = {}
    for name, entry in model_index.items():
        if name.startswith("_"):
            continue
        is_pair = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str)
        out[name] = entry[1] if is_pair else present(entry)
    return out


def _folder_components(folder: Path) -> dict[str, Any]:
    """Component name → class name of a local pipeline folder: each subfolder's ``config.json`` ``_class_name``,
    else the folder's ``model_index.json`` entry, else just present (``True``)."""
    index_path = folder / "model_index.json"
    index = _index_components(json.loads(index_path.read_text())) if index_path.is_file() else {}
    out: dict[str, Any] = {}
    for entry in folder.iterdir():
        if not entry.is_dir():
            continue
        config = entry / "config.json"
        name = json.loads(config.read_text()).get("_class_name") if config.is_file() else None
        out[entry.name] = name or index.get(entry.name) or True
    return out


def backbone_of_index(model_index: Mapping[str, Any]) -> str:
    """The backbone name of a pipeline's ``model_index.json`` (a ``null`` / ``[null, null]`` entry is absent)."""
    return backbone_of_components(_index_components(model_index)).name


def detect_backbone(
    pretrained: str | os.PathLike, *, revision: str | None = None, local_files_only: bool = False
) -> str:
    """The backbone name of a diffusers folder (from its subfolders) or hub repo (from its ``model_index.json``)."""
    location, is_local = resolve_pretrained(pretrained)
    if not is_local:
        return backbone_of_index(hub_model_index(location, revision, local_files_only))
    return backbone_of_components(_folder_components(Path(location))).name


def resolve_backbone(
    name: str, pretrained: str | os.PathLike, *, revision: str | None = None, local_files_only: bool = False
) -> Backbone:
    """The entry of ``name``, or of ``pretrained``'s detected backbone for ``name="auto"``."""
    if name == AUTO:
        name = detect_backbone(pretrained, revision=revision, local_files_only=local_files_only)
    return get_backbone(name)


def backbone_for(adapter: DiffusionAdapter | type[DiffusionAdapter]) -> Backbone:
    """The entry whose adapter class is ``adapter``'s own, or its nearest registered base class."""
    cls = adapter if isinstance(adapter, type) else type(adapter)
    by_class = {b.adapter_class: b for b in BACKBONES.values()}
    for base in cls.__mro__:
        if base in by_class:
            return by_class[base]
    raise ValueError(f"{cls.__name__} is not the adapter of a registered backbone; register it with register_backbone")


def backbone_loader(backbone: Backbone) -> Callable[..., DiffusionAdapter]:
    """The public ``load_<name>_adapter`` of ``backbone``: :meth:`Backbone.load` with the common keywords and the
    build function's own in its signature (a wrong keyword is a TypeError before any file is read) and the build
    function's docstring."""
    common = list(inspect.signature(Backbone.load).parameters.values())[1:-1]  # pretrained .. local_files_only
    signature = inspect.signature(backbone.build).replace(parameters=[*common, *build_parameters(backbone.build)])

    def load(*args: Any, **kwargs: Any) -> DiffusionAdapter:
        bound = signature.bind(*args, **kwargs)
        return backbone.load(*bound.args, **bound.kwargs)

    load.__name__ = load.__qualname__ = f"load_{backbone.name}_adapter"
    load.__module__, load.__doc__ = backbone.build.__module__, backbone.build.__doc__
    load.__signature__ = signature  # type: ignore[attr-defined]
    return load


def check_options(backbone: Backbone, options: Mapping[str, Any], pretrained: str | os.PathLike) -> dict[str, Any]:
    """``options`` (``model.<field>`` names) as ``backbone``'s build keywords. An option another backbone reads is
    a ValueError naming the backbones it applies to; one no backbone reads, a TypeError listing the known ones."""
    foreign = sorted(set(options) - set(backbone.options))
    if foreign:
        owners = [name.upper() for name in backbone_names() if set(foreign) & set(BACKBONES[name].options)]
        if not owners:
            known = sorted({name for b in BACKBONES.values() for name in b.options})
            raise TypeError(f"unknown backbone option(s) {foreign}; the registered backbones read {known}")
        raise ValueError(
            f"{foreign} apply only to {' / '.join(owners)} models; {pretrained} is {backbone.name.upper()}"
        )
    return {backbone.options[name]: value for name, value in options.items()}


for _module in BUILTIN_MODULES:
    importlib.import_module(_module)
