"""Pick-a-Pic reading, validation and orientation; the Diffusion-DPO transform; addressable draws; collation."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from diffalign.data import (
    BadRowError,
    MissingColumnError,
    PreferenceDataError,
    PreferencePairDataset,
    collate_preference_batch,
    draw_sample,
    load_preference_table,
)
from diffalign.data.synthetic import encode_png, make_random_pairs, write_pickapic_parquet
from diffalign.data.transforms import LOSER_STREAM_OFFSET
from diffalign.utils.randomness import CROP, sample_key

N = 12  # rows per test file; with tie_every=4 rows 3, 7, 11 are ties


@pytest.fixture
def rows() -> list[dict]:
    return make_random_pairs(N, size=16, seed=0, tie_every=4)


@pytest.fixture
def pairs_file(tmp_path: Path, rows: list[dict]) -> Path:
    return write_pickapic_parquet(tmp_path / "pairs.parquet", rows)


def _png(rows: list[dict], i: int, col: str) -> bytes:
    return encode_png(rows[i][col])


# -- ties and orientation --------------------------------------------------------------------------------------------


def test_ties_dropped_by_default_and_counted(pairs_file: Path) -> None:
    table = load_preference_table(str(pairs_file))
    assert len(table) == 9
    assert table.num_ties_dropped == 3
    assert table.num_rows_read == 12
    assert [r.original_index for r in table.records] == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert table.skipped == {}


def test_keep_ties_treats_jpg_0_as_winner(pairs_file: Path, rows: list[dict]) -> None:
    table = load_preference_table(str(pairs_file), keep_ties=True)
    assert len(table) == 12 and table.num_ties_dropped == 0
    tie = table[3]
    assert tie.is_tie and not tie.swapped
    assert table.image_bytes(3) == (_png(rows, 3, "jpg_0"), _png(rows, 3, "jpg_1"))


def test_orientation_puts_winner_first(pairs_file: Path, rows: list[dict]) -> None:
    table = load_preference_table(str(pairs_file))
    for k, rec in enumerate(table.records):
        i = rec.original_index
        swapped = rows[i]["label_0"] == 0.0
        assert rec.swapped == swapped
        win, lose = ("jpg_1", "jpg_0") if swapped else ("jpg_0", "jpg_1")
        assert table.image_bytes(k) == (_png(rows, i, win), _png(rows, i, lose))
        assert rec.prompt_chosen == rec.prompt_rejected == f"prompt {i}"
        assert (rec.file, rec.row) == (str(pairs_file), i)


def test_dual_captions_swap_with_the_images(pairs_file: Path) -> None:
    table = load_preference_table(str(pairs_file), dual_captions=True)
    by_row = {r.original_index: r for r in table.records}
    assert (by_row[0].prompt_chosen, by_row[0].prompt_rejected) == ("prompt 0 image 0", "prompt 0 image 1")
    assert (by_row[1].prompt_chosen, by_row[1].prompt_rejected) == ("prompt 1 image 1", "prompt 1 image 0")
    assert by_row[1].caption == "prompt 1"


def test_dataset_pixels_are_the_oriented_images(pairs_file: Path, rows: list[dict]) -> None:
    table = load_preference_table(str(pairs_file))
    ds = PreferencePairDataset(table, resolution=16, hflip=False)
    sample = ds[1]  # row 1 has label_0 == 0: the winner is jpg_1
    expected_win = torch.from_numpy(np.array(rows[1]["jpg_1"])).permute(2, 0, 1).float()
    expected_lose = torch.from_numpy(np.array(rows[1]["jpg_0"])).permute(2, 0, 1).float()
    torch.testing.assert_close(sample["pixels_chosen"] * 127.5 + 127.5, expected_win, rtol=0, atol=1e-4)
    torch.testing.assert_close(sample["pixels_rejected"] * 127.5 + 127.5, expected_lose, rtol=0, atol=1e-4)
    assert sample["pixels_chosen"].dtype == torch.float32
    assert sample["pixels_chosen"].min() >= -1 and sample["pixels_chosen"].max() <= 1


def test_max_samples_keeps_the_first_kept_pairs(pairs_file: Path) -> None:
    table = load_preference_table(str(pairs_file), max_samples=4)
    assert [r.original_index for r in table.records] == [0, 1, 2, 4]


def test_image_structs_read_like_bytes(tmp_path: Path, rows: list[dict], pairs_file: Path) -> None:
    struct_file = write_pickapic_parquet(tmp_path / "struct.parquet", rows, image_struct=True)
    a = load_preference_table(str(pairs_file))
    b = load_preference_table(str(struct_file))
    assert len(a) == len(b) and all(a.image_bytes(i) == b.image_bytes(i) for i in range(len(a)))


# -- bad rows --------------------------------------------------------------------------------------------------------

BAD_ROWS = [
    ({"jpg_1": b"not an image"}, "undecodable jpg_1", False),
    ({"jpg_0": None}, "missing jpg_0", False),
    ({"label_0": 0.7, "label_1": 0.3}, "label_0=0.7", False),
    ({"label_0": 1.0, "label_1": 1.0}, "label_0+label_1=2", False),
    ({"label_1": None}, "label_1 is null", False),
    ({"caption": "   "}, "empty caption", False),
    ({"caption_1": ""}, "empty caption_1", True),
]


@pytest.mark.parametrize(("change", "reason", "dual"), BAD_ROWS)
def test_bad_row_raises_with_file_and_row(tmp_path: Path, rows: list[dict], change: dict, reason: str, dual: bool):
    rows[5].update(change)
    path = write_pickapic_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(BadRowError) as err:
        load_preference_table(str(path), dual_captions=dual)
    assert str(err.value).startswith(f"{path}: row 5: {reason};")


@pytest.mark.parametrize(("change", "reason", "dual"), BAD_ROWS)
def test_bad_row_skipped_and_counted(
    tmp_path: Path, rows: list[dict], change: dict, reason: str, dual: bool, caplog: pytest.LogCaptureFixture
) -> None:
    rows[5].update(change)
    path = write_pickapic_parquet(tmp_path / "bad.parquet", rows)
    with caplog.at_level(logging.WARNING, logger="diffalign.data.pickapic"):
        table = load_preference_table(str(path), dual_captions=dual, on_bad_row="skip")
    assert table.skipped == {reason: 1}
    assert [r.original_index for r in table.records] == [0, 1, 2, 4, 6, 8, 9, 10]
    assert f"skipped 1 of 12 rows in {path}: 1 {reason}" in caplog.text


def test_skip_summary_counts_each_reason(tmp_path: Path, rows: list[dict], caplog: pytest.LogCaptureFixture) -> None:
    rows[0]["jpg_1"] = b"\x89PNG broken"
    rows[4]["jpg_1"] = b"junk"
    rows[9].update(label_0=0.7, label_1=0.3)
    rows[7]["jpg_0"] = b"junk"  # a tie: dropped as a tie, not reported as bad
    path = write_pickapic_parquet(tmp_path / "bad.parquet", rows)
    with caplog.at_level(logging.WARNING, logger="diffalign.data.pickapic"):
        table = load_preference_table(str(path), on_bad_row="skip")
    assert table.skipped == {"undecodable jpg_1": 2, "label_0=0.7": 1}
    assert table.num_ties_dropped == 3 and len(table) == 6
    assert f"skipped 3 of 12 rows in {path}: 2 undecodable jpg_1, 1 label_0=0.7" in caplog.text


def test_missing_column_names_file_column_and_present_columns(tmp_path: Path, rows: list[dict]) -> None:
    for row in rows:
        del row["label_1"]
    path = write_pickapic_parquet(tmp_path / "nolabel.parquet", rows)
    with pytest.raises(MissingColumnError) as err:
        load_preference_table(str(path))
    msg = str(err.value)
    assert msg.startswith(f"{path}: missing column(s) ['label_1']; columns present: ['jpg_0', 'jpg_1', 'label_0',")


def test_dual_mode_requires_both_captions(tmp_path: Path, rows: list[dict]) -> None:
    for row in rows:
        del row["caption_1"]
    path = write_pickapic_parquet(tmp_path / "single.parquet", rows)
    assert len(load_preference_table(str(path))) == 9
    with pytest.raises(MissingColumnError, match=r"missing column\(s\) \['caption_1'\]"):
        load_preference_table(str(path), dual_captions=True)


def test_unreadable_parquet_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(PreferenceDataError, match=f"{path}: not a readable parquet file"):
        load_preference_table(str(path))


# -- sources ---------------------------------------------------------------------------------------------------------


def _write_shards(folder: Path, rows: list[dict], names: list[str], per_file: int) -> None:
    for k, name in enumerate(names):
        write_pickapic_parquet(folder / name, rows[k * per_file : (k + 1) * per_file])


def test_folder_of_shards_reads_split_files_in_order(tmp_path: Path, rows: list[dict]) -> None:
    folder = tmp_path / "pickapic" / "data"
    names = ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet", "validation-00000-of-00001.parquet"]
    _write_shards(folder, rows, names, per_file=4)
    train = load_preference_table(str(tmp_path / "pickapic"), split="train")
    assert [r.original_index for r in train.records] == [0, 1, 2, 4, 5, 6]
    assert [(Path(r.file).name, r.row) for r in train.records][3:] == [(names[1], 0), (names[1], 1), (names[1], 2)]
    val = load_preference_table(str(folder), split="validation")
    assert [r.prompt_chosen for r in val.records] == ["prompt 8", "prompt 9", "prompt 10"]
    with pytest.raises(FileNotFoundError, match="no parquet files for split 'test'"):
        load_preference_table(str(folder), split="test")


def test_folder_without_split_names_uses_every_file(tmp_path: Path, rows: list[dict]) -> None:
    _write_shards(tmp_path, rows, ["b.parquet", "a.parquet", "c.parquet"], per_file=4)
    table = load_preference_table(str(tmp_path), keep_ties=True)
    # sorted by name: a.parquet holds rows 4..7, b.parquet rows 0..3, c.parquet rows 8..11
    assert [r.prompt_chosen for r in table.records][:5] == ["prompt 4", "prompt 5", "prompt 6", "prompt 7", "prompt 0"]
    assert [r.original_index for r in table.records] == list(range(12))


def test_bad_row_in_second_shard_names_that_shard(tmp_path: Path, rows: list[dict]) -> None:
    rows[6]["caption"] = ""
    _write_shards(tmp_path, rows, ["train-0.parquet", "train-1.parquet"], per_file=4)
    with pytest.raises(BadRowError) as err:
        load_preference_table(str(tmp_path))
    assert str(err.value).startswith(f"{tmp_path / 'train-1.parquet'}: row 2: empty caption")


def test_hub_name_goes_through_datasets_load_dataset(
    monkeypatch: pytest.MonkeyPatch, pairs_file: Path, rows: list[dict]
) -> None:
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name: str, split: str) -> datasets.Dataset:
        calls.append((name, split))
        ds = datasets.Dataset(pq.read_table(pairs_file))
        return ds.cast_column("jpg_0", datasets.Image()).cast_column("jpg_1", datasets.Image())

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = load_preference_table("someone/pickapic_tiny", split="validation")
    local = load_preference_table(str(pairs_file), split="validation")
    assert calls == [("someone/pickapic_tiny", "validation")]
    assert [(hub.image_bytes(i), r.prompt_chosen, r.original_index, r.row) for i, r in enumerate(hub.records)] == [
        (local.image_bytes(i), r.prompt_chosen, r.original_index, r.row) for i, r in enumerate(local.records)
    ]
    assert hub.records[0].file == "someone/pickapic_tiny[validation]"
    assert hub.fingerprint != local.fingerprint
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_preference_table("./missing/pairs.parquet")
    assert len(calls) == 1


def test_fingerprint_tracks_source_and_options(tmp_path: Path, rows: list[dict], pairs_file: Path) -> None:
    fp = load_preference_table(str(pairs_file)).fingerprint
    assert load_preference_table(str(pairs_file)).fingerprint == fp
    assert load_preference_table(str(pairs_file), keep_ties=True).fingerprint != fp
    assert load_preference_table(str(pairs_file), max_samples=3).fingerprint != fp
    write_pickapic_parquet(pairs_file, rows[:8])
    assert load_preference_table(str(pairs_file)).fingerprint != fp


# -- transform ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "resolution"), [((20, 14), 12), ((14, 20), 12), ((33, 17), 16), ((16, 16), 16)])
def test_transform_matches_torchvision(tmp_path: Path, size: tuple[int, int], resolution: int) -> None:
    tv = pytest.importorskip("torchvision.transforms")
    rows = make_random_pairs(2, size=size, seed=1)
    table = load_preference_table(str(write_pickapic_parquet(tmp_path / "p.parquet", rows)))
    reference = tv.Compose(
        [
            tv.Resize(resolution, interpolation=tv.InterpolationMode.BILINEAR),
            tv.CenterCrop(resolution),
            tv.ToTensor(),
            tv.Normalize([0.5], [0.5]),
        ]
    )
    ds = PreferencePairDataset(table, resolution=resolution, hflip=False)
    sample = ds[0]
    assert sample["pixels_chosen"].shape == (3, resolution, resolution)
    assert torch.equal(sample["pixels_chosen"], reference(rows[0]["jpg_0"]))
    assert torch.equal(sample["pixels_rejected"], reference(rows[0]["jpg_1"]))


def test_random_crop_matches_torchvision_with_the_crop_streams(tmp_path: Path) -> None:
    tv = pytest.importorskip("torchvision.transforms")
    rows = make_random_pairs(3, size=(30, 18), seed=2)
    table = load_preference_table(str(write_pickapic_parquet(tmp_path / "p.parquet", rows)))
    ds = PreferencePairDataset(table, resolution=12, random_crop=True, hflip=False, seed=7)
    ds.set_epoch(3)
    reference = tv.Compose([tv.Resize(12), tv.RandomCrop(12), tv.ToTensor(), tv.Normalize([0.5], [0.5])])
    for index in range(3):
        sample = ds[index]
        for key, col, stream in (
            ("pixels_chosen", "jpg_0", CROP),
            ("pixels_rejected", "jpg_1", CROP + LOSER_STREAM_OFFSET),
        ):
            if index == 1:  # row 1 is swapped: its winner is jpg_1
                col = {"jpg_0": "jpg_1", "jpg_1": "jpg_0"}[col]
            torch.manual_seed(sample_key(7, 3, index, stream))  # torchvision draws from the global generator
            assert torch.equal(sample[key], reference(rows[index][col]))
    epoch_3 = [ds[i]["pixels_chosen"] for i in range(3)]
    ds.set_epoch(4)
    assert any(not torch.equal(a, ds[i]["pixels_chosen"]) for i, a in enumerate(epoch_3))  # a new crop per epoch


def test_flip_is_a_mirror_drawn_per_image(pairs_file: Path) -> None:
    table = load_preference_table(str(pairs_file))
    plain = PreferencePairDataset(table, resolution=16, hflip=False)
    flipping = PreferencePairDataset(table, resolution=16, hflip=True, seed=3)
    seen = set()
    for epoch in range(4):
        flipping.set_epoch(epoch)
        for i in range(len(table)):
            d = flipping.draws(i)
            seen.add((d.flip_chosen, d.flip_rejected))
            a, b = plain[i], flipping[i]
            for key, flip in (("pixels_chosen", d.flip_chosen), ("pixels_rejected", d.flip_rejected)):
                assert torch.equal(b[key], a[key].flip(-1) if flip else a[key])
    assert seen == {(False, False), (False, True), (True, False), (True, True)}


# -- addressable randomness ------------------------------------------------------------------------------------------


def test_draws_are_a_function_of_seed_epoch_index() -> None:
    def pattern(seed: int, epoch: int) -> list[tuple[bool, bool, bool]]:
        return [
            tuple(vars(draw_sample(seed, epoch, i, hflip=True, proportion_empty_prompts=0.3)).values())
            for i in range(64)
        ]

    assert pattern(0, 0) == pattern(0, 0)
    assert pattern(0, 1) != pattern(0, 0)
    assert pattern(1, 0) != pattern(0, 0)
    off = draw_sample(0, 0, 5, hflip=False, proportion_empty_prompts=0.0)
    assert (off.flip_chosen, off.flip_rejected, off.drop_prompt) == (False, False, False)


def test_same_sample_from_independent_dataset_objects(pairs_file: Path) -> None:
    a = PreferencePairDataset(load_preference_table(str(pairs_file)), resolution=12, proportion_empty_prompts=0.5)
    b = PreferencePairDataset(load_preference_table(str(pairs_file)), resolution=12, proportion_empty_prompts=0.5)
    a.set_epoch(2)
    b.set_epoch(2)
    for i in reversed(range(len(a))):  # order of access must not matter
        sa, sb = a[i], b[i]
        assert torch.equal(sa["pixels_chosen"], sb["pixels_chosen"])
        assert torch.equal(sa["pixels_rejected"], sb["pixels_rejected"])
        assert (sa["prompt_chosen"], sa["prompt_rejected"]) == (sb["prompt_chosen"], sb["prompt_rejected"])


def test_prompt_dropout_rate_and_pairing() -> None:
    p, n = 0.2, 4000
    drops = [draw_sample(0, 0, i, hflip=True, proportion_empty_prompts=p).drop_prompt for i in range(n)]
    rate = sum(drops) / n
    assert abs(rate - p) < 0.02  # binomial sd = 0.0063
    flips = [draw_sample(0, 0, i, hflip=True, proportion_empty_prompts=p).flip_chosen for i in range(n)]
    assert abs(sum(flips) / n - 0.5) < 0.03


def test_prompt_dropout_empties_both_halves_in_dual_mode(pairs_file: Path) -> None:
    table = load_preference_table(str(pairs_file), dual_captions=True)
    ds = PreferencePairDataset(table, resolution=8, proportion_empty_prompts=0.5, seed=1)
    dropped = 0
    for i in range(len(ds)):
        s = ds[i]
        if ds.draws(i).drop_prompt:
            dropped += 1
            assert (s["prompt_chosen"], s["prompt_rejected"]) == ("", "")
        else:
            assert (s["prompt_chosen"], s["prompt_rejected"]) == ds.prompts(i)
            assert s["prompt_chosen"] != s["prompt_rejected"]
    assert 0 < dropped < len(ds)


# -- collation ------------------------------------------------------------------------------------------------------


def test_collate_stacks_tensors_lists_strings_and_nested_dicts() -> None:
    samples = [
        {
            "index": i,
            "pixels_chosen": torch.full((3, 2, 2), float(i)),
            "prompt_chosen": f"p{i}",
            "cond_chosen": {"encoder_hidden_states": torch.full((4, 5), float(i)), "pooled": torch.tensor([i, -i])},
        }
        for i in (3, 1, 4)
    ]
    batch = collate_preference_batch(samples)
    assert batch["index"].dtype == torch.long and batch["index"].tolist() == [3, 1, 4]
    assert batch["pixels_chosen"].shape == (3, 3, 2, 2) and batch["pixels_chosen"][:, 0, 0, 0].tolist() == [3, 1, 4]
    assert batch["prompt_chosen"] == ["p3", "p1", "p4"]
    assert batch["cond_chosen"]["encoder_hidden_states"].shape == (3, 4, 5)
    assert batch["cond_chosen"]["pooled"].tolist() == [[3, -3], [1, -1], [4, -4]]


def test_collate_of_the_dataset(pairs_file: Path) -> None:
    ds = PreferencePairDataset(load_preference_table(str(pairs_file)), resolution=8)
    batch = collate_preference_batch([ds[i] for i in (0, 2)])
    assert batch["pixels_rejected"].shape == (2, 3, 8, 8)
    assert batch["prompt_chosen"] == batch["prompt_rejected"] == ["prompt 0", "prompt 2"]


def test_table_reads_images_on_demand_and_pickles_without_them(tmp_path: Path) -> None:
    import pickle

    rows = make_random_pairs(12, size=48, seed=1)
    table = load_preference_table(str(write_pickapic_parquet(tmp_path / "big.parquet", rows)))
    image_bytes = sum(len(a) + len(b) for a, b in (table.image_bytes(i) for i in range(len(table))))
    blob = pickle.dumps(table)  # what a DataLoader worker receives
    assert len(blob) < image_bytes / 10
    clone = pickle.loads(blob)
    assert [clone.image_bytes(i) for i in range(len(table))] == [table.image_bytes(i) for i in range(len(table))]
