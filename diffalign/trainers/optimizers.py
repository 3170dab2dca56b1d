"""Optimizers by config name: ``adamw`` (torch), ``adamw_8bit`` (bitsandbytes) and ``adafactor`` (transformers).

Where each comes from (the Diffusion-DPO, diffusers and MaPO training scripts):

* ``adamw`` — ``torch.optim.AdamW(betas=(adam_beta1, adam_beta2), eps=adam_epsilon, weight_decay)``, the
  Diffusion-DPO SD 1.5 recipe (SalesforceAIResearch/DiffusionDPO ``train.py``: β1 0.9, β2 0.999, wd 1e-2, eps 1e-8).
* ``adamw_8bit`` — ``bitsandbytes.optim.AdamW8bit`` with the same arguments, as diffusers'
  ``examples/research_projects/diffusion_dpo/train_diffusion_dpo{,_sdxl}.py`` build it under ``--use_8bit_adam``
  (their README recipes for SD 1.5 / SDXL LoRA, and MaPO's SDXL command, use it). Optimizer states are
  block-wise 8-bit: about 2 bytes per parameter instead of 8. Needs the ``8bit`` extra
  (``pip install 'diffalign[8bit]'``) and, in practice, a CUDA GPU.
* ``adafactor`` — ``transformers.optimization.Adafactor(lr, weight_decay, clip_threshold=1.0,
  scale_parameter=False, relative_step=False, warmup_init=False)``: exactly what DiffusionDPO ``train.py`` uses for
  SDXL (``if args.use_adafactor or args.sdxl``). With these settings the lr is the given one (no relative step, no
  parameter-scale factor); Adafactor keeps factored second moments (row + column statistics per matrix, no first
  moment: ``beta1=None``), so its state is a small fraction of AdamW's, and it clips each update to RMS ≤
  ``clip_threshold``. The trainer's global gradient-norm clip (``optim.max_grad_norm``) still runs, as in the
  original script with plain ``--sdxl``. ``adam_beta1/2`` and ``adam_epsilon`` do not apply to Adafactor.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

import torch

from diffalign.config import OPTIMIZERS, OptimConfig

__all__ = ["ADAFACTOR_KWARGS", "OPTIMIZERS", "build_optimizer"]

# DiffusionDPO train.py (SDXL branch); warmup_init=False is transformers' default, stated for clarity.
ADAFACTOR_KWARGS: dict[str, Any] = {
    "clip_threshold": 1.0,
    "scale_parameter": False,
    "relative_step": False,
    "warmup_init": False,
}

_BNB_MISSING = (
    "optim.optimizer=adamw_8bit needs bitsandbytes: pip install 'diffalign[8bit]' (or pip install bitsandbytes)"
)


def _import_bitsandbytes() -> Any:
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as err:  # also raised when sys.modules["bitsandbytes"] is None
        raise ImportError(_BNB_MISSING) from err


def build_optimizer(
    params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]], optim_config: OptimConfig, lr: float
) -> torch.optim.Optimizer:
    """Build the optimizer named by ``optim_config.optimizer`` over ``params`` at learning rate ``lr``.

    ``lr`` is passed separately because the trainer may scale ``optim.lr`` (``optim.scale_lr``). Weight decay is
    ``optim_config.weight_decay`` for every optimizer; betas and epsilon apply to the AdamW variants only.

    Raises:
        ImportError: ``adamw_8bit`` without bitsandbytes installed (the message names the ``8bit`` extra).
        ValueError: an unknown optimizer name (configs are validated earlier; this guards code-built configs).
    """
    params = list(params)
    name = optim_config.optimizer
    oc = optim_config
    if name == "adamw":
        return torch.optim.AdamW(
            params, lr=lr, betas=(oc.adam_beta1, oc.adam_beta2), eps=oc.adam_epsilon, weight_decay=oc.weight_decay
        )
    if name == "adamw_8bit":
        bnb = _import_bitsandbytes()
        return bnb.optim.AdamW8bit(
            params, lr=lr, betas=(oc.adam_beta1, oc.adam_beta2), eps=oc.adam_epsilon, weight_decay=oc.weight_decay
        )
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=oc.weight_decay, **ADAFACTOR_KWARGS)
    listed = ", ".join(f"'{o}'" for o in OPTIMIZERS)
    raise ValueError(f"optim.optimizer must be one of {listed}; got {name!r}")
