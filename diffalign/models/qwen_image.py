"""Qwen-Image: a ``QwenImageTransformer2DModel`` on the shared flow layer (:mod:`diffalign.models.flow`).

What is Qwen-Image's own, each taken from diffusers' ``pipelines/qwenimage/pipeline_qwenimage.py``
(``QwenImagePipeline``) so that it cannot drift from it:

* **Text conditioning** is ``QwenImagePipeline.encode_prompt`` itself, called on a pipeline that holds only the
  Qwen2.5-VL text encoder and its tokenizer: the last hidden state of the prompt in the pipeline's chat template,
  with the system turn (``prompt_template_encode_start_idx`` tokens) dropped (``_get_qwen_prompt_embeds``). The
  pipeline pads a batch only to its longest prompt and returns no mask when nothing is padded; here every batch is
  padded with zeros to ``model.max_sequence_length`` tokens (``__call__`` passes 512) and carries its 0/1
  ``encoder_hidden_states_mask``, so that the conditioning of different calls (a rollout's prompts and the empty
  negative prompt, a winner's and a loser's caption) concatenates. The transformer masks the padded keys in its
  joint attention, and each text token's RoPE position does not depend on the padding, so a padded row gives the
  unpadded row's prediction up to float rounding. Before each transformer call the columns that no row of the batch
  uses are cut off (as flow_grpo's ``compute_log_prob`` does), so the padding costs no compute. Prompts are
  encoded with ``num_images_per_prompt=1`` (the pipeline's mask rows are misaligned for more than one prompt with
  a larger value); callers repeat prompts themselves.
* **Latents** stay ``(B, C, H, W)``: the 3-D causal VAE (``AutoencoderKLQwenImage``) works on ``(B, C, 1, H, W)``,
  normalised per channel with ``vae.config.latents_mean`` / ``latents_std`` (:meth:`~QwenImageAdapter.encode_images`
  as diffusers' ``train_dreambooth_lora_qwen_image.py``, :meth:`~QwenImageAdapter.decode_latents` as the end of
  ``QwenImagePipeline.__call__``). The VAE factor is ``2 ** len(temperal_downsample)`` (8 on the release). The
  transformer call packs 2×2 patches (``QwenImagePipeline._pack_latents``: ``(B, H/2·W/2, 4C)``, channel-major per
  token), passes ``img_shapes = [[(1, H/2, W/2)]] * B`` and unpacks (``_unpack_latents``), so the image side must
  be a multiple of 2 × the VAE factor (16 on the release).
* **Timesteps** reach the transformer as ``t / 1000``, i.e. σ (``__call__``).
* **Guidance** is true classifier-free guidance with the pipeline's renormalisation
  (:meth:`~QwenImageAdapter.combine_guidance`): ``comb = u + w (c − u)``, then ``comb · ‖c‖ / ‖comb‖`` with the norm
  over each packed token's 4C values. The pipeline runs it only for ``true_cfg_scale > 1`` and a negative prompt;
  here any guidance scale other than 1 runs it (with the sampler's empty negative prompt; flow_grpo passes ``" "``).
  The released model has no guidance embedding (``guidance_embeds=False``), so ``guidance`` is never passed.
* **Sampling sigmas** are the pipeline's ``linspace(1, 1/S, S)`` under the scheduler's dynamic exponential shift,
  ``mu`` from the packed image-token count (:meth:`~QwenImageAdapter.image_seq_len`), then stretched to the
  scheduler's ``shift_terminal`` (0.02 on the release).

Training timesteps follow the flow layer: the configured density over the scheduler's training grid, which a
dynamically shifted scheduler leaves unshifted. diffusers' ``train_dreambooth_lora_qwen_image.py`` defaults to
``weighting_scheme="none"``, i.e. ``model.timestep_density: uniform``.

What cannot match a pipeline run bit for bit: the pipeline keeps its latents in the text encoder's dtype and casts
``t`` to it before ``/ 1000`` (bf16 rounds t = 980.5 to 980); here latents stay float32 and ``t`` takes the
transformer's dtype, so a bf16 model drifts slightly from a bf16 pipeline run (float32 runs agree to 1e-4). The
padded, masked text and the batched ``[uncond; cond]`` forward agree with the pipeline's unpadded, separate calls to
float rounding only.

LoRA targets (:data:`~diffalign.models.tiny_qwen_image.QWEN_IMAGE_LORA_TARGETS`) are both streams of the joint
attention (image ``to_q/k/v``, ``to_out.0``; text ``add_q/k/v_proj``, ``to_add_out``); flow_grpo adds the
feed-forwards ``img_mlp.net.0.proj``, ``img_mlp.net.2``, ``txt_mlp.net.0.proj``, ``txt_mlp.net.2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from torch import Tensor
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from diffalign.models.backbones import backbone_loader
from diffalign.models.components import Source, eval_modules
from diffalign.models.diffusion import check_conditioning, check_prompts, unwrap
from diffalign.models.flow import FlowMatchingAdapter, check_flow_prediction, register_flow_backbone
from diffalign.models.tiny_qwen_image import QWEN_IMAGE_LORA_TARGETS

#: The subfolders a Qwen-Image pipeline folder must have (the VAE is optional here, as for every backbone).
SUBFOLDERS = ("transformer", "scheduler", "text_encoder", "tokenizer")
#: ``QwenImagePipeline.check_inputs`` refuses more text tokens than this.
MAX_TEXT_TOKENS = 1024
#: The transformer's timestep input is t / 1000 (QwenImagePipeline.__call__).
_TIMESTEP_SCALE = 1000.0


def _pack(latents: Tensor) -> Tensor:
    """``(B, C, H, W)`` → ``(B, H/2·W/2, 4C)`` tokens (``QwenImagePipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    return QwenImagePipeline._pack_latents(latents.contiguous(), b, c, h, w)


def _unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """``(B, h/2·w/2, 4C)`` → ``(B, C, h, w)`` for a latent of ``height`` × ``width``
    (``QwenImagePipeline._unpack_latents`` with VAE factor 1, frame axis dropped)."""
    return QwenImagePipeline._unpack_latents(tokens, height, width, 1)[:, :, 0]


class QwenImageAdapter(FlowMatchingAdapter):
    """Qwen-Image (see the module docstring): ``max_sequence_length`` is the fixed text length every conditioning
    is padded to (1..1024; ``QwenImagePipeline.__call__`` cuts at 512)."""

    text_pipeline_class = QwenImagePipeline
    max_text_tokens = MAX_TEXT_TOKENS
    token_patch = 2
    packed_channels = True
    pipeline_class_name = "QwenImagePipeline"

    def pipeline_sigmas(self, steps: int) -> Sequence[float]:
        return self.linspace_sigmas(steps)

    def __init__(
        self,
        transformer: QwenImageTransformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        *,
        vae: AutoencoderKLQwenImage | None = None,
        text_encoder: torch.nn.Module | None = None,
        tokenizer: Any | None = None,
        max_sequence_length: int = 512,
        **training: Any,
    ) -> None:
        super().__init__(transformer, scheduler, vae=vae, **training)
        if getattr(unwrap(transformer).config, "guidance_embeds", False):
            raise ValueError("a guidance-distilled Qwen-Image transformer (guidance_embeds=true) is not supported")
        self.hold_text(max_sequence_length, text_encoder=text_encoder, tokenizer=tokenizer)

    def unused_modules(self) -> tuple[str, ...]:
        """The last block's text-stream output layers: its text output is discarded
        (``QwenImageTransformer2DModel.forward`` keeps only the image tokens after the last block), so they never get
        a gradient."""
        last = f"transformer_blocks.{len(unwrap(self.denoiser).transformer_blocks) - 1}"
        return tuple(f"{last}.{name}" for name in ("attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2"))

    # ----- latents and the VAE -----

    @property
    def vae_scale_factor(self) -> int:
        """``2 ** len(vae.config.temperal_downsample)`` (``QwenImagePipeline.__init__``; 8 without a VAE, as there)."""
        if self.vae is None:
            return 8
        return 2 ** len(self.vae.config.temperal_downsample)

    def _vae_statistics(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(latents_mean, 1 / latents_std)`` of the VAE config, shaped ``(1, z_dim, 1, 1, 1)`` on ``like``."""
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, inv_std

    def _require_vae(self) -> AutoencoderKLQwenImage:
        if self.vae is None:
            raise RuntimeError("QwenImageAdapter has no VAE: load a Qwen-Image folder with its vae/ subfolder")
        return self.vae

    @torch.no_grad()
    def encode_images(self, pixels: Tensor, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """Latents ``(z − latents_mean) / latents_std`` (B, C, h, w) of pixels in [-1, 1] (N, 3, H, W), encoded as one
        frame, as diffusers' ``train_dreambooth_lora_qwen_image.py`` does (``(model_input − latents_mean) ·
        latents_std`` with ``latents_std = 1 / std``). ``generator``: see :meth:`DiffusionAdapter.encode_images`
        (``None`` = the posterior mean). Returned in the VAE's dtype on its device."""
        if pixels.ndim != 4:
            raise ValueError(f"pixels must have shape (N, C, H, W), got {tuple(pixels.shape)}")
        vae = self._require_vae()
        param = next(vae.parameters())
        posterior = vae.encode(pixels.to(device=param.device, dtype=param.dtype).unsqueeze(2)).latent_dist
        z = posterior.mode() if generator is None else posterior.sample(generator)
        mean, inv_std = self._vae_statistics(z)
        return ((z - mean) * inv_std)[:, :, 0].contiguous()

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Pixels (N, 3, H, W) in [-1, 1] of latents (N, C, h, w): ``latents / (1 / latents_std) + latents_mean``
        decoded as one frame, exactly as the end of ``QwenImagePipeline.__call__``; keeps gradients."""
        vae = self._require_vae()
        param = next(vae.parameters())
        z = latents.to(device=param.device, dtype=param.dtype).unsqueeze(2)
        mean, inv_std = self._vae_statistics(z)
        return vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]

    # ----- text -----

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """``{"encoder_hidden_states": (N, max_sequence_length, D), "encoder_hidden_states_mask": (N,
        max_sequence_length) int64 0/1}`` from ``QwenImagePipeline.encode_prompt`` (one image per prompt), each row
        right-padded with zeros to the fixed length."""
        prompts = check_prompts(prompts)
        pipe = self.text_pipeline()
        device = next(self.text_encoder.parameters()).device
        embeds, mask = pipe.encode_prompt(
            list(prompts), device=device, num_images_per_prompt=1, max_sequence_length=self.max_sequence_length
        )
        n, length, width = embeds.shape
        padded = embeds.new_zeros(n, self.max_sequence_length, width)
        padded[:, :length] = embeds
        full_mask = torch.zeros(n, self.max_sequence_length, dtype=torch.long, device=embeds.device)
        full_mask[:, :length] = 1 if mask is None else mask
        return {"encoder_hidden_states": padded, "encoder_hidden_states_mask": full_mask}

    # ----- the transformer call and guidance -----

    def _denoise(self, model: torch.nn.Module, x_t: Tensor, timesteps: Tensor, cond: dict[str, Tensor]) -> Tensor:
        check_conditioning(cond, ("encoder_hidden_states", "encoder_hidden_states_mask"), x_t.shape[0], "Qwen-Image")
        param = next(unwrap(model).parameters())
        device, dtype = param.device, param.dtype
        b, _, h, w = x_t.shape
        embeds, mask = cond["encoder_hidden_states"], cond["encoder_hidden_states_mask"]
        used = torch.nonzero(mask.bool().any(dim=0))
        length = int(used.max()) + 1 if used.numel() else mask.shape[1]  # drop the columns no row uses
        out = model(
            hidden_states=_pack(x_t.to(device=device, dtype=dtype)),
            timestep=timesteps.to(device=device, dtype=dtype) / _TIMESTEP_SCALE,
            encoder_hidden_states=embeds[:, :length].to(device=device, dtype=dtype),
            encoder_hidden_states_mask=mask[:, :length].to(device),
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return _unpack(out, h, w)

    def combine_guidance(self, uncond_out: Tensor, cond_out: Tensor, scale: float) -> Tensor:
        """True CFG as ``QwenImagePipeline.__call__``: ``comb = u + w (c − u)`` rescaled to ``comb · ‖c‖ / ‖comb‖``,
        the norms over each packed 2×2 token's 4C values (the pipeline's last dimension), in the outputs' dtype."""
        _, _, h, w = cond_out.shape
        noise_pred, neg_noise_pred = _pack(cond_out), _pack(uncond_out)
        comb_pred = neg_noise_pred + scale * (noise_pred - neg_noise_pred)
        cond_norm = torch.norm(noise_pred, dim=-1, keepdim=True)
        noise_norm = torch.norm(comb_pred, dim=-1, keepdim=True)
        return _unpack(comb_pred * (cond_norm / noise_norm), h, w)


def build_qwen_image(
    src: Source,
    *,
    max_sequence_length: int = 512,
    timestep_density: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    prediction_type: str | None = None,
) -> QwenImageAdapter:
    """Load a Qwen-Image pipeline's transformer, flow-matching scheduler, Qwen2.5-VL text encoder and tokenizer (and
    its ``AutoencoderKLQwenImage``). ``prediction_type`` may only be ``None`` or ``"flow"`` (Qwen-Image predicts the
    flow velocity)."""
    check_flow_prediction(prediction_type, "Qwen-Image")
    vae = src.diffusers(AutoencoderKLQwenImage, "vae") if src.has("vae") else None
    transformer = src.diffusers(QwenImageTransformer2DModel, "transformer")
    text_encoder = src.transformers(Qwen2_5_VLForConditionalGeneration, "text_encoder")
    eval_modules(transformer, text_encoder, vae)
    return QwenImageAdapter(
        transformer,
        src.config_only(FlowMatchEulerDiscreteScheduler, "scheduler"),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=src.config_only(AutoTokenizer, "tokenizer"),
        max_sequence_length=max_sequence_length,
        timestep_density=timestep_density,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
    )


QWEN_IMAGE = register_flow_backbone(
    "qwen_image", build_qwen_image, SUBFOLDERS, "QwenImageTransformer2DModel", QWEN_IMAGE_LORA_TARGETS
)
load_qwen_image_adapter = backbone_loader(QWEN_IMAGE)
