"""Resumable, batched row transforms of one Pick-a-Pic parquet file (our design; no paper prescribes it).

:func:`run_row_job` reads ``INPUT`` in batches of rows, calls ``process(batch)`` for the rows not yet done and
appends one JSON line per finished row to ``<OUTPUT>.partial.jsonl``::

    {"header": {"job": "caption", "input": ..., "options": {...}}}     # first line: what this file belongs to
    {"row": 12, "values": {"caption_0": "...", "caption_1": "..."}}     # a row with new column values
    {"row": 13, "values": {}, "skipped": "tie"}                         # a row left unchanged, and why

A rerun with the same job and options skips the rows already in the partial file (a last line cut short by a kill
is ignored and recomputed); a rerun with other options stops with an error rather than mixing results. When every
row is done, the input's columns are copied unchanged (Arrow types and bytes as read) with the new columns set or
replaced, written to ``OUTPUT`` (through a temporary file, then renamed) and the partial file is removed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from diffalign.data.parquet import check_parquet
from diffalign.data.pickapic import PreferenceDataError


@dataclass(frozen=True)
class Row:
    """One input row handed to a job: its 0-based index in the file and the cells of the columns it reads."""

    index: int
    values: dict[str, Any]


@dataclass(frozen=True)
class RowResult:
    """New column values of one row; ``skipped`` (a short reason) marks a row whose columns are left unchanged."""

    values: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None


@dataclass
class JobSummary:
    rows: int = 0
    done: int = 0
    resumed: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    output: str = ""

    def text(self, job: str) -> str:
        skipped = sum(self.skipped.values())
        detail = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common()) or "none"
        return (
            f"{job}: {self.rows} rows in {self.output}; {self.done} computed in this run, {self.resumed} resumed from "
            f"an earlier run; {skipped} left unchanged ({detail}); {self.seconds:.1f} s."
        )


def partial_path(output: str | Path) -> Path:
    """The append-only progress file of ``output``."""
    return Path(f"{output}.partial.jsonl")


def open_input(path: str | Path, needed: Sequence[str], producer: dict[str, str] | None = None) -> pq.ParquetFile:
    """Open ``path`` as one parquet file and check it has the ``needed`` columns.

    ``producer`` maps a column to the subcommand that makes it, for the error message.
    """
    path = Path(path)
    if path.is_dir():
        raise PreferenceDataError(f"{path}: is a folder; these subcommands take one .parquet file (run once per file)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a Pick-a-Pic-layout .parquet file)")
    names = check_parquet(path, PreferenceDataError)  # unreadable, no rows, a duplicate column: said by name
    pf = pq.ParquetFile(path)
    for col in needed:
        if col not in names:
            hint = (producer or {}).get(col)
            how = f"; run `diffalign-data {hint}` first to make it" if hint else ""
            raise PreferenceDataError(f"{path}: missing column '{col}' (columns present: {names}){how}")
    return pf


def _read_partial(path: Path, header: dict[str, Any]) -> dict[int, RowResult]:
    done: dict[int, RowResult] = {}
    if not path.exists():
        return done
    text = path.read_text(encoding="utf-8")
    complete = text.rfind("\n") + 1
    if complete < len(text):  # a last line cut short by a kill: drop it, that row is recomputed
        with path.open("r+", encoding="utf-8") as f:
            f.truncate(len(text[:complete].encode("utf-8")))
    for n, line in enumerate(text[:complete].splitlines()):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise PreferenceDataError(f"{path}: line {n + 1} is not JSON ({err}); delete it to start over") from err
        if n == 0:
            if entry.get("header") != header:
                raise PreferenceDataError(
                    f"{path}: progress of another job or other options ({entry.get('header')}); rerun with the same "
                    "options, or delete this file to start over"
                )
            continue
        done[int(entry["row"])] = RowResult(entry.get("values", {}), entry.get("skipped"))
    return done


def run_row_job(
    input_path: str | Path,
    output_path: str | Path,
    *,
    job: str,
    options: dict[str, Any],
    read_columns: Sequence[str],
    new_columns: Sequence[str],
    process: Callable[[list[Row]], list[RowResult]],
    batch_size: int = 8,
    producer: dict[str, str] | None = None,
) -> JobSummary:
    """Run ``process`` over every row of ``input_path`` not yet in the partial file, then write ``output_path``.

    ``process`` gets up to ``batch_size`` rows (only ``read_columns``) and returns one :class:`RowResult` per row;
    its values may set only ``new_columns`` (strings). An exception inside ``process`` leaves the rows finished so
    far in the partial file, so a rerun starts at the failed batch.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: must be at least 1")
    start = time.perf_counter()
    input_path, output_path = Path(input_path), Path(output_path)
    if input_path.resolve() == output_path.resolve():
        raise PreferenceDataError(f"{output_path}: the output must differ from the input")
    pf = open_input(input_path, read_columns, producer)
    header = {"job": job, "input": str(input_path.resolve()), "options": options}
    progress = partial_path(output_path)
    done = _read_partial(progress, header)
    summary = JobSummary(rows=pf.metadata.num_rows, resumed=len(done), output=str(output_path))
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with progress.open("a", encoding="utf-8") as log, tqdm(
        total=summary.rows, initial=len(done), desc=f"{job} {input_path.name}", unit="row", file=sys.stderr
    ) as bar:
        if not done and progress.stat().st_size == 0:
            log.write(json.dumps({"header": header}) + "\n")
            log.flush()
        index = 0
        for record_batch in pf.iter_batches(batch_size=batch_size, columns=list(read_columns)):
            rows = [Row(index + i, values) for i, values in enumerate(record_batch.to_pylist())]
            index += len(rows)
            todo = [row for row in rows if row.index not in done]
            if not todo:
                continue
            results = process(todo)
            if len(results) != len(todo):
                raise RuntimeError(f"{job}: process returned {len(results)} results for {len(todo)} rows")
            for row, result in zip(todo, results, strict=True):
                unknown = set(result.values) - set(new_columns)
                if unknown:
                    raise RuntimeError(f"{job}: result sets columns {sorted(unknown)} outside {list(new_columns)}")
                entry = {"row": row.index, "values": result.values}
                if result.skipped is not None:
                    entry["skipped"] = result.skipped
                log.write(json.dumps(entry) + "\n")
                done[row.index] = result
                summary.done += 1
            log.flush()
            os.fsync(log.fileno())
            bar.update(len(todo))
    for result in done.values():
        if result.skipped is not None:
            summary.skipped[result.skipped] += 1
    _assemble(pf, output_path, new_columns, done)
    progress.unlink()
    summary.seconds = time.perf_counter() - start
    return summary


def _assemble(pf: pq.ParquetFile, output: Path, new_columns: Sequence[str], done: dict[int, RowResult]) -> None:
    """Copy every input column as read, with ``new_columns`` set from ``done`` (or kept, if present and not set)."""
    schema = pf.schema_arrow
    fields = list(schema)
    for col in new_columns:
        if col in schema.names:
            fields[schema.get_field_index(col)] = pa.field(col, pa.string())
        else:
            fields.append(pa.field(col, pa.string()))
    out_schema = pa.schema(fields, metadata=schema.metadata)
    tmp = output.with_name(output.name + ".tmp")
    index = 0
    with pq.ParquetWriter(tmp, out_schema) as writer:
        for batch in pf.iter_batches(batch_size=256):
            n = batch.num_rows
            arrays = {name: batch.column(name) for name in batch.schema.names}
            for col in new_columns:
                old = arrays[col].to_pylist() if col in arrays else [None] * n
                values = [done[index + i].values.get(col, old[i]) for i in range(n)]
                arrays[col] = pa.array(values, pa.string())
            writer.write_table(pa.Table.from_arrays([arrays[f.name] for f in out_schema], schema=out_schema))
            index += n
    tmp.replace(output)
