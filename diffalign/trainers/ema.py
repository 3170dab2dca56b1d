"""The EMA of the trained parameters (diffusers' ``EMAModel``) in a checkpoint as safetensors, never pickled.

accelerate's ``register_for_checkpointing`` would write the EMA as ``custom_checkpoint_0.pkl`` and read it back with
``torch.load(weights_only=False)``, so resuming from a folder someone else wrote could run code. Here the shadow
parameters are stored under the names of the parameters they follow, and EMAModel's scalar settings (decay,
optimization step, warm-up) as JSON in the file's metadata.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from diffusers.training_utils import EMAModel
from safetensors import safe_open
from safetensors.torch import save_file

EMA_FILE = "ema.safetensors"


def save_ema(ema: EMAModel, names: Sequence[str], folder: str | Path) -> Path:
    """Write ``ema`` to ``folder/ema.safetensors``; ``names`` are the trained parameters' names, in EMA order."""
    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    if len(shadow) != len(names):
        raise ValueError(f"EMA holds {len(shadow)} parameters, {len(names)} names given")
    path = Path(folder) / EMA_FILE
    tensors = {name: p.detach().contiguous() for name, p in zip(names, shadow, strict=True)}
    save_file(tensors, str(path), metadata={"ema_state": json.dumps(state)})
    return path


def load_ema(ema: EMAModel, names: Sequence[str], folder: str | Path) -> None:
    """Restore ``ema`` from ``folder/ema.safetensors`` (written by :func:`save_ema` for the same parameters)."""
    path = Path(folder) / EMA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no EMA state in this checkpoint; was it written with train.ema=false?")
    with safe_open(str(path), framework="pt") as f:
        stored = set(f.keys())
        if stored != set(names):
            raise ValueError(
                f"{path}: EMA parameters do not match the model's trainable parameters "
                f"({len(stored - set(names))} unexpected, {len(set(names) - stored)} missing)"
            )
        state = json.loads(f.metadata()["ema_state"])
        device = ema.shadow_params[0].device if ema.shadow_params else "cpu"
        state["shadow_params"] = [f.get_tensor(name).to(device) for name in names]
    ema.load_state_dict(state)
