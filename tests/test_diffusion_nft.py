"""DiffusionNFT (train.method nft) and MARBLE's reward balance on tiny SD3 / SD models: the config's defaults, the
trainer's loss against its closed form at the old policy, the old-policy schedule, exact resume, and MARBLE's
logged coefficients and cosines (with Flow-GRPO too)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_online import REWARDS_FILE, online_config, run_metrics, save_online_models
from safetensors.torch import load_file

from diffalign.config import ConfigError
from diffalign.losses.nft import old_policy_decay
from diffalign.trainers.diffusion_nft import OLD_POLICY_FILE, DiffusionNFTTrainer
from diffalign.trainers.run import train

COLOUR, DARK, RED = (f"{REWARDS_FILE}:{name}" for name in ("mean_colour", "darkness", "red_only"))


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return save_online_models(tmp_path_factory.mktemp("nft"))


def _config(tiny_dirs, out: Path, *extra: str, backbone: str = "sd3"):
    return online_config(tiny_dirs, out, "nft", [COLOUR], *extra, backbone=backbone, sd_noise_level=0.0)


def test_nft_defaults_are_the_authors_and_marble_needs_several_unweighted_rewards(tiny_dirs, tmp_path):
    config = _config(tiny_dirs, tmp_path)
    assert (config.online.sampler, config.online.guidance_scale) == ("ode", 1.0)  # DiffusionNFT's, not GRPO's
    assert (config.nft.beta, config.nft.kl_beta, config.nft.old_policy_decay) == (1.0, 1e-4, 1)
    grpo = _config(tiny_dirs, tmp_path, "train.method=grpo")
    assert (grpo.online.sampler, grpo.online.guidance_scale) == ("sde", 4.5)
    assert _config(tiny_dirs, tmp_path, "online.guidance_scale=3.0").online.guidance_scale == 3.0
    with pytest.raises(ConfigError, match="online.reward_functions.*two or more"):
        _config(tiny_dirs, tmp_path, "online.reward_balance=marble")
    with pytest.raises(ConfigError, match="online.reward_weights"):
        _config(
            tiny_dirs,
            tmp_path,
            "online.reward_balance=marble",
            f"online.reward_functions=[{COLOUR},{DARK}]",
            "online.reward_weights=[1.0,1.0]",
        )
    with pytest.raises(ConfigError, match="nft.old_policy_decay"):
        _config(tiny_dirs, tmp_path, "nft.old_policy_decay=3")


def _adaptive_fm(velocity, target, sigma):
    err = sigma.reshape(-1, 1, 1, 1) * (target - velocity)
    weight = err.detach().abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-5)
    return (err**2 / weight).mean(dim=(1, 2, 3))


@pytest.mark.parametrize("backbone", ["sd3", "sd"])
def test_at_the_old_policy_the_loss_is_flow_matching_and_its_gradient_follows_2r_minus_1(tiny_dirs, tmp_path, backbone):
    """θ = θ_old on the first epoch: v⁺ = v⁻ = v_θ, so loss = s·mean_b ℓ_b(v_θ)/β (+ KL = 0) and the gradient is
    that of s·mean_b (2r_b − 1)·ℓ_b(v_θ), recomputed here from the adapter alone."""
    trainer = DiffusionNFTTrainer(_config(tiny_dirs, tmp_path, "nft.beta=0.5", backbone=backbone))
    trainer.build()
    buffer, units = trainer.make_buffer(0)
    assert len(units) == 2 * 2  # 8 images / 4 per micro-batch, int(3 * 0.67) = 2 timesteps each
    unit = {**units[1], "buffer": buffer, "first": False, "opt_step": 0, "step_first": False}
    params = trainer.trainable_parameters()
    loss, metrics = trainer.compute_loss(unit, 0)
    grads = torch.autograd.grad(loss, params)

    rows = torch.tensor(unit["rows"])
    x0 = buffer.clean[rows]
    t = trainer.schedule.timesteps[buffer.timestep_order[0][rows, unit["j"]]]
    from diffalign.trainers.diffusion_nft import TRAIN_NOISE_STREAM
    from diffalign.utils.randomness import per_sample_normal, sample_key

    noise = per_sample_normal(x0.shape[1:], sample_key(0, 0, 0, TRAIN_NOISE_STREAM), unit["j"], unit["rows"])
    cond = {k: v[rows] for k, v in buffer.cond.items()}
    velocity = trainer.adapter.predict(trainer.adapter.add_noise(x0, noise, t), t, cond)
    target = trainer.adapter.target(x0, noise, t)
    ell = _adaptive_fm(velocity.float(), target, trainer.adapter.x0_error_scale(t))
    adv = buffer.advantages[rows].clamp(-5, 5)
    r = adv / 10 + 0.5
    torch.testing.assert_close(loss, 5.0 * ell.mean() / 0.5, rtol=1e-5, atol=1e-7)
    assert metrics["old_deviate"].item() == 0.0 and abs(metrics["r_mean"].item() - r.mean().item()) < 1e-6
    expected = torch.autograd.grad(5.0 * ((2 * r - 1) * ell).mean(), params)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_x0_error_scale_is_the_closed_form_of_each_parametrisation(tiny_dirs, tmp_path):
    sd3 = DiffusionNFTTrainer(_config(tiny_dirs, tmp_path / "a"))
    sd3.build()
    t = sd3.schedule.timesteps
    torch.testing.assert_close(sd3.adapter.x0_error_scale(t), t.float() / 1000)
    sd = DiffusionNFTTrainer(_config(tiny_dirs, tmp_path / "b", backbone="sd"))
    sd.build()
    t = sd.schedule.timesteps
    abar = sd.adapter.scheduler.alphas_cumprod[t].float()
    torch.testing.assert_close(sd.adapter.x0_error_scale(t), (1 - abar).sqrt() / abar.sqrt())


def test_rollouts_come_from_the_old_policy_which_follows_the_decay_schedule(tiny_dirs, tmp_path):
    out = tmp_path / "run"
    config = _config(
        tiny_dirs,
        out,
        "train.max_steps=4",
        "train.checkpointing_steps=2",
        "train.checkpoints_total_limit=2",
        "nft.old_policy_decay=2",
    )
    trainer = DiffusionNFTTrainer(config)
    result = trainer.train()
    assert result.global_step == 4
    # 2 optimizer steps per epoch; schedule 2 is flat (decay 0) for 75 steps, so at step 4 (before epoch 2's
    # update) the old policy is the policy of step 2, which sampled epoch 1
    ckpt = load_file(str(out / "checkpoint-4" / OLD_POLICY_FILE))
    after_2 = load_file(str(out / "checkpoint-2" / "trainable_0.safetensors"))
    assert old_policy_decay(2, 2) == 0.0 and old_policy_decay(80, 2) == pytest.approx(0.0375)
    assert set(ckpt) == set(after_2)
    for name, value in ckpt.items():
        torch.testing.assert_close(value, after_2[name], rtol=0, atol=0)
    names = trainer._trainable_names()
    current = dict(zip(names, trainer.old.values, strict=True))
    trainer.old.update(0.25)
    for name, param in zip(names, trainer.trainable_parameters(), strict=True):
        torch.testing.assert_close(current[name], 0.25 * ckpt[name] + 0.75 * param.detach())


@pytest.mark.slow
def test_resumed_run_continues_exactly(tiny_dirs, tmp_path):
    extra = (
        "train.max_steps=4",
        "train.checkpointing_steps=2",
        f"online.reward_functions=[{COLOUR},{DARK}]",
        "online.reward_balance=marble",
        "online.marble_every=3",
    )
    straight = train(_config(tiny_dirs, tmp_path / "straight", *extra))
    part = _config(tiny_dirs, tmp_path / "resumed", *extra[1:], "train.max_steps=2")
    train(part)
    resumed = train(_config(tiny_dirs, tmp_path / "resumed", *extra, "train.resume_from_checkpoint=latest"))
    assert resumed.resumed_from == 2 and straight.global_step == resumed.global_step == 4
    for name in ("trainable_0.safetensors", OLD_POLICY_FILE):
        a = load_file(str(tmp_path / "straight" / "checkpoint-4" / name))
        b = load_file(str(tmp_path / "resumed" / "checkpoint-4" / name))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    state = json.loads((tmp_path / "resumed" / "checkpoint-4" / "trainer_state.json").read_text())
    alpha = state["extra"]["reward_balance"]["alpha"]
    assert len(alpha) == 2 and sum(alpha) == pytest.approx(1.0)


def test_marble_logs_coefficients_and_positive_cosines_and_nft_learns_the_reward(tiny_dirs, tmp_path):
    out = tmp_path / "marble"
    train(
        _config(
            tiny_dirs,
            out,
            f"online.reward_functions=[{COLOUR},{DARK},{RED}]",
            "online.reward_balance=marble",
            "online.marble_every=2",
            "train.max_steps=4",
            "train.checkpointing_steps=4",
        )
    )
    logged = run_metrics(out)
    solved = [m for m in logged if "balance/alpha_darkness" in m]
    assert [m["step"] for m in solved] == [1, 3]  # optimizer steps 0 and 2 (logged as 1 and 3) solve the program
    for m in solved:
        alphas = [m[f"balance/alpha_{n}"] for n in ("mean_colour", "darkness", "red_only")]
        assert min(alphas) >= 0 and sum(alphas) == pytest.approx(1.0, abs=1e-5)
        assert m["balance/cos_min"] > 0  # the min-norm direction agrees with every reward's gradient
    assert all("reward/red_only" in m for m in logged if "reward/mean" in m)


@pytest.mark.slow
def test_weighted_sum_logs_the_per_reward_cosines_and_grpo_takes_marble(tiny_dirs, tmp_path):
    train(
        _config(
            tiny_dirs,
            tmp_path / "ws",
            f"online.reward_functions=[{COLOUR},{DARK}]",
            "online.reward_gradient_log_every=1",
        )
    )
    logged = run_metrics(tmp_path / "ws")
    assert all("balance/cos_darkness" in m and "balance/alpha_darkness" not in m for m in logged)
    grpo = tmp_path / "grpo"
    train(
        _config(
            tiny_dirs,
            grpo,
            "train.method=grpo",
            "online.sampler=sde",
            "online.guidance_scale=1.0",
            f"online.reward_functions=[{COLOUR},{DARK}]",
            "online.reward_balance=marble",
        )
    )
    logged = run_metrics(grpo)
    assert all(m["balance/cos_min"] > 0 and "balance/alpha_mean_colour" in m for m in logged)
