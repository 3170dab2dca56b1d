"""PickScore (Kirstain et al. 2023): ``logit_scale.exp() · cos(image, prompt)`` of the ``yuvalkirstain/PickScore_v1``
CLIP-H model.

* Weights: ``CLIPModel`` ``yuvalkirstain/PickScore_v1``; tokenizer and image processor from
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (shortest side 224 bicubic, centre crop 224, OpenAI CLIP mean/std;
  text padded/truncated to 77 tokens) [CODE PickScore README / flow_grpo ``pickscore_scorer.py``].
* Score: both features L2-normalised, ``model.logit_scale.exp() · <img, txt>`` (≈ 18–24 for real images; the official
  demo then softmaxes across candidate images, which this per-image reward does not).
* ``normalize``: optional divisor; flow_grpo's training reward is ``score / 26`` (``normalize=26.0``). Default
  ``None`` = the raw PickScore.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from diffalign.rewards.clip_score import HFCLIPReward, cosine
from diffalign.rewards.preprocess import CLIPPreprocess


class PickScore(HFCLIPReward):
    """``logit_scale.exp() · cos(image, prompt)`` (optionally ``/ normalize``); an ``EmbeddingReward``."""

    name = "pickscore"
    DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
    DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        normalize: float | None = None,
        preprocess: CLIPPreprocess | None = None,
        max_length: int | None = None,
    ) -> None:
        if normalize is not None and normalize <= 0:
            raise ValueError(f"PickScore normalize must be a positive divisor or None, got {normalize}")
        super().__init__(model, tokenizer, preprocess, max_length)
        self.normalize = normalize

    def score_embeds(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        score = self.model.logit_scale.exp().float() * cosine(image_embeds, text_embeds)
        return score / self.normalize if self.normalize is not None else score

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = DEFAULT_MODEL,
        *,
        processor: str | os.PathLike | None = DEFAULT_PROCESSOR,
        tokenizer: str | os.PathLike | None = None,
        normalize: float | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
    ) -> PickScore:
        """Load the PickScore ``CLIPModel`` from ``model`` and tokenizer/image-processor settings from ``processor``
        (``tokenizer`` overrides the tokenizer source; ``processor=None`` reads both from ``model``)."""
        clip, tok, preprocess = cls._load(model, tokenizer, processor, device, dtype, local_files_only, revision)
        return cls(clip, tok, normalize=normalize, preprocess=preprocess)
