"""``diffalign-data caption`` / ``perturb --mode dipper|instruct`` / ``hybrid`` with tiny random models, and resume."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_tools import caption as caption_module
from data_tools.cli import main
from data_tools.resumable import partial_path
from diffalign.data.synthetic import make_random_pairs, write_pickapic_parquet
from tests.data_tools_models import save_tiny_blip, save_tiny_gpt2, save_tiny_t5

NEW = ["caption_0", "caption_1"]
_CAPTION_CALL = caption_module.Captioner.__call__


class Interrupted(RuntimeError):
    """Stands for a kill in the middle of a run."""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data_tools_models")
    return {"blip": save_tiny_blip(root / "blip"), "t5": save_tiny_t5(root / "t5"), "gpt2": save_tiny_gpt2(root / "g")}


def _source(tmp_path: Path, n: int = 8, **kw) -> Path:
    rows = make_random_pairs(n, size=16, tie_every=4)
    for row in rows:
        del row["caption_0"], row["caption_1"]
        row["extra"] = f"keep {row['caption']}"
    return write_pickapic_parquet(tmp_path / "in.parquet", rows, **kw)


def _caption_args(src: Path, out: Path, blip: Path, *extra: str) -> list[str]:
    return ["caption", str(src), str(out), "--model", str(blip), "--max-new-tokens", "5", "--batch-size", "2", *extra]


def _count_calls(monkeypatch, fail_after: int | None = None) -> list[int]:
    """Count captioner calls (images per call); raise Interrupted on call ``fail_after + 1``."""
    calls: list[int] = []

    def counted(self, images, prompts):
        if fail_after is not None and len(calls) == fail_after:
            raise Interrupted
        calls.append(len(images))
        return _CAPTION_CALL(self, images, prompts)

    monkeypatch.setattr(caption_module.Captioner, "__call__", counted)
    return calls


def test_caption_writes_one_string_per_image_and_copies_the_rest(tmp_path, models, capsys, monkeypatch) -> None:
    src = _source(tmp_path, image_struct=True)
    out = tmp_path / "out.parquet"
    calls = _count_calls(monkeypatch)
    assert main(_caption_args(src, out, models["blip"], "--template", "describe the image. prompt was: {prompt}")) == 0
    assert calls == [4, 4, 4, 4]  # 8 rows in batches of 2, two images each
    before, after = pq.read_table(src), pq.read_table(out)
    assert after.column_names == before.column_names + NEW
    assert after.select(before.column_names).equals(before)  # every input column unchanged, struct images included
    for col in NEW:
        values = after.column(col).to_pylist()
        assert len(values) == 8 and all(isinstance(v, str) and v for v in values)
    assert "8 computed in this run, 0 resumed" in capsys.readouterr().out
    assert not partial_path(out).exists()
    assert main(["validate", str(out), "--dual-captions"]) == 0


def test_caption_resumes_without_recomputing(tmp_path, models, capsys, monkeypatch) -> None:
    src = _source(tmp_path)
    full, resumed = tmp_path / "full.parquet", tmp_path / "resumed.parquet"
    assert main(_caption_args(src, full, models["blip"])) == 0
    calls = _count_calls(monkeypatch, fail_after=2)
    with pytest.raises(Interrupted):
        main(_caption_args(src, resumed, models["blip"]))
    assert calls == [4, 4] and not resumed.exists()
    lines = partial_path(resumed).read_text().splitlines()
    assert len(lines) == 1 + 4  # header + rows 0-3
    with partial_path(resumed).open("a") as f:
        f.write('{"row": 4, "val')  # a line cut short by the kill
    calls = _count_calls(monkeypatch)
    assert main(_caption_args(src, resumed, models["blip"])) == 0
    assert calls == [4, 4]  # only rows 4-7
    assert pq.read_table(resumed).equals(pq.read_table(full))
    assert "4 computed in this run, 4 resumed from an earlier run" in capsys.readouterr().out


def test_resume_with_other_options_refuses(tmp_path, models, capsys, monkeypatch) -> None:
    src = _source(tmp_path)
    out = tmp_path / "out.parquet"
    _count_calls(monkeypatch, fail_after=1)
    with pytest.raises(Interrupted):
        main(_caption_args(src, out, models["blip"]))
    assert main(_caption_args(src, out, models["blip"], "--template", "other {prompt}")) == 1
    err = capsys.readouterr().err
    assert str(partial_path(out)) in err and "same options" in err


@pytest.mark.parametrize(("mode", "model"), [("dipper", "t5"), ("instruct", "gpt2")])
def test_model_perturbers_change_only_the_loser_caption(tmp_path, models, capsys, mode, model) -> None:
    rows = make_random_pairs(4, tie_every=4)  # labels (1,0), (0,1), (1,0), tie
    src = write_pickapic_parquet(tmp_path / "in.parquet", rows)
    out = tmp_path / "out.parquet"
    args = ["perturb", str(src), str(out), "--model", str(models[model]), "--mode", mode, "--level", "medium",
            "--perturb-max-new-tokens", "6", "--batch-size", "3"]  # fmt: skip
    assert main(args) == 0
    assert "1 left unchanged (1 tie)" in capsys.readouterr().out
    before, after = pq.read_table(src).to_pylist(), pq.read_table(out).to_pylist()
    for old, new in zip(before, after, strict=True):
        loser = {1.0: "caption_1", 0.0: "caption_0"}.get(old["label_0"])
        for key in old:
            if key == loser:
                assert isinstance(new[key], str) and new[key].strip() and new[key] != old[key]
            else:
                assert new[key] == old[key]


def test_dipper_input_format() -> None:
    from data_tools.perturb import dipper_inputs

    assert dipper_inputs("A cat. A dog! A car. A tree.", "weak") == [
        "lexical = 60, order = 100 Paraphrase and perturb the following image caption. <sent> A cat. A dog! A car. "
        "</sent>",
        "lexical = 60, order = 100 Paraphrase and perturb the following image caption. <sent> A tree. </sent>",
    ]
    assert dipper_inputs("x", "strong")[0].startswith("lexical = 20, order = 100 ")


def test_hybrid_captions_then_perturbs_the_loser(tmp_path, models, capsys, monkeypatch) -> None:
    src = _source(tmp_path, n=4)
    cap, hyb = tmp_path / "cap.parquet", tmp_path / "hyb.parquet"
    assert main(_caption_args(src, cap, models["blip"])) == 0
    assert main(["hybrid", str(src), str(hyb), "--captioner", str(models["blip"]), "--max-new-tokens", "5",
                 "--batch-size", "2", "--level", "weak", "--perturber", "lexicon"]) == 0  # fmt: skip
    assert "1 tie" in capsys.readouterr().out
    from data_tools.lexicon import perturb_caption

    captioned, hybrid = pq.read_table(cap).to_pylist(), pq.read_table(hyb).to_pylist()
    for i, (c, h) in enumerate(zip(captioned, hybrid, strict=True)):
        loser = {1.0: "caption_1", 0.0: "caption_0"}.get(c["label_0"])
        for key in NEW:
            assert h[key] == (perturb_caption(c[key], "weak", seed=0, row=i)[0] if key == loser else c[key])
