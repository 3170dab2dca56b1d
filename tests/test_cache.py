"""The latent / text-embedding cache: reuse, keys, atomic writes, and equality with the uncached path."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffalign.data import (
    CachedPreferenceDataset,
    PreferencePairDataset,
    build_preference_cache,
    collate_preference_batch,
    load_preference_table,
)
from diffalign.data.synthetic import make_random_pairs, write_pickapic_parquet

SCALE = 0.18215
PROMPT_LEN = 12


class Encoders:
    """Deterministic stand-ins for a VAE and a text encoder that count their calls.

    Images: 2×2 average pooling times SD's latent scale (per element, so batching cannot change a value).
    Prompts: character codes padded to PROMPT_LEN, plus a 2-vector (length, sum of codes) as a "pooled" output.
    """

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.image_calls = 0
        self.prompt_calls = 0
        self.fail_on_call = fail_on_call
        self.calls_with_grad = 0

    def images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.image_calls += 1
        if self.fail_on_call is not None and self.image_calls == self.fail_on_call:
            raise RuntimeError("simulated crash while encoding")
        self.calls_with_grad += torch.is_grad_enabled()
        return F.avg_pool2d(pixels, 2) * SCALE

    def prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        self.prompt_calls += 1
        codes = torch.tensor([[ord(c) for c in p[:PROMPT_LEN].ljust(PROMPT_LEN, "\0")] for p in prompts]).float()
        pooled = torch.stack([torch.tensor([len(p), sum(map(ord, p))], dtype=torch.float32) for p in prompts])
        return {"encoder_hidden_states": codes[:, :, None].expand(-1, -1, 3).contiguous(), "pooled": pooled}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.parquet"
    return write_pickapic_parquet(path, make_random_pairs(10, size=(18, 14), seed=0))


def _dataset(path: Path, *, dual: bool = False, **kwargs) -> PreferencePairDataset:
    table = load_preference_table(str(path), dual_captions=dual)
    options = {"resolution": 8, "hflip": True, "proportion_empty_prompts": 0.4, "seed": 5, **kwargs}
    return PreferencePairDataset(table, **options)


def _build(ds: PreferencePairDataset, enc: Encoders, root: Path, fingerprint: str = "model-a", **kw):
    return build_preference_cache(
        ds,
        encode_images=enc.images,
        encode_prompts=enc.prompts,
        model_fingerprint=fingerprint,
        cache_root=root,
        batch_size=3,
        show_progress=False,
        **kw,
    )


@pytest.mark.parametrize(("dual", "hflip"), [(False, True), (True, True), (True, False)])
def test_cached_sample_equals_encoded_uncached_sample(tmp_path: Path, pairs_file: Path, dual: bool, hflip: bool):
    ds = _dataset(pairs_file, dual=dual, hflip=hflip)
    enc = Encoders()
    cached = _build(ds, enc, tmp_path, shard_rows=4)  # 10 pairs → shards of 4, 4, 2
    assert cached.manifest["latent_shards"] == 3
    assert enc.image_calls == 4 and enc.calls_with_grad == 0  # the cache encodes under torch.no_grad()
    flips = drops = 0
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in range(len(ds)):
            raw, hit = ds[i], cached[i]
            assert hit["index"] == i
            for side in ("chosen", "rejected"):
                assert torch.equal(hit[f"latents_{side}"], enc.images(raw[f"pixels_{side}"][None])[0])
                expected = enc.prompts([raw[f"prompt_{side}"]])
                assert set(hit[f"cond_{side}"]) == set(expected)
                for name, value in expected.items():
                    assert torch.equal(hit[f"cond_{side}"][name], value[0])
            d = ds.draws(i)
            flips += d.flip_chosen + d.flip_rejected
            drops += d.drop_prompt
    assert (flips > 0) == hflip and drops > 0  # both orientations and the empty prompt were exercised


def test_manifest_records_counts_shapes_and_fingerprints(tmp_path: Path, pairs_file: Path) -> None:
    ds = _dataset(pairs_file, dual=True)
    cached = _build(ds, Encoders(), tmp_path)
    manifest = json.loads((cached.folder / "manifest.json").read_text())
    assert manifest["num_pairs"] == 10
    assert manifest["num_prompts"] == 21  # 20 distinct captions + ""
    assert json.loads((cached.folder / "prompts.json").read_text())[:2] == ["", "prompt 0 image 0"]
    assert manifest["latent_tensors"]["chosen_flipped"] == {"shape": [3, 4, 4], "dtype": "float32"}
    assert manifest["prompt_tensors"] == {
        "encoder_hidden_states": {"shape": [PROMPT_LEN, 3], "dtype": "float32"},
        "pooled": {"shape": [2], "dtype": "float32"},
    }
    assert manifest["model_fingerprint"] == "model-a" and manifest["data_fingerprint"] == ds.fingerprint


def test_second_build_reuses_the_cache_without_encoding(tmp_path: Path, pairs_file: Path) -> None:
    first_enc, again_enc = Encoders(), Encoders()
    first = _build(_dataset(pairs_file), first_enc, tmp_path)
    assert first_enc.image_calls == 4 and first_enc.prompt_calls == 4  # ceil(10/3) pair batches, ceil(11/3) prompts
    new_draws = _dataset(pairs_file, seed=99, proportion_empty_prompts=0.9)  # same cache content, other draws
    again = _build(new_draws, again_enc, tmp_path)
    assert (again_enc.image_calls, again_enc.prompt_calls) == (0, 0)
    assert again.folder == first.folder
    for i in range(len(new_draws)):  # the reused cache follows the new dataset's seed and dropout rate
        raw, hit = new_draws[i], again[i]
        assert torch.equal(hit["latents_chosen"], first_enc.images(raw["pixels_chosen"][None])[0])
        assert torch.equal(hit["cond_chosen"]["pooled"], first_enc.prompts([raw["prompt_chosen"]])["pooled"][0])


def test_different_model_or_data_gives_a_different_folder(tmp_path: Path, pairs_file: Path) -> None:
    base = _build(_dataset(pairs_file), Encoders(), tmp_path).folder
    other_model = _build(_dataset(pairs_file), Encoders(), tmp_path, fingerprint="model-b").folder
    other_res = _build(_dataset(pairs_file, resolution=4), Encoders(), tmp_path).folder
    other_opts = _build(_dataset(pairs_file, dual=True), Encoders(), tmp_path).folder
    no_flip = _build(_dataset(pairs_file, hflip=False), Encoders(), tmp_path).folder
    assert len({base, other_model, other_res, other_opts, no_flip}) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (base, other_model, other_res, other_opts, no_flip)
    )


def test_interrupted_build_leaves_no_partial_cache(tmp_path: Path, pairs_file: Path) -> None:
    ds = _dataset(pairs_file)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _build(ds, Encoders(fail_on_call=3), tmp_path, shard_rows=2)  # two shards already written when it fails
    assert list(tmp_path.iterdir()) == []
    enc = Encoders()
    cached = _build(ds, enc, tmp_path)
    assert enc.image_calls == 4 and len(cached) == 10
    assert [p.name for p in tmp_path.iterdir()] == [cached.folder.name]


def test_random_crop_is_refused(tmp_path: Path, pairs_file: Path) -> None:
    with pytest.raises(ValueError, match="set data.random_crop=false or data.cache_dir=null"):
        _build(_dataset(pairs_file, random_crop=True), Encoders(), tmp_path)


def test_bad_encoder_output_is_reported(tmp_path: Path, pairs_file: Path) -> None:
    ds = _dataset(pairs_file)
    with pytest.raises(
        ValueError, match=r"encode_images: expected a tensor with first dimension 12, got \(6, 3, 4, 4\)"
    ):
        build_preference_cache(
            ds,
            encode_images=lambda x: x[: len(x) // 2, :, ::2, ::2],
            encode_prompts=Encoders().prompts,
            model_fingerprint="m",
            cache_root=tmp_path,
            batch_size=3,
            show_progress=False,
        )
    with pytest.raises(ValueError, match="encode_prompts: 'h' should have first dimension 3, got \\(1, 2\\)"):
        build_preference_cache(
            ds,
            encode_images=Encoders().images,
            encode_prompts=lambda ps: {"h": torch.zeros(1, 2)},
            model_fingerprint="m",
            cache_root=tmp_path,
            batch_size=3,
            show_progress=False,
        )
    assert list(tmp_path.iterdir()) == []


def test_cached_dataset_collates_and_pickles(tmp_path: Path, pairs_file: Path) -> None:
    cached = _build(_dataset(pairs_file), Encoders(), tmp_path, shard_rows=4)
    first = cached[7]
    clone: CachedPreferenceDataset = pickle.loads(pickle.dumps(cached))  # DataLoader workers pickle the dataset
    assert torch.equal(clone[7]["latents_chosen"], first["latents_chosen"])
    batch = collate_preference_batch([cached[i] for i in (0, 5, 9)])
    assert batch["index"].tolist() == [0, 5, 9]
    assert batch["latents_chosen"].shape == (3, 3, 4, 4)
    assert batch["cond_rejected"]["encoder_hidden_states"].shape == (3, PROMPT_LEN, 3)
    assert batch["cond_chosen"]["pooled"].shape == (3, 2)


def _no_image_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    import diffalign.data.pickapic as pickapic

    def refuse(*args, **kwargs):
        raise AssertionError("an image was read")

    monkeypatch.setattr(pickapic, "image_cell_bytes", refuse)
    monkeypatch.setattr(pickapic.PreferenceTable, "image_bytes", refuse)


def test_a_cache_that_covers_the_data_is_opened_without_reading_any_image(
    tmp_path: Path, pairs_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    enc = Encoders()
    built = _build(_dataset(pairs_file), enc, tmp_path)
    calls = enc.image_calls
    _no_image_reads(monkeypatch)
    light = PreferencePairDataset(
        load_preference_table(str(pairs_file), verify_images=False), resolution=8, hflip=True,
        proportion_empty_prompts=0.4, seed=5,
    )  # fmt: skip
    assert not light.table.images_verified
    reopened = _build(light, enc, tmp_path)
    assert enc.image_calls == calls and reopened.folder == built.folder
    for i in range(len(built)):
        a, b = built[i], reopened[i]
        assert torch.equal(a["latents_chosen"], b["latents_chosen"]) and torch.equal(
            a["cond_rejected"]["pooled"], b["cond_rejected"]["pooled"]
        )


def test_pairs_skipped_for_bad_images_at_build_time_stay_out_of_an_image_free_load(tmp_path: Path) -> None:
    rows = make_random_pairs(6, size=(18, 14), seed=0)
    rows[2]["jpg_0"] = b"not an image"
    path = write_pickapic_parquet(tmp_path / "bad.parquet", rows)
    verified = PreferencePairDataset(load_preference_table(str(path), on_bad_row="skip"), resolution=8)
    assert len(verified) == 5
    enc = Encoders()
    _build(verified, enc, tmp_path / "cache")
    calls = enc.image_calls
    light = load_preference_table(str(path), on_bad_row="skip", verify_images=False)
    assert len(light) == 6  # the bad image is not seen without reading images
    cached = _build(PreferencePairDataset(light, resolution=8), enc, tmp_path / "cache")
    assert enc.image_calls == calls and len(cached) == 5
    from safetensors.torch import load_file

    assert load_file(str(cached.folder / "index.safetensors"))["source_row"].tolist() == [0, 1, 3, 4, 5]


def test_building_a_cache_from_an_image_free_load_verifies_the_images_first(tmp_path: Path) -> None:
    from diffalign.data.pickapic import BadRowError

    rows = make_random_pairs(4, size=(18, 14), seed=0)
    rows[1]["jpg_1"] = b"not an image"
    path = write_pickapic_parquet(tmp_path / "bad.parquet", rows)
    light = PreferencePairDataset(load_preference_table(str(path), verify_images=False), resolution=8)
    with pytest.raises(BadRowError, match=r"bad\.parquet: row 1: undecodable jpg_1"):
        _build(light, Encoders(), tmp_path / "cache")
