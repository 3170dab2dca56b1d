"""Preference data: Pick-a-Pic-layout pairs (local parquet or a ``datasets`` hub name), the Diffusion-DPO image and
prompt pipeline with addressable randomness, and the latent / text-embedding cache."""

from diffalign.data.cache import CachedPreferenceDataset, build_preference_cache, cache_key
from diffalign.data.pickapic import (
    BadRowError,
    MissingColumnError,
    PreferenceDataError,
    PreferenceRecord,
    PreferenceTable,
    load_preference_table,
)
from diffalign.data.transforms import PreferencePairDataset, SampleDraws, collate_preference_batch, draw_sample

__all__ = [
    "BadRowError",
    "CachedPreferenceDataset",
    "MissingColumnError",
    "PreferenceDataError",
    "PreferencePairDataset",
    "PreferenceRecord",
    "PreferenceTable",
    "SampleDraws",
    "build_preference_cache",
    "cache_key",
    "collate_preference_batch",
    "draw_sample",
    "load_preference_table",
]
