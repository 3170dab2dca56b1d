"""Offline diffusion methods on a table of preference pairs: ``dpo`` (Diffusion-DPO and the paired losses with a
reference: IPO, hinge, robust, Poly-DPO, ...), ``dcpo`` (each image under its own caption), ``mapo`` (reference-free
margin) and ``sft`` (the denoising loss on the winners). They read no section of their own: the loss, data and
training sections say everything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffalign.config_fields import Checker
from diffalign.methods import Method, register_method

#: What the pairwise diffusion trainer gives a loss: the (B,) log-likelihoods of a pair, policy and reference.
PAIR_INPUTS = frozenset(
    {"policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps"}
)


def paired_reference_losses(registry: Mapping[str, Any]) -> tuple[str, ...]:
    """The registered paired losses with a reference whose required tensors are all pair log-likelihoods (losses
    that need token tensors or per-pair extras are the causal-LM trainer's)."""
    from diffalign.losses.registry import tensor_inputs

    return tuple(
        sorted(
            name
            for name, fn in registry.items()
            if getattr(fn, "needs_reference", False)
            and getattr(fn, "kind", None) == "paired"
            and {k for k, required in tensor_inputs(fn).items() if required} <= PAIR_INPUTS
        )
    )


def _dual_captions(c: Checker) -> None:
    if not c.config.data.dual_captions:
        c.fail(
            "data.dual_captions",
            "train.method 'dcpo' conditions each image on its own caption: set data.dual_captions=true and give "
            "the data caption_0/caption_1 columns",
        )


_PAIRWISE = "diffalign.trainers.offline:OfflinePreferenceTrainer"
_SFT = "diffalign.trainers.sft:SFTTrainer"

# Diffusion-DPO (or another paired loss with a reference); DCPO: each image under its own caption
register_method(Method("dpo", "diffusion", _PAIRWISE, default_loss="dpo", losses=paired_reference_losses))
register_method(
    Method("dcpo", "diffusion", _PAIRWISE, default_loss="dpo", losses=paired_reference_losses, validate=_dual_captions)
)
register_method(Method("mapo", "diffusion", _PAIRWISE, default_loss="mapo", uses_reference=False))  # reference-free
register_method(Method("sft", "diffusion", _SFT, default_loss="sft", uses_reference=False))  # winners only
