"""Gold metrics of the toy world, computed from pixels alone (no learned model).

Colour. The background is grey (R = G = B), so a pixel's chroma ``max(rgb) - min(rgb)`` is ``coverage · chroma(shape
colour)``: only shape pixels are chromatic. :func:`colour_of` takes the pixels with chroma ≥ ``CHROMA_MIN``, assigns
each to the palette colour of nearest hue (circular distance), and returns the chroma-weighted majority; fewer than
``MIN_PIXELS`` chromatic pixels means "no shape visible" (``None``), which never matches a prompt.

Shape (:func:`shape_of`). Coverage ``c = chroma / chroma(palette colour)`` (exact for rendered images). With area
``A = Σ c``, soft width ``W = Σ_columns max_rows c`` and soft height ``H = Σ_rows max_columns c``, the fill ratio
``A / (W·H)`` is ≈ 1 for a square (≥ ``SQUARE_FILL_MIN``), π/4 ≈ 0.79 for a circle and ≈ 0.6 for the triangle;
the triangle (apex up) is told from the circle by its mass sitting low: ``(centroid_y - box_centre_y) / H`` is ≈ 1/6
for it and ≈ 0 for the symmetric shapes (threshold ``TRIANGLE_ASYMMETRY_MIN``), where ``box_centre_y`` is the mean
row weighted by each row's maximum coverage. On rendered ground truth this is 100% accurate (see tests).

Diversity (:func:`diversity`). Per image, four attributes from pixels: centroid ``x``, centroid ``y``, size
``sqrt(A)``, all in pixels, and background tone (mean grey of the pixels with ``c < 0.05``). For each prompt, the
sample standard deviation of each attribute over that prompt's images is divided by the same standard deviation
over the world's own distribution for that shape (4096 rendered ground-truth specs); diversity is the mean of these
ratios over attributes and prompts. Ground-truth samples score ≈ 1, identical copies 0, and mode collapse in
any attribute pulls it down.

Silhouette (:func:`silhouette_embeds`). The coverage map ``c`` flattened to ``H·W`` numbers: where the shape is, how
large and which outline, with its colour divided out. It is the toy's counterpart of the identity embedding
DivGenBench's IDS uses for faces (ArcFace: who the person is, not the attributes the prompt asks for), and the
embedding behind the online evidence's ``spread_silhouette``. :func:`centre_distance` is the mean distance of the
centroids from the frame's centre: where the shapes of a narrowing mode gather.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from diffalign.eval.diversity import as_nhwc, rows_by_prompt
from diffalign.toy.world import COLOURS, PALETTE, SHAPES, parse_caption, render_array, sample_specs

CHROMA_MIN = 0.2
MIN_PIXELS = 3
BACKGROUND_COVERAGE_MAX = 0.05
SQUARE_FILL_MIN = 0.9
TRIANGLE_ASYMMETRY_MIN = 0.06
ATTRIBUTES: tuple[str, ...] = ("x", "y", "size", "tone")

ImageBatch = torch.Tensor | np.ndarray | Sequence[Image.Image]


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees [0, 360) of ``[..., 3]`` RGB (HSV hexcone definition)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    d = np.where(mx > mn, mx - mn, 1.0)
    h = np.where(mx == r, (g - b) / d % 6.0, np.where(mx == g, (b - r) / d + 2.0, (r - g) / d + 4.0))
    return (60.0 * h) % 360.0


_PALETTE_RGB = np.array([PALETTE[c] for c in COLOURS])
_PALETTE_HUE = _hue(_PALETTE_RGB)
_PALETTE_CHROMA = _PALETTE_RGB.max(-1) - _PALETTE_RGB.min(-1)


as_hwc_batch = as_nhwc  # float64 [N, H, W, 3] in [0, 1] from a tensor, an array or PIL images


def _colour_indices(batch: np.ndarray) -> np.ndarray:
    """Palette index of each image's shape colour, ``-1`` where no shape is visible."""
    chroma = batch.max(-1) - batch.min(-1)
    hue_dist = np.abs(_hue(batch)[..., None] - _PALETTE_HUE)
    nearest = np.minimum(hue_dist, 360.0 - hue_dist).argmin(-1)
    salient = chroma >= CHROMA_MIN
    votes = np.stack([((nearest == k) & salient) * chroma for k in range(len(COLOURS))], -1).sum((1, 2))
    idx = votes.argmax(-1)
    return np.where(salient.sum((1, 2)) >= MIN_PIXELS, idx, -1)


def colours_of(images: ImageBatch) -> list[str | None]:
    """Detected colour name of each image (``None``: no shape visible)."""
    return [COLOURS[i] if i >= 0 else None for i in _colour_indices(as_hwc_batch(images))]


def colour_of(image: torch.Tensor | np.ndarray | Image.Image) -> str | None:
    """Detected colour of one image (``[3, H, W]`` tensor, ``[H, W, 3]`` array, or PIL image)."""
    if isinstance(image, Image.Image):
        return colours_of([image])[0]
    return colours_of(image[None])[0]


def _coverage(batch: np.ndarray, colour_idx: np.ndarray) -> np.ndarray:
    chroma = batch.max(-1) - batch.min(-1)
    ref = np.where(colour_idx >= 0, _PALETTE_CHROMA[np.maximum(colour_idx, 0)], 1.0)
    return np.clip(chroma / ref[:, None, None], 0.0, 1.0)


def silhouette_embeds(images: ImageBatch) -> np.ndarray:
    """``[N, H·W]`` float64 coverage maps (see module docstring): the same spec rendered in any palette colour gives
    the same row; an image with no visible shape gives its (near-zero) chroma map scaled by 1."""
    batch = as_hwc_batch(images)
    return _coverage(batch, _colour_indices(batch)).reshape(len(batch), -1)


def shapes_of(images: ImageBatch) -> list[str | None]:
    """Detected shape of each image by fill ratio (see module docstring); ``None`` where no shape is visible."""
    batch = as_hwc_batch(images)
    idx = _colour_indices(batch)
    cov = _coverage(batch, idx)
    area = np.maximum(cov.sum((1, 2)), 1e-9)
    row_max = cov.max(2)
    height = np.maximum(row_max.sum(-1), 1e-9)
    fill = area / np.maximum(cov.max(1).sum(-1) * height, 1e-9)
    grid = np.arange(cov.shape[1], dtype=np.float64) + 0.5  # row centres: any image size, not only RESOLUTION
    centroid_y = (cov.sum(2) * grid).sum(-1) / area
    box_centre_y = (row_max * grid).sum(-1) / height
    asymmetry = (centroid_y - box_centre_y) / height
    out: list[str | None] = []
    for k, f, a in zip(idx, fill, asymmetry, strict=True):
        if k < 0:
            out.append(None)
        elif f >= SQUARE_FILL_MIN:
            out.append("square")
        else:
            out.append("triangle" if a >= TRIANGLE_ASYMMETRY_MIN else "circle")
    return out


def _check_lengths(images: np.ndarray, prompts: Sequence[str]) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts: pass one prompt per image")
    if len(prompts) == 0:
        raise ValueError("no images: pass at least one image and its prompt")


def colour_correct(images: ImageBatch, prompts: Sequence[str]) -> np.ndarray:
    """Per image: whether its detected colour is the one its prompt names (bool ``[N]``)."""
    batch = as_hwc_batch(images)
    _check_lengths(batch, prompts)
    wanted = np.array([COLOURS.index(parse_caption(p)[0]) for p in prompts])
    return _colour_indices(batch) == wanted


def colour_adherence(images: ImageBatch, prompts: Sequence[str]) -> float:
    """Fraction of images whose detected colour is the one their prompt names (in [0, 1])."""
    return float(colour_correct(images, prompts).mean())


def shape_adherence(images: ImageBatch, prompts: Sequence[str]) -> float:
    """Fraction of images whose detected shape is the one their prompt names."""
    batch = as_hwc_batch(images)
    _check_lengths(batch, prompts)
    detected = shapes_of(batch)
    return float(np.mean([d == parse_caption(p)[1] for d, p in zip(detected, prompts, strict=True)]))


def attributes(images: ImageBatch) -> np.ndarray:
    """``[N, 4]`` float64 (centroid x, centroid y, sqrt(area), background tone) per image; NaN where undefined
    (no shape visible: x, y, size; no background pixels: tone)."""
    batch = as_hwc_batch(images)
    idx = _colour_indices(batch)
    cov = _coverage(batch, idx)
    area = cov.sum((1, 2))
    safe = np.maximum(area, 1e-9)
    x = (cov * (np.arange(cov.shape[2], dtype=np.float64) + 0.5)[None, None, :]).sum((1, 2)) / safe
    y = (cov * (np.arange(cov.shape[1], dtype=np.float64) + 0.5)[None, :, None]).sum((1, 2)) / safe
    size = np.sqrt(area)
    bg = cov < BACKGROUND_COVERAGE_MAX
    n_bg = bg.sum((1, 2))
    tone = (batch.mean(-1) * bg).sum((1, 2)) / np.maximum(n_bg, 1)
    out = np.stack([x, y, size, tone], -1)
    out[idx < 0, :3] = np.nan
    out[n_bg == 0, 3] = np.nan
    return out


def centre_distance(images: ImageBatch) -> float:
    """Mean distance in pixels of the shape's centroid from the frame's centre (images with no visible shape are
    skipped; NaN when none has one): where the shapes sit, which the spread metrics do not say."""
    batch = as_hwc_batch(images)
    attrs = attributes(batch)
    h, w = batch.shape[1:3]
    dist = np.hypot(attrs[:, 0] - w / 2, attrs[:, 1] - h / 2)
    dist = dist[~np.isnan(dist)]
    return float(dist.mean()) if len(dist) else float("nan")


def _std(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.std(ddof=1)) if len(values) >= 2 else 0.0


@functools.lru_cache(maxsize=1)
def reference_spread(n: int = 4096, seed: int = 0) -> dict[str, np.ndarray]:
    """Per shape, the standard deviation of each attribute over ``n`` rendered ground-truth specs of that shape."""
    out = {}
    for shape in SHAPES:
        specs = sample_specs(n, seed, shape=shape)
        attrs = attributes(np.stack([render_array(s) for s in specs]))
        out[shape] = np.array([_std(attrs[:, j]) for j in range(len(ATTRIBUTES))])
    return out


def diversity_report(images: ImageBatch, prompts: Sequence[str]) -> dict[str, float]:
    """Relative spread per attribute (``x``, ``y``, ``size``, ``tone``, each averaged over prompts) and their mean
    ``diversity``. Prompts with a single image contribute 0 (no spread can be measured)."""
    batch = as_hwc_batch(images)
    _check_lengths(batch, prompts)
    attrs = attributes(batch)
    groups = rows_by_prompt(prompts)
    ref = reference_spread()
    ratios = np.array(
        [
            [_std(attrs[rows, j]) / ref[parse_caption(p)[1]][j] for j in range(len(ATTRIBUTES))]
            for p, rows in groups.items()
        ]
    )
    report = {name: float(ratios[:, j].mean()) for j, name in enumerate(ATTRIBUTES)}
    report["diversity"] = float(ratios.mean())
    return report


def diversity(images: ImageBatch, prompts: Sequence[str]) -> float:
    """Mean relative spread of (x, y, size, tone) within each prompt's images (≈ 1 for ground truth, 0 for copies)."""
    return diversity_report(images, prompts)["diversity"]


def mean_brightness(images: ImageBatch) -> float:
    """Mean pixel value over all images and channels (tracks over-exposure under a brightness-biased reward)."""
    return float(as_hwc_batch(images).mean())


def checkerboard(images: ImageBatch) -> float:
    """Amplitude of the pixel checkerboard: ``|mean_ij x_ij · (−1)^(i+j)|`` per image and channel, averaged.

    That is the highest spatial frequency of the image's 2-D Fourier transform, the pattern a patch-2 transformer
    draws when its per-token output layer drifts (the flow toy's DPO artifact). A flat image scores 0, a full ±a
    checkerboard ``a``; rendered ground truth stays near 0 (only shape edges contribute)."""
    batch = as_hwc_batch(images)
    h, w = batch.shape[1:3]
    sign = (-1.0) ** (np.arange(h)[:, None] + np.arange(w)[None, :])
    return float(np.abs((batch * sign[None, :, :, None]).mean(axis=(1, 2))).mean())


def summarize(images: ImageBatch, prompts: Sequence[str]) -> dict[str, float]:
    """All gold metrics of one evaluation: ``adherence`` (colour), ``shape_adherence``, ``diversity`` and its
    per-attribute parts, ``no_shape`` (fraction with no shape visible), ``mean_brightness`` and ``checkerboard``."""
    batch = as_hwc_batch(images)
    _check_lengths(batch, prompts)
    return {
        "adherence": colour_adherence(batch, prompts),
        "shape_adherence": shape_adherence(batch, prompts),
        **diversity_report(batch, prompts),
        "no_shape": float((_colour_indices(batch) < 0).mean()),
        "mean_brightness": mean_brightness(batch),
        "checkerboard": checkerboard(batch),
        "n": float(len(prompts)),
    }
