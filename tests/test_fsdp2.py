"""FSDP2 primitives (diffalign.trainers.sharding) on CPUs with gloo: one two-process run of tests/fsdp2_worker.py,
launched as ``accelerate launch --use_fsdp --fsdp_version 2``, against the same training in this process.

Measured float error, 2 processes vs 1 (tiny UNet, 3 AdamW steps, ``fsdp2_worker.ADAM_EPS``): FSDP2's average
reduce-scatter is exact (gloo's ``AVG`` of a and b equals a/2 + b/2 bit for bit), but the gradients are not
bit-identical to one process's accumulation: already before any communication a rank's unsharded gradients differ from
an unsharded module's on the same micro-batch in 56 of 208 UNet tensors (by up to 7.5e-7 of the tensor's largest
gradient, a few float32 ulps), all upstream of the skip connections. FSDP2's per-block autograd hooks change the order
in which the engine sums gradient contributions into activations that several blocks consume. Losses of the first step
(same weights) are bit-identical; later ones differ by up to 2.4e-7, weights after 3 steps by up to 1.2e-7 (full
fine-tune, weights near 1) and 3.0e-8 (LoRA). The tolerances below are about 4x those measurements.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from accelerate.utils import FullyShardedDataParallelPlugin
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from transformers import CLIPTextModel

from diffalign.models.tiny import save_tiny_sd_pipeline
from diffalign.models.tiny_sd3 import tiny_sd3_components
from diffalign.trainers.sharding import Fsdp2Settings, fsdp2_settings, load_sharded, shard_units
from tests import fsdp2_worker as worker

WORKER = Path(__file__).with_name("fsdp2_worker.py")
LOSS_ATOL = 1e-6  # measured 2.4e-7
WEIGHT_ATOL = {"full": 5e-7, "lora": 1.5e-7}  # measured 1.2e-7 and 3.0e-8 (also for the EMA shadows)
GRAD_NORM_RTOL = 1e-6  # measured 1.8e-7 relative


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD pipeline folder whose UNet works on 4×8×8 latents with two levels and one layer per block."""
    return save_tiny_sd_pipeline(
        tmp_path_factory.mktemp("fsdp2_base") / "sd", sample_size=16, layers_per_block=1, tokenizer_max_length=8
    )


@pytest.fixture(scope="module")
def run(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The two-process run's results and files, and the one-process references computed while it runs."""
    out = tmp_path_factory.mktemp("fsdp2_out")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2"]
    command += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", str(free_port()), str(WORKER), str(base), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    log = out / "log.txt"
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            references = {mode: worker.train_reference(base, mode) for mode in worker.MODES}
            process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.terminate()  # the launcher stops its workers on SIGTERM
                process.wait()
    assert process.returncode == 0, log.read_text()[-4000:]
    return {"out": out, "results": json.loads((out / "results.json").read_text()), "reference": references}


def fixed_input() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 800]), torch.randn(2, 8, 32, generator=g)


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k].detach()).abs().max().item() for k in a)


# -- detection ------------------------------------------------------------------------------------------------------


def test_the_launch_is_detected_on_cpu_where_accelerate_drops_its_plugin(run):
    results = run["results"]
    assert results["distributed_type"] == "DistributedType.MULTI_CPU"
    assert not results["state_has_fsdp_plugin"]
    assert results["settings"] == {
        "reshard_after_forward": "True",
        "cpu_offload": "False",
        "param_dtype": "None",
        "reduce_dtype": "None",
        "block_classes": "None",
    }


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith("FSDP_") or key == "ACCELERATE_USE_FSDP":
            monkeypatch.delenv(key)
    return monkeypatch


def fake_accelerator(mixed_precision: str = "no", plugin: FullyShardedDataParallelPlugin | None = None) -> Any:
    state = SimpleNamespace() if plugin is None else SimpleNamespace(fsdp_plugin=plugin)
    return SimpleNamespace(state=state, mixed_precision=mixed_precision)


def test_fsdp2_settings_from_the_launcher_environment(clean_env):
    assert fsdp2_settings(fake_accelerator()) is None
    clean_env.setenv("ACCELERATE_USE_FSDP", "true")
    for key, value in {
        "FSDP_VERSION": "2",
        "FSDP_RESHARD_AFTER_FORWARD": "false",
        "FSDP_OFFLOAD_PARAMS": "true",
        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_TRANSFORMER_CLS_TO_WRAP": "BasicTransformerBlock,ResnetBlock2D",
    }.items():
        clean_env.setenv(key, value)
    assert fsdp2_settings(fake_accelerator("bf16")) == Fsdp2Settings(
        reshard_after_forward=False,
        cpu_offload=True,
        param_dtype=torch.bfloat16,
        reduce_dtype=torch.float32,
        block_classes=("BasicTransformerBlock", "ResnetBlock2D"),
    )
    assert fsdp2_settings(fake_accelerator("fp16")).param_dtype == torch.float16
    clean_env.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match=r"^FSDP1 is not supported: launch with fsdp_version: 2"):
        fsdp2_settings(fake_accelerator())


def test_fsdp2_settings_from_the_gpu_plugin(clean_env):
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=False)
    assert fsdp2_settings(fake_accelerator("no", plugin)) == Fsdp2Settings(reshard_after_forward=False)
    with pytest.raises(ValueError, match="FSDP1 is not supported"):
        fsdp2_settings(fake_accelerator("no", FullyShardedDataParallelPlugin(fsdp_version=1)))
    checkpointed = FullyShardedDataParallelPlugin(fsdp_version=2, activation_checkpointing=True)
    with pytest.raises(ValueError, match="train.gradient_checkpointing=true"):
        fsdp2_settings(fake_accelerator("no", checkpointed))


# -- which modules are sharded --------------------------------------------------------------------------------------


def assert_innermost_first(units: list[torch.nn.Module]) -> None:
    position = {id(u): i for i, u in enumerate(units)}
    for i, unit in enumerate(units):
        assert all(position.get(id(m), -1) < i for m in list(unit.modules())[1:])


def class_counts(units: list[torch.nn.Module]) -> dict[str, int]:
    names = [type(u).__name__ for u in units]
    return {name: names.count(name) for name in set(names)}


def test_shard_units_follow_no_split_modules(base):
    unet_units = shard_units(UNet2DConditionModel.from_pretrained(base, subfolder="unet"))
    assert class_counts(unet_units) == {
        "ResnetBlock2D": 8,
        "BasicTransformerBlock": 4,
        "CrossAttnUpBlock2D": 1,
        "UpBlock2D": 1,
    }
    assert_innermost_first(unet_units)
    transformer = tiny_sd3_components(with_vae=False, tokenizer_max_length=8)["transformer"]
    assert class_counts(shard_units(transformer)) == {"JointTransformerBlock": 2}
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    assert class_counts(shard_units(text_encoder)) == {"CLIPEncoderLayer": 5, "CLIPTextEmbeddings": 1}
    only = shard_units(text_encoder, ["CLIPEncoderLayer"])
    assert class_counts(only) == {"CLIPEncoderLayer": 5}
    with pytest.raises(ValueError, match=r"names no module class of CLIPTextModel"):
        shard_units(text_encoder, ["JointTransformerBlock"])


def test_shard_units_fall_back_to_module_list_children():
    class Stack(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Linear(2, 2)
            self.layers = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))

    stack = Stack()
    assert shard_units(stack) == list(stack.layers)[::-1]


# -- the two-process run against one process ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", worker.MODES)
def test_two_processes_train_as_one(run, mode):
    results, reference = run["results"][mode], run["reference"][mode]
    compared = [  # (step, two-process loss, one-process loss) of every micro-batch
        (step, rank["losses"][step][k], reference["losses"][step][k * worker.WORLD + r])
        for r, rank in enumerate(results["ranks"])
        for step in range(worker.STEPS)
        for k in range(worker.ACCUMULATION)
    ]
    assert all(a == b for step, a, b in compared if step == 0)  # same weights, same micro-batch: bit for bit
    loss_diff = max(abs(a - b) for _, a, b in compared)
    print(f"{mode}: max loss difference {loss_diff:.2e} over {len(compared)} micro-batch losses")
    assert loss_diff <= LOSS_ATOL
    torch.testing.assert_close(results["grad_norms"], reference["grad_norms"], rtol=GRAD_NORM_RTOL, atol=0)

    gathered = load_file(run["out"] / f"{mode}_state.safetensors")
    model = reference["model"]
    expected = {n: p for n, p in model.named_parameters() if p.requires_grad} if mode == "lora" else model.state_dict()
    weight_diff = max_abs_diff(gathered, expected)
    print(f"{mode}: max weight difference {weight_diff:.2e} over {len(gathered)} tensors")
    assert weight_diff <= WEIGHT_ATOL[mode]


@pytest.mark.parametrize("mode", worker.MODES)
def test_ema_of_sharded_parameters_equals_one_process(run, mode):
    ema_diff = max_abs_diff(load_file(run["out"] / f"{mode}_ema.safetensors"), run["reference"][mode]["ema"])
    print(f"{mode}: max EMA difference {ema_diff:.2e}")
    assert ema_diff <= WEIGHT_ATOL[mode]


def test_lora_with_bf16_compute_and_cpu_offload(run):
    """One sharding group holds bf16 frozen weights and fp32 trainable adapters; gradients come back in fp32."""
    step = run["results"]["bf16_offload"]
    assert step["trained_dtypes"] == step["grad_dtypes"] == ["torch.float32"]
    assert step["frozen_dtypes"] == ["torch.bfloat16"] and step["devices"] == ["cpu"]
    fp32_loss = run["results"]["lora"]["ranks"][0]["losses"][0][0]
    assert abs(step["loss"] - fp32_loss) <= 5e-3 * fp32_loss  # bf16 compute: measured 6.7e-4 relative


def test_frozen_reference_copy_is_sharded_and_gets_no_grads(run):
    for rank in run["results"]["full"]["ranks"]:
        assert rank["frozen_parameters"] == 208 and rank["frozen_all_dtensor"] and rank["frozen_grads"] == 0


# -- sharded checkpoints ----------------------------------------------------------------------------------------------


def tensor_bytes(metadata: Any, prefix: str) -> int:
    return sum(
        entry.size.numel() * entry.properties.dtype.itemsize
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    )


@pytest.mark.parametrize("mode", worker.MODES)
def test_sharded_checkpoint_holds_only_trained_state_and_resumes_exactly(run, mode):
    results, model = run["results"][mode], run["reference"][mode]["model"]
    folder = run["out"] / f"{mode}_checkpoint"
    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {k.removeprefix("model.") for k in metadata.state_dict_metadata if k.startswith("model.")}
    assert saved == set(trained)
    trained_bytes = sum(p.numel() * p.element_size() for p in trained.values())
    assert tensor_bytes(metadata, "model.") == trained_bytes
    # AdamW's two moments per parameter plus its float32 step count, and the EMA shadows
    assert tensor_bytes(metadata, "optimizer.") == 2 * trained_bytes + 4 * len(trained)
    assert tensor_bytes(metadata, "extra.ema.") == trained_bytes
    files = sum(f.stat().st_size for f in folder.glob("*.distcp"))
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    print(f"{mode}: checkpoint files {files} bytes, trained {trained_bytes}, frozen (not written) {base_bytes}")
    if mode == "lora":
        assert files < base_bytes / 2  # the base UNet's weights are not in the files

    assert results["resume_max_abs_diff"] == 0.0  # parameters, EMA shadows and AdamW moments, bit for bit
    for rank in results["ranks"]:
        assert rank["resumed_losses"] == rank["losses"][worker.RESUME_AT :]
    assert results["resumed_grad_norms"] == results["grad_norms"][worker.RESUME_AT :]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("mode", worker.MODES)
def test_sharded_checkpoint_resumes_in_one_unsharded_process(run, base, mode):
    """torch.distributed.checkpoint reshards: the two ranks' checkpoint loads into a plain module in this process."""
    model, frozen = worker.load_policy(base, mode)
    optimizer, ema = worker.build_optimizer(model)
    ema_state = ema.state_dict()
    load_sharded(run["out"] / f"{mode}_checkpoint", model, optimizer, extra={"ema": ema_state})
    ema.load_state_dict(ema_state)
    assert ema.optimization_step == worker.RESUME_AT
    steps = range(worker.RESUME_AT, worker.STEPS)
    list(worker.train_steps(model, frozen, optimizer, ema, steps, worker.one_process_batches))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    gathered = load_file(run["out"] / f"{mode}_state.safetensors")
    resume_diff = max_abs_diff({n: gathered[n] for n in trained}, trained)
    print(f"{mode}: resumed in one process, max weight difference to the two-process run {resume_diff:.2e}")
    assert resume_diff <= WEIGHT_ATOL[mode]  # the last step's 2-vs-1-process error: measured 1.2e-7 and 6.1e-10


def test_loading_a_checkpoint_of_other_trained_parameters_fails_in_one_line(run):
    message = run["results"]["lora"]["mismatch_error"]
    folder = run["out"] / "full_checkpoint"
    assert message == (
        f"{folder}: checkpoint parameters do not match the model's trainable parameters (208 unexpected, 64 missing); "
        "was it written with different lora settings?"
    )


# -- exports ----------------------------------------------------------------------------------------------------------


def test_full_export_loads_with_from_pretrained(run):
    out, reference = run["out"], run["reference"]["full"]["model"]
    config = json.loads((out / "full_export" / "unet" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel"  # not fully_shard's FSDPUNet2DConditionModel
    loaded = UNet2DConditionModel.from_pretrained(out / "full_export", subfolder="unet")
    gathered = load_file(out / "full_state.safetensors")
    assert all(torch.equal(v, gathered[k]) for k, v in loaded.state_dict().items())
    with torch.no_grad():
        ours, theirs = loaded(*fixed_input()).sample, reference(*fixed_input()).sample
    output_diff = (ours - theirs).abs().max().item()
    print(f"full export: max output difference to the one-process model {output_diff:.2e}")
    assert output_diff <= 5e-6  # measured 1.0e-6 (from weights within 1.2e-7)


def test_lora_export_loads_with_load_lora_weights(run, base):
    reference = run["reference"]["lora"]["model"]
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    with torch.no_grad():
        before = pipe.unet(*fixed_input()).sample
        pipe.load_lora_weights(run["out"] / "lora_export")
        ours, theirs = pipe.unet(*fixed_input()).sample, reference(*fixed_input()).sample
    output_diff = (ours - theirs).abs().max().item()
    lora_effect = (ours - before).abs().max().item()
    print(f"lora export: output difference {output_diff:.2e}, the LoRA moves outputs by {lora_effect:.2e}")
    assert output_diff <= 4e-6 and lora_effect >= 1e-3  # measured 7.8e-7 and 6.2e-3


# -- memory -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", worker.MODES)
def test_each_rank_holds_half_the_training_state(run, mode):
    ranks = [r["state_bytes"] for r in run["results"][mode]["ranks"]]
    one = run["reference"][mode]["state_bytes"]
    ratio = max(ranks) / one
    print(f"{mode}: parameters + gradients + AdamW state per rank {ranks} bytes vs {one} on one process: {ratio:.4f}")
    assert 0.5 <= ratio <= 0.55
