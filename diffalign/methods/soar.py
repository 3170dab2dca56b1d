"""``soar`` (SOAR, arXiv 2604.12617): SFT on the winners plus a self-correction term at re-noised off-trajectory
points; the ``soar`` section is the method's knobs, with Tencent-Hunyuan/HY-SOAR's defaults ("v4": 40 sampling
steps, 6 auxiliary points, CFG 4.5, λ 1, one ODE path, extra paths ``flow_sde`` at noise 0.5). The section is also
the settings object of :mod:`diffalign.models.soar`.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from diffalign.config_fields import setting
from diffalign.methods import Method, register_method

SDEType = Literal["simple", "sde", "flow_sde", "cps"]
SDE_TYPES: tuple[str, ...] = typing.get_args(SDEType)


@dataclass
class SOARConfig:
    """train.method soar (SOAR, arXiv 2604.12617); defaults = Tencent-Hunyuan/HY-SOAR's ("v4")."""

    lambda_aux: float = setting(1.0, ge=0, note="0 = the SFT loss")  # weight of each auxiliary point
    num_aux_points: int = setting(6, ge=1)  # M re-noised points per rollout path
    # K: the off-trajectory state is one step of a K-step schedule
    num_sampling_steps: int = setting(40, ge=1)
    cfg_scale: float = setting(4.5, ge=0, note="1 = no guidance")  # CFG of that stop-gradient step (empty prompt)
    num_paths: int = setting(1, ge=1, note="1 = the ODE path only")  # more adds stochastic paths of sde_type
    sde_type: SDEType = "flow_sde"  # simple | sde | flow_sde | cps
    sde_noise: float = setting(0.5, ge=0)


register_method(
    Method(
        "soar",
        "diffusion",
        "diffalign.trainers.soar:SOARTrainer",
        sections={"soar": (SOARConfig,)},
        default_loss="sft",
        uses_reference=False,
    )
)
