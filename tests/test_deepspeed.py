"""DeepSpeed ZeRO-2 (configs/accelerate/deepspeed_zero2.yaml) on 2 CPU processes: diffalign's own trainer
(scripts/train.py) under ``accelerate launch``, with exact checkpoint resume and a final export equal to the weights
gathered from the ZeRO partitions. ``make test-deepspeed`` installs deepspeed and runs it; the tests are ``slow`` (out
of ``make test``: DeepSpeed compiles an op on first use) and skip when deepspeed is not importable.

How it runs on CPU (DeepSpeed 0.19.8, accelerate 1.15):

* DeepSpeed's CPU accelerator talks over gloo when ``oneccl_bindings_for_pytorch`` is absent (no oneCCL, no
  intel_extension_for_pytorch needed). On its first use it JIT-compiles a small C++ op (``deepspeed_shm_comm``,
  about 90 s on 2 cores, needs g++; cached in ~/.cache/torch_extensions afterwards).
* ``ACCELERATE_USE_CPU=1`` cannot be used: accelerate then ignores DeepSpeed and runs plain MULTI_CPU DDP.
* Without it, accelerate finds no GPU and picks no process-group backend, so every process believes it is process 0
  of 1 and DeepSpeed stops on "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step *
  world_size 2 != 2 * 1 * 2". The trainer therefore gives its ``Accelerator`` an
  ``InitProcessGroupKwargs(backend="gloo")`` under DeepSpeed when no CUDA device exists; on GPUs accelerate picks
  nccl itself.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toy_args import toy_dpo_args

deepspeed = pytest.importorskip("deepspeed", reason="deepspeed is not installed (make test-deepspeed installs it)")


REPO = Path(__file__).resolve().parents[1]
ZERO2_YAML = REPO / "configs" / "accelerate" / "deepspeed_zero2.yaml"

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_deepspeed_train(tmp_path_factory):
    """``run(args)``: ``scripts/train.py args`` under ``accelerate launch --config_file deepspeed_zero2.yaml`` on 2 CPU
    processes (fp32); the DeepSpeed counterpart of conftest's ``run_train_script``."""
    ds_root = str(Path(deepspeed.__file__).resolve().parents[1])  # where deepspeed was found, for the workers

    def run(args: list[str]) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ZERO2_YAML)]
        command += ["--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no"]
        command += ["--main_process_port", str(_free_port()), str(REPO / "scripts" / "train.py"), *args]
        env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
        python_path = [ds_root, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env.update(
            OMP_NUM_THREADS="1",
            DS_ACCELERATOR="cpu",
            CUDA_VISIBLE_DEVICES="",
            PYTHONPATH=os.pathsep.join(python_path),
        )
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)

    return run


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _gathered_fp32(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights reassembled from both ranks' ZeRO partitions (DeepSpeed's zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="pytorch_model")


def _assert_zero2_checkpoint(checkpoint: Path) -> None:
    engine = checkpoint / "pytorch_model"
    assert sorted(p.name for p in engine.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    states = torch.load(engine / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert states["dp_world_size"] == 2
    assert states["ds_config"]["zero_optimization"]["stage"] == 2
    assert (checkpoint / "trainable_0.safetensors").is_file() and (checkpoint / "trainer_state.json").is_file()


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow  # make test-deepspeed runs this file (installs deepspeed; ~3 minutes with its first-use compile)
def test_zero2_full_finetune_resumes_exactly_and_exports_gathered_weights(
    pixel_pipeline, pairs, tmp_path, run_deepspeed_train, run_train_script
):
    full, resumed, ddp = tmp_path / "full", tmp_path / "resumed", tmp_path / "ddp"
    _ok(run_deepspeed_train(toy_dpo_args(pixel_pipeline, pairs, full, "train.max_steps=4")))
    _assert_zero2_checkpoint(full / "checkpoint-4")

    # interrupted after step 2 (its checkpoint), resumed to 4 == uninterrupted, bit for bit
    _ok(run_deepspeed_train(toy_dpo_args(pixel_pipeline, pairs, resumed, "train.max_steps=2")))
    again = run_deepspeed_train(
        toy_dpo_args(pixel_pipeline, pairs, resumed, "train.max_steps=4", "train.resume_from_checkpoint=latest")
    )
    _ok(again)
    assert "checkpoint-2" in again.stdout + again.stderr  # it did resume
    exported = load_file(str(full / "unet" / "diffusion_pytorch_model.safetensors"))
    assert_equal(exported, load_file(str(resumed / "unet" / "diffusion_pytorch_model.safetensors")))
    assert _losses(full) == _losses(resumed)

    # the export and the trainer's checkpoint file hold the full weights: those gathered from both ranks' partitions
    assert_equal(exported, _gathered_fp32(full / "checkpoint-4"))
    assert_equal(exported, load_file(str(full / "checkpoint-4" / "trainable_0.safetensors")))
    base = load_file(str(Path(pixel_pipeline) / "unet" / "diffusion_pytorch_model.safetensors"))
    assert max((v - base[k]).abs().max().item() for k, v in exported.items()) > 1e-4  # it trained

    # ZeRO-2 trains what DDP trains: not bit for bit (ZeRO's partitioned reduction and gradient norm round
    # differently; 6e-8 measured in the weights), so weights are compared to float tolerance and losses, which
    # beta = 5000 amplifies (1 ulp of a log-likelihood is ~3e-4 in the logit), only at step 1 (ln 2 on both)
    _ok(run_train_script(toy_dpo_args(pixel_pipeline, pairs, ddp, "train.max_steps=4"), processes=2))
    reference = load_file(str(ddp / "unet" / "diffusion_pytorch_model.safetensors"))
    assert exported.keys() == reference.keys()
    for k in exported:
        torch.testing.assert_close(exported[k], reference[k], atol=1e-6, rtol=1e-5, msg=k)
    assert _losses(full)[0] == _losses(ddp)[0]


@pytest.mark.slow  # one more DeepSpeed launch (~30 s on 2 cores)
def test_zero2_lora_checkpoint_holds_the_gathered_adapters(pixel_pipeline, pairs, tmp_path, run_deepspeed_train):
    out = tmp_path / "lora"
    lora = ("train.max_steps=2", "lora.enabled=true", "lora.rank=4")
    _ok(run_deepspeed_train(toy_dpo_args(pixel_pipeline, pairs, out, *lora)))
    _assert_zero2_checkpoint(out / "checkpoint-2")
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    trainable = load_file(str(out / "checkpoint-2" / "trainable_0.safetensors"))
    assert trainable and all("lora" in k for k in trainable)
    gathered = _gathered_fp32(out / "checkpoint-2")
    assert_equal(trainable, {k: gathered[k] for k in trainable})
    assert any(k.endswith("lora_B.default.weight") and v.abs().max() > 0 for k, v in trainable.items())  # trained
