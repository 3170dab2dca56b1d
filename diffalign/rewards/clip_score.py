"""CLIPScore: scaled image-text cosine of a transformers ``CLIPModel`` (default ``openai/clip-vit-large-patch14``).

``cos = <f_img, f_txt> / (|f_img| |f_txt|)`` with ``f_img = get_image_features(preprocess(images))`` and
``f_txt = get_text_features(tokens)`` (77 tokens, padded/truncated). Scales:

* ``"flow_grpo"`` (default): ``100 · cos / 30`` — flow_grpo's ``logits_per_image.diag() / 30`` with ViT-L/14, whose
  ``logit_scale.exp()`` is exactly 100 [CODE yifan123/flow_grpo].
* ``"hessel"``: ``2.5 · max(cos, 0)`` — Hessel et al. 2021, CLIPScore (paper uses ViT-B/32).
* ``"torchmetrics"``: ``max(100 · cos, 0)`` — ``torchmetrics.multimodal.CLIPScore`` (default ViT-L/14).

Images go through :func:`diffalign.rewards.preprocess.clip_preprocess` (differentiable resize/crop/normalise), so
gradients reach the images; the CLIP weights are frozen (eval mode, ``requires_grad=False``).

This module also holds :class:`HFCLIPReward`, the shared base of the transformers-CLIP rewards (CLIPScore,
PickScore, the LAION aesthetic predictor).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from diffalign.rewards.base import FrozenReward, check_images
from diffalign.rewards.preprocess import CLIPPreprocess

CLIP_SCORE_SCALES = ("flow_grpo", "hessel", "torchmetrics")


def features(output: Any) -> torch.Tensor:
    """The projected features of ``CLIPModel.get_image_features`` / ``get_text_features``: a tensor in transformers
    4.x, a ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds them in transformers 5.x."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"cannot read CLIP features from {type(output).__name__}")
    return pooled


def cosine(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity ``(N,)`` of two ``(N, D)`` feature batches, computed in float32."""
    if image_embeds.shape != text_embeds.shape:
        shapes = f"{tuple(image_embeds.shape)} vs {tuple(text_embeds.shape)}"
        raise ValueError(f"image and text embeddings differ in shape: {shapes}")
    img = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
    txt = torch.nn.functional.normalize(text_embeds.float(), dim=-1)
    return (img * txt).sum(-1)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad_(False)``: a frozen reward model (gradients still flow to its inputs)."""
    module.eval()
    module.requires_grad_(False)
    return module


def preprocess_from_pretrained(
    source: str | os.PathLike, image_size: int, local_files_only: bool = False, **kwargs: Any
) -> CLIPPreprocess:
    """Image preprocessing read from ``source``'s ``preprocessor_config.json`` (a ``CLIPImageProcessor``); if there
    is none, shortest side = crop = the vision tower's ``image_size`` with OpenAI CLIP mean/std."""
    from transformers import CLIPImageProcessor

    try:
        processor = CLIPImageProcessor.from_pretrained(os.fspath(source), local_files_only=local_files_only, **kwargs)
    except (OSError, ValueError):
        return CLIPPreprocess(size=image_size, crop_size=image_size)
    return CLIPPreprocess.from_image_processor(processor)


class HFCLIPReward(FrozenReward):
    """Base of the transformers ``CLIPModel`` rewards: frozen model + tokenizer + differentiable preprocessing.

    ``image_embeds``/``text_embeds`` are the projected (not normalised) CLIP features; subclasses define
    ``score_embeds``. ``reward(images, prompts) == score_embeds(image_embeds(images), text_embeds(prompts))``.
    """

    name = "hf_clip"
    differentiable = True

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        preprocess: CLIPPreprocess | None = None,
        max_length: int | None = None,
    ) -> None:
        super().__init__()
        self.model = freeze(model)
        self.tokenizer = tokenizer
        if preprocess is None:
            size = int(model.config.vision_config.image_size)
            preprocess = CLIPPreprocess(size=size, crop_size=size)
        self.preprocess = preprocess
        text_max = getattr(model.config.text_config, "max_position_embeddings", 77)
        self.max_length = int(max_length or min(getattr(tokenizer, "model_max_length", text_max), text_max))

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` projected image features of ``preprocess(images)``, differentiable in ``images``."""
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        return features(self.model.get_image_features(pixel_values=pixels))

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {key: tokens[key].to(self.device) for key in ("input_ids", "attention_mask") if key in tokens}

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(N, D)`` projected text features (no gradient)."""
        if isinstance(prompts, str):
            raise ValueError(f"reward '{self.name}': prompts must be a sequence of strings, got a single string")
        with torch.no_grad():
            return features(self.model.get_text_features(**self.tokenize(prompts)))

    def score_embeds(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(self.name, images, prompts)
        scores = self.score_embeds(self.image_embeds(images), self.text_embeds(prompts))
        return scores.float().to(images.device)

    @staticmethod
    def _load(
        model: str | os.PathLike,
        tokenizer: str | os.PathLike | None,
        processor: str | os.PathLike | None,
        device: str | torch.device | None,
        dtype: torch.dtype | None,
        local_files_only: bool,
        revision: str | None,
    ) -> tuple[nn.Module, Any, CLIPPreprocess]:
        """``CLIPModel`` from ``model`` (safetensors preferred; ``.bin`` only through transformers' weights-only
        loader), ``CLIPTokenizer`` from ``tokenizer`` (default: ``processor``, then ``model``), preprocessing from
        ``processor``'s image-processor config (default ``model``)."""
        from transformers import CLIPModel, CLIPTokenizer

        def kwargs_for(source: str | os.PathLike) -> dict[str, Any]:
            # ``revision`` names a revision of ``model``; other sources use their default branch.
            same = os.fspath(source) == os.fspath(model)
            return {"local_files_only": local_files_only, **({"revision": revision} if same and revision else {})}

        model_kwargs = kwargs_for(model)
        if dtype is not None:
            model_kwargs["dtype"] = dtype
        clip = CLIPModel.from_pretrained(os.fspath(model), **model_kwargs)
        if device is not None:
            clip = clip.to(device)
        tok_source = tokenizer or processor or model
        tok = CLIPTokenizer.from_pretrained(os.fspath(tok_source), **kwargs_for(tok_source))
        proc_source = processor or model
        image_size = int(clip.config.vision_config.image_size)
        preprocess = preprocess_from_pretrained(proc_source, image_size, **kwargs_for(proc_source))
        return clip, tok, preprocess


class CLIPScore(HFCLIPReward):
    """``scale(cos(image, prompt))`` of a CLIP model; ``scale`` ∈ ``"flow_grpo"`` (100·cos/30, default),
    ``"hessel"`` (2.5·max(cos, 0)), ``"torchmetrics"`` (max(100·cos, 0)). See the module docstring for sources."""

    name = "clip_score"
    DEFAULT_MODEL = "openai/clip-vit-large-patch14"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        scale: str = "flow_grpo",
        preprocess: CLIPPreprocess | None = None,
        max_length: int | None = None,
    ) -> None:
        if scale not in CLIP_SCORE_SCALES:
            raise ValueError(f"CLIPScore scale must be one of {CLIP_SCORE_SCALES}, got {scale!r}")
        super().__init__(model, tokenizer, preprocess, max_length)
        self.scale = scale

    def score_embeds(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        cos = cosine(image_embeds, text_embeds)
        if self.scale == "flow_grpo":
            return 100.0 * cos / 30.0
        if self.scale == "hessel":
            return 2.5 * cos.clamp(min=0.0)
        return (100.0 * cos).clamp(min=0.0)

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = DEFAULT_MODEL,
        *,
        tokenizer: str | os.PathLike | None = None,
        scale: str = "flow_grpo",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
    ) -> CLIPScore:
        """Load a ``CLIPModel`` + ``CLIPTokenizer`` (+ image-processor settings) from a hub id or a local folder."""
        clip, tok, preprocess = cls._load(model, tokenizer, None, device, dtype, local_files_only, revision)
        return cls(clip, tok, scale=scale, preprocess=preprocess)
