"""``diffalign-data``: check and summarise Pick-a-Pic-layout preference data.

* ``validate SOURCE``: every bad row as ``FILE: row N: reason`` (the rules of
  :func:`diffalign.data.pickapic.load_preference_table`); exit status 1 if any, nothing written.
* ``stats SOURCE``: rows, label balance, ties, bad rows, caption lengths (words; also ``caption_0`` /
  ``caption_1`` when present) and image sizes.

``SOURCE`` is a parquet file, a folder of them (``--split`` picks files) or a ``datasets`` hub name.

Dataset building for DCPO (Saeidi et al., arXiv 2502.06023), each on one parquet file, resumable and batched
(:mod:`data_tools.resumable`), the other columns copied unchanged:

* ``caption IN OUT --model M``: a VLM captions ``jpg_0`` / ``jpg_1`` into ``caption_0`` / ``caption_1`` (DCPO-c).
* ``perturb IN OUT --level L``: perturb the loser's caption (or ``--column``) with lexicon / DIPPER / an LLM.
* ``perturb-prompt IN OUT --level L``: winner ``caption``, loser perturbed ``caption`` (DCPO-p).
* ``hybrid IN OUT --captioner M --level L``: caption both images, perturb the loser's caption (DCPO-h).
* ``convert to-folder|to-parquet SRC DST``: parquet to image files + ``pairs.jsonl`` and back (:mod:`.convert`).

Errors: one ``error: <message>`` line (exit status 1 for bad data, 2 for other errors); ``--debug`` anywhere adds
the traceback. The heavy imports wait until the arguments are parsed, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from data_tools.build import add_build_commands, run_build_command
from diffalign.utils.cli_errors import print_error, run_cli

if TYPE_CHECKING:
    from diffalign.data.pickapic import RowReport


def validate(reports: Iterable[RowReport]) -> int:
    """Print each bad row; return the number of bad rows."""
    bad = 0
    for report in reports:
        if report.problem is not None:
            print(f"{report.file}: row {report.row}: {report.problem}")
            bad += 1
    return bad


def stats(reports: Iterable[RowReport]) -> dict:
    """Summary of a source: counts, label balance, caption lengths in words, image sizes."""
    from PIL import Image

    rows = ties = 0
    winners: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    caption_words: list[int] = []
    sizes: Counter[str] = Counter()
    for report in reports:
        rows += 1
        if report.problem is not None:
            problems[report.problem] += 1
            continue
        rec = report.record
        if report.is_tie:
            ties += 1
        else:
            winners["jpg_1" if rec.swapped else "jpg_0"] += 1
        caption_words += [len(rec.prompt_chosen.split()), len(rec.prompt_rejected.split())]
        for data in report.images:
            with Image.open(io.BytesIO(data)) as img:
                sizes[f"{img.width}x{img.height}"] += 1
    return {
        "rows": rows,
        "ties": ties,
        "winner": dict(winners),
        "bad_rows": dict(problems),
        "caption_words": _summary(caption_words),
        "image_sizes": dict(sizes.most_common(10)),
    }


def dual_caption_words(source: str, split: str = "train") -> dict:
    """Word-count summaries of ``caption_0`` / ``caption_1`` over a local source's files that have them."""
    import pyarrow.parquet as pq

    from diffalign.data.pickapic import resolve_parquet_files

    path = Path(source).expanduser()
    files = [path] if path.is_file() else resolve_parquet_files(path, split) if path.is_dir() else []
    words: dict[str, list[int]] = {}
    for file in files:
        names = pq.ParquetFile(file).schema_arrow.names
        for col in ("caption_0", "caption_1"):
            if col in names:
                values = pq.read_table(file, columns=[col]).column(col).to_pylist()
                words.setdefault(col, []).extend(len(v.split()) for v in values if isinstance(v, str))
    return {f"{col}_words": _summary(v) for col, v in words.items()}


def _summary(values: list[int]) -> dict:
    if not values:
        return {}
    mean = statistics.fmean(values)
    return {"min": min(values), "median": statistics.median(values), "mean": mean, "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    """``diffalign-data``: ``argv`` (default ``sys.argv[1:]``) -> exit status; ``--debug`` anywhere for tracebacks."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="diffalign-data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("validate", "list bad rows; exit 1 if any"), ("stats", "summary of a data set")):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("source", help="parquet file, folder of parquet files, or datasets hub name")
        cmd.add_argument("--split", default="train")
        cmd.add_argument("--caption-column", default="caption")
        cmd.add_argument("--dual-captions", action="store_true", help="require caption_0 / caption_1 (DCPO)")
    add_build_commands(sub)
    args = parser.parse_args(argv)
    if args.command not in ("validate", "stats"):
        return run_build_command(args)
    from tqdm.auto import tqdm

    from diffalign.data.pickapic import PreferenceDataError, audit_rows

    try:
        reports = tqdm(
            audit_rows(args.source, split=args.split, caption_column=args.caption_column,
                       dual_captions=args.dual_captions),
            desc=f"{args.command} {args.source}", unit="row", file=sys.stderr,
        )  # fmt: skip
        if args.command == "validate":
            bad = validate(reports)
            print(f"{args.source}: {bad} bad row(s)", file=sys.stderr)
            return 1 if bad else 0
        summary = stats(reports)
        summary.update(dual_caption_words(args.source, args.split))
        print(json.dumps(summary, indent=2))
        return 0
    except (PreferenceDataError, FileNotFoundError) as err:
        print_error(err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
