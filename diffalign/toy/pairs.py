"""Toy preference pairs written in the Pick-a-Pic v2 parquet layout (Kirstain et al., 2023).

Columns: ``jpg_0``, ``jpg_1`` (PNG bytes; Pick-a-Pic's column names, whatever the encoding), ``label_0``,
``label_1`` (1.0 for the preferred image, 0.0 for the other; no ties), ``caption`` (the prompt), ``caption_0``,
``caption_1`` (per-image captions for DCPO), ``has_label`` and ``are_different`` (always true here).

Dual captions follow DCPO-h (Saeidi et al., arXiv 2502.06023): the winner's caption is its true
description (here the prompt), the loser's is its true description *perturbed*: its colour word replaced by one drawn
uniformly from the other colours, so the loser is never conditioned on a caption that describes it exactly (a true
description would teach the model to avoid the loser's colour even when it is asked for).

``kind="colour"`` (the prototype's construction): pair ``i`` takes ``spec = sample_spec(seed, i)``; the winner is
``spec`` rendered in its own colour, the loser the same spec (shape, position, size, background) in a wrong colour
drawn uniformly from the others; the prompt is the winner's caption. Which side holds the winner is a fair coin per
pair. All draws are keyed by ``(seed, i)`` (``diffalign.utils.randomness``), so the first ``n`` pairs do not depend
on ``n_pairs``.

``label_noise`` = p makes the labels human-like: each pair's label is flipped with probability p (the wrong colour
preferred), as annotators disagree on real preference data; images and captions are unchanged.
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from diffalign.toy.world import COLOURS, ShapeSpec, render, sample_spec
from diffalign.utils.randomness import FLIP, per_sample_randint, per_sample_uniform

PAIR_KINDS: tuple[str, ...] = ("colour", "independent", "on_policy")
LOSER_SPEC_SEED_OFFSET = 1_000_003
LOSER_COLOUR_STREAM = 20
LOSER_CAPTION_STREAM = 21
LABEL_NOISE_STREAM = 22


def png_bytes(spec: ShapeSpec) -> bytes:
    """The rendered spec as PNG bytes."""
    buffer = io.BytesIO()
    render(spec).save(buffer, format="PNG")
    return buffer.getvalue()


def other_colour(colour: str, seed: int, index: int, stream: int) -> str:
    """A colour drawn uniformly from those other than ``colour``, addressed by ``(seed, index, stream)``."""
    offset = int(per_sample_randint(len(COLOURS) - 1, seed, 0, [index], stream)[0]) + 1
    return COLOURS[(COLOURS.index(colour) + offset) % len(COLOURS)]


def recoloured(spec: ShapeSpec, seed: int, index: int, stream: int) -> ShapeSpec:
    """``spec`` in a colour drawn uniformly from the other colours, addressed by ``(seed, index, stream)``."""
    return dataclasses.replace(spec, colour=other_colour(spec.colour, seed, index, stream))


def colour_pair(seed: int, index: int) -> tuple[ShapeSpec, ShapeSpec]:
    """(winner, loser) of pair ``index``: the same spec in its right colour and in a wrong one."""
    winner = sample_spec(seed, index)
    return winner, recoloured(winner, seed, index, LOSER_COLOUR_STREAM)


def perturbed_caption(spec: ShapeSpec, seed: int, index: int) -> str:
    """DCPO-h's loser caption for pair ``index``: ``spec``'s caption with its colour swapped for another colour."""
    return recoloured(spec, seed, index, LOSER_CAPTION_STREAM).caption


def independent_pair(seed: int, index: int) -> tuple[ShapeSpec, ShapeSpec]:
    """(winner, loser) of pair ``index`` drawn independently, as two generations for one prompt are: the loser has
    the winner's shape and a wrong colour, and its own position, size and background."""
    winner, wrong = colour_pair(seed, index)
    loser = sample_spec(seed + LOSER_SPEC_SEED_OFFSET, index, colour=wrong.colour, shape=winner.shape)
    return winner, loser


PAIR_BUILDERS = {"colour": colour_pair, "independent": independent_pair}


def flipped_labels(n_pairs: int, seed: int, label_noise: float) -> list[bool]:
    """Which of the first ``n_pairs`` pairs of ``seed`` have their label flipped at ``label_noise``."""
    return (per_sample_uniform(seed, 0, range(n_pairs), LABEL_NOISE_STREAM) < label_noise).tolist()


def make_preference_pairs(
    path: str | os.PathLike,
    n_pairs: int,
    seed: int,
    kind: str = "colour",
    label_noise: float = 0.0,
    base: str | os.PathLike | None = None,
) -> Path:
    """Write ``n_pairs`` pairs of ``kind`` to the parquet file ``path`` (a fraction ``label_noise`` of them with the
    label flipped, in expectation) and return the path. ``kind="on_policy"`` samples ``base`` (default: the UNet
    base), see :mod:`diffalign.toy.on_policy_pairs`."""
    if kind not in PAIR_KINDS:
        raise ValueError(f"make_preference_pairs: kind={kind!r} is not one of {PAIR_KINDS}")
    if n_pairs < 1:
        raise ValueError(f"make_preference_pairs: n_pairs={n_pairs} must be >= 1")
    if not 0.0 <= label_noise < 0.5:
        raise ValueError(f"make_preference_pairs: label_noise={label_noise} must be in [0, 0.5)")
    if kind == "on_policy":
        from diffalign.toy.on_policy_pairs import on_policy_pairs
        from diffalign.toy.pretrain import ensure_base

        rows = on_policy_pairs(base if base is not None else ensure_base(), n_pairs, seed)
    else:
        rows = []
        for i in range(n_pairs):
            winner, loser = PAIR_BUILDERS[kind](seed, i)
            rows.append(PairRow(png_bytes(winner), png_bytes(loser), winner.caption, perturbed_caption(loser, seed, i)))
    return write_pairs(path, rows, seed, label_noise)


@dataclasses.dataclass(frozen=True)
class PairRow:
    """One pair before sides are drawn: encoded images, the prompt (the winner's caption) and the loser's caption."""

    winner: bytes
    loser: bytes
    caption: str
    loser_caption: str


def write_pairs(path: str | os.PathLike, rows: list[PairRow], seed: int, label_noise: float = 0.0) -> Path:
    """Write ``rows`` to the parquet ``path`` in the Pick-a-Pic layout: the winner's side a fair coin per pair, and
    a fraction ``label_noise`` of labels flipped (both keyed by ``(seed, i)``)."""
    n_pairs = len(rows)
    winner_on_1 = (per_sample_uniform(seed, 0, range(n_pairs), FLIP) < 0.5).tolist()
    flipped = flipped_labels(n_pairs, seed, label_noise)
    names = ("jpg_0", "jpg_1", "label_0", "label_1", "caption", "caption_0", "caption_1")
    columns: dict[str, list] = {name: [] for name in names}
    for i, row in enumerate(rows):
        sides = (row.loser, row.winner) if winner_on_1[i] else (row.winner, row.loser)
        columns["jpg_0"].append(sides[0])
        columns["jpg_1"].append(sides[1])
        preferred_on_1 = winner_on_1[i] != flipped[i]
        columns["label_0"].append(0.0 if preferred_on_1 else 1.0)
        columns["label_1"].append(1.0 if preferred_on_1 else 0.0)
        columns["caption"].append(row.caption)
        captions = (row.loser_caption, row.caption) if winner_on_1[i] else (row.caption, row.loser_caption)
        columns["caption_0"].append(captions[0])
        columns["caption_1"].append(captions[1])
    table = pa.table(
        {
            "jpg_0": pa.array(columns["jpg_0"], type=pa.binary()),
            "jpg_1": pa.array(columns["jpg_1"], type=pa.binary()),
            "label_0": pa.array(columns["label_0"], type=pa.float64()),
            "label_1": pa.array(columns["label_1"], type=pa.float64()),
            "caption": pa.array(columns["caption"], type=pa.string()),
            "caption_0": pa.array(columns["caption_0"], type=pa.string()),
            "caption_1": pa.array(columns["caption_1"], type=pa.string()),
            "has_label": pa.array([True] * n_pairs),
            "are_different": pa.array([True] * n_pairs),
        }
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path
