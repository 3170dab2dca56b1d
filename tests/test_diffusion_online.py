"""Group RL (Flow-GRPO / GRPO-Guard) and direct reward back-propagation (D²-Align) on tiny SD3 / SD models."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import torch
from helpers_online import PROMPTS, REWARDS_FILE, online_config, run_metrics, save_online_models
from safetensors.torch import load_file

from diffalign.config import ConfigError
from diffalign.losses import policy_registry
from diffalign.losses.policy import PolicyLossOutput
from diffalign.losses.policy_registry import PolicyStep, register_policy_loss
from diffalign.models.rollout import conditioning
from diffalign.rewards.correction import load_correction
from diffalign.trainers.diffusion_grpo import DiffusionGRPOTrainer
from diffalign.trainers.diffusion_nft import DiffusionNFTTrainer
from diffalign.trainers.direct_reward import (
    STAGE_TRAINERS,
    CorrectionStageTrainer,
    GeneratorStageTrainer,
    direct_reward_trainer,
)
from diffalign.trainers.online_rollouts import RolloutLayout
from diffalign.trainers.run import train

REWARD = f"{REWARDS_FILE}:mean_colour"


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_online_models(tmp_path_factory.mktemp("online"))


def _config(tiny_dirs, out: Path, *extra: str, backbone: str = "sd3"):
    return online_config(
        tiny_dirs, out, "grpo", [REWARD], "online.guidance_scale=2.0", *extra, backbone=backbone, sd_noise_level=1.0
    )


@pytest.mark.parametrize("backbone", ["sd3", "sd"])
@pytest.mark.parametrize("policy_loss", ["flow_grpo", "grpo_guard"])
def test_first_update_is_on_policy_and_loss_is_minus_mean_advantage(tiny_dirs, tmp_path, backbone, policy_loss):
    config = _config(tiny_dirs, tmp_path, f"online.policy_loss={policy_loss}", "train.max_steps=1", backbone=backbone)
    trainer = DiffusionGRPOTrainer(config)
    trainer.build()
    buffer = trainer._rollout_epoch(0)
    assert buffer.trained_steps == [0, 1]
    # ratio 1 before any update (exactly 1 needs the rollout's own batches, tests/test_sampling.py; shuffled
    # micro-batches mix them, which moves a UNet's output by float rounding): loss = mean(-clip(A, ±5)) (Guard: / |dt|)
    for rows in buffer.micro_batches[0]:
        for j in buffer.trained_steps:
            loss, metrics = trainer.compute_loss({"buffer": buffer, "rows": rows, "step": j, "first": False}, 0)
            assert abs(metrics["ratio/mean"].item() - 1.0) < 1e-6 and metrics["clipfrac"].item() == 0.0
            expected = -buffer.advantages[rows].clamp(-5, 5).mean()
            if policy_loss == "grpo_guard" and backbone == "sd3":  # DDIM: sqrt_dt = 1
                expected = expected / (trainer.schedule.sigmas[j] - trainer.schedule.sigmas[j + 1])
            torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_a_registered_policy_loss_is_a_config_value_and_trains(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(policy_registry, "POLICY_LOSSES", dict(policy_registry.POLICY_LOSSES))  # undone after
    with pytest.raises(ConfigError, match="'online.policy_loss' must be one of 'flow_grpo', 'grpo_guard'; got 'x2'"):
        _config(tiny_dirs, tmp_path, "online.policy_loss=x2")
    calls: list[tuple[PolicyStep, float]] = []

    @register_policy_loss("x2", needs_means=True)
    def twice_the_ratio(step: PolicyStep, *, clip_range: float, adv_clip_max: float | None) -> PolicyLossOutput:
        calls.append((step, clip_range))
        ratio = torch.exp(step.logps - step.old_logps)
        return PolicyLossOutput(2 * ratio.mean(), ratio, {"ratio/mean": ratio.mean(), "ratio/std": ratio.std()})

    trainer = DiffusionGRPOTrainer(_config(tiny_dirs, tmp_path, "online.policy_loss=x2", "online.clip_range=0.3"))
    trainer.build()
    buffer = trainer._rollout_epoch(0)
    assert buffer.means is not None  # needs_means: the rollout stored the transition means
    rows = buffer.micro_batches[0][0]
    loss, metrics = trainer.compute_loss({"buffer": buffer, "rows": rows, "step": 1, "first": False}, 0)
    ((step, clip_range),) = calls
    assert clip_range == 0.3 and step.old_means is not None
    torch.testing.assert_close(step.old_means, buffer.means[rows, 1])
    torch.testing.assert_close(step.old_logps, buffer.log_probs[rows, 1])
    torch.testing.assert_close(loss, 2 * torch.exp(step.logps - step.old_logps).mean())
    assert abs(loss.item() - 2.0) < 1e-4 and metrics["ratio_mean/step_1"].item() == metrics["ratio/mean"].item()


def test_advantages_come_from_the_rewards_of_each_group(tiny_dirs, tmp_path):
    trainer = DiffusionGRPOTrainer(_config(tiny_dirs, tmp_path, "online.advantage=group"))
    trainer.build()
    buffer = trainer._rollout_epoch(0)
    images = torch.cat([buffer.latents[:, -1]])  # pixel space: images = (x + 1) / 2
    rewards = trainer.reward(((images + 1) / 2).clamp(0, 1), buffer.prompts).view(-1, 4)
    expected = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(buffer.advantages.cpu(), expected.reshape(-1), rtol=1e-4, atol=1e-4)


def test_kept_rows_drop_zero_advantages_but_keep_micro_batch_counts(tiny_dirs, tmp_path):
    trainer = DiffusionGRPOTrainer(_config(tiny_dirs, tmp_path))
    trainer.build()  # 8 local samples, micro-batches of 4 -> 2 per pass
    adv = torch.tensor([0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 2.0, 0.0])
    rows = trainer._kept_rows(adv, torch.ones(8, dtype=torch.bool), 0)
    assert {1, 3, 6} <= set(rows) and len(rows) == 4
    rows = trainer._kept_rows(torch.zeros(8), torch.ones(8, dtype=torch.bool), 0)
    assert len(rows) == 2  # all zero: the minimum that keeps two micro-batches


def test_resumed_run_continues_exactly(tiny_dirs, tmp_path):
    full = _config(tiny_dirs, tmp_path / "full", "train.max_steps=4", "train.checkpointing_steps=2")
    train(full)
    half = _config(tiny_dirs, tmp_path / "half", "train.max_steps=2", "train.checkpointing_steps=2")
    train(half)
    resumed = _config(
        tiny_dirs,
        tmp_path / "half",
        "train.max_steps=4",
        "train.checkpointing_steps=2",
        "train.resume_from_checkpoint=latest",
    )
    train(resumed)
    a = load_file(str(tmp_path / "full" / "transformer" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "half" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = run_metrics(tmp_path / "full")
    assert {
        "reward/mean",
        "clipfrac_gt_one",
        "clipfrac_lt_one",
        "approx_kl",
        "zero_std_ratio",
        "ratio_mean/step_0",
        "ratio_std/step_1",
        "diversity/pvs",
        "diversity/embedding_spread",
    } <= set(logged[0])
    assert abs(logged[0]["ratio/mean"] - 1.0) < 1e-6 and abs(logged[1]["ratio/mean"] - 1.0) > 1e-6  # 2nd: off-policy


def test_kl_to_the_reference_is_zero_at_the_start(tiny_dirs, tmp_path):
    trainer = DiffusionGRPOTrainer(_config(tiny_dirs, tmp_path, "online.beta=0.04"))
    trainer.build()
    buffer = trainer._rollout_epoch(0)
    _, metrics = trainer.compute_loss(
        {"buffer": buffer, "rows": buffer.micro_batches[0][0], "step": 0, "first": False}, 0
    )
    assert metrics["kl"].item() == 0.0


def test_config_refuses_samplers_that_cannot_train(tiny_dirs, tmp_path):
    with pytest.raises(ConfigError, match="online.sampler"):
        _config(tiny_dirs, tmp_path, "online.sampler=ode")
    with pytest.raises(ConfigError, match="grpo_guard"):
        _config(tiny_dirs, tmp_path, "online.sampler=cps", "online.policy_loss=grpo_guard")
    with pytest.raises(ConfigError, match="reward_functions"):
        _config(tiny_dirs, tmp_path, "online.reward_functions=[]")
    trainer = DiffusionGRPOTrainer(_config(tiny_dirs, tmp_path, "train.checkpointing_steps=3", "online.inner_epochs=1"))
    with pytest.raises(ValueError, match="multiple of the 2 optimizer steps"):
        trainer.build()


def _direct(tiny_dirs, out: Path, *extra: str, backbone: str = "sd3"):
    return _config(
        tiny_dirs,
        out,
        "train.method=direct_reward",
        "train.max_steps=6",
        "train.checkpointing_steps=6",
        "optim.lr=0.05",
        "online.guidance_scale=1.0",
        *extra,
        backbone=backbone,
    )


def test_rollout_layout_splits_an_epoch_and_names_the_key_that_does_not_divide(tiny_dirs, tmp_path):
    # 2 prompts x 4 images = 8 per epoch, micro-batches of 4; MC-GRPO samples one more per prompt (its pivot)
    layout = DiffusionGRPOTrainer.rollout_layout
    assert layout(_config(tiny_dirs, tmp_path)) == RolloutLayout(4, 8, 4, 2, 2)
    assert layout(_config(tiny_dirs, tmp_path, "online.inner_epochs=2"), 2) == RolloutLayout(4, 4, 4, 1, 2)
    assert layout(_config(tiny_dirs, tmp_path, "online.sample_batch_size=2"), 2).sample_batch_size == 2
    assert DiffusionNFTTrainer.rollout_layout(_config(tiny_dirs, tmp_path, "online.advantage=mc_grpo")).group_size == 4
    with pytest.raises(ValueError, match="10 images per process .* train.train_batch_size"):
        layout(_config(tiny_dirs, tmp_path, "online.advantage=mc_grpo"))
    with pytest.raises(ValueError, match="8 images per rollout do not split over 3 processes"):
        layout(_config(tiny_dirs, tmp_path), 3)
    with pytest.raises(ValueError, match="train.gradient_accumulation_steps=2"):
        layout(_config(tiny_dirs, tmp_path, "train.gradient_accumulation_steps=2"), 2)


def test_each_direct_stage_has_its_trainer(tiny_dirs, tmp_path):
    from diffalign.methods.online import DirectRewardSettings

    stages = typing.get_args(typing.get_type_hints(DirectRewardSettings)["direct_stage"])
    assert sorted(STAGE_TRAINERS) == sorted(stages)
    stage1 = direct_reward_trainer(_direct(tiny_dirs, tmp_path, "online.direct_stage=correction"))
    assert type(stage1) is CorrectionStageTrainer and stage1.stage == "correction"
    stage2 = direct_reward_trainer(_direct(tiny_dirs, tmp_path))
    assert type(stage2) is GeneratorStageTrainer and stage2.stage == "generator"


def test_reconstruction_with_the_exact_velocity_recovers_x0(tiny_dirs, tmp_path):
    trainer = direct_reward_trainer(_direct(tiny_dirs, tmp_path))
    trainer.build()
    x0 = torch.randn(2, 3, 16, 16)
    captured = {}

    def exact_velocity(x_t, timesteps, cond):
        sigma = (timesteps.float() / 1000).reshape(-1, 1, 1, 1)
        eps = (x_t - (1 - sigma) * x0) / sigma
        captured["eps"] = eps
        return eps - x0

    trainer.adapter.predict = exact_velocity
    cond = conditioning(trainer.adapter, PROMPTS[:2], 16)
    x0_hat = trainer.reconstruct(x0, cond, [0, 1], epoch=0)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=1e-4)


def test_d2_align_stage_one_learns_b_v_and_stage_two_uses_it(tiny_dirs, tmp_path):
    stage1 = train(_direct(tiny_dirs, tmp_path / "s1", "online.direct_stage=correction"))
    b_v = load_correction(tmp_path / "s1")
    assert b_v.shape == (4,) and b_v.norm() > 0
    logged = run_metrics(tmp_path / "s1")
    assert logged[-1]["reward"] > logged[0]["reward"]  # the guided reward of the frozen generator's samples rises
    assert "diversity/pvs" in logged[0]
    assert stage1.global_step == 6
    stage2 = _direct(
        tiny_dirs,
        tmp_path / "s2",
        "online.direct_stage=generator",
        f"online.reward_correction={tmp_path / 's1'}",
        "optim.lr=1e-3",
    )
    train(stage2)
    assert (tmp_path / "s2" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


def test_direct_reward_raises_the_reward_on_sd(tiny_dirs, tmp_path):
    train(
        _direct(tiny_dirs, tmp_path, "optim.lr=1e-3", "train.max_steps=8", "train.checkpointing_steps=8", backbone="sd")
    )
    logged = run_metrics(tmp_path)
    first, last = sum(m["reward"] for m in logged[:2]) / 2, sum(m["reward"] for m in logged[-2:]) / 2
    assert last > first


def test_online_sigma_schedule_picks_the_dance_or_the_pipeline_grid(tiny_dirs, tmp_path):
    from diffalign.models.sampling import dance_sigmas

    grids = {}
    for choice in ("null", "pipeline", "dance"):
        config = _config(tiny_dirs, tmp_path / choice, "online.sampler=dance", f"online.sigma_schedule={choice}")
        trainer = DiffusionGRPOTrainer(config)
        trainer.build()
        grids[choice] = trainer.schedule.sigmas
    _, pipeline_sigmas = trainer.adapter.sampling_schedule(3, 16)
    _, dance = dance_sigmas(3, float(trainer.adapter.scheduler.config.shift))
    assert torch.equal(grids["pipeline"], pipeline_sigmas)
    assert torch.equal(grids["null"], grids["dance"]) and torch.allclose(grids["dance"], dance, atol=0, rtol=0)
    assert not torch.equal(grids["dance"], grids["pipeline"])
