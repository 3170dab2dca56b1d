"""Diversity metrics of generated image sets, after DivGenBench (D²-Align paper, arXiv 2512.24146).

* :func:`pvs` — Photographic Variance Score, DivGenBench's formula: per image saturation ``s_i`` = mean HSV
  saturation, brightness ``v_i`` = mean HSV value, contrast ``c_i`` = standard deviation of the grayscale image;
  ``PVS = std(s) + std(v) + std(c)`` over the image set. Choices the paper does not state (ours): pixel values in
  [0, 1] for all three terms; HSV as in :mod:`colorsys` (``V = max(r, g, b)``, ``S = (max − min) / max``, 0 where
  ``max = 0``); grayscale = ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` (PIL's ``convert("L")`` weights,
  without its rounding to uint8); every std is the population std (``ddof = 0``), both over an image's pixels and
  over the set. :func:`pvs_per_prompt` is the mean of :func:`pvs` over prompt groups. Higher = more diverse.
* :func:`embedding_spread` — analogue of DivGenBench's IDS. IDS is the mean pairwise cosine similarity of the ArcFace
  embeddings of one prompt's faces, ``IDS = 2/(N(N−1)) Σ_{i<j} cos(v_i, v_j)`` (lower = more diverse). Here, for any
  embedding: per prompt ``1 − IDS`` (so higher = more diverse, 0 for identical embeddings), averaged over prompts.
* :func:`layout_dispersion` — DivGenBench's SDI on given boxes: per prompt, the pairwise layout similarity
  ``Sim(L_i, L_p) = Σ_{(j, l) ∈ Hungarian(IoU)} IoU(b_j, b_l) / max(|L_i|, |L_p|)`` (maximum-IoU one-to-one matching)
  averaged over pairs ``i < p``; ``SDI = mean over prompts of (1 − mean Sim)``. Higher = more diverse. Edge cases
  (ours): two empty layouts are identical (Sim 1), an empty against a non-empty one shares nothing (Sim 0).
  The matching uses ``scipy.optimize.linear_sum_assignment`` when scipy is installed, else an exact O(n³) Hungarian
  algorithm (:func:`max_weight_matching`).

Grouping (ours, all three per-prompt metrics): prompts with fewer than two images have no pairs / no spread and are
left out of the mean; if no prompt has two images the metric raises ``ValueError``. DivGenBench does not state its
number of images per prompt.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from itertools import combinations

import numpy as np
import torch
from PIL import Image

ImageBatch = torch.Tensor | np.ndarray | Sequence[Image.Image]

#: ITU-R BT.601 luma weights (R, G, B) for the grayscale of the contrast term.
LUMA_601 = (0.299, 0.587, 0.114)


def as_nhwc(images: ImageBatch) -> np.ndarray:
    """Float64 ``[N, H, W, 3]`` in [0, 1] from a tensor ``[N, 3, H, W]`` (float in [0, 1] or uint8), a numpy
    ``[N, H, W, 3]`` array (float in [0, 1] or uint8) or a list of PIL images."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"image tensor of shape {tuple(images.shape)}: expected [N, 3, H, W]")
        arr = images.detach().cpu().permute(0, 2, 3, 1).numpy()
    elif isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"image array of shape {images.shape}: expected [N, H, W, 3]")
        arr = images
    else:
        if len(images) == 0:
            return np.zeros((0, 1, 1, 3))
        arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    return np.clip(arr.astype(np.float64), 0.0, 1.0)


def photographic_stats(images: ImageBatch) -> np.ndarray:
    """``[N, 3]`` per-image (mean HSV saturation, mean HSV value, grayscale std) — the three PVS statistics."""
    arr = as_nhwc(images)
    mx, mn = arr.max(-1), arr.min(-1)
    saturation = np.where(mx > 0, (mx - mn) / np.where(mx > 0, mx, 1.0), 0.0)
    gray = arr @ np.asarray(LUMA_601)
    return np.stack([saturation.mean((1, 2)), mx.mean((1, 2)), gray.std((1, 2))], -1)


def pvs(images: ImageBatch) -> float:
    """DivGenBench's Photographic Variance Score ``std(s) + std(v) + std(c)`` of one image set (see module
    docstring; 0 for identical images)."""
    stats = photographic_stats(images)
    if len(stats) == 0:
        raise ValueError("pvs: no images")
    return float(stats.std(0).sum())


def rows_by_prompt(prompts: Sequence[str]) -> dict[str, list[int]]:
    """Prompt -> the indices of its items, in first-seen order of the prompts."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[p].append(i)
    return dict(groups)


def _groups(prompts: Sequence[str], n: int, what: str) -> list[list[int]]:
    if isinstance(prompts, str) or len(prompts) != n:
        got = "a single string" if isinstance(prompts, str) else len(prompts)
        raise ValueError(f"{what}: expected one prompt per item ({n}), got {got}")
    kept = [rows for rows in rows_by_prompt(prompts).values() if len(rows) >= 2]
    if not kept:
        raise ValueError(f"{what}: no prompt has two or more items, so no spread can be measured")
    return kept


def pvs_per_prompt(images: ImageBatch, prompts: Sequence[str]) -> float:
    """Mean over prompts (with ≥ 2 images) of the PVS of that prompt's images."""
    stats = photographic_stats(images)
    return float(np.mean([stats[rows].std(0).sum() for rows in _groups(prompts, len(stats), "pvs_per_prompt")]))


def embedding_spread(embeds: torch.Tensor | np.ndarray, prompts: Sequence[str]) -> float:
    """Mean over prompts of ``1 − mean_{i<j} cos(e_i, e_j)`` (``1 − IDS``; 0 for identical embeddings, higher = more
    diverse). Zero vectors have cosine 0 with everything."""
    e = embeds.detach().cpu().double().numpy() if isinstance(embeds, torch.Tensor) else np.asarray(embeds, np.float64)
    if e.ndim != 2:
        raise ValueError(f"embedding_spread: embeds of shape {e.shape}: expected [N, D]")
    norm = np.linalg.norm(e, axis=1, keepdims=True)
    unit = e / np.where(norm > 0, norm, 1.0)
    out = []
    for rows in _groups(prompts, len(e), "embedding_spread"):
        sim = unit[rows] @ unit[rows].T
        upper = np.triu_indices(len(rows), k=1)
        out.append(1.0 - sim[upper].mean())
    return float(np.mean(out))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[len(a), len(b)]`` IoU of ``(x0, y0, x1, y1)`` boxes (0 where the union is empty)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0.0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0.0, None)
    inter = w * h
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0.0, None) * np.clip(x[:, 3] - x[:, 1], 0.0, None)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _hungarian_min(cost: np.ndarray) -> list[tuple[int, int]]:
    """Exact minimum-cost assignment of every row of ``cost`` (``n ≤ m``) to a distinct column (O(n²m) potentials
    algorithm)."""
    n, m = cost.shape
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    p = np.zeros(m + 1, dtype=int)  # p[j]: row (1-based) assigned to column j; column 0 is a sentinel
    way = np.zeros(m + 1, dtype=int)
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0, delta, j1 = p[j0], np.inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    cur = cost[i0 - 1, j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[p[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    return [(int(p[j]) - 1, j - 1) for j in range(1, m + 1) if p[j] > 0]


def max_weight_matching(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of a maximum-total-weight one-to-one matching of size ``min(n, m)`` (scipy's
    ``linear_sum_assignment(maximize=True)`` when installed, else :func:`_hungarian_min` on the negated weights)."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.size == 0:
        return np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        transposed = weights.shape[0] > weights.shape[1]
        pairs = _hungarian_min(-(weights.T if transposed else weights))
        rows, cols = (np.array(x, dtype=int) for x in zip(*pairs, strict=True))
        return (cols, rows) if transposed else (rows, cols)
    return linear_sum_assignment(weights, maximize=True)


def layout_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """DivGenBench's ``Sim(L_i, L_p)``: Hungarian-matched IoU sum over ``max(|L_i|, |L_p|)`` (1 for two empty
    layouts, 0 when only one is empty)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    if len(a) == 0 and len(b) == 0:
        return 1.0
    if len(a) == 0 or len(b) == 0:
        return 0.0
    iou = box_iou(a, b)
    rows, cols = max_weight_matching(iou)
    return float(iou[rows, cols].sum() / max(len(a), len(b)))


def layout_dispersion(boxes: Sequence[np.ndarray], prompts: Sequence[str]) -> float:
    """SDI: mean over prompts (with ≥ 2 images) of ``1 − mean_{i<p} Sim(L_i, L_p)``; ``boxes[i]`` is image ``i``'s
    ``(k_i, 4)`` array of ``(x0, y0, x1, y1)`` boxes (``k_i`` may be 0)."""
    out = []
    for rows in _groups(prompts, len(boxes), "layout_dispersion"):
        sims = [layout_similarity(boxes[i], boxes[p]) for i, p in combinations(rows, 2)]
        out.append(1.0 - float(np.mean(sims)))
    return float(np.mean(out))


def diversity_metrics(
    images: ImageBatch,
    prompts: Sequence[str],
    embed_fn: Callable[[ImageBatch], torch.Tensor | np.ndarray] | None = None,
    boxes_fn: Callable[[ImageBatch], Sequence[np.ndarray]] | None = None,
) -> dict[str, float]:
    """``pvs`` (:func:`pvs_per_prompt`), and with ``embed_fn`` (images → ``[N, D]``) ``embedding_spread``, with
    ``boxes_fn`` (images → per-image box arrays) ``layout_dispersion``."""
    out = {"pvs": pvs_per_prompt(images, prompts)}
    if embed_fn is not None:
        out["embedding_spread"] = embedding_spread(embed_fn(images), prompts)
    if boxes_fn is not None:
        out["layout_dispersion"] = layout_dispersion(boxes_fn(images), prompts)
    return out
