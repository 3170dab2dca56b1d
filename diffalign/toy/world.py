"""The toy world: one coloured shape on a dark uniform background, 16×16 RGB, with its caption as ground truth.

Every image is a pure function of a :class:`ShapeSpec`; :func:`sample_specs` draws specs from addressable
per-sample generators (``diffalign.utils.randomness``), so spec ``i`` of seed ``s`` is the same whatever ``n`` is.

Geometry (pixel units, pixel ``(x, y)`` covers ``[x, x+1) × [y, y+1)``):

* circle: radius ``size``;
* square: axis-aligned, half-side ``size`` (so its bounding box equals the circle's);
* triangle: upward isosceles, apex ``(cx, cy - size)``, base corners ``(cx ± size, cy + size)``
  (bounding box again ``2·size`` square; area ``2·size²``, half the box).

Edges are anti-aliased by ``SUPERSAMPLE``² point sampling per pixel, so pixel = ``coverage · colour +
(1 - coverage) · background``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from diffalign.utils.randomness import sample_generator

RESOLUTION = 16
SUPERSAMPLE = 4

#: Palette in RGB [0, 1]. Hues are ≥ 55° apart (red 0°, yellow ≈ 54°, green ≈ 129°, blue ≈ 225°), chroma ≥ 0.6.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.16, 0.16),
    "yellow": (0.90, 0.82, 0.16),
    "green": (0.16, 0.78, 0.24),
    "blue": (0.20, 0.36, 0.92),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

#: Ranges of the random attributes (uniform). Background is a grey level, kept dark so the shape is the salient part.
SIZE_RANGE = (3.0, 5.5)
BACKGROUND_RANGE = (0.0, 0.3)

# Stream ids for the spec draws (independent of diffalign.utils.randomness's training streams, which use 0..4).
_SPEC_STREAM = 100


@dataclass(frozen=True)
class ShapeSpec:
    """One toy image: ``colour`` ∈ COLOURS, ``shape`` ∈ SHAPES, centre ``(cx, cy)`` and ``size`` in pixels, and
    ``background`` grey level in [0, 1]."""

    colour: str
    shape: str
    cx: float
    cy: float
    size: float
    background: float

    def __post_init__(self) -> None:
        if self.colour not in PALETTE:
            raise ValueError(f"ShapeSpec.colour={self.colour!r}: use one of {COLOURS}")
        if self.shape not in SHAPES:
            raise ValueError(f"ShapeSpec.shape={self.shape!r}: use one of {SHAPES}")
        if not 0.0 <= self.background <= 1.0:
            raise ValueError(f"ShapeSpec.background={self.background}: must be a grey level in [0, 1]")
        if self.size <= 0:
            raise ValueError(f"ShapeSpec.size={self.size}: must be positive")

    @property
    def caption(self) -> str:
        return caption_for(self.colour, self.shape)


def caption_for(colour: str, shape: str) -> str:
    """The world's caption template: ``"a red circle"``."""
    return f"a {colour} {shape}"


def all_prompts() -> list[str]:
    """Every colour × shape caption, colour-major (12 prompts for 4 colours × 3 shapes)."""
    return [caption_for(c, s) for c in COLOURS for s in SHAPES]


def parse_caption(caption: str) -> tuple[str, str]:
    """Inverse of :func:`caption_for`; raises ``ValueError`` naming the caption if it is not of the world's form."""
    words = caption.strip().lower().split()
    if len(words) != 3 or words[0] != "a" or words[1] not in PALETTE or words[2] not in SHAPES:
        raise ValueError(f"caption {caption!r} is not of the form 'a <colour> <shape>' with colour in {COLOURS}")
    return words[1], words[2]


def sample_spec(seed: int, index: int, colour: str | None = None, shape: str | None = None) -> ShapeSpec:
    """Spec number ``index`` of ``seed``: uniform colour, shape, size, background, and a centre that keeps the shape
    inside the frame. ``colour`` / ``shape`` fix those attributes without changing the other draws."""
    u = torch.rand(6, generator=sample_generator(seed, 0, index, _SPEC_STREAM), dtype=torch.float64).tolist()
    size = SIZE_RANGE[0] + u[2] * (SIZE_RANGE[1] - SIZE_RANGE[0])
    lo, hi = size, RESOLUTION - size
    return ShapeSpec(
        colour=colour if colour is not None else COLOURS[min(int(u[0] * len(COLOURS)), len(COLOURS) - 1)],
        shape=shape if shape is not None else SHAPES[min(int(u[1] * len(SHAPES)), len(SHAPES) - 1)],
        cx=lo + u[3] * (hi - lo),
        cy=lo + u[4] * (hi - lo),
        size=size,
        background=BACKGROUND_RANGE[0] + u[5] * (BACKGROUND_RANGE[1] - BACKGROUND_RANGE[0]),
    )


def sample_specs(n: int, seed: int, colour: str | None = None, shape: str | None = None) -> list[ShapeSpec]:
    """``n`` specs, ``sample_spec(seed, i)`` for ``i < n``."""
    return [sample_spec(seed, i, colour=colour, shape=shape) for i in range(n)]


def _supersample_grid() -> tuple[np.ndarray, np.ndarray]:
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    coords = (np.arange(RESOLUTION)[:, None] + offsets[None, :]).reshape(-1)
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    return xs, ys


_XS, _YS = _supersample_grid()


def coverage(spec: ShapeSpec) -> np.ndarray:
    """Fraction of each pixel covered by the shape, float64 ``[H, W]`` in [0, 1]."""
    dx, dy, s = _XS - spec.cx, _YS - spec.cy, spec.size
    if spec.shape == "circle":
        inside = dx**2 + dy**2 <= s**2
    elif spec.shape == "square":
        inside = (np.abs(dx) <= s) & (np.abs(dy) <= s)
    else:  # triangle: below the apex line pair, above the base
        inside = (dy <= s) & (np.abs(dx) <= (dy + s) / 2)
    return inside.reshape(RESOLUTION, SUPERSAMPLE, RESOLUTION, SUPERSAMPLE).mean(axis=(1, 3))


def render_array(spec: ShapeSpec) -> np.ndarray:
    """The image as float32 ``[H, W, 3]`` in [0, 1]."""
    cov = coverage(spec)[..., None]
    colour = np.asarray(PALETTE[spec.colour], dtype=np.float64)
    return (cov * colour + (1.0 - cov) * spec.background).astype(np.float32)


def render(spec: ShapeSpec) -> Image.Image:
    """The image as an RGB PIL image (uint8, rounded)."""
    return Image.fromarray(np.round(render_array(spec) * 255.0).astype(np.uint8), mode="RGB")


def render_batch(specs: Sequence[ShapeSpec]) -> torch.Tensor:
    """Float32 tensor ``[N, 3, H, W]`` in [0, 1] (the layout :mod:`diffalign.toy.metrics` and the models use)."""
    if len(specs) == 0:
        return torch.zeros(0, 3, RESOLUTION, RESOLUTION)
    return torch.from_numpy(np.stack([render_array(s) for s in specs])).permute(0, 3, 1, 2).contiguous()
