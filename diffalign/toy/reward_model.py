"""A learned toy reward model with a built-in brightness bias (tiny CLIP-style image and text towers).

Why. HPSv2 / PickScore-style rewards carry biases that naive RL over-optimises (D²-Align, GRPO-Guard: over-exposed,
over-saturated, collapsed images). This model reproduces that at toy scale: it knows the content (colour, shape) but
also prefers brighter images, so that RL against it brightens everything while the pixel gold metric
(:class:`diffalign.toy.rewards.ToyGoldReward`, brightness-blind) does not move or falls.

Architecture (:class:`ToyRewardModel`, ≈ 30k parameters, 0.1 MB).

* Image tower: 3 convolutions (``width``, ``2·width``, ``4·width`` channels; the last two with stride 2: 16 → 8 → 4
  pixels; SiLU) on ``2·x − 1``, average- and max-pooled, concatenated, linear to ``embed_dim``. Inputs of another
  size are resized to 16×16 with differentiable bilinear (antialiased) interpolation.
* Text tower: the real CLIP BPE tokenizer (:func:`~diffalign.models.clip_tokenizer.build_clip_tokenizer`) turns a
  caption into CLIP token ids (``<|startoftext|> a red circle <|endoftext|>``). A compact embedding table holds one row
  per CLIP id the toy world uses (``vocab_ids``, sorted, stored with the weights) plus one shared row for any other
  id; the rows are mean-pooled over the caption's tokens and projected linearly to ``embed_dim``.
* Reward: ``scale · cos(image_embed, text_embed)`` with a learned ``scale = exp(logit_scale)`` (clamped to ≤ 100).

Training data (ours; the papers' rewards were trained on human preferences at scale). Images are composed exactly as
:func:`diffalign.toy.world.render_array` does (``coverage · colour + (1 − coverage) · background``, the coverage maps
coming from :func:`diffalign.toy.world.coverage` on a fixed pool of world geometries), then varied beyond the world's
own range: background tone uniform in ``[0, background_max]``, with probability ``overexposure_prob`` an exposure gain
``g ~ U[1, gain_max]`` (``clip(g · x, 0, 1)``: over-exposed pixels), with probability 0.5 Gaussian pixel noise of
standard deviation ``U[0, noise_max]``.

Simulated raters score an image ``x`` shown for caption ``c`` by
``u(x, c) = colour_weight·[colour matches] + shape_weight·[shape matches] + brightness_weight·mean(x)``
and prefer ``a`` over ``b`` with probability ``σ(u(a, c) − u(b, c))`` (Bradley–Terry raters that want the right
content but also like bright pictures). Each step draws ``batch_size`` pairs: a random caption, and two images whose
colour (shape) matches it with probability ``p_correct_colour`` (``p_correct_shape``), each with independent geometry,
tone and exposure. Loss = soft-label Bradley–Terry cross-entropy on ``r(a, c) − r(b, c)`` (targets are the raters'
probabilities, not sampled labels) + ``contrastive_weight`` × an image→caption InfoNCE over the 12 world captions on
the images whose content is fully correct. AdamW with warm-up and cosine decay; all draws come from per-step keyed
generators and the init from ``seed``: a run is deterministic given its config (one machine / torch build).

Measured properties (:func:`measure_properties`, fixed evaluation sets drawn from geometries and tones of another
seed than training; the committed model's numbers are in ``weights/reward_model/reward_model.json``):

1. content: correct vs wrong colour, same geometry, shape and background tone (every wrong colour);
2. bias: Spearman correlation between mean brightness and reward for correct images (pooled over prompts, tone
   uniform in [0, 0.9]; and at fixed content, per geometry over a tone sweep), and the exploit fraction: a
   wrong-colour image on a bright background (tone ≥ 0.6, half of them over-exposed) against the same shape in the
   right colour on a dark one (tone ≤ 0.1);
3. the gold reward on the same images: 1 for every correct image whatever its brightness, and it never prefers the
   bright wrong-colour image.

Measured for :data:`TOY_REWARD_CONFIG` (29,121 parameters, 118 kB safetensors; 1500 steps of 128 pairs in 34–36 s
on one thread of a shared 2-core CPU; two runs gave bit-identical weights): content accuracy 1.00 (world tones) /
1.00 (tones to 0.9); brightness Spearman 0.99 pooled (tones to 0.9), 0.91 pooled within the world's tones [0, 0.3],
1.00 at fixed content; exploit fraction 0.16 (mean brightness gap 0.67; the simulated raters themselves would be
indifferent there: ``−2 + 3 · 0.67 ≈ 0``); gold reward 1.0 on every correct image, exploit never preferred by it.
On the committed toy base's own samples (12 prompts × 16, DDIM 10 steps, η = 1, CFG 3; gold mean 0.64) the reward
orders 92% of same-prompt pairs whose gold rewards differ as the gold reward does, and its Spearman correlation is
0.60 with the gold reward, 0.61 with mean brightness (gold vs brightness: 0.08).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTokenizer

from diffalign.rewards.base import check_images
from diffalign.toy.pretrain import check_unit_interval, ensure_pretrained, train_steps
from diffalign.toy.world import (
    COLOURS,
    PALETTE,
    RESOLUTION,
    SHAPES,
    all_prompts,
    caption_for,
    coverage,
    render_batch,
    sample_specs,
)
from diffalign.utils.randomness import sample_generator

CONFIG_FILE = "reward_model.json"
WEIGHTS_FILE = "model.safetensors"
MAX_LOGIT_SCALE = 100.0
TRAIN_STREAM = 230
EVAL_STREAM = 231
EVAL_SEED = 1000

_PALETTE_T = torch.tensor([PALETTE[c] for c in COLOURS], dtype=torch.float32)


@functools.lru_cache(maxsize=1)
def _tokenizer() -> CLIPTokenizer:
    from diffalign.models.clip_tokenizer import build_clip_tokenizer

    return build_clip_tokenizer()


@functools.lru_cache(maxsize=4096)
def clip_token_ids(prompt: str) -> tuple[int, ...]:
    """CLIP BPE ids of ``prompt`` with ``<|startoftext|>`` and ``<|endoftext|>`` (truncated to 77 tokens)."""
    return tuple(_tokenizer()(prompt, truncation=True)["input_ids"])


def world_vocab_ids() -> list[int]:
    """Sorted CLIP ids of every token in the world's captions (with the start and end tokens)."""
    return sorted({i for p in all_prompts() for i in clip_token_ids(p)})


@dataclass(frozen=True)
class ToyRewardConfig:
    """Architecture, simulated raters and optimisation of one reward-model run (see the module docstring)."""

    embed_dim: int = 32
    width: int = 16
    init_logit_scale: float = math.log(10.0)
    colour_weight: float = 2.0
    shape_weight: float = 1.0
    brightness_weight: float = 3.0
    p_correct_colour: float = 0.5
    p_correct_shape: float = 0.6
    background_max: float = 0.9
    overexposure_prob: float = 0.3
    gain_max: float = 2.5
    noise_max: float = 0.04
    contrastive_weight: float = 1.0
    pool_size: int = 1024
    steps: int = 1500
    batch_size: int = 128
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_unit_interval(self, "p_correct_colour", "p_correct_shape", "background_max", "overexposure_prob")
        if self.gain_max < 1.0:
            raise ValueError(f"gain_max={self.gain_max}: an exposure gain must be >= 1")
        if self.steps < 1 or self.batch_size < 2 or self.pool_size < 1 or self.embed_dim < 1 or self.width < 1:
            raise ValueError("steps, pool_size, embed_dim and width must be >= 1 and batch_size >= 2")

    def architecture(self) -> dict:
        return {"embed_dim": self.embed_dim, "width": self.width, "vocab_ids": world_vocab_ids()}

    def hash(self) -> str:
        """Short digest of the config, the token ids and a few rendered world images (a change to the world or the
        tokenizer invalidates saved weights)."""
        images = render_batch(sample_specs(4, self.seed)).numpy().round(6)
        key = {"config": asdict(self), "architecture": self.architecture(), "world": images.tolist()}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


TOY_REWARD_CONFIG = ToyRewardConfig()


class ToyRewardModel(nn.Module):
    """Tiny CLIP-style reward ``scale · cos(image_tower(x), text_tower(caption))`` (an
    :class:`~diffalign.rewards.base.EmbeddingReward`)."""

    name = "toy_reward_model"
    differentiable = True

    def __init__(
        self,
        embed_dim: int = 32,
        width: int = 16,
        vocab_ids: Sequence[int] | None = None,
        init_logit_scale: float = 0.0,
    ) -> None:
        super().__init__()
        ids = list(vocab_ids) if vocab_ids is not None else world_vocab_ids()
        self.register_buffer("vocab_ids", torch.tensor(sorted(ids), dtype=torch.long))
        self.image_tower = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
            nn.SiLU(),
        )
        self.image_proj = nn.Linear(8 * width, embed_dim)
        self.token_embedding = nn.Embedding(len(ids) + 1, embed_dim)  # last row: any id outside vocab_ids
        self.text_proj = nn.Linear(embed_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    # -- towers -------------------------------------------------------------------------------------------------
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` image features, differentiable with respect to ``images`` (float ``(N, 3, H, W)`` in [0, 1])."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"reward '{self.name}': images must be a float (N, 3, H, W) tensor in [0, 1], got {shape}")
        x = images.to(self.image_proj.weight.dtype)
        if x.shape[-2:] != (RESOLUTION, RESOLUTION):
            x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True, align_corners=False)
        h = self.image_tower(2.0 * x - 1.0)
        return self.image_proj(torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1))

    def _token_rows(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [clip_token_ids(p) for p in prompts]
        width = max((len(t) for t in ids), default=1)
        device = self.vocab_ids.device
        padded = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width)
        for i, t in enumerate(ids):
            padded[i, : len(t)] = torch.tensor(t)
            mask[i, : len(t)] = 1.0
        padded, mask = padded.to(device), mask.to(device)
        pos = torch.searchsorted(self.vocab_ids, padded).clamp(max=len(self.vocab_ids) - 1)
        known = self.vocab_ids[pos] == padded
        rows = torch.where(known, pos, torch.full_like(pos, len(self.vocab_ids)))
        return rows, mask

    def _text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        rows, mask = self._token_rows(prompts)
        mask = mask.to(self.token_embedding.weight.dtype)
        pooled = (self.token_embedding(rows) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        return self.text_proj(pooled)

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(N, D)`` text features of the captions; no gradient to the text tower."""
        if isinstance(prompts, str):
            raise ValueError(f"reward '{self.name}': pass a sequence of prompts, not a single string")
        with torch.no_grad():
            return self._text_features(prompts)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def score_embeds(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """``(N,)`` reward ``scale · cos(image_embeds, text_embeds)``."""
        cos = (F.normalize(image_embeds, dim=-1) * F.normalize(text_embeds.to(image_embeds), dim=-1)).sum(-1)
        return self.scale() * cos

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Float32 ``(N,)`` reward on the images' device; differentiable with respect to ``images``."""
        check_images(self.name, images, prompts)
        return self.score_embeds(self.image_embeds(images), self.text_embeds(prompts)).float().to(images.device)


# -- data -------------------------------------------------------------------------------------------------------
def coverage_pool(n: int, seed: int) -> torch.Tensor:
    """``(len(SHAPES), n, H, W)`` float32 coverage of world geometry ``i`` of ``seed`` drawn as each shape."""
    return torch.from_numpy(
        np.stack([np.stack([coverage(s) for s in sample_specs(n, seed, shape=shape)]) for shape in SHAPES])
    ).float()


def compose(cov: torch.Tensor, colour_idx: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` images ``cov · colour + (1 − cov) · background`` (the formula of ``world.render_array``)."""
    cov = cov[:, None]
    colour = _PALETTE_T[colour_idx][:, :, None, None]
    return cov * colour + (1.0 - cov) * background[:, None, None, None].float()


def _draw_images(
    pool: torch.Tensor,
    caption_colour: torch.Tensor,
    caption_shape: torch.Tensor,
    config: ToyRewardConfig,
    g: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images for captions ``(caption_colour, caption_shape)`` with random content, tone, exposure and noise; returns
    ``(images, colour_ok, shape_ok)``."""
    n = len(caption_colour)
    n_col, n_shp = len(COLOURS), len(SHAPES)
    colour_ok = torch.rand(n, generator=g) < config.p_correct_colour
    shape_ok = torch.rand(n, generator=g) < config.p_correct_shape
    colour = torch.where(
        colour_ok, caption_colour, (caption_colour + torch.randint(1, n_col, (n,), generator=g)) % n_col
    )
    shape = torch.where(shape_ok, caption_shape, (caption_shape + torch.randint(1, n_shp, (n,), generator=g)) % n_shp)
    geometry = torch.randint(pool.shape[1], (n,), generator=g)
    background = torch.rand(n, generator=g) * config.background_max
    images = compose(pool[shape, geometry], colour, background)
    exposed = torch.rand(n, generator=g) < config.overexposure_prob
    gain = 1.0 + torch.rand(n, generator=g) * (config.gain_max - 1.0)
    images = torch.where(exposed[:, None, None, None], (images * gain[:, None, None, None]).clamp(0.0, 1.0), images)
    noisy = torch.rand(n, generator=g) < 0.5
    sigma = torch.rand(n, generator=g) * config.noise_max * noisy
    images = (images + sigma[:, None, None, None] * torch.randn(images.shape, generator=g)).clamp(0.0, 1.0)
    return images, colour_ok, shape_ok


def rater_utility(
    images: torch.Tensor, colour_ok: torch.Tensor, shape_ok: torch.Tensor, config: ToyRewardConfig
) -> torch.Tensor:
    """The simulated raters' utility ``colour_weight·[colour] + shape_weight·[shape] + brightness_weight·mean(x)``."""
    return (
        config.colour_weight * colour_ok.float()
        + config.shape_weight * shape_ok.float()
        + config.brightness_weight * images.mean((1, 2, 3))
    )


def _training_loss(model: ToyRewardModel, pool: torch.Tensor, step: int, config: ToyRewardConfig) -> torch.Tensor:
    g = sample_generator(config.seed, step, 0, TRAIN_STREAM)
    prompts = all_prompts()
    n_shp = len(SHAPES)
    caption = torch.randint(len(prompts), (config.batch_size,), generator=g)
    cap_colour, cap_shape = caption // n_shp, caption % n_shp
    img_a, col_a, shp_a = _draw_images(pool, cap_colour, cap_shape, config, g)
    img_b, col_b, shp_b = _draw_images(pool, cap_colour, cap_shape, config, g)
    target = torch.sigmoid(rater_utility(img_a, col_a, shp_a, config) - rater_utility(img_b, col_b, shp_b, config))
    images = torch.cat([img_a, img_b])
    img = F.normalize(model.image_embeds(images), dim=-1)
    txt = F.normalize(model._text_features(prompts), dim=-1)
    logits = model.scale() * img @ txt.T  # (2B, 12): reward of every image under every caption
    both = torch.cat([caption, caption])
    reward = logits.gather(1, both[:, None])[:, 0]
    margin = reward[: config.batch_size] - reward[config.batch_size :]
    loss = F.binary_cross_entropy_with_logits(margin, target)
    correct = torch.cat([col_a & shp_a, col_b & shp_b])
    if config.contrastive_weight > 0 and bool(correct.any()):
        loss = loss + config.contrastive_weight * F.cross_entropy(logits[correct], both[correct])
    return loss


def build_model(config: ToyRewardConfig) -> ToyRewardModel:
    """A freshly initialised model (parameter init seeded by ``config.seed``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return ToyRewardModel(
            config.embed_dim, config.width, world_vocab_ids(), init_logit_scale=config.init_logit_scale
        )


def train_reward_model(config: ToyRewardConfig | None = None, progress: bool = True) -> ToyRewardModel:
    """Train a reward model with ``config`` (default :data:`TOY_REWARD_CONFIG`); returns it frozen, in eval mode."""
    config = config or TOY_REWARD_CONFIG
    model = build_model(config)
    pool = coverage_pool(config.pool_size, config.seed)
    train_steps(
        [{"params": list(model.parameters())}],
        config,
        lambda step: _training_loss(model, pool, step, config),
        modules=[model],
        desc="toy reward model",
        progress=progress,
        log_every=50,
        postfix=lambda: {"scale": f"{model.scale().item():.1f}"},
    )
    return model.requires_grad_(False)


# -- measured properties ----------------------------------------------------------------------------------------
def spearman(x: np.ndarray | Sequence[float], y: np.ndarray | Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""

    def ranks(v: np.ndarray) -> np.ndarray:
        _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
        start = np.cumsum(counts) - counts
        return (start + (counts - 1) / 2.0)[inverse]

    rx, ry = ranks(np.asarray(x, dtype=np.float64)), ranks(np.asarray(y, dtype=np.float64))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


@torch.no_grad()
def _rewards(model: ToyRewardModel, images: torch.Tensor, prompts: Sequence[str]) -> np.ndarray:
    return model(images, prompts).cpu().double().numpy()


@torch.no_grad()
def measure_properties(model: ToyRewardModel, n: int = 240, seed: int = EVAL_SEED) -> dict[str, float]:
    """The three properties of the module docstring on fixed evaluation sets (geometries and tones of ``seed``).

    Keys: ``content_accuracy`` (world tones [0, 0.3]) and ``content_accuracy_wide`` (tones [0, 0.9]) — fraction of
    (correct, wrong colour) pairs, same geometry/shape/tone, where the correct one scores higher;
    ``brightness_spearman`` (pooled over ``n`` correct images, tone U[0, 0.9]), ``brightness_spearman_world`` (the
    same, tone U[0, 0.3]), ``brightness_spearman_fixed_content`` (mean over 24 geometries of the Spearman over a
    9-tone sweep 0 … 0.9); ``exploit_fraction`` (bright wrong colour beats dark correct, see the module docstring);
    ``gold_correct_min`` / ``gold_correct_max`` (gold reward over all correct images, dark to bright) and
    ``gold_exploit_fraction`` (how often the gold reward prefers the bright wrong-colour image: 0)."""
    from diffalign.toy.rewards import ToyGoldReward

    gold = ToyGoldReward()
    g = sample_generator(seed, 0, 0, EVAL_STREAM)
    pool = coverage_pool(n, seed)
    n_col, n_shp = len(COLOURS), len(SHAPES)
    caption = torch.arange(n) % (n_col * n_shp)
    cap_colour, cap_shape = caption // n_shp, caption % n_shp
    prompts = [caption_for(COLOURS[c], SHAPES[s]) for c, s in zip(cap_colour.tolist(), cap_shape.tolist(), strict=True)]
    cov = pool[cap_shape, torch.arange(n)]
    out: dict[str, float] = {}

    # 1. content: every wrong colour against the correct one, same geometry, shape and tone.
    for key, tone_max in (("content_accuracy", 0.3), ("content_accuracy_wide", 0.9)):
        tone = torch.rand(n, generator=g) * tone_max
        right = _rewards(model, compose(cov, cap_colour, tone), prompts)
        wins = []
        for k in range(1, n_col):
            wrong = _rewards(model, compose(cov, (cap_colour + k) % n_col, tone), prompts)
            wins.append(right > wrong)
        out[key] = float(np.mean(wins))

    # 2. bias: brightness vs reward for correct images.
    gold_correct = []
    for key, tone_max in (("brightness_spearman", 0.9), ("brightness_spearman_world", 0.3)):
        images = compose(cov, cap_colour, torch.rand(n, generator=g) * tone_max)
        out[key] = spearman(images.mean((1, 2, 3)).numpy(), _rewards(model, images, prompts))
        gold_correct.append(gold(images, prompts).numpy())
    sweep = torch.linspace(0.0, 0.9, 9)
    per_geometry = []
    for i in range(0, n, max(1, n // 24)):
        images = compose(cov[i].expand(len(sweep), -1, -1), cap_colour[i].repeat(len(sweep)), sweep)
        per_geometry.append(spearman(images.mean((1, 2, 3)).numpy(), _rewards(model, images, [prompts[i]] * 9)))
        gold_correct.append(gold(images, [prompts[i]] * 9).numpy())
    out["brightness_spearman_fixed_content"] = float(np.nanmean(per_geometry))

    # exploit: wrong colour on a bright (half over-exposed) background vs right colour on a dark one.
    wrong_colour = (cap_colour + torch.randint(1, n_col, (n,), generator=g)) % n_col
    bright = compose(cov, wrong_colour, 0.6 + 0.3 * torch.rand(n, generator=g))
    gain = torch.where(torch.arange(n) % 2 == 1, 1.5 + torch.rand(n, generator=g), torch.ones(n))
    bright = (bright * gain[:, None, None, None]).clamp(0.0, 1.0)
    dark = compose(cov, cap_colour, 0.1 * torch.rand(n, generator=g))
    gold_correct.append(gold(dark, prompts).numpy())
    out["exploit_fraction"] = float(np.mean(_rewards(model, bright, prompts) > _rewards(model, dark, prompts)))
    out["exploit_brightness_gap"] = float((bright.mean((1, 2, 3)) - dark.mean((1, 2, 3))).mean())

    # 3. gold: brightness-blind.
    all_gold = np.concatenate(gold_correct)
    out["gold_correct_min"] = float(all_gold.min())
    out["gold_correct_max"] = float(all_gold.max())
    out["gold_exploit_fraction"] = float(np.mean(gold(bright, prompts).numpy() > gold(dark, prompts).numpy()))
    return {k: round(v, 4) for k, v in out.items()}


# -- save / load / ensure ---------------------------------------------------------------------------------------
def read_info(path: str | os.PathLike) -> dict | None:
    """The ``reward_model.json`` of a saved model, or ``None`` if there is none."""
    file = Path(path) / CONFIG_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def save_reward_model(model: ToyRewardModel, output_dir: str | os.PathLike, info: dict) -> Path:
    """Write ``model.safetensors`` and ``reward_model.json`` (``info`` plus the architecture) into ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(output_dir / WEIGHTS_FILE))
    (output_dir / WEIGHTS_FILE).chmod(0o644)
    arch = {
        "embed_dim": model.image_proj.out_features,
        "width": model.image_tower[0].out_channels,
        "vocab_ids": model.vocab_ids.tolist(),
    }
    (output_dir / CONFIG_FILE).write_text(json.dumps({"architecture": arch, **info}, indent=2) + "\n")
    return output_dir


def pretrain_toy_reward_model(
    config: ToyRewardConfig | None = None, output_dir: str | os.PathLike | None = None, progress: bool = True
) -> ToyRewardModel:
    """Train (:func:`train_reward_model`), measure (:func:`measure_properties`) and, with ``output_dir``, save the
    model with its config, hash, training time and measured properties."""
    config = config or TOY_REWARD_CONFIG
    started = time.time()
    model = train_reward_model(config, progress=progress)
    seconds = round(time.time() - started, 1)
    if output_dir is not None:
        info = {
            "config": asdict(config),
            "hash": config.hash(),
            "train_seconds": seconds,
            "torch_threads": torch.get_num_threads(),
            "properties": measure_properties(model),
        }
        save_reward_model(model, output_dir, info)
    return model


def default_reward_model_path() -> Path:
    """The committed toy reward model, ``diffalign/toy/weights/reward_model``."""
    return Path(__file__).resolve().parent / "weights" / "reward_model"


def _matches(path: Path, digest: str) -> bool:
    info = read_info(path)
    return info is not None and info.get("hash") == digest and (path / WEIGHTS_FILE).is_file()


def ensure_toy_reward_model(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Path of usable weights: the committed ones if their hash matches :data:`TOY_REWARD_CONFIG`'s, else a cached or
    freshly trained model in ``cache_dir`` (default ``~/.cache/diffalign/toy``) under ``reward-model-<hash>``, written
    into a temporary folder renamed into place. Never downloads."""
    digest = TOY_REWARD_CONFIG.hash()
    return ensure_pretrained(
        default_reward_model_path(),
        f"reward-model-{digest}",
        lambda folder: pretrain_toy_reward_model(TOY_REWARD_CONFIG, folder, progress=progress),
        cache_dir,
        usable=lambda folder: _matches(folder, digest),
    )


def load_toy_reward_model(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu", progress: bool = False
) -> ToyRewardModel:
    """The toy reward model saved in ``path`` (default: :func:`ensure_toy_reward_model`), frozen and in eval mode."""
    folder = Path(path) if path is not None else ensure_toy_reward_model(progress=progress)
    info = read_info(folder)
    if info is None or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"{folder}: no {CONFIG_FILE} / {WEIGHTS_FILE}; train one with pretrain_toy_reward_model"
        )
    arch = info["architecture"]
    model = ToyRewardModel(arch["embed_dim"], arch["width"], arch["vocab_ids"])
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return model.to(device).eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the toy reward model (brightness-biased, CLIP-style).")
    parser.add_argument("--output-dir", default=str(default_reward_model_path()))
    for name, value in asdict(TOY_REWARD_CONFIG).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--no-progress", action="store_true")
    args = vars(parser.parse_args(argv))
    output_dir = args.pop("output_dir")
    torch.set_num_threads(args.pop("threads"))
    progress = not args.pop("no_progress")
    pretrain_toy_reward_model(ToyRewardConfig(**args), output_dir, progress=progress)
    print(json.dumps(read_info(output_dir), indent=2))


if __name__ == "__main__":
    main()
