"""The benchmark's inputs: a tiny SD pipeline with a VAE and a Pick-a-Pic-layout parquet of JPEG (or noise-PNG)
pairs, written once under the work folder by a ``--worker prepare`` subprocess and reused from there."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import REPO_ROOT
from .common import BENCH_SCRIPT, Settings, base_env, prepend_path

CAPTION_WORDS = (
    "a an the portrait painting photo of red blue golden small giant ancient futuristic cat dog fox dragon robot "
    "castle forest city river mountain ocean street garden at night sunset dawn in snow rain fog with glowing "
    "lights neon trees flowers stars highly detailed cinematic lighting watercolor oil digital art 4k trending "
    "artstation studio ghibli style sharp focus soft colors"
).split()


def draw_image(rng: Any, width: int, height: int) -> Any:
    """A Pick-a-Pic-like RGB image (PIL): a smooth four-corner colour gradient, 3-8 filled ellipses, rectangles and
    polygons, a Gaussian blur (radius 1-3 px, soft edges as in rendered images) and mild pixel noise (sigma 3)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    c = rng.uniform(0, 255, size=(4, 3)).astype(np.float32)
    background = (1 - y) * ((1 - x) * c[0] + x * c[1]) + y * ((1 - x) * c[2] + x * c[3])
    img = Image.fromarray(background.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.05, 0.3) * width, rng.uniform(0.05, 0.3) * height
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)
        elif kind == 1:
            draw.rectangle([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 7))))
            radii = rng.uniform(0.5, 1.0, angles.size)
            points = [(cx + rx * r * np.cos(a), cy + ry * r * np.sin(a)) for a, r in zip(angles, radii, strict=True)]
            draw.polygon(points, fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(1.0, 3.0))))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 3.0, (height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8), "RGB")


def make_pickapic_like_rows(n: int, sizes: tuple[int, int], seed: int) -> list[dict[str, Any]]:
    """``n`` rows for ``write_pickapic_parquet``: two :func:`draw_image` JPEGs (quality 90) of one size per pair,
    both sides drawn in ``sizes`` (multiples of 8 where the range allows), a caption of 6-20 words, labels
    alternating (1, 0) / (0, 1) (odd rows are swapped on load), no ties."""
    import io

    import numpy as np

    rng = np.random.default_rng(seed)
    low, high = sizes
    choices = np.arange(low + (-low) % 8, high + 1, 8) if high - low >= 8 else np.arange(low, high + 1)
    rows = []
    for i in range(n):
        width, height = (int(v) for v in rng.choice(choices, 2))
        cells = []
        for _ in range(2):
            buf = io.BytesIO()
            draw_image(rng, width, height).save(buf, format="JPEG", quality=90)
            cells.append(buf.getvalue())
        words = rng.choice(CAPTION_WORDS, int(rng.integers(6, 21)))
        rows.append(
            {
                "jpg_0": cells[0],
                "jpg_1": cells[1],
                "label_0": 1.0 if i % 2 == 0 else 0.0,
                "label_1": 0.0 if i % 2 == 0 else 1.0,
                "caption": " ".join(str(w) for w in words),
            }
        )
    return rows


def prepare_worker(spec: dict[str, Any]) -> None:
    """Write the tiny SD pipeline and / or the parquet ``spec`` asks for (run as ``--worker prepare``)."""
    from diffalign.data.synthetic import make_random_pairs, write_pickapic_parquet
    from diffalign.models.tiny import save_tiny_sd_pipeline

    if spec["model_dir"]:
        unet = {}
        if spec.get("unet_channels"):
            unet = {"block_out_channels": tuple(spec["unet_channels"]), "layers_per_block": spec["unet_layers"]}
        save_tiny_sd_pipeline(
            spec["model_dir"],
            with_vae=True,
            sample_size=spec["resolution"],
            seed=spec["seed"],
            vae_block_out_channels=tuple(spec["vae_channels"]),
            vae_layers_per_block=spec["vae_layers"],
            **unet,
        )
    if spec["parquet"]:
        sizes = tuple(spec["image_sizes"])
        if spec["images"] == "drawn-jpeg":
            rows = make_pickapic_like_rows(spec["pairs"], sizes, spec["seed"])
        else:  # noise-png: the earlier assets (square images of the smaller side)
            rows = make_random_pairs(spec["pairs"], size=sizes[0], seed=spec["seed"])
        write_pickapic_parquet(spec["parquet"], rows)


def prepare_assets(s: Settings, unet_channels: Sequence[int] | None = None, unet_layers: int = 2) -> tuple[Path, Path]:
    """Write the tiny SD pipeline (with VAE) and the parquet (``<data folder>/train.parquet``); return both folders.

    Folder names record what shapes them (resolution and VAE levels; UNet size for --full-ft; image style, sizes,
    pair count and seed), so one ``--work-dir`` serves several settings. Built in a subprocess: on Linux a child's
    ``ru_maxrss`` includes the peak of the process it was forked from, so the measuring process must stay small or
    every contender would report at least its size.
    """
    model_dir = s.work_dir / f"model_r{s.resolution}_vae{s.vae_levels}_s{s.seed}"
    if unet_channels:
        model_dir = model_dir.with_name(f"{model_dir.name}_unet{'-'.join(map(str, unet_channels))}x{unet_layers}")
    data_dir = s.work_dir / f"data_{s.images}_{s.image_min}-{s.image_max}_{s.pairs}p_s{s.seed}"
    parquet = data_dir / "train.parquet"
    spec = {
        "model_dir": None if (model_dir / "model_index.json").is_file() else str(model_dir),
        "parquet": None if parquet.is_file() else str(parquet),
        "resolution": s.resolution,
        "images": s.images,
        "image_sizes": [s.image_min, s.image_max],
        "pairs": s.pairs,
        "seed": s.seed,
        "vae_channels": [32, 64, 64, 64][: s.vae_levels],
        "vae_layers": 2 if s.vae_levels == 4 else 1,  # SD's VAE: layers_per_block 2
        "unet_channels": list(unet_channels) if unet_channels else None,
        "unet_layers": unet_layers,
    }
    if spec["model_dir"] or spec["parquet"]:
        spec_path = s.work_dir / "prepare.json"
        spec_path.write_text(json.dumps(spec))
        env = base_env(s)
        prepend_path(env, "PYTHONPATH", REPO_ROOT)
        subprocess.run([s.python, str(BENCH_SCRIPT), "--worker", "prepare", "--spec", str(spec_path)],
                       check=True, env=env)  # fmt: skip
    return model_dir, data_dir
