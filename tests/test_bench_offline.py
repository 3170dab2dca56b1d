"""scripts/bench_offline.py end to end at toy size (``--parity-only``: one run per contender, no timings).

Loss tolerance, ours vs the floor: ``ours_cached`` (scripts/train.py on the latent cache) and the floor loop run the
same float32 operations in the same order from the same weights (the same ``set_seed`` before the same peft LoRA
init) on the same tensors (the cache's latents and text embeddings, the same flips, noise and timesteps), one
intra-op thread each: measured, their per-step losses are equal bit for bit (max |difference| 0.0 over 4 steps here
and over 110 steps at the benchmark's default size). ``FLOOR_LOSS_ATOL`` (1e-6) leaves room for a BLAS that rounds
differently between two processes. Step 1 is exactly ln 2 on both sides whatever the batch (LoRA's B starts at zero,
so policy == reference); steps 2-4 move the loss by about 1e-2 here, four orders of magnitude above the tolerance,
so a mismatch of data, draws, init, beta or optimizer shows there.

Ours vs diffusers (only when ``DIFFUSERS_DPO_SCRIPT`` names diffusers' ``train_diffusion_dpo.py`` and torchvision is
installed; CI has neither, so it is skipped there): the script draws its own noise, timesteps and order, so losses
cannot be compared step by step; the saved LoRA weights are compared instead (same keys and shapes, the same
initial ``lora_A`` within the AdamW movement bound, ``lora_B`` of the same size on both sides).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
from helpers_scripts import load_script

STEPS = 4


def _diffusers_script() -> str | None:
    path = os.environ.get("DIFFUSERS_DPO_SCRIPT")
    if not path or not Path(path).is_file() or importlib.util.find_spec("torchvision") is None:
        return None
    return path


def _parity(bench, tmp_path: Path, diffusers: str | None) -> dict:
    argv = [
        "--parity-only", "--work-dir", str(tmp_path), "--pairs", "6", "--batch-size", "2", "--image-sizes", "64", "96",
        "--resolution", "32", "--vae-levels", "4", "--short-steps", "1", "--long-steps", str(STEPS), "--timeout", "300",
    ]  # fmt: skip
    argv += ["--diffusers-script", diffusers] if diffusers else ["--diffusers-script", ""]
    args = bench.parse_args(argv)
    payload = bench.run_benchmark(args, bench.settings_from(args, tmp_path), Path(diffusers) if diffusers else None)
    assert isinstance(payload, dict), payload
    return payload["parity"]


def test_bench_offline_floor_and_diffusers_loss_parity(tmp_path):
    bench = load_script("bench_offline", register=True)
    diffusers = _diffusers_script()
    p = _parity(bench, tmp_path, diffusers)

    ours, floor = p["ours_cached_losses"], p["floor_losses"]
    assert len(ours) == len(floor) == STEPS
    assert ours[0] == pytest.approx(math.log(2), abs=1e-6)
    assert floor[0] == pytest.approx(math.log(2), abs=1e-6)
    for a, b in zip(ours, floor, strict=True):
        assert abs(a - b) <= bench.FLOOR_LOSS_ATOL, (ours, floor)
    assert p["cached_floor_losses_match"]
    assert p["losses_moved"] > 100 * bench.FLOOR_LOSS_ATOL, ours  # both trained: the comparison is not vacuous

    if diffusers is None:
        assert "lora_vs_diffusers" not in p
    else:
        lora = p["lora_vs_diffusers"]
        assert lora["lora_shapes_match"] and lora["lora_keys"] > 0, lora
        assert lora["lora_A_max_abs_diff"] <= lora["lora_A_bound"], lora  # the same initial lora_A
        assert 0 < lora["lora_B_max_abs_ours"] <= lora["lora_B_bound"], lora
        assert 0 < lora["lora_B_max_abs_diffusers"] <= lora["lora_B_bound"], lora
        assert lora["lora_ok"], lora
    assert p["parity_ok"]


def test_pickapic_like_rows_are_jpegs_in_range():
    import io

    from PIL import Image

    bench = load_script("bench_offline", register=True)
    rows = bench.make_pickapic_like_rows(3, (64, 96), seed=0)
    for i, row in enumerate(rows):
        sizes = set()
        for column in ("jpg_0", "jpg_1"):
            with Image.open(io.BytesIO(row[column])) as img:
                assert img.format == "JPEG" and img.mode == "RGB"
                assert all(64 <= side <= 96 for side in img.size)
                sizes.add(img.size)
        assert len(sizes) == 1  # both images of a pair share a size
        assert (row["label_0"], row["label_1"]) == ((1.0, 0.0) if i % 2 == 0 else (0.0, 1.0))
        assert 6 <= len(row["caption"].split()) <= 20


def test_run_measured_counts_a_forked_worker_once():
    """A forked DataLoader-like worker shares its parent's pages: the tree peak adds its USS, not its RSS again."""
    pytest.importorskip("psutil")
    from diffalign.utils.benchmark import run_measured

    size = 200 * 2**20
    code = (
        "import os, time\n"
        f"block = b'x' * {size}\n"  # resident in the parent, shared copy-on-write with the child
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    time.sleep(1.0)\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
    )
    run = run_measured([sys.executable, "-c", code], timeout_s=60)
    assert run.returncode == 0
    assert size <= run.peak_tree_bytes < 1.4 * size  # summed RSS would be over 2 x size
    assert run.peak_rss_bytes >= run.peak_tree_bytes
