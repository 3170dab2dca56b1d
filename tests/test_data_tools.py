"""``diffalign-data validate`` and ``stats`` on small Pick-a-Pic parquet files."""

from __future__ import annotations

import json
from pathlib import Path

from data_tools.cli import main
from diffalign.data.synthetic import make_random_pairs, write_pickapic_parquet


def _rows() -> list[dict]:
    return make_random_pairs(12, size=16, seed=0, tie_every=4)  # rows 3, 7, 11 are ties


def test_validate_lists_every_bad_row_and_fails(tmp_path: Path, capsys) -> None:
    rows = _rows()
    rows[0]["jpg_1"] = b"junk"
    rows[5].update(label_0=0.7, label_1=0.3)
    rows[7]["caption"] = " "  # a tie with an empty caption is still a bad row
    path = write_pickapic_parquet(tmp_path / "bad.parquet", rows)
    before = sorted(tmp_path.iterdir())
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr()
    assert out.out.splitlines() == [
        f"{path}: row 0: undecodable jpg_1",
        f"{path}: row 5: label_0=0.7",
        f"{path}: row 7: empty caption",
    ]
    assert f"{path}: 3 bad row(s)" in out.err
    assert sorted(tmp_path.iterdir()) == before  # nothing written


def test_validate_clean_file_and_missing_column(tmp_path: Path, capsys) -> None:
    rows = _rows()
    assert main(["validate", str(write_pickapic_parquet(tmp_path / "ok.parquet", rows))]) == 0
    assert capsys.readouterr().out == ""
    for row in rows:
        del row["label_1"]
    assert main(["validate", str(write_pickapic_parquet(tmp_path / "nolabel.parquet", rows))]) == 1
    assert "nolabel.parquet: missing column(s) ['label_1']" in capsys.readouterr().err


def test_stats_counts_labels_ties_captions_and_sizes(tmp_path: Path, capsys) -> None:
    rows = _rows()
    rows[2]["jpg_0"] = None
    path = write_pickapic_parquet(tmp_path / "p.parquet", rows)
    assert main(["stats", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    good = [r for i, r in enumerate(rows) if i != 2]
    decided = [r for r in good if r["label_0"] != 0.5]
    assert summary["rows"] == 12 and summary["ties"] == 3 and summary["bad_rows"] == {"missing jpg_0": 1}
    assert summary["winner"] == {
        k: v for k, v in {"jpg_0": sum(r["label_0"] == 1.0 for r in decided),
                          "jpg_1": sum(r["label_0"] == 0.0 for r in decided)}.items() if v
    }  # fmt: skip
    assert summary["image_sizes"] == {"16x16": 2 * len(good)}
    words = [len(r["caption"].split()) for r in good]
    assert summary["caption_words"]["min"] == min(words) and summary["caption_words"]["max"] == max(words)
