"""Backbone adapters: a diffusion model and a batch in, per-sample denoising tensors out.

Every offline preference objective for diffusion models (Diffusion-DPO, MaPO, DCPO, Diffusion-KTO, SFT) consumes the
same quantity, the per-sample denoising error at one noise draw and one timestep (as in
``SalesforceAIResearch/DiffusionDPO`` ``train.py`` and diffusers' ``train_diffusion_dpo.py``):

    x_t  = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε                       (DDPMScheduler.add_noise)
    L(x) = mean_{c,h,w} (f_θ(x_t, t, c) − target)²               (fp32, whatever the model dtype)
    target = ε (epsilon models) or v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x0 (v-prediction)
    logp = −0.5 · L                                               (the project's log-likelihood surrogate)

:class:`DiffusionAdapter` holds the backbone-independent parts (addressable noise and timesteps, the fp32 MSE, the
paired 2B forward); a subclass per backbone family supplies prompt/image encoding, the noising rule, the target and one
denoiser call. :class:`SDAdapter` covers SD 1.x/2.x (``UNet2DConditionModel`` + ``DDPMScheduler``), in latent space
with an ``AutoencoderKL`` or directly in pixel space without one.

An adapter evaluates one network, its ``denoiser``. Which network is the reference is the trainer's decision
(:mod:`diffalign.trainers.reference`); the trainer evaluates the network it picked through
:meth:`DiffusionAdapter.with_denoiser`.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import compute_snr
from torch import Tensor

from diffalign.models.reference import unwrap
from diffalign.utils.randomness import NOISE, TIMESTEP, per_sample_normal, per_sample_randint

PREDICTION_TYPES = ("epsilon", "v_prediction")


class DiffusionAdapter(ABC):
    """Backbone-independent surface shared by the SD, SDXL and SD3 adapters.

    Attributes:
        denoiser: the network the adapter evaluates. A trainer may replace it with an accelerate-wrapped one; the
            adapter always calls it as given and unwraps it only to read its config, device and dtype.
        vae: the ``AutoencoderKL`` between pixels and the denoiser's space, or ``None`` in pixel space.
    """

    # training timesteps are drawn with t / T in [lo, hi] (model.min/max_timestep_fraction; the density truncated)
    timestep_range: tuple[float, float] = (0.0, 1.0)

    def __init__(self, denoiser: torch.nn.Module, *, vae: AutoencoderKL | None = None) -> None:
        self.denoiser = denoiser
        self.vae = vae
        if vae is not None:
            vae.requires_grad_(False)

    # ----- backbone-specific parts -----

    @property
    @abstractmethod
    def num_train_timesteps(self) -> int:
        """Number T of discrete training timesteps; timesteps are drawn from {0, ..., T-1}."""

    @property
    @abstractmethod
    def prediction_type(self) -> str:
        """What the denoiser predicts, e.g. ``"epsilon"`` or ``"v_prediction"``."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """Text conditioning for ``prompts``, every tensor with first dimension ``len(prompts)``; no grad."""

    @abstractmethod
    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The forward process sample ``x_t`` for clean ``x0``, noise ``ε`` and per-sample ``timesteps``."""

    @abstractmethod
    def target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The regression target of the denoiser at ``x_t = add_noise(x0, noise, timesteps)``."""

    @abstractmethod
    def _denoise(self, model: torch.nn.Module, x_t: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """One forward of ``model`` (the adapter's denoiser)."""

    #: subfolder of the denoiser in a diffusers pipeline folder, and the pipeline class that loads its LoRA files
    denoiser_subfolder = "unet"
    pipeline_class_name = "StableDiffusionPipeline"

    def frozen_modules(self) -> list[torch.nn.Module]:
        """The frozen encoders the adapter holds (VAE, text encoders), for device / dtype placement."""
        return []

    def unused_modules(self) -> tuple[str, ...]:
        """Full names of denoiser modules whose outputs never reach the prediction (so they never get a gradient):
        LoRA leaves them out and a full fine-tune freezes them, since DDP wants a gradient for every trained
        parameter. Empty for most backbones."""
        return ()

    @abstractmethod
    def noise_coefficients(self, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """``(a_t, b_t)``, float32 ``(N,)``, with ``add_noise(x0, ε, t) = a_t·x0 + b_t·ε``."""

    @abstractmethod
    def training_grid(self) -> Tensor:
        """The ``T`` training timesteps from the noisiest to the cleanest (the order of ``scheduler.timesteps``)."""

    @abstractmethod
    def clean_and_noise(self, x_t: Tensor, prediction: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """``(x̂0, ε̂)`` in float32 implied by the denoiser's ``prediction`` at ``x_t`` (so that
        ``add_noise(x̂0, ε̂, t) == x_t``)."""

    def x0_error_scale(self, timesteps: Tensor) -> Tensor:
        """``c_t``, float32 ``(N,)``, with ``x̂0(prediction) − x0 = c_t·(target − prediction)`` at ``x_t``: the clean
        estimate is affine in the prediction, so ``c_t = −∂x̂0/∂prediction``, read off :meth:`clean_and_noise`
        (flow: ``σ``; ε-prediction: ``sqrt(1 − ᾱ)/sqrt(ᾱ)``; v-prediction: ``sqrt(1 − ᾱ)``). DiffusionNFT's
        x0-space weighting takes it as its ``σ``."""
        n = timesteps.shape[0]
        zeros = torch.zeros(n, 1, device=timesteps.device)
        return -self.clean_and_noise(zeros, torch.ones_like(zeros), timesteps)[0][:, 0]

    def batch_conditioning(self, batch: Mapping[str, Any], resolution: int) -> dict[str, Tensor]:
        """Per-sample conditioning that comes from the data rather than the prompt (SDXL's ``time_ids``), each
        tensor (B, ...), shared by both images of a pair; empty for backbones without any."""
        return {}

    def snr_weights(self, timesteps: Tensor, gamma: float, mode: str = "min_snr") -> Tensor:
        """Per-sample SNR-based weights ω(t) on the MSE (see :meth:`SDAdapter.snr_weights`); (N,)."""
        raise NotImplementedError(f"{type(self).__name__} does not define SNR weights; set loss.weighting=constant")

    # ----- the VAE (or pixel space) -----

    @property
    def vae_scale_factor(self) -> int:
        """Spatial downsampling of the VAE, 2^(levels − 1); 1 in pixel space."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of ``x0`` for images of ``height`` × ``width`` pixels."""
        factor = self.vae_scale_factor
        if height % factor or width % factor:
            raise ValueError(f"image size {height}x{width} must be divisible by the VAE scale factor {factor}")
        return int(unwrap(self.denoiser).config.in_channels), height // factor, width // factor

    def to(self, device: torch.device | str) -> DiffusionAdapter:
        """Move every held module (denoiser, VAE, text encoders) to ``device``; dtypes are kept."""
        for module in (self.denoiser, *self.frozen_modules()):
            module.to(device)
        return self

    @torch.no_grad()
    def encode_images(self, pixels: Tensor, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """Latents ``(z − shift_factor) · scaling_factor`` of pixels in [-1, 1] (N, 3, H, W) (SD: no shift; SD3: its
        VAE's shift); identity in pixel space.

        With ``generator`` (one, or a list with one per image for addressable draws) ``z`` is a sample of the VAE
        posterior, as every reference training script does (``latent_dist.sample()``). With ``generator=None`` ``z``
        is the posterior mean: deterministic, suited to a latent cache, but not what the scripts do.
        Returned in the VAE's dtype on its device, in the standard (NCHW-contiguous) layout.
        """
        if pixels.ndim != 4:
            raise ValueError(f"pixels must have shape (N, C, H, W), got {tuple(pixels.shape)}")
        if self.vae is None:
            return pixels
        param = next(self.vae.parameters())
        posterior = self.vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist
        latents = posterior.mode() if generator is None else posterior.sample(generator)
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift is not None:
            latents = latents - shift
        # contiguous: a channels_last VAE returns NHWC latents, which would carry its layout into the denoiser
        return (latents * self.vae.config.scaling_factor).contiguous()

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Pixels (N, 3, H, W), nominally in [-1, 1], of latents ``x0``: the inverse of :meth:`encode_images`,
        ``vae.decode(x0 / scaling_factor + shift_factor)`` (SD: no shift), in the VAE's dtype; the identity in pixel
        space. Keeps gradients (reward back-propagation decodes through it). A backbone with its own latent
        normalisation overrides this together with :meth:`encode_images`."""
        if self.vae is None:
            return latents
        vae = self.vae
        param = next(vae.parameters())
        z = latents.to(device=param.device, dtype=param.dtype) / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            z = z + shift
        return vae.decode(z).sample

    # ----- shared parts -----

    @property
    def device(self) -> torch.device:
        """Device of the denoiser's parameters."""
        return next(unwrap(self.denoiser).parameters()).device

    def sample_timesteps(
        self, seed: int, epoch: int, indices: Sequence[int], *, device: torch.device | str | None = None
    ) -> Tensor:
        """Uniform integer timesteps t ~ U{lo, ..., hi-1}, one per sample index, from its own TIMESTEP-stream
        generator, with ``lo = round(timestep_range[0]·T)``, ``hi = round(timestep_range[1]·T)`` (default {0..T-1}).

        The draw for an index depends only on (seed, epoch, index), so it does not change with batching, the number
        of processes or resumption. Returns int64 of shape (len(indices),) on ``device`` (default: the denoiser's).
        """
        total = self.num_train_timesteps
        lo, hi = (round(f * total) for f in self.timestep_range)
        hi = max(hi, lo + 1)
        timesteps = per_sample_randint(hi - lo, seed, epoch, indices, TIMESTEP) + lo
        return timesteps.to(self.device if device is None else device)

    def sample_noise(
        self,
        shape_per_sample: Sequence[int],
        seed: int,
        epoch: int,
        indices: Sequence[int],
        *,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Standard normal noise of shape (len(indices), *shape_per_sample), float32, from NOISE-stream generators."""
        noise = per_sample_normal(tuple(shape_per_sample), seed, epoch, indices, NOISE)
        return noise.to(self.device if device is None else device)

    def combine_guidance(self, uncond_out: Tensor, cond_out: Tensor, scale: float) -> Tensor:
        """Classifier-free guidance of the unconditional and conditional outputs at guidance scale ``scale``:
        ``u + scale·(c − u)``. A backbone whose pipeline guides differently (Qwen-Image's renormalised true CFG)
        overrides it."""
        return uncond_out + scale * (cond_out - uncond_out)

    def predict(self, x_t: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The denoiser's output at ``x_t`` (in the model's dtype); grad is the caller's business."""
        return self._denoise(self.denoiser, x_t, timesteps, cond)

    def per_sample_mse(self, x0: Tensor, noise: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """L_i = mean_{c,h,w} (f(x_t, t, c) − target)², computed in float32; shape (N,).

        Prediction and target are both cast to float32 before the difference, as diffusers' DPO scripts do (the
        original Diffusion-DPO ``train.py`` takes the reference MSE in fp16, which quantises it).
        """
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal x0 shape {tuple(x0.shape)}")
        if timesteps.shape != (x0.shape[0],):
            raise ValueError(
                f"timesteps must have shape ({x0.shape[0]},), one per sample; got {tuple(timesteps.shape)}"
            )
        x_t = self.add_noise(x0, noise, timesteps)
        target = self.target(x0, noise, timesteps)
        pred = self.predict(x_t, timesteps, cond)
        return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))

    def denoising_logp(self, x0: Tensor, noise: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Log-likelihood surrogate logp_i = −0.5 · L_i (see :meth:`per_sample_mse`); shape (N,), float32."""
        return -0.5 * self.per_sample_mse(x0, noise, timesteps, cond)

    def pair_mse(
        self,
        x0_chosen: Tensor,
        x0_rejected: Tensor,
        cond_chosen: dict[str, Tensor],
        cond_rejected: dict[str, Tensor] | None,
        noise: Tensor,
        timesteps: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Per-sample MSEs (L^w, L^l), each (B,), from ONE denoiser forward of 2B rows.

        Rows 0..B-1 are the winners and rows B..2B-1 the losers; the pair shares ``noise`` (B, ...) and
        ``timesteps`` (B,), which are repeated for the second half (as the Diffusion-DPO scripts do).
        ``cond_rejected=None`` conditions the losers on ``cond_chosen`` (one prompt per pair); DCPO passes each image's
        own caption.
        """
        if x0_chosen.shape != x0_rejected.shape:
            raise ValueError(
                f"x0_chosen {tuple(x0_chosen.shape)} and x0_rejected {tuple(x0_rejected.shape)} must have one shape"
            )
        if noise.shape != x0_chosen.shape:
            raise ValueError(
                f"noise must be shared by the pair, shape {tuple(x0_chosen.shape)} (one draw per pair); "
                f"got {tuple(noise.shape)}"
            )
        batch = x0_chosen.shape[0]
        if timesteps.shape != (batch,):
            raise ValueError(f"timesteps must have shape ({batch},), one per pair; got {tuple(timesteps.shape)}")
        if cond_rejected is None:
            cond_rejected = cond_chosen
        if set(cond_chosen) != set(cond_rejected):
            raise ValueError(
                f"cond_chosen keys {sorted(cond_chosen)} differ from cond_rejected keys {sorted(cond_rejected)}"
            )
        cond = {key: torch.cat([cond_chosen[key], cond_rejected[key]]) for key in cond_chosen}
        mse = self.per_sample_mse(
            torch.cat([x0_chosen, x0_rejected]),
            torch.cat([noise, noise]),
            torch.cat([timesteps, timesteps]),
            cond,
        )
        return mse[:batch], mse[batch:]

    def pair_logps(
        self,
        x0_chosen: Tensor,
        x0_rejected: Tensor,
        cond_chosen: dict[str, Tensor],
        cond_rejected: dict[str, Tensor] | None,
        noise: Tensor,
        timesteps: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """(logp_chosen, logp_rejected) = −0.5 · :meth:`pair_mse`; one forward of 2B, each output (B,), float32."""
        mse_chosen, mse_rejected = self.pair_mse(x0_chosen, x0_rejected, cond_chosen, cond_rejected, noise, timesteps)
        return -0.5 * mse_chosen, -0.5 * mse_rejected

    def with_denoiser(self, module: torch.nn.Module) -> DiffusionAdapter:
        """This adapter evaluating ``module`` instead of its denoiser: a shallow view that shares the encoders, the
        scheduler and the settings (how a trainer runs the reference network its :mod:`~diffalign.trainers.reference`
        strategy picked, or a judge runs another round's denoiser)."""
        view = copy.copy(self)
        view.denoiser = module
        return view


def _gather_per_sample(values: Tensor, timesteps: Tensor, like: Tensor) -> Tensor:
    """values[t] on ``like``'s device, reshaped to (N, 1, ..., 1) so that it broadcasts over ``like``."""
    gathered = values.to(like.device)[timesteps.to(like.device)]
    return gathered.reshape(-1, *([1] * (like.ndim - 1)))


SNR_WEIGHTINGS = ("min_snr", "truncated_snr")


class SDAdapter(DiffusionAdapter):
    """Stable Diffusion 1.x/2.x: ``UNet2DConditionModel`` + ``DDPMScheduler`` (+ ``AutoencoderKL``, CLIP text).

    Without a VAE the model works in pixel space: ``encode_images`` is the identity and latents are the pixels.
    Text conditioning follows the original SD training scripts: ``text_encoder(input_ids)[0]`` (last hidden state,
    no attention mask), prompts padded to ``tokenizer.model_max_length`` and truncated.

    ``prediction_type`` (``"epsilon"`` | ``"v_prediction"``) defaults to the scheduler config's; passing it
    registers the override on the scheduler config, as diffusers' ``--prediction_type`` does. The adapter keeps its own
    ``DDPMScheduler`` rebuilt from the given scheduler's config (the training scripts always train with DDPM's
    schedule), so the caller's scheduler object is never modified.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        scheduler: DDPMScheduler,
        *,
        vae: AutoencoderKL | None = None,
        text_encoder: torch.nn.Module | None = None,
        tokenizer: Any | None = None,
        prediction_type: str | None = None,
    ) -> None:
        super().__init__(unet, vae=vae)
        scheduler = DDPMScheduler.from_config(scheduler.config)  # a private copy: the override must not leak out
        if prediction_type is not None:
            _check_prediction_type(prediction_type)
            scheduler.register_to_config(prediction_type=prediction_type)
        _check_prediction_type(scheduler.config.prediction_type)
        self.scheduler = scheduler
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        if text_encoder is not None:
            text_encoder.requires_grad_(False)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.prediction_type)

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.vae, self.text_encoder) if m is not None]

    def tokenize(self, prompts: list[str]) -> Tensor:
        """CLIP token ids (N, model_max_length): padding "max_length", truncation, no attention mask."""
        if self.tokenizer is None:
            raise RuntimeError("SDAdapter has no tokenizer; pass tokenizer= (or load with load_sd_adapter)")
        prompts = check_prompts(prompts)
        return self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    @torch.no_grad()
    def encode_input_ids(self, input_ids: Tensor) -> dict[str, Tensor]:
        """``{"encoder_hidden_states": text_encoder(input_ids)[0]}``, shape (N, L, D), in the encoder's dtype."""
        if self.text_encoder is None:
            raise RuntimeError("SDAdapter has no text_encoder; pass text_encoder= (or load with load_sd_adapter)")
        device = next(self.text_encoder.parameters()).device
        return {"encoder_hidden_states": self.text_encoder(input_ids.to(device))[0]}

    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{"encoder_hidden_states": (N, L, D)}`` for ``prompts``; no grad."""
        return self.encode_input_ids(self.tokenize(prompts))

    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε in float32, with ᾱ = ``scheduler.alphas_cumprod``.

        Same formula as ``DDPMScheduler.add_noise``, but always evaluated in float32 (that one follows the input dtype).
        """
        alpha_bar = _gather_per_sample(self.scheduler.alphas_cumprod.float(), timesteps, x0)
        return alpha_bar.sqrt() * x0.float() + (1.0 - alpha_bar).sqrt() * noise.float()

    def target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """ε (epsilon models); v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x0 (``DDPMScheduler.get_velocity``, v-prediction)."""
        if self.prediction_type == "epsilon":
            return noise.float()
        alpha_bar = _gather_per_sample(self.scheduler.alphas_cumprod.float(), timesteps, x0)
        return alpha_bar.sqrt() * noise.float() - (1.0 - alpha_bar).sqrt() * x0.float()

    def noise_coefficients(self, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """``(sqrt(ᾱ_t), sqrt(1 − ᾱ_t))``, float32 ``(N,)``."""
        alpha_bar = self.scheduler.alphas_cumprod.float().to(timesteps.device)[timesteps.long()]
        return alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()

    def training_grid(self) -> Tensor:
        """``T − 1, ..., 0`` (int64, on the denoiser's device)."""
        return torch.arange(self.num_train_timesteps - 1, -1, -1, device=self.device)

    def clean_and_noise(self, x_t: Tensor, prediction: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """ε-prediction: ``x̂0 = (x_t − b·ε̂)/a``; v-prediction: ``x̂0 = a·x_t − b·v``, ``ε̂ = a·v + b·x_t``
        (``a² + b² = 1``)."""
        a, b = (c.reshape(-1, *([1] * (x_t.ndim - 1))) for c in self.noise_coefficients(timesteps.to(x_t.device)))
        x_t, prediction = x_t.float(), prediction.float()
        if self.prediction_type == "epsilon":
            return (x_t - b * prediction) / a, prediction
        return a * x_t - b * prediction, a * prediction + b * x_t

    def snr_weights(self, timesteps: Tensor, gamma: float, mode: str = "min_snr") -> Tensor:
        """Per-sample weights ω(t) on the MSE of this backbone's target, float32, shape (N,).

        ``min_snr`` (Hang et al., 2023; diffusers' ``--snr_gamma``): ω = min(SNR, γ)/SNR for ε-prediction and
        min(SNR, γ)/(SNR + 1) for v-prediction; it damps the high-SNR (low-noise) timesteps.
        ``truncated_snr`` (Salimans & Ho, 2022, "truncated SNR", there with γ = 1): the x0-space error weighted by
        max(SNR, γ), i.e. ω = max(SNR, γ)/SNR for ε-prediction and max(SNR, γ)/(SNR + 1) for v-prediction; it
        raises the low-SNR (high-noise) timesteps, where a winner and a loser get almost the same prediction.
        SNR comes from ``diffusers.training_utils.compute_snr``.
        """
        if gamma <= 0:
            raise ValueError(f"snr_gamma={gamma}: must be > 0")
        if mode not in SNR_WEIGHTINGS:
            raise ValueError(f"snr weighting {mode!r}: expected one of {SNR_WEIGHTINGS}")
        snr = compute_snr(self.scheduler, timesteps.to(self.scheduler.alphas_cumprod.device)).float()
        bounded = snr.clamp(max=gamma) if mode == "min_snr" else snr.clamp(min=gamma)
        weights = bounded / snr if self.prediction_type == "epsilon" else bounded / (snr + 1.0)
        return weights.to(timesteps.device)

    def _denoise(self, model: torch.nn.Module, x_t: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        if "encoder_hidden_states" not in cond:
            raise KeyError(f"SD conditioning needs 'encoder_hidden_states'; got keys {sorted(cond)}")
        bare = unwrap(model)
        param = next(bare.parameters())
        hidden = cond["encoder_hidden_states"]
        if hidden.shape[0] != x_t.shape[0]:
            raise ValueError(
                f"encoder_hidden_states has {hidden.shape[0]} rows but x_t has {x_t.shape[0]}; one prompt per sample"
            )
        return model(
            x_t.to(device=param.device, dtype=param.dtype),
            timesteps.to(param.device),
            encoder_hidden_states=hidden.to(device=param.device, dtype=param.dtype),
            return_dict=False,
        )[0]


def check_prompts(prompts: Any) -> list[str]:
    """``prompts`` as a list of str (a single string or a non-string item is a TypeError)."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}")
    return list(prompts)


def check_conditioning(cond: Mapping[str, Tensor], keys: Sequence[str], rows: int, label: str) -> None:
    """``cond`` holds every one of ``keys`` with one row per sample (``rows``); else a KeyError / ValueError naming
    the backbone (``label``) and the key."""
    missing = set(keys) - set(cond)
    if missing:
        raise KeyError(f"{label} conditioning is missing {sorted(missing)}; got keys {sorted(cond)}")
    for key in keys:
        if cond[key].shape[0] != rows:
            raise ValueError(f"{key} has {cond[key].shape[0]} rows but x_t has {rows}; one per sample")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type == "sample":
        raise NotImplementedError(
            "prediction_type 'sample' (x0-prediction) is not supported; use 'epsilon' or 'v_prediction'"
        )
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
