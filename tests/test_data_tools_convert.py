"""``diffalign-data convert`` round trips and ``stats`` on dual-caption files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from data_tools.cli import main
from diffalign.data.synthetic import make_random_pairs, random_image, write_pickapic_parquet


def _jpeg(seed: int) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    random_image(12, np.random.default_rng(seed)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def test_parquet_folder_parquet_round_trip_is_lossless(tmp_path: Path, capsys) -> None:
    rows = make_random_pairs(5, size=(16, 8), tie_every=3)
    rows[1]["jpg_1"] = _jpeg(1)  # a JPEG stays the same JPEG bytes (no re-encoding)
    src = write_pickapic_parquet(tmp_path / "in.parquet", rows)
    folder, back = tmp_path / "folder", tmp_path / "back.parquet"
    assert main(["convert", "to-folder", str(src), str(folder)]) == 0
    index = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    assert index[1]["image_1"] == "images/000001_1.jpg" and index[0]["image_0"] == "images/000000_0.png"
    assert (folder / index[1]["image_1"]).read_bytes() == rows[1]["jpg_1"]
    assert index[2]["label_0"] == 0.5 and index[2]["caption_1"] == "prompt 2 image 1"
    assert main(["convert", "to-parquet", str(folder), str(back)]) == 0
    assert pq.read_table(back).equals(pq.read_table(src))
    assert "5 rows" in capsys.readouterr().out


def test_jsonl_with_relative_paths_and_default_label_1(tmp_path: Path, capsys) -> None:
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (4, 4), "red").save(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "b.jpg").write_bytes(_jpeg(2))
    line = {"image_0": "imgs/a.png", "image_1": "imgs/b.jpg", "label_0": 0.0, "caption": "a red square"}
    (tmp_path / "my.jsonl").write_text(json.dumps(line) + "\n")
    out = tmp_path / "out.parquet"
    assert main(["convert", "to-parquet", str(tmp_path / "my.jsonl"), str(out)]) == 0
    table = pq.read_table(out).to_pylist()
    assert table == [{"jpg_0": (tmp_path / "imgs" / "a.png").read_bytes(), "jpg_1": _jpeg(2), "label_0": 0.0,
                      "caption": "a red square", "label_1": 1.0}]  # fmt: skip
    assert main(["validate", str(out)]) == 0
    line["image_1"] = "imgs/missing.png"
    (tmp_path / "bad.jsonl").write_text(json.dumps(line) + "\n")
    assert main(["convert", "to-parquet", str(tmp_path / "bad.jsonl"), str(tmp_path / "x.parquet")]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl: line 1: image_1 file 'imgs/missing.png' not found" in err
    del line["label_0"]
    (tmp_path / "nolabel.jsonl").write_text(json.dumps(line) + "\n")
    assert main(["convert", "to-parquet", str(tmp_path / "nolabel.jsonl"), str(tmp_path / "x.parquet")]) == 1
    assert "nolabel.jsonl: line 1: missing key 'label_0'" in capsys.readouterr().err


def test_stats_reports_dual_caption_lengths(tmp_path: Path, capsys) -> None:
    rows = make_random_pairs(4)
    rows[0]["caption_1"] = "a much longer caption of the losing image"
    path = write_pickapic_parquet(tmp_path / "p.parquet", rows)
    assert main(["stats", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["caption_0_words"]["max"] == 4 and summary["caption_1_words"]["max"] == 8
    for row in rows:
        del row["caption_0"], row["caption_1"]
    assert main(["stats", str(write_pickapic_parquet(tmp_path / "q.parquet", rows))]) == 0
    assert "caption_0_words" not in json.loads(capsys.readouterr().out)
