"""Tests for diffalign.config: YAML loading, inheritance, overrides, validation messages, round trip and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

import diffalign.config as cfg
from diffalign.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_cli,
    save_config,
    validate_config,
)

if TYPE_CHECKING:
    from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(
    p
    for p in (REPO / "configs").rglob("*.yaml")
    if "accelerate" not in p.relative_to(REPO / "configs").parts and not p.name.startswith("_")
)

MINIMAL = """\
model:
  pretrained: some/model
data:
  path: pairs.parquet
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_of(path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


@pytest.fixture
def minimal(tmp_path: Path) -> Path:
    return write(tmp_path, "run.yaml", MINIMAL)


# ------------------------------------------------------------------------------------------------- shipped files


def test_real_model_configs_are_present() -> None:
    names = {p.name for p in CONFIGS}
    assert {"sd15_diffusion_dpo.yaml", "sd21_dcpo.yaml", "sd15_mapo.yaml", "sd15_sft.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads(path: Path) -> None:
    config = load_config(path)  # raises ConfigError on any unknown key, bad type, range or consistency issue
    assert isinstance(config, Config)


def test_authors_values_in_real_configs() -> None:
    dpo = load_config(REPO / "configs/sd15_diffusion_dpo.yaml")
    assert (dpo.loss.name, dpo.loss.beta, dpo.lora.enabled) == ("dpo", 5000.0, False)
    # 1e-8 scaled by batch 1 x accumulation 128 x 16 GPUs is the authors' 2.048e-5.
    scaled = dpo.optim.lr * dpo.train.train_batch_size * dpo.train.gradient_accumulation_steps * 16
    assert dpo.optim.scale_lr and scaled == pytest.approx(2.048e-5, rel=1e-12)
    assert (dpo.optim.lr_scheduler, dpo.optim.warmup_steps, dpo.train.max_steps) == ("constant_with_warmup", 500, 2000)
    assert (dpo.data.proportion_empty_prompts, dpo.train.mixed_precision) == (0.2, "fp16")

    dcpo = load_config(REPO / "configs/sd21_dcpo.yaml")
    assert (dcpo.train.method, dcpo.loss.beta, dcpo.data.dual_captions) == ("dcpo", 500.0, True)
    assert dcpo.model.prediction_type is None  # the model's own (v_prediction), not the authors' epsilon override

    mapo = load_config(REPO / "configs/sd15_mapo.yaml")
    assert (mapo.loss.name, mapo.loss.beta, mapo.loss.params) == ("mapo", 0.1, {"snr": 0.5})
    assert (mapo.optim.lr, mapo.optim.lr_scheduler, mapo.optim.warmup_steps) == (1e-5, "constant", 0)

    sft = load_config(REPO / "configs/sd15_sft.yaml")
    assert sft.loss.name == "sft"
    # MSE/2 loss: halved epsilon and clip norm reproduce AdamW on the original MSE exactly.
    assert (sft.optim.adam_epsilon, sft.optim.max_grad_norm) == (5e-9, 0.5)


# ----------------------------------------------------------------------------------------------------- overrides


def test_overrides_nested_list_null_bool_float(tmp_path: Path) -> None:
    path = write(tmp_path, "run.yaml", MINIMAL.replace("some/model\n", "some/model\n  revision: main\n"))
    assert load_config(path).model.revision == "main"
    config = load_config(
        path,
        [
            "train.max_steps=10",
            "lora.enabled=false",
            "train.report_to=[tensorboard, wandb]",
            "model.revision=null",
            "optim.lr=1e-5",
            "optim.max_grad_norm=2",
            "model.pretrained=/data/a=b",
        ],
    )
    assert config.train.max_steps == 10
    assert config.lora.enabled is False
    assert config.train.report_to == ["tensorboard", "wandb"]
    assert config.model.revision is None
    assert config.optim.lr == 1e-5 and type(config.optim.lr) is float
    assert config.optim.max_grad_norm == 2.0 and type(config.optim.max_grad_norm) is float
    assert config.model.pretrained == "/data/a=b"  # split on the first '=' only


def test_override_dict_entry_and_last_override_wins(minimal: Path, no_registry: None) -> None:
    config = load_config(minimal, ["loss.params.alpha=1.0", "loss.params.alpha=0.25", "loss.params={gamma: 3}"])
    assert config.loss.params == {"alpha": 0.25, "gamma": 3.0}


def test_parse_cli_intermixed(minimal: Path) -> None:
    config = parse_cli(["train.seed=3", "--config", str(minimal), "train.max_steps=4"])
    assert (config.train.seed, config.train.max_steps) == (3, 4)


def test_empty_section_keeps_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "run.yaml", MINIMAL + "lora:\n  # rank: 4\ntrain:\n")
    config = load_config(path)
    assert config.lora == cfg.LoraSettings() and config.train == cfg.TrainConfig()


def test_yaml_exponent_floats_are_floats(tmp_path: Path) -> None:
    assert yaml.safe_load("lr: 1e-5") == {"lr": "1e-5"}  # PyYAML's YAML 1.1 rule this loader fixes
    path = write(tmp_path, "run.yaml", MINIMAL + "optim:\n  lr: 3e-4\n  adam_epsilon: 1E-6\n")
    config = load_config(path)
    assert (config.optim.lr, config.optim.adam_epsilon) == (3e-4, 1e-6)


# ---------------------------------------------------------------------------------------------- error messages


def test_unknown_key_names_file_key_and_nearest(tmp_path: Path) -> None:
    path = write(tmp_path, "configs/x.yaml", MINIMAL + "train:\n  max_step: 10\n")
    assert error_of(path) == f"{path}: unknown key 'train.max_step'; did you mean 'train.max_steps'?"


def test_unknown_key_in_override_names_override(minimal: Path) -> None:
    message = error_of(minimal, ("train.max_step=10",))
    assert (
        message
        == f"{minimal} (override 'train.max_step=10'): unknown key 'train.max_step'; did you mean 'train.max_steps'?"
    )


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trian.seed=1", "unknown key 'trian'; did you mean 'train'?"),
        ("train.lr=1", "unknown key 'train.lr'; did you mean 'optim.lr'?"),  # right name, wrong section
        ("report_to=[tensorboard]", "unknown key 'report_to'; did you mean 'train.report_to'?"),
        ("train.zzzz=1", "unknown key 'train.zzzz'; valid keys here: method, output_dir, seed,"),
        ("train.max_steps.x=1", "'train.max_steps' is a value (int), not a section; cannot set 'train.max_steps.x'"),
        ("train.seed", "an override must look like key=value"),
    ],
)
def test_override_key_errors(minimal: Path, override: str, expected: str) -> None:
    assert expected in error_of(minimal, (override,))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.max_steps=ten", "'train.max_steps' must be int, got str 'ten'"),
        ("train.max_steps=true", "'train.max_steps' must be int, got bool True"),  # bools are not ints
        ("train.max_steps=2.5", "'train.max_steps' must be int, got float 2.5"),
        ("optim.lr=fast", "'optim.lr' must be float, got str 'fast'"),
        ("optim.lr=.nan", "'optim.lr' must be a finite number, got nan"),
        ("train.seed=null", "'train.seed' must be int, got null (null is only allowed for optional keys)"),
        ("lora.enabled=1", "'lora.enabled' must be bool, got int 1"),
        ("lora.alpha=big", "'lora.alpha' must be float or null, got str 'big'"),
        (
            "lora.target_modules=[to_q, 3]",
            "'lora.target_modules[1]' must be str, got int 3 (quote it to keep it a string, e.g. key='123')",
        ),
        ("lora.target_modules=to_q", "'lora.target_modules' must be list[str], got str 'to_q'"),
        (
            "loss.params.label_smoothing=x",
            "'loss.params.label_smoothing' must be a number (the default is 0.0), got str 'x'",
        ),
        ("train=5", "'train' must be a mapping of keys, got int 5"),
        (
            "model.revision=123",
            "'model.revision' must be str or null, got int 123 (quote it to keep it a string, e.g. key='123')",
        ),
        (
            "model.pretrained=true",
            "'model.pretrained' must be str, got bool True (quote it to keep it a string, e.g. key='123')",
        ),
    ],
)
def test_wrong_type_messages(minimal: Path, override: str, expected: str) -> None:
    assert error_of(minimal, (override,)) == f"{minimal} (override '{override}'): {expected}"


def test_wrong_type_in_file_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "x.yaml", MINIMAL + "train:\n  max_steps: ten\n")
    assert error_of(path) == f"{path}: 'train.max_steps' must be int, got str 'ten'"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "train.method=dp0",
            "'train.method' must be one of 'dpo', 'dcpo', 'mapo', 'sft', 'grpo', 'direct_reward', 'nft', 'sail', "
            "'soar', 'preference'; "
            "got 'dp0'; "
            "did you mean 'dpo'?",
        ),
        ("train.mixed_precision=fp32", "'train.mixed_precision' must be one of 'no', 'fp16', 'bf16'; got 'fp32'"),
        ("data.on_bad_row=ignore", "'data.on_bad_row' must be one of 'error', 'skip'; got 'ignore'"),
        (
            "train.reference=copy",
            "'train.reference' must be one of 'auto', 'frozen_copy', 'frozen_copy_offload', 'precomputed'; got 'copy'",
        ),
        ("optim.optimizer=sgd", "'optim.optimizer' must be one of 'adamw', 'adamw_8bit', 'adafactor'; got 'sgd'"),
        ("model.prediction_type=eps", "'model.prediction_type' must be one of 'epsilon', 'v_prediction' or null"),
        ("optim.lr_scheduler=cosine_warmup", "'optim.lr_scheduler' must be one of 'linear', 'cosine',"),
    ],
)
def test_enum_errors(minimal: Path, override: str, expected: str) -> None:
    assert expected in error_of(minimal, (override,))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lr=0", "'optim.lr' must be > 0, got 0.0"),
        ("train.train_batch_size=0", "'train.train_batch_size' must be >= 1, got 0"),
        ("train.gradient_accumulation_steps=0", "'train.gradient_accumulation_steps' must be >= 1, got 0"),
        ("data.proportion_empty_prompts=1", "'data.proportion_empty_prompts' must be in [0, 1), got 1.0"),
        ("data.proportion_empty_prompts=-0.1", "'data.proportion_empty_prompts' must be in [0, 1), got -0.1"),
        ("loss.beta=-1", "'loss.beta' must be > 0, got -1.0"),
        ("train.ema_decay=1", "'train.ema_decay' must be in (0, 1), got 1.0"),
        ("optim.warmup_steps=10", "lr_scheduler 'constant' ignores warm-up"),
        ("model.pretrained=''", "'model.pretrained' is empty"),
        ("train.tracker_project_name=' '", "'train.tracker_project_name' must be a non-empty name, got ' '"),
        ("train.run_name=''", "'train.run_name' must be a non-empty name or null (the output folder's name), got ''"),
    ],
)
def test_range_errors(minimal: Path, override: str, expected: str) -> None:
    assert expected in error_of(minimal, (override,))


def test_random_crop_with_cache_is_rejected(minimal: Path) -> None:
    message = error_of(minimal, ("data.random_crop=true", "data.cache_dir=/tmp/c"))
    assert "set data.random_crop=false or data.cache_dir=null" in message


# ------------------------------------------------------------------------------------- method / loss consistency


def test_loss_name_follows_method_when_left_out(minimal: Path) -> None:
    assert load_config(minimal, ["train.method=sft"]).loss.name == "sft"
    assert load_config(minimal, ["train.method=mapo", "loss.beta=0.1"]).loss.name == "mapo"
    assert load_config(minimal, ["train.method=dcpo", "data.dual_captions=true"]).loss.name == "dpo"


def test_method_loss_mismatch(minimal: Path) -> None:
    message = error_of(minimal, ("train.method=mapo", "loss.name=dpo"))
    assert message.startswith(f"{minimal} (override 'loss.name=dpo'): train.method 'mapo' needs loss.name in 'mapo'")
    assert "train.method 'sft' needs loss.name in 'sft', got 'dpo'" in error_of(
        minimal, ("train.method=sft", "loss.name=dpo")
    )
    message = error_of(minimal, ("loss.name=mapo", "loss.beta=0.1"))
    assert "train.method 'dpo' needs loss.name in 'constrained_po', 'dpo', 'dpo_mixture', 'hinge', 'ipo'," in message
    assert "'trl_sigmoid'" in message and message.endswith("got 'mapo' (or leave loss.name out)")
    # LLM losses that need more than (B,) log-likelihoods (here per-pair preference probabilities) are not offered
    assert "'irepo'" not in message and "'pro'" not in message


def test_non_dpo_losses_need_explicit_beta(minimal: Path) -> None:
    assert "loss 'mapo' needs an explicit 'loss.beta' (MaPO's authors use 0.1)" in error_of(
        minimal, ("train.method=mapo",)
    )
    assert "loss 'ipo' needs an explicit 'loss.beta'" in error_of(minimal, ("loss.name=ipo",))
    assert load_config(minimal, ["loss.name=ipo", "loss.beta=0.5"]).loss.beta == 0.5


def test_dcpo_requires_dual_captions(minimal: Path) -> None:
    message = error_of(minimal, ("train.method=dcpo",))
    assert message.startswith(f"{minimal}: train.method 'dcpo' conditions each image on its own caption")
    assert "set data.dual_captions=true" in message


def _register(kind: str, needs_reference: bool):
    def mark(fn):
        fn.kind, fn.needs_reference, fn.loss_name = kind, needs_reference, fn.__name__
        return fn

    return mark


def _fake_registry() -> dict:
    """Stand-in for diffalign.losses.LOSSES: only names, attributes and signatures matter to the validator."""

    @_register("paired", True)
    def dpo(
        *,
        policy_chosen_logps: Tensor,
        reference_chosen_logps: Tensor,
        beta: float,
        label_smoothing: float = 0.0,
        lengths: Tensor | None = None,
    ): ...

    @_register("paired", True)
    def poly_dpo(*, policy_chosen_logps: Tensor, beta: float, alpha: float): ...

    @_register("paired", False)
    def mapo(*, policy_chosen_logps: Tensor, beta: float = 0.1, snr: float = 0.5): ...

    @_register("unpaired", True)
    def kto(*, policy_logps: Tensor, beta: float): ...

    return {fn.__name__: fn for fn in (dpo, poly_dpo, mapo, kto)}


@pytest.fixture
def fake_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfg, "_registry", _fake_registry)


@pytest.fixture
def no_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Schema-only validation, whatever diffalign.losses currently registers."""
    monkeypatch.setattr(cfg, "_registry", lambda: None)


def test_registry_checks_loss_params(minimal: Path, fake_registry: None) -> None:
    config = load_config(minimal, ["loss.params.label_smoothing=0.1"])
    assert config.loss.params == {"label_smoothing": 0.1}
    assert (
        "unknown key 'loss.params.label_smothing': not a hyper-parameter of loss 'dpo'; did you mean "
        "'loss.params.label_smoothing'?" in error_of(minimal, ("loss.params.label_smothing=0.1",))
    )
    # Tensor inputs are not hyper-parameters, and beta has its own key.
    assert "'loss.params.lengths': not a hyper-parameter of loss 'dpo'; valid: label_smoothing" in error_of(
        minimal, ("loss.params.lengths=1",)
    )
    assert "set 'loss.beta' instead of 'loss.params.beta'" in error_of(minimal, ("loss.params.beta=2",))
    # A hyper-parameter without a default must be given.
    assert "loss 'poly_dpo' needs 'loss.params.alpha'" in error_of(minimal, ("loss.name=poly_dpo", "loss.beta=1"))
    assert load_config(minimal, ["loss.name=poly_dpo", "loss.beta=1", "loss.params.alpha=2"]).loss.params == {
        "alpha": 2.0
    }


def test_registry_checks_loss_name_and_method(minimal: Path, fake_registry: None) -> None:
    assert "'loss.name' must be one of 'dpo', 'kto', 'mapo', 'poly_dpo'; got 'ipo'" in error_of(
        minimal, ("loss.name=ipo", "loss.beta=1")
    )
    # dpo/dcpo accept exactly the registry's paired losses that use a reference (not unpaired kto, not mapo).
    message = error_of(minimal, ("loss.name=kto", "loss.beta=1"))
    assert "train.method 'dpo' needs loss.name in 'dpo', 'poly_dpo', got 'kto'" in message


def test_shipped_losses_registry_is_consistent() -> None:
    losses = pytest.importorskip("diffalign.losses")
    if not hasattr(losses, "LOSSES"):
        pytest.skip("diffalign.losses.LOSSES not written yet")
    from diffalign.methods import get_method, methods

    defaults = {m.default_loss for m in methods() if m.default_loss is not None}
    assert defaults == {"dpo", "mapo", "sft", "trl_sigmoid"} and defaults <= set(losses.LOSSES)
    paired = {n for n, fn in losses.LOSSES.items() if fn.needs_reference and fn.kind == "paired"}
    dpo = get_method("dpo", "diffusion")
    assert dpo is not None and dpo.losses is not None
    trainable = set(dpo.losses(losses.LOSSES))
    # the paired losses with a reference, less those that need token tensors or per-pair extras (causal LMs only)
    assert {"dpo", "ipo", "hinge", "robust", "poly_dpo"} <= trainable <= paired
    assert not trainable & {"irepo", "madpo"}


# ------------------------------------------------------------------------------------------------- inheritance


def test_defaults_inheritance(tmp_path: Path, no_registry: None) -> None:
    write(
        tmp_path,
        "base/_base.yaml",
        MINIMAL + "train:\n  max_steps: 50\n  seed: 7\nloss:\n  params:\n    alpha: 1.0\n",
    )
    child = write(
        tmp_path,
        "exp/child.yaml",
        "defaults: ../base/_base.yaml\ntrain:\n  max_steps: 5\nloss:\n  name: poly_dpo\n  beta: 10\n"
        "  params:\n    gamma: 2.0\n",
    )
    config = load_config(child, ["train.seed=9"])
    assert (config.train.max_steps, config.train.seed) == (5, 9)  # child beats base, override beats both
    assert config.model.pretrained == "some/model"  # inherited section
    assert config.loss.params == {"alpha": 1.0, "gamma": 2.0}  # mappings merge key by key
    assert config.loss.name == "poly_dpo"


def test_error_in_base_file_names_base_file(tmp_path: Path) -> None:
    base = write(tmp_path, "_base.yaml", MINIMAL + "optim:\n  lrr: 1.0\n")
    child = write(tmp_path, "child.yaml", "defaults: _base.yaml\n")
    assert error_of(child) == f"{base}: unknown key 'optim.lrr'; did you mean 'optim.lr'?"


def test_defaults_cycle_and_missing_base(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "defaults: b.yaml\n")
    b = write(tmp_path, "b.yaml", "defaults: a.yaml\n")
    assert "'defaults' inheritance loops back to this file" in error_of(b)
    missing = write(tmp_path, "c.yaml", "defaults: nope.yaml\n")
    assert error_of(missing) == f"{tmp_path / 'nope.yaml'}: config file not found"


def test_file_level_errors(tmp_path: Path) -> None:
    assert "invalid YAML" in error_of(write(tmp_path, "bad.yaml", "train: [1, 2\n"))
    assert "a config file must be a mapping of sections, got list" in error_of(write(tmp_path, "l.yaml", "- 1\n"))
    assert error_of(tmp_path / "absent.yaml") == f"{tmp_path / 'absent.yaml'}: config file not found"


# ------------------------------------------------------------------------------------------- round trip / saving


def test_round_trip_through_yaml(tmp_path: Path, no_registry: None) -> None:
    config = config_from_dict(
        {
            "model": {"pretrained": "m", "revision": "1e5", "variant": "fp16", "prediction_type": "v_prediction"},
            "data": {"path": "d", "max_samples": 12, "cache_dir": None, "proportion_empty_prompts": 0.1},
            "loss": {"name": "poly_dpo", "beta": 2500, "params": {"alpha": 0.5}},
            "lora": {"alpha": 16, "target_modules": ["to_q", "to_v"]},
            "optim": {"lr": 2.048e-5, "adam_epsilon": 1e-08},
            "train": {"report_to": ["tensorboard"], "checkpoints_total_limit": 3, "resume_from_checkpoint": "latest"},
        }
    )
    path = save_config(config, tmp_path / "out" / "config.yaml")
    loaded = load_config(path)
    assert loaded == config
    assert loaded.model.revision == "1e5"  # a string that looks like a float stays a string
    assert config_to_dict(loaded)["loss"] == {
        "name": "poly_dpo",
        "beta": 2500.0,
        "params": {"alpha": 0.5},
        "weighting": "constant",
        "snr_gamma": 5.0,
    }
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left behind


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_round_trip(tmp_path: Path, path: Path) -> None:
    config = load_config(path)
    assert load_config(save_config(config, tmp_path / "c.yaml")) == config


def test_validate_config_on_instances() -> None:
    config = Config()
    config.model.pretrained, config.data.path = "m", "d"
    assert validate_config(config) == config
    config.train.max_steps = 0
    with pytest.raises(ConfigError, match=r"^<config>: 'train.max_steps' must be >= 1, got 0$"):
        validate_config(config)


def test_lr_schedulers_exist_in_diffusers() -> None:
    from diffusers.optimization import SchedulerType

    assert set(cfg.LR_SCHEDULERS) == {s.value for s in SchedulerType} - {"piecewise_constant"}


# --------------------------------------------------------------------------------------------------------- script


def test_train_script_print_config(minimal: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts/train.py"),
            "--config",
            str(minimal),
            "train.max_steps=123",
            "--print-config",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["train"]["max_steps"] == 123
    assert printed["model"]["pretrained"] == "some/model"


def test_train_script_reports_config_errors(minimal: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts/train.py"), "--config", str(minimal), "train.max_step=1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert "error: " in result.stderr and "did you mean 'train.max_steps'?" in result.stderr


# ------------------------------------------------------------------------------- habits from accelerate / TRL


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("learning_rate=1e-5", "unknown key 'learning_rate'; did you mean 'optim.lr'?"),
        ("optim.learning_rate=1e-5", "unknown key 'optim.learning_rate'; did you mean 'optim.lr'?"),
        ("logging_steps=5", "unknown key 'logging_steps'; did you mean 'train.log_every'?"),
        ("train.max_train_steps=5", "unknown key 'train.max_train_steps'; did you mean 'train.max_steps'?"),
        ("num_train_epochs=3", "did you mean 'train.max_steps'? (diffalign counts optimizer steps, not epochs)"),
        ("per_device_train_batch_size=4", "did you mean 'train.train_batch_size'? (pairs per device per micro-step)"),
        ("lr_warmup_steps=10", "unknown key 'lr_warmup_steps'; did you mean 'optim.warmup_steps'?"),
        ("use_8bit_adam=true", "unknown key 'use_8bit_adam'; did you mean 'optim.optimizer=adamw_8bit'?"),
        ("tracker_project_name=x", "unknown key 'tracker_project_name'; did you mean 'train.tracker_project_name'?"),
        ("run_name=x", "unknown key 'run_name'; did you mean 'train.run_name'?"),
        ("tracker_name=x", "unknown key 'tracker_name'; did you mean 'train.tracker_project_name'?"),
        # names that exist in another section: that section, before any fuzzy match at the same level
        ("gradient_accumulation_steps=4", "did you mean 'train.gradient_accumulation_steps'?"),
        ("output_dir=out", "unknown key 'output_dir'; did you mean 'train.output_dir'?"),
        ("lr_scheduler=cosine", "unknown key 'lr_scheduler'; did you mean 'optim.lr_scheduler'?"),
        ("checkpointing_steps=10", "unknown key 'checkpointing_steps'; did you mean 'train.checkpointing_steps'?"),
        ("optim.max_steps=10", "unknown key 'optim.max_steps'; did you mean 'train.max_steps'?"),  # not warmup_steps
        ("train.beta=0.1", "unknown key 'train.beta'; did you mean 'loss.beta' or 'online.beta' or 'nft.beta'?"),
    ],
)
def test_trl_and_diffusers_spellings_name_the_key(minimal: Path, override: str, expected: str) -> None:
    assert expected in error_of(minimal, (override,))


def test_aliases_point_at_real_keys() -> None:
    keys = set(cfg._leaf_keys())
    for name, (target, note) in cfg.KEY_ALIASES.items():
        assert name not in {k.rpartition(".")[2] for k in keys} or name == "loss_type", name
        assert target is None and note or target.partition("=")[0] in keys, (name, target)


def test_tracker_names_default_and_override(minimal: Path) -> None:
    default = load_config(minimal).train
    assert (default.tracker_project_name, default.run_name) == ("diffalign", None)
    named = load_config(minimal, ("train.tracker_project_name=sd15", "train.run_name=dpo-b5000")).train
    assert (named.tracker_project_name, named.run_name) == ("sd15", "dpo-b5000")


@pytest.mark.parametrize("value", ["no", "No", "false", "False", "'no'", "'false'"])
def test_mixed_precision_no_in_any_spelling(minimal: Path, value: str) -> None:
    assert load_config(minimal, (f"train.mixed_precision={value}",)).train.mixed_precision == "no"


def test_mixed_precision_no_in_a_file_and_fp32_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "run.yaml", MINIMAL + "train:\n  mixed_precision: no\n")  # YAML 1.1: false
    assert load_config(path).train.mixed_precision == "no"
    assert load_config(path, ("train.mixed_precision=bf16",)).train.mixed_precision == "bf16"
    assert "full precision is 'no'" in error_of(path, ("train.mixed_precision=fp32",))
    assert "'train.mixed_precision' must be str, got bool True" in error_of(path, ("train.mixed_precision=true",))


@pytest.mark.parametrize(
    ("value", "expected"),
    [("tensorboard", ["tensorboard"]), ("none", []), ("null", []), ("[wandb, none]", ["wandb"]), ("[]", [])],
)
def test_report_to_accepts_a_string(minimal: Path, value: str, expected: list[str]) -> None:
    assert load_config(minimal, (f"train.report_to={value}",)).train.report_to == expected


def test_report_to_names_must_be_trackers(minimal: Path) -> None:
    message = error_of(minimal, ("train.report_to=tensorbord",))
    assert message.endswith("'train.report_to[0]' 'tensorbord' is not a tracker; did you mean 'tensorboard'?")


@pytest.mark.parametrize(("seed", "ok"), [(0, True), (2**32 - 1, True), (-1, False), (2**32, False)])
def test_seed_range(minimal: Path, seed: int, ok: bool) -> None:
    if ok:
        assert load_config(minimal, (f"train.seed={seed}",)).train.seed == seed
    else:
        assert f"'train.seed' must be in [0, 2**32) (the seed range of numpy and torch), got {seed}" in error_of(
            minimal, (f"train.seed={seed}",)
        )


ONLINE = ("train.method=grpo", "online.reward_functions=[r]")


def test_online_choices_are_the_names_their_modules_define(minimal: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffalign.losses import policy_registry
    from diffalign.losses.advantages import ADVANTAGE_METHODS
    from diffalign.models.sampling import SAMPLER_KINDS

    def listed(*overrides: str) -> str:
        return error_of(minimal, (*ONLINE, *overrides)).split(" must be one of ")[1].split("; got")[0]

    advantages = ", ".join(f"'{n}'" for n in ADVANTAGE_METHODS)
    assert listed("online.advantage=nope") == listed("model.backbone=causal_lm", "online.advantage=nope") == advantages
    registered = ", ".join(f"'{n}'" for n in policy_registry.POLICY_LOSSES)
    assert listed("online.policy_loss=nope") == registered == "'flow_grpo', 'grpo_guard'"
    assert listed("online.sampler=nope") == ", ".join(f"'{n}'" for n in SAMPLER_KINDS)
    monkeypatch.setitem(policy_registry.POLICY_LOSSES, "my_loss", lambda step, **kw: None)  # removed afterwards
    assert load_config(minimal, (*ONLINE, "online.policy_loss=my_loss")).online.policy_loss == "my_loss"
    assert "'flow_grpo', 'grpo_guard', 'my_loss'" in error_of(minimal, (*ONLINE, "online.policy_loss=nope"))
