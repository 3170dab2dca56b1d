"""Scale features on tiny models: optimizers (AdamW, Adafactor, 8-bit AdamW), gradient checkpointing, bf16 mixed
precision with fp32 loss math, and the multi-GPU accelerate configs in configs/accelerate/."""

from __future__ import annotations

import math
import os
import re
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from helpers_config import tiny_lora_config

from diffalign.config import OPTIMIZERS, Config, ConfigError, OptimConfig, config_from_dict
from diffalign.data.synthetic import make_random_pairs, write_pickapic_parquet
from diffalign.models.diffusion import SDAdapter
from diffalign.models.lora import add_lora
from diffalign.models.tiny import tiny_sd_components
from diffalign.trainers import base as trainer_base
from diffalign.trainers.metrics import read_metrics
from diffalign.trainers.offline import OfflinePreferenceTrainer, train
from diffalign.trainers.optimizers import ADAFACTOR_KWARGS, build_optimizer
from diffalign.trainers.reference import AdaptersDisabled

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"
LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "pairs.parquet"
    write_pickapic_parquet(path, make_random_pairs(8, size=16, seed=0))
    return str(path)


@pytest.fixture
def fresh_accelerate_state():
    """AcceleratorState is a process-wide singleton that refuses a second mixed-precision setting: reset it around
    tests that change it, so that neither they nor later tests see a stale one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def make_config(model: str, data: str, out: Path, **train_kwargs) -> Config:
    return tiny_lora_config(model, data, out, **{"max_steps": 2, "checkpointing_steps": 100, **train_kwargs})


# -------------------------------------------------------------------------------------------------- optimizers


def _one_step(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    model(x).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _tiny_model() -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_optimizer_builds_and_a_step_changes_every_parameter(name):
    model = _tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    oc = OptimConfig(optimizer=name, weight_decay=0.03)
    optimizer = build_optimizer(model.parameters(), oc, lr=1e-2)
    _one_step(optimizer, model)
    for old, new in zip(before, model.parameters(), strict=True):
        assert not torch.equal(old, new)
    group = optimizer.param_groups[0]
    assert group["lr"] == 1e-2 and group["weight_decay"] == 0.03
    if name == "adamw":
        assert type(optimizer) is torch.optim.AdamW
        assert group["betas"] == (oc.adam_beta1, oc.adam_beta2) and group["eps"] == oc.adam_epsilon
    else:
        from transformers.optimization import Adafactor

        assert type(optimizer) is Adafactor
        # DiffusionDPO train.py, SDXL branch: the given lr, no relative step or parameter scaling, update clip 1.0
        assert {k: group[k] for k in ADAFACTOR_KWARGS} == {
            "clip_threshold": 1.0,
            "scale_parameter": False,
            "relative_step": False,
            "warmup_init": False,
        }


def test_adamw_8bit_without_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(ImportError, match=re.escape("pip install 'diffalign[8bit]'")) as info:
        build_optimizer(_tiny_model().parameters(), OptimConfig(optimizer="adamw_8bit"), lr=1e-3)
    assert "optim.optimizer=adamw_8bit" in str(info.value)


def test_adamw_8bit_passes_adamw_settings_to_bitsandbytes(monkeypatch):
    """bitsandbytes is not installed here (its optimizers want a GPU): a stand-in records the arguments."""
    calls = []

    class FakeAdamW8bit(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            calls.append(kwargs)
            super().__init__(params, **kwargs)

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=FakeAdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    oc = OptimConfig(optimizer="adamw_8bit", adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, weight_decay=0.1)
    optimizer = build_optimizer(_tiny_model().parameters(), oc, lr=3e-4)
    assert isinstance(optimizer, FakeAdamW8bit)
    assert calls == [{"lr": 3e-4, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}]


def test_config_lists_the_optimizer_choices():
    base = {"model": {"pretrained": "m"}, "data": {"path": "d"}}
    for name in OPTIMIZERS:
        assert config_from_dict({**base, "optim": {"optimizer": name}}).optim.optimizer == name
    with pytest.raises(ConfigError) as info:
        config_from_dict({**base, "optim": {"optimizer": "sgd"}}, source="x.yaml")
    message = str(info.value)
    assert message.startswith("x.yaml: 'optim.optimizer' must be one of")
    assert all(f"'{name}'" in message for name in ("adamw", "adamw_8bit", "adafactor")), message
    with pytest.raises(ConfigError, match="did you mean 'adamw_8bit'"):
        config_from_dict({**base, "optim": {"optimizer": "adamw8bit"}})
    with pytest.raises(ValueError, match="must be one of"):  # a config built in code and never validated
        build_optimizer(_tiny_model().parameters(), OptimConfig(optimizer="sgd"), lr=1e-3)


def test_trainer_runs_with_adafactor(pixel_pipeline, pairs, tmp_path, monkeypatch):
    built = []

    def spy(params, optim_config, lr):
        built.append(build_optimizer(params, optim_config, lr))
        return built[-1]

    monkeypatch.setattr(trainer_base, "build_optimizer", spy)
    cfg = make_config(pixel_pipeline, pairs, tmp_path / "ada", max_steps=3)
    cfg.optim.optimizer = "adafactor"
    result = train(cfg)
    assert result.global_step == 3
    assert [type(o).__name__ for o in built] == ["Adafactor"]
    records = read_metrics(tmp_path / "ada")
    assert records[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] != pytest.approx(LN2, abs=1e-6)  # the LoRA weights moved


# ------------------------------------------------------------------------------------------ gradient checkpointing


def _unet_mse_and_grads(unet, scheduler, *, checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Per-sample MSE (train mode, fp32), the gradients of its sum, and how many ResnetBlock2D forwards ran."""
    from diffusers.models.resnet import ResnetBlock2D

    if checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    unet.train()
    unet.zero_grad(set_to_none=True)
    adapter = SDAdapter(unet, scheduler)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)
    cond = {"encoder_hidden_states": torch.randn(4, 77, unet.config.cross_attention_dim, generator=g)}
    timesteps = torch.tensor([5, 250, 600, 990])
    # counted in forward itself: torch's non-reentrant recomputation does not run module forward hooks
    forward, calls = ResnetBlock2D.forward, []

    def counting_forward(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    with mock.patch.object(ResnetBlock2D, "forward", counting_forward):
        mse = adapter.per_sample_mse(x0, noise, timesteps, cond)
        mse.sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
    return mse.detach(), grads, len(calls)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_mse_and_gradients(lora):
    components = tiny_sd_components(with_vae=False, sample_size=16, seed=3)
    unet, scheduler = components["unet"], components["scheduler"]
    if lora:
        unet.requires_grad_(False)
        add_lora(unet, rank=4, target_modules=("to_k", "to_q", "to_v", "to_out.0"))
        with torch.no_grad():  # B starts at zero: give it values so that A gets gradients too
            for name, p in unet.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    mse, grads, runs = _unet_mse_and_grads(unet, scheduler, checkpointing=False)
    mse_ckpt, grads_ckpt, runs_ckpt = _unet_mse_and_grads(unet, scheduler, checkpointing=True)
    assert runs_ckpt > runs  # checkpointed blocks are recomputed in the backward pass
    torch.testing.assert_close(mse_ckpt, mse, rtol=0, atol=1e-6)
    assert grads_ckpt.keys() == grads.keys() and grads
    if lora:
        assert all("lora_" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_trainer_with_gradient_checkpointing_matches_without(pixel_pipeline, pairs, tmp_path):
    plain = make_config(pixel_pipeline, pairs, tmp_path / "plain")
    train(plain)
    ckpt = make_config(pixel_pipeline, pairs, tmp_path / "ckpt", gradient_checkpointing=True)
    trainer = OfflinePreferenceTrainer(ckpt)
    assert trainer.train().global_step == 2
    assert trainer.accelerator.unwrap_model(trainer.model).is_gradient_checkpointing
    for a, b in zip(read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "ckpt"), strict=True):
        for key in ("loss", "mse_policy_chosen", "mse_policy_rejected", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


# ------------------------------------------------------------------------------------------------ mixed precision


def test_bf16_mixed_precision_keeps_loss_math_in_fp32(pixel_pipeline, pairs, tmp_path, fresh_accelerate_state):
    cfg = make_config(pixel_pipeline, pairs, tmp_path / "bf16", mixed_precision="bf16")
    trainer = OfflinePreferenceTrainer(cfg)
    assert trainer.weight_dtype is torch.bfloat16
    trainer.build()
    adapter = trainer.adapter
    frozen = [p for p in trainer.model.parameters() if not p.requires_grad]
    trained = [p for p in trainer.model.parameters() if p.requires_grad]
    assert frozen and {p.dtype for p in frozen} == {torch.bfloat16}  # base UNet weights in bf16
    assert trained and {p.dtype for p in trained} == {torch.float32}  # LoRA weights stay fp32

    batch = trainer.collate([trainer.dataset[i] for i in range(2)])
    x0_c, x0_r, cond_c, cond_r = trainer._features(batch)
    t = adapter.sample_timesteps(0, 0, [0, 1])
    noise = adapter.sample_noise(tuple(x0_c.shape[1:]), 0, 0, [0, 1])
    assert isinstance(trainer.reference, AdaptersDisabled)
    with trainer.accelerator.autocast():
        pred = adapter.predict(adapter.add_noise(x0_c, noise, t), t, cond_c)
        logp_c, logp_r = adapter.pair_logps(x0_c, x0_r, cond_c, cond_r, noise, t)
        ref_c, _ = trainer.reference.logps(
            batch, 0, lambda m: adapter.with_denoiser(m).pair_logps(x0_c, x0_r, cond_c, cond_r, noise, t)
        )
    assert pred.dtype == torch.bfloat16  # the network really runs in bf16 ...
    assert logp_c.dtype == logp_r.dtype == ref_c.dtype == torch.float32  # ... the per-sample MSEs are fp32
    loss, metrics = trainer.compute_loss(batch, epoch=0)
    assert loss.dtype == torch.float32
    assert all(metrics[k].dtype == torch.float32 for k in metrics if k.startswith("mse_")), metrics.keys()
    assert loss.item() == pytest.approx(LN2, abs=1e-3)  # LoRA B = 0: policy == reference

    result = train(make_config(pixel_pipeline, pairs, tmp_path / "run", mixed_precision="bf16"))
    assert result.global_step == 2
    records = read_metrics(tmp_path / "run")
    assert records[0]["loss"] == pytest.approx(LN2, abs=1e-3)
    assert records[0]["mse_policy_chosen"] == pytest.approx(records[0]["mse_reference_chosen"], abs=1e-6)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)


# -------------------------------------------------------------------------------------------- accelerate configs


def _launch(config_file: Path, monkeypatch, *launch_args: str) -> tuple[str, object]:
    """Run ``accelerate launch --config_file FILE [launch_args] scripts/train.py --config ...`` up to the launcher it
    picks (launchers replaced by mocks) and return the launcher's name and the arguments accelerate resolved."""
    import accelerate.commands.launch as launch

    mocks = {}
    for name in ("multi_gpu_launcher", "deepspeed_launcher", "simple_launcher"):
        mocks[name] = mock.MagicMock()
        monkeypatch.setattr(launch, name, mocks[name])
    argv = ["--config_file", str(config_file), *launch_args, str(REPO / "scripts" / "train.py"), "--config", "c.yaml"]
    with mock.patch.dict(os.environ):  # whatever the launcher code exports is undone
        launch.launch_command(launch.launch_command_parser().parse_args(argv))
    (called,) = [name for name, m in mocks.items() if m.called]
    return called, mocks[called].call_args.args[0]


def _env(env: dict[str, str], monkeypatch) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))


def test_accelerate_configs_load_with_accelerates_loader():
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    expected = {
        "ddp.yaml": DistributedType.MULTI_GPU,
        "fsdp.yaml": DistributedType.FSDP,
        "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
    }
    assert sorted(p.name for p in ACCELERATE_CONFIGS.glob("*.yaml")) == sorted(expected)
    for name, distributed_type in expected.items():
        config = load_config_from_file(str(ACCELERATE_CONFIGS / name))  # raises on unknown keys
        assert isinstance(config, ClusterConfig)
        assert config.distributed_type == distributed_type, name
        assert (config.num_machines, config.num_processes, config.mixed_precision) == (1, 8, "bf16"), name
        text = (ACCELERATE_CONFIGS / name).read_text()
        # the launch command in the comment names this file and a config that exist
        command = re.search(r"--config_file (\S+)[\s\\#]+scripts/train\.py --config (\S+)", text)
        assert command and command.group(1) == f"configs/accelerate/{name}", name
        assert (REPO / command.group(2)).is_file(), name


def test_ddp_config_launches_multi_gpu(monkeypatch):
    from accelerate.utils.launch import prepare_multi_gpu_env

    launcher, args = _launch(ACCELERATE_CONFIGS / "ddp.yaml", monkeypatch)
    assert launcher == "multi_gpu_launcher"
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed and args.num_processes == 8
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16" and "ACCELERATE_USE_FSDP" not in env


def test_fsdp_config_builds_accelerates_plugin_and_wraps_unet_blocks(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env

    launcher, args = _launch(ACCELERATE_CONFIGS / "fsdp.yaml", monkeypatch)
    assert launcher == "multi_gpu_launcher" and args.use_fsdp
    _env(prepare_multi_gpu_env(args), monkeypatch)
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch exports
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # FULL_SHARD
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    unet = tiny_sd_components(with_vae=False)["unet"]
    policy = fsdp2_prepare_auto_wrap_policy(plugin, unet)
    wrapped = {type(m).__name__ for m in unet.modules() if policy(m)}
    assert {"BasicTransformerBlock", "ResnetBlock2D"} <= wrapped  # from UNet2DConditionModel._no_split_modules


def test_deepspeed_config_is_zero2_and_leaves_accumulation_to_the_trainer(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    data = yaml.safe_load((ACCELERATE_CONFIGS / "deepspeed_zero2.yaml").read_text())["deepspeed_config"]
    assert "gradient_accumulation_steps" not in data  # else it overrides train.gradient_accumulation_steps
    launcher, args = _launch(ACCELERATE_CONFIGS / "deepspeed_zero2.yaml", monkeypatch)
    assert launcher == "deepspeed_launcher" and args.use_deepspeed
    _, env = prepare_deepspeed_cmd_env(args)
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env
    _env(env, monkeypatch)
    ds = DeepSpeedPlugin().deepspeed_config  # what accelerate hands to deepspeed.initialize (deepspeed not needed)
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert ds["zero_optimization"]["offload_param"]["device"] == "none"
    assert ds["gradient_clipping"] == OptimConfig().max_grad_norm
    assert ds["gradient_accumulation_steps"] == "auto"  # filled from Accelerator(gradient_accumulation_steps=...)


def test_deepspeed_clipping_matches_optim_max_grad_norm(monkeypatch):
    """DeepSpeed clips with its own value (accelerator.clip_grad_norm_ only reads the norm there): the file's value
    is OptimConfig's default and a run with another optim.max_grad_norm passes --gradient_clipping, which wins."""
    from diffalign.config import load_config

    data = yaml.safe_load((ACCELERATE_CONFIGS / "deepspeed_zero2.yaml").read_text())["deepspeed_config"]
    assert data["gradient_clipping"] == OptimConfig().max_grad_norm
    assert load_config(REPO / "configs" / "sd15_diffusion_dpo.yaml").optim.max_grad_norm == data["gradient_clipping"]
    _, args = _launch(ACCELERATE_CONFIGS / "deepspeed_zero2.yaml", monkeypatch, "--gradient_clipping", "0.5")
    assert args.gradient_clipping == 0.5 and args.zero_stage == 2
