"""Load an SD 1.x/2.x, SDXL or SD3 model (hub id or local diffusers folder) into its backbone adapter.

:func:`load_adapter` picks the backbone from the folder (or the hub repo's ``model_index.json``): a ``transformer``
component means SD3 (:class:`SD3Adapter`), a ``text_encoder_2`` next to a ``unet`` means SDXL
(:class:`SDXLAdapter`), anything else SD 1.x/2.x (:class:`SDAdapter`).

Each component is loaded on its own with ``X.from_pretrained(pretrained, subfolder=...)``, as diffusers' training
scripts do; the scheduler is always a ``DDPMScheduler`` built from the pipeline's scheduler config. Loading is safe:
safetensors only, no remote code. A local folder never contacts the hub.

VAE or pixel space: a local folder has a VAE iff it has a ``vae/`` subfolder (if its ``model_index.json`` names a
VAE but the folder is missing, that is an error). For a hub id, ``model_index.json`` decides: ``"vae": null`` or
``[null, null]`` means pixel space, anything else loads ``vae/``.

A folder that does not exist, lacks a component or its weights, or a hub repo that cannot be read raises
:class:`ModelNotFoundError` (a ``FileNotFoundError``) naming the folder / component and what to pass instead.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

from diffalign.errors import DiffalignError
from diffalign.models.diffusion import DiffusionAdapter, SDAdapter
from diffalign.models.sd3 import SD3Adapter
from diffalign.models.sdxl import SDXLAdapter

_REQUIRED_SUBFOLDERS = ("unet", "scheduler", "text_encoder", "tokenizer")
_REQUIRED = {
    "sd": _REQUIRED_SUBFOLDERS,
    "sdxl": (*_REQUIRED_SUBFOLDERS, "text_encoder_2", "tokenizer_2"),
    "sd3": ("transformer", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
}
BACKBONES = ("sd", "sdxl", "sd3")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelNotFoundError(DiffalignError, FileNotFoundError):
    """A model folder, component or hub repo that cannot be found or read; the message says what to pass."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__


def _hub_failure(repo_id: str, what: str, err: BaseException) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"cannot read {what} of '{repo_id}': it is not a folder under {os.getcwd()}, so it was taken as a hub id, "
        f"and the hub gave: {_first_line(err)}; pass an existing diffusers folder, or check the hub id, the revision "
        "and the network (HF_HUB_OFFLINE=1 / model.local_files_only=true read only the local cache)"
    )


def _local_has_vae(folder: Path, backbone: str = "sd") -> bool:
    required = _REQUIRED[backbone]
    missing = [name for name in required if not (folder / name).is_dir()]
    if missing:
        raise ModelNotFoundError(
            f"{folder} is not an {backbone.upper()} model folder: missing subfolder(s) {missing}; expected the "
            f"diffusers layout {list(required)} (+ optional vae/), as a pipeline's save_pretrained writes it"
        )
    if (folder / "vae").is_dir():
        return True
    index_path = folder / "model_index.json"
    if index_path.is_file() and _present(json.loads(index_path.read_text()).get("vae")):
        raise ModelNotFoundError(
            f"{index_path} names a VAE but {folder / 'vae'} is missing; restore the vae/ folder, or set "
            f'"vae": [null, null] in model_index.json for a pixel-space model'
        )
    return False


def _hub_model_index(repo_id: str, revision: str | None, local_files_only: bool) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download

    try:
        index_path = hf_hub_download(repo_id, "model_index.json", revision=revision, local_files_only=local_files_only)
    except (OSError, ValueError) as err:  # not found, gated, offline, no network (huggingface_hub's errors)
        raise _hub_failure(repo_id, "model_index.json", err) from err
    return json.loads(Path(index_path).read_text())


def _hub_has_vae(repo_id: str, revision: str | None, local_files_only: bool) -> bool:
    return _present(_hub_model_index(repo_id, revision, local_files_only).get("vae"))


def _present(entry: Any) -> bool:
    return entry is not None and not (isinstance(entry, list) and all(item is None for item in entry))


def backbone_of_index(model_index: dict[str, Any]) -> str:
    """``"sd3"`` if the pipeline has a ``transformer``, ``"sdxl"`` if it has a ``text_encoder_2``, else ``"sd"``."""
    if _present(model_index.get("transformer")):
        return "sd3"
    if _present(model_index.get("text_encoder_2")):
        return "sdxl"
    return "sd"


def detect_backbone(
    pretrained: str | os.PathLike, *, revision: str | None = None, local_files_only: bool = False
) -> str:
    """The backbone family of a diffusers folder or hub repo: ``"sd"``, ``"sdxl"`` or ``"sd3"``."""
    location, is_local = resolve_pretrained(pretrained)
    if not is_local:
        return backbone_of_index(_hub_model_index(location, revision, local_files_only))
    folder = Path(location)
    present = {name: [True] for name in ("transformer", "text_encoder_2") if (folder / name).is_dir()}
    return backbone_of_index(present)


def resolve_pretrained(pretrained: str | os.PathLike) -> tuple[str, bool]:
    """Return ``(location, is_local)``; a path-like string that does not exist raises :class:`ModelNotFoundError`."""
    text = os.fspath(pretrained)
    expanded = os.path.expanduser(text)
    if os.path.isdir(expanded):
        return expanded, True
    if os.path.exists(expanded):
        raise ModelNotFoundError(f"{expanded} is a file; expected a diffusers model folder or a hub id")
    if os.path.isabs(expanded) or text.startswith((".", "~")) or text.count("/") > 1 or not _HUB_ID.match(text):
        raise ModelNotFoundError(
            f"model folder {expanded} does not exist; pass an existing diffusers folder (unet/, scheduler/, "
            f"text_encoder/, tokenizer/, optional vae/) or a hub id such as 'owner/name'"
        )
    return text, False


class _Source:
    """One pipeline to load components from: the shared ``from_pretrained`` keyword arguments, and which optional
    components it has (a local folder's subfolders, or a hub repo's ``model_index.json``, read once)."""

    def __init__(
        self,
        pretrained: str | os.PathLike,
        backbone: str,
        *,
        revision: str | None,
        variant: str | None,
        torch_dtype: torch.dtype | None,
        local_files_only: bool,
    ) -> None:
        self.location, self.is_local = resolve_pretrained(pretrained)
        self.backbone = backbone
        self.common: dict[str, Any] = {"revision": revision, "local_files_only": local_files_only or self.is_local}
        self.weights: dict[str, Any] = {**self.common, "variant": variant, "use_safetensors": True}
        self.diffusers_dtype = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        self.transformers_dtype = {} if torch_dtype is None else {"dtype": torch_dtype}
        self._index: dict[str, Any] | None = None

    def has(self, component: str) -> bool:
        """Whether the pipeline has ``component``. For a local ``"vae"`` the folder layout is checked first (the
        loaders ask for the VAE before anything else) and a missing ``vae/`` that the index names is an error."""
        if self.is_local:
            if component == "vae":
                return _local_has_vae(Path(self.location), self.backbone)
            return (Path(self.location) / component).is_dir()
        if self._index is None:
            self._index = _hub_model_index(self.location, self.common["revision"], self.common["local_files_only"])
        return _present(self._index.get(component))

    def diffusers(self, cls: type, subfolder: str) -> Any:
        return self._load(cls, subfolder, {**self.weights, **self.diffusers_dtype})

    def transformers(self, cls: type, subfolder: str) -> Any:
        return self._load(cls, subfolder, {**self.weights, **self.transformers_dtype})

    def config_only(self, cls: type, subfolder: str) -> Any:
        """A scheduler or tokenizer: no weights, so no variant / safetensors / dtype arguments."""
        return self._load(cls, subfolder, self.common)

    def _load(self, cls: type, subfolder: str, kwargs: dict[str, Any]) -> Any:
        """``cls.from_pretrained(location, subfolder=...)``; a missing or unreadable component (diffusers and
        transformers raise ``OSError``) becomes a :class:`ModelNotFoundError` naming the subfolder."""
        try:
            return cls.from_pretrained(self.location, subfolder=subfolder, **kwargs)
        except OSError as err:
            if isinstance(err, DiffalignError):
                raise
            if not self.is_local:
                raise _hub_failure(self.location, f"{subfolder}/", err) from err
            variant = f" (variant '{kwargs['variant']}')" if kwargs.get("variant") else ""
            raise ModelNotFoundError(
                f"{Path(self.location) / subfolder}: cannot load the {cls.__name__}{variant}: {_first_line(err)}; the "
                "folder must hold the component as save_pretrained writes it (config and safetensors weights)"
            ) from err

    def vae(self) -> AutoencoderKL | None:
        return self.diffusers(AutoencoderKL, "vae") if self.has("vae") else None


def _eval(*modules: torch.nn.Module | None) -> None:
    for module in modules:
        if module is not None:
            module.eval()


def load_sd_adapter(
    pretrained: str | os.PathLike,
    *,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype | None = None,
    local_files_only: bool = False,
    prediction_type: str | None = None,
) -> SDAdapter:
    """Load UNet, DDPM scheduler, CLIP text encoder and tokenizer (and the VAE if there is one) into an SDAdapter.

    ``torch_dtype`` applies to every model component (``None`` keeps the stored dtype); ``variant`` selects e.g.
    ``diffusion_pytorch_model.fp16.safetensors``; ``prediction_type`` overrides the scheduler config's.
    """
    src = _Source(
        pretrained, "sd", revision=revision, variant=variant, torch_dtype=torch_dtype, local_files_only=local_files_only
    )
    vae = src.vae()
    unet = src.diffusers(UNet2DConditionModel, "unet")
    text_encoder = src.transformers(CLIPTextModel, "text_encoder")
    _eval(unet, text_encoder, vae)
    return SDAdapter(
        unet,
        src.config_only(DDPMScheduler, "scheduler"),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=src.config_only(CLIPTokenizer, "tokenizer"),
        prediction_type=prediction_type,
    )


def load_sdxl_adapter(
    pretrained: str | os.PathLike,
    *,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype | None = None,
    local_files_only: bool = False,
    prediction_type: str | None = None,
    time_ids: str = "constant",
) -> SDXLAdapter:
    """Load an SDXL pipeline's UNet, DDPM scheduler, both CLIP encoders and tokenizers (and VAE) into an
    :class:`SDXLAdapter`; ``time_ids`` is ``"constant"`` or ``"from_data"`` (see :mod:`diffalign.models.sdxl`)."""
    src = _Source(
        pretrained,
        "sdxl",
        revision=revision,
        variant=variant,
        torch_dtype=torch_dtype,
        local_files_only=local_files_only,
    )
    vae = src.vae()
    unet = src.diffusers(UNet2DConditionModel, "unet")
    text_encoder = src.transformers(CLIPTextModel, "text_encoder")
    text_encoder_2 = src.transformers(CLIPTextModelWithProjection, "text_encoder_2")
    _eval(unet, text_encoder, text_encoder_2, vae)
    return SDXLAdapter(
        unet,
        src.config_only(DDPMScheduler, "scheduler"),
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=src.config_only(CLIPTokenizer, "tokenizer"),
        tokenizer_2=src.config_only(CLIPTokenizer, "tokenizer_2"),
        prediction_type=prediction_type,
        time_ids=time_ids,
    )


def load_sd3_adapter(
    pretrained: str | os.PathLike,
    *,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype | None = None,
    local_files_only: bool = False,
    load_t5: bool = True,
    max_sequence_length: int = 77,
    timestep_density: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> SD3Adapter:
    """Load an SD3 / SD3.5 pipeline's transformer, flow-matching scheduler, CLIP-L, CLIP-G (and T5 unless
    ``load_t5=False`` or the pipeline has none: zeros replace its embeddings, as in diffusers) and VAE."""
    src = _Source(
        pretrained,
        "sd3",
        revision=revision,
        variant=variant,
        torch_dtype=torch_dtype,
        local_files_only=local_files_only,
    )
    vae = src.vae()
    transformer = src.diffusers(SD3Transformer2DModel, "transformer")
    text_encoder = src.transformers(CLIPTextModelWithProjection, "text_encoder")
    text_encoder_2 = src.transformers(CLIPTextModelWithProjection, "text_encoder_2")
    text_encoder_3 = tokenizer_3 = None
    if load_t5 and src.has("text_encoder_3"):
        text_encoder_3 = src.transformers(T5EncoderModel, "text_encoder_3")
        tokenizer_3 = src.config_only(AutoTokenizer, "tokenizer_3")
    _eval(transformer, text_encoder, text_encoder_2, text_encoder_3, vae)
    return SD3Adapter(
        transformer,
        src.config_only(FlowMatchEulerDiscreteScheduler, "scheduler"),
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        text_encoder_3=text_encoder_3,
        tokenizer=src.config_only(CLIPTokenizer, "tokenizer"),
        tokenizer_2=src.config_only(CLIPTokenizer, "tokenizer_2"),
        tokenizer_3=tokenizer_3,
        max_sequence_length=max_sequence_length,
        timestep_density=timestep_density,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
    )


def load_adapter(
    pretrained: str | os.PathLike,
    *,
    backbone: str = "auto",
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype | None = None,
    local_files_only: bool = False,
    prediction_type: str | None = None,
    sdxl_time_ids: str = "constant",
    **sd3_options: Any,
) -> DiffusionAdapter:
    """Load ``pretrained`` into the adapter of its backbone (``backbone="auto"`` detects it; see the module
    docstring). ``prediction_type`` applies to SD/SDXL (SD3 always predicts the flow velocity), ``sdxl_time_ids``
    to SDXL, ``sd3_options`` (``load_t5``, ``max_sequence_length``, ``timestep_density``, ``logit_mean``,
    ``logit_std``, ``mode_scale``) to SD3."""
    if backbone not in ("auto", *BACKBONES):
        raise ValueError(f"backbone={backbone!r}: expected 'auto' or one of {BACKBONES}")
    if backbone == "auto":
        backbone = detect_backbone(pretrained, revision=revision, local_files_only=local_files_only)
    common: dict[str, Any] = {
        "revision": revision,
        "variant": variant,
        "torch_dtype": torch_dtype,
        "local_files_only": local_files_only,
    }
    if backbone == "sd3":
        if prediction_type not in (None, "flow"):
            raise ValueError(f"prediction_type={prediction_type!r} does not apply to SD3 (a flow-matching model)")
        return load_sd3_adapter(pretrained, **common, **sd3_options)
    if sd3_options:
        raise ValueError(f"{sorted(sd3_options)} apply only to SD3 models; {pretrained} is {backbone.upper()}")
    if backbone == "sdxl":
        return load_sdxl_adapter(pretrained, **common, prediction_type=prediction_type, time_ids=sdxl_time_ids)
    return load_sd_adapter(pretrained, **common, prediction_type=prediction_type)


def adapter_from_config(model: Any) -> DiffusionAdapter:
    """:func:`load_adapter` with the fields of a :class:`diffalign.config.ModelConfig`."""
    backbone = model.backbone
    if backbone == "auto":
        backbone = detect_backbone(model.pretrained, revision=model.revision, local_files_only=model.local_files_only)
    sd3_options: dict[str, Any] = {}
    if backbone == "sd3":
        sd3_options = {
            "load_t5": model.load_t5,
            "max_sequence_length": model.max_sequence_length,
            "timestep_density": model.timestep_density,
            "logit_mean": model.logit_mean,
            "logit_std": model.logit_std,
            "mode_scale": model.mode_scale,
        }
    adapter = load_adapter(
        model.pretrained,
        backbone=backbone,
        revision=model.revision,
        variant=model.variant,
        local_files_only=model.local_files_only,
        prediction_type=model.prediction_type,
        sdxl_time_ids=model.sdxl_time_ids,
        **sd3_options,
    )
    if getattr(model, "vae", None):
        location, is_local = resolve_pretrained(model.vae)
        try:
            vae = AutoencoderKL.from_pretrained(location, local_files_only=model.local_files_only or is_local)
        except OSError as err:
            if not is_local:
                raise _hub_failure(location, "the VAE (model.vae)", err) from err
            raise ModelNotFoundError(
                f"model.vae {location}: cannot load the AutoencoderKL: {_first_line(err)}"
            ) from err
        adapter.vae = vae.eval().requires_grad_(False)
    return adapter
