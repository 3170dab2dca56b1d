"""How much a toy reward cares about geometry once the content is right: the landscape a reward optimiser climbs
after it has fixed the colour.

For each world caption, :func:`right_content_landscape` renders ``n`` world geometries (position, size, background
tone drawn as the world draws them) in the caption's colour and shape, and the same geometries in a wrong colour.
It reports, averaged over captions:

* ``within_std`` — the standard deviation of the reward over the right-content images (what geometry is worth);
* ``colour_gap`` — mean reward of right-content minus wrong-colour images at the same geometry (what content is worth);
* ``centre_distance_all`` / ``centre_distance_top`` — mean distance in pixels of the shape's centre from the frame's
  centre over all right-content images, and over the ``top_fraction`` the reward scores highest (how strongly the
  reward pulls shapes to the middle);
* ``size_all`` / ``size_top`` — the same for the shape's size (``ShapeSpec.size``).

A reward whose ``within_std`` is small against ``colour_gap`` and whose top geometries sit where all geometries sit
gives an optimiser no reason to gather the shapes: a narrowing mode then comes from the generator's updates, not from
the reward's optimum (docs/toy-world.md, "Where D²-Align's shapes gather").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch

from diffalign.toy.world import COLOURS, RESOLUTION, all_prompts, parse_caption, render_batch, sample_specs

Reward = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


def right_content_landscape(
    reward: Reward, n: int = 512, seed: int = 777, top_fraction: float = 1 / 16
) -> dict[str, float]:
    """The numbers of the module docstring for ``reward`` (any ``reward(images, prompts) -> (N,)`` callable)."""
    if n < 2 or not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"n={n}, top_fraction={top_fraction}: need n >= 2 and 0 < top_fraction <= 1")
    top = max(1, round(n * top_fraction))
    rows: list[list[float]] = []
    for prompt in all_prompts():
        colour, shape = parse_caption(prompt)
        specs = sample_specs(n, seed, colour=colour, shape=shape)
        wrong_colour = COLOURS[(COLOURS.index(colour) + 1) % len(COLOURS)]
        wrong = [dataclasses.replace(s, colour=wrong_colour) for s in specs]
        with torch.no_grad():
            right_r = reward(render_batch(specs), [prompt] * n).float().cpu().numpy()
            wrong_r = reward(render_batch(wrong), [prompt] * n).float().cpu().numpy()
        centre = np.array([np.hypot(s.cx - RESOLUTION / 2, s.cy - RESOLUTION / 2) for s in specs])
        size = np.array([s.size for s in specs])
        best = np.argsort(right_r)[-top:]
        rows.append(
            [
                float(right_r.std()),
                float((right_r - wrong_r).mean()),
                float(centre.mean()),
                float(centre[best].mean()),
                float(size.mean()),
                float(size[best].mean()),
            ]
        )
    keys = ("within_std", "colour_gap", "centre_distance_all", "centre_distance_top", "size_all", "size_top")
    return dict(zip(keys, np.mean(rows, axis=0).tolist(), strict=True))
