"""SAIL (arXiv 2602.05380): the implicit-reward judge, best-vs-worst pairs, the seed mixture, and the
round loop's resumption on a tiny SD model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffalign.config import Config
from diffalign.data.self_pairs import best_worst_pairs, mix_with_seed, read_rows
from diffalign.data.synthetic import make_random_pairs, write_pickapic_parquet
from diffalign.eval.implicit_reward import implicit_dpo_rewards
from diffalign.models.diffusion import SDAdapter
from diffalign.models.tiny import tiny_sd_components
from diffalign.trainers.run import train
from diffalign.trainers.sail import sail_rounds


def _adapter(seed: int = 0) -> SDAdapter:
    c = tiny_sd_components()
    torch.manual_seed(seed)
    return SDAdapter(c["unet"], c["scheduler"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"])


def test_implicit_reward_is_the_dpo_formula_with_shared_draws():
    policy, reference = _adapter(), _adapter()
    with torch.no_grad():
        for p in reference.denoiser.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x0 = torch.randn(4, 4, 16, 16)
    cond = policy.encode_prompts(["a", "a", "b", "b"])
    groups = [0, 0, 1, 1]
    r = implicit_dpo_rewards(policy, reference, x0, cond, groups, beta=50.0, draws=3, seed=1)
    assert torch.equal(implicit_dpo_rewards(policy, policy, x0, cond, groups, beta=50.0, draws=3), torch.zeros(4))
    expected = torch.zeros(4)
    for d in range(3):
        addresses = [g * 3 + d for g in groups]
        t = policy.sample_timesteps(1, 0, addresses)
        eps = policy.sample_noise((4, 16, 16), 1, 0, addresses)
        assert torch.equal(t[0], t[1]) and torch.equal(eps[2], eps[3])  # a group shares its draws
        expected += policy.per_sample_mse(x0, eps, t, cond) - reference.per_sample_mse(x0, eps, t, cond)
    torch.testing.assert_close(r, -25.0 * expected / 3)


def test_best_worst_pairs_and_the_seed_mixture():
    images = torch.rand(6, 3, 8, 8)
    rewards = torch.tensor([0.1, 0.5, -0.2, 1.0, 1.0, 1.0])
    rows, stats = best_worst_pairs(images, ["p"] * 3 + ["q"] * 3, rewards, [0, 0, 0, 1, 1, 1])
    assert len(rows) == 1 and stats["tied_groups"] == 1.0  # group 1 ties: no pair
    assert rows[0]["reward_margin"] == pytest.approx(0.7) and rows[0]["caption"] == "p"
    seed = [{"jpg_0": b"s", "jpg_1": b"t", "label_0": 1.0, "label_1": 0.0, "caption": f"s{i}"} for i in range(9)]
    mixed = mix_with_seed(seed, rows, self_fraction=0.25, seed=0)
    assert len(mixed) == 12 and sum(r["jpg_0"] == rows[0]["jpg_0"] for r in mixed) == 3  # 25 % self-generated
    assert mix_with_seed(seed, rows, self_fraction=0.0) == seed
    with pytest.raises(ValueError, match="self_fraction"):
        mix_with_seed(seed, rows, self_fraction=1.0)


def _config(model: str, data: Path, prompts: Path, out: Path) -> Config:
    cfg = Config()
    cfg.model.pretrained = model
    cfg.data.path = str(data)
    cfg.data.resolution = 16
    cfg.data.hflip = False
    cfg.lora.rank = 4
    cfg.optim.lr = 1e-3
    cfg.train.method = "sail"
    cfg.train.output_dir = str(out)
    cfg.train.train_batch_size = 2
    cfg.train.max_steps = 2
    cfg.train.progress_bar = False
    cfg.sail.rounds = 2
    cfg.sail.prompts = str(prompts)
    cfg.sail.prompts_per_round = 2
    cfg.sail.samples_per_prompt = 3
    cfg.sail.reward_draws = 2
    cfg.sail.sample_steps = 2
    cfg.sail.guidance_scale = 2.0
    cfg.sail.self_fraction = 0.5
    return cfg


def test_sail_loop_runs_saves_every_round_and_resumes(tiny_sd_dirs, tmp_path):
    data = write_pickapic_parquet(tmp_path / "seed.parquet", make_random_pairs(4, size=16, seed=0))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    out = tmp_path / "sail"
    train(_config(str(tiny_sd_dirs["eps"]), data, prompts, out))
    rounds = sail_rounds(out)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all((out / f"round_{i}" / "model" / "unet" / "config.json").is_file() for i in range(3))
    for r in (1, 2):
        mixed = read_rows(out / f"round_{r}" / "pairs.parquet")
        assert len(mixed) == 4 + 4  # the seed pairs plus alpha/(1 - alpha) x 4 self-generated
        assert {row["caption"] for row in mixed[4:]} <= {"a red circle", "a blue square", "a green triangle"}
    # round 2 used the prompts after round 1's (fresh prompts while the file lasts)
    assert {row["caption"] for row in read_rows(out / "round_2" / "self_pairs.parquet")} <= {
        "a green triangle",
        "a red circle",
    }
    weights = (out / "round_2" / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    pairs_mtime = (out / "round_2" / "pairs.parquet").stat().st_mtime_ns
    # a stop after round 2's training, before its record: the rerun redoes neither sampling nor training
    (out / "round_2" / "round.json").unlink()
    first_round = (out / "round_0" / "round.json").stat().st_mtime_ns
    train(_config(str(tiny_sd_dirs["eps"]), data, prompts, out))
    assert (out / "round_2" / "pairs.parquet").stat().st_mtime_ns == pairs_mtime
    assert (out / "round_0" / "round.json").stat().st_mtime_ns == first_round
    assert (out / "round_2" / "model" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    assert json.loads((out / "round_2" / "round.json").read_text())["round"] == 2


def test_read_rows_takes_image_structs_and_names_a_missing_image(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffalign.data.pickapic import BadRowError

    image = tmp_path / "a.png"
    image.write_bytes(b"png-bytes")
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "jpg_0": pa.array([{"bytes": b"x", "path": None}, {"bytes": None, "path": str(image)}], struct),
            "jpg_1": pa.array([{"bytes": b"y", "path": None}, {"bytes": b"z", "path": None}], struct),
            "label_0": [1.0, 0.0],
            "label_1": [0.0, 1.0],
            "caption": ["p", "q"],
        }
    )
    pq.write_table(table, tmp_path / "ok.parquet")
    assert [(r["jpg_0"], r["jpg_1"]) for r in read_rows(tmp_path / "ok.parquet")] == [
        (b"x", b"y"),
        (b"png-bytes", b"z"),
    ]
    pq.write_table(table.set_column(0, "jpg_0", pa.array([None, None], struct)), tmp_path / "bad.parquet")
    with pytest.raises(BadRowError, match=r"bad.parquet: row 0: missing jpg_0"):
        read_rows(tmp_path / "bad.parquet")
