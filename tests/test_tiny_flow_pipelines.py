"""The tiny Qwen-Image and Z-Image pipelines: saved with ``save_pretrained``, loaded back with the pipeline's
``from_pretrained`` with the network blocked, they generate finite, seed-reproducible images at 2 steps."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    DiffusionPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen3Model

from diffalign.models.tiny_qwen_image import QWEN_IMAGE_SCHEDULER_CONFIG, save_tiny_qwen_image_pipeline
from diffalign.models.tiny_z_image import Z_IMAGE_SCHEDULER_CONFIG, save_tiny_z_image_pipeline

PROMPT = "a photo of a red cat"
# name -> (saver, pipeline class, transformer class, VAE class, text encoder class, released scheduler config,
#          call kwargs that select the pipeline's default guidance path)
CASES: dict[str, tuple[Callable[..., Path], type, type, type, type, dict[str, Any], dict[str, Any]]] = {
    "qwen_image": (
        save_tiny_qwen_image_pipeline,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
        AutoencoderKLQwenImage,
        Qwen2_5_VLForConditionalGeneration,
        QWEN_IMAGE_SCHEDULER_CONFIG,
        {"negative_prompt": " ", "true_cfg_scale": 4.0},
    ),
    "z_image": (
        save_tiny_z_image_pipeline,
        ZImagePipeline,
        ZImageTransformer2DModel,
        AutoencoderKL,
        Qwen3Model,
        Z_IMAGE_SCHEDULER_CONFIG,
        {"guidance_scale": 5.0},
    ),
}


@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_flow")
    return {name: case[0](root / name) for name, case in CASES.items()}


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any socket connection raises, and the hub clients are told they are offline."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("network access attempted in an offline test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield


def _load(name: str, saved_dirs: dict[str, Path]) -> DiffusionPipeline:
    pipe = CASES[name][1].from_pretrained(saved_dirs[name])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe: DiffusionPipeline, seed: int, **kwargs: Any) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    out = pipe(PROMPT, num_inference_steps=2, height=32, width=32, generator=generator, output_type="pt", **kwargs)
    return out.images


@pytest.mark.parametrize("name", sorted(CASES))
def test_saved_pipeline_loads_offline_and_generates_reproducibly(
    name: str, saved_dirs: dict[str, Path], no_network: None
) -> None:
    _, pipeline_cls, transformer_cls, vae_cls, text_encoder_cls, scheduler_config, guidance = CASES[name]
    pipe = _load(name, saved_dirs)
    assert type(pipe) is pipeline_cls
    assert isinstance(pipe.transformer, transformer_cls)
    assert isinstance(pipe.vae, vae_cls)
    assert isinstance(pipe.text_encoder, text_encoder_cls)
    assert isinstance(pipe.tokenizer, Qwen2Tokenizer)
    for key, value in scheduler_config.items():
        assert pipe.scheduler.config[key] == value, key

    first = _generate(pipe, 0, **guidance)
    assert first.shape == (1, 3, 32, 32)
    assert torch.isfinite(first).all()
    assert 0.0 <= first.min() and first.max() <= 1.0
    assert first.std() > 0.01, "a constant image means the decoder or denoiser output collapsed"
    assert torch.equal(first, _generate(pipe, 0, **guidance))
    assert not torch.equal(first, _generate(pipe, 1, **guidance))


def test_qwen_image_tokenizer_drops_exactly_the_system_prompt(saved_dirs: dict[str, Path]) -> None:
    pipe = _load("qwen_image", saved_dirs)
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx
    # What is kept: the prompt's tokens plus the "<|im_end|>\n<|im_start|>assistant\n" suffix (5 tokens).
    prompts = [PROMPT, "a dog"]
    embeds, mask = pipe.encode_prompt(prompts, device=torch.device("cpu"))
    lengths = [len(pipe.tokenizer(prompt).input_ids) + 5 for prompt in prompts]
    assert embeds.shape == (2, max(lengths), pipe.text_encoder.config.text_config.hidden_size)
    assert mask.sum(dim=1).tolist() == lengths
    assert embeds[1, lengths[1] :].abs().sum() == 0


def test_z_image_prompt_embeds_cover_the_chat_template_tokens(saved_dirs: dict[str, Path]) -> None:
    pipe = _load("z_image", saved_dirs)
    text = pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert text == f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    positive, negative = pipe.encode_prompt(PROMPT, device=torch.device("cpu"), do_classifier_free_guidance=True)
    width = pipe.text_encoder.config.hidden_size
    assert [tuple(e.shape) for e in positive] == [(len(pipe.tokenizer(text).input_ids), width)]
    empty = pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": ""}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert [e.shape[0] for e in negative] == [len(pipe.tokenizer(empty).input_ids)]
