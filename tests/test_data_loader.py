"""The trainers read micro-batches through a DataLoader (diffalign/trainers/loader.py): the worker count changes
nothing in the results, a resume mid-epoch with workers continues exactly, and a row that fails to decode in a
worker reaches the user as the same one-line ``FILE: row N: reason`` error as without workers (skipping such rows:
tests/test_bad_data.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_config import tiny_lora_config
from PIL import Image
from safetensors.torch import load_file

from diffalign.config import Config
from diffalign.data.pickapic import BadRowError
from diffalign.data.synthetic import make_random_pairs, write_pickapic_parquet
from diffalign.trainers.batching import EpochBatches
from diffalign.trainers.checkpointing import list_checkpoints
from diffalign.trainers.loader import LoaderSettings, micro_batch_loader
from diffalign.trainers.metrics import read_metrics
from diffalign.trainers.offline import train


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "pairs.parquet"
    write_pickapic_parquet(path, make_random_pairs(16, size=20, seed=0))  # 20 px: resized and cropped to 16
    return str(path)


def config(model: str, data: str, out: Path, *, workers: int, **train) -> Config:
    # max_steps 6 of 2 micro-batches: 12 micro-batches of 8 per epoch, into epoch 1
    steps = {"gradient_accumulation_steps": 2, "max_steps": 6, "checkpointing_steps": 3}
    cfg = tiny_lora_config(model, data, out, **{**steps, **train})
    cfg.data.hflip = True
    cfg.data.random_crop = True  # per-sample crops, flips and prompt dropout all drawn in the workers
    cfg.data.proportion_empty_prompts = 0.3
    cfg.data.num_workers = workers
    return cfg


def final_trainable(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(out)[-1] / "trainable_0.safetensors"))


def assert_same_run(a: Path, b: Path) -> None:
    sa, sb = final_trainable(a), final_trainable(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [r["loss"] for r in read_metrics(a)] == [r["loss"] for r in read_metrics(b)]


@pytest.fixture(scope="module")
def no_workers_run(pixel_pipeline, pairs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w0") / "run"
    train(config(pixel_pipeline, pairs, out, workers=0))
    return out


def test_two_workers_train_bit_for_bit_like_none(no_workers_run, pixel_pipeline, pairs, tmp_path):
    train(config(pixel_pipeline, pairs, tmp_path / "w2", workers=2))
    assert_same_run(no_workers_run, tmp_path / "w2")
    assert len({r["loss"] for r in read_metrics(no_workers_run)}) == 6  # it trained: every step's loss differs


def test_resume_mid_epoch_with_workers_equals_the_uninterrupted_run(no_workers_run, pixel_pipeline, pairs, tmp_path):
    out = tmp_path / "resumed"
    train(config(pixel_pipeline, pairs, out, workers=2, max_steps=3))  # stops after micro-batch 6 of epoch 0's 8
    train(config(pixel_pipeline, pairs, out, workers=2, resume_from_checkpoint="latest"))
    assert_same_run(no_workers_run, out)


def test_batches_arrive_in_sampler_order_with_their_epoch(pairs):
    from diffalign.data import PreferencePairDataset, collate_preference_batch, load_preference_table

    dataset = PreferencePairDataset(load_preference_table(pairs), resolution=16, seed=3)
    batches = EpochBatches(len(dataset), 3, seed=3)  # 5 micro-batches per epoch
    stream = micro_batch_loader(dataset, collate_preference_batch, batches, 4, LoaderSettings(2), torch.device("cpu"))
    got = [next(stream) for _ in range(3)]
    stream.close()
    expected = [batches.local_indices(k) for k in (4, 5, 6)]
    assert [(epoch, batch["index"].tolist()) for epoch, batch in got] == expected
    assert [epoch for epoch, _ in expected] == [0, 1, 1]


def truncated_jpeg(size: int = 20) -> bytes:
    """A JPEG cut in half: it passes PIL's verify() (which does not decode JPEG data) but not a decode."""
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    return data[: len(data) // 2]


@pytest.fixture
def load_time_check_misses_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """Load-time validation passes every image (as when the source changes after loading): a bad image is first
    met in a worker (forked, so it inherits the patch)."""
    import diffalign.data.pickapic as pickapic

    monkeypatch.setattr(pickapic, "image_decode_problem", lambda data: None)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_row_that_does_not_decode_is_the_same_one_line_error_with_workers(
    workers, pixel_pipeline, tmp_path, load_time_check_misses_images
):
    rows = make_random_pairs(8, size=20, seed=1)
    rows[5]["jpg_1"] = truncated_jpeg()  # row 5 is swapped: jpg_1 is its winner
    data = write_pickapic_parquet(tmp_path / "bad.parquet", rows)
    cfg = config(pixel_pipeline, str(data), tmp_path / "out", workers=workers, max_steps=4)
    with pytest.raises(BadRowError) as caught:
        train(cfg)
    message = str(caught.value)
    assert message.startswith(f"{data}: row 5: the chosen image (jpg_1) does not decode (")
    assert message.endswith("or set data.on_bad_row=skip")
    assert "\n" not in message and "DataLoader worker" not in message
