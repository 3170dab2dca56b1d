"""The rectified-flow layer every flow transformer shares (SD3 / SD3.5, FLUX.1, the toy flow model):

    x_t    = (1 − σ)·x0 + σ·ε                    (FlowMatchEulerDiscreteScheduler.scale_noise)
    target = v = ε − x0
    L(x)   = mean_{c,h,w} (v_θ(x_t, t, c) − v)²   (fp32)

with σ ∈ (0, 1] and the scheduler's timestep ``t = σ·T``. Latents stay ``(B, C, H, W)`` everywhere (noise, MSE,
trajectories); a backbone that feeds its transformer tokens (FLUX's 2×2 patches) packs and unpacks inside its own
denoiser call, so the per-sample MSE is the same mean over the same elements.

Training timesteps are drawn from the SD3 / FLUX training density (``compute_density_for_timestep_sampling``:
logit-normal with mean 0 and std 1 by default, or ``mode`` / ``uniform``) and mapped onto the scheduler's discrete
schedule exactly as diffusers' ``train_dreambooth_sd3.py`` and ``train_dreambooth_flux.py`` do: ``index = int(u·T)``,
``t = scheduler.timesteps[index]``, ``σ = t / T``. The training schedule is the scheduler config's: shifted by its
``shift`` (3.0 for SD3), unshifted for a scheduler with ``use_dynamic_shifting`` (FLUX), as in those scripts. Each
pair index has its own generator, so a pair shares its timestep.

Sampling (:meth:`FlowMatchingAdapter.sampling_schedule`) follows each pipeline: ``StableDiffusion3Pipeline`` lets
``set_timesteps(steps)`` space the sigmas, ``FluxPipeline`` passes ``linspace(1, 1/steps, steps)``
(:meth:`~FlowMatchingAdapter.pipeline_sigmas`; ``ZImagePipeline`` its float32 ``torch.linspace``); the scheduler
then applies its static shift, or with
``use_dynamic_shifting`` the shift ``mu = calculate_shift(image_seq_len, base_image_seq_len, max_image_seq_len,
base_shift, max_shift)`` from the image token count, as both pipelines compute it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling
from torch import Tensor

from diffalign.models.diffusion import DiffusionAdapter, unwrap
from diffalign.utils.randomness import TIMESTEP, sample_generator

if TYPE_CHECKING:
    from diffalign.models.backbones import Backbone

TIMESTEP_DENSITIES = ("logit_normal", "mode", "uniform")


class FlowMatchingAdapter(DiffusionAdapter):
    """A transformer trained by rectified flow matching on a ``FlowMatchEulerDiscreteScheduler`` (see the module
    docstring); subclasses supply text conditioning and the transformer call (:meth:`_denoise`).

    ``uses_cfg``: whether sampling may use classifier-free guidance (FLUX.1-dev is guidance-distilled: its guidance
    is an embedding, and CFG on top is an error). Subclasses take the training-density keywords (``timestep_density``,
    ``logit_mean``, ``logit_std``, ``mode_scale``) as ``**training`` and pass them here."""

    uses_cfg = True
    denoiser_subfolder = "transformer"

    def __init__(
        self,
        transformer: torch.nn.Module,
        scheduler: FlowMatchEulerDiscreteScheduler,
        *,
        vae: AutoencoderKL | None = None,
        timestep_density: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
    ) -> None:
        super().__init__(transformer, vae=vae)
        if timestep_density not in TIMESTEP_DENSITIES:
            raise ValueError(f"timestep_density={timestep_density!r}: expected one of {TIMESTEP_DENSITIES}")
        # a private copy: set_timesteps during sampling elsewhere must not change the training schedule
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        self.timestep_density = timestep_density
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def prediction_type(self) -> str:
        return "flow"

    # ----- timesteps and noising -----

    def sample_timesteps(
        self, seed: int, epoch: int, indices: Sequence[int], *, device: torch.device | str | None = None
    ) -> Tensor:
        """Training timesteps ``t = scheduler.timesteps[int(u·T)]`` (float32, (N,)), one per index, ``u`` from the
        configured density drawn with the index's own TIMESTEP-stream generator. With a ``timestep_range`` narrower
        than (0, 1) the density is truncated: an index redraws from its generator until ``t / T`` falls in the
        range (the full range accepts the first draw, so the default draws are unchanged)."""
        index = torch.tensor([self._draw_index(sample_generator(seed, epoch, int(i), TIMESTEP)) for i in indices])
        timesteps = self.scheduler.timesteps[index].float()
        return timesteps.to(self.device if device is None else device)

    def _draw_index(self, generator: torch.Generator, max_draws: int = 10_000) -> int:
        lo, hi = self.timestep_range
        total = self.num_train_timesteps
        for _ in range(max_draws):
            u = compute_density_for_timestep_sampling(
                self.timestep_density,
                1,
                logit_mean=self.logit_mean,
                logit_std=self.logit_std,
                mode_scale=self.mode_scale,
                generator=generator,
            )
            index = int((u * total).long().clamp(0, total - 1))
            if lo <= float(self.scheduler.timesteps[index]) / total <= hi:
                return index
        raise ValueError(
            f"model.min/max_timestep_fraction {lo}..{hi}: no training timestep drawn in range after {max_draws} "
            f"draws of the {self.timestep_density} density; widen the range"
        )

    def sigmas(self, timesteps: Tensor) -> Tensor:
        """σ = t / T (float32, (N,)): the scheduler's sigma at each of its own timesteps."""
        return timesteps.float() / self.num_train_timesteps

    def _sigma_like(self, timesteps: Tensor, like: Tensor) -> Tensor:
        return self.sigmas(timesteps).to(like.device).reshape(-1, *([1] * (like.ndim - 1)))

    def noise_coefficients(self, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """``(1 − σ, σ)``, float32 ``(N,)``."""
        sigma = self.sigmas(timesteps)
        return 1.0 - sigma, sigma

    def training_grid(self) -> Tensor:
        """The scheduler's ``T`` training timesteps (descending; float32)."""
        return self.scheduler.timesteps.float().to(self.device)

    def clean_and_noise(self, x_t: Tensor, prediction: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """``x̂0 = x_t − σ·v``, ``ε̂ = x_t + (1 − σ)·v``."""
        sigma = self._sigma_like(timesteps, x_t)
        x_t, prediction = x_t.float(), prediction.float()
        return x_t - sigma * prediction, x_t + (1.0 - sigma) * prediction

    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t = (1 − σ)·x0 + σ·ε in float32."""
        sigma = self._sigma_like(timesteps, x0)
        return (1.0 - sigma) * x0.float() + sigma * noise.float()

    def target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The flow-matching velocity v = ε − x0 (float32); it does not depend on the timestep."""
        return noise.float() - x0.float()

    # ----- text -----

    #: The backbone's diffusers pipeline class and the adapter attributes it takes (text encoders, tokenizers), for
    #: :meth:`text_pipeline`.
    text_pipeline_class: type | None = None
    text_components: tuple[str, ...] = ("text_encoder", "tokenizer")

    #: The most text tokens the backbone's pipeline takes (``None``: no limit).
    max_text_tokens: int | None = None

    def hold_text(self, max_sequence_length: int, **parts: Any) -> None:
        """Keep the text encoders and tokenizers ``parts`` (:attr:`text_components`) as attributes, the encoders
        frozen, and the text length, checked against :attr:`max_text_tokens`."""
        limit = self.max_text_tokens
        if max_sequence_length < 1 or (limit is not None and max_sequence_length > limit):
            raise ValueError(
                f"max_sequence_length={max_sequence_length}: {type(self).__name__} takes 1 to {limit or 'any'} "
                "text tokens"
            )
        for name, part in parts.items():
            setattr(self, name, part)
            if isinstance(part, torch.nn.Module):
                part.requires_grad_(False)
        self.max_sequence_length = int(max_sequence_length)

    def frozen_modules(self) -> list[torch.nn.Module]:
        """The VAE and the text encoders among :attr:`text_components`."""
        parts = (self.vae, *(getattr(self, name, None) for name in self.text_components))
        return [m for m in parts if isinstance(m, torch.nn.Module)]

    def text_pipeline(self) -> Any:
        """The backbone's pipeline holding only the scheduler and :attr:`text_components` (no VAE, no transformer),
        built once: the adapter encodes prompts with its own ``encode_prompt``, so conditioning cannot drift from
        diffusers'."""
        if getattr(self, "_text_pipeline", None) is None:
            parts = {name: getattr(self, name) for name in self.text_components}
            missing = [name for name, part in parts.items() if part is None]
            if missing or self.text_pipeline_class is None:
                raise RuntimeError(
                    f"{type(self).__name__} needs {', '.join(missing) or 'a pipeline'} to encode prompts"
                )
            pipe = self.text_pipeline_class(scheduler=self.scheduler, vae=None, transformer=None, **parts)
            pipe.set_progress_bar_config(disable=True)
            self._text_pipeline = pipe
        return self._text_pipeline

    # ----- sampling -----

    @staticmethod
    def linspace_sigmas(steps: int) -> Sequence[float]:
        """``linspace(1, 1/S, S)`` in float64, as ``FluxPipeline.__call__`` and ``QwenImagePipeline.__call__`` build
        their sigmas."""
        return np.linspace(1.0, 1 / steps, steps)

    #: Latent 2×2 patches per image token when the backbone packs them itself (FLUX, Qwen-Image, Z-Image): the image
    #: sides must then be multiples of 2 × the VAE factor; ``packed_channels`` says whether the transformer's
    #: ``in_channels`` counts a packed token's 4·C values (FLUX, Qwen-Image) or the latent's C (Z-Image).
    token_patch: int | None = None
    packed_channels = False

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of ``x0`` for images of ``height`` × ``width`` pixels (see :attr:`token_patch`)."""
        if self.token_patch is None:
            return super().latent_shape(height, width)
        factor, patch = self.vae_scale_factor, self.token_patch
        if height % (patch * factor) or width % (patch * factor):
            raise ValueError(
                f"image size {height}x{width} must be divisible by {patch} x the VAE scale factor {factor}"
            )
        channels = int(unwrap(self.denoiser).config.in_channels) // (patch * patch if self.packed_channels else 1)
        return channels, height // factor, width // factor

    def image_seq_len(self, height: int, width: int) -> int:
        """How many image tokens the transformer sees for a ``height`` × ``width`` image (what the pipelines compute
        ``mu`` from): the latent positions over :attr:`token_patch`, else over the transformer's ``patch_size``."""
        _, h, w = self.latent_shape(height, width)
        patch = self.token_patch or int(getattr(unwrap(self.denoiser).config, "patch_size", 1) or 1)
        return (h // patch) * (w // patch)

    def pipeline_sigmas(self, steps: int) -> Sequence[float] | None:
        """The unshifted sigmas the backbone's pipeline hands its scheduler for ``steps`` steps, or None when it lets
        ``set_timesteps(steps)`` space them (``StableDiffusion3Pipeline``). ``FluxPipeline`` and ``QwenImagePipeline``
        pass ``linspace(1, 1/S, S)``; a pipeline that builds them otherwise overrides this."""
        return None

    def sampling_schedule(self, steps: int, height: int, width: int | None = None) -> tuple[Tensor, Tensor]:
        """``(timesteps (S,), sigmas (S + 1,))`` of an S-step sampler at this image size, as the backbone's pipeline
        sets them (see the module docstring); float32 on the CPU."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        kwargs: dict = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = calculate_shift(
                self.image_seq_len(height, width or height),
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.15),
            )
        sigmas = self.pipeline_sigmas(steps)
        if sigmas is not None:
            scheduler.set_timesteps(sigmas=sigmas, **kwargs)
        else:
            scheduler.set_timesteps(steps, **kwargs)
        return scheduler.timesteps.float().cpu(), scheduler.sigmas.float().cpu()


def check_flow_prediction(prediction_type: str | None, label: str) -> None:
    """A flow backbone predicts the velocity: ``model.prediction_type`` may only be ``None`` or ``"flow"``."""
    if prediction_type not in (None, "flow"):
        raise ValueError(f"prediction_type={prediction_type!r} does not apply to {label} (a flow-matching model)")


def register_flow_backbone(
    name: str,
    build: Callable[..., FlowMatchingAdapter],
    required: tuple[str, ...],
    transformer_class: str,
    lora_targets: tuple[str, ...],
) -> Backbone:
    """Register a flow transformer recognised by its transformer's class name (``model_index.json`` or its
    ``config.json``), above SD3's rule (which takes any ``transformer``), with the built-in cache fields."""
    from diffalign.models.backbones import BUILTIN_CACHE_OPTIONS, Backbone, register_backbone  # it imports us

    def detect(components: Mapping[str, Any]) -> bool:
        return components.get("transformer") == transformer_class

    detect.__doc__ = f"A pipeline whose transformer is a ``{transformer_class}``."
    entry = Backbone(
        name=name,
        build=build,
        required=required,
        detect=detect,
        priority=30,
        lora_targets=lora_targets,
        cache_options=BUILTIN_CACHE_OPTIONS,
    )
    return register_backbone(entry)


__all__ = ["TIMESTEP_DENSITIES", "FlowMatchingAdapter", "check_flow_prediction", "register_flow_backbone"]
