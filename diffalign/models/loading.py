"""Load a diffusion model (hub id or local diffusers folder) into the adapter of its backbone.

:func:`load_adapter` takes the backbone from the registry (:mod:`diffalign.models.backbones`): named, or detected
from the folder's subfolders (a hub repo's ``model_index.json``) by the registered rules, the most specific first
(a ``transformer`` means SD3, a ``text_encoder_2`` SDXL, anything else SD 1.x/2.x). The entry opens the pipeline as
a :class:`~diffalign.models.components.Source` (safetensors only, no remote code; a local folder never contacts the
hub) and its build function reads the components; :func:`adapter_from_config` passes it the ``model.*`` fields it
reads. ``load_sd_adapter`` / ``load_sdxl_adapter`` / ``load_sd3_adapter`` are the same path with the backbone fixed.

A folder that does not exist, lacks a component or its weights, or a hub repo that cannot be read raises
:class:`ModelNotFoundError` (a ``FileNotFoundError``) naming the folder / component and what to pass instead.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from diffusers import AutoencoderKL

from diffalign.models.backbones import (
    AUTO,
    BACKBONES,
    backbone_names,
    backbone_of_index,
    check_options,
    detect_backbone,
    get_backbone,
    resolve_backbone,
)
from diffalign.models.components import (
    ModelNotFoundError,
    Source,
    first_line,
    hub_failure,
    hub_has_vae,
    hub_model_index,
    resolve_pretrained,
)
from diffalign.models.diffusion import DiffusionAdapter
from diffalign.models.sd import load_sd_adapter
from diffalign.models.sd3 import load_sd3_adapter
from diffalign.models.sdxl import load_sdxl_adapter

# importable from here as before the registry: the loaders, detection, the component helpers
__all__ = [
    "BACKBONES",
    "ModelNotFoundError",
    "Source",
    "adapter_from_config",
    "backbone_of_index",
    "detect_backbone",
    "get_backbone",
    "load_adapter",
    "load_sd3_adapter",
    "load_sd_adapter",
    "load_sdxl_adapter",
    "resolve_pretrained",
]
# the hub helpers under the names they had here before components.py
_hub_model_index, _hub_has_vae = hub_model_index, hub_has_vae


def load_adapter(
    pretrained: str | os.PathLike,
    *,
    backbone: str = AUTO,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype | None = None,
    local_files_only: bool = False,
    **options: Any,
) -> DiffusionAdapter:
    """Load ``pretrained`` into the adapter of its backbone (``backbone="auto"`` detects it; see the module
    docstring). ``options`` are named as the ``model.*`` fields (``prediction_type``, ``sdxl_time_ids``, ``load_t5``,
    ``max_sequence_length``, ...) and go to the backbone's build function; one that only other backbones read is an
    error."""
    if backbone not in (AUTO, *backbone_names()):
        raise ValueError(f"backbone={backbone!r}: expected 'auto' or one of {backbone_names()}")
    entry = resolve_backbone(backbone, pretrained, revision=revision, local_files_only=local_files_only)
    return entry.load(
        pretrained,
        revision=revision,
        variant=variant,
        torch_dtype=torch_dtype,
        local_files_only=local_files_only,
        **check_options(entry, options, pretrained),
    )


def adapter_from_config(model: Any) -> DiffusionAdapter:
    """:func:`load_adapter` with the fields of a :class:`diffalign.config.ModelConfig`: the backbone's entry
    (``model.backbone``, or detected) says which fields its loader reads; ``model.vae`` replaces the VAE."""
    entry = resolve_backbone(
        model.backbone, model.pretrained, revision=model.revision, local_files_only=model.local_files_only
    )
    missing = [name for name in entry.options if not hasattr(model, name)]
    if missing:
        raise ValueError(f"backbone {entry.name!r} reads model.{missing[0]}, which the model config does not have")
    adapter = load_adapter(
        model.pretrained,
        backbone=entry.name,
        revision=model.revision,
        variant=model.variant,
        local_files_only=model.local_files_only,
        **{name: getattr(model, name) for name in entry.options},
    )
    if getattr(model, "vae", None):
        location, is_local = resolve_pretrained(model.vae)
        try:
            vae = AutoencoderKL.from_pretrained(location, local_files_only=model.local_files_only or is_local)
        except OSError as err:
            if not is_local:
                raise hub_failure(location, "the VAE (model.vae)", err) from err
            raise ModelNotFoundError(f"model.vae {location}: cannot load the AutoencoderKL: {first_line(err)}") from err
        adapter.vae = vae.eval().requires_grad_(False)
    lo, hi = getattr(model, "min_timestep_fraction", 0.0), getattr(model, "max_timestep_fraction", 1.0)
    adapter.timestep_range = (lo, hi)
    return adapter
