"""Latent and text-embedding cache for offline preference training.

The frozen encoders (VAE, text encoder) see every image and prompt the same way each epoch, so their outputs are
computed once and stored with safetensors under ``cache_root/<key>/``, where ``key`` hashes the model fingerprint,
the dataset fingerprint (source, loading options, resolution, crop mode, flip on/off) and the cache format.

What is stored:

* ``latents-NNNNN.safetensors``: ``chosen``, ``rejected`` — ``encode_images`` of each pair's resized, centre-cropped
  winner / loser — and, when the dataset flips, ``chosen_flipped``, ``rejected_flipped`` (the encodings of the
  mirrored images), ``shard_rows`` pairs per shard. At read time the pair's FLIP draws pick an orientation, exactly
  as the uncached path flips pixels before encoding.
* ``prompts-NNNNN.safetensors``: each tensor returned by ``encode_prompts`` for every UNIQUE prompt string, ``""``
  always included (it is what prompt dropout uses); ``prompts.json`` lists the strings, ``index.safetensors`` maps
  each pair to its winner's and loser's prompt ids and holds each pair's ``original_size`` / ``crop_top_left`` and
  ``source_row`` (the pair's row over the whole source, ``PreferenceRecord.original_index``).
* ``manifest.json``: fingerprints, counts, shapes and dtypes.

One encoding per image: if ``encode_images`` samples the VAE posterior, that sample is fixed at cache time, whereas
the original Diffusion-DPO script re-samples every step (``vae.encode(x).latent_dist.sample()``). This is deliberate; an
``encode_images`` that returns the posterior mean is equally valid. Random crops cannot be cached (the crop changes
every epoch) and are refused.

Start-up with a cache that covers the data reads no image: the trainer loads the table with
``verify_images=False`` (labels and captions only), and :func:`build_preference_cache` matches the cache's
``source_row`` list against it; only when the cache must be built (or the pairs differ, e.g. rows with bad images
skipped under ``max_samples``) is the table reloaded with every image verified.

The cache is written to a temporary folder and moved into place with ``os.replace``, so an interrupted build leaves
no partial cache behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from diffalign.data.pickapic import PreferenceDataError, load_preference_table
from diffalign.data.transforms import PreferencePairDataset, draw_sample

CACHE_FORMAT_VERSION = 3  # v2: pair geometry (SDXL size conditioning); v3: each pair's source row
MANIFEST = "manifest.json"

EncodeImages = Callable[[torch.Tensor], torch.Tensor]
EncodePrompts = Callable[[list[str]], Mapping[str, torch.Tensor]]


def cache_key(model_fingerprint: str, dataset: PreferencePairDataset) -> str:
    """Folder name of the cache of ``dataset`` encoded by the model identified by ``model_fingerprint``."""
    blob = json.dumps([CACHE_FORMAT_VERSION, model_fingerprint, dataset.fingerprint])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class _ShardWriter:
    """Accumulates row-aligned named tensors and writes them in shards of exactly ``shard_rows`` rows."""

    def __init__(self, folder: Path, prefix: str, shard_rows: int) -> None:
        self.folder, self.prefix, self.shard_rows = folder, prefix, shard_rows
        self.pending: dict[str, list[torch.Tensor]] = {}
        self.pending_rows = 0
        self.num_shards = 0
        self.specs: dict[str, dict[str, Any]] = {}

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        rows = {t.shape[0] for t in tensors.values()}
        if len(rows) != 1:
            raise ValueError(f"cache: tensors {list(tensors)} disagree on their first (batch) dimension: {rows}")
        for name, t in tensors.items():
            spec = {"shape": list(t.shape[1:]), "dtype": str(t.dtype).removeprefix("torch.")}
            if self.specs.setdefault(name, spec) != spec:
                raise ValueError(f"cache: '{name}' changed from {self.specs[name]} to {spec} between batches")
            self.pending.setdefault(name, []).append(t.detach().to("cpu"))
        self.pending_rows += rows.pop()
        while self.pending_rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def close(self) -> int:
        if self.pending_rows:
            self._flush(self.pending_rows)
        return self.num_shards

    def _flush(self, rows: int) -> None:
        joined = {name: torch.cat(parts) for name, parts in self.pending.items()}
        save_file(
            {name: t[:rows].contiguous() for name, t in joined.items()},
            str(self.folder / f"{self.prefix}-{self.num_shards:05d}.safetensors"),
        )
        self.pending = {name: [t[rows:]] for name, t in joined.items()}
        self.pending_rows -= rows
        self.num_shards += 1


class _ShardReader:
    """Row access into shards written by :class:`_ShardWriter`; files are opened lazily (memory-mapped)."""

    def __init__(self, folder: Path, prefix: str, shard_rows: int) -> None:
        self.folder, self.prefix, self.shard_rows = folder, prefix, shard_rows
        self._handles: dict[int, Any] = {}

    def get(self, name: str, row: int) -> torch.Tensor:
        shard, offset = divmod(row, self.shard_rows)
        if shard not in self._handles:
            path = self.folder / f"{self.prefix}-{shard:05d}.safetensors"
            self._handles[shard] = safe_open(str(path), framework="pt")
        return self._handles[shard].get_slice(name)[offset]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}  # open files do not pickle (DataLoader workers reopen them)


class CachedPreferenceDataset(Dataset):
    """Cached encodings of a :class:`PreferencePairDataset`, with its flips and prompt dropout.

    ``__getitem__(i)`` returns ``{"index": i, "latents_chosen": (C, h, w), "latents_rejected": (C, h, w),
    "cond_chosen": {name: tensor}, "cond_rejected": {name: tensor}, "original_size": (2,), "crop_top_left": (2,)}``
    (cond tensors without batch dim), equal to
    encoding the uncached sample ``i`` of the same epoch with the same callables.
    """

    #: a sample is a slice of memory-mapped shards: DataLoader workers would only add hand-over time
    reads_in_place = True

    def __init__(self, folder: str | Path, dataset: PreferencePairDataset) -> None:
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / MANIFEST).read_text())
        if self.manifest["num_pairs"] != len(dataset):
            raise ValueError(
                f"{self.folder}: cache holds {self.manifest['num_pairs']} pairs but the dataset has {len(dataset)}; "
                f"delete the folder to rebuild it"
            )
        self.seed = dataset.seed
        self.hflip = dataset.hflip
        self.proportion_empty_prompts = dataset.proportion_empty_prompts
        self.joint = dataset.joint
        self.epoch = 0
        shard_rows = self.manifest["shard_rows"]
        self._latents = _ShardReader(self.folder, "latents", shard_rows)
        self._prompts = _ShardReader(self.folder, "prompts", shard_rows)
        index = _load_index(self.folder / "index.safetensors")
        self._prompt_chosen, self._prompt_rejected = index["prompt_id_chosen"], index["prompt_id_rejected"]
        self._original_size, self._crop_top_left = index["original_size"], index["crop_top_left"]
        self.cond_keys: list[str] = list(self.manifest["prompt_tensors"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return int(self.manifest["num_pairs"])

    def _cond(self, prompt_id: int) -> dict[str, torch.Tensor]:
        return {name: self._prompts.get(name, prompt_id) for name in self.cond_keys}

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"pair index {index} out of range for a cache of {len(self)} pairs")
        d = draw_sample(
            self.seed,
            self.epoch,
            index,
            hflip=self.hflip,
            proportion_empty_prompts=self.proportion_empty_prompts,
            joint=self.joint,
        )
        empty = self.manifest["empty_prompt_id"]
        id_c = empty if d.drop_prompt else int(self._prompt_chosen[index])
        id_r = empty if d.drop_prompt else int(self._prompt_rejected[index])
        return {
            "index": index,
            "latents_chosen": self._latents.get("chosen_flipped" if d.flip_chosen else "chosen", index),
            "latents_rejected": self._latents.get("rejected_flipped" if d.flip_rejected else "rejected", index),
            "cond_chosen": self._cond(id_c),
            "cond_rejected": self._cond(id_r),
            "original_size": self._original_size[index].clone(),
            "crop_top_left": self._crop_top_left[index].clone(),
        }


def _load_index(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def build_preference_cache(
    dataset: PreferencePairDataset,
    *,
    encode_images: EncodeImages,
    encode_prompts: EncodePrompts,
    model_fingerprint: str,
    cache_root: str | Path,
    batch_size: int = 16,
    show_progress: bool = True,
    shard_rows: int = 4096,
) -> CachedPreferenceDataset:
    """Encode ``dataset`` once (or reuse an existing cache with the same key) and return its cached twin.

    Args:
        encode_images: ``(N, 3, R, R)`` pixels in [-1, 1] → ``(N, C, h, w)`` (scaled VAE latents, or the identity
            for pixel-space models); called under ``torch.no_grad()`` on ``4·batch_size`` images per call with
            flips on (winners, losers, mirrored winners, mirrored losers) and ``2·batch_size`` without.
        encode_prompts: list of N prompts → dict of tensors with first dimension N.
        model_fingerprint: identity of the encoders (part of the cache key).
        cache_root: parent folder; the cache goes to ``cache_root/<key>/`` (see :func:`cache_key`).
        shard_rows: pairs (and unique prompts) per safetensors file.
    """
    if dataset.random_crop:
        raise ValueError(
            "data.random_crop=true is not supported with the cache (the crop changes every epoch); "
            "set data.random_crop=false or data.cache_dir=null"
        )
    if batch_size < 1 or shard_rows < 1:
        raise ValueError(f"batch_size={batch_size}, shard_rows={shard_rows}: both must be positive")
    key = cache_key(model_fingerprint, dataset)
    root = Path(cache_root)
    final = root / key
    if (final / MANIFEST).is_file():
        _check_manifest(final, model_fingerprint, dataset)
        covered = dataset.table.restricted_to(_load_index(final / "index.safetensors")["source_row"].tolist())
        if covered is not None:
            return CachedPreferenceDataset(final, dataset.with_table(covered))
    elif final.exists():
        raise FileExistsError(f"{final}: exists but has no {MANIFEST} (not written by this cache); delete it")
    if not dataset.table.images_verified:
        dataset = dataset.with_table(load_preference_table(dataset.table.source, **dataset.table.options))
    if (final / MANIFEST).is_file():  # the verified table's pairs are the cached ones
        return CachedPreferenceDataset(final, dataset)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_cache(
            tmp, dataset, encode_images, encode_prompts, model_fingerprint, batch_size, show_progress, shard_rows
        )
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / MANIFEST).is_file():  # not a concurrent writer that finished first
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CachedPreferenceDataset(final, dataset)


def _check_manifest(folder: Path, model_fingerprint: str, dataset: PreferencePairDataset) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    expected = {"model_fingerprint": model_fingerprint, "data_fingerprint": dataset.fingerprint}
    found = {k: manifest.get(k) for k in expected}
    if found != expected:
        raise PreferenceDataError(
            f"{folder}: manifest has {found}, expected {expected}; delete the folder to rebuild it"
        )


def _unique_prompts(dataset: PreferencePairDataset) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Unique prompt strings (``""`` first) and each pair's winner / loser prompt id."""
    ids: dict[str, int] = {"": 0}
    chosen, rejected = [], []
    for i in range(len(dataset)):
        p_c, p_r = dataset.prompts(i)
        chosen.append(ids.setdefault(p_c, len(ids)))
        rejected.append(ids.setdefault(p_r, len(ids)))
    return list(ids), torch.tensor(chosen, dtype=torch.long), torch.tensor(rejected, dtype=torch.long)


def _encode_latents(
    dataset: PreferencePairDataset, indices: Sequence[int], encode_images: EncodeImages, geometry: list
) -> dict[str, torch.Tensor]:
    pairs = [dataset.unflipped_pair(i) for i in indices]
    geometry.extend(g for _, _, g in pairs)
    chosen = torch.stack([c for c, _, _ in pairs])
    rejected = torch.stack([r for _, r, _ in pairs])
    groups = {"chosen": chosen, "rejected": rejected}
    if dataset.hflip:
        groups.update(chosen_flipped=chosen.flip(-1), rejected_flipped=rejected.flip(-1))
    images = torch.cat(list(groups.values()))
    latents = encode_images(images)
    if not isinstance(latents, torch.Tensor) or latents.shape[0] != images.shape[0]:
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"encode_images: expected a tensor with first dimension {images.shape[0]}, got {got}")
    return dict(zip(groups, latents.split(len(indices)), strict=True))


def _encode_prompt_batch(encode_prompts: EncodePrompts, prompts: list[str]) -> dict[str, torch.Tensor]:
    out = encode_prompts(prompts)
    if not isinstance(out, Mapping) or not out:
        raise ValueError(f"encode_prompts: expected a non-empty dict of tensors, got {type(out).__name__}")
    for name, t in out.items():
        if not isinstance(t, torch.Tensor) or t.shape[0] != len(prompts):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"encode_prompts: '{name}' should have first dimension {len(prompts)}, got {got}")
    return dict(out)


def _write_cache(
    folder: Path,
    dataset: PreferencePairDataset,
    encode_images: EncodeImages,
    encode_prompts: EncodePrompts,
    model_fingerprint: str,
    batch_size: int,
    show_progress: bool,
    shard_rows: int,
) -> None:
    n = len(dataset)
    prompts, prompt_chosen, prompt_rejected = _unique_prompts(dataset)
    latents = _ShardWriter(folder, "latents", shard_rows)
    conds = _ShardWriter(folder, "prompts", shard_rows)
    geometry: list = []
    with torch.no_grad():
        for start in tqdm(range(0, n, batch_size), desc="caching latents", disable=not show_progress):
            latents.add(_encode_latents(dataset, range(start, min(start + batch_size, n)), encode_images, geometry))
        for start in tqdm(range(0, len(prompts), batch_size), desc="caching prompts", disable=not show_progress):
            conds.add(_encode_prompt_batch(encode_prompts, prompts[start : start + batch_size]))
    manifest = {
        "format_version": CACHE_FORMAT_VERSION,
        "model_fingerprint": model_fingerprint,
        "data_fingerprint": dataset.fingerprint,
        "source": dataset.table.source,
        "resolution": dataset.resolution,
        "hflip": dataset.hflip,
        "num_pairs": n,
        "num_prompts": len(prompts),
        "empty_prompt_id": 0,
        "shard_rows": shard_rows,
        "latent_shards": latents.close(),
        "prompt_shards": conds.close(),
        "latent_tensors": latents.specs,
        "prompt_tensors": conds.specs,
    }
    index = {
        "prompt_id_chosen": prompt_chosen,
        "prompt_id_rejected": prompt_rejected,
        "original_size": torch.tensor([g.original_size for g in geometry], dtype=torch.long).reshape(n, 2),
        "crop_top_left": torch.tensor([g.crop_top_left for g in geometry], dtype=torch.long).reshape(n, 2),
        "source_row": torch.tensor([rec.original_index for rec in dataset.table.records], dtype=torch.long),
    }
    save_file(index, str(folder / "index.safetensors"))
    (folder / "prompts.json").write_text(json.dumps(prompts, ensure_ascii=False))
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
