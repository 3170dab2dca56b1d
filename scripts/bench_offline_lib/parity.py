"""Loss parity: ``ours_cached``'s per-step losses against the floor's, and ours' saved LoRA against diffusers'
(same keys and shapes, the same initial ``lora_A``, ``lora_B`` moved by the same amount); see the "Loss parity"
paragraph of scripts/bench_offline.py's docstring."""

from __future__ import annotations

import json
import math
import struct
import sys
from array import array
from pathlib import Path
from typing import Any

from .common import LEARNING_RATE, WEIGHT_DECAY, Contender

# Per-step |loss(ours_cached) - loss(floor)|: both run the same float32 operations in the same order from the same
# weights on the same tensors, so they agree bit for bit on one CPU thread (measured: 0.0 over 110 steps; see
# tests/test_bench_offline.py); the bound leaves room for a BLAS that rounds differently between two processes.
FLOOR_LOSS_ATOL = 1e-6
# AdamW moves a weight by at most lr * |m_hat| / (sqrt(v_hat) + eps) per step, which is <= (1 - beta1) / sqrt(1 -
# beta2) = 3.2 lr in the worst case (lr at the first step); weight decay adds lr * 1e-2 * |w|.
ADAM_STEP_BOUND = 3.3


def read_safetensors_f32(path: Path) -> dict[str, tuple[list[int], array]]:
    """``{name: (shape, float32 values)}`` of a safetensors file of F32 tensors, read without torch or numpy (the
    measuring process must stay small, see :func:`.assets.prepare_assets`)."""
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] != "F32":
            raise ValueError(f"{path}: {name} is {entry['dtype']}, expected F32")
        start, end = entry["data_offsets"]
        values = array("f")
        values.frombytes(data[8 + header_len + start : 8 + header_len + end])
        if sys.byteorder != "little":
            values.byteswap()
        out[name] = (list(entry["shape"]), values)
    return out


def compare_lora(ours: Path, theirs: Path, steps: int) -> dict[str, Any]:
    """Same LoRA keys and shapes, same initial ``lora_A`` and ``lora_B`` moved by the same amount after ``steps``
    AdamW steps (see scripts/bench_offline.py's docstring); ``lora_ok`` says whether all hold."""
    a, b = read_safetensors_f32(ours), read_safetensors_f32(theirs)
    shapes_match = {k: v[0] for k, v in a.items()} == {k: v[0] for k, v in b.items()}
    down = [k for k in a if ".lora_A." in k or ".lora.down." in k]
    up = [k for k in a if ".lora_B." in k or ".lora.up." in k]
    result: dict[str, Any] = {"lora_keys": len(a), "lora_shapes_match": shapes_match}
    if not shapes_match or not down or not up:
        return {**result, "lora_ok": False}

    def max_abs(keys: list[str], side: dict[str, tuple[list[int], array]]) -> float:
        return max(abs(x) for k in keys for x in side[k][1])

    init_diff = max(abs(x - y) for k in down for x, y in zip(a[k][1], b[k][1], strict=True))
    bound = 2 * ADAM_STEP_BOUND * LEARNING_RATE * steps * (1 + WEIGHT_DECAY * max_abs(down, a))
    b_ours, b_theirs = max_abs(up, a), max_abs(up, b)
    b_bound = ADAM_STEP_BOUND * LEARNING_RATE * steps
    ok = init_diff <= bound and 0 < b_ours <= b_bound and 0 < b_theirs <= b_bound and 0.5 <= b_ours / b_theirs <= 2
    return {
        **result,
        "lora_A_max_abs": max_abs(down, a),
        "lora_A_max_abs_diff": init_diff,
        "lora_A_bound": bound,
        "lora_B_max_abs_ours": b_ours,
        "lora_B_max_abs_diffusers": b_theirs,
        "lora_B_bound": b_bound,
        "lora_ok": ok,
    }


def parity(contenders: dict[str, Contender], steps: int) -> dict[str, Any]:
    """Loss parity of ours vs the floor and the LoRA comparison of ours vs diffusers (first long run of each)."""
    out: dict[str, Any] = {}
    ok = True
    floor = contenders.get("floor")
    if floor is not None and floor.loss_curves:
        out["floor_losses"] = floor.loss_curves[0]
        for name in ("ours_cached", "ours_uncached"):
            c = contenders.get(name)
            if c is None or not c.loss_curves:
                continue
            curve = c.loss_curves[0]
            diff = max(abs(x - y) for x, y in zip(curve, floor.loss_curves[0], strict=True))
            out[f"{name}_losses"] = curve
            out[f"{name}_vs_floor_loss_max_abs_diff"] = diff
            if name == "ours_cached":
                out["cached_floor_losses_match"] = diff <= FLOOR_LOSS_ATOL
                out["losses_moved"] = max(abs(x - math.log(2)) for x in curve)
                ok &= out["cached_floor_losses_match"]
    diffusers = contenders.get("diffusers")
    ours = contenders.get("ours_uncached") or contenders.get("ours_cached")
    if diffusers is not None and diffusers.lora_copies and ours is not None and ours.lora_copies:
        out["lora_vs_diffusers"] = compare_lora(ours.lora_copies[0], diffusers.lora_copies[0], steps)
        ok &= out["lora_vs_diffusers"]["lora_ok"]
    out["parity_ok"] = ok
    return out


def report_parity(p: dict[str, Any]) -> None:
    print()
    if "floor_losses" in p:
        print(f"floor losses:       {' '.join(f'{x:.7f}' for x in p['floor_losses'][:12])}")
    for name in ("ours_cached", "ours_uncached"):
        if f"{name}_losses" in p:
            print(f"{name + ' losses:':<20}{' '.join(f'{x:.7f}' for x in p[f'{name}_losses'][:12])}")
            print(f"{name}_vs_floor_loss_max_abs_diff={p[f'{name}_vs_floor_loss_max_abs_diff']:.3g}")
    if "cached_floor_losses_match" in p:
        verdict = "match" if p["cached_floor_losses_match"] else "DIFFER"
        print(f"ours_cached vs floor per-step losses {verdict} (tolerance {FLOOR_LOSS_ATOL:g})")
    lora = p.get("lora_vs_diffusers")
    if lora is not None:
        for key, value in lora.items():
            print(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
    print(f"parity_ok={str(p['parity_ok']).lower()}")
