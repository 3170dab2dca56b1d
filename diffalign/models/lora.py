"""peft LoRA on a diffusers denoiser (UNet or SD3 transformer): attach, save in the diffusers LoRA format, load back.

Mirrors diffusers' ``train_diffusion_dpo.py``: ``LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
target_modules=["to_k", "to_q", "to_v", "to_out.0"])`` attached with ``unet.add_adapter``, base weights frozen,
LoRA parameters kept in float32 whatever the base dtype. Since LoRA's B matrices start at zero, the adapted UNet
equals the base at step 0, so the reference (adapters disabled) equals the policy exactly there.

The saved ``pytorch_lora_weights.safetensors`` loads with
``<Pipeline>.from_pretrained(base).load_lora_weights(output_dir)`` for the pipeline class given to :func:`save_lora`
(``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` — keys prefixed ``unet.`` — or
``StableDiffusion3Pipeline`` — keys prefixed ``transformer.``); the peft config (rank, alpha, targets) is stored in
the file's metadata, so an alpha different from the rank survives the round trip. For SD3, target the
joint-attention projections too: ``to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out``
(diffusers' ``train_dreambooth_lora_sd3.py``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from diffalign.models.diffusion import unwrap

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DEFAULT_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")


def add_lora(
    unet: torch.nn.Module,
    *,
    rank: int,
    alpha: float | None = None,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    init: str | bool = "gaussian",
    dropout: float = 0.0,
    adapter_name: str = "default",
    exclude_modules: Sequence[str] = (),
) -> list[torch.nn.Parameter]:
    """Freeze ``unet`` and attach a LoRA adapter (scale alpha/rank; ``alpha=None`` means alpha = rank).

    ``exclude_modules``: full module names the target names match but that get no adapter (peft's
    ``exclude_modules``): the backbone's modules whose outputs never reach the prediction.

    ``init`` is peft's ``init_lora_weights`` ("gaussian" as diffusers' scripts, True for peft's Kaiming default).
    Returns the trainable LoRA parameters (float32), ready for an optimizer.
    """
    if rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
    bare = unwrap(unet)
    bare.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        init_lora_weights=init,
        target_modules=list(target_modules),
        exclude_modules=list(exclude_modules) or None,
        lora_dropout=dropout,
    )
    bare.add_adapter(config, adapter_name=adapter_name)
    params = [p for name, p in bare.named_parameters() if "lora_" in name and f".{adapter_name}." in name]
    if not params:
        raise RuntimeError(f"no LoRA parameters were created; target_modules {list(target_modules)} matched nothing")
    for param in params:
        param.data = param.data.float()
        param.requires_grad_(True)
    return params


def save_lora(
    unet: torch.nn.Module,
    output_dir: str | os.PathLike,
    *,
    adapter_name: str = "default",
    pipeline_cls: type = StableDiffusionPipeline,
    component: str = "unet",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``output_dir/pytorch_lora_weights.safetensors`` in diffusers' LoRA format; returns the file path.

    ``pipeline_cls.save_lora_weights`` writes it, with the layers passed as ``{component}_lora_layers``
    (``"unet"`` for SD/SDXL, ``"transformer"`` for SD3). ``state_dict``: the adapter weights to write instead of the
    module's own (an FSDP2-sharded module's, gathered by :func:`diffalign.trainers.sharding.gather_full_state_dict`).
    """
    bare = unwrap(unet)
    if adapter_name not in getattr(bare, "peft_config", {}):
        raise ValueError(f"the {component} has no LoRA adapter named {adapter_name!r}; call add_lora first")
    layers = get_peft_model_state_dict(bare, state_dict=state_dict, adapter_name=adapter_name)
    if component == "unet":  # diffusers' UNet scripts convert to its own key format; the SD3 script saves peft keys
        layers = convert_state_dict_to_diffusers(layers)
    pipeline_cls.save_lora_weights(
        os.fspath(output_dir),
        weight_name=LORA_WEIGHT_NAME,
        **{
            f"{component}_lora_layers": layers,
            f"{component}_lora_adapter_metadata": bare.peft_config[adapter_name].to_dict(),
        },
    )
    return Path(output_dir) / LORA_WEIGHT_NAME


def lora_state_dict(path: str | os.PathLike, component: str = "unet") -> dict[str, torch.Tensor]:
    """The denoiser LoRA weights of a file written by :func:`save_lora` (or its folder), in peft key format.

    Keys look like ``down_blocks.1.attentions.0....to_q.lora_A.weight`` (no ``unet.`` / ``transformer.`` prefix, no
    adapter name).
    """
    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected a {LORA_WEIGHT_NAME} written by save_lora")
    state = load_file(path)
    prefix = f"{component}."
    unet_state = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
    if not unet_state:
        raise ValueError(f"{path} holds no '{prefix}' LoRA weights; found keys like {sorted(state)[:3]}")
    return convert_unet_state_dict_to_peft(unet_state) if component == "unet" else unet_state


def load_lora_into_unet(
    unet: torch.nn.Module, path: str | os.PathLike, *, adapter_name: str = "default", component: str = "unet"
) -> None:
    """Copy saved LoRA weights into the existing adapter ``adapter_name`` (created by :func:`add_lora`), in place.

    For resuming: the adapter's config must match the file's (same targets and rank); every LoRA tensor of the
    adapter must be present in the file and vice versa. Parameters keep their dtype (float32) and trainability.
    """
    bare = unwrap(unet)
    if adapter_name not in getattr(bare, "peft_config", {}):
        raise ValueError(f"the UNet has no LoRA adapter named {adapter_name!r}; call add_lora with the saved config")
    state = lora_state_dict(path, component)
    expected = set(get_peft_model_state_dict(bare, adapter_name=adapter_name))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"LoRA weights in {path} do not match adapter {adapter_name!r}: missing {missing[:3]} "
            f"({len(missing)} total), unexpected {unexpected[:3]} ({len(unexpected)} total); "
            "were they saved with the same target_modules?"
        )
    current = get_peft_model_state_dict(bare, adapter_name=adapter_name)
    for key, value in state.items():
        if value.shape != current[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, adapter has {tuple(current[key].shape)}")
    set_peft_model_state_dict(bare, state, adapter_name=adapter_name)
