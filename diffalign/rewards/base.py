"""The one call every reward model answers: ``reward(images, prompts) -> (N,)``.

* ``images``: float ``(N, 3, H, W)`` in [0, 1] (decoded generator output), on any device; CLIP-style rewards
  preprocess them with differentiable torch ops (resize, centre crop, normalise), so gradients reach the images
  (direct reward back-propagation, D²-Align). ``differentiable = False`` marks rewards that cannot (JPEG size).
* ``prompts``: one string per image.
* Returns float32 ``(N,)`` on the images' device; higher is better.

Embedding rewards (CLIP-style: CLIPScore, PickScore, HPSv2, the toy reward model) also expose the text-embedding
space that D²-Align corrects: ``reward(images, prompts) == score_embeds(image_embeds(images), text_embeds(prompts))``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class RewardModel(Protocol):
    name: str
    differentiable: bool

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


@runtime_checkable
class EmbeddingReward(RewardModel, Protocol):
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` image features (not normalised), differentiable with respect to ``images``."""
        ...

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(N, D)`` text features (not normalised); no gradient to the text tower."""
        ...

    def score_embeds(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """``(N,)`` reward from the two features (e.g. ``scale · cos(img, txt)``)."""
        ...


class FrozenReward(torch.nn.Module):
    """Base of the neural rewards: always in eval mode (``train()`` keeps it), ``device`` / ``dtype`` of its first
    registered weights (the backbone)."""

    def train(self, mode: bool = True) -> FrozenReward:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def check_images(name: str, images: torch.Tensor, prompts: Sequence[str]) -> None:
    """Raise a clear error for inputs a reward cannot score."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"reward '{name}': images must be a float (N, 3, H, W) tensor in [0, 1], got {shape}")
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        raise ValueError(
            f"reward '{name}': expected one prompt per image ({images.shape[0]}), got "
            f"{'a single string' if isinstance(prompts, str) else len(prompts)}"
        )


def resolve_checkpoint(
    checkpoint: str | os.PathLike, *, local_files_only: bool = False, hint: str = "", revision: str | None = None
) -> Path:
    """A local checkpoint file: ``checkpoint`` itself if it exists, else ``"owner/repo/filename"`` fetched with
    ``huggingface_hub.hf_hub_download`` (the hub is contacted only for such a hub name). ``hint`` is appended to
    the error messages (e.g. where the official file lives)."""
    text = os.fspath(checkpoint)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {path} is a directory; pass the checkpoint file inside it. {hint}".strip())
    parts = text.split("/")
    looks_local = os.path.isabs(text) or text.startswith((".", "~")) or len(parts) < 3 or "" in parts
    if looks_local:
        raise FileNotFoundError(
            f"checkpoint file {path} does not exist; pass the path of an existing checkpoint file, or a hub file "
            f"name 'owner/repo/filename' to download it. {hint}".strip()
        )
    from huggingface_hub import hf_hub_download

    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=local_files_only))
    except Exception as error:  # offline, missing repo/file, gated repo: all need the same advice
        raise FileNotFoundError(
            f"checkpoint {text!r} is not a local file and could not be fetched as file {filename!r} of hub repo "
            f"{repo_id!r} ({type(error).__name__}: {error}). Download it once while online "
            f"(`hf download {repo_id} {filename}`) so it is cached, or pass the local path of the file"
            f"{'' if not local_files_only else ' (local_files_only=True: only the hub cache was searched)'}. "
            f"{hint}".strip()
        ) from error


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file (loaded with ``weights_only=True``): a dict with a
    ``"state_dict"`` entry or a bare state dict; a DataParallel/DDP ``module.`` prefix is stripped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (name → tensor), nor a dict with a 'state_dict' entry")
    prefix = "module."
    if state and all(key.startswith(prefix) for key in state):
        state = {key[len(prefix) :]: value for key, value in state.items()}
    return state
