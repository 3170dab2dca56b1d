"""``diffalign-data`` on the toy world: the detector captioner (``--model toy``) and the DCPO-h path it enables."""

from __future__ import annotations

import pyarrow.parquet as pq

from data_tools.cli import main
from diffalign.toy.pairs import colour_pair, independent_pair, make_preference_pairs

N_PAIRS = 40


def _oriented(row: dict) -> tuple[str, str]:
    """(winner's caption, loser's caption) of a Pick-a-Pic row."""
    return (row["caption_0"], row["caption_1"]) if row["label_0"] == 1.0 else (row["caption_1"], row["caption_0"])


def test_toy_captioner_names_every_pair_image_exactly(tmp_path, capsys) -> None:
    for kind, build in (("colour", colour_pair), ("independent", independent_pair)):
        src, out = tmp_path / f"{kind}.parquet", tmp_path / f"{kind}_captioned.parquet"
        make_preference_pairs(src, N_PAIRS, seed=3, kind=kind)
        assert main(["caption", str(src), str(out), "--model", "toy", "--batch-size", "16"]) == 0
        rows = pq.read_table(out).to_pylist()
        assert len(rows) == N_PAIRS
        for i, row in enumerate(rows):
            winner, loser = build(3, i)
            assert _oriented(row) == (winner.caption, loser.caption), f"{kind} row {i}"
    assert "40 computed in this run" in capsys.readouterr().out


def test_hybrid_with_the_toy_captioner_perturbs_only_the_loser_colour(tmp_path) -> None:
    src, out = tmp_path / "pairs.parquet", tmp_path / "dcpo_h.parquet"
    make_preference_pairs(src, N_PAIRS, seed=5)
    assert main(["hybrid", str(src), str(out), "--captioner", "toy", "--level", "weak"]) == 0
    for i, row in enumerate(pq.read_table(out).to_pylist()):
        winner, loser = colour_pair(5, i)
        winner_caption, loser_caption = _oriented(row)
        assert winner_caption == winner.caption == row["caption"]
        article, colour, shape = loser_caption.split()
        assert (article, shape) == ("a", loser.shape) and colour != loser.colour, f"row {i}: {loser_caption!r}"


def test_toy_captioner_on_a_blank_image_and_a_bad_vocabulary(tmp_path, capsys) -> None:
    from PIL import Image

    from data_tools.caption import build_captioner

    captioner = build_captioner("toy", template="ignored {prompt}")  # the toy plugin's, found through the registry
    assert captioner([Image.new("RGB", (16, 16), (40, 40, 40))], ["a red circle"]) == ["an empty image"]
    src = make_preference_pairs(tmp_path / "pairs.parquet", 4, seed=5)
    out = tmp_path / "out.parquet"
    assert main(["perturb-prompt", str(src), str(out), "--level", "weak", "--vocabulary", "colour=red"]) == 1
    assert "--vocabulary 'colour=red': give at least two words" in capsys.readouterr().err and not out.exists()
