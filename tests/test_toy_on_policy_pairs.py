"""On-policy toy pairs: judged samples of the base, every winner right and every loser wrong by the gold detector."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import diffalign.toy.on_policy_pairs as on_policy
from diffalign.cli import main
from diffalign.toy.experiment import prepare_world
from diffalign.toy.metrics import colour_correct, colours_of
from diffalign.toy.pretrain import ensure_base
from diffalign.toy.world import all_prompts, parse_caption

torch.set_num_threads(1)


def _image(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0


def test_winners_are_right_and_losers_wrong_samples_of_the_base(tmp_path, monkeypatch) -> None:
    rows = on_policy.on_policy_pairs(ensure_base(), n_pairs=36, seed=0, samples_per_prompt=12)
    assert [r.caption for r in rows] == all_prompts() * 3  # prompt-major, the prompts in turn
    winners = np.stack([_image(r.winner) for r in rows])
    losers = np.stack([_image(r.loser) for r in rows])
    prompts = [r.caption for r in rows]
    assert colour_correct(winners, prompts).all() and not colour_correct(losers, prompts).any()
    assert len({r.winner for r in rows}) > 24  # distinct base samples, not one image repeated
    for row, seen in zip(rows, colours_of(losers), strict=True):
        assert parse_caption(row.loser_caption)[0] != seen  # DCPO-h: what the loser shows, colour swapped


def test_a_prompt_the_base_always_gets_right_has_no_pair(monkeypatch) -> None:
    monkeypatch.setattr(on_policy, "colour_correct", lambda images, prompts: np.ones(len(prompts), dtype=bool))
    with pytest.raises(ValueError, match="every sample of 'a red circle' has the right colour"):
        on_policy.on_policy_pairs(ensure_base(), n_pairs=4, seed=0, samples_per_prompt=2)


def test_prepare_world_writes_on_policy_pairs_named_by_their_base(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(on_policy.on_policy_pairs, "__defaults__", (12,))  # samples_per_prompt: 12, not 300
    world = prepare_world(tmp_path, n_pairs=24, kind="on_policy")
    assert "pairs-on_policy-" in world.pairs.name and len(world.pairs.name.split("-")[2]) == 8  # the base's hash
    table = pq.read_table(world.pairs).to_pydict()
    assert len(table["jpg_0"]) == 24 and all(
        a + b == 1.0 for a, b in zip(table["label_0"], table["label_1"], strict=True)
    )
    assert 0 < sum(table["label_0"]) < 24  # the winner on both sides


def test_evidence_pairs_is_refused_where_no_pairs_are_trained(capsys) -> None:
    assert main(["evidence", "online", "--pairs", "on_policy", "--output-dir", "/nonexistent/x"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --pairs: `evidence online` trains on no toy preference pairs; drop it"
    )


def test_flow_evidence_refuses_on_policy_pairs_in_one_line(tmp_path, capsys) -> None:
    assert main(["evidence", "flow", "--pairs", "on_policy", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --pairs on_policy samples the UNet base: use it with `evidence offline`, not `flow`"]
