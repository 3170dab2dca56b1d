"""Small Pick-a-Pic-layout parquet files for tests and the toy world.

:func:`write_pickapic_parquet` writes rows (PIL images or raw bytes, labels, captions) with the Pick-a-Pic v2 column
types: ``jpg_0, jpg_1`` binary (PNG-encoded here), ``label_0, label_1`` float64, ``caption`` (and optional
``caption_0, caption_1``, or any extra column) string. :func:`make_random_pairs` makes rows of random-noise images.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

_IMAGE_COLUMNS = ("jpg_0", "jpg_1")
_LABEL_COLUMNS = ("label_0", "label_1")


def encode_png(img: Image.Image) -> bytes:
    """Lossless PNG bytes of ``img``."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_pickapic_parquet(
    path: str | Path,
    rows: Sequence[Mapping[str, Any]],
    *,
    image_struct: bool = False,
    row_group_size: int | None = None,
) -> Path:
    """Write ``rows`` as one parquet file in the Pick-a-Pic layout and return its path.

    Each row maps column names to values; ``jpg_0`` / ``jpg_1`` may be PIL images (stored as PNG), bytes (stored
    as given, so corrupt bytes can be written on purpose) or ``None``. Columns missing from a row are written as
    null; a column absent from every row is not written (to test missing-column errors). ``image_struct=True``
    stores images as ``{"bytes", "path"}`` structs, the way ``datasets.Image`` features are stored.
    """
    if not rows:
        raise ValueError("write_pickapic_parquet: rows is empty; give at least one row")
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    arrays, fields = [], []
    for col in columns:
        values = [row.get(col) for row in rows]
        if col in _IMAGE_COLUMNS:
            data = [encode_png(v) if isinstance(v, Image.Image) else v for v in values]
            if image_struct:
                typ = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
                arrays.append(pa.array([None if d is None else {"bytes": d, "path": None} for d in data], typ))
            else:
                arrays.append(pa.array(data, pa.binary()))
        elif col in _LABEL_COLUMNS:
            arrays.append(pa.array(values, pa.float64()))
        else:
            arrays.append(pa.array(values))
        fields.append(pa.field(col, arrays[-1].type))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_arrays(arrays, schema=pa.schema(fields)), path, row_group_size=row_group_size)
    return path


def random_image(size: int | tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """An RGB image of uniform random pixels; ``size`` is ``S`` or ``(width, height)``."""
    w, h = (size, size) if isinstance(size, int) else size
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), mode="RGB")


def make_random_pairs(
    n: int, size: int | tuple[int, int] = 16, seed: int = 0, *, tie_every: int | None = None
) -> list[dict[str, Any]]:
    """``n`` rows of random-noise image pairs for :func:`write_pickapic_parquet`.

    Row ``i`` has ``caption = "prompt {i}"``, ``caption_0 = "prompt {i} image 0"``, ``caption_1 = "prompt {i}
    image 1"``; labels alternate ``(1, 0)``, ``(0, 1)`` (so odd rows are swapped on load); with ``tie_every=k``
    every ``k``-th row (``i % k == k - 1``) is a tie ``(0.5, 0.5)``.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        if tie_every is not None and i % tie_every == tie_every - 1:
            labels = (0.5, 0.5)
        else:
            labels = (1.0, 0.0) if i % 2 == 0 else (0.0, 1.0)
        rows.append(
            {
                "jpg_0": random_image(size, rng),
                "jpg_1": random_image(size, rng),
                "label_0": labels[0],
                "label_1": labels[1],
                "caption": f"prompt {i}",
                "caption_0": f"prompt {i} image 0",
                "caption_1": f"prompt {i} image 1",
            }
        )
    return rows
