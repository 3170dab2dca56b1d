"""What decoding every image costs the load-time validation pass (docs/data-validation.md), against ``verify`` only.

Writes ``--rows`` Pick-a-Pic-like rows (two JPEGs of 512-768 px per row, ``make_pickapic_like_rows``) to one parquet
file under ``--work`` (kept and reused), then measures on one thread, each ``--repeats`` times (the best is kept):

* per image: ``PIL.Image.verify`` (the old check, which does not decode JPEG data), :func:`image_decode_problem`
  (the check now: a JPEG decoded at 1/8 scale) and a full-size ``load`` (for scale);
* the whole pass, ``audit_rows`` (what ``diffalign-data validate`` and ``load_preference_table`` run, its images
  decoded on ``decode_threads`` threads): with the decode, and with ``image_decode_problem`` replaced by
  ``verify``. The Arrow copy ``datasets`` makes of the parquet is built before the timed passes (a one-time cost,
  reported apart).

Usage: ``python scripts/bench_validation.py [--rows 1000] [--work /tmp/bench_validation] [--repeats 3]``; prints
JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as `python scripts/bench_validation.py` without an installed package
    sys.path.insert(0, str(REPO_ROOT))


def write_rows(path: Path, rows: int) -> Path:
    """The benchmark's parquet file (written once: the same rows for the same ``rows``)."""
    from diffalign.data.synthetic import write_pickapic_parquet
    from scripts.bench_offline_lib.assets import make_pickapic_like_rows

    if not path.exists():
        write_pickapic_parquet(path, make_pickapic_like_rows(rows, (512, 768), seed=0), row_group_size=64)
    return path


def verify_only(data: bytes) -> str | None:
    """The old load-time check: ``Image.verify`` (reads the JPEG markers, decodes nothing)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except Exception as err:  # PIL raises many types for corrupt data
        return str(err)
    return None


def full_load(data: bytes) -> str | None:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
    return None


def best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(path: Path, repeats: int) -> dict[str, Any]:
    import pyarrow.parquet as pq

    import diffalign.data.pickapic as pickapic

    table = pq.read_table(path, columns=list(pickapic.IMAGE_COLUMNS))
    images = [cell for col in pickapic.IMAGE_COLUMNS for cell in table.column(col).to_pylist()]
    per_image = {}
    for name, check in (("verify", verify_only), ("decode_1_8", pickapic.image_decode_problem), ("full", full_load)):
        seconds = best_seconds(lambda check=check: [check(d) for d in images], repeats)
        per_image[name] = seconds / len(images) * 1e3
    start = time.perf_counter()
    rows = sum(1 for _ in pickapic.audit_rows(str(path)))  # builds the datasets Arrow copy once
    first_pass = time.perf_counter() - start
    decode = best_seconds(lambda: sum(1 for _ in pickapic.audit_rows(str(path))), repeats)
    original = pickapic.image_decode_problem
    pickapic.image_decode_problem = verify_only
    try:
        verify = best_seconds(lambda: sum(1 for _ in pickapic.audit_rows(str(path))), repeats)
    finally:
        pickapic.image_decode_problem = original
    mib = sum(len(d) for d in images) / 2**20
    return {
        "rows": rows,
        "decode_threads": pickapic._decode_threads(),
        "images": len(images),
        "image_mib": round(mib, 1),
        "ms_per_image": {k: round(v, 3) for k, v in per_image.items()},
        "pass_s": {"verify": round(verify, 2), "decode_1_8": round(decode, 2)},
        "pass_ms_per_row": {"verify": round(verify / rows * 1e3, 3), "decode_1_8": round(decode / rows * 1e3, 3)},
        "decode_over_verify": round(decode / verify, 1),
        "first_pass_with_arrow_copy_s": round(first_pass, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_validation"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    path = write_rows(args.work / f"pickapic_like_{args.rows}.parquet", args.rows)
    print(json.dumps(measure(path, args.repeats), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
