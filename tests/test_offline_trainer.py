"""End-to-end checks of the offline trainer on tiny models: exact resume, process-count independence,
cache parity, non-finite guards, metrics, and outputs that diffusers loads back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.tracking import ClearMLTracker, MLflowTracker, WandBTracker
from safetensors.torch import load_file

from diffalign.config import Config
from diffalign.models.tiny import save_tiny_sd_pipeline
from diffalign.trainers.base import NonFiniteLossError
from diffalign.trainers.checkpointing import list_checkpoints
from diffalign.trainers.metrics import read_metrics, run_name
from diffalign.trainers.offline import OfflinePreferenceTrainer, train
from diffalign.trainers.run import train as run_train
from diffalign.trainers.sft import SFTTrainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vae_pipeline(tmp_path_factory) -> str:
    return str(save_tiny_sd_pipeline(tmp_path_factory.mktemp("vae") / "model", with_vae=True, sample_size=16))


def make_config(model: str, data: str, out: Path, **train) -> Config:
    cfg = Config()
    cfg.model.pretrained = model
    cfg.data.path = data
    cfg.data.resolution = 16
    cfg.data.proportion_empty_prompts = 0.2
    cfg.lora.rank = 4
    cfg.optim.lr = 1e-3
    cfg.train.output_dir = str(out)
    cfg.train.train_batch_size = 2
    cfg.train.max_steps = 4
    cfg.train.checkpointing_steps = 2
    cfg.train.progress_bar = False
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def trainable_state(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(out)[-1] / "trainable_0.safetensors"))


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0.0 if atol == 0 else 1e-5, msg=k)


def test_dpo_lora_trains_logs_and_resumes_exactly(pixel_pipeline, pairs, tmp_path):
    full = make_config(pixel_pipeline, pairs, tmp_path / "full", gradient_accumulation_steps=2)
    result = train(full)
    assert result.global_step == 4
    records = read_metrics(tmp_path / "full")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    first = records[0]
    for key in (
        "loss",
        "rewards/accuracies",  # TRL's names, as the LLM trainers log them
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "mse_policy_chosen",
        "mse_policy_rejected",
        "mse_reference_chosen",
        "mse_reference_rejected",
        "learning_rate",
        "step_time_s",
        "grad_norm",
    ):
        assert key in first, key
    assert not {"implicit_acc", "reward_margin", "rewards_chosen", "rewards_rejected", "lr"} & first.keys()
    # LoRA B starts at zero: policy == reference, so the first micro-batch's loss is ln 2 exactly, every implicit
    # reward is 0 and every pair a tie (accuracy ½).
    assert first["mse_policy_chosen"] == pytest.approx(first["mse_reference_chosen"], abs=0)
    assert (first["rewards/chosen"], first["rewards/rejected"], first["rewards/margins"]) == (0.0, 0.0, 0.0)
    assert first["rewards/accuracies"] == 0.5
    assert all(r["learning_rate"] == pytest.approx(1e-3, rel=1e-12) for r in records)  # constant schedule
    last = records[-1]
    assert last["rewards/margins"] == pytest.approx(last["rewards/chosen"] - last["rewards/rejected"], rel=1e-5)
    assert last["rewards/margins"] != 0.0
    assert records[-1]["loss"] != pytest.approx(0.6931471805599453, abs=1e-7)

    interrupted = make_config(pixel_pipeline, pairs, tmp_path / "resumed", gradient_accumulation_steps=2, max_steps=2)
    train(interrupted)
    resumed = make_config(
        pixel_pipeline, pairs, tmp_path / "resumed", gradient_accumulation_steps=2, resume_from_checkpoint="latest"
    )
    train(resumed)
    assert_states_equal(trainable_state(tmp_path / "full"), trainable_state(tmp_path / "resumed"))
    assert [r["loss"] for r in read_metrics(tmp_path / "resumed")] == [r["loss"] for r in records]


@pytest.mark.filterwarnings("ignore:`log_with=:UserWarning")  # wandb is not installed: accelerate drops it
def test_first_step_loss_is_ln2_for_dpo_and_trackers_get_the_names(pixel_pipeline, pairs, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(Accelerator, "init_trackers", lambda self, *a, **kw: calls.append((a, kw)))
    cfg = make_config(pixel_pipeline, pairs, tmp_path / "o", max_steps=1, report_to=["wandb"])
    cfg.train.tracker_project_name, cfg.train.run_name = "sd15-dpo", "beta-5000"
    train(cfg)
    assert read_metrics(tmp_path / "o")[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    [((project,), kwargs)] = calls
    assert project == "sd15-dpo" and kwargs["config"]["train.run_name"] == "beta-5000"
    # what accelerate builds from them (accelerate/tracking.py; constructing imports no tracker package)
    init = kwargs["init_kwargs"]
    wandb = WandBTracker(project, **init["wandb"])
    assert (wandb.run_name, wandb.init_kwargs) == ("sd15-dpo", {"name": "beta-5000"})  # wandb.init(project, name)
    mlflow = MLflowTracker(project, **init["mlflow"])
    assert (mlflow.experiment_name, mlflow.run_name) == ("sd15-dpo", "beta-5000")
    assert ClearMLTracker(project, **init["clearml"]).init_kwargs == {"task_name": "beta-5000"}
    assert run_name(None, tmp_path / "o") == "o"  # train.run_name null: the output folder's name


def test_cached_training_equals_uncached(pixel_pipeline, pairs, tmp_path):
    plain = make_config(pixel_pipeline, pairs, tmp_path / "plain", max_steps=2)
    train(plain)
    cached = make_config(pixel_pipeline, pairs, tmp_path / "cached", max_steps=2)
    cached.data.cache_dir = str(tmp_path / "cache")
    train(cached)
    assert_states_equal(trainable_state(tmp_path / "plain"), trainable_state(tmp_path / "cached"), atol=1e-6)


@pytest.mark.parametrize("method,loss", [("mapo", "mapo"), ("sft", "sft"), ("dcpo", "dpo")])
def test_other_methods_run(method, loss, pixel_pipeline, pairs, tmp_path):
    cfg = make_config(pixel_pipeline, pairs, tmp_path / method, method=method, max_steps=2)
    cfg.loss.name = loss
    cfg.loss.beta = 0.1 if loss == "mapo" else 5000.0
    cfg.data.dual_captions = method == "dcpo"
    result = run_train(cfg)
    assert result.global_step == 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_metrics(tmp_path / method))


def test_pairwise_trainer_refuses_a_chosen_only_loss(pixel_pipeline, pairs, tmp_path):
    cfg = make_config(pixel_pipeline, pairs, tmp_path / "o", method="sft")
    cfg.loss.name = "sft"
    with pytest.raises(ValueError, match="loss.name 'sft' scores the chosen image only.*run.train"):
        OfflinePreferenceTrainer(cfg).build()


def test_full_finetune_output_loads_with_from_pretrained(pixel_pipeline, pairs, tmp_path):
    from diffusers import UNet2DConditionModel

    cfg = make_config(pixel_pipeline, pairs, tmp_path / "ft", max_steps=2)
    cfg.lora.enabled = False
    trainer = OfflinePreferenceTrainer(cfg)
    trainer.train()
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "ft" / "unet")
    trained = trainer.accelerator.unwrap_model(trainer.model)
    base = UNet2DConditionModel.from_pretrained(pixel_pipeline, subfolder="unet")
    x, t, ehs = torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), torch.randn(2, 77, base.config.cross_attention_dim)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, t, ehs).sample, trained(x, t, ehs).sample)
        assert not torch.allclose(base(x, t, ehs).sample, reloaded(x, t, ehs).sample)


def test_lora_output_loads_into_diffusers_pipeline(vae_pipeline, pairs, tmp_path):
    from diffusers import StableDiffusionPipeline

    cfg = make_config(vae_pipeline, pairs, tmp_path / "lora", max_steps=2)
    trainer = OfflinePreferenceTrainer(cfg)
    trainer.train()
    pipe = StableDiffusionPipeline.from_pretrained(vae_pipeline, safety_checker=None)
    pipe.load_lora_weights(tmp_path / "lora")
    trained = trainer.accelerator.unwrap_model(trainer.model)
    latents = torch.randn(2, pipe.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    t, ehs = torch.tensor([10, 500]), torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(latents, t, ehs).sample, trained(latents, t, ehs).sample)


class _NanAt(OfflinePreferenceTrainer):
    nan_calls: set[int] = set()

    def compute_loss(self, batch, epoch):
        self.calls = getattr(self, "calls", 0) + 1
        loss, metrics = super().compute_loss(batch, epoch)
        return (loss * float("nan") if self.calls in self.nan_calls else loss), metrics


def test_nonfinite_step_is_skipped_and_counted(pixel_pipeline, pairs, tmp_path):
    _NanAt.nan_calls = {2}
    trainer = _NanAt(make_config(pixel_pipeline, pairs, tmp_path / "o", max_steps=3))
    result = trainer.train()
    assert result.nonfinite_steps == 1
    records = read_metrics(tmp_path / "o")
    assert [r["nonfinite_steps"] for r in records] == [0, 1, 1]
    assert "loss" not in records[1] and "loss" in records[2]


def test_repeated_nonfinite_losses_stop_without_saving_the_bad_state(pixel_pipeline, pairs, tmp_path):
    _NanAt.nan_calls = set(range(1, 100))
    cfg = make_config(pixel_pipeline, pairs, tmp_path / "o", max_steps=10, max_nonfinite_steps=3)
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite steps .*checkpoint-2") as raised:
        _NanAt(cfg).train()
    assert raised.value.exit_code == 1
    # step 2's regular checkpoint (skipped steps leave the weights as they were) is the last: no checkpoint-3
    assert [c.name for c in list_checkpoints(tmp_path / "o")] == ["checkpoint-2"]


def test_two_processes_match_one_process(pixel_pipeline, pairs, tmp_path, run_train_script):
    """2 processes x batch 2 == 1 process x batch 2 x 2 accumulation steps, bit for bit: the same samples, the same
    draws and the same gradient ((g0 + g1) / 2 either way: halving is exact in binary floating point and a sum of
    two terms does not depend on their order). One process at batch 4 is NOT compared bit for bit: the convolutions
    round differently at batch 4 than at batch 2 (1 ulp, 6e-8, of a per-sample log-likelihood at identical weights,
    measured), which beta = 5000 turns into ~1e-4 in the step-2 loss; that is float rounding, not a different run."""
    common = [
        f"model.pretrained={pixel_pipeline}",
        f"data.path={pairs}",
        "data.resolution=16",
        "data.proportion_empty_prompts=0.2",
        "lora.rank=4",
        "optim.lr=0.05",
        "optim.adam_epsilon=1.0",
        "train.max_steps=2",
        "train.train_batch_size=2",
        "train.progress_bar=false",
    ]
    common = ["--config", str(REPO / "configs" / "toy" / "dpo.yaml"), *common]
    one = run_train_script([*common, "train.gradient_accumulation_steps=2", f"train.output_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_train_script([*common, f"train.output_dir={tmp_path / 'two'}"], processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_states_equal(trainable_state(tmp_path / "one"), trainable_state(tmp_path / "two"))
    base = load_file(str(Path(pixel_pipeline) / "unet" / "diffusion_pytorch_model.safetensors"))
    moved = max((v - base[k]).abs().max().item() for k, v in trainable_state(tmp_path / "one").items())
    assert moved > 1e-5
    metrics_one, metrics_two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for key in ("loss", "mse_policy_chosen", "mse_reference_rejected", "grad_norm"):
        assert [r[key] for r in metrics_one] == [r[key] for r in metrics_two], key
    assert metrics_one[1]["loss"] != metrics_one[0]["loss"]  # step 2 is off the reference: a real comparison
    assert json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


@pytest.mark.parametrize("method,weighting", [("sft", "min_snr"), ("dpo", "min_snr"), ("dpo", "truncated_snr")])
def test_snr_weighting_scales_each_samples_mse(method, weighting, pixel_pipeline, pairs, tmp_path):
    cfg = make_config(pixel_pipeline, pairs, tmp_path / "o", method=method)
    cfg.loss.name = method
    cfg.lora.enabled = False
    cfg.data.proportion_empty_prompts = 0.0
    cfg.loss.weighting = weighting
    cfg.loss.snr_gamma = 5.0 if weighting == "min_snr" else 1.0
    trainer = (SFTTrainer if method == "sft" else OfflinePreferenceTrainer)(cfg)
    trainer.build()
    batch = trainer.collate([trainer.dataset[i] for i in range(4)])
    with torch.no_grad():
        for p in trainer.model.parameters():  # move the policy off the reference so the DPO logit is not 0
            p.add_(0.01 * torch.randn_like(p))
        loss, metrics = trainer.compute_loss(batch, epoch=0)
    t = trainer.adapter.sample_timesteps(cfg.train.seed, 0, batch["index"].tolist())
    w = trainer.adapter.snr_weights(t, cfg.loss.snr_gamma, weighting)
    assert not torch.allclose(w, torch.ones_like(w))  # the draw includes re-weighted samples
    if method == "sft":
        expected = (0.5 * w * metrics["mse_policy_chosen"]).mean()
    else:
        m = metrics
        delta = (m["mse_policy_chosen"] - m["mse_reference_chosen"]) - (
            m["mse_policy_rejected"] - m["mse_reference_rejected"]
        )
        expected = torch.nn.functional.softplus(0.5 * cfg.loss.beta * w * delta).mean()
        assert abs(float(expected) - 0.6931471805599453) > 1e-3
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


def test_ema_is_checkpointed_as_safetensors_and_resumes_exactly(pixel_pipeline, pairs, tmp_path):
    def ema_config(out: Path, **train) -> Config:
        cfg = make_config(pixel_pipeline, pairs, out, ema=True, ema_decay=0.5, **train)
        cfg.lora.enabled = False  # full fine-tune: the export is the EMA of every UNet weight
        return cfg

    train(ema_config(tmp_path / "full"))
    train(ema_config(tmp_path / "resumed", max_steps=2))
    train(ema_config(tmp_path / "resumed", resume_from_checkpoint="latest"))
    checkpoint = list_checkpoints(tmp_path / "resumed")[-1]
    # no custom_checkpoint_0.pkl (accelerate unpickles it with weights_only=False); its RNG file loads weights_only
    assert (checkpoint / "ema.safetensors").is_file() and not list(checkpoint.glob("custom_checkpoint_*"))
    ema = load_file(str(checkpoint / "ema.safetensors"))
    assert ema.keys() == trainable_state(tmp_path / "resumed").keys()
    exported = {
        name: load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
        for name, out in (("full", tmp_path / "full"), ("resumed", tmp_path / "resumed"))
    }
    assert exported["full"].keys() == exported["resumed"].keys()
    assert all(torch.equal(exported["full"][k], exported["resumed"][k]) for k in exported["full"])
    last = trainable_state(tmp_path / "full")  # the raw weights after step 4; the export is their EMA
    assert any(not torch.equal(exported["full"][k], last[k]) for k in last)
    assert all(torch.equal(exported["full"][k], ema[k]) for k in ema)
