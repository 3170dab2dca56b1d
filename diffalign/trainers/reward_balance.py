"""Several rewards in group RL: MARBLE's gradient-space balance (arXiv 2605.06507) for the online trainers, and the
per-reward gradient diagnostics of a weighted sum.

The trainer computes one loss per reward ``L_k`` from one forward (the same prediction, reward ``k``'s advantages).
On a *solving* micro-batch, :meth:`RewardBalance.balanced_loss` takes each ``g_k = ∇L_k`` with ``autograd.grad``
(``K`` backward passes that keep the graph and never touch ``.grad``), averages them over processes, solves the
min-norm quadratic program (:func:`diffalign.losses.marble.marble_weights`) and returns ``Σ_k w_k L_k``, whose one
backward is MARBLE's update ``(Σ_k α_k ĝ_k)·mean_k ||g_k||`` — ``K + 1`` backward passes in all, and under DDP the
last one is the ordinary all-reduced backward. The coefficients are smoothed, ``α ← ρ·α + (1 − ρ)·α_new``, and the
smoothed ones blend the advantages on the other (amortised, DiffusionNFT only) micro-batches, ``A = Σ_k α_k A_k``.
The smoothed coefficients are trainer state: checkpointed with the run, so a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

from diffalign.losses.marble import blend_advantages, gradient_cosines, marble_weights, smooth_coefficients


class RewardBalance:
    """MARBLE's coefficients for rewards ``names`` over ``params()`` (the trained parameters), or
    (``marble=False``) only the diagnostics of the weighted sum."""

    def __init__(
        self,
        names: Sequence[str],
        params: Callable[[], Sequence[torch.nn.Parameter]],
        accelerator: Accelerator,
        *,
        marble: bool,
        rho: float = 0.7,
        floor: float = 0.0,
    ) -> None:
        self.names = list(names)
        self.params = params  # called at each solve: the parameters may be re-wrapped after the trainer builds
        self.accelerator = accelerator
        self.marble = marble
        self.rho = rho
        self.floor = floor
        self.alpha: Tensor | None = None  # the smoothed coefficients (None until the first solve)

    # -- checkpointed state (JSON in the trainer state; float64 survives the round trip as Python floats) ---------
    def state_dict(self) -> dict[str, Any]:
        return {"alpha": None if self.alpha is None else self.alpha.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        alpha = state.get("alpha")
        self.alpha = None if alpha is None else torch.tensor(alpha, dtype=torch.float64)

    # -- the two forms ---------------------------------------------------------------------------------------
    def coefficients(self) -> Tensor:
        """The smoothed α (uniform before the first solve)."""
        k = len(self.names)
        return self.alpha if self.alpha is not None else torch.full((k,), 1.0 / k, dtype=torch.float64)

    def blend(self, advantages: Tensor) -> Tensor:
        """The amortised form's advantage ``Σ_k α_k A_k`` (``advantages`` (N, K)) with the smoothed α."""
        return blend_advantages(advantages, self.coefficients().to(advantages.device, advantages.dtype))

    def _global_gradients(self, losses: Sequence[Tensor]) -> Tensor:
        """``(K, P)``: each loss's gradient over the trained parameters, averaged over processes."""
        rows = []
        for loss in losses:
            params = list(self.params())
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            flat = [
                (torch.zeros_like(p) if g is None else g).reshape(-1).float()
                for p, g in zip(params, grads, strict=True)
            ]
            rows.append(torch.cat(flat))
        grads = torch.stack(rows)
        if self.accelerator.num_processes > 1:
            grads = self.accelerator.reduce(grads, reduction="mean")
        return grads

    def balanced_loss(self, losses: Sequence[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """MARBLE's full step: ``Σ_k w_k L_k`` (its gradient is the balanced update) and the logged α_k, the
        per-reward gradient norms and each ``cos(g_k, update)``."""
        step = marble_weights(self._global_gradients(losses), floor=self.floor)
        self.alpha = smooth_coefficients(self.alpha, step.alpha.double().cpu(), self.rho)
        weights = step.weights.to(losses[0].device, losses[0].dtype)
        loss = sum(w * loss_k for w, loss_k in zip(weights, losses, strict=True))
        return loss, self._metrics(step.cosines, step.norms, step.alpha)

    def diagnose(self, losses: Sequence[Tensor], update_loss: Tensor) -> dict[str, Tensor]:
        """Under the weighted sum: each reward's gradient cosine with the update the trainer takes (the gradient of
        ``update_loss``), ``K + 1`` extra backward passes; the paper's diagnostic."""
        grads = self._global_gradients([*losses, update_loss])
        return self._metrics(gradient_cosines(grads[:-1], grads[-1]), grads[:-1].norm(dim=1), None)

    def _metrics(self, cosines: Tensor, norms: Tensor, alpha: Tensor | None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for k, name in enumerate(self.names):
            out[f"balance/cos_{name}"] = cosines[k].float().reshape(1)
            out[f"balance/grad_norm_{name}"] = norms[k].float().reshape(1)
            if alpha is not None:
                out[f"balance/alpha_{name}"] = alpha[k].float().reshape(1)
                out[f"balance/alpha_smoothed_{name}"] = self.alpha[k].float().reshape(1)
        out["balance/cos_min"] = cosines.min().float().reshape(1)
        return {k: v.detach().cpu() for k, v in out.items()}
