"""The offline lexicon perturber and ``diffalign-data perturb`` / ``perturb-prompt`` with it (no model)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_tools.cli import main
from data_tools.lexicon import LEVEL_COUNTS, LEXICON, find_attributes, parse_vocabulary, perturb_caption
from diffalign.data.synthetic import make_random_pairs, write_pickapic_parquet

CAT = "A red cat sitting on top of a blue table"
DOGS = "two dogs next to a green car under a tree"


@pytest.mark.parametrize(
    ("text", "level", "expected"),
    [
        (CAT, "weak", "A green cat sitting on top of a blue table"),
        (CAT, "medium", "A pink cat sitting on top of a blue horse"),
        (CAT, "strong", "A white horse sitting on top of a blue book"),
        (DOGS, "weak", "two dogs next to a green car under a castle"),
        (DOGS, "medium", "single dogs next to a green car behind a tree"),
        (DOGS, "strong", "two apples to the right of a green chair under a tree"),
        ("an abstract painting", "strong", "an abstract painting"),
    ],
)
def test_exact_outputs(text: str, level: str, expected: str) -> None:
    assert perturb_caption(text, level, seed=0, row=0)[0] == expected


def test_attribute_finding() -> None:
    found = [(a.category, a.word) for a in find_attributes("Three red-ish cats in front of 2 houses")]
    assert found == [("count", "three"), ("object", "cats"), ("relation", "in front of"), ("count", "2"),
                     ("object", "houses")]  # fmt: skip


@pytest.mark.parametrize("level", list(LEVEL_COUNTS))
def test_level_changes_exactly_that_many_attributes_deterministically(level: str) -> None:
    texts = [CAT, DOGS, "one yellow bird above three white flowers beside a house", "a black dog"]
    for row, text in enumerate(texts):
        for seed in range(5):
            new, changes = perturb_caption(text, level, seed=seed, row=row)
            assert (new, changes) == perturb_caption(text, level, seed=seed, row=row)
            before, after = find_attributes(text), find_attributes(new)
            assert [a.category for a in before] == [a.category for a in after]
            differing = sum(a.word != b.word for a, b in zip(before, after, strict=True))
            assert differing == len(changes) == min(LEVEL_COUNTS[level], len(before))
    outputs = {perturb_caption(DOGS, "weak", seed=s, row=0)[0] for s in range(10)}
    assert len(outputs) > 1  # the seed matters


def test_vocabulary_limits_replacements_to_its_words() -> None:
    vocabulary = parse_vocabulary(["colour=red, Yellow,green,blue", "object=cat,dog"])
    assert vocabulary == {"colour": ("red", "yellow", "green", "blue"), "object": ("cat", "dog")}
    seen = set()
    for row in range(200):
        new, changes = perturb_caption(CAT, "strong", seed=0, row=row, vocabulary=vocabulary)
        assert len(changes) == 3
        for old, replacement in changes:
            assert replacement != old.lower()
            if old in ("red", "blue"):
                assert replacement in {"red", "yellow", "green", "blue"}
            elif old in ("cat", "table"):
                assert replacement in {"cat", "dog"}
            else:  # 'on top of': a category the vocabulary leaves to the built-in lexicon
                assert replacement in LEXICON["relation"]
            seen.add(replacement)
    assert {"yellow", "green", "dog"} <= seen
    for bad, reason in (("colour", "CATEGORY=word"), ("size=big,small", "CATEGORY one of"), ("colour=red", "two")):
        with pytest.raises(ValueError, match=reason):
            parse_vocabulary([bad])


def test_perturb_loser_caption_cli(tmp_path: Path, capsys) -> None:
    rows = make_random_pairs(6, tie_every=3)  # labels: (1,0), (0,1), tie, (0,1), (1,0), tie
    for i, row in enumerate(rows):
        row["caption_0"], row["caption_1"] = f"a red cat {i}", f"a blue dog {i}"
    rows[4]["caption_1"] = "an abstract painting"  # nothing to swap
    src = write_pickapic_parquet(tmp_path / "in.parquet", rows)
    out = tmp_path / "out.parquet"
    assert main(["perturb", str(src), str(out), "--level", "weak", "--seed", "3", "--batch-size", "4"]) == 0
    summary = capsys.readouterr().out
    assert "6 computed in this run" in summary and "3 left unchanged (2 tie, 1 nothing to perturb)" in summary
    before, after = pq.read_table(src), pq.read_table(out)
    assert after.drop(["caption_0", "caption_1"]).equals(before.drop(["caption_0", "caption_1"]))
    got = after.select(["caption_0", "caption_1"]).to_pylist()
    for i, row in enumerate(rows):
        loser = {1.0: 1, 0.0: 0}.get(row["label_0"])
        for k in (0, 1):
            expect = row[f"caption_{k}"]
            if k == loser and i != 4:
                expect = perturb_caption(expect, "weak", seed=3, row=i)[0]
                assert expect != row[f"caption_{k}"]
            assert got[i][f"caption_{k}"] == expect


def test_perturb_prompt_orientation_and_ties(tmp_path: Path, capsys) -> None:
    rows = make_random_pairs(6, tie_every=3)
    for i, row in enumerate(rows):
        row["caption"] = f"{i} green birds under a tree"
        del row["caption_0"], row["caption_1"]
    src = write_pickapic_parquet(tmp_path / "in.parquet", rows)
    out = tmp_path / "out.parquet"
    assert main(["perturb-prompt", str(src), str(out), "--level", "strong"]) == 0
    assert "2 left unchanged (2 tie)" in capsys.readouterr().out
    got = pq.read_table(out).to_pylist()
    for i, (row, new) in enumerate(zip(rows, got, strict=True)):
        prompt = row["caption"]
        perturbed = perturb_caption(prompt, "strong", seed=0, row=i)[0]
        expected = {1.0: (prompt, perturbed), 0.0: (perturbed, prompt), 0.5: (prompt, prompt)}[row["label_0"]]
        assert (new["caption_0"], new["caption_1"]) == expected
    assert main(["validate", str(out), "--dual-captions"]) == 0


def test_missing_column_names_the_producer(tmp_path: Path, capsys) -> None:
    rows = make_random_pairs(2)
    for row in rows:
        del row["caption_0"], row["caption_1"]
    src = write_pickapic_parquet(tmp_path / "in.parquet", rows)
    assert main(["perturb", str(src), str(tmp_path / "o.parquet"), "--level", "weak"]) == 1
    err = capsys.readouterr().err
    assert f"{src}: missing column 'caption_0'" in err and "diffalign-data caption" in err
    assert not (tmp_path / "o.parquet").exists()
