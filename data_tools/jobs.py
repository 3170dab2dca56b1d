"""The row transforms behind ``caption``, ``perturb``, ``perturb-prompt`` and ``hybrid`` (DCPO-c / -p / -h).

Orientation (Pick-a-Pic v2's labels, as every Diffusion-DPO script reads them): ``label_0 == 1`` → ``jpg_0`` won and the
loser is image 1; ``label_0 == 0`` → the loser is image 0. ``caption_0`` / ``caption_1`` always describe ``jpg_0`` /
``jpg_1`` (the trainer swaps them with the images). Ties (``label_0 == 0.5``) have no loser: our choice is to perturb
nothing in them, give ``perturb-prompt`` ties ``caption_0 = caption_1 = caption``, and count them in the summary
("tie"). Rows with labels outside {0, 0.5, 1} are left unchanged and counted ("bad labels, see validate").

Each ``*_process`` returns a function of a batch of :class:`~data_tools.resumable.Row` for
:func:`data_tools.resumable.run_row_job`; the models are passed in, so tests can count calls.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from data_tools.perturb import Perturber
from data_tools.resumable import Row, RowResult

Captioner = Callable[[Sequence[Image.Image], Sequence[str]], list[str]]
_MAKERS = "caption` (or `hybrid`, `perturb-prompt`)"
PRODUCER = {"caption_0": _MAKERS, "caption_1": _MAKERS}


def loser_index(label_0: Any) -> int | None | str:
    """1 or 0 for the loser's image index, ``None`` for a tie, ``"bad"`` for an invalid label."""
    if label_0 == 1.0:
        return 1
    if label_0 == 0.0:
        return 0
    if label_0 == 0.5:
        return None
    return "bad"


def decode_image(cell: Any) -> Image.Image | None:
    """An RGB image from a Pick-a-Pic image cell (bytes or ``{"bytes", "path"}``), or ``None`` if unreadable."""
    if isinstance(cell, dict):
        cell = cell.get("bytes") or (Path(cell["path"]).read_bytes() if cell.get("path") else None)
    if not cell:
        return None
    try:
        with Image.open(io.BytesIO(cell)) as img:
            return img.convert("RGB")
    except Exception:  # PIL raises many types for corrupt data
        return None


def caption_process(captioner: Captioner, *, prompt_column: str | None) -> Callable[[list[Row]], list[RowResult]]:
    """Caption both images of every row into ``caption_0`` / ``caption_1`` (one captioner call per batch)."""

    def process(rows: list[Row]) -> list[RowResult]:
        images, prompts, owners = [], [], []
        results: list[RowResult | None] = [None] * len(rows)
        for i, row in enumerate(rows):
            pair = [decode_image(row.values[c]) for c in ("jpg_0", "jpg_1")]
            if any(img is None for img in pair):
                results[i] = RowResult(skipped="missing or undecodable image, see validate")
                continue
            prompt = str(row.values.get(prompt_column) or "") if prompt_column else ""
            images += pair
            prompts += [prompt, prompt]
            owners.append(i)
        captions = captioner(images, prompts) if images else []
        for k, i in enumerate(owners):
            results[i] = RowResult({"caption_0": captions[2 * k], "caption_1": captions[2 * k + 1]})
        return [r for r in results if r is not None]

    return process


def _perturb_many(perturber: Perturber, texts: list[str], rows: list[int]) -> list[str | None]:
    outs = perturber(texts, rows) if texts else []
    return [o if o and o.strip() else None for o in outs]


def perturb_process(perturber: Perturber, column: str) -> Callable[[list[Row]], list[RowResult]]:
    """Perturb ``column`` in place, or with ``column="loser"`` the loser's own caption (``caption_0``/``_1``)."""

    def process(rows: list[Row]) -> list[RowResult]:
        results: list[RowResult | None] = [None] * len(rows)
        targets, texts, indices = [], [], []
        for i, row in enumerate(rows):
            target = column
            if column == "loser":
                loser = loser_index(row.values["label_0"])
                if loser is None or loser == "bad":
                    results[i] = RowResult(skipped="tie" if loser is None else "bad labels, see validate")
                    continue
                target = f"caption_{loser}"
            text = row.values[target]
            if not isinstance(text, str) or not text.strip():
                results[i] = RowResult(skipped=f"empty {target}")
                continue
            targets.append((i, target))
            texts.append(text)
            indices.append(row.index)
        for (i, target), new in zip(targets, _perturb_many(perturber, texts, indices), strict=True):
            results[i] = RowResult({target: new}) if new is not None else RowResult(skipped="nothing to perturb")
        return [r for r in results if r is not None]

    return process


def perturb_prompt_process(
    perturber: Perturber, prompt_column: str = "caption"
) -> Callable[[list[Row]], list[RowResult]]:
    """DCPO-p: the winner's caption is the prompt, the loser's a perturbed prompt."""

    def process(rows: list[Row]) -> list[RowResult]:
        results: list[RowResult | None] = [None] * len(rows)
        pending, texts, indices = [], [], []
        for i, row in enumerate(rows):
            prompt = row.values[prompt_column]
            loser = loser_index(row.values["label_0"])
            if not isinstance(prompt, str) or not prompt.strip():
                results[i] = RowResult(skipped=f"empty {prompt_column}")
            elif loser == "bad":
                results[i] = RowResult(skipped="bad labels, see validate")
            elif loser is None:
                results[i] = RowResult({"caption_0": prompt, "caption_1": prompt}, skipped="tie")
            else:
                pending.append((i, loser, prompt))
                texts.append(prompt)
                indices.append(row.index)
        for (i, loser, prompt), new in zip(pending, _perturb_many(perturber, texts, indices), strict=True):
            if new is None:
                results[i] = RowResult({"caption_0": prompt, "caption_1": prompt}, skipped="nothing to perturb")
            else:
                results[i] = RowResult({f"caption_{loser}": new, f"caption_{1 - loser}": prompt})
        return [r for r in results if r is not None]

    return process


def hybrid_process(captioner: Captioner, perturber: Perturber, *, prompt_column: str | None
                   ) -> Callable[[list[Row]], list[RowResult]]:  # fmt: skip
    """DCPO-h: caption both images, then perturb the loser's caption (ties: captions only)."""
    captions = caption_process(captioner, prompt_column=prompt_column)

    def process(rows: list[Row]) -> list[RowResult]:
        results = captions(rows)
        pending, texts, indices = [], [], []
        for i, (row, result) in enumerate(zip(rows, results, strict=True)):
            if result.skipped is not None:
                continue
            loser = loser_index(row.values["label_0"])
            if loser is None or loser == "bad":
                results[i] = RowResult(result.values, skipped="tie" if loser is None else "bad labels, see validate")
                continue
            pending.append((i, loser))
            texts.append(result.values[f"caption_{loser}"])
            indices.append(row.index)
        for (i, loser), new in zip(pending, _perturb_many(perturber, texts, indices), strict=True):
            if new is None:
                results[i] = RowResult(results[i].values, skipped="nothing to perturb")
            else:
                results[i] = RowResult({**results[i].values, f"caption_{loser}": new})
        return results

    return process
