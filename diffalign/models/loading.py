"""Load an SD 1.x/2.x model (hub id or local diffusers folder) into an :class:`SDAdapter`.

Each component is loaded on its own with ``X.from_pretrained(pretrained, subfolder=...)``, as diffusers' training
scripts do; the scheduler is always a ``DDPMScheduler`` built from the pipeline's scheduler config. Loading is safe:
safetensors only, no remote code. A local folder never contacts the hub.

VAE or pixel space: a local folder has a VAE iff it has a ``vae/`` subfolder (if its ``model_index.json`` names a
VAE but the folder is missing, that is an error). For a hub id, ``model_index.json`` decides: ``"vae": null`` or
``[null, null]`` means pixel space, anything else loads ``vae/``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from diffalign.models.diffusion import SDAdapter

_REQUIRED_SUBFOLDERS = ("unet", "scheduler", "text_encoder", "tokenizer")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _vae_is_null(model_index: dict[str, Any]) -> bool:
    entry = model_index.get("vae")
    return entry is None or (isinstance(entry, list) and all(item is None for item in entry))


def _local_has_vae(folder: Path) -> bool:
    missing = [name for name in _REQUIRED_SUBFOLDERS if not (folder / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not an SD model folder: missing subfolder(s) {missing}; expected the diffusers layout "
            f"{list(_REQUIRED_SUBFOLDERS)} (+ optional vae/), e.g. written by StableDiffusionPipeline.save_pretrained"
        )
    if (folder / "vae").is_dir():
        return True
    index_path = folder / "model_index.json"
    if index_path.is_file() and not _vae_is_null(json.loads(index_path.read_text())):
        raise FileNotFoundError(
            f"{index_path} names a VAE but {folder / 'vae'} is missing; restore the vae/ folder, or set "
            f'"vae": [null, null] in model_index.json for a pixel-space model'
        )
    return False


def _hub_has_vae(repo_id: str, revision: str | None, local_files_only: bool) -> bool:
    from huggingface_hub import hf_hub_download

    index_path = hf_hub_download(repo_id, "model_index.json", revision=revision, local_files_only=local_files_only)
    return not _vae_is_null(json.loads(Path(index_path).read_text()))


def resolve_pretrained(pretrained: str | os.PathLike) -> tuple[str, bool]:
    """Return ``(location, is_local)``; a path-like string that does not exist raises ``FileNotFoundError``."""
    text = os.fspath(pretrained)
    expanded = os.path.expanduser(text)
    if os.path.isdir(expanded):
        return expanded, True
    if os.path.exists(expanded):
        raise NotADirectoryError(f"{expanded} is a file; expected a diffusers model folder or a hub id")
    if os.path.isabs(expanded) or text.startswith((".", "~")) or text.count("/") > 1 or not _HUB_ID.match(text):
        raise FileNotFoundError(
            f"model folder {expanded} does not exist; pass an existing diffusers folder (unet/, scheduler/, "
            f"text_encoder/, tokenizer/, optional vae/) or a hub id such as 'owner/name'"
        )
    return text, False


def load_sd_adapter(
    pretrained: str | os.PathLike,
    *,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype | None = None,
    local_files_only: bool = False,
    prediction_type: str | None = None,
) -> SDAdapter:
    """Load UNet, DDPM scheduler, CLIP text encoder and tokenizer (and the VAE if there is one) into an SDAdapter.

    ``torch_dtype`` applies to every model component (``None`` keeps the stored dtype); ``variant`` selects e.g.
    ``diffusion_pytorch_model.fp16.safetensors``; ``prediction_type`` overrides the scheduler config's.
    """
    location, is_local = resolve_pretrained(pretrained)
    common: dict[str, Any] = {"revision": revision, "local_files_only": local_files_only or is_local}
    weights: dict[str, Any] = {**common, "variant": variant, "use_safetensors": True}
    diffusers_dtype = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    transformers_dtype = {} if torch_dtype is None else {"dtype": torch_dtype}

    has_vae = _local_has_vae(Path(location)) if is_local else _hub_has_vae(location, revision, local_files_only)
    unet = UNet2DConditionModel.from_pretrained(location, subfolder="unet", **weights, **diffusers_dtype)
    scheduler = DDPMScheduler.from_pretrained(location, subfolder="scheduler", **common)
    text_encoder = CLIPTextModel.from_pretrained(location, subfolder="text_encoder", **weights, **transformers_dtype)
    tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer", **common)
    vae = None
    if has_vae:
        vae = AutoencoderKL.from_pretrained(location, subfolder="vae", **weights, **diffusers_dtype)
    for module in (unet, text_encoder, vae):
        if module is not None:
            module.eval()
    return SDAdapter(
        unet,
        scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        prediction_type=prediction_type,
    )
