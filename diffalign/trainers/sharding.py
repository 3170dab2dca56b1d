"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the trainers: detect the request, shard a denoiser (LoRA or full
fine-tune) block by block, write and read sharded checkpoints that hold only trained parameters, gather the full
weights once for the final export, and count each rank's share of the training state.

Why the trainer shards by itself: accelerate turns an FSDP launch into ``DistributedType.FSDP`` only on accelerator
devices. Launched on CPUs (``accelerate launch --use_fsdp --fsdp_version 2`` or the same ``FSDP_*`` environment;
measured with accelerate 1.15 and two gloo processes) ``distributed_type`` stays ``MULTI_CPU``, ``Accelerator()``
builds a ``FullyShardedDataParallelPlugin`` from the environment and then drops it (``accelerator.state`` has no
``fsdp_plugin`` attribute), and ``accelerator.is_fsdp2`` is False. Doing the sharding here gives GPUs and CPUs one code
path, so CPU tests run the code a GPU run uses.

Detecting the request (:func:`fsdp2_settings`): on GPUs ``accelerator.state.fsdp_plugin`` holds the launch's plugin;
on CPUs ``ACCELERATE_USE_FSDP=true`` (set by the launcher for ``--use_fsdp`` or a config file with
``distributed_type: FSDP``) is the only trace, and a plugin built from the environment reads the same ``FSDP_*``
variables (``FSDP_VERSION``, ``FSDP_RESHARD_AFTER_FORWARD``, ``FSDP_OFFLOAD_PARAMS``, ...) as the GPU one. The
precision comes from ``accelerator.mixed_precision`` (the trainer's ``train.mixed_precision`` wins over the launch's).

What accelerate gets wrong on CPUs with these settings (each measured with two gloo processes):

* ``accelerate launch --use_fsdp`` defaults to ``--fsdp_version 1``, and with FSDP1 ``Accelerator()`` itself raises
  "There are currently no available devices found" on a CPU-only machine (the launcher's default
  ``--fsdp_sync_module_states true`` wants a GPU), before any diffalign code runs; the FSDP1 refusal below is therefore
  reached on GPUs only.
* ``accelerator.prepare(model)`` of a sharded model on ``MULTI_CPU`` wraps it in DDP, whose start-up broadcast fails
  ("c10d.broadcast_.default does not have a sharding strategy registered"): the model must not go through ``prepare``.
* ``accelerator.accumulate(model)`` never calls ``set_requires_gradient_sync`` on CPUs (it looks for DDP's
  ``no_sync``); on GPUs (``is_fsdp2``) it turns gradient sync off for all but the last micro-batch. The trainer sets it
  itself so that both device kinds accumulate the same way.
* ``accelerator.clip_grad_norm_`` over DTensor gradients of a model kept out of ``prepare`` clips correctly (its
  DTensor-aware branch) but returns the total norm as a DTensor; :func:`full_tensor` makes it a number.
* ``fsdp_offload_params: true`` asks for ``CPUOffloadPolicy``, whose default pinned memory raises "Found no NVIDIA
  driver" without an accelerator; :class:`Fsdp2Settings` pins only when there is one.

Pitfalls found in torch 2.14: ``fully_shard`` accepts frozen bf16 base weights and trainable fp32 LoRA weights in one
group (it wants one dtype among the *trainable* parameters only); peft's adapter switch
(:func:`diffalign.models.reference.adapters_disabled`) works on the sharded module; a root module sharded with
``reshard_after_forward=None`` keeps its own parameters unsharded after a forward run without grad (no backward comes
to reshard them), so frozen modules are sharded with an explicit value; ``set_state_dict`` loads strictly unless told
``strict=False``, which loading trained parameters only needs; ``dcp.load`` fills the given state dict in place,
python values (an EMA's step count) included; the first optimizer step over DTensor parameters costs seconds of CPU
time once (DTensor's sharding propagation, cached per parameter shape afterwards; ``foreach=True`` made it slower).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin, str_to_bool
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from huggingface_hub import save_torch_state_dict
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from diffalign.models.lora import save_lora

_PARAM_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_MODEL_KEY = "model"
#: sub-folder of a trainer checkpoint holding the sharded state (torch.distributed.checkpoint files)
SHARDED_DIR = "fsdp2"
_FSDP1_REFUSAL = "FSDP1 is not supported: launch with fsdp_version: 2 (configs/accelerate/fsdp.yaml)"


@dataclass(frozen=True)
class Fsdp2Settings:
    """What an FSDP2 launch asks for, in ``fully_shard`` terms.

    ``block_classes``: class names to shard as units (accelerate's ``fsdp_transformer_layer_cls_to_wrap``); ``None``
    uses the model's ``_no_split_modules``.
    """

    reshard_after_forward: bool = True
    cpu_offload: bool = False
    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    block_classes: tuple[str, ...] | None = None

    def fully_shard_kwargs(self, mesh: DeviceMesh | None = None) -> dict[str, Any]:
        return {
            "mesh": mesh,
            "reshard_after_forward": self.reshard_after_forward,
            "mp_policy": MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype),
            # pinned host memory speeds copies to an accelerator; without one pinning raises
            "offload_policy": CPUOffloadPolicy(pin_memory=torch.accelerator.is_available())
            if self.cpu_offload
            else OffloadPolicy(),
        }


def fsdp2_settings(accelerator: Accelerator) -> Fsdp2Settings | None:
    """The FSDP2 request of this launch, or ``None`` when FSDP was not asked for (see the module docstring for where
    it is found on GPUs and CPUs). bf16/fp16 mixed precision becomes the all-gathered parameters' dtype, with
    gradients reduced in fp32."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None:
        if not str_to_bool(os.environ.get("ACCELERATE_USE_FSDP", "false")):
            return None
        if os.environ.get("FSDP_VERSION", "1") != "2":  # before the plugin: FSDP1's plugin raises on CPU-only hosts
            raise ValueError(_FSDP1_REFUSAL)
        plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ValueError(_FSDP1_REFUSAL)
    if plugin.activation_checkpointing:
        raise ValueError(
            "fsdp_activation_checkpointing is not supported: set it to false and use train.gradient_checkpointing=true"
        )
    param_dtype = _PARAM_DTYPES.get(accelerator.mixed_precision)
    names = plugin.transformer_cls_names_to_wrap
    return Fsdp2Settings(
        reshard_after_forward=bool(plugin.reshard_after_forward),
        cpu_offload=isinstance(plugin.cpu_offload, CPUOffloadPolicy),
        param_dtype=param_dtype,
        reduce_dtype=torch.float32 if param_dtype is not None else None,
        block_classes=tuple(names) if names else None,
    )


def shard_units(module: torch.nn.Module, block_classes: Sequence[str] | None = None) -> list[torch.nn.Module]:
    """The submodules :func:`shard_model` shards on their own, innermost first (``fully_shard`` must run bottom-up).

    As accelerate's transformer-based auto-wrap: every module whose class name is in ``block_classes`` or else in the
    model's ``_no_split_modules`` (diffusers' UNet2DConditionModel: ResnetBlock2D, BasicTransformerBlock and two up
    blocks; SD3Transformer2DModel: JointTransformerBlock; transformers' models: their decoder layers). A model without
    such a list, or whose list names no class present, falls back to the children of its ``ModuleList`` s.
    """
    names = set(block_classes or getattr(module, "_no_split_modules", None) or ())
    ordered = list(module.modules())[1:][::-1]  # reversed pre-order: every module comes after its descendants
    units = [m for m in ordered if type(m).__name__ in names]
    if block_classes and not units:
        raise ValueError(
            f"fsdp_transformer_layer_cls_to_wrap {sorted(names)} names no module class of {type(module).__name__}"
        )
    if not units:
        listed = {id(child) for m in ordered if isinstance(m, torch.nn.ModuleList) for child in m}
        units = [m for m in ordered if id(m) in listed]
    return units


def shard_model(module: torch.nn.Module, settings: Fsdp2Settings, *, mesh: DeviceMesh | None = None) -> torch.nn.Module:
    """``fully_shard`` each of :func:`shard_units` and then ``module`` itself, in place; returns ``module``.

    Call it before building the optimizer or an EMA (sharding replaces every parameter by a DTensor parameter) and
    after LoRA adapters are attached (they are sharded with their blocks). A module that trains keeps the root's
    parameters gathered after forward (torch's default for roots: backward needs them at once); a frozen one (the
    full fine-tune's reference copy) reshards them as ``settings`` say, since no backward would.
    """
    kwargs = settings.fully_shard_kwargs(mesh)
    for unit in shard_units(module, settings.block_classes):
        fully_shard(unit, **kwargs)
    trains = any(p.requires_grad for p in module.parameters())
    fully_shard(module, **{**kwargs, "reshard_after_forward": None if trains else settings.reshard_after_forward})
    return module


def trainable_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters that train (as in the state dicts of ``torch.distributed.checkpoint.state_dict``)."""
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Sharded views of the trained parameters and the optimizer state (FQN keys) for ``dcp.save`` / ``dcp.load``.
    ``ignore_frozen_params`` drops frozen parameters but keeps buffers, which the trainable-only rule leaves to the
    base model as well."""
    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    keep = trainable_names(model)
    return {_MODEL_KEY: {k: v for k, v in model_state.items() if k in keep}, "optimizer": optim_state}


def save_sharded(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    extra: dict[str, Any] | None = None,
) -> None:
    """Collective: every rank writes its shards of the trained parameters and of the optimizer state, plus ``extra``
    (e.g. ``{"ema": ema.state_dict()}``: DTensor shadows are sharded, python values stored once) to ``directory`` with
    ``torch.distributed.checkpoint`` (one ``.distcp`` file per rank and a ``.metadata``). Frozen weights are not
    written: they come back from the base model."""
    dcp.save({**_training_state(model, optimizer), "extra": extra or {}}, checkpoint_id=os.fspath(directory))


def load_sharded(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    extra: dict[str, Any] | None = None,
) -> None:
    """Collective: the inverse of :func:`save_sharded`, into a model built as when saved and its optimizer. The
    number of ranks may differ (``torch.distributed.checkpoint`` reshards; tested from two ranks into one unsharded,
    non-distributed process). A fresh optimizer will do: ``get_state_dict`` creates its state with one zero-gradient
    step at lr 0 before the checkpoint's replaces it. ``extra`` is filled in place, so pass the same structure
    (``ema.state_dict()``) and hand it back (``ema.load_state_dict``). Fails with one line when the checkpoint's
    parameters are not the model's trained ones."""
    saved = _saved_model_keys(directory)
    expected = trainable_names(model)
    if saved != expected:
        raise ValueError(
            f"{directory}: checkpoint parameters do not match the model's trainable parameters "
            f"({len(saved - expected)} unexpected, {len(expected - saved)} missing); was it written with different "
            "lora settings?"
        )
    state = {**_training_state(model, optimizer), "extra": {} if extra is None else extra}
    dcp.load(state, checkpoint_id=os.fspath(directory))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state[_MODEL_KEY],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(strict=False),  # frozen parameters and buffers stay as the base model has them
    )


def _saved_model_keys(directory: str | os.PathLike) -> set[str]:
    metadata = dcp.FileSystemReader(os.fspath(directory)).read_metadata()
    prefix = _MODEL_KEY + "."
    return {key.removeprefix(prefix) for key in metadata.state_dict_metadata if key.startswith(prefix)}


def gather_full_state_dict(module: torch.nn.Module, *, trainable_only: bool) -> dict[str, torch.Tensor]:
    """Collective: the unsharded state dict, on the CPU of the main rank (``get_model_state_dict`` with
    ``full_state_dict=True, cpu_offload=True``); other ranks get ``{}``. ``trainable_only`` keeps only the parameters
    that train (LoRA: the adapters); otherwise parameters and persistent buffers, as ``module.state_dict()`` names
    them."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    state = get_model_state_dict(module, options=options)
    if trainable_only:
        keep = trainable_names(module)
        state = {k: v for k, v in state.items() if k in keep}
    # a parameter whose first dimension does not divide by the number of ranks comes back as a view of its padded
    # all-gather buffer; safetensors refuses to write a tensor that does not cover its storage
    return {k: v if _owns_storage(v) else v.clone() for k, v in state.items()}


def _owns_storage(tensor: torch.Tensor) -> bool:
    return tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


def unsharded_class(module: torch.nn.Module) -> type:
    """The class ``module`` had before ``fully_shard`` replaced it by a subclass ``FSDP<Name>`` of FSDPModule."""
    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))


def _is_main_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def export_denoiser(module: torch.nn.Module, directory: str | os.PathLike) -> Path | None:
    """Collective: write a fully fine-tuned diffusers model (``ModelMixin``) that ``from_pretrained(directory)`` loads
    (or ``from_pretrained(root, subfolder=...)`` for ``directory = root / subfolder``). Returns the folder on the main
    rank, ``None`` elsewhere.

    ``ModelMixin.save_pretrained`` reads ``self.state_dict()``, which under FSDP2 holds DTensor shards and cannot be
    given another, so the main rank writes ``config.json`` (``save_config``) and the gathered weights as
    ``diffusion_pytorch_model.safetensors`` itself (``huggingface_hub.save_torch_state_dict``, split at diffusers'
    10 GB with an index file as ``save_pretrained`` does). ``save_config`` records the class name, which
    ``fully_shard`` changed to ``FSDP<Name>``; the file gets the model's own."""
    state = gather_full_state_dict(module, trainable_only=False)
    if not _is_main_rank():
        return None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    module.save_config(directory)
    config_file = directory / module.config_name
    config = json.loads(config_file.read_text())
    config["_class_name"] = unsharded_class(module).__name__
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    pattern = SAFETENSORS_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors")
    save_torch_state_dict(state, directory, filename_pattern=pattern, max_shard_size="10GB")
    return directory


def export_lora(
    module: torch.nn.Module,
    directory: str | os.PathLike,
    *,
    pipeline_cls: type,
    component: str = "unet",
    adapter_name: str = "default",
) -> Path | None:
    """Collective: write the LoRA of a sharded denoiser with :func:`diffalign.models.lora.save_lora`
    (``pytorch_lora_weights.safetensors`` that ``pipeline_cls.load_lora_weights`` loads), from the gathered adapter
    weights instead of the DTensor shards. Returns the file on the main rank, ``None`` elsewhere."""
    state = gather_full_state_dict(module, trainable_only=True)
    if not _is_main_rank():
        return None
    return save_lora(
        module, directory, adapter_name=adapter_name, pipeline_cls=pipeline_cls, component=component, state_dict=state
    )


def export_pretrained(model: torch.nn.Module, directory: str | os.PathLike) -> Path | None:
    """Collective: ``save_pretrained`` of a sharded transformers model (or peft model: only its adapter is written)
    from the gathered weights, on the main rank; returns the folder there, ``None`` elsewhere. transformers records
    ``type(model).__name__`` in ``config.architectures``, which ``fully_shard`` renamed to ``FSDP<Name>``: the
    config gets the model's own name back."""
    state = gather_full_state_dict(model, trainable_only=False)
    if not _is_main_rank():
        return None
    directory = Path(directory)
    model.save_pretrained(directory, state_dict=state, safe_serialization=True)
    config_file = directory / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        config["architectures"] = [unsharded_class(model).__name__]
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: call it on every rank), a plain tensor as is: e.g. the total norm that
    ``accelerator.clip_grad_norm_`` / ``torch.nn.utils.clip_grad_norm_`` return over DTensor gradients."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def local_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of this rank's share of the training state: parameters (frozen ones too), gradients present and
    optimizer state tensors, counting a DTensor's local shard (``to_local``) and a plain tensor whole. Shards are
    counted unpadded, so two ranks hold about half each (the ceil half of an odd first dimension on rank 0)."""
    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    states = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return sum(_local_bytes(t) for t in itertools.chain(params, grads, states))


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()
