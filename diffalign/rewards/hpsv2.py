"""HPSv2 / HPSv2.1 (Wu et al. 2023, Human Preference Score v2): raw cosine of an open_clip ViT-H-14 fine-tuned on HPD.

* Weights: open_clip ``create_model("ViT-H-14", pretrained=None)`` (the laion2B-s32B-b79K architecture) with the full
  state dict of ``xswu/HPSv2`` ``HPS_v2_compressed.pt`` or ``HPS_v2.1_compressed.pt`` loaded on top (a dict with a
  ``"state_dict"`` entry, or a bare state dict; a ``module.`` prefix is stripped) [CODE tgxs002/HPSv2
  ``hpsv2/img_score.py``].
* Preprocessing: HPS's ``preprocess_val`` = its open_clip fork's ``image_transform(224, is_train=False,
  resize_longest_max=True)``: longest side → 224 (bicubic), zero-pad to 224 × 224, OpenAI CLIP mean/std; done here
  differentiably by :func:`diffalign.rewards.preprocess.clip_preprocess` with ``mode="pad"`` (for square images
  this is one bicubic resize). Text: open_clip tokenizer (77 tokens).
* Score: ``diag(normalize(img_feat) @ normalize(txt_feat).T)`` = the raw cosine (≈ 0.25–0.35 for HPSv2.1), no logit
  scale [CODE flow_grpo ``hpsv2_scorer.py``, DanceGRPO]. The reference runs under CUDA autocast; this module runs in
  the model's dtype.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from diffalign.rewards.base import FrozenReward, check_images, load_state_dict_file, resolve_checkpoint
from diffalign.rewards.clip_score import cosine, freeze
from diffalign.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CLIPPreprocess

HPS_HUB_REPO = "xswu/HPSv2"
HPS_CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
_HINT = (
    f"The official HPSv2 weights are {HPS_CHECKPOINTS['v2.0']} / {HPS_CHECKPOINTS['v2.1']} in the hub repo "
    f"{HPS_HUB_REPO} (e.g. checkpoint='{HPS_HUB_REPO}/{HPS_CHECKPOINTS['v2.1']}')."
)


def open_clip_preprocess(model: nn.Module, mode: str = "pad") -> CLIPPreprocess:
    """Preprocessing settings of an open_clip model: its image size and mean/std (OpenAI CLIP's if unset)."""
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ValueError(f"HPSv2 preprocessing expects a square image size, got {size}")
        size = size[0]
    mean = tuple(cfg.get("mean") or OPENAI_CLIP_MEAN)
    std = tuple(cfg.get("std") or OPENAI_CLIP_STD)
    return CLIPPreprocess(size=int(size), crop_size=int(size), mean=mean, std=std, mode=mode)


class HPSv2(FrozenReward):
    """Raw cosine between open_clip image and text features of an HPSv2 model; an ``EmbeddingReward``."""

    name = "hpsv2"
    differentiable = True

    def __init__(self, model: nn.Module, tokenizer: Any, preprocess: CLIPPreprocess | None = None) -> None:
        super().__init__()
        self.model = freeze(model)
        self.tokenizer = tokenizer
        self.preprocess = preprocess if preprocess is not None else open_clip_preprocess(model)

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` open_clip image features (not normalised), differentiable in ``images``."""
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        return self.model.encode_image(pixels)

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(N, D)`` open_clip text features (not normalised; no gradient)."""
        if isinstance(prompts, str):
            raise ValueError(f"reward '{self.name}': prompts must be a sequence of strings, got a single string")
        with torch.no_grad():
            return self.model.encode_text(self.tokenizer(list(prompts)).to(self.device))

    def score_embeds(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return cosine(image_embeds, text_embeds)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(self.name, images, prompts)
        return self.score_embeds(self.image_embeds(images), self.text_embeds(prompts)).float().to(images.device)

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | os.PathLike = f"{HPS_HUB_REPO}/{HPS_CHECKPOINTS['v2.1']}",
        *,
        model_name: str = "ViT-H-14",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        local_files_only: bool = False,
        strict: bool = True,
    ) -> HPSv2:
        """Build open_clip ``model_name`` without pretrained weights, then load the HPS ``checkpoint`` (a local
        ``.pt``/``.safetensors`` file, or ``"owner/repo/filename"`` on the hub) into it."""
        import open_clip

        path = resolve_checkpoint(checkpoint, local_files_only=local_files_only, hint=_HINT)
        if ":" not in model_name and model_name not in open_clip.list_models():  # "hf-hub:"/"local-dir:" pass
            raise ValueError(
                f"unknown open_clip architecture {model_name!r}; register its JSON config with "
                f"open_clip.add_model_config(path) first (HPSv2 uses 'ViT-H-14')"
            )
        model = open_clip.create_model(model_name, pretrained=None)
        state = load_state_dict_file(path)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as error:  # shape mismatches raise even with strict=False
            message = f"{path} does not match open_clip {model_name!r}: {error}"
            raise ValueError(f"{message}; is it an HPSv2 checkpoint for this architecture?") from error
        if strict and (missing or unexpected):
            raise ValueError(
                f"{path} does not match open_clip {model_name!r}: missing keys {sorted(missing)[:8]}"
                f"{'...' if len(missing) > 8 else ''}, unexpected keys {sorted(unexpected)[:8]}"
                f"{'...' if len(unexpected) > 8 else ''}; is it an HPSv2 checkpoint for this architecture?"
            )
        if dtype is not None:
            model = model.to(dtype)
        if device is not None:
            model = model.to(device)
        return cls(model, open_clip.get_tokenizer(model_name))
