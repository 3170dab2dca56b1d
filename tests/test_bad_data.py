"""Bad data ends in one line naming the file and the row (or line) and what to do, or, under
``data.on_bad_row=skip``, in a counted skip; never in a crash mid-run (docs/data-validation.md).

* images: validation decodes every image (a truncated JPEG passes ``PIL.Image.verify``), and a row that still fails
  to decode during training is replaced by the next pair whatever the worker count;
* parquet files with no rows or a duplicate column name are refused by name by every reader;
* text ``.jsonl``: a line that is not UTF-8 or not JSON is reported by line and byte offset, or skipped and counted.
"""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, JpegImagePlugin
from test_data_loader import (
    config,
    load_time_check_misses_images,  # noqa: F401 - a fixture
    truncated_jpeg,
)

from data_tools.cli import main as data_cli
from data_tools.convert import parquet_to_folder
from data_tools.resumable import open_input
from diffalign.data import PreferencePairDataset, collate_preference_batch, load_preference_table
from diffalign.data.llm import TextDataError, load_text_rows
from diffalign.data.pickapic import BadRowError, PreferenceDataError, image_decode_problem
from diffalign.data.synthetic import make_random_pairs, write_pickapic_parquet
from diffalign.trainers.batching import EpochBatches
from diffalign.trainers.loader import LoaderSettings, micro_batch_loader
from diffalign.trainers.metrics import read_metrics
from diffalign.trainers.offline import train


def jpeg(width: int, height: int, *, progressive: bool = False) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90, progressive=progressive)
    return buf.getvalue()


def full_size_problem(data: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception as err:  # PIL raises many types for corrupt data
        return str(err)
    return None


# -- images: the load-time check decodes ----------------------------------------------------------------------------


@pytest.mark.parametrize("progressive", [False, True])
def test_a_truncated_jpeg_passes_verify_but_not_the_decode_check(progressive: bool) -> None:
    data = jpeg(96, 64, progressive=progressive)
    assert image_decode_problem(data) is None
    for cut in (len(data) - 1, len(data) - 2, len(data) * 3 // 4, len(data) // 2, len(data) // 4):
        with Image.open(io.BytesIO(data[:cut])) as img:
            img.verify()  # passes: the old check let every one of these through
        problem = image_decode_problem(data[:cut])
        assert problem is not None and problem.startswith("image file is truncated"), (cut, problem)
        assert full_size_problem(data[:cut]) is not None  # the full-size decode agrees


def test_the_jpeg_check_decodes_at_one_eighth_scale_and_fails_where_a_full_decode_fails(monkeypatch) -> None:
    sizes = []
    load = JpegImagePlugin.JpegImageFile.load

    def recording_load(self):
        sizes.append(self.size)
        return load(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", recording_load)
    assert image_decode_problem(jpeg(96, 64)) is None
    assert sizes == [(12, 8)]  # 1/8 of 96 x 64: the cheap decode is the one that ran
    monkeypatch.undo()
    rng = np.random.default_rng(0)
    failures = 0
    for progressive in (False, True):
        data = jpeg(128, 96, progressive=progressive)
        for _ in range(40):  # corrupt 8 bytes of the entropy-coded data: libjpeg detects some, tolerates most
            broken = bytearray(data)
            at = int(rng.integers(len(data) // 4, len(data) - 16))
            broken[at : at + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
            full, reduced = full_size_problem(bytes(broken)), image_decode_problem(bytes(broken))
            assert (full is None) == (reduced is None), (progressive, at, full, reduced)
            failures += full is not None
    assert failures >= 1  # some corruption was detected, by both


def test_a_truncated_png_or_junk_does_not_decode() -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    assert image_decode_problem(png) is None
    assert image_decode_problem(png[: len(png) // 2]).startswith("image file is truncated")
    assert image_decode_problem(b"junk") == "not an image format PIL reads"


def test_validation_reports_a_truncated_jpeg_and_skip_counts_it(tmp_path: Path, capsys, caplog) -> None:
    rows = make_random_pairs(6, size=20, seed=0)
    rows[2]["jpg_1"] = truncated_jpeg()
    path = write_pickapic_parquet(tmp_path / "bad.parquet", rows)
    assert data_cli(["validate", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [f"{path}: row 2: undecodable jpg_1"]
    with pytest.raises(BadRowError) as err:
        load_preference_table(str(path))
    assert str(err.value) == f"{path}: row 2: undecodable jpg_1; fix or remove the row, or set data.on_bad_row=skip"
    with caplog.at_level(logging.WARNING, logger="diffalign.data.pickapic"):
        table = load_preference_table(str(path), on_bad_row="skip")
    assert table.skipped == {"undecodable jpg_1": 1}
    assert [r.original_index for r in table.records] == [0, 1, 3, 4, 5]
    assert f"skipped 1 of 6 rows in {path}: 1 undecodable jpg_1" in caplog.text


# -- images: a row that fails during training -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def rows_3_and_4_truncated(tmp_path_factory) -> Path:
    rows = make_random_pairs(8, size=20, seed=2)
    rows[3]["jpg_0"] = truncated_jpeg()
    rows[4]["jpg_1"] = truncated_jpeg()
    return write_pickapic_parquet(tmp_path_factory.mktemp("bad") / "bad.parquet", rows)


def read_micro_batches(dataset: PreferencePairDataset, workers: int, count: int) -> tuple[list, dict[int, int]]:
    batches = EpochBatches(len(dataset), 2, seed=0)  # 4 micro-batches per epoch
    settings = LoaderSettings(workers)
    stream = micro_batch_loader(dataset, collate_preference_batch, batches, 0, settings, torch.device("cpu"))
    try:
        got = [next(stream) for _ in range(count)]
    finally:
        stream.close()
    return got, dict(stream.skipped)


def test_skipped_rows_are_replaced_by_the_next_pair_whatever_the_worker_count(rows_3_and_4_truncated, caplog) -> None:
    # loaded without reading images (as a run whose latent cache covers the data): the bad rows are first met here
    table = load_preference_table(str(rows_3_and_4_truncated), on_bad_row="skip", verify_images=False)
    dataset = PreferencePairDataset(table, resolution=16, random_crop=True, seed=1)
    with caplog.at_level(logging.WARNING, logger="diffalign.trainers.loader"):
        runs = {workers: read_micro_batches(dataset, workers, 8) for workers in (0, 2)}  # two epochs
    (plain, skipped), (with_workers, skipped_2) = runs[0], runs[2]
    batches = EpochBatches(8, 2, seed=0)
    planned = [batches.local_indices(k) for k in range(8)]
    replaced = [(epoch, [5 if i in (3, 4) else i for i in indices]) for epoch, indices in planned]
    assert [(epoch, batch["index"].tolist()) for epoch, batch in plain] == replaced
    assert skipped == skipped_2 == {3: 2, 4: 2}  # each bad row drawn once an epoch
    for (epoch, a), (_, b) in zip(plain, with_workers, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("index", "pixels_chosen", "pixels_rejected"))
        for k, index in enumerate(a["index"].tolist()):
            dataset.set_epoch(epoch)
            assert torch.equal(a["pixels_chosen"][k], dataset[index]["pixels_chosen"])  # the stand-in, whole
    first_seen = [r.getMessage() for r in caplog.records if "is read in place of this row" in r.getMessage()]
    assert len(first_seen) == 4  # each row logged once per stream
    assert first_seen[0].startswith("skip: pair 5 is read in place of this row (data.on_bad_row=skip): ")
    assert f"{rows_3_and_4_truncated}: row " in first_seen[0] and "does not decode" in first_seen[0]
    summaries = [r.getMessage() for r in caplog.records if "such rows" in r.getMessage()]
    assert summaries == ["skip: 4 samples read the next pair instead of a row that does not decode (2 such rows; "
                         "data.on_bad_row=skip)"] * 2  # fmt: skip


def test_without_skip_the_first_bad_row_stops_the_stream_with_its_one_line_error(rows_3_and_4_truncated) -> None:
    table = load_preference_table(str(rows_3_and_4_truncated), verify_images=False)
    batches = EpochBatches(8, 2, seed=0)
    first = next(i for k in range(4) for i in batches.local_indices(k)[1] if i in (3, 4))
    loser = "jpg_0" if first == 3 else "jpg_1"  # row 3 is swapped: its jpg_0 is the loser
    with pytest.raises(BadRowError) as err:
        read_micro_batches(PreferencePairDataset(table, resolution=16), 0, 4)
    message = str(err.value)
    assert message.startswith(f"{rows_3_and_4_truncated}: row {first}: the rejected image ({loser}) does not decode "
                              "(image file is truncated")  # fmt: skip
    assert message.endswith("; re-encode or drop this row, or set data.on_bad_row=skip") and "\n" not in message


def test_training_with_skip_finishes_and_counts_a_row_that_fails_in_a_worker(
    pixel_pipeline, tmp_path, caplog, load_time_check_misses_images  # noqa: F811 - the fixture
) -> None:
    rows = make_random_pairs(8, size=20, seed=1)
    rows[5]["jpg_1"] = truncated_jpeg()
    data = write_pickapic_parquet(tmp_path / "bad.parquet", rows)
    cfg = config(pixel_pipeline, str(data), tmp_path / "out", workers=2, max_steps=4)
    cfg.data.on_bad_row = "skip"
    with caplog.at_level(logging.WARNING, logger="diffalign.trainers.loader"):
        train(cfg)
    losses = [r["loss"] for r in read_metrics(tmp_path / "out")]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert "skip: 2 samples read the next pair instead of a row that does not decode (1 such rows" in caplog.text
    # 4 steps x 2 micro-batches x 2 = 16 samples, two epochs of 8: row 5 drawn twice


# -- parquet files that pyarrow / datasets would fail on without saying why ------------------------------------------


def empty_parquet(path: Path) -> Path:
    table = pq.read_table(write_pickapic_parquet(path, make_random_pairs(1, size=8)))
    pq.write_table(table.slice(0, 0), path)
    return path


def duplicate_caption_parquet(path: Path) -> Path:
    table = pq.read_table(write_pickapic_parquet(path, make_random_pairs(2, size=8)))
    names = [*table.column_names, "caption"]
    pq.write_table(pa.Table.from_arrays([*table.columns, table["caption"]], names=names), path)
    return path


READERS = {
    "load_preference_table": lambda path, tmp: load_preference_table(str(path)),
    "load_text_rows": lambda path, tmp: load_text_rows(str(path), "pairs"),
    "data_tools open_input": lambda path, tmp: open_input(path, ["jpg_0"]),
    "data_tools to-folder": lambda path, tmp: parquet_to_folder(path, tmp / "folder"),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(
    ("write", "reason"), [(empty_parquet, "no rows"), (duplicate_caption_parquet, "duplicate column 'caption'")]
)
def test_an_empty_parquet_or_a_duplicate_column_is_refused_by_name(tmp_path, reader, write, reason) -> None:
    path = write(tmp_path / "data.parquet")
    with pytest.raises((PreferenceDataError, TextDataError)) as err:
        READERS[reader](path, tmp_path)
    assert str(err.value).startswith(f"{path}: {reason}; ") and "\n" not in str(err.value)


def test_validate_says_no_rows_for_an_empty_file_in_a_folder(tmp_path, capsys) -> None:
    write_pickapic_parquet(tmp_path / "train-0.parquet", make_random_pairs(2, size=8))
    empty = empty_parquet(tmp_path / "train-1.parquet")
    assert data_cli(["validate", str(tmp_path)]) != 0
    assert capsys.readouterr().err.strip().endswith(f"{empty}: no rows; remove this file, or point at parquet data "
                                                    "that holds rows")  # fmt: skip


# -- text jsonl: lines that are not UTF-8 or not JSON -----------------------------------------------------------------


def pair(i: int) -> bytes:
    return json.dumps({"prompt": f"p{i}", "chosen": "good", "rejected": "bad"}).encode()


def test_a_jsonl_line_that_is_not_utf8_names_line_and_byte_offset(tmp_path, caplog) -> None:
    bad = b'{"prompt": "caf\xe9", "chosen": "x", "rejected": "y"}'  # Latin-1, not UTF-8
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(pair(0) + b"\n" + bad + b"\n" + pair(2) + b"\n")
    offset = len(pair(0)) + 1 + bad.index(b"\xe9")
    with pytest.raises(TextDataError) as err:
        load_text_rows(str(path), "pairs")
    message = str(err.value)
    assert message.startswith(f"{path}: line 2: not valid UTF-8 (byte offset {offset} in the file: b'\\xe9'); ")
    assert message.endswith("set data.on_bad_row=skip to drop bad rows") and "\n" not in message
    with caplog.at_level(logging.WARNING, logger="diffalign.data.llm"):
        rows = load_text_rows(str(path), "pairs", on_bad_row="skip")
    assert [r["prompt"] for r in rows] == ["p0", "p2"]
    assert f"skipped 1 of 3 rows in {path} (data.on_bad_row=skip); the first: {path}: line 2: not valid UTF-8" in (
        caplog.text
    )


def test_a_jsonl_line_that_is_not_json_is_a_bad_row_like_the_others(tmp_path) -> None:
    path = tmp_path / "pairs.jsonl"
    lines = [pair(0), b'{"prompt": "p1", "chosen": ', b"", pair(3), b'{"prompt": "p4", "chosen": "x"}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(TextDataError) as err:
        load_text_rows(str(path), "pairs")
    message = str(err.value)
    assert message.startswith(
        f"{path}: line 2: not valid JSON (Expecting value, column 28) (and 1 more: {path}: row 3: 'rejected' is "
        "missing)"
    )
    assert [r["prompt"] for r in load_text_rows(str(path), "pairs", on_bad_row="skip")] == ["p0", "p3"]


def test_a_json_file_that_is_not_utf8_names_its_line(tmp_path) -> None:
    path = tmp_path / "pairs.json"
    data = b'[\n{"prompt": "a", "chosen": "b", "rejected": "c"},\n{"prompt": "\xff"}\n]'
    path.write_bytes(data)
    offset = data.index(b"\xff")
    with pytest.raises(TextDataError) as err:
        load_text_rows(str(path), "pairs")
    assert str(err.value) == (
        f"{path}: line 3: not valid UTF-8 (byte offset {offset} in the file: b'\\xff'); save the file as UTF-8"
    )


def test_jsonl_keeps_unicode_line_separators_inside_strings_and_ignores_a_bom(tmp_path) -> None:
    path = tmp_path / "pairs.jsonl"
    row = {"prompt": "one\u2028two\x85three", "chosen": "a", "rejected": "b"}
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(row, ensure_ascii=False).encode() + b"\r\n" + pair(1) + b"\n")
    assert load_text_rows(str(path), "pairs") == [row, json.loads(pair(1))]


def test_missing_data_and_prompt_files_are_project_errors(tmp_path):
    from diffalign.data.prompts import load_prompts
    from diffalign.errors import DiffalignError

    missing = tmp_path / "none.parquet"
    with pytest.raises(DiffalignError, match=re.escape(f"{missing}: no such file or folder")):
        load_preference_table(str(missing))
    with pytest.raises(DiffalignError, match="prompt file not found"):
        load_prompts(str(tmp_path / "prompts.txt"))
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(DiffalignError, match="no prompts found"):
        load_prompts(str(tmp_path / "empty.txt"))
