"""The loss core: pure per-sample preference losses on log-likelihood tensors (no models, no I/O, no reduction).

Every loss takes ``(B,)`` tensors and hyper-parameters by keyword only and returns a :class:`LossOutput` whose
``losses`` are per pair / per sample; the trainer reduces them. Look a loss up by name with :func:`get_loss` (or the
``LOSSES`` dict); each function carries ``loss_name``, ``needs_reference`` and ``kind`` (``"paired"``,
``"unpaired"`` or ``"chosen_only"``).

Diffusion convention: diffusion adapters pass ``logp = −0.5·L`` with ``L`` the per-sample denoising MSE (mean over
C,H,W, computed in fp32). Then

* ``dpo`` with ``beta=5000`` gives exactly Diffusion-DPO's logit ``s = −(β/2)[(L^w_θ − L^l_θ) − (L^w_ref − L^l_ref)]``
  (``SalesforceAIResearch/DiffusionDPO``; diffusers' SD script β = 2500 without the ½ is the same loss);
* ``mapo`` recovers ``L = −2·logp`` and reproduces ``mapo-t2i/mapo`` ``compute_loss`` per sample;
* ``kto`` uses ``r = logp_θ − logp_ref = ½(L_ref − L_θ)``, so Diffusion-KTO's β = 1000 is ``beta=2000`` here;
* ``sft`` is ``−logp = ½·L`` (the original ``--sft`` minimises ``L``).

LLM adapters pass summed completion-token log-probs (TRL's convention). LLM-side modules:

* :mod:`~diffalign.losses.dpo_family`: every TRL 1.16 DPO ``loss_type`` as ``trl_<type>`` (f-divergences, LD-DPO,
  WPO) and ``dpo_mixture``; parity with TRL in ``tests/test_trl_parity.py``;
* :mod:`~diffalign.losses.llm_pairwise`: SimPO, AlphaPO, CPO, ORPO, RPO, iREPO, RSO, MADPO, constrained PO;
* :mod:`~diffalign.losses.listwise`: PRO, DMPO, DynamicPO (``kind="listwise"``);
* :mod:`~diffalign.losses.policy`, :mod:`~diffalign.losses.advantages`, :mod:`~diffalign.losses.reward_shaping`:
  PPO/GRPO clipped objectives (TRL aggregations, GSPO, k3 KL, Flow-GRPO, GRPO-Guard), advantages (group, RLOO,
  MC-GRPO, BNPO) and reward shaping (ensembles, LSC, PAR, CHES). Not in ``LOSSES``: they are not preference losses;
  the diffusion per-step policy losses have their own registry, ``POLICY_LOSSES`` (:func:`get_policy_loss`,
  :func:`register_policy_loss`; config key ``online.policy_loss``).
* :mod:`~diffalign.losses.nft` and :mod:`~diffalign.losses.marble`: DiffusionNFT's negative-aware loss, advantages,
  optimality probabilities and old-policy decay; MARBLE's per-reward advantages, min-norm balancing coefficients,
  their smoothing, the amortised blended advantage and the gradient-cosine diagnostic (online, not in ``LOSSES``).
"""

from diffalign.losses import dpo_family, listwise, llm_pairwise, policy  # noqa: F401  (registers their losses)
from diffalign.losses.dpo_family import dpo_mixture, trl_reward_metrics
from diffalign.losses.listwise import dynamicpo, pro
from diffalign.losses.llm_pairwise import alphapo, cpo, orpo, simpo
from diffalign.losses.marble import (
    blend_advantages,
    gradient_cosines,
    marble_weights,
    min_norm_coefficients,
    per_reward_advantages,
    smooth_coefficients,
)
from diffalign.losses.nft import nft_advantages, nft_loss, old_policy_decay, optimality_probability
from diffalign.losses.pairwise import dpo, hinge, ipo, kto, poly_dpo, robust
from diffalign.losses.policy_registry import POLICY_LOSSES, get_policy_loss, register_policy_loss
from diffalign.losses.reference_free import mapo, mapo_score, sft
from diffalign.losses.registry import LOSSES, UnknownLossError, get_loss, register
from diffalign.losses.types import LossOutput

__all__ = [
    "LOSSES",
    "LossOutput",
    "POLICY_LOSSES",
    "UnknownLossError",
    "alphapo",
    "cpo",
    "dpo",
    "dpo_mixture",
    "dynamicpo",
    "orpo",
    "pro",
    "simpo",
    "trl_reward_metrics",
    "get_loss",
    "get_policy_loss",
    "hinge",
    "ipo",
    "kto",
    "mapo",
    "mapo_score",
    "poly_dpo",
    "register",
    "register_policy_loss",
    "robust",
    "sft",
    "blend_advantages",
    "gradient_cosines",
    "marble_weights",
    "min_norm_coefficients",
    "per_reward_advantages",
    "smooth_coefficients",
    "nft_advantages",
    "nft_loss",
    "old_policy_decay",
    "optimality_probability",
]
