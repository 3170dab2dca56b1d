"""Diversity metrics (DivGenBench PVS, IDS-style embedding spread, SDI layout dispersion)."""

from __future__ import annotations

import colorsys
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.eval.diversity import (
    _hungarian_min,
    box_iou,
    diversity_metrics,
    embedding_spread,
    layout_dispersion,
    layout_similarity,
    max_weight_matching,
    pvs,
    pvs_per_prompt,
)
from diffalign.toy.rewards import shape_boxes
from diffalign.toy.world import ShapeSpec, render_batch, sample_specs


def _pvs_reference(images: np.ndarray) -> float:
    """Independent PVS: colorsys HSV per pixel, BT.601 luma, population std everywhere ([N, H, W, 3] in [0, 1])."""
    s, v, c = [], [], []
    for img in images:
        hsv = np.array([colorsys.rgb_to_hsv(*px) for px in img.reshape(-1, 3)])
        s.append(hsv[:, 1].mean())
        v.append(hsv[:, 2].mean())
        gray = [0.299 * r + 0.587 * g + 0.114 * b for r, g, b in img.reshape(-1, 3)]
        c.append(np.std(gray))
    return float(np.std(s) + np.std(v) + np.std(c))


def test_pvs_matches_colorsys_reference_and_input_formats() -> None:
    rng = np.random.default_rng(0)
    images = rng.random((7, 6, 5, 3))
    images[0, 0, 0] = 0.0  # a black pixel: saturation 0 by convention
    expected = _pvs_reference(images)
    assert pvs(images) == pytest.approx(expected, abs=1e-12)
    assert pvs(torch.from_numpy(images).permute(0, 3, 1, 2).float()) == pytest.approx(expected, abs=1e-6)
    as_uint8 = np.round(images * 255).astype(np.uint8)
    pil = [Image.fromarray(im) for im in as_uint8]
    assert pvs(pil) == pytest.approx(pvs(as_uint8), abs=1e-12)
    assert pvs(pil) == pytest.approx(_pvs_reference(as_uint8 / 255.0), abs=1e-12)


def test_pvs_per_prompt_is_mean_over_groups() -> None:
    rng = np.random.default_rng(1)
    images = rng.random((6, 4, 4, 3))
    prompts = ["a", "b", "a", "b", "a", "c"]  # "c" has a single image: left out
    expected = np.mean([pvs(images[[0, 2, 4]]), pvs(images[[1, 3]])])
    assert pvs_per_prompt(images, prompts) == pytest.approx(expected)
    with pytest.raises(ValueError, match="one prompt per item"):
        pvs_per_prompt(images, prompts[:3])
    with pytest.raises(ValueError, match="two or more"):
        pvs_per_prompt(images[:2], ["a", "b"])


def test_identical_sets_score_zero_everywhere() -> None:
    image = render_batch(sample_specs(1, seed=0))
    images = image.expand(4, -1, -1, -1)
    prompts = ["p"] * 4
    metrics = diversity_metrics(images, prompts, embed_fn=lambda x: x.flatten(1), boxes_fn=shape_boxes)
    assert set(metrics) == {"pvs", "embedding_spread", "layout_dispersion"}
    assert metrics["pvs"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["embedding_spread"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["layout_dispersion"] == pytest.approx(0.0, abs=1e-12)
    assert set(diversity_metrics(images, prompts)) == {"pvs"}


def test_embedding_spread_values() -> None:
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    assert embedding_spread(e[:2], ["p", "p"]) == pytest.approx(1.0)  # orthogonal
    assert embedding_spread(e[2:], ["p", "p"]) == pytest.approx(2.0)  # opposite
    # Two prompts: mean of per-prompt spreads (1 and 2).
    assert embedding_spread(e, ["a", "a", "b", "b"]) == pytest.approx(1.5)
    # Three embeddings: pairs (0,1)=0, (0,2)=1, (1,2)=0 -> mean cos 1/3.
    assert embedding_spread(e[:3], ["p"] * 3) == pytest.approx(2.0 / 3.0)


def test_box_iou_and_layout_similarity() -> None:
    a = np.array([[0, 0, 2, 2], [10, 10, 12, 12]], dtype=float)
    b = np.array([[11, 10, 13, 12], [0, 0, 2, 1]], dtype=float)  # reversed order, shifted boxes
    iou = box_iou(a, b)
    np.testing.assert_allclose(iou, [[0.0, 0.5], [1.0 / 3.0, 0.0]])
    assert layout_similarity(a, b) == pytest.approx((0.5 + 1.0 / 3.0) / 2)
    assert layout_similarity(a, a[:1]) == pytest.approx(1.0 / 2)  # one perfect match over max(2, 1)
    assert layout_similarity(np.zeros((0, 4)), np.zeros((0, 4))) == 1.0
    assert layout_similarity(a, np.zeros((0, 4))) == 0.0


def test_layout_dispersion_disjoint_and_identical() -> None:
    disjoint = [np.array([[0, 0, 4, 4]]), np.array([[5, 5, 9, 9]]), np.array([[10, 0, 14, 4]])]
    assert layout_dispersion(disjoint, ["p"] * 3) == pytest.approx(1.0)
    same = [np.array([[0, 0, 4, 4], [5, 5, 8, 8]])] * 3
    assert layout_dispersion(same, ["p"] * 3) == pytest.approx(0.0)
    assert layout_dispersion(disjoint[:2] + same[:2], ["a", "a", "b", "b"]) == pytest.approx(0.5)


def test_matching_is_exact_against_brute_force() -> None:
    rng = np.random.default_rng(2)
    for n, m in [(1, 1), (2, 3), (3, 3), (4, 2), (5, 5), (3, 6)]:
        w = rng.random((n, m))
        if n <= m:
            brute = max(sum(w[i, j] for i, j in enumerate(perm)) for perm in itertools.permutations(range(m), n))
        else:
            brute = max(sum(w[i, j] for j, i in enumerate(perm)) for perm in itertools.permutations(range(n), m))
        rows, cols = max_weight_matching(w)
        assert len(rows) == min(n, m) and len(set(rows)) == len(rows) and len(set(cols)) == len(cols)
        assert w[rows, cols].sum() == pytest.approx(brute)
        if n <= m:  # the pure-python fallback, whether or not scipy is installed
            pairs = _hungarian_min(-w)
            assert sum(w[i, j] for i, j in pairs) == pytest.approx(brute)


def test_toy_shape_boxes_feed_layout_dispersion() -> None:
    square = ShapeSpec("green", "square", cx=8.0, cy=8.0, size=4.0, background=0.2)  # covers pixels [4, 12)
    boxes = shape_boxes(render_batch([square]))
    np.testing.assert_array_equal(boxes[0], [[4, 4, 12, 12]])
    assert shape_boxes(torch.full((1, 3, 16, 16), 0.3))[0].shape == (0, 4)  # no shape visible
    specs = sample_specs(16, seed=3, colour="red", shape="circle")
    images = render_batch(specs)
    spread = layout_dispersion(shape_boxes(images), ["a red circle"] * 16)
    assert 0.5 < spread < 1.0  # random positions and sizes: mostly non-overlapping, never identical
    metrics = diversity_metrics(images, ["a red circle"] * 16, boxes_fn=shape_boxes)
    assert metrics["layout_dispersion"] == pytest.approx(spread) and metrics["pvs"] > 0
