"""Typed training configuration: nested dataclasses read from YAML, with ``defaults:`` inheritance and overrides.

Usage::

    config = load_config("configs/sd15_diffusion_dpo.yaml", ["train.max_steps=10", "lora.enabled=true"])
    save_config(config, Path(config.train.output_dir) / "config.yaml")

File format: one mapping per section: the core ones defined here (``model``, ``data``, ``loss``, ``lora``, ``optim``,
``train``) and those of the registered methods (``online``, ``soar``, ``sail``: each defined with its method in
:mod:`diffalign.methods`, which :data:`Config` is built from); keys left out keep the dataclass defaults.
``defaults: base.yaml`` (a path relative to the file) names one base file that is merged first (mappings merge key
by key, everything else is replaced); bases may have bases. Overrides are ``dotted.key=value`` strings whose value
is read as YAML (``train.max_steps=10``, ``lora.enabled=false``, ``loss.params.alpha=1.0``,
``train.report_to=[tensorboard]``, ``model.revision=null``); they beat every file.

YAML is read with ``yaml.SafeLoader`` plus one addition: YAML 1.2 exponent floats without a dot (``1e-5``) are
floats, not the strings PyYAML's YAML 1.1 rules make of them.

Validation (every error is a :class:`ConfigError` naming the file or override, the full dotted key and a fix):
unknown keys (with the nearest valid key, or the diffalign key for a diffusers / TRL spelling: :data:`KEY_ALIASES`),
types (ints are accepted for float fields, bools are never ints, ``null`` only for optional keys; accepted spellings:
``train.mixed_precision: no`` / false is ``"no"``, a ``train.report_to`` string is a one-item list, ``none`` is
``[]``; docs/cli.md), then each field's declared rules (``Literal`` values, registry-owned choices and bounds, as
:mod:`diffalign.config_fields` describes), then the method's own checks and the consistency between
``train.method`` and ``loss.name``:

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
import dataclasses
import difflib
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
from typing import Any, Literal

import yaml

from diffalign.config_fields import Checker, ConfigError, check_section, owned_names, setting
from diffalign.methods import Method, get_method, method_names, section_classes, section_fields

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "LoraSettings",
    "LossConfig",
    "ModelConfig",
    "method_of",
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


PredictionType = Literal["epsilon", "v_prediction"]
SDXLTimeIds = Literal["constant", "from_data"]
TimestepDensity = Literal["logit_normal", "mode", "uniform"]
TorchDtype = Literal["float32", "bfloat16", "float16"]
OnBadRow = Literal["error", "skip"]
LossWeighting = Literal["constant", "min_snr", "truncated_snr"]
Optimizer = Literal["adamw", "adamw_8bit", "adafactor"]  # built by diffalign.trainers.optimizers.build_optimizer
# diffusers.optimization.SchedulerType minus "piecewise_constant" (it needs step_rules, which the schema lacks).
LRScheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]
MixedPrecision = Literal["no", "fp16", "bf16"]
ReferenceMode = Literal["auto", "frozen_copy", "frozen_copy_offload", "precomputed"]
LR_SCHEDULERS: tuple[str, ...] = typing.get_args(LRScheduler)
OPTIMIZERS: tuple[str, ...] = typing.get_args(Optimizer)
REFERENCE_MODES: tuple[str, ...] = typing.get_args(ReferenceMode)
# accelerate.utils.LoggerType values (train.report_to); "all" = every installed one
TRACKERS = ("all", "tensorboard", "wandb", "trackio", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab")


@dataclass
class ModelConfig:
    pretrained: str = ""  # diffusers folder or hub id
    revision: str | None = None
    variant: str | None = None
    prediction_type: PredictionType | None = None  # override the scheduler's ("epsilon" | "v_prediction"); SD/SDXL
    local_files_only: bool = False
    # "auto" (from the folder / model_index.json) | a registered diffusion backbone ("sd", "sdxl", "sd3", ...;
    # docs/backbones.md) | "causal_lm" (a transformers causal LM folder or hub id: train.method preference / grpo)
    backbone: str = "auto"
    vae: str | None = None  # a separate VAE folder / hub id (diffusers' --pretrained_vae_model_name_or_path)
    # the frozen VAE's weights in channels_last (NHWC) memory format: its convolutions ran 19-20 % faster on CPU
    # (oneDNN) at 64 and 512 px, latents equal to 2e-6 (scripts/bench_offline.py, docs/benchmarks.md)
    vae_channels_last: bool = True
    # SDXL added time ids: "constant" [R, R, 0, 0, R, R] (original Diffusion-DPO) | "from_data" (diffusers / MaPO:
    # jpg_0's size and the crop offset, with the joint pair transform)
    sdxl_time_ids: SDXLTimeIds = "constant"
    # SD3: T5 text encoder (false = zeros in its place, as diffusers without text_encoder_3); SD3 and FLUX: the T5
    # token length (FluxPipeline's default is 512) and the training timestep density (diffusers'
    # compute_density_for_timestep_sampling)
    load_t5: bool = True
    max_sequence_length: int = setting(77, ge=1)
    timestep_density: TimestepDensity = "logit_normal"  # "logit_normal" | "mode" | "uniform"
    # training timesteps restricted to t/T in [min, max] (the density truncated there; 0 and 1: the whole schedule);
    # offline trainers (preference, SFT, SOAR's SFT term). docs/toy-world.md measures it on the flow toy's DPO artifact
    min_timestep_fraction: float = setting(0.0, ge=0, lt=1)
    max_timestep_fraction: float = setting(1.0, gt=0, le=1)
    logit_mean: float = 0.0
    logit_std: float = setting(1.0, gt=0)
    mode_scale: float = 1.29
    # FLUX.1-dev: the distilled guidance embedding's value in every rollout and training call (diffusers' default;
    # schnell has no embedding and ignores it). FLUX takes no classifier-free guidance on top.
    guidance: float = setting(3.5, ge=0)
    # causal_lm: dtype of the loaded weights ("float32" | "bfloat16" | "float16"; trained parameters stay float32
    # under LoRA) and whether the model's own code may run (never implied)
    torch_dtype: TorchDtype = "float32"
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    path: str = ""  # parquet file/folder or datasets hub name
    split: str = "train"
    keep_ties: bool = False
    on_bad_row: OnBadRow = "error"  # "error" | "skip"
    caption_column: str = "caption"
    dual_captions: bool = False  # DCPO: caption_0 / caption_1
    resolution: int = setting(512, ge=1)
    random_crop: bool = False
    hflip: bool = True
    proportion_empty_prompts: float = setting(0.0, ge=0, lt=1)
    max_samples: int | None = setting(None, ge=1)
    cache_dir: str | None = None  # latent/text-embedding cache root; None = encode on the fly
    # DataLoader of the micro-batches (diffalign/trainers/loader.py): worker processes decode and collate; results
    # do not depend on the worker count. pin_memory applies on CUDA only; prefetch_factor batches ahead per worker.
    num_workers: int = setting(0, ge=0)
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = setting(2, ge=1)
    # causal_lm: prompt+completion tokens kept per sequence (truncation keeps the start, as TRL 1.16)
    max_length: int | None = setting(1024, ge=2)


@dataclass
class LossConfig:
    name: str = "dpo"  # key of diffalign.losses.LOSSES
    beta: float = setting(5000.0, gt=0)
    # extra keyword hyper-parameters of the loss function, e.g. {alpha: 1.0}, {use_weighting: true},
    # {f_divergence_type: js_divergence}; checked against the function's defaults
    params: dict[str, Any] = field(default_factory=dict)
    # Timestep weighting ω(t) of each sample's MSE (the ω(λ_t) of the Diffusion-DPO objective): "constant" (the
    # authors' code), "min_snr" (Hang et al., γ 5) or "truncated_snr" (Salimans & Ho, γ 1); see SDAdapter.snr_weights.
    weighting: LossWeighting = "constant"
    snr_gamma: float = setting(5.0, gt=0)


@dataclass
class LoraSettings:
    enabled: bool = True  # False = full fine-tune
    rank: int = setting(8, ge=1)
    alpha: float | None = setting(None, gt=0, note="= rank")  # None = rank
    # null = the backbone's default: [to_k, to_q, to_v, to_out.0] for UNets and SD3, "all-linear" for causal LMs
    target_modules: list[str] | None = None
    init: str = "gaussian"  # peft LoraConfig.init_lora_weights


@dataclass
class OptimConfig:
    # "adamw" (torch) | "adamw_8bit" (bitsandbytes AdamW8bit: needs `pip install 'diffalign[8bit]'`) | "adafactor"
    # (transformers, DiffusionDPO's SDXL settings: clip_threshold 1, no relative step or parameter scaling; uses
    # lr and weight_decay only). See diffalign/trainers/optimizers.py.
    optimizer: Optimizer = "adamw"
    lr: float = setting(1e-5, gt=0)
    scale_lr: bool = False  # lr *= batch * grad_accum * num_processes (original Diffusion-DPO script)
    weight_decay: float = setting(1e-2, ge=0)
    adam_beta1: float = setting(0.9, ge=0, lt=1)  # adam_* apply to adamw and adamw_8bit
    adam_beta2: float = setting(0.999, ge=0, lt=1)
    adam_epsilon: float = setting(1e-8, gt=0)
    lr_scheduler: LRScheduler = "constant"  # diffusers.optimization.get_scheduler names
    warmup_steps: int = setting(0, ge=0)
    max_grad_norm: float = setting(1.0, gt=0)


@dataclass
class TrainConfig:
    # a registered method (docs/methods/): diffusion "dpo" | "dcpo" | "mapo" | "sft" | "soar" | "sail" | "grpo" |
    # "direct_reward"; causal LM (model.backbone causal_lm): "preference" (offline; the loss's kind picks the data:
    # pairs, rankings or unpaired) | "grpo" (online, see the `online` section)
    method: str = "dpo"
    output_dir: str = "outputs/run"
    seed: int = 0
    max_steps: int = setting(1000, ge=1)  # optimizer steps
    train_batch_size: int = setting(1, ge=1)  # pairs per device per micro-step
    gradient_accumulation_steps: int = setting(1, ge=1)
    mixed_precision: MixedPrecision = "no"  # "no" | "fp16" | "bf16"
    gradient_checkpointing: bool = False
    # Reference model of dpo/dcpo: "auto" (LoRA -> adapters disabled, full -> frozen copy) | "frozen_copy" (full
    # fine-tune) | "frozen_copy_offload" (full fine-tune; the copy stays in CPU memory, streamed per forward) |
    # "precomputed" (values computed once before training for each sample's fixed (noise, t) draw, stored beside the
    # latent cache: training holds only the policy; with LoRA it saves the reference forward). See
    # diffalign/trainers/reference_store.py.
    reference: ReferenceMode = "auto"
    ema: bool = False
    ema_decay: float = setting(0.9999, gt=0, lt=1)
    checkpointing_steps: int = setting(500, ge=1)
    checkpoints_total_limit: int | None = setting(None, ge=1)
    # "auto" (resume from the newest valid checkpoint of output_dir; refuse an earlier run that has none) | "latest"
    # (the newest valid checkpoint, else a fresh start) | a checkpoint path | None (a fresh start; an earlier run in
    # output_dir is refused). See docs/runs.md.
    resume_from_checkpoint: str | None = "auto"
    overwrite_output_dir: bool = False  # remove an earlier run's checkpoints and metrics.jsonl and start at step 0
    log_every: int = setting(1, ge=1)
    report_to: list[str] = field(default_factory=list)  # accelerate trackers; metrics.jsonl is always written
    tracker_project_name: str = "diffalign"  # the trackers' project (tensorboard: its folder in output_dir)
    run_name: str | None = None  # the run's name in wandb, trackio, mlflow, clearml, swanlab; null = output_dir's name
    # consecutive non-finite steps (loss or gradient norm) before the run stops
    max_nonfinite_steps: int = setting(10, ge=1)
    # a checkpoint or export is refused when max|w| of the trained parameters exceeds this x max(max|w| at step 0, 1)
    max_weight_growth: float = setting(100.0, ge=1)
    progress_bar: bool = True


#: The sections every config has, then those of the registered methods (:mod:`diffalign.methods`).
CORE_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "loss": LossConfig,
    "lora": LoraSettings,
    "optim": OptimConfig,
    "train": TrainConfig,
}


def _method_sections() -> dict[str, type]:
    """The registered methods' sections, each published here under its class name (so configs pickle)."""
    sections = section_classes()
    for cls in sections.values():
        if cls.__module__ == "diffalign.methods":  # a section shared by several methods, composed there
            cls.__module__, cls.__qualname__ = __name__, cls.__name__
            globals()[cls.__name__] = cls
    return sections


Config = dataclasses.make_dataclass(
    "Config",
    [(name, cls, field(default_factory=cls)) for name, cls in {**CORE_SECTIONS, **_method_sections()}.items()],
)
Config.__module__ = __name__
Config.__doc__ = (
    "A whole training config: the core sections (model, data, loss, lora, optim, train) and one section per "
    "registered method that has settings (online, sail, soar, ...). Build it with load_config or config_from_dict."
)


def method_of(config: Any) -> Method | None:
    """The registered method ``config.train.method`` names in the family of ``config.model.backbone``, or None."""
    family = "llm" if config.model.backbone == "causal_lm" else "diffusion"
    return get_method(config.train.method, family)


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
    if origin is Literal:
        return type(typing.get_args(tp)[0]).__name__
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
    origin = typing.get_origin(tp)
    if origin is Literal:  # the allowed values are checked with the section's other rules
        return _convert(value, type(typing.get_args(tp)[0]), key, source)
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
    method = method_of(config)
    if "loss.name" not in origins and method is not None and method.default_loss is not None:
        config.loss.name = method.default_loss
    for key, value in (method.defaults if method is not None else {}).items():
        if key not in origins:
            section, name = key.split(".")
            setattr(getattr(config, section), name, value)
    _validate(config, origins, source)
    return config


# --------------------------------------------------------------------------------------------------- validation


def _registry() -> Mapping[str, Any] | None:
    try:
        from diffalign.losses import LOSSES
    except ImportError:
        return None
    return LOSSES


_BACKBONES_SPEC = "diffalign.models.backbones:BACKBONE_NAMES"


def _validate(config: Config, origins: Mapping[str, str], source: str) -> None:
    c = Checker(config, origins, source)
    if not config.model.pretrained:
        c.fail("model.pretrained", "'model.pretrained' is empty; set it to a diffusers folder or hub id")
    if config.model.backbone not in ("auto", "causal_lm"):  # else no need to import the adapters to know
        backbones = owned_names(_BACKBONES_SPEC)  # the registered diffusion backbones (diffalign.models.backbones)
        if backbones is not None:
            c.one_of("model.backbone", ("auto", *backbones, "causal_lm"))
    method = _validate_method(c)
    _validate_data(c)
    _validate_train(c, method)
    for name in CORE_SECTIONS:
        check_section(c, name, getattr(config, name))
    _validate_timestep_range(c)
    for name in method.sections:
        check_section(c, name, getattr(config, name), fields=section_fields(method, name))
    if method.validate is not None:
        method.validate(c)
    if method.default_loss is not None:
        _validate_method_and_loss(c, method)


def _validate_method(c: Checker) -> Method:
    """The registered method of ``train.method`` in the backbone's family, or the error naming the valid ones."""
    m, t = c.config.model, c.config.train
    llm = m.backbone == "causal_lm"
    family = "llm" if llm else "diffusion"
    if t.method in method_names() and t.method not in method_names(family):
        key = "train.method" if "train.method" in c.origins or not llm else "model.backbone"
        c.fail(
            key,
            f"train.method '{t.method}' and model.backbone '{m.backbone}' do not go together: causal LMs "
            f"(model.backbone=causal_lm) train with {' / '.join(method_names('llm'))}, diffusion models with "
            f"{' / '.join(method_names('diffusion'))}",
        )
    c.one_of("train.method", method_names())
    method = get_method(t.method, family)
    assert method is not None
    return method


def _validate_timestep_range(c: Checker) -> None:
    m = c.config.model
    c.check(
        "model.min_timestep_fraction",
        m.min_timestep_fraction < m.max_timestep_fraction,
        f"a fraction below model.max_timestep_fraction ({m.max_timestep_fraction})",
    )


def _validate_data(c: Checker) -> None:
    d = c.config.data
    if not d.path:
        c.fail("data.path", "'data.path' is empty; set it to a parquet file/folder or a datasets hub name")
    c.check("data.split", bool(d.split), "a non-empty split name")
    c.check("data.caption_column", bool(d.caption_column), "a non-empty column name")
    if d.random_crop and d.cache_dir is not None:
        c.fail(
            "data.random_crop",
            "random_crop is not supported with the cache; set data.random_crop=false or data.cache_dir=null",
        )


def _validate_train(c: Checker, method: Method) -> None:
    lr, o, t = c.config.lora, c.config.optim, c.config.train
    c.check(
        "lora.target_modules",
        lr.target_modules is None or bool(lr.target_modules) or not lr.enabled,
        "a non-empty list, or null for the backbone's default",
    )
    c.check("lora.init", bool(lr.init), "a non-empty peft init_lora_weights name")
    if o.lr_scheduler == "constant" and o.warmup_steps > 0:
        c.fail(
            "optim.warmup_steps",
            f"'optim.warmup_steps' is {o.warmup_steps} but lr_scheduler 'constant' ignores warm-up; "
            "use optim.lr_scheduler=constant_with_warmup or optim.warmup_steps=0",
        )
    c.check("train.output_dir", bool(t.output_dir), "a non-empty path")
    c.check("train.seed", 0 <= t.seed < 2**32, "in [0, 2**32) (the seed range of numpy and torch)")
    if t.mixed_precision in ("fp32", "float32", "full"):
        c.fail(
            "train.mixed_precision",
            f"'train.mixed_precision' must be one of 'no', 'fp16', 'bf16'; got '{t.mixed_precision}': full "
            "precision is 'no'",
        )
    for i, tracker in enumerate(t.report_to):
        if tracker not in TRACKERS:
            close = difflib.get_close_matches(tracker, TRACKERS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"accelerate's trackers: {', '.join(TRACKERS)}"
            c.fail("train.report_to", f"'train.report_to[{i}]' {tracker!r} is not a tracker; {hint}")
    c.check("train.tracker_project_name", bool(t.tracker_project_name.strip()), "a non-empty name")
    if t.run_name is not None:
        c.check("train.run_name", bool(t.run_name.strip()), "a non-empty name or null (the output folder's name)")
    if t.reference in ("frozen_copy", "frozen_copy_offload") and lr.enabled:
        c.fail(
            "train.reference",
            f"train.reference '{t.reference}' is for full fine-tuning (lora.enabled=false); with LoRA the reference "
            "is the same network with its adapters disabled and costs no memory: use 'auto' (or 'precomputed' to "
            "also skip the reference forward)",
        )
    if t.reference != "auto" and not method.uses_reference:
        c.fail(
            "train.reference",
            f"train.reference '{t.reference}' has no effect: train.method '{t.method}' uses no reference model; "
            "leave train.reference=auto",
        )
    c.check("train.resume_from_checkpoint", t.resume_from_checkpoint != "", "'auto', 'latest', a path or null")
    if t.overwrite_output_dir and t.resume_from_checkpoint not in ("auto", None):
        c.fail(
            "train.overwrite_output_dir",
            f"train.overwrite_output_dir=true starts afresh but train.resume_from_checkpoint "
            f"'{t.resume_from_checkpoint}' resumes; set train.resume_from_checkpoint=auto to start afresh, or "
            "train.overwrite_output_dir=false to resume",
        )


#: Losses whose ``loss.beta`` default means something to the diffusion methods (Diffusion-DPO's 5000; SFT has none).
_BETA_DEFAULT_OK = ("dpo", "sft")


def _validate_method_and_loss(c: Checker, method: Method) -> None:
    """``loss.name`` is one the method trains (its ``losses`` from the registry, else its default), with an explicit
    ``loss.beta`` where the default would apply silently, and ``loss.params`` its hyper-parameters."""
    config = c.config
    loss = config.loss
    registry = _registry()
    if registry is not None and loss.name not in registry:
        c.one_of("loss.name", sorted(registry))
    if registry is None:  # schema-only checks: the loss registry is not importable
        allowed: Sequence[str] = (loss.name,)
    elif method.losses is not None:
        allowed = method.losses(registry)
    else:
        allowed = (method.default_loss,)
    if loss.name not in allowed:
        key = "loss.name" if "loss.name" in c.origins else "train.method"
        listed = ", ".join(f"'{a}'" for a in allowed)
        c.fail(
            key, f"train.method '{method.name}' needs loss.name in {listed}, got '{loss.name}' (or leave loss.name out)"
        )
    fn = registry.get(loss.name) if registry is not None else None
    takes_beta = fn is None or "beta" in inspect.signature(fn).parameters
    default_beta = LossConfig.beta
    if method.family == "llm" and takes_beta and "loss.beta" not in c.origins:
        c.fail(
            "loss.name",
            f"loss '{loss.name}' needs an explicit 'loss.beta' (TRL's DPO default is 0.1); the default "
            f"{default_beta} is Diffusion-DPO's",
        )
    elif method.family != "llm" and loss.name not in _BETA_DEFAULT_OK and "loss.beta" not in c.origins:
        hint = " (MaPO's authors use 0.1)" if loss.name == "mapo" else ""
        c.fail(
            "loss.name",
            f"loss '{loss.name}' needs an explicit 'loss.beta'{hint}; the default {default_beta} is "
            "Diffusion-DPO's and would apply silently",
        )
    if fn is not None:
        _validate_loss_params(c, fn)


def _loss_hyperparameters(fn: Any) -> dict[str, bool]:
    """Keyword hyper-parameters of a loss function -> whether each is required: every argument but its tensor
    inputs (:func:`diffalign.losses.registry.tensor_inputs`), ``beta`` (it has its own key) and ``**kwargs``."""
    from diffalign.losses.registry import tensor_inputs

    tensors = tensor_inputs(fn)
    return {
        name: p.default is inspect.Parameter.empty
        for name, p in inspect.signature(fn).parameters.items()
        if name != "beta" and name not in tensors and p.kind is not inspect.Parameter.VAR_KEYWORD
    }


def _validate_loss_params(c: Checker, fn: Any) -> None:
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


def _check_param_type(c: Checker, key: str, value: Any, fn: Any, param: str) -> None:
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


def config_to_yaml(config: Config, *, only_read: bool = False) -> str:
    """The config as YAML text that :func:`load_config` reads back to an equal Config; ``only_read``: only the
    sections (and, of a shared section, the keys) that ``train.method`` reads (what ``--print-config`` shows)."""
    data = config_to_dict(config)
    method = method_of(config) if only_read else None
    if method is not None:
        data = {name: values for name, values in data.items() if method.reads(name)}
        for name in method.sections:
            keep = section_fields(method, name)
            data[name] = {k: v for k, v in data[name].items() if keep is None or k in keep}
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


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
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as YAML (the sections train.method reads) and exit",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, applied after the file")
    return parser


def parse_cli(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> Config:
    """``--config FILE [key=value ...] [--print-config]`` -> Config; with --print-config print it and exit 0.
    Then the optional packages the config needs are checked (before any model loads)."""
    parser = parser or build_arg_parser()
    args = parser.parse_intermixed_args(None if argv is None else list(argv))
    config = load_config(args.config, args.overrides)
    if args.print_config:
        sys.stdout.write(config_to_yaml(config, only_read=True))
        sys.stdout.flush()
        raise SystemExit(0)
    from diffalign.utils.imports import check_config_dependencies

    check_config_dependencies(config)
    return config
