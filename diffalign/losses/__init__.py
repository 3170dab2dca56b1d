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

LLM adapters pass summed completion-token log-probs (TRL's convention).
"""

from diffalign.losses.pairwise import dpo, hinge, ipo, kto, poly_dpo, robust
from diffalign.losses.reference_free import mapo, mapo_score, sft
from diffalign.losses.registry import LOSSES, UnknownLossError, get_loss, register
from diffalign.losses.types import LossOutput

__all__ = [
    "LOSSES",
    "LossOutput",
    "UnknownLossError",
    "dpo",
    "get_loss",
    "hinge",
    "ipo",
    "kto",
    "mapo",
    "mapo_score",
    "poly_dpo",
    "register",
    "robust",
    "sft",
]
