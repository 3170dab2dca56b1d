"""Reward models (``diffalign.rewards``) on tiny randomly-initialised CLIP / open_clip models saved to a temp dir.

Every score is checked against an independent computation (features from the underlying model, normalised by hand);
preprocessing is checked against transformers' ``CLIPImageProcessor`` and a PIL ``ResizeMaxSize`` on PIL images.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.models.clip_tokenizer import build_clip_tokenizer
from diffalign.rewards import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    REWARDS,
    AestheticMLP,
    CLIPScore,
    EmbeddingReward,
    HPSv2,
    JPEGCompressibility,
    LAIONAesthetic,
    PickScore,
    RewardModel,
    WeightedSum,
    build_reward,
    build_rewards,
    clip_preprocess,
    resolve_checkpoint,
)

PROMPTS = ["a red cube on a table", "two dogs playing in the snow"]
MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
TINY_OPEN_CLIP = "diffalign-test-tiny-hps"


def _tiny_clip_model(seed: int = 0):  # noqa: ANN202 - a transformers CLIPModel
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "vocab_size": 49408, "max_position_embeddings": 77}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(37.0))  # not CLIP's 100: PickScore must read it from the model
    return model


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ``CLIPModel`` + CLIP tokenizer + image processor (shortest side / crop 32) saved as a hub folder."""
    from transformers import CLIPImageProcessor

    folder = tmp_path_factory.mktemp("tiny_clip")
    _tiny_clip_model().save_pretrained(folder)
    build_clip_tokenizer().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tokenizer + image processor alone (PickScore reads them from a different repo than the model)."""
    from transformers import CLIPImageProcessor

    folder = tmp_path_factory.mktemp("tiny_processor")
    build_clip_tokenizer().save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _images(n: int = 2, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _reference_clip_features(folder: Path, pixels: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, ...]:
    """Image/text features straight from ``CLIPModel`` (text padded to the longest prompt only)."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(folder).eval()
    tokens = CLIPTokenizer.from_pretrained(folder)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    return img, txt, model.logit_scale.exp().detach()


def _manual_cos(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    return (img / img.norm(dim=-1, keepdim=True) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1)


# ----------------------------------------------------------------------------------------------- preprocessing


def _pil_test_images() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for height, width in [(300, 260), (90, 120), (64, 97)]:  # down-sampling, up-sampling, both, odd sizes
        yy, xx = np.mgrid[0:height, 0:width]
        smooth = np.stack([np.sin(xx / 17 + c) * np.cos(yy / 23 - c) for c in range(3)], -1) * 0.4 + 0.5
        smooth = np.clip(smooth + rng.normal(0, 0.05, smooth.shape), 0, 1)
        out.append((f"smooth{height}x{width}", (smooth * 255).round().astype(np.uint8)))
        out.append((f"noise{height}x{width}", rng.integers(0, 256, (height, width, 3), dtype=np.uint8)))
    return out


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255


def test_preprocess_matches_clip_image_processor() -> None:
    """Torch bicubic (antialias, two clipped passes) vs PIL: only PIL's uint8 rounding differs, ≈ 1 level / std."""
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processors = [CLIPImageProcessorPil(), CLIPImageProcessor()]
    for name, array in _pil_test_images():
        ours = clip_preprocess(_to_tensor(array))
        assert ours.shape == (1, 3, 224, 224)
        for processor in processors:
            ref = processor(images=Image.fromarray(array), return_tensors="pt")["pixel_values"]
            ref = torch.as_tensor(np.asarray(ref))
            diff = (ours - ref).abs()
            # measured: max 0.016, mean 0.0046 (one uint8 level is 1/255/0.26 = 0.015 after normalisation)
            assert diff.max() < 0.02, (name, type(processor).__name__, diff.max())
            assert diff.mean() < 0.006, (name, type(processor).__name__, diff.mean())
    # an image already at the target size is only normalised
    x = _images(1, 224, 224)
    assert torch.allclose(clip_preprocess(x), (x - MEAN) / STD, atol=1e-6)


def test_preprocess_pad_mode_matches_resize_max_size() -> None:
    """HPSv2's ``ResizeMaxSize``: longest side → size (PIL bicubic), zero pad centred, then normalise."""
    for name, array in _pil_test_images()[:4]:
        height, width = array.shape[:2]
        scale = 224 / max(height, width)
        new_h, new_w = round(height * scale), round(width * scale)
        resized = np.asarray(Image.fromarray(array).resize((new_w, new_h), Image.BICUBIC))
        canvas = np.zeros((224, 224, 3), dtype=np.uint8)
        top, left = (224 - new_h) // 2, (224 - new_w) // 2
        canvas[top : top + new_h, left : left + new_w] = resized
        ref = (_to_tensor(canvas) - MEAN) / STD
        ours = clip_preprocess(_to_tensor(array), size=224, mode="pad")
        diff = (ours - ref).abs()
        assert diff.max() < 0.02 and diff.mean() < 0.006, (name, diff.max(), diff.mean())
        # the padding is exact black
        pad = (torch.zeros(1, 3, 1, 1) - MEAN) / STD
        if top:
            assert torch.allclose(ours[..., :top, :], pad.expand(1, 3, top, 224))
        if left:
            assert torch.allclose(ours[..., :, :left], pad.expand(1, 3, 224, left))


def test_preprocess_is_differentiable_and_checks_input() -> None:
    x = _images(2, 50, 70).requires_grad_()
    clip_preprocess(x, size=32).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        clip_preprocess(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="resize mode"):
        clip_preprocess(torch.rand(1, 3, 32, 32), mode="stretch")


# ----------------------------------------------------------------------------------------------- CLIPScore / PickScore


def test_clip_score_scales_match_independent_computation(clip_dir: Path) -> None:
    images = _images()
    img, txt, _ = _reference_clip_features(clip_dir, (images - MEAN) / STD, PROMPTS)
    cos = _manual_cos(img, txt)
    expected = {
        "flow_grpo": 100 * cos / 30,
        "hessel": 2.5 * torch.clamp(cos, min=0),
        "torchmetrics": torch.clamp(100 * cos, min=0),
    }
    for scale, want in expected.items():
        reward = CLIPScore.from_pretrained(clip_dir, scale=scale, local_files_only=True)
        assert isinstance(reward, EmbeddingReward) and reward.differentiable
        got = reward(images, PROMPTS)
        assert got.dtype == torch.float32 and got.shape == (2,)
        assert torch.allclose(got, want, atol=1e-5), (scale, got, want)
        embeds = reward.score_embeds(reward.image_embeds(images), reward.text_embeds(PROMPTS))
        assert torch.allclose(got, embeds, atol=1e-6)
    # the clamps of the Hessel / torchmetrics scales, on embeddings with cos = +1 and -1
    reward = CLIPScore.from_pretrained(clip_dir, local_files_only=True)
    unit, anti = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[2.0, 0.0], [-3.0, 0.0]])
    for scale, want in {"flow_grpo": [100 / 30, -100 / 30], "hessel": [2.5, 0.0], "torchmetrics": [100.0, 0.0]}.items():
        reward.scale = scale
        assert torch.allclose(reward.score_embeds(unit, anti), torch.tensor(want)), scale
    with pytest.raises(ValueError, match="scale must be one of"):
        CLIPScore(reward.model, reward.tokenizer, scale="clip")


def test_clip_score_resizes_like_the_clip_processor(clip_dir: Path) -> None:
    """Non-square images: the reward on torch-preprocessed pixels ≈ the score on ``CLIPImageProcessor`` pixels."""
    from transformers import CLIPImageProcessor

    images = _images(2, 48, 64, seed=3)
    uint8 = (images * 255).round().to(torch.uint8)
    processor = CLIPImageProcessor.from_pretrained(clip_dir)
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in uint8]
    pixels = torch.as_tensor(np.asarray(processor(images=pil, return_tensors="pt")["pixel_values"]))
    img, txt, _ = _reference_clip_features(clip_dir, pixels, PROMPTS)
    reward = CLIPScore.from_pretrained(clip_dir, scale="torchmetrics", local_files_only=True)
    got = reward(uint8.float() / 255, PROMPTS)
    assert torch.allclose(got, torch.clamp(100 * _manual_cos(img, txt), min=0), atol=0.05)


def test_pickscore_matches_logit_scale_times_cosine(clip_dir: Path, tokenizer_dir: Path) -> None:
    images = _images(seed=1)
    img, txt, logit_scale = _reference_clip_features(clip_dir, (images - MEAN) / STD, PROMPTS)
    assert logit_scale.item() == pytest.approx(37.0, rel=1e-5)
    want = logit_scale * _manual_cos(img, txt)
    raw = PickScore.from_pretrained(clip_dir, processor=tokenizer_dir, local_files_only=True)
    assert isinstance(raw, EmbeddingReward)
    assert torch.allclose(raw(images, PROMPTS), want, atol=1e-4)
    flow = PickScore.from_pretrained(clip_dir, processor=None, tokenizer=tokenizer_dir, normalize=26.0,
                                     local_files_only=True)
    assert torch.allclose(flow(images, PROMPTS), want / 26.0, atol=1e-5)
    # the text tower sees the prompts: swapping them changes the scores
    assert not torch.allclose(raw(images, PROMPTS[::-1]), raw(images, PROMPTS))


def test_clip_rewards_are_frozen_and_stay_in_eval(clip_dir: Path) -> None:
    reward = PickScore.from_pretrained(clip_dir, processor=None, local_files_only=True).to("cpu")
    reward.train()
    assert not reward.model.training
    assert all(not p.requires_grad for p in reward.parameters())


# ----------------------------------------------------------------------------------------------- HPSv2


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - an open_clip CLIP
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip_cfg")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    (folder / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{TINY_OPEN_CLIP}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_OPEN_CLIP, pretrained=None).eval()
    with torch.no_grad():  # open_clip zero-inits some projections; make every weight informative
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model


def test_hpsv2_loads_checkpoint_and_scores_raw_cosine(tiny_open_clip, tmp_path: Path) -> None:  # noqa: ANN001
    import open_clip

    state = {f"module.{k}": v for k, v in tiny_open_clip.state_dict().items()}
    checkpoint = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": state}, checkpoint)
    reward = HPSv2.from_pretrained(checkpoint, model_name=TINY_OPEN_CLIP)
    assert isinstance(reward, EmbeddingReward) and reward.preprocess.mode == "pad"

    images = _images(seed=2)
    tokens = open_clip.get_tokenizer(TINY_OPEN_CLIP)(PROMPTS)
    with torch.no_grad():
        img, txt, _ = tiny_open_clip((images - MEAN) / STD, tokens)  # open_clip returns normalised features
    want = torch.diagonal(img @ txt.T)
    assert torch.allclose(reward(images, PROMPTS), want, atol=1e-5)

    bare = tmp_path / "bare.pt"
    torch.save(tiny_open_clip.state_dict(), bare)
    assert torch.allclose(HPSv2.from_pretrained(bare, model_name=TINY_OPEN_CLIP)(images, PROMPTS), want, atol=1e-5)

    wrong = tmp_path / "wrong.pt"
    torch.save({"state_dict": {"visual.proj": torch.zeros(3)}}, wrong)
    with pytest.raises(ValueError, match="does not match open_clip"):
        HPSv2.from_pretrained(wrong, model_name=TINY_OPEN_CLIP)
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in tiny_open_clip.state_dict().items() if k != "logit_scale"}, partial)
    with pytest.raises(ValueError, match=r"missing keys \['logit_scale'\]"):
        HPSv2.from_pretrained(partial, model_name=TINY_OPEN_CLIP)
    with pytest.raises(ValueError, match="add_model_config"):
        HPSv2.from_pretrained(bare, model_name="no-such-architecture")


def test_missing_checkpoints_say_what_to_do(tmp_path: Path) -> None:
    missing = tmp_path / "HPS_v2.1_compressed.pt"
    with pytest.raises(FileNotFoundError, match="HPS_v2.1_compressed.pt does not exist") as info:
        HPSv2.from_pretrained(missing, model_name=TINY_OPEN_CLIP)
    assert str(missing) in str(info.value) and "xswu/HPSv2" in str(info.value)
    with pytest.raises(FileNotFoundError, match="improved-aesthetic-predictor"):
        LAIONAesthetic.from_pretrained(tmp_path / "head.pth", clip=tmp_path)
    # a hub file name with local_files_only: only the cache is searched, and the message says how to fill it
    with pytest.raises(FileNotFoundError, match="hf download diffalign-nobody/none weights.pt"):
        resolve_checkpoint("diffalign-nobody/none/weights.pt", local_files_only=True)


# ----------------------------------------------------------------------------------------------- aesthetic


def _aesthetic_state(dim: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    shapes = {"layers.0": (1024, dim), "layers.2": (128, 1024), "layers.4": (64, 128), "layers.6": (16, 64),
              "layers.7": (1, 16)}
    state = {}
    for name, (out, inp) in shapes.items():
        state[f"{name}.weight"] = torch.randn(out, inp, generator=g) / math.sqrt(inp)
        state[f"{name}.bias"] = torch.randn(out, generator=g) * 0.1
    return state


def test_aesthetic_loads_original_key_names_and_scores(clip_dir: Path, tmp_path: Path) -> None:
    state = _aesthetic_state(16)
    assert set(AestheticMLP(16).state_dict()) == set(state)
    head = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(state, head)
    reward = LAIONAesthetic.from_pretrained(head, clip=clip_dir, local_files_only=True)
    assert isinstance(reward, RewardModel) and not isinstance(reward, EmbeddingReward)

    images = _images(seed=4)
    img, _, _ = _reference_clip_features(clip_dir, (images - MEAN) / STD, PROMPTS)
    x = img / img.norm(dim=-1, keepdim=True)
    for layer in ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7"):  # linear, no activations
        x = x @ state[f"{layer}.weight"].T + state[f"{layer}.bias"]
    reward.train()  # dropouts stay off
    got = reward(images, ["ignored", "prompts"])
    assert torch.allclose(got, x.squeeze(-1), atol=1e-5)
    assert torch.equal(got, reward(images, ["other", "text"]))

    bad = tmp_path / "bad.pth"
    torch.save({"layers.0.weight": torch.zeros(1024, 16)}, bad)
    with pytest.raises(ValueError, match="not an aesthetic-predictor head"):
        LAIONAesthetic.from_pretrained(bad, clip=clip_dir, local_files_only=True)


# ----------------------------------------------------------------------------------------------- JPEG


def _jpeg_kb(image: torch.Tensor) -> float:
    array = (image * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


def test_jpeg_compressibility() -> None:
    flat = torch.full((1, 3, 64, 64), 0.5)
    images = torch.cat([flat, _images(1, 64, 64)]).requires_grad_()
    reward = JPEGCompressibility()
    assert isinstance(reward, RewardModel) and not reward.differentiable
    got = reward(images, ["", ""])
    assert got.dtype == torch.float32 and not got.requires_grad
    assert got[0] > got[1]  # flat compresses smaller than noise
    want = torch.tensor([-_jpeg_kb(im) / 500 for im in images.detach()])
    assert torch.allclose(got, want)
    ddpo = JPEGCompressibility(scale=1)(images, ["", ""])
    assert torch.allclose(ddpo, want * 500)


# ----------------------------------------------------------------------------------------------- combine / registry


class _Constant:
    differentiable = True

    def __init__(self, name: str, value: float) -> None:
        self.name, self.value = name, value

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3)) * 0 + self.value


def test_weighted_sum_and_per_reward(clip_dir: Path) -> None:
    images = _images(seed=6)
    clip = CLIPScore.from_pretrained(clip_dir, local_files_only=True)
    jpeg = JPEGCompressibility()
    combo = WeightedSum([clip, jpeg, _Constant("const", 2.0)], [0.5, 2.0, -1.0])
    parts = combo.per_reward(images, PROMPTS)
    assert list(parts) == ["clip_score", "jpeg_compressibility", "const"]
    want = 0.5 * clip(images, PROMPTS) + 2.0 * jpeg(images, PROMPTS) - 2.0
    assert torch.allclose(combo(images, PROMPTS), want, atol=1e-6)
    assert torch.allclose(combo.combine(parts), want, atol=1e-6)
    assert not combo.differentiable and WeightedSum([clip, _Constant("c", 1.0)]).differentiable
    assert list(WeightedSum([_Constant("c", 1.0), _Constant("c", 2.0)]).per_reward(images, PROMPTS)) == ["c_1", "c_2"]
    with pytest.raises(ValueError, match="2 rewards but 1 weights"):
        WeightedSum([clip, jpeg], [1.0])


def test_registry_builds_by_name_and_lists_valid_names(clip_dir: Path) -> None:
    assert {"clip_score", "pickscore", "hpsv2", "aesthetic", "jpeg_compressibility"} <= set(REWARDS)
    jpeg = build_reward({"name": "jpeg_compressibility", "scale": 1})
    assert isinstance(jpeg, JPEGCompressibility) and jpeg.scale == 1
    clip = build_reward({"name": "clip_score", "model": str(clip_dir), "local_files_only": True, "scale": "hessel"})
    assert isinstance(clip, CLIPScore) and clip.scale == "hessel"
    assert build_rewards("jpeg_compressibility").__class__ is JPEGCompressibility
    combo = build_rewards(["jpeg_compressibility", {"name": "jpeg_compressibility", "scale": 1}], [1.0, 0.5])
    images = _images()
    assert isinstance(combo, WeightedSum)
    want = JPEGCompressibility()(images, PROMPTS) + 0.5 * JPEGCompressibility(scale=1)(images, PROMPTS)
    assert torch.allclose(combo(images, PROMPTS), want)
    assert isinstance(build_rewards({"jpeg_compressibility": 3.0}), WeightedSum)
    with pytest.raises(ValueError, match="unknown reward 'imagereward'; valid names: aesthetic, clip_score"):
        build_reward("imagereward")
    with pytest.raises(ValueError, match="has no 'name'"):
        build_reward({"scale": 1})
    with pytest.raises(TypeError, match="could not be built"):
        build_reward({"name": "jpeg_compressibility", "sclae": 1})
    with pytest.raises(ValueError, match="2 reward specs but 1 weights"):
        build_rewards(["jpeg_compressibility", "jpeg_compressibility"], [1.0])


# ----------------------------------------------------------------------------------------------- gradients, errors


def test_gradients_reach_the_images(clip_dir: Path, tiny_open_clip, tmp_path: Path) -> None:  # noqa: ANN001
    checkpoint = tmp_path / "hps.pt"
    torch.save({"state_dict": tiny_open_clip.state_dict()}, checkpoint)
    head = tmp_path / "head.pth"
    torch.save(_aesthetic_state(16), head)
    rewards = [
        CLIPScore.from_pretrained(clip_dir, local_files_only=True),
        PickScore.from_pretrained(clip_dir, processor=None, local_files_only=True),
        HPSv2.from_pretrained(checkpoint, model_name=TINY_OPEN_CLIP),
        LAIONAesthetic.from_pretrained(head, clip=clip_dir, local_files_only=True),
    ]
    for reward in rewards:
        assert reward.differentiable
        images = _images(2, 48, 40, seed=7).requires_grad_()
        reward(images, PROMPTS).sum().backward()
        assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()
        assert all(p.grad is None for p in reward.parameters()), reward.name


@pytest.mark.parametrize("bad", [torch.rand(3, 32, 32), torch.rand(2, 4, 32, 32), torch.rand(2, 1, 32, 32)])
def test_wrong_image_shapes_are_rejected(clip_dir: Path, bad: torch.Tensor) -> None:
    for reward in (CLIPScore.from_pretrained(clip_dir, local_files_only=True), JPEGCompressibility()):
        with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
            reward(bad, PROMPTS)


def test_prompt_count_is_checked(clip_dir: Path) -> None:
    reward = CLIPScore.from_pretrained(clip_dir, local_files_only=True)
    with pytest.raises(ValueError, match=r"one prompt per image \(2\), got 3"):
        reward(_images(), PROMPTS + ["extra"])
    with pytest.raises(ValueError, match="a single string"):
        reward(_images(), "one prompt")
    with pytest.raises(ValueError, match="one prompt per image"):
        WeightedSum([JPEGCompressibility()])(_images(), ["x"])
