"""Text preference data for causal LMs, in TRL's layouts, standard (strings) or conversational (chat messages).

Layouts (the loss's registry kind picks one):

* ``pairs``: ``prompt, chosen, rejected`` (DPO family, SimPO, ORPO, CPO, ...; ``sft`` trains on ``chosen``);
* ``rankings``: ``prompt, responses, scores`` (PRO, DMPO, DynamicPO; responses are sorted best first by score, and
  every row needs the same number of responses);
* ``unpaired``: ``prompt, completion, label`` (KTO; ``label`` true = desirable);
* ``prompts``: ``prompt`` (online GRPO; every other column is passed to the reward functions).

Optional columns: ``weight`` (a per-example loss weight, ≥ 0) and any per-example tensor a loss needs by name (e.g.
``preference_probs`` for iREPO, ``reward_margins`` for MADPO). Sources: a ``.jsonl`` / ``.json`` / ``.parquet`` file,
a folder of them, or a ``datasets`` hub name (``data.split``). A bad row is reported as ``FILE: row N: reason`` (N
counts from 0 over the file's rows, as ``datasets`` indexes), a ``.jsonl`` line that is not valid UTF-8 or not JSON
as ``FILE: line N: reason`` (N counts from 1, as editors do); ``data.on_bad_row=skip`` drops both kinds with a
warning instead. A parquet file with no rows or a duplicate column name is refused by name
(:mod:`diffalign.data.parquet`); see docs/data-validation.md.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffalign.data.parquet import check_parquet
from diffalign.errors import DiffalignError
from diffalign.models.causal_lm import collate_completions, is_conversational, tokenize_completions

logger = logging.getLogger(__name__)

LAYOUT_COLUMNS = {
    "pairs": ("prompt", "chosen", "rejected"),
    "rankings": ("prompt", "responses", "scores"),
    "unpaired": ("prompt", "completion", "label"),
    "prompts": ("prompt",),
}
LAYOUT_OF_KIND = {"paired": "pairs", "chosen_only": "pairs", "listwise": "rankings", "unpaired": "unpaired"}
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
_MAX_REPORTED = 5  # bad rows quoted in the error message after the first


class TextDataError(DiffalignError, ValueError):
    """Bad text preference data; the message names the source, the rows and what to do."""


def _read_source(path: str, split: str) -> list[tuple[str, list[dict[str, Any]]]]:
    """(source name, rows) per file, or one entry for a hub dataset."""
    root = Path(path).expanduser()
    if root.is_dir():
        files = sorted(f for f in root.rglob("*") if f.suffix in _FILE_SUFFIXES)
        if not files:
            raise TextDataError(f"{root}: no {', '.join(_FILE_SUFFIXES)} files in this folder")
        return [(str(f), _read_file(f)) for f in files]
    if root.is_file():
        if root.suffix not in _FILE_SUFFIXES:
            raise TextDataError(f"{root}: unsupported file type; use one of {', '.join(_FILE_SUFFIXES)}")
        return [(str(root), _read_file(root))]
    import datasets

    try:
        ds = datasets.load_dataset(path, split=split)
    except Exception as err:  # noqa: BLE001 - any failure means: neither a local path nor a loadable hub dataset
        raise TextDataError(
            f"'{path}' is not an existing local file or folder, and datasets.load_dataset('{path}', split='{split}') "
            f"failed: {err}"
        ) from err
    return [(f"{path}[{split}]", ds.to_list())]


@dataclass(frozen=True)
class BadLine:
    """A ``.jsonl`` line that is not a row: its number (from 1) and why; it takes a row's place in the numbering."""

    line: int
    problem: str


def _read_file(path: Path) -> list[Any]:
    """The rows of one file; a ``.jsonl`` line that does not decode or parse is a :class:`BadLine`."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        check_parquet(path, TextDataError)  # no rows / a duplicate column: said by name, not by pyarrow
        return pq.read_table(path).to_pylist()
    data = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0  # editors on Windows write one
    if path.suffix == ".jsonl":
        return _jsonl_rows(data, bom)
    try:
        rows = json.loads(data[bom:].decode("utf-8"))
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, bom + err.start) + 1
        raise TextDataError(f"{path}: line {line}: {_utf8_problem(err, bom)}; save the file as UTF-8") from err
    except json.JSONDecodeError as err:
        raise TextDataError(f"{path}: line {err.lineno}: not valid JSON ({err.msg}); fix the file") from err
    if not isinstance(rows, list):
        raise TextDataError(f"{path}: a .json file must hold a list of rows (objects); use .jsonl for one per line")
    return rows


def _jsonl_rows(data: bytes, start_offset: int = 0) -> list[Any]:
    """One entry per non-blank line of ``data[start_offset:]`` (split on ``\\n`` only: a JSON string may hold
    U+2028 and the other characters ``str.splitlines`` would also split on)."""
    rows: list[Any] = []
    offset = start_offset
    for number, line in enumerate(data[start_offset:].split(b"\n"), start=1):
        start, offset = offset, offset + len(line) + 1
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            rows.append(BadLine(number, _utf8_problem(err, start)))
            continue
        if not text.strip():
            continue
        try:
            rows.append(json.loads(text))
        except json.JSONDecodeError as err:
            rows.append(BadLine(number, f"not valid JSON ({err.msg}, column {err.colno})"))
    return rows


def _utf8_problem(err: UnicodeDecodeError, line_start: int = 0) -> str:
    return f"not valid UTF-8 (byte offset {line_start + err.start} in the file: {err.object[err.start : err.end]!r})"


def _text_problem(row: Mapping[str, Any], key: str) -> str | None:
    value = row.get(key)
    if value is None:
        return f"'{key}' is missing"
    if isinstance(value, str):
        return None if value else f"'{key}' is empty"
    if is_conversational(value) and all(isinstance(m.get("content"), str) for m in value):
        return None
    return f"'{key}' must be a string or a list of {{'role', 'content'}} messages, got {type(value).__name__}"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def row_problem(row: Any, layout: str, extra_columns: Sequence[str] = ()) -> str | None:
    """Why ``row`` is unusable in ``layout`` (``None`` if it is fine)."""
    if not isinstance(row, Mapping):
        return f"a row must be an object, got {type(row).__name__}"
    for key in LAYOUT_COLUMNS[layout]:
        if key in ("scores", "label"):
            continue
        if key == "responses":
            responses = row.get("responses")
            if not isinstance(responses, list) or len(responses) < 2:
                return "'responses' must be a list of at least 2 completions"
            for i, response in enumerate(responses):
                problem = _text_problem({f"responses[{i}]": response}, f"responses[{i}]")
                if problem:
                    return problem
        else:
            problem = _text_problem(row, key)
            if problem:
                return problem
    if layout == "rankings":
        scores = row.get("scores")
        if not isinstance(scores, list) or len(scores) != len(row["responses"]):
            return f"'scores' must be a list with one number per response ({len(row['responses'])})"
        if any(_number(s) is None for s in scores):
            return "'scores' must hold finite numbers"
    if layout == "unpaired" and not (isinstance(row.get("label"), bool) or row.get("label") in (0, 1)):
        return f"'label' must be true/false (or 1/0), got {row.get('label')!r}"
    texts = [row.get(k) for k in ("prompt", "chosen", "rejected", "completion") if k in row] + list(
        row.get("responses") or []
    )
    kinds = {is_conversational(t) for t in texts if t is not None}
    if len(kinds) > 1:
        return "mixes strings and chat messages: make the prompt and its completions all one or all the other"
    if "weight" in row and (_number(row["weight"]) is None or row["weight"] < 0):
        return f"'weight' must be a finite number >= 0, got {row['weight']!r}"
    for key in extra_columns:
        if _number(row.get(key)) is None:
            return f"'{key}' (needed by the loss) must be a finite number, got {row.get(key)!r}"
    return None


def load_text_rows(
    path: str,
    layout: str,
    *,
    split: str = "train",
    extra_columns: Sequence[str] = (),
    on_bad_row: str = "error",
    max_samples: int | None = None,
) -> list[dict[str, Any]]:
    """Read and check every row; rankings come back sorted best first. Raises :class:`TextDataError`, one line that
    starts with the first bad row or line (``on_bad_row="error"``), or drops them with a warning (``"skip"``)."""
    if layout not in LAYOUT_COLUMNS:
        raise ValueError(f"layout must be one of {tuple(LAYOUT_COLUMNS)}, got {layout!r}")
    rows, problems = [], []
    total = 0
    for source, source_rows in _read_source(path, split):
        for i, row in enumerate(source_rows):
            total += 1
            if isinstance(row, BadLine):
                problems.append(f"{source}: line {row.line}: {row.problem}")
                continue
            problem = row_problem(row, layout, extra_columns)
            if problem is None:
                rows.append(_normalised(row, layout))
            else:
                problems.append(f"{source}: row {i}: {problem}")
    if problems and on_bad_row == "error":
        raise TextDataError(_bad_rows_message(problems, layout))
    if problems:
        logger.warning(
            "skipped %d of %d rows in %s (data.on_bad_row=skip); the first: %s", len(problems), total, path, problems[0]
        )
    if layout == "rankings" and rows:
        sizes = {len(r["responses"]) for r in rows}
        if len(sizes) > 1:
            raise TextDataError(
                f"{path}: rankings need the same number of responses in every row, found {sorted(sizes)}; "
                "pad or split the data so that each row has the same n"
            )
    if not rows:
        raise TextDataError(f"{path}: no usable rows for the '{layout}' layout")
    return rows[:max_samples] if max_samples is not None else rows


def _bad_rows_message(problems: Sequence[str], layout: str) -> str:
    """``FILE: row N: reason`` of the first bad row, the next few, and what to do, on one line."""
    others = list(problems[1 : 1 + _MAX_REPORTED]) + (["..."] if len(problems) > 1 + _MAX_REPORTED else [])
    more = f" (and {len(problems) - 1} more: {'; '.join(others)})" if others else ""
    columns = ", ".join(LAYOUT_COLUMNS[layout])
    return (
        f"{problems[0]}{more}; the '{layout}' layout needs {columns}: fix the data, or set data.on_bad_row=skip to "
        "drop bad rows"
    )


def _normalised(row: Mapping[str, Any], layout: str) -> dict[str, Any]:
    out = dict(row)
    if layout == "rankings":
        order = sorted(range(len(row["scores"])), key=lambda k: -float(row["scores"][k]))  # stable: ties keep order
        out["responses"] = [row["responses"][k] for k in order]
        out["scores"] = [float(row["scores"][k]) for k in order]
    if layout == "unpaired":
        out["label"] = bool(row["label"])
    return out


def completions_of(row: Mapping[str, Any], layout: str) -> list[Any]:
    """The completions whose log-likelihoods a loss compares, in the order the collated batch holds them."""
    if layout == "pairs":
        return [row["chosen"], row["rejected"]]
    if layout == "rankings":
        return list(row["responses"])
    if layout == "unpaired":
        return [row["completion"]]
    raise ValueError(f"layout {layout!r} has no completions")


class TextPreferenceDataset:
    """Rows of one layout, tokenised on access (TRL's rules, :func:`tokenize_completions`)."""

    def __init__(
        self,
        rows: list[dict[str, Any]],
        tokenizer: Any,
        layout: str,
        *,
        extra_columns: Sequence[str] = (),
    ) -> None:
        self.rows, self.tokenizer, self.layout = rows, tokenizer, layout
        self.extra_columns = tuple(extra_columns)
        self.fingerprint = hashlib.sha256(
            json.dumps([layout, rows], sort_keys=True, default=str).encode()
        ).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:  # nothing here depends on the epoch
        pass

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        out = tokenize_completions(self.tokenizer, row["prompt"], completions_of(row, self.layout))
        out["index"] = i
        out["weight"] = float(row.get("weight", 1.0))
        if self.layout == "rankings":
            out["scores"] = row["scores"]
        if self.layout == "unpaired":
            out["label"] = row["label"]
        for key in self.extra_columns:
            out[key] = float(row[key])
        return out


class TextCollator:
    """Batch of :class:`TextPreferenceDataset` items: :func:`collate_completions` plus ``index``, ``weight`` and
    the layout's per-example values."""

    def __init__(self, pad_token_id: int, max_length: int | None, extra_columns: Sequence[str] = ()) -> None:
        self.pad_token_id, self.max_length, self.extra_columns = pad_token_id, max_length, tuple(extra_columns)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate_completions(examples, pad_token_id=self.pad_token_id, max_length=self.max_length)
        batch["index"] = torch.tensor([ex["index"] for ex in examples], dtype=torch.long)
        batch["weight"] = torch.tensor([ex["weight"] for ex in examples], dtype=torch.float32)
        if "scores" in examples[0]:
            batch["scores"] = torch.tensor([ex["scores"] for ex in examples], dtype=torch.float32)
        if "label" in examples[0]:
            batch["label"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.bool)
        for key in self.extra_columns:
            batch[key] = torch.tensor([ex[key] for ex in examples], dtype=torch.float32)
        return batch
