"""Convert between the Pick-a-Pic parquet layout and a folder of image files plus a JSONL index (our layout).

Folder layout (what ``to-folder`` writes and ``to-parquet`` reads)::

    DIR/pairs.jsonl                       one JSON object per pair, in row order
    DIR/images/000000_0.png               image files; any paths work, relative to the JSONL file's folder

    {"image_0": "images/000000_0.png", "image_1": "images/000000_1.jpg", "label_0": 1.0, "label_1": 0.0,
     "caption": "a red cat", "caption_0": "...", "caption_1": "..."}

``image_0`` / ``image_1`` become ``jpg_0`` / ``jpg_1`` (the file bytes, unchanged: no re-encoding), ``label_0`` /
``label_1`` float64 (``label_1`` defaults to ``1 - label_0``), every other key a column of its JSON type, in key
order. ``to-folder`` writes each image's bytes unchanged, with an extension from its format (``.png``, ``.jpg``,
``.webp``, ... or ``.bin`` if PIL does not know it), so parquet → folder → parquet gives back the same table when
the images are stored as bytes (``{"bytes", "path"}`` struct cells come back as plain bytes) and the other columns
are JSON types (strings, numbers, booleans, nulls).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm

from diffalign.data.parquet import check_parquet
from diffalign.data.pickapic import PreferenceDataError

INDEX_NAME = "pairs.jsonl"
_IMAGE_KEYS = {"image_0": "jpg_0", "image_1": "jpg_1"}


def _cell_bytes(cell: Any) -> bytes | None:
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return bytes(cell["bytes"])
        return Path(cell["path"]).read_bytes() if cell.get("path") else None
    return None if cell is None else bytes(cell)


def _extension(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = (img.format or "").lower()
    except Exception:  # PIL raises many types for unknown data
        return ".bin"
    return {"jpeg": ".jpg", "": ".bin"}.get(fmt, f".{fmt}")


def parquet_to_folder(parquet: str | Path, folder: str | Path) -> int:
    """Write ``folder/pairs.jsonl`` and ``folder/images/`` from one Pick-a-Pic parquet file; return the row count."""
    parquet, folder = Path(parquet), Path(folder)
    if not parquet.is_file():
        raise FileNotFoundError(f"{parquet}: no such parquet file")
    names = check_parquet(parquet, PreferenceDataError)  # unreadable, no rows, a duplicate column: said by name
    pf = pq.ParquetFile(parquet)
    missing = [c for c in _IMAGE_KEYS.values() if c not in names]
    if missing:
        raise PreferenceDataError(f"{parquet}: missing column(s) {missing}; this is not a Pick-a-Pic-layout file")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    index = folder / INDEX_NAME
    if index.exists():
        raise PreferenceDataError(f"{index}: exists; choose an empty folder or delete it")
    row = 0
    with (folder / (INDEX_NAME + ".tmp")).open("w", encoding="utf-8") as out:
        for batch in tqdm(pf.iter_batches(batch_size=64), desc=f"to-folder {parquet.name}", unit="batch"):
            for values in batch.to_pylist():
                entry: dict[str, Any] = {}
                for key, value in values.items():
                    if key in ("jpg_0", "jpg_1"):
                        data = _cell_bytes(value)
                        if data is None:
                            raise PreferenceDataError(f"{parquet}: row {row}: missing {key}; run validate")
                        rel = f"images/{row:06d}_{key[-1]}{_extension(data)}"
                        (folder / rel).write_bytes(data)
                        entry[f"image_{key[-1]}"] = rel
                    else:
                        entry[key] = value
                out.write(json.dumps(entry, ensure_ascii=False) + "\n")
                row += 1
    (folder / (INDEX_NAME + ".tmp")).replace(index)
    return row


def folder_to_parquet(source: str | Path, parquet: str | Path) -> int:
    """Write one Pick-a-Pic parquet file from a JSONL index (or a folder holding ``pairs.jsonl``)."""
    source = Path(source)
    index = source / INDEX_NAME if source.is_dir() else source
    if not index.is_file():
        raise FileNotFoundError(f"{index}: no such file; give a JSONL file or a folder with {INDEX_NAME}")
    columns: dict[str, list[Any]] = {}
    rows = 0
    for n, line in enumerate(index.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise PreferenceDataError(f"{index}: line {n}: not JSON ({err})") from err
        for key in ("image_0", "image_1", "label_0"):
            if key not in entry:
                raise PreferenceDataError(f"{index}: line {n}: missing key '{key}' (see `diffalign-data convert -h`)")
        entry.setdefault("label_1", None if entry["label_0"] is None else 1.0 - float(entry["label_0"]))
        for key in entry:
            columns.setdefault(key, [None] * rows)
        for key, values in columns.items():
            value = entry.get(key)
            if key in _IMAGE_KEYS:
                path = index.parent / value
                if not path.is_file():
                    raise PreferenceDataError(
                        f"{index}: line {n}: {key} file '{value}' not found (paths are relative to {index.parent})"
                    )
                value = path.read_bytes()
            values.append(value)
        rows += 1
    if not rows:
        raise PreferenceDataError(f"{index}: no rows")
    arrays, names = [], []
    for key, values in columns.items():
        if key in _IMAGE_KEYS:
            arrays.append(pa.array(values, pa.binary()))
        elif key in ("label_0", "label_1"):
            arrays.append(pa.array([None if v is None else float(v) for v in values], pa.float64()))
        else:
            arrays.append(pa.array(values))
        names.append(_IMAGE_KEYS.get(key, key))
    parquet = Path(parquet)
    parquet.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_arrays(arrays, names=names), parquet)
    return rows
