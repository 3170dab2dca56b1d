"""Where a diffusers pipeline's components come from: a local folder or a hub id, and :class:`Source`, the helper
every backbone's loader reads its components with.

Each component is loaded on its own with ``X.from_pretrained(pretrained, subfolder=...)``, as diffusers' training
scripts do. Loading is safe: safetensors only, no remote code. A local folder never contacts the hub.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from diffalign.errors import DiffalignError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelNotFoundError(DiffalignError, FileNotFoundError):
    """A model folder, component or hub repo that cannot be found or read; the message says what to pass."""


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message without a final full stop (its type name if it has no message)."""
    text = str(err).strip()
    return text.splitlines()[0].rstrip(".") if text else type(err).__name__


def hub_failure(repo_id: str, what: str, err: BaseException) -> ModelNotFoundError:
    """The error for ``what`` (a file or component) of a hub repo that could not be read, with the hub's reason."""
    return ModelNotFoundError(
        f"cannot read {what} of '{repo_id}': it is not a folder under {os.getcwd()}, so it was taken as a hub id, "
        f"and the hub gave: {first_line(err)}; pass an existing diffusers folder, or check the hub id, the revision "
        "and the network (HF_HUB_OFFLINE=1 / model.local_files_only=true read only the local cache)"
    )


def present(entry: Any) -> bool:
    """Whether a ``model_index.json`` entry names a component (``null`` and ``[null, null]`` do not)."""
    return entry is not None and not (isinstance(entry, list) and all(item is None for item in entry))


def check_layout(folder: Path, backbone: str, required: Sequence[str]) -> None:
    """Raise :class:`ModelNotFoundError` naming the ``required`` subfolders the ``backbone`` folder lacks, if any."""
    missing = [name for name in required if not (folder / name).is_dir()]
    if missing:
        raise ModelNotFoundError(
            f"{folder} is not an {backbone.upper()} model folder: missing subfolder(s) {missing}; expected the "
            f"diffusers layout {list(required)} (+ optional vae/), as a pipeline's save_pretrained writes it"
        )


def local_has_vae(folder: Path) -> bool:
    """Whether a local pipeline folder has a VAE (a ``vae/`` its ``model_index.json`` names must be there)."""
    if (folder / "vae").is_dir():
        return True
    index_path = folder / "model_index.json"
    if index_path.is_file() and present(json.loads(index_path.read_text()).get("vae")):
        raise ModelNotFoundError(
            f"{index_path} names a VAE but {folder / 'vae'} is missing; restore the vae/ folder, or set "
            f'"vae": [null, null] in model_index.json for a pixel-space model'
        )
    return False


def hub_model_index(repo_id: str, revision: str | None, local_files_only: bool) -> dict[str, Any]:
    """The ``model_index.json`` of a hub repo (downloaded, or read from the local cache)."""
    from huggingface_hub import hf_hub_download

    try:
        index_path = hf_hub_download(repo_id, "model_index.json", revision=revision, local_files_only=local_files_only)
    except (OSError, ValueError) as err:  # not found, gated, offline, no network (huggingface_hub's errors)
        raise hub_failure(repo_id, "model_index.json", err) from err
    return json.loads(Path(index_path).read_text())


def hub_has_vae(repo_id: str, revision: str | None, local_files_only: bool) -> bool:
    """Whether a hub repo's ``model_index.json`` names a VAE."""
    return present(hub_model_index(repo_id, revision, local_files_only).get("vae"))


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


def eval_modules(*modules: torch.nn.Module | None) -> None:
    """Put every given module (``None`` skipped) in eval mode."""
    for module in modules:
        if module is not None:
            module.eval()


class Source:
    """One pipeline to load components from: the shared ``from_pretrained`` keyword arguments, and which optional
    components it has (a local folder's subfolders, or a hub repo's ``model_index.json``, read once).

    ``backbone`` (its registered name) and ``required`` (the subfolders a local folder must have) are the loading
    backbone's; a local folder that lacks one of them is an error naming them, raised here, before any loading."""

    def __init__(
        self,
        pretrained: str | os.PathLike,
        backbone: str,
        required: Sequence[str],
        *,
        revision: str | None,
        variant: str | None,
        torch_dtype: torch.dtype | None,
        local_files_only: bool,
    ) -> None:
        self.location, self.is_local = resolve_pretrained(pretrained)
        self.backbone = backbone
        self.required = tuple(required)
        if self.is_local:
            check_layout(Path(self.location), backbone, self.required)
        self.common: dict[str, Any] = {"revision": revision, "local_files_only": local_files_only or self.is_local}
        self.weights: dict[str, Any] = {**self.common, "variant": variant, "use_safetensors": True}
        self.diffusers_dtype = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        self.transformers_dtype = {} if torch_dtype is None else {"dtype": torch_dtype}
        self._index: dict[str, Any] | None = None

    def has(self, component: str) -> bool:
        """Whether the pipeline has ``component``; for a local ``"vae"``, a missing ``vae/`` that the folder's
        ``model_index.json`` names is an error."""
        if self.is_local:
            if component == "vae":
                return local_has_vae(Path(self.location))
            return (Path(self.location) / component).is_dir()
        if self._index is None:
            self._index = hub_model_index(self.location, self.common["revision"], self.common["local_files_only"])
        return present(self._index.get(component))

    def diffusers(self, cls: type, subfolder: str) -> Any:
        """A diffusers model component (weights in the source's variant and dtype)."""
        return self._load(cls, subfolder, {**self.weights, **self.diffusers_dtype})

    def transformers(self, cls: type, subfolder: str) -> Any:
        """A transformers model component (weights in the source's variant and dtype)."""
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
                raise hub_failure(self.location, f"{subfolder}/", err) from err
            variant = f" (variant '{kwargs['variant']}')" if kwargs.get("variant") else ""
            raise ModelNotFoundError(
                f"{Path(self.location) / subfolder}: cannot load the {cls.__name__}{variant}: {first_line(err)}; the "
                "folder must hold the component as save_pretrained writes it (config and safetensors weights)"
            ) from err

    def vae(self) -> AutoencoderKL | None:
        """The pipeline's VAE, or ``None`` for a pixel-space model."""
        return self.diffusers(AutoencoderKL, "vae") if self.has("vae") else None
