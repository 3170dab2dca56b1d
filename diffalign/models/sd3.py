"""SD3 adapter: an MMDiT ``SD3Transformer2DModel`` trained by rectified flow matching.

Quantities (diffusers' ``train_dreambooth_sd3.py``, flow_grpo's ``train_sd3_dpo.py``; research/offline_diffusion.md
§5.5), with σ ∈ (0, 1] and the transformer's timestep ``t = σ·T``:

    x_t    = (1 − σ)·x0 + σ·ε                    (FlowMatchEulerDiscreteScheduler.scale_noise)
    target = v = ε − x0
    L(x)   = mean_{c,h,w} (v_θ(x_t, t, c) − v)²   (fp32)

Timesteps are drawn from SD3's training density (``compute_density_for_timestep_sampling``: logit-normal with mean 0
and std 1 by default, or ``mode`` / ``uniform``) and mapped onto the scheduler's discrete, shifted schedule exactly as
diffusers does: ``index = int(u·T)``, ``t = scheduler.timesteps[index]``, ``σ = t / T``. The shift is the scheduler
config's (3.0 for SD3 / SD3.5). Each pair index has its own generator, so a pair shares its timestep.

Text conditioning is ``StableDiffusion3Pipeline.encode_prompt``: ``hidden_states[-2]`` of CLIP-L and CLIP-G,
concatenated on features and zero-padded to the T5 width, then concatenated on the sequence axis with the T5
embeddings — or, without T5, with zeros of shape (N, ``max_sequence_length``, ``joint_attention_dim``) as diffusers
uses; ``pooled_projections`` = both CLIPs' projected pooled outputs concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.training_utils import compute_density_for_timestep_sampling
from torch import Tensor

from diffalign.models.diffusion import DiffusionAdapter, unwrap
from diffalign.utils.randomness import TIMESTEP, sample_generator

TIMESTEP_DENSITIES = ("logit_normal", "mode", "uniform")


class SD3Adapter(DiffusionAdapter):
    """Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel`` + ``FlowMatchEulerDiscreteScheduler`` (+ VAE, 2–3 text
    encoders). Without a VAE the transformer works on pixels (the toy flow model)."""

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        *,
        vae: AutoencoderKL | None = None,
        text_encoder: torch.nn.Module | None = None,
        text_encoder_2: torch.nn.Module | None = None,
        text_encoder_3: torch.nn.Module | None = None,
        tokenizer: Any | None = None,
        tokenizer_2: Any | None = None,
        tokenizer_3: Any | None = None,
        reference_denoiser: torch.nn.Module | None = None,
        max_sequence_length: int = 77,
        timestep_density: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
    ) -> None:
        super().__init__(transformer, reference_denoiser=reference_denoiser)
        if timestep_density not in TIMESTEP_DENSITIES:
            raise ValueError(f"timestep_density={timestep_density!r}: expected one of {TIMESTEP_DENSITIES}")
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length={max_sequence_length}: must be positive")
        # a private copy: set_timesteps during sampling elsewhere must not change the training schedule
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        self.vae = vae
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = text_encoder, text_encoder_2, text_encoder_3
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        self.max_sequence_length = max_sequence_length
        self.timestep_density = timestep_density
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        for frozen in (vae, text_encoder, text_encoder_2, text_encoder_3):
            if frozen is not None:
                frozen.requires_grad_(False)

    denoiser_subfolder = "transformer"
    pipeline_class_name = "StableDiffusion3Pipeline"

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.vae, *self._text_modules()) if m is not None]

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def prediction_type(self) -> str:
        return "flow"

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of ``x0`` for images of ``height`` × ``width`` pixels."""
        factor = self.vae_scale_factor
        if height % factor or width % factor:
            raise ValueError(f"image size {height}x{width} must be divisible by the VAE scale factor {factor}")
        return int(unwrap(self.denoiser).config.in_channels), height // factor, width // factor

    def to(self, device: torch.device | str) -> SD3Adapter:
        """Move every held module to ``device``; dtypes are kept."""
        for module in (self.denoiser, self.reference_denoiser, self.vae, *self._text_modules()):
            if module is not None:
                module.to(device)
        return self

    def _text_modules(self) -> tuple[torch.nn.Module | None, ...]:
        return self.text_encoder, self.text_encoder_2, self.text_encoder_3

    # ----- timesteps and noising -----

    def sample_timesteps(
        self, seed: int, epoch: int, indices: Sequence[int], *, device: torch.device | str | None = None
    ) -> Tensor:
        """SD3 training timesteps ``t = scheduler.timesteps[int(u·T)]`` (float32, (N,)), one per index, ``u`` from
        the configured density drawn with the index's own TIMESTEP-stream generator."""
        u = torch.cat(
            [
                compute_density_for_timestep_sampling(
                    self.timestep_density,
                    1,
                    logit_mean=self.logit_mean,
                    logit_std=self.logit_std,
                    mode_scale=self.mode_scale,
                    generator=sample_generator(seed, epoch, int(i), TIMESTEP),
                )
                for i in indices
            ]
        )
        index = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        timesteps = self.scheduler.timesteps[index].float()
        return timesteps.to(self.device if device is None else device)

    def sigmas(self, timesteps: Tensor) -> Tensor:
        """σ = t / T (float32, (N,)): the scheduler's sigma at each of its own timesteps."""
        return timesteps.float() / self.num_train_timesteps

    def _sigma_like(self, timesteps: Tensor, like: Tensor) -> Tensor:
        return self.sigmas(timesteps).to(like.device).reshape(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t = (1 − σ)·x0 + σ·ε in float32."""
        sigma = self._sigma_like(timesteps, x0)
        return (1.0 - sigma) * x0.float() + sigma * noise.float()

    def target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The flow-matching velocity v = ε − x0 (float32); it does not depend on the timestep."""
        return noise.float() - x0.float()

    # ----- encoders -----

    def _tokenize(self, tokenizer: Any, prompts: list[str], max_length: int) -> Tensor:
        return tokenizer(
            list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        ).input_ids

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{"encoder_hidden_states": (N, 77 + max_sequence_length, D), "pooled_projections": (N, P)}``."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}")
        clips = [(self.text_encoder, self.tokenizer), (self.text_encoder_2, self.tokenizer_2)]
        if any(enc is None or tok is None for enc, tok in clips):
            raise RuntimeError("SD3Adapter needs text_encoder/tokenizer and text_encoder_2/tokenizer_2 (load_adapter)")
        hidden, pooled = [], []
        for encoder, tokenizer in clips:
            ids = self._tokenize(tokenizer, prompts, tokenizer.model_max_length)
            out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        clip_embeds = torch.cat(hidden, dim=-1)
        joint_dim = int(unwrap(self.denoiser).config.joint_attention_dim)
        if self.text_encoder_3 is None:
            t5 = torch.zeros(
                len(prompts), self.max_sequence_length, joint_dim, dtype=clip_embeds.dtype, device=clip_embeds.device
            )
        else:
            if self.tokenizer_3 is None:
                raise RuntimeError("SD3Adapter has text_encoder_3 but no tokenizer_3")
            ids = self._tokenize(self.tokenizer_3, prompts, self.max_sequence_length)
            t5 = self.text_encoder_3(ids.to(next(self.text_encoder_3.parameters()).device))[0]
            t5 = t5.to(device=clip_embeds.device, dtype=clip_embeds.dtype)
        clip_embeds = F.pad(clip_embeds, (0, t5.shape[-1] - clip_embeds.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip_embeds, t5], dim=-2),
            "pooled_projections": torch.cat(pooled, dim=-1),
        }

    @torch.no_grad()
    def encode_images(self, pixels: Tensor, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """``(z − shift_factor)·scaling_factor`` of pixels in [-1, 1] (posterior mean without ``generator``);
        the identity in pixel space."""
        if pixels.ndim != 4:
            raise ValueError(f"pixels must have shape (N, C, H, W), got {tuple(pixels.shape)}")
        if self.vae is None:
            return pixels
        param = next(self.vae.parameters())
        posterior = self.vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist
        latents = posterior.mode() if generator is None else posterior.sample(generator)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Inverse of :meth:`encode_images`."""
        if self.vae is None:
            return latents
        param = next(self.vae.parameters())
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = latents.to(device=param.device, dtype=param.dtype) / self.vae.config.scaling_factor + shift
        return self.vae.decode(latents).sample

    def _denoise(self, model: torch.nn.Module, x_t: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        missing = {"encoder_hidden_states", "pooled_projections"} - set(cond)
        if missing:
            raise KeyError(f"SD3 conditioning is missing {sorted(missing)}; got keys {sorted(cond)}")
        param = next(unwrap(model).parameters())
        for key in ("encoder_hidden_states", "pooled_projections"):
            if cond[key].shape[0] != x_t.shape[0]:
                raise ValueError(f"{key} has {cond[key].shape[0]} rows but x_t has {x_t.shape[0]}; one per sample")
        return model(
            hidden_states=x_t.to(device=param.device, dtype=param.dtype),
            timestep=timesteps.to(param.device),
            encoder_hidden_states=cond["encoder_hidden_states"].to(device=param.device, dtype=param.dtype),
            pooled_projections=cond["pooled_projections"].to(device=param.device, dtype=param.dtype),
            return_dict=False,
        )[0]
