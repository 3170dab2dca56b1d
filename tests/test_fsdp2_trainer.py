"""The offline trainer under FSDP2 (``accelerate launch --config_file configs/accelerate/fsdp.yaml``) on 2 CPU
processes with gloo: the trainer's own sharding, sharded checkpoints and gathered export, the functions a GPU run
calls (accelerate applies FSDP only on accelerators; see diffalign/trainers/sharding.py).

Counterpart: 1 process x the same per-process batch x 2 accumulation steps (the same micro-batches). Not bit for
bit: FSDP2's per-block backward hooks sum gradients in another order (measured: up to 2e-8 in a gradient element,
1e-7 relative in the gradient norm), so the comparison carries tolerances set from those measurements. SFT's loss
has no beta, so its loss curve is compared directly (measured 1e-7 relative); Diffusion-DPO's beta = 5000 would
turn that rounding into ~3e-5 of the step-2 loss (LoRA DPO against one process: tests/test_fsdp2.py, on the
primitives). A resumed sharded run is compared with the uninterrupted sharded run: bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from toy_args import toy_dpo_args

from diffalign.models.lora import lora_state_dict
from diffalign.trainers.checkpointing import list_checkpoints
from diffalign.trainers.metrics import read_metrics
from diffalign.trainers.sharding import SHARDED_DIR, load_sharded


def args(pipeline: str, data: str, out: Path, *extra: str) -> list[str]:
    return toy_dpo_args(pipeline, data, out, "data.proportion_empty_prompts=0.2", *extra)


def launch(run_train_script, argv: list[str], processes: int) -> None:
    if processes == 1:
        done = run_train_script([*argv, "train.gradient_accumulation_steps=2"])
    else:
        done = run_train_script(argv, processes=processes, accelerate_config="fsdp.yaml")
    assert done.returncode == 0, done.stderr[-3000:]


def test_full_fine_tune_sft_has_the_loss_curve_of_one_process_and_exports_the_gathered_weights(
    pixel_pipeline, pairs, tmp_path, run_train_script
):
    sft = ("lora.enabled=false", "train.method=sft", "loss.name=sft", "optim.lr=1e-3", "train.max_steps=4")
    launch(run_train_script, args(pixel_pipeline, pairs, tmp_path / "one", *sft), 1)
    launch(run_train_script, args(pixel_pipeline, pairs, tmp_path / "two", *sft), 2)
    curves = [[r["loss"] for r in read_metrics(tmp_path / name)] for name in ("one", "two")]
    assert curves[1] == pytest.approx(curves[0], rel=1e-6, abs=0) and len(set(curves[0])) == 4
    # each rank holds half of the parameters, gradients and AdamW moments (first dimensions split, unpadded)
    one_mib, two_mib = (read_metrics(tmp_path / name)[0]["train_state_mib"] for name in ("one", "two"))
    assert two_mib / one_mib == pytest.approx(0.5, abs=0.01)

    # the export loads with from_pretrained and holds what the last sharded checkpoint holds, gathered
    exported = UNet2DConditionModel.from_pretrained(tmp_path / "two", subfolder="unet")
    gathered = UNet2DConditionModel.from_pretrained(pixel_pipeline, subfolder="unet")
    checkpoint = list_checkpoints(tmp_path / "two")[-1]
    assert checkpoint.name == "checkpoint-4" and not list(checkpoint.glob("trainable_*.safetensors"))
    load_sharded(checkpoint / SHARDED_DIR, gathered, torch.optim.AdamW(gathered.parameters()))
    ours, theirs = exported.state_dict(), gathered.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    single = load_file(str(tmp_path / "one" / "unet" / "diffusion_pytorch_model.safetensors"))
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, single[name], rtol=0, atol=1e-7, msg=name)  # measured 7e-9


def test_lora_dpo_resumes_exactly_from_a_sharded_checkpoint(pixel_pipeline, pairs, tmp_path, run_train_script):
    lora = ("lora.enabled=true", "lora.rank=4", "train.ema=true", "train.ema_decay=0.5")
    launch(run_train_script, args(pixel_pipeline, pairs, tmp_path / "full", *lora, "train.max_steps=4"), 2)
    resumed = tmp_path / "resumed"
    launch(run_train_script, args(pixel_pipeline, pairs, resumed, *lora, "train.max_steps=2"), 2)
    again = [*lora, "train.max_steps=4", "train.resume_from_checkpoint=latest"]
    launch(run_train_script, args(pixel_pipeline, pairs, resumed, *again), 2)
    assert [r["loss"] for r in read_metrics(resumed)] == [r["loss"] for r in read_metrics(tmp_path / "full")]
    a, b = (lora_state_dict(out) for out in (tmp_path / "full", resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the EMA of the adapters
    # only trained tensors are in the sharded checkpoint: LoRA adapters, no base weights
    metadata = json.dumps(sorted(_checkpoint_keys(list_checkpoints(resumed)[-1] / SHARDED_DIR)))
    assert "lora_A" in metadata and "conv_in.weight" not in metadata and "ema" in metadata
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k or "lora.up" in k) > 1e-4  # it trained


def test_precomputed_reference_is_computed_by_both_sharded_ranks(pixel_pipeline, pairs, tmp_path, run_train_script):
    full = ("lora.enabled=false", "train.reference=precomputed", "train.max_steps=2")
    launch(run_train_script, args(pixel_pipeline, pairs, tmp_path / "one", *full), 1)
    launch(run_train_script, args(pixel_pipeline, pairs, tmp_path / "two", *full), 2)
    (one,) = (tmp_path / "one" / "reference_logps").iterdir()
    (two,) = (tmp_path / "two" / "reference_logps").iterdir()
    a, b = load_file(str(one / "epoch-00000.safetensors")), load_file(str(two / "epoch-00000.safetensors"))
    assert int(a["computed"].sum()) == 8 and torch.equal(a["computed"], b["computed"])
    # the same forward on the same micro-batches, the weights all-gathered exactly: the same values
    assert torch.equal(a["chosen"], b["chosen"]) and torch.equal(a["rejected"], b["rejected"])
    assert [r["loss"] for r in read_metrics(tmp_path / "two")][0] == pytest.approx(0.6931471805599453, abs=1e-7)


def _checkpoint_keys(folder: Path) -> list[str]:
    import torch.distributed.checkpoint as dcp

    return list(dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata)
