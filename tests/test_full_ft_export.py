"""A full fine-tune writes a pipeline folder: the base's ``model_index.json`` and its other components (relative
symlinks, or copies where symlinks fail; a hub base from its cached snapshot) beside the trained denoiser, loadable
offline by the pipeline class and by ``DiffusionPipeline``; SAIL's round export writes the same layout."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    QwenImagePipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    ZImagePipeline,
)
from helpers_config import tiny_lora_config
from safetensors.torch import load_file

from diffalign.config import ModelConfig
from diffalign.data.synthetic import make_random_pairs, write_pickapic_parquet
from diffalign.models.components import ModelNotFoundError
from diffalign.models.export import PipelineBase, pipeline_base, write_pipeline_folder
from diffalign.models.tiny import save_tiny_sd_pipeline
from diffalign.models.tiny_flux import save_tiny_flux_pipeline
from diffalign.models.tiny_qwen_image import save_tiny_qwen_image_pipeline
from diffalign.models.tiny_sd3 import save_tiny_sd3_pipeline
from diffalign.models.tiny_sdxl import save_tiny_sdxl_pipeline
from diffalign.models.tiny_z_image import save_tiny_z_image_pipeline
from diffalign.trainers.checkpointing import list_checkpoints
from diffalign.trainers.sail import export_model
from diffalign.trainers.sft import SFTTrainer

BACKBONES = {  # (write the tiny base, its pipeline class, the denoiser's subfolder, options)
    "sd": (save_tiny_sd_pipeline, StableDiffusionPipeline, "unet", {}),
    "sdxl": (save_tiny_sdxl_pipeline, StableDiffusionXLPipeline, "unet", {}),
    "sd3": (save_tiny_sd3_pipeline, StableDiffusion3Pipeline, "transformer", {"with_t5": True}),  # as SD3 ships
    "flux": (save_tiny_flux_pipeline, FluxPipeline, "transformer", {}),
    "qwen_image": (save_tiny_qwen_image_pipeline, QwenImagePipeline, "transformer", {}),
    "z_image": (save_tiny_z_image_pipeline, ZImagePipeline, "transformer", {}),
}


@dataclass
class Run:
    base: Path
    out: Path
    trained: dict[str, torch.Tensor]  # the trainer's final denoiser weights (the EMA under train.ema)
    raw: dict[str, torch.Tensor]  # the last checkpoint's trained weights (before the EMA is copied in)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(backbone)``: a 2-step full-fine-tune SFT run (SD with train.ema) on a tiny 16 px pipeline, once."""
    data = write_pickapic_parquet(tmp_path_factory.mktemp("data") / "pairs.parquet", make_random_pairs(4, size=16))
    done: dict[str, Run] = {}

    def run(backbone: str) -> Run:
        if backbone not in done:
            root = tmp_path_factory.mktemp(backbone)
            save, _, _, options = BACKBONES[backbone]
            base = save(root / "base", sample_size=16, **options)
            cfg = tiny_lora_config(str(base), str(data), root / "out", max_steps=2, method="sft", ema=backbone == "sd")
            cfg.loss.name = "sft"
            cfg.lora.enabled = False
            cfg.train.ema_decay = 0.5
            trainer = SFTTrainer(cfg)
            trainer.train()
            final = trainer.accelerator.unwrap_model(trainer.model).state_dict()
            trained = {k: v.detach().clone() for k, v in final.items()}
            raw = load_file(str(list_checkpoints(root / "out")[-1] / "trainable_0.safetensors"))
            done[backbone] = Run(Path(base), root / "out", trained, raw)
        return done[backbone]

    return run


def assert_same_state(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert state.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(state[name], value), name


def modules(pipe: DiffusionPipeline) -> dict[str, torch.nn.Module]:
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_full_fine_tune_writes_a_pipeline_that_loads_the_trained_denoiser(backbone, runs):
    run = runs(backbone)
    _, pipeline_cls, subfolder, _ = BACKBONES[backbone]
    base_index = json.loads((run.base / "model_index.json").read_text())
    assert json.loads((run.out / "model_index.json").read_text()) == base_index
    base_modules = modules(pipeline_cls.from_pretrained(run.base, local_files_only=True))
    base_denoiser = base_modules.pop(subfolder).state_dict()
    assert any(not torch.equal(base_denoiser[k], v) for k, v in run.trained.items())  # it did train
    for name in base_modules:  # linked, relatively, to the base's folder
        link = run.out / name
        assert link.is_symlink() and not os.path.isabs(os.readlink(link)), name
        assert link.resolve() == (run.base / name).resolve()
    assert (run.out / subfolder).is_dir() and not (run.out / subfolder).is_symlink()

    for loader in (pipeline_cls, DiffusionPipeline):
        pipe = loader.from_pretrained(run.out, local_files_only=True)
        assert type(pipe) is pipeline_cls
        loaded = modules(pipe)
        assert_same_state(loaded.pop(subfolder), run.trained)
        assert loaded.keys() == base_modules.keys() and loaded
        for name, module in loaded.items():
            assert_same_state(module, base_modules[name].state_dict())
    if backbone == "sd":  # train.ema: the export is the EMA of the weights, not the last step's
        assert any(not torch.equal(run.trained[k], v) for k, v in run.raw.items())


def _denoiser_only(base: Path, out: Path) -> Path:
    """``out`` holding ``base``'s UNet as if a run had just saved it."""
    shutil.copytree(base / "unet", out / "unet")
    return out


def test_copies_where_symlinks_fail_and_a_rerun_replaces_them(runs, tmp_path, monkeypatch):
    base = runs("sd").base
    out = _denoiser_only(base, tmp_path / "out")

    def refuse(*args, **kwargs):
        raise OSError("symlinks not supported")

    with monkeypatch.context() as patch:
        patch.setattr(Path, "symlink_to", refuse)
        placed = write_pipeline_folder(PipelineBase(base), out, "unet")
    assert set(placed.values()) == {"copy"} and {"vae", "text_encoder", "tokenizer", "scheduler"} <= set(placed)
    assert (out / "vae").is_dir() and not (out / "vae").is_symlink()
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert_same_state(pipe.vae, load_file(str(base / "vae" / "diffusion_pytorch_model.safetensors")))

    placed = write_pipeline_folder(PipelineBase(base), out, "unet")  # symlinks now: the copies are replaced
    assert set(placed.values()) == {"symlink"} and (out / "vae").is_symlink()
    assert (base / "vae" / "diffusion_pytorch_model.safetensors").is_file()  # the base is left as it was


def test_a_base_missing_a_component_is_refused_before_anything_is_placed(runs, tmp_path):
    base = shutil.copytree(runs("sd").base, tmp_path / "base")
    shutil.rmtree(base / "text_encoder")
    out = _denoiser_only(base, tmp_path / "out")
    with pytest.raises(ModelNotFoundError, match="components the base lacks .*text_encoder") as refused:
        write_pipeline_folder(PipelineBase(base), out, "unet")
    assert "\n" not in str(refused.value)
    assert sorted(p.name for p in out.iterdir()) == ["unet"]


def test_the_runs_prediction_type_is_written_into_the_scheduler(runs, tmp_path):
    base = runs("sd").base
    out = _denoiser_only(base, tmp_path / "out")
    placed = write_pipeline_folder(PipelineBase(base, prediction_type="v_prediction"), out, "unet")
    assert placed["scheduler"] == "written" and placed["vae"] == "symlink"
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert json.loads((base / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"
    placed = write_pipeline_folder(PipelineBase(base, prediction_type="epsilon"), out, "unet")
    assert placed["scheduler"] == "symlink"  # the base's already


def test_a_hub_base_is_linked_from_its_cached_snapshot(runs, tmp_path, monkeypatch):
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    snapshot = shutil.copytree(runs("sd").base, repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = ModelConfig(pretrained="someone/tiny-sd", local_files_only=True)
    base = pipeline_base(model)
    assert base.folder == snapshot
    out = _denoiser_only(snapshot, tmp_path / "out")
    assert set(write_pipeline_folder(base, out, "unet").values()) == {"symlink"}
    assert (out / "vae").resolve() == (snapshot / "vae").resolve()
    assert type(DiffusionPipeline.from_pretrained(out, local_files_only=True)) is StableDiffusionPipeline


def test_sail_round_export_is_a_pipeline_folder_and_chains(runs, tmp_path):
    run = runs("sd")
    first = export_model(PipelineBase(run.base), run.out, tmp_path / "round_0" / "model", "unet")
    second = export_model(PipelineBase(first), run.out, tmp_path / "round_1" / "model", "unet")
    export_model(PipelineBase(first), run.out, second, "unet")  # a redone round replaces its export
    for folder in (first, second):
        pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
        assert type(pipe) is StableDiffusionPipeline
        assert_same_state(pipe.unet, run.trained)
        assert (folder / "vae").resolve() == (run.base / "vae").resolve()  # through the chain, to the base
    assert not (tmp_path / "round_1" / "model.tmp").exists()
