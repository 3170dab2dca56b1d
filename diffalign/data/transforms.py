"""The image and prompt pipeline of the original Diffusion-DPO script, with addressable randomness.

Per image (``SalesforceAIResearch/DiffusionDPO`` ``train.py``): ``Resize(R)`` of the shorter side (bilinear, PIL) →
``CenterCrop(R)`` (``RandomCrop(R)`` if ``random_crop``) → ``RandomHorizontalFlip(0.5)`` → ``ToTensor`` →
``Normalize(0.5, 0.5)``, i.e. ``x = (u8 / 255 - 0.5) / 0.5 ∈ [-1, 1]``. The flip is drawn independently for winner
and loser. Prompt dropout replaces the pair's prompt(s) by ``""`` with probability ``p`` (both halves together).

``joint=True`` is the pair transform of diffusers' SDXL DPO script (and MaPO), whose size and crop feed SDXL's
added time ids: the ``jpg_1`` image is first resized to ``jpg_0``'s size (PIL ``resize``, its default bicubic), then
both are resized, flipped together by ONE draw (the winner's stream) and cropped at the same offset. Every item
carries ``original_size`` = ``jpg_0``'s (height, width) before any resize and ``crop_top_left`` = (top, left) of the
crop, as that script computes them (without ``joint`` they are the winner's own).

Every draw comes from :mod:`diffalign.utils.randomness`, keyed by ``(seed, epoch, dataset index, stream)``:

* flip: stream ``FLIP`` for the winner, ``FLIP + LOSER_STREAM_OFFSET`` for the loser (``flip`` iff ``U < 0.5``);
* crop: stream ``CROP`` for the winner, ``CROP + LOSER_STREAM_OFFSET`` for the loser (top, then left offset, each
  uniform over the valid range, in torchvision's order);
* prompt dropout: stream ``PROMPT_DROPOUT`` (drop iff ``U < p``, ``U`` float64).

So a sample is the same on any process, after any resume, and in the cached and uncached paths.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from diffalign.data.pickapic import PreferenceTable
from diffalign.utils.randomness import CROP, FLIP, PROMPT_DROPOUT, sample_generator

#: Added to a winner's stream id to get the loser's, so the two images of a pair draw independently.
LOSER_STREAM_OFFSET = 100


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Bilinear resize so the shorter side is ``size`` (long side ``int(size · long / short)``, torchvision's rule);
    an image already of that size is returned as is."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.BILINEAR)


def center_crop_offsets(width: int, height: int, size: int) -> tuple[int, int]:
    """``(top, left)`` of the centred ``size`` square: ``round((H - size) / 2)``, ``round((W - size) / 2)``."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def random_crop_offsets(width: int, height: int, size: int, generator: torch.Generator) -> tuple[int, int]:
    """``(top, left)`` uniform over the valid range, top drawn first."""
    top = int(torch.randint(0, height - size + 1, (), generator=generator))
    left = int(torch.randint(0, width - size + 1, (), generator=generator))
    return top, left


def to_signed_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image → float32 ``(3, H, W)`` in [-1, 1]: ``(u8 / 255 - 0.5) / 0.5`` (ToTensor + Normalize(0.5, 0.5))."""
    arr = torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    return (arr.to(torch.float32) / 255 - 0.5) / 0.5


def _uniform(seed: int, epoch: int, index: int, stream: int) -> float:
    return float(torch.rand((), generator=sample_generator(seed, epoch, index, stream), dtype=torch.float64))


@dataclass(frozen=True)
class SampleDraws:
    """The random choices of one pair: horizontal flips of winner / loser and whether its prompt is dropped."""

    flip_chosen: bool
    flip_rejected: bool
    drop_prompt: bool


def draw_sample(
    seed: int, epoch: int, index: int, *, hflip: bool, proportion_empty_prompts: float, joint: bool = False
) -> SampleDraws:
    """The flips and prompt dropout of pair ``index`` in ``epoch`` (streams in the module docstring); with ``joint``
    the loser takes the winner's flip."""
    flips = [hflip and _uniform(seed, epoch, index, FLIP + offset) < 0.5 for offset in (0, LOSER_STREAM_OFFSET)]
    if joint:
        flips[1] = flips[0]
    drop = proportion_empty_prompts > 0 and _uniform(seed, epoch, index, PROMPT_DROPOUT) < proportion_empty_prompts
    return SampleDraws(flip_chosen=flips[0], flip_rejected=flips[1], drop_prompt=drop)


@dataclass(frozen=True)
class PairGeometry:
    """SDXL's size conditioning of a pair: ``original_size`` (height, width) and ``crop_top_left`` (top, left)."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]

    def as_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "original_size": torch.tensor(self.original_size, dtype=torch.long),
            "crop_top_left": torch.tensor(self.crop_top_left, dtype=torch.long),
        }


def crop_streams() -> tuple[int, int]:
    """Stream ids of the winner's and the loser's random crop."""
    return CROP, CROP + LOSER_STREAM_OFFSET


class PreferencePairDataset(Dataset):
    """Pixel pairs of a :class:`PreferenceTable`, transformed like the original Diffusion-DPO script.

    ``__getitem__(i)`` returns ``{"index": i, "pixels_chosen": (3, R, R), "pixels_rejected": (3, R, R),
    "prompt_chosen": str, "prompt_rejected": str, "original_size": (2,), "crop_top_left": (2,)}`` with pixels in
    [-1, 1] (sizes and offsets as int64 (height, width) / (top, left); see the module docstring). Single-caption
    data gives both halves the same prompt; dual-caption (DCPO) data gives each image its own. Call
    :meth:`set_epoch` before each epoch.
    """

    def __init__(
        self,
        table: PreferenceTable,
        *,
        resolution: int,
        random_crop: bool = False,
        hflip: bool = True,
        proportion_empty_prompts: float = 0.0,
        seed: int = 0,
        joint: bool = False,
    ) -> None:
        if resolution < 1:
            raise ValueError(f"resolution={resolution}: must be a positive number of pixels")
        if not 0.0 <= proportion_empty_prompts <= 1.0:
            raise ValueError(f"proportion_empty_prompts={proportion_empty_prompts}: must be a probability in [0, 1]")
        self.table = table
        self.resolution = resolution
        self.random_crop = random_crop
        self.hflip = hflip
        self.proportion_empty_prompts = proportion_empty_prompts
        self.seed = seed
        self.joint = joint
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def on_bad_row(self) -> str:
        """The table's ``on_bad_row``: what the training loader does with a pair that does not decode
        (:func:`diffalign.trainers.loader.read_sample`)."""
        return self.table.options.get("on_bad_row", "error")

    def with_table(self, table: PreferenceTable) -> PreferencePairDataset:
        """The same transforms over another table (e.g. the table with its images verified)."""
        other = copy.copy(self)
        other.table = table
        return other

    def __len__(self) -> int:
        return len(self.table)

    @property
    def fingerprint(self) -> str:
        """Hash of the table's fingerprint and the options that change what the cache stores (resolution, crop
        mode, flip on/off); the seed and the dropout rate only change the per-epoch draws, so they are left out."""
        blob = json.dumps([self.table.fingerprint, self.resolution, self.random_crop, self.hflip, self.joint])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def draws(self, index: int) -> SampleDraws:
        return draw_sample(
            self.seed,
            self.epoch,
            index,
            hflip=self.hflip,
            proportion_empty_prompts=self.proportion_empty_prompts,
            joint=self.joint,
        )

    def prompts(self, index: int) -> tuple[str, str]:
        """The (winner, loser) prompts of pair ``index`` before dropout."""
        rec = self.table[index]
        return rec.prompt_chosen, rec.prompt_rejected

    def unflipped_pair(self, index: int) -> tuple[torch.Tensor, torch.Tensor, PairGeometry]:
        """(winner, loser) after resize and crop, before the flip, and the pair's SDXL size/crop conditioning."""
        chosen_img, rejected_img = self.table.decode_pair(index)
        first = rejected_img if self.table[index].swapped else chosen_img  # the source's jpg_0
        original = (first.height, first.width)
        if self.joint:
            chosen_img, rejected_img = (
                img if img is first else img.resize(first.size) for img in (chosen_img, rejected_img)
            )
        out, offsets = [], []
        for img, stream in zip((chosen_img, rejected_img), crop_streams(), strict=True):
            img = resize_shorter_side(img, self.resolution)
            if self.random_crop:
                # joint: one crop for the pair, drawn from the winner's stream
                gen = sample_generator(self.seed, self.epoch, index, crop_streams()[0] if self.joint else stream)
                top, left = random_crop_offsets(img.width, img.height, self.resolution, gen)
            else:
                top, left = center_crop_offsets(img.width, img.height, self.resolution)
            img = img.crop((left, top, left + self.resolution, top + self.resolution))
            out.append(to_signed_tensor(img))
            offsets.append((top, left))
        if not self.joint:
            original = (chosen_img.height, chosen_img.width)
        return out[0], out[1], PairGeometry(original_size=original, crop_top_left=offsets[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        chosen, rejected, geometry = self.unflipped_pair(index)
        d = self.draws(index)
        prompt_c, prompt_r = ("", "") if d.drop_prompt else self.prompts(index)
        return {
            "index": index,
            "pixels_chosen": chosen.flip(-1) if d.flip_chosen else chosen,
            "pixels_rejected": rejected.flip(-1) if d.flip_rejected else rejected,
            "prompt_chosen": prompt_c,
            "prompt_rejected": prompt_r,
            **geometry.as_tensors(),
        }


def collate_preference_batch(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch samples key-wise: tensors are stacked, ints become a LongTensor, strings a list, and nested dicts
    (``cond_chosen`` / ``cond_rejected``) are collated recursively into dicts of ``(B, ...)`` tensors."""
    if not samples:
        raise ValueError("collate_preference_batch: got an empty list of samples")
    return _collate(list(samples), path="sample")


def _collate(values: list[Any], path: str) -> Any:
    first = values[0]
    if isinstance(first, dict):
        keys = list(first)
        for v in values:
            if not isinstance(v, dict) or list(v) != keys:
                raise ValueError(f"collate_preference_batch: samples disagree on the keys of {path}")
        return {k: _collate([v[k] for v in values], f"{path}[{k!r}]") for k in keys}
    if isinstance(first, torch.Tensor):
        return torch.stack(values)
    if isinstance(first, bool):
        return torch.tensor(values, dtype=torch.bool)
    if isinstance(first, int):
        return torch.tensor(values, dtype=torch.long)
    return list(values)
