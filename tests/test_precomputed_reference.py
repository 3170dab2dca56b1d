"""train.reference: precomputed reference log-likelihoods and the CPU-offloaded frozen copy give the same training as
the live frozen copy, step for step; the store is atomic, complete for the planned batches, and survives resume."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign.config import Config, ConfigError, config_from_dict, config_to_dict, save_config
from diffalign.trainers.batching import EpochBatches
from diffalign.trainers.checkpointing import list_checkpoints
from diffalign.trainers.metrics import read_metrics
from diffalign.trainers.offline import OfflinePreferenceTrainer
from diffalign.trainers.reference import PrecomputedReference
from diffalign.trainers.reference_store import (
    MissingReferenceError,
    OffloadedReference,
    ProcessGroup,
    ReferenceLogpStore,
    plan_micro_batches,
    planned_epochs,
    precompute_reference_logps,
    reference_key,
)

REPO = Path(__file__).resolve().parents[1]
# 16 pairs, batch 2, 2 accumulation steps: 4 optimizer steps per epoch, so 6 steps cross into epoch 1.
STEPS = 6


def full_ft_config(model: str, data: str, out: Path, reference: str, **train) -> Config:
    cfg = Config()
    cfg.model.pretrained = model
    cfg.data.path = data
    cfg.data.resolution = 16
    cfg.data.proportion_empty_prompts = 0.2
    cfg.lora.enabled = False
    cfg.loss.weighting = "min_snr"  # the stored values are unweighted; ω(t) must be applied as on the live path
    cfg.optim.lr = 1e-3
    cfg.train.output_dir = str(out)
    cfg.train.train_batch_size = 2
    cfg.train.gradient_accumulation_steps = 2
    cfg.train.max_steps = STEPS
    cfg.train.checkpointing_steps = 2
    cfg.train.progress_bar = False
    cfg.train.reference = reference
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


class CountingTrainer(OfflinePreferenceTrainer):
    """Counts the micro-batches of the precompute pass."""

    precomputed_batches = 0

    def reference_pass_batch(self, epoch, indices):
        type(self).precomputed_batches += 1
        return super().reference_pass_batch(epoch, indices)


def run(cfg: Config) -> OfflinePreferenceTrainer:
    trainer = CountingTrainer(cfg)
    trainer.train()
    return trainer


def final_state(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(out)[-1] / "trainable_0.safetensors"))


def assert_same_training(a: Path, b: Path, *, steps: range | None = None, atol: float = 1e-6) -> None:
    ra, rb = read_metrics(a), read_metrics(b)
    if steps is not None:
        ra = [r for r in ra if r["step"] in steps]
        rb = [r for r in rb if r["step"] in steps]
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and ra
    for key in ("loss", "mse_reference_chosen", "mse_reference_rejected", "mse_policy_chosen", "rewards/accuracies"):
        assert [r[key] for r in ra] == pytest.approx([r[key] for r in rb], abs=atol, rel=0), key
    sa, sb = final_state(a), final_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=0, msg=k)


@pytest.fixture(scope="module")
def frozen_copy_run(pixel_pipeline, pairs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("frozen") / "run"
    run(full_ft_config(pixel_pipeline, pairs, out, "frozen_copy"))
    return out


@pytest.fixture(scope="module")
def precomputed_run(pixel_pipeline, pairs, tmp_path_factory) -> tuple[Path, OfflinePreferenceTrainer]:
    out = tmp_path_factory.mktemp("pre") / "run"
    CountingTrainer.precomputed_batches = 0
    trainer = run(full_ft_config(pixel_pipeline, pairs, out, "precomputed"))
    assert CountingTrainer.precomputed_batches == STEPS * 2  # one forward per planned micro-batch, none in training
    return out, trainer


def test_precomputed_training_equals_frozen_copy_step_for_step(frozen_copy_run, precomputed_run):
    out, trainer = precomputed_run
    assert isinstance(trainer.reference, PrecomputedReference)  # no second network was ever built
    with pytest.raises(RuntimeError, match="holds no reference network"):
        trainer.reference.network()
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [0, 0, 0, 0, 1, 1]  # the epoch boundary is crossed
    assert records[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-7)  # policy == reference at step 1
    assert_same_training(frozen_copy_run, out)  # measured: bit for bit on one CPU
    store = trainer.reference_store
    assert store.folder.parent == out / "reference_logps"
    assert sorted(p.name for p in store.folder.glob("epoch-*")) == [
        "epoch-00000.safetensors",
        "epoch-00001.safetensors",
    ]
    assert not list(store.folder.glob(".*tmp"))
    epoch0 = load_file(str(store.epoch_path(0)))
    assert epoch0["chosen"].dtype == torch.float32 and epoch0["chosen"].shape == (16,)
    assert epoch0["computed"].all()  # 4 steps x 2 micro-batches x 2 pairs: every pair of epoch 0
    epoch1 = load_file(str(store.epoch_path(1)))
    assert int(epoch1["computed"].sum()) == 8  # 2 steps of epoch 1: the other pairs are never drawn


def test_offloaded_frozen_copy_equals_frozen_copy(pixel_pipeline, pairs, frozen_copy_run, tmp_path):
    cfg = full_ft_config(pixel_pipeline, pairs, tmp_path / "off", "frozen_copy_offload", max_steps=2)
    trainer = run(cfg)
    assert trainer.reference.mode == "frozen_copy_offload"
    reference = trainer.reference.module
    assert isinstance(reference, OffloadedReference)
    assert {p.device.type for p in reference.module.parameters()} == {"meta"}  # weights live in the offload map
    assert not any(p.requires_grad for p in reference.parameters())
    assert reference.to("cpu", torch.float64) is reference and reference.anchor.dtype == torch.float32  # no-op
    ra, rb = read_metrics(frozen_copy_run)[:2], read_metrics(tmp_path / "off")
    for key in ("loss", "mse_reference_chosen", "mse_reference_rejected"):
        assert [r[key] for r in ra] == pytest.approx([r[key] for r in rb], abs=1e-6, rel=0), key


def test_interrupted_precomputed_run_fills_the_gaps_and_resumes_exactly(
    pixel_pipeline, pairs, precomputed_run, tmp_path
):
    out = tmp_path / "resumed"
    CountingTrainer.precomputed_batches = 0
    run(full_ft_config(pixel_pipeline, pairs, out, "precomputed", max_steps=2))
    assert CountingTrainer.precomputed_batches == 4
    # the resumed run plans 6 steps: the 8 micro-batches the first run did not reach are computed in after_prepare,
    # before the checkpoint is restored, i.e. from the initial weights
    run(full_ft_config(pixel_pipeline, pairs, out, "precomputed", resume_from_checkpoint="latest"))
    assert CountingTrainer.precomputed_batches == 4 + 8
    assert_same_training(precomputed_run[0], out, atol=0.0)


def test_resumed_run_reads_the_store_and_computes_nothing(pixel_pipeline, pairs, tmp_path):
    cache = tmp_path / "cache"
    first = full_ft_config(pixel_pipeline, pairs, tmp_path / "first", "precomputed")
    first.data.cache_dir = str(cache)
    trainer = run(first)
    (key_folder,) = [p for p in cache.iterdir() if (p / "manifest.json").is_file()]
    assert trainer.reference_store.folder.parent == key_folder / "reference"  # beside the latent cache

    resumed = full_ft_config(
        pixel_pipeline,
        pairs,
        tmp_path / "second",
        "precomputed",
        resume_from_checkpoint=str(tmp_path / "first" / "checkpoint-2"),
    )
    resumed.data.cache_dir = str(cache)
    CountingTrainer.precomputed_batches = 0
    run(resumed)
    assert CountingTrainer.precomputed_batches == 0
    assert_same_training(tmp_path / "first", tmp_path / "second", steps=range(3, STEPS + 1), atol=0.0)


def test_missing_values_after_training_started_are_refused(precomputed_run):
    """The pass runs in after_prepare, before a checkpoint is restored and before the first step; once the stored
    values are loaded, nothing more can be computed: the policy's weights are no longer the reference."""
    trainer = precomputed_run[1]
    with pytest.raises(MissingReferenceError, match="only be computed before training starts"):
        trainer.reference_pass_batch(2, [0, 1])
    with pytest.raises(MissingReferenceError, match="no precomputed reference log-likelihood for epoch 2"):
        trainer.reference_store.get(2, [0, 1])


def test_lora_precomputed_equals_lora_adapters_disabled(pixel_pipeline, pairs, tmp_path):
    outs = {}
    for reference in ("auto", "precomputed"):
        cfg = full_ft_config(pixel_pipeline, pairs, tmp_path / reference, reference, max_steps=3)
        cfg.lora.enabled = True
        cfg.lora.rank = 4
        cfg.lora.init = "gaussian"
        run(cfg)
        outs[reference] = tmp_path / reference
    assert_same_training(outs["auto"], outs["precomputed"])


# ------------------------------------------------------------------------------------------------- store units


def test_store_round_trip_merge_and_missing(tmp_path):
    folder = tmp_path / "store" / reference_key({"a": 1})
    store = ReferenceLogpStore(folder, 6, {"a": 1})
    assert store.missing(0, range(6)) == list(range(6))
    store.put(0, [4, 1], torch.tensor([-0.5, -0.25]), torch.tensor([-1.0, -2.0]))
    store.flush()
    other = ReferenceLogpStore(folder, 6)  # a second writer of the same folder
    other.put(0, [0], torch.tensor([-3.0]), torch.tensor([-4.0]))
    store.put(0, [2], torch.tensor([-5.0]), torch.tensor([-6.0]))
    other.flush()
    store.flush()  # merges what `other` wrote
    fresh = ReferenceLogpStore(folder, 6)
    chosen, rejected = fresh.get(0, [4, 1, 0, 2])
    assert chosen.tolist() == [-0.5, -0.25, -3.0, -5.0] and rejected.tolist() == [-1.0, -2.0, -4.0, -6.0]
    assert fresh.missing(0, range(6)) == [3, 5]
    with pytest.raises(MissingReferenceError, match=r"epoch 0, pair indices \[3\]"):
        fresh.get(0, [2, 3])
    with pytest.raises(MissingReferenceError, match="epoch 7"):
        fresh.get(7, [0])
    assert not list(folder.glob(".*"))  # no temporary files left behind
    with pytest.raises(ValueError, match="store holds 6 pairs"):
        ReferenceLogpStore(folder, 7)
    store.put(1, [0], torch.tensor([float("nan")]), torch.tensor([0.0]))  # stored: the step reading it is skipped
    assert store.missing(1, [0, 1]) == [1] and torch.isnan(store.get(1, [0])[0]).all()


def test_precompute_fills_only_what_is_missing_and_keeps_finished_epochs(tmp_path):
    plan = plan_micro_batches(10, 2, num_processes=1, seed=0, num_micro_batches=8)  # 5 batches per epoch
    assert planned_epochs(plan) == [0, 1]
    store = ReferenceLogpStore(tmp_path / "s", 10)
    calls: list[tuple[int, list[int]]] = []

    def compute(epoch, indices):
        calls.append((epoch, indices))
        if len(calls) == 7:
            raise KeyboardInterrupt
        x = torch.tensor([-(100.0 * epoch + i) for i in indices])
        return x, x - 1

    with pytest.raises(KeyboardInterrupt):
        precompute_reference_logps(store, plan, compute, show_progress=False)
    assert calls == plan[:7]
    again = ReferenceLogpStore(tmp_path / "s", 10)
    calls.clear()
    assert precompute_reference_logps(again, plan, compute, show_progress=False) == 2
    assert calls == plan[6:]  # epoch 0 was flushed when epoch 1 began; epoch 1's first batch was flushed on exit
    chosen, rejected = again.get(1, [i for _, idx in plan[5:] for i in idx])
    assert torch.equal(rejected, chosen - 1)


def test_plan_covers_every_process_batch_in_training_order():
    plan = plan_micro_batches(10, 2, num_processes=2, seed=3, num_micro_batches=5)
    procs = [EpochBatches(10, 2, num_processes=2, process_index=p, seed=3) for p in range(2)]
    assert plan == [procs[p].local_indices(k) for k in range(5) for p in range(2)]
    assert planned_epochs(plan) == [0, 1, 2]


class _WriteNever(ReferenceLogpStore):
    def put(self, *args, **kwargs):
        raise AssertionError("only process 0 writes the store")


def _threaded_group(size: int) -> list[ProcessGroup]:
    """``size`` processes played by threads: a real all-gather and barrier (a 30 s timeout instead of a hang)."""
    barrier = threading.Barrier(size, timeout=30)
    slots: list = [None] * size

    def gather_of(rank: int):
        def gather(obj):
            slots[rank] = obj
            barrier.wait()
            out = list(slots)
            barrier.wait()
            return out

        return gather

    return [ProcessGroup(size, rank, gather_of(rank), barrier.wait) for rank in range(size)]


def test_every_process_computes_its_share_of_the_same_micro_batches_and_process_0_writes(tmp_path):
    plan = plan_micro_batches(8, 2, num_processes=2, seed=0, num_micro_batches=3)  # 2 per epoch: epochs 0, 0, 1

    def value(epoch, indices):
        x = torch.tensor([-(100.0 * epoch + i) for i in indices])
        return x, x - 1

    folder = tmp_path / "s"
    seeded = ReferenceLogpStore(folder, 8)
    for epoch, indices in (plan[0], plan[2], plan[3]):  # micro-batch 0 lacks process 1's values, 1 is complete
        seeded.put(epoch, indices, *value(epoch, indices))
    seeded.flush()
    calls: dict[int, list] = {0: [], 1: []}
    results: dict[int, int] = {}

    def process(group: ProcessGroup) -> None:
        store = (ReferenceLogpStore if group.index == 0 else _WriteNever)(folder, 8)

        def compute(epoch, indices):
            calls[group.index].append((epoch, indices))
            return value(epoch, indices)

        results[group.index] = precompute_reference_logps(store, plan, compute, processes=group, show_progress=False)

    threads = [threading.Thread(target=process, args=(group,)) for group in _threaded_group(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {0: 2, 1: 2}  # both decided on micro-batches 0 and 2: the same number of forwards
    assert calls == {0: [plan[0], plan[4]], 1: [plan[1], plan[5]]}
    fresh = ReferenceLogpStore(folder, 8)
    for epoch, indices in plan:
        assert torch.equal(torch.stack(fresh.get(epoch, indices)), torch.stack(value(epoch, indices)))


# ------------------------------------------------------------------------------------------------------ config


def _config(**train) -> dict:
    cfg = Config()
    cfg.model.pretrained, cfg.data.path = "m", "d"
    data = config_to_dict(cfg)
    data["train"].update(train)
    return data


@pytest.mark.parametrize("reference", ["auto", "frozen_copy", "frozen_copy_offload", "precomputed"])
def test_config_accepts_every_mode_for_full_fine_tuning(reference):
    data = _config(reference=reference)
    data["lora"]["enabled"] = False
    assert config_from_dict(data).train.reference == reference


def test_config_errors_name_the_fix():
    assert config_from_dict(_config(reference="precomputed")).lora.enabled  # allowed with LoRA: skips the forward
    for mode in ("frozen_copy", "frozen_copy_offload"):
        with pytest.raises(ConfigError, match=f"'{mode}' is for full fine-tuning"):
            config_from_dict(_config(reference=mode))
    data = _config(reference="precomputed", method="mapo")
    data["loss"].update(name="mapo", beta=0.1)
    with pytest.raises(ConfigError, match="uses no reference model; leave train.reference=auto"):
        config_from_dict(data)
    with pytest.raises(ConfigError, match="'train.reference' must be one of"):
        config_from_dict(_config(reference="cached"))


def test_store_is_keyed_by_what_the_values_depend_on(pixel_pipeline, pairs, tmp_path):
    def key(**changes) -> str:
        cfg = full_ft_config(pixel_pipeline, pairs, tmp_path / "k", "precomputed")
        for dotted, value in changes.items():
            section, name = dotted.split("__")
            setattr(getattr(cfg, section), name, value)
        trainer = OfflinePreferenceTrainer(cfg)
        trainer.build()
        return reference_key(trainer._reference_key_parts())

    base = key()
    assert key(loss__weighting="constant", optim__lr=1.0, train__max_steps=1) == base  # values are unweighted
    assert len({base, key(train__seed=1), key(data__proportion_empty_prompts=0.0), key(data__hflip=False)}) == 4
    copy = tmp_path / "model_copy"
    shutil.copytree(pixel_pipeline, copy)
    assert key(model__pretrained=str(copy)) != base


def test_two_processes_store_what_one_process_stores(
    pixel_pipeline, pairs, precomputed_run, tmp_path, run_train_script
):
    """2 processes x batch 2 == 1 process x batch 2 x 2 accumulation steps (``precomputed_run``): the same
    micro-batches, so each process's share of the pass stores bit for bit what one process computes alone, and
    training is the same bit for bit (the gradient (g0 + g1) / 2 is exact either way). One process at batch 4 would
    round differently (convolutions at batch 4 vs 2: 1 ulp)."""
    cfg = full_ft_config(pixel_pipeline, pairs, tmp_path / "two", "precomputed", gradient_accumulation_steps=1)
    launched = run_train_script(["--config", str(save_config(cfg, tmp_path / "two.yaml"))], processes=2)
    assert launched.returncode == 0, launched.stderr[-3000:]
    one = precomputed_run[1].reference_store.folder
    (two,) = (tmp_path / "two" / "reference_logps").iterdir()
    assert two.name == one.name  # the same key: the process count is not part of it
    for epoch in ("epoch-00000.safetensors", "epoch-00001.safetensors"):
        a, b = load_file(str(one / epoch)), load_file(str(two / epoch))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), epoch
    assert_same_training(precomputed_run[0], tmp_path / "two", atol=0.0)
