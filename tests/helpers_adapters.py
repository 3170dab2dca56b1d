"""Adapters over in-memory tiny components (``tiny_sd3_components``, ``tiny_sdxl_components``) that several test files
build: every text encoder and tokenizer the components hold, plus any adapter keyword."""

from __future__ import annotations

from typing import Any

from diffalign.models.sd3 import SD3Adapter
from diffalign.models.sdxl import SDXLAdapter

SD3_PARTS = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
SDXL_PARTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def sd3_adapter(components: dict[str, Any], **kwargs: Any) -> SD3Adapter:
    """An :class:`SD3Adapter` of ``components``' transformer and scheduler with their VAE (``None`` for pixels) and
    text parts (the T5 pair ``None`` without T5); ``kwargs`` go to the adapter (e.g. ``max_sequence_length``)."""
    parts = {name: components[name] for name in SD3_PARTS}
    return SD3Adapter(components["transformer"], components["scheduler"], **parts, **kwargs)


def sdxl_adapter(components: dict[str, Any], **kwargs: Any) -> SDXLAdapter:
    """An :class:`SDXLAdapter` of ``components``' UNet and scheduler with their VAE and both CLIP encoders and
    tokenizers; ``kwargs`` go to the adapter (e.g. ``time_ids``, ``prediction_type``)."""
    parts = {name: components[name] for name in SDXL_PARTS}
    return SDXLAdapter(components["unet"], components["scheduler"], **parts, **kwargs)
