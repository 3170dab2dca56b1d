"""A trained denoiser as a diffusers pipeline folder: the base pipeline's ``model_index.json`` and its other
components placed beside the trained ``unet/`` / ``transformer/``, so that ``<Pipeline>.from_pretrained(folder)`` and
``DiffusionPipeline.from_pretrained(folder)`` load it offline.

The base is a local folder; a hub id is first resolved to its snapshot in the local Hugging Face cache
(``DiffusionPipeline.download``: the components its ``model_index.json`` names, in the run's variant; what is cached
already is not fetched again). Each other component is a relative symlink to the base's folder (the export and the
base can move together), or a copy of it where the filesystem refuses symlinks. Two components follow the run where
it replaced them: ``model.vae`` (a separate VAE) takes the place of ``vae/``, and a ``model.prediction_type`` that
differs from the base scheduler's is written into a copy of ``scheduler/``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffalign.models.components import ModelNotFoundError, hub_failure, present, resolve_pretrained

if TYPE_CHECKING:
    from diffalign.config import ModelConfig

INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"


@dataclass(frozen=True)
class PipelineBase:
    """Where an exported pipeline's other components come from: a local pipeline ``folder``, a separate ``vae``
    folder (``config.json`` at its root) in place of its ``vae/``, and the ``prediction_type`` the run trained with
    (``None``: the base scheduler's)."""

    folder: Path
    vae: Path | None = None
    prediction_type: str | None = None


def local_pipeline_folder(
    pretrained: str | os.PathLike,
    *,
    revision: str | None = None,
    variant: str | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local folder for ``pretrained``: a local folder itself (resolved), a hub id its cached snapshot of the
    components its ``model_index.json`` names (downloaded where missing, unless ``local_files_only``)."""
    location, is_local = resolve_pretrained(pretrained)
    if is_local:
        return Path(location).resolve()
    from diffusers import DiffusionPipeline

    try:
        folder = DiffusionPipeline.download(
            location, revision=revision, variant=variant, local_files_only=local_files_only
        )
    except (OSError, ValueError) as err:  # not found, gated, offline and not cached (huggingface_hub's errors)
        raise hub_failure(location, "the pipeline", err) from err
    return Path(folder)


def local_vae_folder(vae: str | os.PathLike, *, local_files_only: bool = False) -> Path:
    """A local folder for ``model.vae`` (loaded as ``AutoencoderKL.from_pretrained(vae)``): a local folder itself, a
    hub id its cached snapshot (the files the run's loading cached)."""
    location, is_local = resolve_pretrained(vae)
    if is_local:
        return Path(location).resolve()
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(location, "config.json", local_files_only=local_files_only)).parent
    except (OSError, ValueError) as err:
        raise hub_failure(location, "the VAE (model.vae)", err) from err


def pipeline_base(model: ModelConfig, folder: Path | None = None) -> PipelineBase:
    """The :class:`PipelineBase` of a run's ``model`` config: ``model.pretrained`` as a local folder (``folder``, if
    given, in its place), ``model.vae`` and ``model.prediction_type``."""
    if folder is None:
        folder = local_pipeline_folder(
            model.pretrained,
            revision=model.revision,
            variant=model.variant,
            local_files_only=model.local_files_only,
        )
    vae = local_vae_folder(model.vae, local_files_only=model.local_files_only) if model.vae else None
    return PipelineBase(Path(folder), vae, getattr(model, "prediction_type", None))


def write_pipeline_folder(base: PipelineBase, out: Path, denoiser_subfolder: str) -> dict[str, str]:
    """Make ``out``, which holds the trained ``out/<denoiser_subfolder>/``, a pipeline folder: every other component
    ``base``'s ``model_index.json`` names is placed in it (:func:`place_component`; an entry from an earlier export is
    replaced), then the index is written, last and atomically. Returns how each component was placed (``"symlink"``,
    ``"copy"``, ``"written"`` for a scheduler with the run's prediction type, ``"in place"``). A base without an
    index, or lacking a component its index names, raises :class:`ModelNotFoundError` before anything is placed."""
    out = Path(out)
    index_file = base.folder / INDEX
    if not index_file.is_file():
        raise ModelNotFoundError(
            f"{index_file} is missing, so the base is not a diffusers pipeline folder and no pipeline can be written; "
            "save the base with its pipeline's save_pretrained to get one"
        )
    index: dict[str, Any] = json.loads(index_file.read_text())
    if not present(index.get(denoiser_subfolder)):
        raise ModelNotFoundError(f"{index_file} names no {denoiser_subfolder!r} component; is it the run's base?")
    if not (out / denoiser_subfolder / "config.json").is_file():
        raise FileNotFoundError(f"{out / denoiser_subfolder}: no trained denoiser to export (config.json missing)")
    sources = {
        name: base.vae if name == "vae" and base.vae is not None else base.folder / name
        for name, entry in index.items()
        if not name.startswith("_") and name != denoiser_subfolder and isinstance(entry, list) and present(entry)
    }
    missing = [str(path) for path in sources.values() if not path.is_dir()]
    if missing:
        raise ModelNotFoundError(
            f"{index_file} names components the base lacks ({', '.join(missing)}); download or restore them"
        )
    placed = {}
    for name, source in sources.items():
        scheduler = _scheduler_with(source, base.prediction_type) if name == "scheduler" else None
        if scheduler is not None:
            _remove(out / name)
            shutil.copytree(source.resolve(), out / name)
            (out / name / SCHEDULER_CONFIG).write_text(json.dumps(scheduler, indent=2, sort_keys=True) + "\n")
            placed[name] = "written"
        else:
            placed[name] = place_component(source, out / name)
    tmp = out / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, out / INDEX)
    return placed


def place_component(source: Path, destination: Path) -> str:
    """Put the component folder ``source`` at ``destination``: a relative symlink (``"symlink"``), or a copy where
    the filesystem refuses symlinks (``"copy"``); an entry already there is replaced unless it is ``source`` itself
    (``"in place"``: the output is the base folder, or an earlier export's link to the same folder)."""
    target = source.resolve()
    if destination.exists() and destination.resolve() == target:
        return "symlink" if destination.is_symlink() else "in place"
    _remove(destination)
    try:
        destination.symlink_to(os.path.relpath(target, destination.parent.resolve()), target_is_directory=True)
        return "symlink"
    except (OSError, NotImplementedError):  # e.g. FAT/exFAT, some network shares, Windows without the privilege
        shutil.copytree(target, destination)
        return "copy"


def _scheduler_with(source: Path, prediction_type: str | None) -> dict[str, Any] | None:
    """The base scheduler's config with the run's ``prediction_type``, or ``None`` when it already has it (or has no
    such field: a flow-matching scheduler)."""
    if prediction_type is None or not (source / SCHEDULER_CONFIG).is_file():
        return None
    config = json.loads((source / SCHEDULER_CONFIG).read_text())
    if config.get("prediction_type", prediction_type) == prediction_type:
        return None
    return {**config, "prediction_type": prediction_type}


def _remove(path: Path) -> None:
    """Remove a link, file or folder at ``path`` (a link is removed, never what it points to)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
