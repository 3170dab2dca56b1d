"""Typed training configuration: nested dataclasses read from YAML, with ``defaults:`` inheritance and overrides.

Usage::

    config = load_config("configs/sd15_diffusion_dpo.yaml", ["train.max_steps=10", "lora.enabled=true"])
    save_config(config, Path(config.train.output_dir) / "config.yaml")

File format: one mapping per section (``model``, ``data``, ``loss``, ``lora``, ``optim``, ``train``); keys left out
keep the dataclass defaults below. ``defaults: base.yaml`` (a path relative to the file) names one base file that
is merged first (mappings merge key by key, everything else is replaced); bases may have bases. Overrides are
``dotted.key=value`` strings whose value is read as YAML (``train.max_steps=10``, ``lora.enabled=false``,
``loss.params.alpha=1.0``, ``train.report_to=[tensorboard]``, ``model.revision=null``); they beat every file.

YAML is read with ``yaml.SafeLoader`` plus one addition: YAML 1.2 exponent floats without a dot (``1e-5``) are
floats, not the strings PyYAML's YAML 1.1 rules make of them.

Validation (every error is a :class:`ConfigError` naming the file or override, the full dotted key and a fix):
unknown keys (with the nearest valid key, or the diffalign key for a diffusers / TRL spelling: :data:`KEY_ALIASES`),
types (ints are accepted for float fields, bools are never ints, ``null`` only for optional keys; accepted spellings:
``train.mixed_precision: no`` / false is ``"no"``, a ``train.report_to`` string is a one-item list, ``none`` is
``[]``; docs/cli.md), enumerations, obvious ranges, and consistency between ``train.method`` and ``loss.name``:

* ``loss.name`` left out: taken from the method (dpo/dcpo -> ``dpo``, mapo -> ``mapo``, sft -> ``sft``).
* method ``mapo`` needs loss ``mapo``; ``sft`` needs ``sft``; ``dpo``/``dcpo`` need a paired loss with a reference
  (``dpo``, ``ipo``, ``hinge``, ``robust``, ``poly_dpo``; the registry's ``needs_reference`` paired losses once
  ``diffalign.losses`` is importable).
* ``loss.beta`` defaults to 5000, Diffusion-DPO's value (SalesforceAIResearch/DiffusionDPO ``--beta_dpo``). Any loss
  other than ``dpo`` (where that default means something) and ``sft`` (no beta) must set ``loss.beta`` explicitly:
  e.g. MaPO's authors use 0.1, which the Diffusion-DPO default would silently replace.
* method ``dcpo`` needs ``data.dual_captions: true`` (each image is conditioned on its own caption).
* causal LMs (``model.backbone: causal_lm``) train with method ``preference`` (any registered loss; its kind picks
  the data layout; ``loss.beta`` must be explicit) or ``grpo`` (the ``online`` section; no ``loss`` keys).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import importlib
import inspect
import math
import os
import re
import sys
import tempfile
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from diffalign.errors import DiffalignError

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "LoraSettings",
    "LossConfig",
    "ModelConfig",
    "OnlineConfig",
    "SAILConfig",
    "SOARConfig",
    "OptimConfig",
    "TrainConfig",
    "build_arg_parser",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "load_config",
    "parse_cli",
    "save_config",
    "validate_config",
]


@dataclass
class ModelConfig:
    pretrained: str = ""  # diffusers folder or hub id
    revision: str | None = None
    variant: str | None = None
    prediction_type: str | None = None  # override the scheduler's ("epsilon" | "v_prediction"); SD/SDXL only
    local_files_only: bool = False
    # "auto" (from the folder / model_index.json) | "sd" | "sdxl" | "sd3" | "causal_lm" (a transformers causal LM
    # folder or hub id: train.method preference / grpo)
    backbone: str = "auto"
    vae: str | None = None  # a separate VAE folder / hub id (diffusers' --pretrained_vae_model_name_or_path)
    # the frozen VAE's weights in channels_last (NHWC) memory format: its convolutions ran 19-20 % faster on CPU
    # (oneDNN) at 64 and 512 px, latents equal to 2e-6 (scripts/bench_offline.py, docs/benchmarks.md)
    vae_channels_last: bool = True
    # SDXL added time ids: "constant" [R, R, 0, 0, R, R] (original Diffusion-DPO) | "from_data" (diffusers / MaPO:
    # jpg_0's size and the crop offset, with the joint pair transform)
    sdxl_time_ids: str = "constant"
    # SD3: T5 text encoder (false = zeros in its place, as diffusers without text_encoder_3), its token length,
    # and the training timestep density (diffusers' compute_density_for_timestep_sampling)
    load_t5: bool = True
    max_sequence_length: int = 77
    timestep_density: str = "logit_normal"  # "logit_normal" | "mode" | "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    # causal_lm: dtype of the loaded weights ("float32" | "bfloat16" | "float16"; trained parameters stay float32
    # under LoRA) and whether the model's own code may run (never implied)
    torch_dtype: str = "float32"
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    path: str = ""  # parquet file/folder or datasets hub name
    split: str = "train"
    keep_ties: bool = False
    on_bad_row: str = "error"  # "error" | "skip"
    caption_column: str = "caption"
    dual_captions: bool = False  # DCPO: caption_0 / caption_1
    resolution: int = 512
    random_crop: bool = False
    hflip: bool = True
    proportion_empty_prompts: float = 0.0
    max_samples: int | None = None
    cache_dir: str | None = None  # latent/text-embedding cache root; None = encode on the fly
    # DataLoader of the micro-batches (diffalign/trainers/loader.py): worker processes decode and collate; results
    # do not depend on the worker count. pin_memory applies on CUDA only; prefetch_factor batches ahead per worker.
    num_workers: int = 0
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = 2
    # causal_lm: prompt+completion tokens kept per sequence (truncation keeps the start, as TRL 1.16)
    max_length: int | None = 1024


@dataclass
class LossConfig:
    name: str = "dpo"  # key of diffalign.losses.LOSSES
    beta: float = 5000.0
    # extra keyword hyper-parameters of the loss function, e.g. {alpha: 1.0}, {use_weighting: true},
    # {f_divergence_type: js_divergence}; checked against the function's defaults
    params: dict[str, Any] = field(default_factory=dict)
    # Timestep weighting ω(t) of each sample's MSE (the ω(λ_t) of the Diffusion-DPO objective): "constant" (the
    # authors' code), "min_snr" (Hang et al., γ 5) or "truncated_snr" (Salimans & Ho, γ 1); see SDAdapter.snr_weights.
    weighting: str = "constant"
    snr_gamma: float = 5.0


@dataclass
class LoraSettings:
    enabled: bool = True  # False = full fine-tune
    rank: int = 8
    alpha: float | None = None  # None = rank
    # null = the backbone's default: [to_k, to_q, to_v, to_out.0] for UNets and SD3, "all-linear" for causal LMs
    target_modules: list[str] | None = None
    init: str = "gaussian"  # peft LoraConfig.init_lora_weights


@dataclass
class OptimConfig:
    # "adamw" (torch) | "adamw_8bit" (bitsandbytes AdamW8bit: needs `pip install 'diffalign[8bit]'`) | "adafactor"
    # (transformers, DiffusionDPO's SDXL settings: clip_threshold 1, no relative step or parameter scaling; uses
    # lr and weight_decay only). See diffalign/trainers/optimizers.py.
    optimizer: str = "adamw"
    lr: float = 1e-5
    scale_lr: bool = False  # lr *= batch * grad_accum * num_processes (original Diffusion-DPO script)
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9  # adam_* apply to adamw and adamw_8bit
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "constant"  # diffusers.optimization.get_scheduler names
    warmup_steps: int = 0
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    # diffusion: "dpo" | "dcpo" | "mapo" | "sft"; causal LM (model.backbone causal_lm): "preference" (offline; the
    # loss's kind picks the data: pairs, rankings or unpaired) | "grpo" (online, see the `online` section)
    method: str = "dpo"
    output_dir: str = "outputs/run"
    seed: int = 0
    max_steps: int = 1000  # optimizer steps
    train_batch_size: int = 1  # pairs per device per micro-step
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    gradient_checkpointing: bool = False
    # Reference model of dpo/dcpo: "auto" (LoRA -> adapters disabled, full -> frozen copy) | "frozen_copy" (full
    # fine-tune) | "frozen_copy_offload" (full fine-tune; the copy stays in CPU memory, streamed per forward) |
    # "precomputed" (values computed once before training for each sample's fixed (noise, t) draw, stored beside the
    # latent cache: training holds only the policy; with LoRA it saves the reference forward). See
    # diffalign/trainers/reference_store.py.
    reference: str = "auto"
    ema: bool = False
    ema_decay: float = 0.9999
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    # "auto" (resume from the newest valid checkpoint of output_dir; refuse an earlier run that has none) | "latest"
    # (the newest valid checkpoint, else a fresh start) | a checkpoint path | None (a fresh start; an earlier run in
    # output_dir is refused). See docs/runs.md.
    resume_from_checkpoint: str | None = "auto"
    overwrite_output_dir: bool = False  # remove an earlier run's checkpoints and metrics.jsonl and start at step 0
    log_every: int = 1
    report_to: list[str] = field(default_factory=list)  # accelerate trackers; metrics.jsonl is always written
    tracker_project_name: str = "diffalign"  # the trackers' project (tensorboard: its folder in output_dir)
    run_name: str | None = None  # the run's name in wandb, trackio, mlflow, clearml, swanlab; null = output_dir's name
    max_nonfinite_steps: int = 10  # consecutive non-finite steps (loss or gradient norm) before the run stops
    # a checkpoint or export is refused when max|w| of the trained parameters exceeds this x max(max|w| at step 0, 1)
    max_weight_growth: float = 100.0
    progress_bar: bool = True


@dataclass
class OnlineConfig:
    """Online group RL (train.method grpo). Names and defaults follow TRL 1.16's GRPOConfig where one exists."""

    # "module:function" or "path/to/file.py:function", called as fn(prompts=[...], completions=[...], **columns)
    # -> list of floats (TRL's reward-function signature); several are summed with reward_weights
    reward_functions: list[str] = field(default_factory=list)
    reward_weights: list[float] | None = None
    num_generations: int = 8  # completions per prompt (a group); MC-GRPO samples one more as its pivot
    max_new_tokens: int = 64  # TRL max_completion_length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off: samples from the model's distribution
    # "group" | "batch" | "none" (TRL scale_rewards) | "rloo" | "mc_grpo" | "bnpo" | "best_of_k" (RAFT)
    advantage: str = "group"
    epsilon: float = 0.2
    epsilon_high: float | None = None  # null = epsilon; DAPO uses 0.28
    beta: float = 0.0  # k3 KL to the reference (TRL default 0: no reference forward)
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo (TRL aggregations)
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    # -- diffusion (train.method grpo / direct_reward on sd, sdxl, sd3); Flow-GRPO arXiv 2505.05470 ----------------
    # reward_functions name reward models of diffalign.rewards (clip_score, pickscore, hpsv2, aesthetic,
    # jpeg_compressibility, toy_gold, toy_reward_model) or "module:callable" returning one; keyword arguments per name
    reward_options: dict[str, Any] = field(default_factory=dict)
    sampler: str = "sde"  # sde (Flow-GRPO) | cps | dance (DanceGRPO) | ode | ddim (SD/SDXL, noise_level = eta)
    sample_steps: int = 10
    guidance_scale: float = 4.5  # CFG in rollouts and in the training forward (1 = off)
    noise_level: float = 0.7  # Flow-GRPO's a; DanceGRPO's / DDIM's eta
    prompts_per_rollout: int = 8  # groups per rollout epoch, over all processes
    sample_batch_size: int | None = None  # rollout forward batch; null = train.train_batch_size (ratio 1 needs equal)
    same_initial_noise: bool = False  # a group shares its initial noise (flow_grpo same_latent)
    sde_window_size: int = 0  # Flow-GRPO-Fast: SDE only on this many consecutive steps (0 = all steps)
    sde_window_range: list[int] | None = None  # [lo, hi): where the window may start (null = [0, sample_steps // 2])
    timestep_fraction: float = 0.99  # trained steps = int(sample_steps * fraction), the first ones (Flow-GRPO)
    inner_epochs: int = 1  # passes over each rollout
    clip_range: float = 1e-4  # PPO clip on the mean-over-latent log-prob ratio (LLM GRPO uses epsilon)
    adv_clip_max: float = 5.0
    policy_loss: str = "flow_grpo"  # flow_grpo (PPO clip) | grpo_guard (RatioNorm + 1/|dt| reweighting)
    drop_zero_advantage: bool = True  # drop samples whose advantage is 0 (re-added to keep micro-batch counts)
    # D2-Align reward correction (arXiv 2512.24146): ''="none" or a b_v file (correction.safetensors)
    reward_correction: str | None = None
    correction_omega: float = 1.5
    # train.method direct_reward (SRPO / Direct-Align style reward back-propagation; D2-Align stages 1 and 2)
    direct_stage: str = "generator"  # generator (train the denoiser) | correction (learn b_v, generator frozen)
    direct_sigma_range: list[float] = field(default_factory=lambda: [0.1, 0.9])  # sigma ~ U[lo, hi] of the added noise


@dataclass
class SOARConfig:
    """train.method soar (SOAR, arXiv 2604.12617); defaults = Tencent-Hunyuan/HY-SOAR's ("v4")."""

    lambda_aux: float = 1.0  # weight of each auxiliary point (0 = the SFT loss exactly)
    num_aux_points: int = 6  # M re-noised points per rollout path
    num_sampling_steps: int = 40  # K: the off-trajectory state is one step of a K-step schedule
    cfg_scale: float = 4.5  # CFG of that stop-gradient step (empty-prompt negative; 1 = off)
    num_paths: int = 1  # 1 = the ODE path only; more adds stochastic paths of sde_type
    sde_type: str = "flow_sde"  # simple | sde | flow_sde | cps
    sde_noise: float = 0.5


@dataclass
class SAILConfig:
    """train.method sail (SAIL, arXiv 2602.05380): rounds of self-generated pairs after Diffusion-DPO on
    the seed set data.path. Paper values: 3 rounds (SD 1.5), 8 samples per prompt, alpha 0.25, 10 reward draws,
    50-step sampling at CFG 7.5 (SD 1.5)."""

    rounds: int = 3  # self-amplification rounds after round 0 (DPO on the seed pairs)
    prompts: str = ""  # .txt or dataset of prompts for the rounds (taken in order, fresh per round while they last)
    prompts_per_round: int = 64
    samples_per_prompt: int = 8  # N candidates per prompt; best vs worst becomes one pair
    self_fraction: float = 0.25  # alpha: share of self-generated pairs in a round's training mixture
    reward_draws: int = 10  # (t, eps) draws of the implicit DPO reward, shared by a prompt's candidates
    judge_policy: str = "current"  # current | anchor (the round-0 model)
    judge_reference: str = "previous"  # previous (the model the policy was trained from) | base (model.pretrained)
    sampler: str = "ddim"  # ddim (SD/SDXL; noise_level = eta) | ode (SD3)
    sample_steps: int = 50
    guidance_scale: float = 7.5
    noise_level: float = 1.0
    sample_batch_size: int = 16
    steps_per_round: int | None = None  # optimizer steps of rounds >= 1 (null = train.max_steps)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    soar: SOARConfig = field(default_factory=SOARConfig)
    sail: SAILConfig = field(default_factory=SAILConfig)


class ConfigError(DiffalignError, ValueError):
    """An invalid config file or override; the message names the source, the dotted key and what to do."""


DIFFUSION_METHODS = ("dpo", "dcpo", "mapo", "sft", "soar", "sail", "grpo", "direct_reward")
LLM_METHODS = ("preference", "grpo")
METHODS = tuple(dict.fromkeys(DIFFUSION_METHODS + LLM_METHODS))
ONLINE_METHODS = ("grpo", "direct_reward")
SAMPLERS = ("sde", "cps", "dance", "ode", "ddim")  # diffalign.models.sampling.SAMPLER_KINDS
DIRECT_STAGES = ("generator", "correction")
SOAR_SDE_TYPES = ("simple", "sde", "flow_sde", "cps")  # diffalign.models.soar.SDE_TYPES
LOSS_WEIGHTINGS = ("constant", "min_snr", "truncated_snr")
ON_BAD_ROW = ("error", "skip")
MIXED_PRECISION = ("no", "fp16", "bf16")
# accelerate.utils.LoggerType values (train.report_to); "all" = every installed one
TRACKERS = ("all", "tensorboard", "wandb", "trackio", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab")
REFERENCE_MODES = ("auto", "frozen_copy", "frozen_copy_offload", "precomputed")
OPTIMIZERS = ("adamw", "adamw_8bit", "adafactor")  # built by diffalign.trainers.optimizers.build_optimizer
PREDICTION_TYPES = ("epsilon", "v_prediction")
# kept here (not imported from diffalign.models) so that reading a config never imports the model code
BACKBONES = ("auto", "sd", "sdxl", "sd3", "causal_lm")
TORCH_DTYPES = ("float32", "bfloat16", "float16")
POLICY_AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")
IS_LEVELS = ("token", "sequence")
SDXL_TIME_IDS = ("constant", "from_data")
TIMESTEP_DENSITIES = ("logit_normal", "mode", "uniform")
# diffusers.optimization.SchedulerType minus "piecewise_constant" (it needs step_rules, which the schema lacks).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
METHOD_DEFAULT_LOSS = {
    "dpo": "dpo",
    "dcpo": "dpo",
    "mapo": "mapo",
    "sft": "sft",
    "soar": "sft",
    "sail": "dpo",
    "preference": "trl_sigmoid",
}
# Used when diffalign.losses is not importable; otherwise the registry's paired losses with needs_reference.
PAIRED_REFERENCE_LOSSES = ("dpo", "hinge", "ipo", "poly_dpo", "robust")
_BETA_DEFAULT_OK = ("dpo", "sft")

# ---------------------------------------------------------------------------------------------------------- YAML


_YAML12_EXP_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` as a float."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings :class:`_Loader` would read as floats (so configs round-trip)."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_EXP_FLOAT, list("-+0123456789"))


def _read_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: invalid YAML: {err}") from err


# ------------------------------------------------------------------------------------------------------- schema


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _leaf_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for name, tp in _hints(cls).items():
        if is_dataclass(tp):
            keys.extend(_leaf_keys(tp, f"{prefix}{name}."))
        else:
            keys.append(prefix + name)
    return keys


# Spellings of diffusers' training scripts, TRL's *Config / transformers' TrainingArguments -> diffalign's key (or
# key=value) and a note where the meaning differs; target None: no such setting, the note says why. An unknown key
# is looked up here (by its last part, in any section) before the nearest-name suggestions.
KEY_ALIASES: dict[str, tuple[str | None, str]] = {
    "learning_rate": ("optim.lr", ""),
    "lr_warmup_steps": ("optim.warmup_steps", ""),
    "warmup_ratio": ("optim.warmup_steps", "a number of optimizer steps, not a ratio"),
    "lr_scheduler_type": ("optim.lr_scheduler", ""),
    "adam_weight_decay": ("optim.weight_decay", ""),
    "use_8bit_adam": ("optim.optimizer=adamw_8bit", ""),
    "use_adafactor": ("optim.optimizer=adafactor", ""),
    "max_train_steps": ("train.max_steps", ""),
    "num_train_epochs": ("train.max_steps", "diffalign counts optimizer steps, not epochs"),
    "per_device_train_batch_size": ("train.train_batch_size", "pairs per device per micro-step"),
    "logging_steps": ("train.log_every", ""),
    "save_steps": ("train.checkpointing_steps", ""),
    "save_total_limit": ("train.checkpoints_total_limit", ""),
    "use_ema": ("train.ema", ""),
    "bf16": ("train.mixed_precision=bf16", ""),
    "fp16": ("train.mixed_precision=fp16", ""),
    "tracker_name": ("train.tracker_project_name", ""),
    "logging_dir": (None, "metrics.jsonl and the trackers' logs are written under train.output_dir"),
    "pretrained_model_name_or_path": ("model.pretrained", ""),
    "model_name_or_path": ("model.pretrained", ""),
    "pretrained_vae_model_name_or_path": ("model.vae", ""),
    "weighting_scheme": ("model.timestep_density", ""),
    "dataset_name": ("data.path", "a parquet file/folder or a datasets hub name"),
    "train_data_dir": ("data.path", "a parquet file/folder or a datasets hub name"),
    "dataset_split_name": ("data.split", ""),
    "max_train_samples": ("data.max_samples", ""),
    "dataloader_num_workers": ("data.num_workers", ""),
    "no_hflip": ("data.hflip=false", ""),
    "max_prompt_length": ("data.max_length", "prompt + completion tokens together"),
    "beta_dpo": ("loss.beta", ""),
    "loss_type": ("loss.name", "TRL's DPOConfig.loss_type; for GRPO's aggregation: 'online.loss_type'"),
    "lora_r": ("lora.rank", ""),
    "lora_rank": ("lora.rank", ""),
    "lora_alpha": ("lora.alpha", ""),
    "lora_target_modules": ("lora.target_modules", ""),
    "use_peft": ("lora.enabled", ""),
    "max_completion_length": ("online.max_new_tokens", ""),
}


def _alias_hint(name: str) -> str | None:
    if name not in KEY_ALIASES:
        return None
    target, note = KEY_ALIASES[name]
    if target is None:
        return f"'{name}' is not a setting: {note}"
    return f"did you mean '{target}'?" + (f" ({note})" if note else "")


def _unknown_key(source: str, dotted: str, valid: Sequence[str]) -> ConfigError:
    """Error for an unknown key, suggesting: a known alias (:data:`KEY_ALIASES`), the same name in another section,
    the nearest key at the same level, else the nearest name elsewhere."""
    prefix, _, last = dotted.rpartition(".")
    prefix = f"{prefix}." if prefix else ""
    alias = _alias_hint(last)
    if alias:
        return ConfigError(f"{source}: unknown key '{dotted}'; {alias}")
    by_name: dict[str, list[str]] = {}
    for key in _leaf_keys():
        by_name.setdefault(key.rpartition(".")[2], []).append(key)
    if last in by_name:
        listed = " or ".join(f"'{key}'" for key in by_name[last])
        return ConfigError(f"{source}: unknown key '{dotted}'; did you mean {listed}?")
    close = difflib.get_close_matches(last, list(valid), n=1)
    if close:
        return ConfigError(f"{source}: unknown key '{dotted}'; did you mean '{prefix}{close[0]}'?")
    names = difflib.get_close_matches(last, list(by_name), n=1)
    if names:
        return ConfigError(f"{source}: unknown key '{dotted}'; did you mean '{by_name[names[0]][0]}'?")
    return ConfigError(f"{source}: unknown key '{dotted}'; valid keys here: {', '.join(valid)}")


def _check_override_key(dotted: str, source: str) -> None:
    """Check that ``dotted`` names a field (or an entry of a dict field such as ``loss.params.alpha``)."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"{source}: malformed key '{dotted}'; use dotted names such as 'train.max_steps'")
    cls: type = Config
    for i, part in enumerate(parts):
        hints = _hints(cls)
        here = ".".join(parts[: i + 1])
        if part not in hints:
            raise _unknown_key(source, here, list(hints))
        tp, rest = hints[part], parts[i + 1 :]
        if not rest:
            return
        if is_dataclass(tp):
            cls = tp
        elif typing.get_origin(tp) is dict and len(rest) == 1:
            return
        else:
            raise ConfigError(f"{source}: '{here}' is a value ({_type_name(tp)}), not a section; cannot set '{dotted}'")


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if origin is dict:
        key, value = typing.get_args(tp)
        return f"dict[{_type_name(key)}, {_type_name(value)}]"
    return tp.__name__


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _quote_hint(value: Any, tp: Any) -> str:
    """YAML reads 123, 1.0, true, no as scalars: suggest quoting when a string was meant."""
    return " (quote it to keep it a string, e.g. key='123')" if tp is str and isinstance(value, int | float) else ""


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return ``value`` as type ``tp`` (int -> float widening only) or raise a ConfigError naming ``key``."""
    if tp is Any:
        return value
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        (inner,) = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if value is None:
            raise ConfigError(f"{source}: '{key}' must be {_type_name(tp)}, got null")
        try:
            return _convert(value, inner, key, source)
        except ConfigError:
            if inner in (bool, int, float, str):
                hint = _quote_hint(value, inner)
                raise ConfigError(f"{source}: '{key}' must be {_type_name(tp)}, got {_describe(value)}{hint}") from None
            raise
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: '{key}' must be {_type_name(tp)}, got {_describe(value)}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: '{key}' must be a mapping ({_type_name(tp)}), got {_describe(value)}")
        _, item = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{source}: '{key}' keys must be strings, got {_describe(k)}")
            out[k] = _convert(v, item, f"{key}.{k}", source)
        return out
    ok = isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        hint = " (null is only allowed for optional keys)" if value is None else _quote_hint(value, tp)
        raise ConfigError(f"{source}: '{key}' must be {_type_name(tp)}, got {_describe(value)}{hint}")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{source}: '{key}' must be a finite number, got {value}")
    return value


def _build(cls: type, data: Any, prefix: str, origins: Mapping[str, str], source: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and types; missing keys keep their defaults."""
    where = origins.get(prefix.rstrip("."), source)
    if data is None:  # an empty section ("lora:" with every key commented out) keeps the defaults
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: '{prefix.rstrip('.')}' must be a mapping of keys, got {_describe(data)}")
    hints = _hints(cls)
    for key in data:
        if key not in hints:
            dotted = f"{prefix}{key}"
            raise _unknown_key(origins.get(dotted, source), dotted, list(hints))
    kwargs = {}
    for name, value in data.items():
        dotted, tp = f"{prefix}{name}", hints[name]
        if is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{dotted}.", origins, source)
        else:
            kwargs[name] = _convert(value, tp, dotted, origins.get(dotted, source))
    return cls(**kwargs)


# ------------------------------------------------------------------------------------------------------ loading


def _merge_into(target: dict, new: Mapping, source: str, origins: dict[str, str], prefix: str = "") -> None:
    """Deep-merge ``new`` into ``target`` (mappings key by key) and record ``source`` for every key it sets."""
    for key, value in new.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: keys must be strings, got {_describe(key)} under '{prefix.rstrip('.')}'")
        dotted = prefix + key
        origins[dotted] = source
        if isinstance(value, Mapping):
            if not isinstance(target.get(key), dict):
                target[key] = {}
            _merge_into(target[key], value, source, origins, f"{dotted}.")
        else:
            target[key] = copy.deepcopy(value)


def _load_file(path: Path, origins: dict[str, str], chain: tuple[Path, ...] = ()) -> dict:
    """Read ``path`` and its ``defaults:`` base files into one raw dict (base first)."""
    source = str(path)
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise ConfigError(f"{source}: 'defaults' inheritance loops back to this file ({cycle})")
    if not path.is_file():
        raise ConfigError(f"{source}: config file not found")
    data = _read_yaml(path.read_text(encoding="utf-8"), source)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: a config file must be a mapping of sections, got {_describe(data)}")
    data = dict(data)
    raw: dict = {}
    base = data.pop("defaults", None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{source}: 'defaults' must be one file name (relative to this file), got {base!r}")
        raw = _load_file(path.parent / base, origins, (*chain, resolved))
    _merge_into(raw, data, source, origins)
    return raw


def _apply_overrides(raw: dict, origins: dict[str, str], overrides: Sequence[str], path: str) -> None:
    for text in overrides:
        source = f"{path} (override '{text}')"
        key, sep, value_text = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{source}: an override must look like key=value, e.g. train.max_steps=10")
        _check_override_key(key, source)
        value = _read_yaml(value_text, source)
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        _merge_into(raw, nested, source, origins)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (its ``defaults:`` base first), apply ``key=value`` overrides, validate, return it."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    origins: dict[str, str] = {}
    raw = _load_file(Path(path), origins)
    _apply_overrides(raw, origins, overrides, str(path))
    return _finish(raw, origins, str(path))


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Build and validate a Config from nested mappings (same rules as a YAML file named ``source``)."""
    origins: dict[str, str] = {}
    raw: dict = {}
    _merge_into(raw, data, source, origins)
    return _finish(raw, origins, source)


def validate_config(config: Config, source: str = "<config>") -> Config:
    """Validate a Config built in code; returns a checked copy (all keys count as explicitly set)."""
    return config_from_dict(config_to_dict(config), source)


def _accept_spellings(raw: dict) -> None:
    """Values typed from accelerate / diffusers habits, in place: ``train.mixed_precision: no`` (YAML reads false)
    is ``"no"``; ``train.report_to: tensorboard`` is ``[tensorboard]`` and ``none`` (or null) is ``[]``."""
    train = raw.get("train")
    if not isinstance(train, dict):
        return
    precision = train.get("mixed_precision")
    if precision is False or (isinstance(precision, str) and precision.lower() in ("false", "no")):
        train["mixed_precision"] = "no"
    if "report_to" in train:
        report = train["report_to"]
        if report is None or isinstance(report, str):
            report = [] if report is None or report.lower() == "none" else [report]
        if isinstance(report, list):
            train["report_to"] = [r for r in report if not (isinstance(r, str) and r.lower() == "none")]


def _finish(raw: dict, origins: Mapping[str, str], source: str) -> Config:
    _accept_spellings(raw)
    config = _build(Config, raw, "", origins, source)
    if "loss.name" not in origins and config.train.method in METHOD_DEFAULT_LOSS:
        config.loss.name = METHOD_DEFAULT_LOSS[config.train.method]
    _validate(config, origins, source)
    return config


# --------------------------------------------------------------------------------------------------- validation


class _Checker:
    def __init__(self, config: Config, origins: Mapping[str, str], source: str) -> None:
        self.config, self.origins, self.source = config, origins, source

    def value(self, key: str) -> Any:
        obj: Any = self.config
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj

    def fail(self, key: str, message: str) -> None:
        raise ConfigError(f"{self.origins.get(key, self.source)}: {message}")

    def one_of(self, key: str, allowed: Sequence[str], *, optional: bool = False) -> None:
        value = self.value(key)
        if (value is None and optional) or value in allowed:
            return
        close = difflib.get_close_matches(str(value), list(allowed), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        listed = ", ".join(f"'{a}'" for a in allowed) + (" or null" if optional else "")
        self.fail(key, f"'{key}' must be one of {listed}; got {value!r}{hint}")

    def check(self, key: str, ok: bool, requirement: str) -> None:
        if not ok:
            self.fail(key, f"'{key}' must be {requirement}, got {self.value(key)!r}")


def _registry() -> Mapping[str, Any] | None:
    try:
        from diffalign.losses import LOSSES
    except ImportError:
        return None
    return LOSSES


def _owned_names(module: str, name: str) -> tuple[str, ...] | None:
    """The names ``module.name`` (a registry dict or a tuple) defines, or None when the module is not importable.

    Valid ``online.advantage`` / ``online.policy_loss`` values come from the modules that implement them, so a newly
    registered one is valid here without a second list.
    """
    try:
        return tuple(getattr(importlib.import_module(module), name))
    except ImportError:
        return None


def _one_of_owned(c: _Checker, key: str, module: str, name: str) -> None:
    allowed = _owned_names(module, name)
    if allowed is not None:
        c.one_of(key, allowed)


def _validate(config: Config, origins: Mapping[str, str], source: str) -> None:
    c = _Checker(config, origins, source)
    m, d, lo, lr, o, t = config.model, config.data, config.loss, config.lora, config.optim, config.train

    if not m.pretrained:
        c.fail("model.pretrained", "'model.pretrained' is empty; set it to a diffusers folder or hub id")
    c.one_of("model.prediction_type", PREDICTION_TYPES, optional=True)
    c.one_of("model.backbone", BACKBONES)
    c.one_of("model.sdxl_time_ids", SDXL_TIME_IDS)
    c.one_of("model.timestep_density", TIMESTEP_DENSITIES)
    c.check("model.max_sequence_length", m.max_sequence_length >= 1, ">= 1")
    c.check("model.logit_std", m.logit_std > 0, "> 0")
    c.one_of("model.torch_dtype", TORCH_DTYPES)
    llm = m.backbone == "causal_lm"
    if t.method in METHODS and t.method not in (LLM_METHODS if llm else DIFFUSION_METHODS):
        key = "train.method" if "train.method" in c.origins or not llm else "model.backbone"
        c.fail(
            key,
            f"train.method '{t.method}' and model.backbone '{m.backbone}' do not go together: causal LMs "
            f"(model.backbone=causal_lm) train with {' / '.join(LLM_METHODS)}, diffusion models with "
            f"{' / '.join(DIFFUSION_METHODS)}",
        )

    if not d.path:
        c.fail("data.path", "'data.path' is empty; set it to a parquet file/folder or a datasets hub name")
    c.check("data.split", bool(d.split), "a non-empty split name")
    c.check("data.caption_column", bool(d.caption_column), "a non-empty column name")
    c.one_of("data.on_bad_row", ON_BAD_ROW)
    c.check("data.resolution", d.resolution >= 1, ">= 1")
    c.check("data.proportion_empty_prompts", 0.0 <= d.proportion_empty_prompts < 1.0, "in [0, 1)")
    c.check("data.max_samples", d.max_samples is None or d.max_samples >= 1, ">= 1 or null")
    c.check("data.num_workers", d.num_workers >= 0, ">= 0")
    c.check("data.prefetch_factor", d.prefetch_factor >= 1, ">= 1")
    c.check("data.max_length", d.max_length is None or d.max_length >= 2, ">= 2 or null")
    if d.random_crop and d.cache_dir is not None:
        c.fail(
            "data.random_crop",
            "random_crop is not supported with the cache; set data.random_crop=false or data.cache_dir=null",
        )

    c.check("loss.beta", lo.beta > 0, "> 0")
    c.check("loss.snr_gamma", lo.snr_gamma > 0, "> 0")
    c.check("loss.weighting", lo.weighting in LOSS_WEIGHTINGS, f"one of {LOSS_WEIGHTINGS}")
    c.check("lora.rank", lr.rank >= 1, ">= 1")
    c.check("lora.alpha", lr.alpha is None or lr.alpha > 0, "> 0 or null (= rank)")
    c.check(
        "lora.target_modules",
        lr.target_modules is None or bool(lr.target_modules) or not lr.enabled,
        "a non-empty list, or null for the backbone's default",
    )
    c.check("lora.init", bool(lr.init), "a non-empty peft init_lora_weights name")

    c.one_of("optim.optimizer", OPTIMIZERS)
    c.check("optim.lr", o.lr > 0, "> 0")
    c.check("optim.weight_decay", o.weight_decay >= 0, ">= 0")
    c.check("optim.adam_beta1", 0 <= o.adam_beta1 < 1, "in [0, 1)")
    c.check("optim.adam_beta2", 0 <= o.adam_beta2 < 1, "in [0, 1)")
    c.check("optim.adam_epsilon", o.adam_epsilon > 0, "> 0")
    c.one_of("optim.lr_scheduler", LR_SCHEDULERS)
    c.check("optim.warmup_steps", o.warmup_steps >= 0, ">= 0")
    if o.lr_scheduler == "constant" and o.warmup_steps > 0:
        c.fail(
            "optim.warmup_steps",
            f"'optim.warmup_steps' is {o.warmup_steps} but lr_scheduler 'constant' ignores warm-up; "
            "use optim.lr_scheduler=constant_with_warmup or optim.warmup_steps=0",
        )
    c.check("optim.max_grad_norm", o.max_grad_norm > 0, "> 0")

    c.one_of("train.method", METHODS)
    c.check("train.output_dir", bool(t.output_dir), "a non-empty path")
    c.check("train.seed", 0 <= t.seed < 2**32, "in [0, 2**32) (the seed range of numpy and torch)")
    c.check("train.max_steps", t.max_steps >= 1, ">= 1")
    c.check("train.train_batch_size", t.train_batch_size >= 1, ">= 1")
    c.check("train.gradient_accumulation_steps", t.gradient_accumulation_steps >= 1, ">= 1")
    if t.mixed_precision in ("fp32", "float32", "full"):
        c.fail(
            "train.mixed_precision",
            f"'train.mixed_precision' must be one of 'no', 'fp16', 'bf16'; got '{t.mixed_precision}': full "
            "precision is 'no'",
        )
    c.one_of("train.mixed_precision", MIXED_PRECISION)
    for i, tracker in enumerate(t.report_to):
        if tracker not in TRACKERS:
            close = difflib.get_close_matches(tracker, TRACKERS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"accelerate's trackers: {', '.join(TRACKERS)}"
            c.fail("train.report_to", f"'train.report_to[{i}]' {tracker!r} is not a tracker; {hint}")
    c.check("train.tracker_project_name", bool(t.tracker_project_name.strip()), "a non-empty name")
    if t.run_name is not None:
        c.check("train.run_name", bool(t.run_name.strip()), "a non-empty name or null (the output folder's name)")
    c.one_of("train.reference", REFERENCE_MODES)
    if t.reference in ("frozen_copy", "frozen_copy_offload") and lr.enabled:
        c.fail(
            "train.reference",
            f"train.reference '{t.reference}' is for full fine-tuning (lora.enabled=false); with LoRA the reference "
            "is the same network with its adapters disabled and costs no memory: use 'auto' (or 'precomputed' to "
            "also skip the reference forward)",
        )
    if t.reference == "precomputed" and t.method == "grpo":
        c.fail(
            "train.reference",
            "train.reference 'precomputed' stores values of a fixed data set, but GRPO evaluates its KL reference on "
            "fresh rollouts; use train.reference=auto (or frozen_copy_offload under full fine-tuning)",
        )
    if t.reference != "auto" and t.method in ("mapo", "sft", "soar"):
        c.fail(
            "train.reference",
            f"train.reference '{t.reference}' has no effect: train.method '{t.method}' uses no reference model; "
            "leave train.reference=auto",
        )
    c.check("train.ema_decay", 0 < t.ema_decay < 1, "in (0, 1)")
    c.check("train.checkpointing_steps", t.checkpointing_steps >= 1, ">= 1")
    c.check(
        "train.checkpoints_total_limit",
        t.checkpoints_total_limit is None or t.checkpoints_total_limit >= 1,
        ">= 1 or null",
    )
    c.check("train.resume_from_checkpoint", t.resume_from_checkpoint != "", "'auto', 'latest', a path or null")
    if t.overwrite_output_dir and t.resume_from_checkpoint not in ("auto", None):
        c.fail(
            "train.overwrite_output_dir",
            f"train.overwrite_output_dir=true starts afresh but train.resume_from_checkpoint "
            f"'{t.resume_from_checkpoint}' resumes; set train.resume_from_checkpoint=auto to start afresh, or "
            "train.overwrite_output_dir=false to resume",
        )
    c.check("train.max_weight_growth", t.max_weight_growth >= 1, ">= 1")
    c.check("train.log_every", t.log_every >= 1, ">= 1")
    c.check("train.max_nonfinite_steps", t.max_nonfinite_steps >= 1, ">= 1")

    if t.method == "soar":
        _validate_soar(c)
    if t.method == "sail":
        _validate_sail(c)
    if t.method in ONLINE_METHODS and not llm:
        _validate_diffusion_online(c)
    elif t.method == "grpo":
        _validate_online(c)
    else:
        _validate_method_and_loss(c)


_PAIR_INPUTS = {
    "policy_chosen_logps",
    "policy_rejected_logps",
    "reference_chosen_logps",
    "reference_rejected_logps",
    "beta",
}


def _takes_only_pair_logps(fn: Any) -> bool:
    """Whether the diffusion trainer can call ``fn``: every required tensor argument is one of the (B,)
    log-likelihoods (scalar hyper-parameters come from ``loss.params``); LLM losses that need token tensors or
    extra per-pair data are left out."""
    required_tensors = {
        name
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is inspect.Parameter.empty and "Tensor" in str(p.annotation)
    }
    return required_tensors <= _PAIR_INPUTS


def _validate_online(c: _Checker) -> None:
    o = c.config.online
    for key in ("loss.name", "loss.beta"):  # a saved config repeats the defaults: only a changed value is an error
        if key in c.origins and c.value(key) != getattr(LossConfig, key.split(".")[1]):
            c.fail(key, f"train.method 'grpo' takes its objective from the 'online' section; remove '{key}'")
    c.check("online.reward_functions", bool(o.reward_functions), "at least one 'module:function' reward")
    if o.reward_weights is not None and len(o.reward_weights) != len(o.reward_functions):
        c.fail(
            "online.reward_weights",
            f"{len(o.reward_weights)} weights for {len(o.reward_functions)} reward functions; give one per function "
            "or null (all 1)",
        )
    c.check("online.num_generations", o.num_generations >= 2, ">= 2 (advantages compare completions of a prompt)")
    c.check("online.max_new_tokens", o.max_new_tokens >= 1, ">= 1")
    c.check("online.temperature", o.temperature > 0, "> 0")
    c.check("online.top_p", 0 < o.top_p <= 1, "in (0, 1]")
    c.check("online.top_k", o.top_k >= 0, ">= 0 (0 = off)")
    _one_of_owned(c, "online.advantage", "diffalign.losses.advantages", "ADVANTAGE_METHODS")
    c.check("online.epsilon", o.epsilon >= 0, ">= 0")
    c.check("online.epsilon_high", o.epsilon_high is None or o.epsilon_high >= 0, ">= 0 or null")
    c.check("online.beta", o.beta >= 0, ">= 0")
    c.one_of("online.loss_type", POLICY_AGGREGATIONS)
    c.one_of("online.importance_sampling_level", IS_LEVELS)


def _validate_diffusion_online(c: _Checker) -> None:
    o, t = c.config.online, c.config.train
    for key in ("loss.name", "loss.beta"):
        if key in c.origins and c.value(key) != getattr(LossConfig, key.split(".")[1]):
            c.fail(key, f"train.method '{t.method}' takes its objective from the 'online' section; remove '{key}'")
    c.check("online.reward_functions", len(o.reward_functions) >= 1, "at least one reward model name")
    if o.reward_weights is not None and len(o.reward_weights) != len(o.reward_functions):
        c.fail("online.reward_weights", f"{len(o.reward_weights)} weights for {len(o.reward_functions)} rewards")
    unknown = set(o.reward_options) - set(o.reward_functions)
    if unknown:
        c.fail("online.reward_options", f"options for {sorted(unknown)}, which are not in online.reward_functions")
    c.one_of("online.sampler", SAMPLERS)
    c.check("online.sample_steps", o.sample_steps >= 1, ">= 1")
    c.check("online.guidance_scale", o.guidance_scale >= 0, ">= 0 (1 = no guidance)")
    c.check("online.noise_level", o.noise_level >= 0, ">= 0")
    c.check("online.correction_omega", o.correction_omega > 0, "> 0 (the paper uses 1.5)")
    lo, hi = (o.direct_sigma_range + [None, None])[:2] if len(o.direct_sigma_range) == 2 else (None, None)
    c.check("online.direct_sigma_range", lo is not None and 0 < lo <= hi < 1, "[lo, hi] with 0 < lo <= hi < 1")
    if t.method == "direct_reward":
        c.one_of("online.direct_stage", DIRECT_STAGES)
        if o.direct_stage == "correction" and o.reward_correction:
            c.fail("online.reward_correction", "stage 'correction' learns b_v; leave online.reward_correction empty")
        return
    c.check("online.num_generations", o.num_generations >= 2, ">= 2 (advantages compare images of a prompt)")
    c.check("online.prompts_per_rollout", o.prompts_per_rollout >= 1, ">= 1")
    c.check("online.sample_batch_size", o.sample_batch_size is None or o.sample_batch_size >= 1, ">= 1 or null")
    c.check("online.sde_window_size", 0 <= o.sde_window_size <= o.sample_steps, "in [0, sample_steps]")
    if o.sde_window_range is not None:
        ok = len(o.sde_window_range) == 2 and 0 <= o.sde_window_range[0] < o.sde_window_range[1] <= o.sample_steps
        c.check("online.sde_window_range", ok, "[lo, hi) with 0 <= lo < hi <= sample_steps")
    c.check("online.timestep_fraction", 0 < o.timestep_fraction <= 1, "in (0, 1]")
    c.check(
        "online.timestep_fraction",
        int(o.sample_steps * o.timestep_fraction) >= 1 or o.sde_window_size > 0,
        f"large enough to train at least one of the {o.sample_steps} steps",
    )
    c.check("online.inner_epochs", o.inner_epochs >= 1, ">= 1")
    c.check("online.clip_range", o.clip_range > 0, "> 0 (Flow-GRPO 1e-4, GRPO-Guard 2e-6..4e-6)")
    c.check("online.adv_clip_max", o.adv_clip_max > 0, "> 0")
    c.check("online.beta", o.beta >= 0, ">= 0")
    _one_of_owned(c, "online.advantage", "diffalign.losses.advantages", "ADVANTAGE_METHODS")
    _one_of_owned(c, "online.policy_loss", "diffalign.losses.policy_registry", "POLICY_LOSSES")
    if o.policy_loss == "grpo_guard" and o.sampler in ("cps", "ode"):
        c.fail("online.policy_loss", f"grpo_guard needs a Gaussian step (sde, dance or ddim), not '{o.sampler}'")
    if o.sampler == "ode":
        c.fail("online.sampler", "rollouts need a stochastic sampler (sde, cps, dance or ddim); 'ode' has no ratio")


def _validate_soar(c: _Checker) -> None:
    s = c.config.soar
    c.check("soar.lambda_aux", s.lambda_aux >= 0, ">= 0 (0 = the SFT loss)")
    c.check("soar.num_aux_points", s.num_aux_points >= 1, ">= 1")
    c.check("soar.num_sampling_steps", s.num_sampling_steps >= 1, ">= 1")
    c.check("soar.cfg_scale", s.cfg_scale >= 0, ">= 0 (1 = no guidance)")
    c.check("soar.num_paths", s.num_paths >= 1, ">= 1 (1 = the ODE path only)")
    c.one_of("soar.sde_type", SOAR_SDE_TYPES)
    c.check("soar.sde_noise", s.sde_noise >= 0, ">= 0")


def _validate_sail(c: _Checker) -> None:
    s = c.config.sail
    c.check("sail.rounds", s.rounds >= 0, ">= 0 (0 = Diffusion-DPO on the seed set only)")
    c.check("sail.prompts", bool(s.prompts) or s.rounds == 0, "a prompt file or dataset for the rounds")
    c.check("sail.prompts_per_round", s.prompts_per_round >= 1, ">= 1")
    c.check("sail.samples_per_prompt", s.samples_per_prompt >= 2, ">= 2 (best against worst)")
    c.check("sail.self_fraction", 0 <= s.self_fraction < 1, "in [0, 1) (the paper: 0.25)")
    c.check("sail.reward_draws", s.reward_draws >= 1, ">= 1 (the paper: 10)")
    c.one_of("sail.judge_policy", ("current", "anchor"))
    c.one_of("sail.judge_reference", ("previous", "base"))
    c.one_of("sail.sampler", ("ddim", "ode"))
    c.check("sail.sample_steps", s.sample_steps >= 1, ">= 1")
    c.check("sail.sample_batch_size", s.sample_batch_size >= 1, ">= 1")
    c.check("sail.steps_per_round", s.steps_per_round is None or s.steps_per_round >= 1, ">= 1 or null")


def _llm_allowed_losses(registry: Mapping[str, Any] | None) -> tuple[str, ...]:
    if registry is None:
        return ("trl_sigmoid",)
    return tuple(sorted(n for n, fn in registry.items() if getattr(fn, "kind", None) != "chosen_only" or n == "sft"))


def _validate_method_and_loss(c: _Checker) -> None:
    config = c.config
    method, loss = config.train.method, config.loss
    registry = _registry()
    if registry is not None and loss.name not in registry:
        c.one_of("loss.name", sorted(registry))
    if method == "preference":
        allowed = _llm_allowed_losses(registry)
    elif method in ("dpo", "dcpo", "sail"):
        allowed = PAIRED_REFERENCE_LOSSES
        if registry is not None:
            allowed = tuple(
                sorted(
                    name
                    for name, fn in registry.items()
                    if getattr(fn, "needs_reference", False)
                    and getattr(fn, "kind", None) == "paired"
                    and _takes_only_pair_logps(fn)
                )
            )
    else:
        allowed = (METHOD_DEFAULT_LOSS[method],)
    if loss.name not in allowed:
        key = "loss.name" if "loss.name" in c.origins else "train.method"
        listed = ", ".join(f"'{a}'" for a in allowed)
        c.fail(key, f"train.method '{method}' needs loss.name in {listed}, got '{loss.name}' (or leave loss.name out)")
    fn = registry.get(loss.name) if registry is not None else None
    takes_beta = fn is None or "beta" in inspect.signature(fn).parameters
    if method == "preference" and takes_beta and "loss.beta" not in c.origins:
        c.fail(
            "loss.name",
            f"loss '{loss.name}' needs an explicit 'loss.beta' (TRL's DPO default is 0.1); the default "
            f"{LossConfig.beta} is Diffusion-DPO's",
        )
    elif method != "preference" and loss.name not in _BETA_DEFAULT_OK and "loss.beta" not in c.origins:
        hint = " (MaPO's authors use 0.1)" if loss.name == "mapo" else ""
        c.fail(
            "loss.name",
            f"loss '{loss.name}' needs an explicit 'loss.beta'{hint}; the default {LossConfig.beta} is "
            "Diffusion-DPO's and would apply silently",
        )
    if registry is not None and loss.name in registry:
        _validate_loss_params(c, registry[loss.name])
    if method == "dcpo" and not config.data.dual_captions:
        c.fail(
            "data.dual_captions",
            "train.method 'dcpo' conditions each image on its own caption: set data.dual_captions=true and give "
            "the data caption_0/caption_1 columns",
        )


def _loss_hyperparameters(fn: Any) -> dict[str, bool]:
    """Keyword hyper-parameters of a loss function -> whether each is required.

    Tensor inputs (annotation mentions ``Tensor`` and no scalar type, e.g. ``policy_chosen_logps``,
    ``chosen_lengths``) and ``beta`` (it has its own key) are not hyper-parameters.
    """
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        note = "" if p.annotation is inspect.Parameter.empty else str(p.annotation)
        tensor_only = "Tensor" in note and not re.search(r"\b(float|int|bool)\b", note)
        if name != "beta" and not tensor_only and p.kind is not inspect.Parameter.VAR_KEYWORD:
            out[name] = p.default is inspect.Parameter.empty
    return out


def _validate_loss_params(c: _Checker, fn: Any) -> None:
    """``loss.params`` must name the loss function's hyper-parameters and give the required ones."""
    hyper = _loss_hyperparameters(fn)
    name = c.config.loss.name
    for param in c.config.loss.params:
        key = f"loss.params.{param}"
        if param == "beta":
            c.fail(key, f"set 'loss.beta' instead of '{key}'")
        if param not in hyper:
            close = difflib.get_close_matches(param, list(hyper), n=1)
            hint = f"did you mean 'loss.params.{close[0]}'?" if close else f"valid: {', '.join(hyper) or 'none'}"
            c.fail(key, f"unknown key '{key}': not a hyper-parameter of loss '{name}'; {hint}")
        elif param in hyper:
            _check_param_type(c, key, c.config.loss.params[param], fn, param)
    for param, required in hyper.items():
        if required and param not in c.config.loss.params:
            c.fail("loss.name", f"loss '{name}' needs 'loss.params.{param}' (e.g. loss.params.{param}=1.0)")


def _check_param_type(c: _Checker, key: str, value: Any, fn: Any, param: str) -> None:
    """A value of the kind the parameter's default has (bool, number, string); no check for ``None`` defaults."""
    default = inspect.signature(fn).parameters[param].default
    if default is inspect.Parameter.empty or default is None:
        return
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, (int, float)):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, kind = isinstance(value, str), "a string"
    else:
        return
    if not ok:
        c.fail(key, f"'{key}' must be {kind} (the default is {default!r}), got {_describe(value)}")


# ------------------------------------------------------------------------------------------------ saving and CLI


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain nested dict (lists and dicts copied) of a Config, in schema order."""
    return asdict(config)


def config_to_yaml(config: Config) -> str:
    """The config as YAML text that :func:`load_config` reads back to an equal Config."""
    return yaml.dump(config_to_dict(config), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def save_config(config: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically: temp file then rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(config_to_yaml(config))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _keys_help(width: int = 100) -> str:
    """Every section's keys, wrapped: the ``--help`` epilog of the training commands."""
    import textwrap

    lines = ["config keys (section.key=value; --print-config shows every resolved value):"]
    for section, cls in _hints(Config).items():
        text = f"{section}: " + ", ".join(_hints(cls))
        lines += textwrap.wrap(text, width, initial_indent="  ", subsequent_indent="      ")
    return "\n".join(lines)


def build_arg_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train on preference pairs from a YAML config.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides: dotted key=value pairs read as YAML, e.g. train.max_steps=10 lora.enabled=false\n"
        "  loss.params.alpha=1.0 train.report_to=[tensorboard] model.revision=null\n\n"
        f"{_keys_help()}\n\n"
        "errors: one 'error: <message>' line and exit status 2; --debug shows the traceback (docs/cli.md)",
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="YAML config file")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, applied after the file")
    return parser


def parse_cli(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> Config:
    """``--config FILE [key=value ...] [--print-config]`` -> Config; with --print-config print it and exit 0.
    Then the optional packages the config needs are checked (before any model loads)."""
    parser = parser or build_arg_parser()
    args = parser.parse_intermixed_args(None if argv is None else list(argv))
    config = load_config(args.config, args.overrides)
    if args.print_config:
        sys.stdout.write(config_to_yaml(config))
        sys.stdout.flush()
        raise SystemExit(0)
    from diffalign.utils.imports import check_config_dependencies

    check_config_dependencies(config)
    return config
