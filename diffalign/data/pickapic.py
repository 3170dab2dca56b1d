"""Read, validate and orient Pick-a-Pic-layout preference pairs.

Layout (Pick-a-Pic v2, ``yuvalkirstain/pickapic_v2``): ``jpg_0, jpg_1`` image bytes (or ``{"bytes", "path"}``
structs, as ``datasets.Image`` stores them), ``label_0, label_1`` floats with ``label_0 + label_1 = 1``
(1/0: image 0 preferred, 0/1: image 1 preferred, 0.5/0.5: tie), ``caption``; for DCPO also ``caption_0, caption_1``
(each image's own caption, as DCPO's Pick-Double Caption data has them).

Rules, as in the original Diffusion-DPO script (``SalesforceAIResearch/DiffusionDPO`` ``train.py``):

* ties (``label_0 == 0.5``) are dropped unless ``keep_ties=True``; a kept tie has ``jpg_0`` as its winner, as in the
  diffusers copies of the script;
* orientation: the winner comes first, i.e. the pair (and, in dual-caption mode, its two captions) is swapped when
  ``label_0 == 0``.

Every row is validated once, at load time (labels, caption, and every image decoded: :func:`image_decode_problem`),
so a bad row is reported before training starts; the decoded pixels are not kept, a sample decodes its images again
when it is read. A file with no rows or with a column name twice is refused by name (:mod:`diffalign.data.parquet`).
What is checked, how bad rows are handled and what the checks cost: docs/data-validation.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError

from diffalign.data.parquet import check_parquet
from diffalign.errors import DiffalignError

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("jpg_0", "jpg_1")
LABEL_COLUMNS = ("label_0", "label_1")
DUAL_CAPTION_COLUMNS = ("caption_0", "caption_1")
VALID_LABELS = (0.0, 0.5, 1.0)
KNOWN_SPLITS = ("train", "validation", "valid", "val", "dev", "test", "validation_unique", "test_unique")
_READ_BATCH_ROWS = 4  # rows of encoded images (Pick-a-Pic: ~1 MB each) held, and decoded in parallel, at once
_HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


class PreferenceDataError(DiffalignError, ValueError):
    """Base class of the data errors below."""


class BadRowError(PreferenceDataError):
    """A row failed validation (message ``"{file}: row {i}: {reason}"``)."""


class MissingColumnError(PreferenceDataError):
    """A source lacks a required column."""


class DataNotFoundError(PreferenceDataError, FileNotFoundError):
    """``data.path`` (or a file it names) does not exist or holds no data files."""


@dataclass(frozen=True)
class PreferenceRecord:
    """One kept pair, winner first.

    ``original_index`` counts rows over the whole source (all files in sorted order); ``file`` and ``row`` locate
    the row as a user would open it (``row`` is 0-based within ``file``). Image bytes are not held: the table reads
    them on demand (:meth:`PreferenceTable.image_bytes`), so memory does not grow with the data set.
    """

    prompt_chosen: str
    prompt_rejected: str
    caption: str
    label_0: float
    swapped: bool
    original_index: int
    file: str
    row: int
    part: int = 0

    @property
    def is_tie(self) -> bool:
        return self.label_0 == 0.5


@dataclass
class PreferenceTable:
    """The kept, oriented pairs of one source, with what was dropped and why."""

    records: list[PreferenceRecord]
    source: str
    split: str
    dual_captions: bool
    num_rows_read: int
    num_ties_dropped: int
    skipped: dict[str, int] = field(default_factory=dict)
    source_fingerprint: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    row_sources: list[_ArrowRows] = field(default_factory=list, repr=False)
    images_verified: bool = True  # False: loaded with verify_images=False (labels and captions checked only)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> PreferenceRecord:
        return self.records[i]

    @property
    def fingerprint(self) -> str:
        """Stable hash of the source (file names, sizes, mtimes; or hub name, split and the ``datasets``
        fingerprint) and of the loading options: a cache key component."""
        blob = json.dumps({"source": self.source_fingerprint, "options": self.options}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def restricted_to(self, source_rows: Sequence[int]) -> PreferenceTable | None:
        """The table of the records whose ``original_index`` is in ``source_rows``, in that order, or ``None`` if
        some row is not among this table's records (used to match a latent cache's pairs without reading images)."""
        by_row = {rec.original_index: rec for rec in self.records}
        if any(r not in by_row for r in source_rows):
            return None
        return replace(self, records=[by_row[r] for r in source_rows])

    def image_bytes(self, i: int) -> tuple[bytes, bytes]:
        """The encoded (winner, loser) images of pair ``i``, read from the source now."""
        rec = self.records[i]
        cells = self.row_sources[rec.part].row(rec.row)
        data = []
        for col in IMAGE_COLUMNS:
            value, problem = image_cell_bytes(cells[col], col, verify=False)
            if problem is not None:
                raise BadRowError(f"{rec.file}: row {rec.row}: {problem} (the source changed after loading?)")
            data.append(value)
        return (data[1], data[0]) if rec.swapped else (data[0], data[1])

    def decode_pair(self, i: int) -> tuple[Image.Image, Image.Image]:
        """The (winner, loser) images of pair ``i`` as RGB PIL images; :class:`BadRowError` if one does not
        decode."""
        rec = self.records[i]
        chosen, rejected = self.image_bytes(i)
        return self._decode_rgb(chosen, rec, "chosen"), self._decode_rgb(rejected, rec, "rejected")

    def _decode_rgb(self, data: bytes, rec: PreferenceRecord, side: str) -> Image.Image:
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.mode == "RGB":  # convert() would copy the decoded image once more (~0.5 ms at 768 px)
                    img.load()
                    return img
                return img.convert("RGB")
        except Exception as err:  # PIL raises many types for corrupt data
            column = IMAGE_COLUMNS[(side == "rejected") != rec.swapped]
            changed = ", though it did at load time (did the source change?)" if self.images_verified else ""
            raise BadRowError(
                f"{rec.file}: row {rec.row}: the {side} image ({column}) does not decode ({err}){changed}; re-encode "
                "or drop this row, or set data.on_bad_row=skip"
            ) from err


# -- sources ---------------------------------------------------------------------------------------------------------


@dataclass
class _Part:
    """One file (or hub split) of a source: its display name, its columns and its rows."""

    name: str
    columns: list[str]
    fingerprint: Any
    rows: _ArrowRows


class _ArrowRows:
    """Rows of one part through a memory-mapped ``datasets`` table: streamed in batches (the validation pass) and
    read one at a time (images during training).

    A parquet file is converted once by ``datasets.Dataset.from_parquet`` (an Arrow copy in the ``datasets`` cache,
    as diffusers' script gets from ``load_dataset``) and opened on first use, again in each DataLoader worker, so
    resident memory holds the pages read, not decoded copies of the data set.
    """

    def __init__(self, parquet_path: str | None = None, dataset: Any = None) -> None:
        self._path, self._dataset, self._images = parquet_path, dataset, None

    def __getstate__(self) -> dict[str, Any]:
        return {"_path": self._path, "_dataset": self._dataset if self._path is None else None, "_images": None}

    def dataset(self) -> Any:
        if self._dataset is None:
            import datasets

            # the Arrow copy takes a moment; its "Generating train split" bar would only clutter the CLI output
            was_enabled = datasets.is_progress_bar_enabled()
            datasets.disable_progress_bars()
            try:
                self._dataset = datasets.Dataset.from_parquet(self._path)
            finally:
                if was_enabled:
                    datasets.enable_progress_bars()
        return self._dataset

    def batches(self, columns: Sequence[str]) -> Iterator[list[dict[str, Any]]]:
        table = self.dataset().select_columns(list(columns)).with_format("arrow")
        for batch in table.iter(batch_size=_READ_BATCH_ROWS):
            yield batch.to_pylist()

    def row(self, i: int) -> dict[str, Any]:
        """The image cells of row ``i``."""
        if self._images is None:
            dataset = self.dataset().select_columns(list(IMAGE_COLUMNS))
            if getattr(dataset, "_indices", None) is not None:  # a selected or shuffled view: rows in logical order
                dataset = dataset.flatten_indices()
            self._images = {c: dataset.data.table.column(c) for c in IMAGE_COLUMNS}
        return {c: column[i].as_py() for c, column in self._images.items()}


def _belongs_to_split(rel: Path, split: str) -> bool:
    stem = rel.name[: -len(".parquet")]
    return stem == split or stem.startswith(split + "-") or split in rel.parts[:-1]


def resolve_parquet_files(folder: Path, split: str) -> list[Path]:
    """The parquet files of ``split`` under ``folder``, sorted by relative path.

    A file belongs to a split when its name is ``{split}.parquet`` or starts with ``{split}-`` (hub shards such as
    ``train-00000-of-00645.parquet``) or when a folder on its path is named ``{split}``. If no file names any known
    split, every parquet file is used.
    """
    files = sorted(
        (p for p in folder.rglob("*.parquet") if not any(part.startswith(".") for part in p.relative_to(folder).parts)),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise DataNotFoundError(f"{folder}: no .parquet files in this folder; point data.path at Pick-a-Pic parquet")
    rel = [p.relative_to(folder) for p in files]
    chosen = [p for p, r in zip(files, rel, strict=True) if _belongs_to_split(r, split)]
    if chosen:
        return chosen
    named = sorted({s for r in rel for s in KNOWN_SPLITS if _belongs_to_split(r, s)})
    if named:
        raise DataNotFoundError(
            f"{folder}: no parquet files for split '{split}' (files are named for splits {named}); "
            f"set data.split to one of them"
        )
    return files


def _parquet_part(path: Path) -> _Part:
    columns = check_parquet(path, PreferenceDataError)  # reads the footer: a bad, empty or ambiguous file fails here
    stat = path.stat()
    fingerprint = [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
    return _Part(str(path), columns, fingerprint, _ArrowRows(parquet_path=str(path)))


def _hub_part(name: str, split: str) -> _Part:
    import datasets  # imported only when a hub name is given: the hub is contacted only then

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:
        raise DataNotFoundError(
            f"'{name}' is not an existing local path, and datasets.load_dataset('{name}', split='{split}') failed: "
            f"{err}"
        ) from err

    fingerprint = [name, split, getattr(ds, "_fingerprint", None)]
    return _Part(f"{name}[{split}]", list(ds.column_names), fingerprint, _ArrowRows(dataset=ds))


def _open_source(source: str, split: str) -> list[_Part]:
    path = Path(source).expanduser()
    if path.is_file():
        return [_parquet_part(path)]
    if path.is_dir():
        return [_parquet_part(p) for p in resolve_parquet_files(path, split)]
    if source.endswith(".parquet") or source.startswith(("/", ".", "~")) or not _HUB_NAME.match(source):
        raise DataNotFoundError(f"{source}: no such file or folder (expected a parquet file or a folder of them)")
    return [_hub_part(source, split)]


# -- validation ------------------------------------------------------------------------------------------------------


def image_decode_problem(data: bytes) -> str | None:
    """PIL's reason why ``data`` does not decode as an image, or ``None`` if it does.

    All of the data is decoded: a JPEG at 1/8 scale (``Image.draft``: libjpeg still reads every entropy-coded byte,
    so a truncated file fails as at full size, and corrupt data fails iff a full decode would; tests/test_bad_data.py),
    anything else in full (``load``). ``Image.verify`` alone does not decode JPEG data: a truncated JPEG passes it.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format in ("JPEG", "MPO"):
                img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except UnidentifiedImageError:
        return "not an image format PIL reads"
    except Exception as err:  # PIL raises many types for corrupt data
        return str(err) or type(err).__name__
    return None


def image_cell_bytes(value: Any, column: str, verify: bool = True) -> tuple[bytes | None, str | None]:
    """Bytes of an image cell (raw bytes or a ``{"bytes", "path"}`` struct), or ``(None, skip reason)``; with
    ``verify`` the image must decode (:func:`image_decode_problem`)."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None and value.get("path"):
            try:
                data = Path(value["path"]).read_bytes()
            except OSError:
                return None, f"unreadable {column} path"
        value = data
    if value is None or len(value) == 0:
        return None, f"missing {column}"
    if not isinstance(value, bytes | bytearray):
        return None, f"{column} is not image bytes"
    if verify and image_decode_problem(value) is not None:
        return None, f"undecodable {column}"
    return bytes(value), None


def _label_problem(label_0: Any, label_1: Any) -> str | None:
    for name, value in zip(LABEL_COLUMNS, (label_0, label_1), strict=True):
        if value is None:
            return f"{name} is null"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"{name} is not a number"
        if float(value) not in VALID_LABELS:
            return f"{name}={float(value):g}"
    if float(label_0) + float(label_1) != 1.0:
        return f"label_0+label_1={float(label_0) + float(label_1):g}"
    return None


def _caption_problem(value: Any, column: str) -> str | None:
    if not isinstance(value, str):
        return f"{column} is not a string"
    if not value.strip():
        return f"empty {column}"
    return None


# -- loading ---------------------------------------------------------------------------------------------------------


def load_preference_table(
    source: str,
    *,
    split: str = "train",
    keep_ties: bool = False,
    on_bad_row: Literal["error", "skip"] = "error",
    caption_column: str = "caption",
    dual_captions: bool = False,
    max_samples: int | None = None,
    verify_images: bool = True,
) -> PreferenceTable:
    """Load preference pairs from a parquet file, a folder of parquet files, or a ``datasets`` hub name.

    Args:
        source: a ``.parquet`` file; a folder of them (see :func:`resolve_parquet_files` for how ``split`` picks
            files); or a hub name, loaded with ``datasets.load_dataset(source, split=split)`` — only then is the
            hub contacted.
        keep_ties: keep ``label_0 == 0.5`` rows (``jpg_0`` becomes the winner); dropped and counted otherwise.
        on_bad_row: ``"error"`` raises :class:`BadRowError` ``"{file}: row {i}: {reason}"`` on the first bad row;
            ``"skip"`` drops bad rows, counts them by reason in ``table.skipped`` and logs one summary line.
        caption_column: the shared prompt column (required unless ``dual_captions``).
        dual_captions: DCPO mode: ``caption_0, caption_1`` are required and become ``prompt_chosen`` /
            ``prompt_rejected`` (swapped with the images).
        max_samples: stop after this many kept pairs (the first ones in source order).
        verify_images: ``False`` reads only the label and caption columns, so no image byte is touched (what a run
            whose latent cache covers the data needs: see :func:`diffalign.data.cache.build_preference_cache`);
            ``table.images_verified`` records the choice. It is not a loading option: the fingerprint is the same.

    A row is bad when an image is missing or does not decode (:func:`image_decode_problem`), a label is not in
    {0, 0.5, 1} or ``label_0 + label_1 != 1``, or a used caption is empty or blank. Ties are recognised before the
    caption and image checks, so a dropped tie is never reported as bad. A file with no rows or a duplicate column
    name raises :class:`PreferenceDataError` (``FILE: no rows`` / ``FILE: duplicate column 'caption'``).
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row={on_bad_row!r}: use 'error' or 'skip'")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples={max_samples}: must be a positive number of pairs, or None for all")
    parts = _open_checked(source, split, caption_column, dual_captions)
    records: list[PreferenceRecord] = []
    skipped: Counter[str] = Counter()
    ties = 0
    rows_read = 0
    for report in _row_reports(parts, caption_column, dual_captions, verify_images=verify_images):
        rows_read += 1
        if report.is_tie and not keep_ties:
            ties += 1
        elif report.problem is not None:
            if on_bad_row == "error":
                raise BadRowError(
                    f"{report.file}: row {report.row}: {report.problem}; fix or remove the row, or set "
                    "data.on_bad_row=skip"
                )
            skipped[report.problem] += 1
        else:
            records.append(report.record)
            if max_samples is not None and len(records) >= max_samples:
                break

    name = parts[0].name if len(parts) == 1 else f"{source} ({len(parts)} files)"
    if skipped:
        detail = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
        logger.warning("skipped %d of %d rows in %s: %s", sum(skipped.values()), rows_read, name, detail)
    if ties:
        logger.info(
            "dropped %d ties (label_0 == 0.5) of %d rows in %s; keep them with keep_ties", ties, rows_read, name
        )
    if not records:
        raise PreferenceDataError(
            f"{name}: no usable pairs among {rows_read} rows ({ties} ties dropped, {sum(skipped.values())} bad rows "
            f"skipped); check the data or set keep_ties"
        )
    options = {
        "split": split,
        "keep_ties": keep_ties,
        "on_bad_row": on_bad_row,
        "caption_column": caption_column,
        "dual_captions": dual_captions,
        "max_samples": max_samples,
    }
    return PreferenceTable(
        records=records,
        source=source,
        split=split,
        dual_captions=dual_captions,
        num_rows_read=rows_read,
        num_ties_dropped=ties,
        skipped=dict(skipped),
        source_fingerprint=json.dumps([p.fingerprint for p in parts]),
        options=options,
        row_sources=[part.rows for part in parts],
        images_verified=verify_images,
    )


@dataclass(frozen=True)
class RowReport:
    """One row of a source as :func:`audit_rows` sees it: ``problem`` is None for a usable row."""

    file: str
    row: int
    problem: str | None
    is_tie: bool
    record: PreferenceRecord | None
    images: tuple[bytes, bytes] | None = None  # (winner, loser), verified; only while streaming


def audit_rows(
    source: str, *, split: str = "train", caption_column: str = "caption", dual_captions: bool = False
) -> Iterator[RowReport]:
    """Check every row of ``source`` with the same rules as :func:`load_preference_table` and yield one
    :class:`RowReport` per row, ties included (for ``diffalign-data validate`` / ``stats``). Raises
    :class:`MissingColumnError` if a file lacks a required column."""
    yield from _row_reports(_open_checked(source, split, caption_column, dual_captions), caption_column, dual_captions)


def _open_checked(source: str, split: str, caption_column: str, dual_captions: bool) -> list[_Part]:
    parts = _open_source(source, split)
    for part in parts:
        missing = [c for c in _required_columns(caption_column, dual_captions) if c not in part.columns]
        if missing:
            raise MissingColumnError(
                f"{part.name}: missing column(s) {missing}; columns present: {part.columns}"
                + ("" if dual_captions else "; set data.caption_column if the captions have another name")
            )
    return parts


def _required_columns(caption_column: str, dual_captions: bool) -> tuple[str, ...]:
    return (*IMAGE_COLUMNS, *LABEL_COLUMNS, *(DUAL_CAPTION_COLUMNS if dual_captions else (caption_column,)))


def _row_reports(
    parts: Sequence[_Part], caption_column: str, dual_captions: bool, *, verify_images: bool = True
) -> Iterator[RowReport]:
    required = _required_columns(caption_column, dual_captions)
    if not verify_images:
        required = tuple(c for c in required if c not in IMAGE_COLUMNS)
    optional = caption_column if dual_captions else None
    with ThreadPoolExecutor(_decode_threads()) if verify_images else nullcontext() as pool:
        for part_index, first_row, first_global, batch in _iter_batches(parts, required, optional):
            name = parts[part_index].name
            images = _read_images(batch, pool) if pool is not None else [None] * len(batch)
            for k, (values, cells) in enumerate(zip(batch, images, strict=True)):
                row = first_row + k
                rec, pair, reason, is_tie = _check_row(
                    values, cells, name, part_index, row, first_global + k, caption_column, dual_captions
                )
                yield RowReport(file=name, row=row, problem=reason, is_tie=is_tie, record=rec, images=pair)


def _decode_threads() -> int:
    """Threads that decode a batch's images (PIL releases the GIL while decoding): one per image, at most one per
    CPU this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, _READ_BATCH_ROWS * len(IMAGE_COLUMNS)))


#: an image column's (bytes, None) or (None, reason)
ImageCells = dict[str, tuple[bytes | None, str | None]]


def _read_images(batch: Sequence[dict[str, Any]], pool: ThreadPoolExecutor) -> list[ImageCells]:
    """Each row's image cells read (struct paths too) and decoded, the batch's images in parallel on ``pool``."""
    cells = [{col: image_cell_bytes(values[col], col, verify=False) for col in IMAGE_COLUMNS} for values in batch]
    jobs = [(k, col, data) for k, row in enumerate(cells) for col, (data, _) in row.items() if data is not None]
    problems = pool.map(image_decode_problem, [data for _, _, data in jobs])
    for (k, col, _), problem in zip(jobs, problems, strict=True):
        if problem is not None:
            cells[k][col] = (None, f"undecodable {col}")
    return cells


def _iter_batches(
    parts: Sequence[_Part], required: Sequence[str], optional_caption: str | None
) -> Iterator[tuple[int, int, int, list[dict[str, Any]]]]:
    """Yield ``(part index, first row within part, first row within source, rows' values)`` for every batch of
    rows, reading only needed columns."""
    global_row = 0
    for part_index, part in enumerate(parts):
        columns = list(required)
        if optional_caption is not None and optional_caption in part.columns:
            columns.append(optional_caption)
        row = 0
        for batch in part.rows.batches(columns):
            yield part_index, row, global_row, batch
            row += len(batch)
            global_row += len(batch)


def _check_row(
    values: dict[str, Any],
    images: ImageCells | None,
    file: str,
    part: int,
    row: int,
    global_row: int,
    caption_column: str,
    dual: bool,
) -> tuple[PreferenceRecord | None, tuple[bytes, bytes] | None, str | None, bool]:
    """Validate one row: ``(record, (winner bytes, loser bytes), None, is_tie)`` if good, ``(None, None, reason,
    is_tie)`` if bad; ``images`` are the row's checked image cells (:func:`_read_images`), or ``None`` when images
    are not verified (the bytes are then ``None``)."""
    label_0, label_1 = values["label_0"], values["label_1"]
    problem = _label_problem(label_0, label_1)
    if problem is not None:
        return None, None, problem, False
    is_tie = float(label_0) == 0.5
    caption_cols = DUAL_CAPTION_COLUMNS if dual else (caption_column,)
    for col in caption_cols:
        problem = _caption_problem(values[col], col)
        if problem is not None:
            return None, None, problem, is_tie
    data = []
    for col in IMAGE_COLUMNS if images is not None else ():
        value, problem = images[col]
        if problem is not None:
            return None, None, problem, is_tie
        data.append(value)
    swap = float(label_0) == 0.0
    captions = [values[c] for c in DUAL_CAPTION_COLUMNS] if dual else [values[caption_column]] * 2
    if swap:
        data.reverse()
        captions.reverse()
    pair = (data[0], data[1]) if data else None
    caption = values.get(caption_column) if dual else values[caption_column]
    rec = PreferenceRecord(
        prompt_chosen=captions[0],
        prompt_rejected=captions[1],
        caption=caption if isinstance(caption, str) else captions[0],
        label_0=float(label_0),
        swapped=swap,
        original_index=global_row,
        file=file,
        row=row,
        part=part,
    )
    return rec, pair, None, is_tie
