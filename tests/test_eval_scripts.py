"""scripts/generate.py and scripts/evaluate.py (logic in diffalign.eval): generation on the committed toy bases
(fixed seeds, resumable, --weights), evaluation (scores match the reward functions, win rate and its bootstrap
interval by hand, report and figures written, clear errors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.eval.cli import evaluate_main, generate_main
from diffalign.eval.evaluation import evaluate_folders
from diffalign.eval.folders import load_image_folder
from diffalign.eval.generation import METADATA, NOISE_STRIDE, image_name, load_generator, to_uint8
from diffalign.eval.winrate import bootstrap_interval, per_prompt_win_rates, win_rate
from diffalign.models.rollout import SamplerSettings, rollout
from diffalign.rewards import build_reward
from diffalign.toy.flow_pretrain import ensure_flow_base
from diffalign.toy.pretrain import ensure_base
from diffalign.toy.world import ShapeSpec, render_array

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "a blue square", "a green triangle"]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("# toy prompts\n" + "\n".join(PROMPTS) + "\n")
    return path


def _generate(model: Path, prompts: Path, out: Path, *extra: str) -> dict:
    args = ["--model", str(model), "--prompts", str(prompts), "--output-dir", str(out), "--n-per-prompt", "2"]
    args += ["--steps", "3", "--guidance-scale", "3", "--batch-size", "4", "--no-progress", *extra]
    return generate_main(args)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _png_array(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("base", ["flow", "unet"])
def test_generate_writes_seeded_images_and_metadata(tmp_path, prompt_file, base):
    model = ensure_flow_base() if base == "flow" else ensure_base()
    summary = _generate(model, prompt_file, tmp_path / "a")
    assert summary["complete"] and summary["generated"] == 6 and summary["skipped"] == 0
    assert summary["sampler"] == ("ode" if base == "flow" else "ddim") and summary["resolution"] == 16
    entries = [json.loads(line) for line in (tmp_path / "a" / METADATA).read_text().splitlines()]
    assert [(e["prompt_index"], e["sample_index"]) for e in entries] == [(p, s) for p in range(3) for s in range(2)]
    for e in entries:
        assert e["prompt"] == PROMPTS[e["prompt_index"]] and e["seed"] == 0
        assert e["noise_index"] == e["prompt_index"] * NOISE_STRIDE + e["sample_index"]
        assert e["file"] == image_name(e["prompt_index"], e["sample_index"]) and (tmp_path / "a" / e["file"]).is_file()
    # each image is the rollout of its own (seed, noise index), whatever the batch
    adapter = load_generator(model)
    settings = SamplerSettings(kind=summary["sampler"], steps=3, guidance_scale=3.0, noise_level=0.0, resolution=16)
    e = entries[3]
    alone = rollout(adapter, [e["prompt"]], settings, seed=0, indices=[e["noise_index"]])
    np.testing.assert_array_equal(_png_array(tmp_path / "a" / e["file"]), to_uint8(alone.images)[0])
    # the image of (p, s) does not depend on --n-per-prompt or the batch size (up to float rounding: the batched
    # forward's kernels can differ in the last bit, which moves a pixel by at most one level)
    _generate(model, prompt_file, tmp_path / "b", "--n-per-prompt", "1", "--batch-size", "1")
    for path in (tmp_path / "b").glob("*.png"):
        diff = np.abs(_png_array(path).astype(int) - _png_array(tmp_path / "a" / path.name))
        assert diff.max() <= 1 and diff.mean() < 0.01


def test_generate_latent_model_with_vae(tmp_path, prompt_file, tiny_sd_dirs):
    summary = _generate(tiny_sd_dirs["eps"], prompt_file, tmp_path / "sd", "--n-per-prompt", "1")
    folder = load_image_folder(tmp_path / "sd")
    assert summary["complete"] and summary["sampler"] == "ddim"
    assert folder.images.shape == (3, 3, summary["resolution"], summary["resolution"])


def test_resume_after_interruption_gives_identical_files(tmp_path, prompt_file):
    model = ensure_flow_base()
    _generate(model, prompt_file, tmp_path / "full", "--sampler", "sde")
    partial = tmp_path / "partial"
    first = _generate(model, prompt_file, partial, "--sampler", "sde", "--max-new-images", "3")
    assert first["generated"] == 3 and not first["complete"]
    written = sorted(p for p in partial.glob("*.png"))
    assert len(written) == 3
    old = 1_000_000_000
    for path in written:
        os.utime(path, ns=(old, old))
    with open(partial / METADATA, "a") as log:
        log.write('{"file": "p00001_s00')  # an append cut short by the interruption
    second = _generate(model, prompt_file, partial, "--sampler", "sde")
    assert second["generated"] == 3 and second["skipped"] == 3 and second["complete"]
    assert all(path.stat().st_mtime_ns == old for path in written)  # earlier images not written again
    assert _files(partial) == _files(tmp_path / "full")  # PNGs, metadata.jsonl and generation.json byte-equal
    third = _generate(model, prompt_file, partial, "--sampler", "sde")
    assert third["generated"] == 0 and third["skipped"] == 6
    with pytest.raises(ValueError, match="steps"):
        _generate(model, prompt_file, partial, "--sampler", "sde", "--steps", "4")


def test_weights_full_fine_tune_and_lora(tmp_path, prompt_file):
    from diffalign.models.lora import add_lora, save_lora

    # full weights: a perturbed transformer saved as a run's transformer/
    base = ensure_flow_base()
    adapter = load_generator(base)
    with torch.no_grad():
        for param in adapter.denoiser.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    adapter.denoiser.save_pretrained(tmp_path / "full_run" / "transformer")
    _generate(base, prompt_file, tmp_path / "base", "--n-per-prompt", "1")
    _generate(base, prompt_file, tmp_path / "tuned", "--n-per-prompt", "1", "--weights", str(tmp_path / "full_run"))
    settings = SamplerSettings(kind="ode", steps=3, guidance_scale=3.0, noise_level=0.0, resolution=16)
    indices = [p * NOISE_STRIDE for p in range(3)]
    expected = to_uint8(rollout(adapter, PROMPTS, settings, seed=0, indices=indices).images)
    tuned = np.stack([_png_array(tmp_path / "tuned" / image_name(p, 0)) for p in range(3)])
    np.testing.assert_array_equal(tuned, expected)
    base_images = np.stack([_png_array(tmp_path / "base" / image_name(p, 0)) for p in range(3)])
    assert np.abs(tuned.astype(int) - base_images).max() > 10

    # LoRA on the toy UNet base, in diffusers' format as the trainers save it (fused when loaded)
    unet_base = ensure_base()
    adapter = load_generator(unet_base)
    params = add_lora(adapter.denoiser, rank=4)
    with torch.no_grad():
        for i, param in enumerate(params):
            param.copy_(0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(i)))
    save_lora(adapter.denoiser, tmp_path / "lora_run")
    _generate(unet_base, prompt_file, tmp_path / "lora", "--n-per-prompt", "1", "--weights", str(tmp_path / "lora_run"))
    _generate(unet_base, prompt_file, tmp_path / "unet", "--n-per-prompt", "1")
    settings = SamplerSettings(kind="ddim", steps=3, guidance_scale=3.0, noise_level=0.0, resolution=16)
    expected = rollout(adapter, PROMPTS, settings, seed=0, indices=[p * NOISE_STRIDE for p in range(3)]).images
    lora = np.stack([_png_array(tmp_path / "lora" / image_name(p, 0)) for p in range(3)])
    assert np.abs(lora.astype(int) - to_uint8(expected).astype(int)).max() <= 1  # fused vs unfused: rounding
    plain = np.stack([_png_array(tmp_path / "unet" / image_name(p, 0)) for p in range(3)])
    assert np.abs(lora.astype(int) - plain).max() > 10


def _write_folder(folder: Path, rows: list[tuple[int, int, str, np.ndarray]], seed: int = 0) -> None:
    """A generated-style folder by hand: (prompt index, sample index, prompt, float HWC image)."""
    folder.mkdir(parents=True)
    lines = []
    for p, s, prompt, array in rows:
        name = image_name(p, s)
        Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(folder / name)
        lines.append(json.dumps({"file": name, "prompt": prompt, "prompt_index": p, "sample_index": s, "seed": seed}))
    (folder / METADATA).write_text("\n".join(lines) + "\n")


def _toy_image(colour: str | None, shape: str, x: float = 8.0) -> np.ndarray:
    """Gold score 1 (right colour and shape), 0.5 (wrong colour), 0 (``colour=None``: blank grey)."""
    if colour is None:
        return np.full((16, 16, 3), 0.3, dtype=np.float32)
    return render_array(ShapeSpec(colour=colour, shape=shape, size=4.5, cx=x, cy=8.0, background=0.2))


@pytest.fixture(scope="module")
def synthetic_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    """Two folders with known toy_gold scores; returns them and the hand-computed win rate of A over B."""
    root = tmp_path_factory.mktemp("synthetic")
    gold_a = {0: [1.0, 1.0, 0.5], 1: [1.0, 0.0, 0.5]}
    gold_b = {0: [0.5, 1.0, 1.0], 1: [0.0, 0.0, 0.0]}
    # prompt 0: A vs B = win, tie, loss -> 1/2; prompt 1: win, tie, win -> 5/6; mean over prompts 2/3
    prompts = {0: ("a red circle", "red", "circle", "blue"), 1: ("a blue square", "blue", "square", "green")}

    def image(p: int, s: int, gold: float) -> np.ndarray:
        _, colour, shape, wrong = prompts[p]
        colour = {1.0: colour, 0.5: wrong, 0.0: None}[gold]
        return _toy_image(colour, shape, x=6.0 + 2 * s)

    for name, gold in (("a", gold_a), ("b", gold_b)):
        rows = [(p, s, prompts[p][0], image(p, s, g)) for p in gold for s, g in enumerate(gold[p])]
        _write_folder(root / name, rows)
    return root / "a", root / "b", (0.5 + 5 / 6) / 2


def test_win_rate_by_hand_and_bootstrap(synthetic_pair, tmp_path):
    a, b, expected = synthetic_pair
    gold = build_reward("toy_gold")
    folder_a, folder_b = load_image_folder(a), load_image_folder(b)
    assert gold(folder_a.images, folder_a.prompts).tolist() == [1.0, 1.0, 0.5, 1.0, 0.0, 0.5]
    assert gold(folder_b.images, folder_b.prompts).tolist() == [0.5, 1.0, 1.0, 0.0, 0.0, 0.0]
    summary = evaluate_folders(a, tmp_path / "out", images_b=b, rewards=["toy_gold"], n_bootstrap=500)
    wr = summary["win_rates"]["toy_gold"]
    assert wr["estimate"] == pytest.approx(expected, abs=1e-12)
    assert (wr["wins"], wr["ties"], wr["losses"]) == (3, 2, 1)
    assert wr["low"] <= wr["estimate"] <= wr["high"] and wr["low"] < wr["high"]
    again = evaluate_folders(a, tmp_path / "again", images_b=b, rewards=["toy_gold"], n_bootstrap=500)
    assert again["win_rates"]["toy_gold"] == wr  # deterministic for a seed
    # the interval by hand: resample the two prompts' win rates with numpy's generator
    per_prompt = np.array([0.5, 5 / 6])
    means = per_prompt[np.random.default_rng(0).integers(0, 2, size=(500, 2))].mean(1)
    assert (wr["low"], wr["high"]) == tuple(np.percentile(means, [2.5, 97.5]))


def test_win_rate_functions():
    a = np.array([3.0, 1.0, 2.0, 5.0, 5.0])
    b = np.array([1.0, 1.0, 4.0, 0.0, 6.0])
    np.testing.assert_allclose(per_prompt_win_rates(a, b, [7, 7, 7, 2, 2]), [0.5, 0.5])
    result = win_rate(a, b, [7, 7, 7, 2, 2], n_resamples=0)
    assert result.estimate == 0.5 and result.low is None and (result.wins, result.ties, result.losses) == (2, 1, 2)
    values = np.random.default_rng(1).random(30)
    lo, hi = bootstrap_interval(values, n_resamples=200, seed=3)
    assert (lo, hi) == bootstrap_interval(values, n_resamples=200, seed=3)
    assert (lo, hi) != bootstrap_interval(values, n_resamples=200, seed=4)
    assert lo < values.mean() < hi
    assert bootstrap_interval(np.full(5, 0.25), seed=0) == (0.25, 0.25)


def test_evaluate_scores_report_and_figures(tmp_path, synthetic_pair):
    a, b, _ = synthetic_pair
    out = tmp_path / "eval"
    rewards = "toy_gold,toy_reward_model,jpeg_compressibility"
    evaluate_main(["--images", str(a), "--images-b", str(b), "--rewards", rewards, "--output-dir", str(out)])
    import csv

    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 12 and [r["model"] for r in rows] == ["A"] * 6 + ["B"] * 6
    for label, folder in (("A", a), ("B", b)):
        loaded = load_image_folder(folder)
        mine = [r for r in rows if r["model"] == label]
        assert [r["file"] for r in mine] == loaded.files and [r["prompt"] for r in mine] == loaded.prompts
        for name in rewards.split(","):
            direct = build_reward(name)(loaded.images, loaded.prompts).double().numpy()
            np.testing.assert_allclose([float(r[name]) for r in mine], direct, rtol=1e-6, atol=1e-9)
    report = (out / "report.md").read_text()
    assert "## Win rate of A over B" in report and "| toy_gold | 0.6667 |" in report
    assert "pvs" in report and "toy_diversity" in report and "embedding_spread_toy_reward_model" in report
    pngs = ["grid_A.png", "grid_B.png", "grid_A_vs_B.png", "hist_toy_gold.png", "scatter_toy_gold.png", "win_rates.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"]["A"]["toy"]["colour_adherence"] == pytest.approx(3 / 6)  # 3 right, 2 wrong, 1 blank
    assert (out / "per_prompt.csv").is_file()


def test_evaluate_errors_name_the_problem(tmp_path, synthetic_pair):
    a, _, _ = synthetic_pair
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        evaluate_folders(empty, tmp_path / "out")
    other = tmp_path / "other"
    _write_folder(other, [(p, s, "a green circle" if p == 1 else "a red circle", _toy_image("red", "circle"))
                          for p in range(2) for s in range(3)])  # fmt: skip
    with pytest.raises(ValueError, match=r"prompts differ at prompt_index 1: .*p00001_s0000.png"):
        evaluate_folders(a, tmp_path / "out", images_b=other)
    short = tmp_path / "short"
    _write_folder(short, [(0, s, "a red circle", _toy_image("red", "circle")) for s in range(3)])
    with pytest.raises(ValueError, match="prompt_index 1, sample_index 0"):
        evaluate_folders(a, tmp_path / "out", images_b=short)
    bad = tmp_path / "bad"
    _write_folder(bad, [(0, 0, "a red circle", _toy_image("red", "circle"))])
    (bad / METADATA).write_text('{"file": "p00000_s0000.png", "prompt_index": 0, "sample_index": 0}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl line 1: missing key\(s\) \['prompt'\]"):
        evaluate_folders(bad, tmp_path / "out")
    with pytest.raises(ValueError, match="not among the requested rewards"):
        evaluate_folders(a, tmp_path / "out", rewards=["toy_gold"], reward_options={"clip_score": {}})


def test_scripts_run_end_to_end(tmp_path, prompt_file):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    gen = [sys.executable, str(REPO / "scripts" / "generate.py"), "--model", str(ensure_flow_base()), "--prompts",
           str(prompt_file), "--n-per-prompt", "2", "--steps", "2", "--output-dir", str(tmp_path / "gen")]  # fmt: skip
    done = subprocess.run(gen, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "complete; 6 generated, 0 already present" in done.stdout
    ev = [sys.executable, str(REPO / "scripts" / "evaluate.py"), "--images", str(tmp_path / "gen"), "--output-dir",
          str(tmp_path / "eval"), "--bootstrap", "100"]  # fmt: skip
    done = subprocess.run(ev, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "toy_gold" in done.stdout and (tmp_path / "eval" / "report.md").is_file()
