"""Toy world: rendering, gold metrics, preference pairs, pretraining, the committed base and its sampler."""

from __future__ import annotations

import copy
import dataclasses
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

import diffalign.toy.pretrain as toy_pretrain
from diffalign.eval.diversity import embedding_spread
from diffalign.toy.metrics import (
    centre_distance,
    checkerboard,
    colour_adherence,
    colour_of,
    colours_of,
    diversity,
    diversity_report,
    shape_adherence,
    silhouette_embeds,
    summarize,
)
from diffalign.toy.model import build_toy_model, encode_prompts, load_toy_model, read_model_info, scheduler_config
from diffalign.toy.pairs import flipped_labels, make_preference_pairs
from diffalign.toy.pretrain import BASE_CONFIG, default_base_path, noisy_captions, pretrain
from diffalign.toy.sampling import generate
from diffalign.toy.world import (
    COLOURS,
    PALETTE,
    SHAPES,
    ShapeSpec,
    all_prompts,
    caption_for,
    coverage,
    parse_caption,
    render,
    render_array,
    render_batch,
    sample_specs,
)

torch.set_num_threads(1)


def test_render_closed_form_and_deterministic() -> None:
    # A square whose edges fall on pixel boundaries covers pixels [4, 12) exactly: no anti-aliased pixels.
    spec = ShapeSpec("green", "square", cx=8.0, cy=8.0, size=4.0, background=0.2)
    arr = render_array(spec)
    inside = np.zeros((16, 16), dtype=bool)
    inside[4:12, 4:12] = True
    np.testing.assert_allclose(arr[inside], np.tile(PALETTE["green"], (64, 1)), atol=1e-6)
    np.testing.assert_allclose(arr[~inside], 0.2, atol=1e-6)
    # Circle of radius 3: total coverage is pi r^2 up to the 4x4 supersampling error.
    circle = ShapeSpec("red", "circle", cx=8.0, cy=8.0, size=3.0, background=0.0)
    assert abs(render_array(circle)[..., 0].sum() / PALETTE["red"][0] - np.pi * 9) < 1.0
    assert np.array_equal(np.asarray(render(spec)), np.asarray(render(spec)))
    assert sample_specs(5, seed=3) == sample_specs(9, seed=3)[:5]
    assert sample_specs(5, seed=3) != sample_specs(5, seed=4)


def test_captions_round_trip_and_bad_input() -> None:
    assert len(all_prompts()) == len(COLOURS) * len(SHAPES) == 12
    assert all(parse_caption(caption_for(c, s)) == (c, s) for c in COLOURS for s in SHAPES)
    with pytest.raises(ValueError, match="purple"):
        ShapeSpec("purple", "circle", 8, 8, 3, 0.1)
    with pytest.raises(ValueError, match="a red blob"):
        parse_caption("a red blob")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("colour", COLOURS)
def test_gold_metric_on_ground_truth(colour: str, shape: str) -> None:
    specs = sample_specs(40, seed=7, colour=colour, shape=shape)
    images = [render(s) for s in specs]  # uint8 PIL, as a parquet round trip would give
    prompts = [s.caption for s in specs]
    assert colour_adherence(images, prompts) == 1.0
    assert shape_adherence(images, prompts) == 1.0
    for other in COLOURS:
        if other != colour:
            recoloured = render_batch([dataclasses.replace(s, colour=other) for s in specs])
            assert colour_adherence(recoloured, prompts) == 0.0
            assert set(colours_of(recoloured)) == {other}


def test_colour_of_blank_and_input_layouts() -> None:
    blank = ShapeSpec("red", "circle", cx=8, cy=8, size=0.01, background=0.25)  # covers no sample point
    assert colour_of(render(blank)) is None
    assert colour_adherence(render_batch([blank]), ["a red circle"]) == 0.0
    spec = ShapeSpec("blue", "triangle", cx=7.3, cy=8.6, size=4.2, background=0.1)
    arr = render_array(spec)
    assert colour_of(arr) == colour_of(torch.from_numpy(arr).permute(2, 0, 1)) == colour_of(render(spec)) == "blue"
    # Darkening the shape keeps its hue: the metric names the colour, not the brightness.
    assert colour_of(arr * 0.5) == "blue"
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        colour_adherence(render_batch([spec, spec]), ["a blue triangle"])


def test_diversity_ground_truth_vs_copies() -> None:
    specs = [s for p in all_prompts() for s in sample_specs(24, 11, *parse_caption(p))]
    images = render_batch(specs)
    prompts = [s.caption for s in specs]
    report = diversity_report(images, prompts)
    # Normalised by the world's own spread, so ground truth sits near 1 in every attribute (24 samples per prompt).
    for name in ("x", "y", "size", "tone"):
        assert 0.75 < report[name] < 1.25, (name, report)
    copies = render_batch([specs[0]] * 8 + [specs[30]] * 8)
    assert diversity(copies, [prompts[0]] * 8 + [prompts[30]] * 8) == pytest.approx(0.0, abs=1e-9)
    # Collapse of one attribute only: a fixed background tone zeroes the tone term and leaves the others.
    same_tone = render_batch([dataclasses.replace(s, background=0.1) for s in specs])
    collapsed = diversity_report(same_tone, prompts)
    assert collapsed["tone"] == pytest.approx(0.0, abs=1e-9)
    assert collapsed["x"] == pytest.approx(report["x"], rel=1e-6)


def test_silhouette_is_the_coverage_map_whatever_the_colour() -> None:
    specs = sample_specs(6, 3)
    expected = np.stack([coverage(s).ravel() for s in specs])
    for colour in COLOURS:
        got = silhouette_embeds(render_batch([dataclasses.replace(s, colour=colour) for s in specs]))
        # float32 pixels divided by a chroma >= 0.6: error <= 2 * 6e-8 / 0.6
        assert np.abs(got - expected).max() < 1e-6, colour
    # Disjoint shapes share no pixel (cosine 0, spread 1); copies in other colours are one silhouette (spread 0).
    left = ShapeSpec("red", "square", 4.0, 8.0, 3.0, 0.1)
    right = dataclasses.replace(left, colour="blue", cx=12.0)
    apart = silhouette_embeds(render_batch([left, right]))
    assert embedding_spread(apart, ["p", "p"]) == pytest.approx(1.0, abs=1e-12)
    recoloured = silhouette_embeds(render_batch([left, dataclasses.replace(left, colour="green", background=0.3)]))
    assert embedding_spread(recoloured, ["p", "p"]) == pytest.approx(0.0, abs=1e-6)


def test_centre_distance_of_rendered_circles() -> None:
    # A circle's coverage centroid is its spec centre up to the 4x supersampling (measured <= 0.02 px on 64 specs).
    specs = sample_specs(32, 5, shape="circle")
    expected = np.mean([np.hypot(s.cx - 8.0, s.cy - 8.0) for s in specs])
    assert centre_distance(render_batch(specs)) == pytest.approx(expected, abs=0.03)
    centred = ShapeSpec("green", "circle", 8.0, 8.0, 4.0, 0.2)
    assert centre_distance(render_batch([centred, dataclasses.replace(centred, cx=11.0)])) == pytest.approx(
        1.5, abs=0.03
    )
    assert np.isnan(centre_distance(torch.full((2, 3, 16, 16), 0.2)))  # no shape visible anywhere


def test_checkerboard_closed_form_and_ground_truth() -> None:
    flat = torch.full((2, 3, 16, 16), 0.4)
    assert checkerboard(flat) == pytest.approx(0.0, abs=1e-12)
    i, j = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    board = 0.5 + 0.1 * (-1.0) ** (i + j)  # ±0.1 around grey, in every channel
    assert checkerboard(board.expand(2, 3, 16, 16)) == pytest.approx(0.1, abs=1e-7)  # float32 input: 0.6 is 0.6+9e-9
    stripes = 0.5 + 0.1 * (-1.0) ** i  # one axis only: not the checkerboard frequency
    assert checkerboard(stripes.expand(1, 3, 16, 16)) == pytest.approx(0.0, abs=1e-7)
    specs = [s for p in all_prompts() for s in sample_specs(8, 5, *parse_caption(p))]
    truth = checkerboard(render_batch(specs))
    assert truth < 0.001, truth  # measured 0.00017: only shape edges contribute


def test_noisy_captions_rate() -> None:
    n, noise = 4096, 0.55
    truth = [s.caption for s in sample_specs(n, seed=0)]
    noisy = noisy_captions(n, noise, seed=0)
    wrong = [parse_caption(a)[0] != parse_caption(b)[0] for a, b in zip(truth, noisy, strict=True)]
    assert all(parse_caption(a)[1] == parse_caption(b)[1] for a, b in zip(truth, noisy, strict=True))
    assert abs(np.mean(wrong) - noise) < 3 * np.sqrt(noise * (1 - noise) / n)
    assert noisy_captions(n, 0.0, seed=0) == truth


def check_pair_colours(table: dict, i: int) -> tuple[list[Image.Image], int, str]:
    """Assert row ``i``'s winner has the prompt's colour and its loser a visible other one; return (images, winner
    side, prompt shape)."""
    images = [Image.open(io.BytesIO(table[f"jpg_{k}"][i])) for k in (0, 1)]
    winner = 0 if table["label_0"][i] == 1.0 else 1
    prompt_colour, prompt_shape = parse_caption(table["caption"][i])
    assert colour_of(images[winner]) == prompt_colour
    assert colour_of(images[1 - winner]) not in (prompt_colour, None)
    return images, winner, prompt_shape


def test_preference_pairs_parquet(tmp_path) -> None:
    path = make_preference_pairs(tmp_path / "pairs.parquet", n_pairs=40, seed=5)
    table = pq.read_table(path).to_pydict()
    for column in ("jpg_0", "jpg_1", "label_0", "label_1", "caption", "caption_0", "caption_1"):
        assert len(table[column]) == 40, column
    labels = np.array([table["label_0"], table["label_1"]])
    np.testing.assert_array_equal(labels.sum(0), 1.0)
    assert 0 < labels[0].sum() < 40  # the winner is on both sides somewhere
    loser_caption_colours = set()
    for i in range(40):
        images, winner, prompt_shape = check_pair_colours(table, i)
        assert table[f"caption_{winner}"][i] == table["caption"][i]
        loser_colour, loser_shape = parse_caption(table[f"caption_{1 - winner}"][i])
        assert loser_shape == prompt_shape and loser_colour != colour_of(images[1 - winner])  # DCPO-h perturbation
        loser_caption_colours.add(loser_colour)
        # Same spec in two colours: identical background and shape footprint.
        a, b = (np.asarray(im, dtype=np.float64) for im in images)
        np.testing.assert_allclose(a.max(-1) - a.min(-1) > 0.02, b.max(-1) - b.min(-1) > 0.02)
    assert len(loser_caption_colours) == 4  # the perturbation reaches every colour, the prompt's included
    prefix = pq.read_table(make_preference_pairs(tmp_path / "p10.parquet", n_pairs=10, seed=5)).to_pydict()
    assert prefix["jpg_0"] == table["jpg_0"][:10] and prefix["label_0"] == table["label_0"][:10]


def test_label_noise_flips_only_labels(tmp_path) -> None:
    clean = pq.read_table(make_preference_pairs(tmp_path / "clean.parquet", n_pairs=400, seed=5)).to_pydict()
    noisy_path = make_preference_pairs(tmp_path / "noisy.parquet", n_pairs=400, seed=5, label_noise=0.25)
    noisy = pq.read_table(noisy_path).to_pydict()
    for column in ("jpg_0", "jpg_1", "caption", "caption_0", "caption_1"):
        assert noisy[column] == clean[column], column
    flipped = [a != b for a, b in zip(clean["label_0"], noisy["label_0"], strict=True)]
    assert flipped == flipped_labels(400, 5, 0.25)
    assert 80 <= sum(flipped) <= 120  # 100 expected; binomial sd 8.7
    assert all(a + b == 1.0 for a, b in zip(noisy["label_0"], noisy["label_1"], strict=True))
    with pytest.raises(ValueError, match="label_noise"):
        make_preference_pairs(tmp_path / "bad.parquet", n_pairs=4, seed=5, label_noise=0.5)


def test_short_pretrain_writes_loadable_deterministic_folder(tmp_path) -> None:
    settings = {"steps": 3, "batch_size": 8, "n_images": 32, "warmup_steps": 1, "progress": False}
    path = pretrain(tmp_path / "a", **settings)
    index = json.loads((path / "model_index.json").read_text())
    assert index["vae"] == [None, None] and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert read_model_info(path)["pretrain"]["steps"] == 3
    model = load_toy_model(path)
    fresh = build_toy_model(seed=0)
    trained_weight = model.unet.conv_in.weight
    assert not torch.equal(trained_weight, fresh.unet.conv_in.weight)  # three AdamW steps moved it
    again = load_toy_model(pretrain(tmp_path / "b", **settings))
    for (name, p), q in zip(model.unet.state_dict().items(), again.unet.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert torch.equal(
        model.text_encoder.get_input_embeddings().weight, again.text_encoder.get_input_embeddings().weight
    )
    generic = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    assert torch.equal(generic.conv_in.weight, trained_weight)
    assert model.tokenize(["a red circle"]).tolist() == [[49406, 320, 736, 7117, 49407, 49407, 49407, 49407]]


def test_ensure_base_pretrains_into_cache_once(tmp_path, monkeypatch) -> None:
    small = toy_pretrain.PretrainConfig(steps=2, batch_size=8, n_images=16, warmup_steps=1)
    monkeypatch.setattr(toy_pretrain, "BASE_CONFIG", small)
    monkeypatch.setattr(toy_pretrain, "default_base_path", lambda: tmp_path / "no-committed-weights")
    path = toy_pretrain.ensure_base(cache_dir=tmp_path / "cache", progress=False)
    assert path == tmp_path / "cache" / f"base-{small.hash()}"
    assert read_model_info(path)["pretrain"]["steps"] == 2
    stamp = (path / "model_index.json").stat().st_mtime_ns
    assert toy_pretrain.ensure_base(cache_dir=tmp_path / "cache") == path
    assert (path / "model_index.json").stat().st_mtime_ns == stamp  # reused, not retrained
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]  # no temporary folder left behind


def _reference_ddim_cfg(model, prompts, noise, steps, guidance_scale, step_noises=None) -> torch.Tensor:
    """Independent DDIM with CFG: x0 = (x - sqrt(1-a) eps) / sqrt(a), clipped to [-1, 1]; with eta = 0
    (``step_noises`` None) x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps (eps unclipped, as diffusers' default);
    with eta = 1, sigma² = (1 - a_prev) / (1 - a) · (1 - a / a_prev) and x_prev = sqrt(a_prev) x0 +
    sqrt(1 - a_prev - sigma²) eps + sigma z_k. Trailing timesteps 999, 799, ..., 199 for steps = 5, and a_prev = 1
    after the last step. Runs in float64 on a copy of the UNet."""
    abar = model.scheduler.alphas_cumprod.double()
    stride = 1000 // steps
    cond = encode_prompts(model.text_encoder, model.tokenizer, prompts).double()
    uncond = encode_prompts(model.text_encoder, model.tokenizer, [""] * len(prompts)).double()
    unet = copy.deepcopy(model.unet).double()
    x = noise.double()
    for k, t in enumerate(range(999, 0, -stride)):
        eps_u = unet(x, t, encoder_hidden_states=uncond).sample
        eps_c = unet(x, t, encoder_hidden_states=cond).sample
        eps = eps_u + guidance_scale * (eps_c - eps_u)
        a, a_prev = abar[t], abar[t - stride] if t - stride >= 0 else torch.tensor(1.0, dtype=torch.float64)
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        var = 0.0 if step_noises is None else (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        x = a_prev.sqrt() * x0 + (1 - a_prev - var).sqrt() * eps
        if step_noises is not None:
            x = x + var.sqrt() * step_noises[k].double()
    return ((x + 1) / 2).clamp(0, 1).float()


@pytest.fixture(scope="module")
def base_model():
    path = default_base_path()
    assert (path / "model_index.json").is_file(), f"committed base missing at {path}: run diffalign.toy.pretrain"
    return load_toy_model(path)


def test_committed_base_generates_deterministically(base_model) -> None:
    m = base_model
    prompts = ["a red circle", "a blue square", "a yellow triangle", "a green circle"]
    kwargs = {"seed": 3, "steps": 5, "guidance_scale": 3.0, "eta": 0.0}
    first = generate(m.unet, m.text_encoder, m.tokenizer, m.scheduler, prompts, batch_size=4, **kwargs)
    assert first.shape == (4, 3, 16, 16) and first.dtype == torch.float32
    assert 0.0 <= first.min() and first.max() <= 1.0
    assert torch.equal(first, generate(m.unet, m.text_encoder, m.tokenizer, m.scheduler, prompts, **kwargs))
    one_by_one = generate(m.unet, m.text_encoder, m.tokenizer, m.scheduler, prompts, batch_size=1, **kwargs)
    torch.testing.assert_close(one_by_one, first, atol=1e-4, rtol=0)  # noise keyed per sample, not per batch
    other_seed = generate(m.unet, m.text_encoder, m.tokenizer, m.scheduler, prompts, seed=4, steps=5, eta=0.0)
    assert (other_seed - first).abs().max() > 0.1
    from diffalign.utils.randomness import per_sample_normal

    reference = _reference_ddim_cfg(m, prompts, per_sample_normal((3, 16, 16), 3, 0, range(4)), 5, 3.0)
    torch.testing.assert_close(first, reference, atol=1e-4, rtol=0)
    kwargs["eta"] = 1.0  # the evaluation default: ancestral steps whose noise is keyed by (seed, step, sample)
    stochastic = generate(m.unet, m.text_encoder, m.tokenizer, m.scheduler, prompts, **kwargs)
    assert torch.equal(stochastic, generate(m.unet, m.text_encoder, m.tokenizer, m.scheduler, prompts, **kwargs))
    assert (stochastic - first).abs().max() > 0.05
    step_noises = [per_sample_normal((3, 16, 16), 3, k + 1, range(4)) for k in range(5)]
    reference = _reference_ddim_cfg(m, prompts, per_sample_normal((3, 16, 16), 3, 0, range(4)), 5, 3.0, step_noises)
    torch.testing.assert_close(stochastic, reference, atol=1e-4, rtol=0)


def test_committed_base_metadata_and_quality(base_model, monkeypatch) -> None:
    info = read_model_info(default_base_path())
    assert info["space"] == "pixel" and 0.3 < info["eval"]["adherence"] < 0.8
    assert info["pretrain"] == dataclasses.asdict(BASE_CONFIG)  # ensure_base's cache key describes these weights
    schedule = scheduler_config()  # SD's scaled_linear 0.00085..0.012, also in the cache key
    assert {k: base_model.scheduler.config[k] for k in schedule} == schedule
    assert schedule["beta_schedule"] == "scaled_linear"
    digest = BASE_CONFIG.hash()
    monkeypatch.setattr(toy_pretrain, "scheduler_config", lambda: {**schedule, "beta_schedule": "linear"})
    assert BASE_CONFIG.hash() != digest  # a cached base of another schedule is not taken for this one
    # The base trains the UNet only: its text encoder is the seeded init, bit for bit.
    fresh = build_toy_model(seed=BASE_CONFIG.seed).text_encoder.state_dict()
    for name, value in base_model.text_encoder.state_dict().items():
        assert torch.equal(value, fresh[name]), name
    images = generate(
        base_model.unet, base_model.text_encoder, base_model.tokenizer, base_model.scheduler,
        all_prompts(), seed=0, steps=10,
    )  # fmt: skip
    report = summarize(images, all_prompts())
    assert report["no_shape"] <= 2 / 12  # the base draws shapes, not noise


def test_independent_pairs_differ_beyond_colour(tmp_path) -> None:
    table = pq.read_table(make_preference_pairs(tmp_path / "p.parquet", n_pairs=20, seed=3, kind="independent"))
    table = table.to_pydict()
    moved = 0
    for i in range(20):
        images, _, _ = check_pair_colours(table, i)
        arrays = [np.asarray(im, dtype=np.float64) / 255 for im in images]
        footprints = [(a.max(-1) - a.min(-1)) > 0.02 for a in arrays]
        moved += not np.array_equal(*footprints)
    assert moved >= 18  # the loser is its own draw, not the winner's footprint recoloured
    with pytest.raises(ValueError, match="kind"):
        make_preference_pairs(tmp_path / "x.parquet", n_pairs=2, seed=0, kind="nope")


def test_toy_pairs_cli_rejects_bad_label_noise(tmp_path, capsys) -> None:
    from diffalign.cli import main

    out = tmp_path / "pairs.parquet"
    assert main(["toy", "pairs", str(out), "--n-pairs", "4", "--label-noise", "0.6"]) == 2
    assert "label_noise=0.6 must be in [0, 0.5)" in capsys.readouterr().err and not out.exists()
    assert main(["toy", "pairs", str(out), "--n-pairs", "4", "--label-noise", "0.25"]) == 0
    assert capsys.readouterr().out.strip() == str(out) and pq.read_table(out).num_rows == 4
