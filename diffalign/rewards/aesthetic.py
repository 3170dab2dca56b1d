"""LAION aesthetic predictor v2 ("improved aesthetic predictor", C. Schuhmann): a linear MLP on CLIP ViT-L/14
image embeddings, trained on SAC + LAION-Logos + AVA ratings (``sac+logos+ava1-l14-linearMSE.pth``).

* Embedding: ``CLIPModel.get_image_features`` of ``openai/clip-vit-large-patch14`` on CLIPProcessor-preprocessed
  images (shortest side 224 bicubic, centre crop 224, OpenAI CLIP mean/std; done differentiably here), then
  L2-normalised: ``e / |e|``.
* Head (``simple_inference.py``'s ``MLP``): ``layers = Sequential(Linear(D, 1024), Dropout(0.2), Linear(1024, 128),
  Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1))`` — no activations, so the head is one
  affine map; state-dict keys ``layers.{0,2,4,6,7}.{weight,bias}``. ``D`` = the CLIP projection dim (768 for ViT-L/14).
* Score = head output (≈ 1–10 on real images) [CODE christophschuhmann/improved-aesthetic-predictor
  ``simple_inference.py``; kvablack/ddpo-pytorch ``aesthetic_scorer.py``].

Prompts are ignored (checked for count only): a ``RewardModel``, not an ``EmbeddingReward``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from diffalign.rewards.base import FrozenReward, check_images, load_state_dict_file, resolve_checkpoint
from diffalign.rewards.clip_score import features, freeze, preprocess_from_pretrained
from diffalign.rewards.preprocess import CLIPPreprocess

AESTHETIC_CHECKPOINT = "sac+logos+ava1-l14-linearMSE.pth"
_HINT = (
    f"The LAION aesthetic predictor v2 head is {AESTHETIC_CHECKPOINT} from the GitHub repository "
    "christophschuhmann/improved-aesthetic-predictor (also shipped as ddpo_pytorch/assets/ in kvablack/ddpo-pytorch); "
    "download it and pass its local path."
)


class AestheticMLP(nn.Module):
    """The aesthetic head: ``Linear(D,1024) Dropout(.2) Linear(1024,128) Dropout(.2) Linear(128,64) Dropout(.1)
    Linear(64,16) Linear(16,1)``, no activations; parameter names match ``sac+logos+ava1-l14-linearMSE.pth``."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


class LAIONAesthetic(FrozenReward):
    """``mlp(e / |e|)`` with ``e`` the CLIP image embedding; prompts are ignored."""

    name = "aesthetic"
    differentiable = True
    DEFAULT_CLIP = "openai/clip-vit-large-patch14"

    def __init__(self, clip: nn.Module, mlp: AestheticMLP, preprocess: CLIPPreprocess | None = None) -> None:
        super().__init__()
        dim = int(clip.config.projection_dim)
        if mlp.input_size != dim:
            raise ValueError(f"aesthetic MLP takes {mlp.input_size}-d embeddings but the CLIP projection dim is {dim}")
        self.clip = freeze(clip)
        self.mlp = freeze(mlp)
        if preprocess is None:
            size = int(clip.config.vision_config.image_size)
            preprocess = CLIPPreprocess(size=size, crop_size=size)
        self.preprocess = preprocess

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` CLIP image features (not normalised), differentiable in ``images``."""
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        return features(self.clip.get_image_features(pixel_values=pixels))

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(self.name, images, prompts)
        embeds = self.image_embeds(images)
        embeds = embeds / torch.linalg.vector_norm(embeds, dim=-1, keepdim=True)
        mlp_dtype = next(self.mlp.parameters()).dtype
        return self.mlp(embeds.to(mlp_dtype)).squeeze(-1).float().to(images.device)

    @classmethod
    def from_pretrained(
        cls,
        mlp_checkpoint: str | os.PathLike,
        *,
        clip: str | os.PathLike = DEFAULT_CLIP,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
    ) -> LAIONAesthetic:
        """CLIP from ``clip`` (hub id or local folder; its image-processor config if present) and the head from
        ``mlp_checkpoint`` (local ``.pth``/``.safetensors`` file, or ``"owner/repo/filename"`` on the hub)."""
        from transformers import CLIPModel

        path = resolve_checkpoint(mlp_checkpoint, local_files_only=local_files_only, hint=_HINT)
        kwargs: dict[str, Any] = {"local_files_only": local_files_only}
        if revision is not None:
            kwargs["revision"] = revision
        model = CLIPModel.from_pretrained(os.fspath(clip), **kwargs, **({"dtype": dtype} if dtype else {}))
        mlp = AestheticMLP(int(model.config.projection_dim))
        state = load_state_dict_file(path)
        try:
            mlp.load_state_dict(state)
        except RuntimeError as error:
            message = f"{path} is not an aesthetic-predictor head for {mlp.input_size}-d embeddings: {error}"
            raise ValueError(message) from error
        preprocess = preprocess_from_pretrained(clip, int(model.config.vision_config.image_size), **kwargs)
        reward = cls(model, mlp, preprocess)
        return reward.to(device) if device is not None else reward
