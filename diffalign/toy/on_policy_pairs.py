"""On-policy toy preference pairs: two generations of the base model for one prompt, the one whose colour is right
preferred, as Pick-a-Pic's pairs are two generations of the deployed models judged by a person.

For each of the world's 12 prompts the base samples ``SAMPLES_PER_PROMPT`` images with the deterministic sampler
(DDIM ``eta = 0``, 20 steps, CFG 3; sampling seed ``PAIR_SAMPLING_SEED + seed``, never the evaluation's 1234); the
pixel colour detector (:func:`~diffalign.toy.metrics.colour_correct`) splits them into right and wrong colour, and
pair ``j`` of a prompt is its ``j``-th right image against its ``j``-th wrong one (cycling through the shorter list).
Winner and loser therefore have independent noise, the base's own shapes and its own mistakes. The loser's DCPO
caption is what the detector sees in it (its colour and shape) with the colour swapped for another one, the same
perturbation as the rendered kinds (:func:`~diffalign.toy.pairs.perturbed_caption`).
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image

from diffalign.eval.diversity import rows_by_prompt
from diffalign.toy.metrics import colour_correct, colours_of, shapes_of
from diffalign.toy.model import load_toy_model
from diffalign.toy.pairs import LOSER_CAPTION_STREAM, PairRow, other_colour
from diffalign.toy.sampling import generate
from diffalign.toy.world import all_prompts, caption_for, parse_caption

SAMPLES_PER_PROMPT = 300
PAIR_SAMPLING_SEED = 777
PAIR_SAMPLER_ETA = 0.0  # the sampler SD users run; its mistakes are the ones the pairs show the model


def on_policy_pairs(
    base: str | os.PathLike, n_pairs: int, seed: int, samples_per_prompt: int = SAMPLES_PER_PROMPT
) -> list[PairRow]:
    """``n_pairs`` pairs (prompt-major, the prompts in turn) from ``samples_per_prompt`` samples of ``base`` per
    prompt; raises ``ValueError`` naming a prompt whose samples are all right or all wrong (no pair to make)."""
    model = load_toy_model(base)
    prompts = [p for p in all_prompts() for _ in range(samples_per_prompt)]
    images = generate(
        model.unet, model.text_encoder, model.tokenizer, model.scheduler, prompts,
        seed=PAIR_SAMPLING_SEED + seed, eta=PAIR_SAMPLER_ETA,
    )  # fmt: skip
    right = colour_correct(images, prompts)
    by_prompt: dict[str, tuple[list[int], list[int]]] = {}
    for prompt, rows in rows_by_prompt(prompts).items():
        winners, losers = [i for i in rows if right[i]], [i for i in rows if not right[i]]
        if not winners or not losers:
            which = "right" if not losers else "wrong"
            raise ValueError(
                f"on-policy pairs: every sample of {prompt!r} has the {which} colour; raise samples_per_prompt"
            )
        by_prompt[prompt] = (winners, losers)
    seen_colours, seen_shapes = colours_of(images), shapes_of(images)
    order, out = all_prompts(), []
    for k in range(n_pairs):
        prompt, j = order[k % len(order)], k // len(order)
        winners, losers = by_prompt[prompt]
        w, loser = winners[j % len(winners)], losers[j % len(losers)]
        out.append(PairRow(_png(images[w]), _png(images[loser]), prompt, _loser_caption(
            prompt, seen_colours[loser], seen_shapes[loser], seed, k)))  # fmt: skip
    return out


def _loser_caption(prompt: str, colour: str | None, shape: str | None, seed: int, index: int) -> str:
    """The loser as the detector sees it (the prompt's words where it sees no shape), its colour swapped."""
    asked_colour, asked_shape = parse_caption(prompt)
    swapped = other_colour(colour or asked_colour, seed, index, LOSER_CAPTION_STREAM)
    return caption_for(swapped, shape or asked_shape)


def _png(image: torch.Tensor) -> bytes:
    array = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()
