"""The backbone registry: the built-in entries, detection by priority, a backbone registered from outside detected and
loaded through ``load_adapter`` / ``adapter_from_config``, the unknown-name error, and the generic modules carrying no
backbone names."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from diffalign.config import ModelConfig
from diffalign.models import backbones, loading
from diffalign.models.backbones import (
    BACKBONES,
    Backbone,
    UnknownBackboneError,
    backbone_for,
    backbone_of_components,
    backbone_of_index,
    detect_backbone,
    get_backbone,
    register_backbone,
)
from diffalign.models.components import Source
from diffalign.models.diffusion import SDAdapter
from diffalign.models.lora import DEFAULT_TARGET_MODULES
from diffalign.models.sd import sd_components
from diffalign.models.sd3 import SD3Adapter
from diffalign.models.sdxl import SDXLAdapter
from diffalign.models.tiny import save_tiny_sd_pipeline

ROOT = Path(__file__).resolve().parents[1]
SD_SUBFOLDERS = ("unet", "scheduler", "text_encoder", "tokenizer")
COMMON = ["pretrained", "revision", "variant", "torch_dtype", "local_files_only"]
SD3_OPTIONS = ["load_t5", "max_sequence_length", "timestep_density", "logit_mean", "logit_std", "mode_scale"]


def test_the_built_in_backbones_are_registered_with_their_adapters_and_layouts() -> None:
    # the least specific rule first
    assert backbones.BACKBONE_NAMES == ("sd", "sdxl", "sd3", "flux", "qwen_image", "z_image")
    sd, sdxl, sd3 = (BACKBONES[name] for name in ("sd", "sdxl", "sd3"))
    assert (sd.adapter_class, sdxl.adapter_class, sd3.adapter_class) == (SDAdapter, SDXLAdapter, SD3Adapter)
    assert sd.required == SD_SUBFOLDERS
    assert sdxl.required == (*SD_SUBFOLDERS, "text_encoder_2", "tokenizer_2")
    assert sd3.required == ("transformer", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    assert [b.denoiser_subfolder for b in (sd, sdxl, sd3)] == ["unet", "unet", "transformer"]
    assert all(b.lora_targets == DEFAULT_TARGET_MODULES for b in (sd, sdxl, sd3))
    assert dict(sd3.options) == {name: name for name in (*SD3_OPTIONS, "prediction_type")}  # the build's keywords
    assert dict(sdxl.options) == {"prediction_type": "prediction_type", "sdxl_time_ids": "time_ids"}
    # the nearest registered class wins: an SDXLAdapter is an SDAdapter too
    assert backbone_for(SDXLAdapter) is sdxl and backbone_for(SDAdapter) is sd and backbone_for(SD3Adapter) is sd3


def test_the_public_loaders_are_the_entries_with_their_build_keywords(tmp_path) -> None:
    loaders = {"sd": loading.load_sd_adapter, "sdxl": loading.load_sdxl_adapter, "sd3": loading.load_sd3_adapter}
    own = {"sd": ["prediction_type"], "sdxl": ["prediction_type", "time_ids"], "sd3": [*SD3_OPTIONS, "prediction_type"]}
    for name, load in loaders.items():
        assert load.__name__ == f"load_{name}_adapter" and load.__doc__ == BACKBONES[name].build.__doc__
        parameters = inspect.signature(load).parameters
        assert list(parameters) == COMMON + own[name]
        assert [parameters[p].default for p in COMMON[1:]] == [None, None, None, False]
        assert all(parameters[p].kind is inspect.Parameter.KEYWORD_ONLY for p in COMMON[1:] + own[name])
        with pytest.raises(TypeError, match="sdxl_time_ids"):  # a model.* field name is not a loader keyword
            load(tmp_path / "missing", sdxl_time_ids="constant")
    assert inspect.signature(loading.load_sdxl_adapter).parameters["time_ids"].default == "constant"


def test_detection_picks_the_most_specific_backbone() -> None:
    sd_parts = {name: True for name in SD_SUBFOLDERS}
    assert backbone_of_components(sd_parts).name == "sd"
    assert backbone_of_components({**sd_parts, "text_encoder_2": True}).name == "sdxl"
    assert backbone_of_components({**sd_parts, "text_encoder_2": False}).name == "sd"
    assert backbone_of_components({"transformer": True, "text_encoder_2": True}).name == "sd3"
    sd3_index = {"transformer": ["diffusers", "SD3Transformer2DModel"], "text_encoder_2": ["transformers", "CLIP"]}
    assert backbone_of_index(sd3_index) == "sd3"
    assert backbone_of_index({**sd3_index, "transformer": [None, None]}) == "sdxl"  # a null entry is absent
    assert backbone_of_index({"unet": ["diffusers", "UNet2DConditionModel"], "text_encoder_2": None}) == "sd"


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3"])
def test_the_cache_fingerprint_is_the_one_existing_caches_were_keyed_by(name: str) -> None:
    for model in (ModelConfig(), ModelConfig(backbone=name, load_t5=False, max_sequence_length=12)):
        expected = f"{model.backbone}:{model.load_t5}:{model.max_sequence_length}"
        assert BACKBONES[name].cache_fingerprint(model) == expected


# ----------------------------------------------------------------------------- a backbone registered from outside


class MarkedSDAdapter(SDAdapter):
    """An SD model whose pipeline folder has a ``marker/`` subfolder."""


def build_marked(src: Source, *, prediction_type: str | None = None) -> MarkedSDAdapter:
    return MarkedSDAdapter(**sd_components(src), prediction_type=prediction_type)


MARKED = Backbone(
    name="marked_sd",
    build=build_marked,
    required=(*SD_SUBFOLDERS, "marker"),
    detect="marker",
    priority=30,
    lora_targets=("to_q", "to_v"),
)


@pytest.fixture
def marked() -> Iterator[Backbone]:
    register_backbone(MARKED)
    yield MARKED
    BACKBONES.pop(MARKED.name, None)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("registry") / "sd", with_vae=False, sample_size=16)


def test_a_registered_backbone_is_detected_and_loaded(marked, sd_folder, tmp_path) -> None:
    folder = tmp_path / "marked"
    folder.mkdir()
    for entry in sd_folder.iterdir():
        (folder / entry.name).symlink_to(entry)
    (folder / "marker").mkdir()
    assert detect_backbone(folder) == "marked_sd" and detect_backbone(sd_folder) == "sd"
    # build_marked's signature declares the rest: its keyword, under its own name, and the class it returns
    assert dict(marked.options) == {"prediction_type": "prediction_type"} and marked.adapter_class is MarkedSDAdapter
    assert "marked_sd" in backbones.BACKBONE_NAMES
    adapter = loading.load_adapter(folder, prediction_type="v_prediction")
    assert type(adapter) is MarkedSDAdapter and adapter.prediction_type == "v_prediction"
    assert type(loading.load_adapter(folder, backbone="sd")) is SDAdapter  # a named backbone beats detection
    from_config = loading.adapter_from_config(ModelConfig(pretrained=str(folder)))
    assert type(from_config) is MarkedSDAdapter and from_config.prediction_type == "epsilon"
    assert backbone_for(from_config).lora_targets == ("to_q", "to_v")
    assert get_backbone("marked_sd").denoiser_subfolder == "unet"
    with pytest.raises(ValueError, match=re.escape(f"['load_t5'] apply only to SD3 models; {folder} is MARKED_SD")):
        loading.load_adapter(folder, load_t5=False)
    register_backbone(MARKED)  # the same entry again: a no-op
    with pytest.raises(ValueError, match="already registered"):
        register_backbone(Backbone(name="marked_sd", adapter_class=MarkedSDAdapter, build=build_marked, required=()))
    (folder / "marker").rmdir()
    with pytest.raises(FileNotFoundError, match=r"not an MARKED_SD model folder: missing subfolder\(s\) \['marker'\]"):
        loading.load_adapter(folder, backbone="marked_sd")


def test_an_unknown_backbone_is_a_one_line_error_naming_the_key_and_the_closest_name(sd_folder) -> None:
    with pytest.raises(UnknownBackboneError) as info:
        get_backbone("sdx1")
    message = str(info.value)
    assert "\n" not in message and "model.backbone" in message
    assert "Did you mean 'sdxl'?" in message and message.endswith(
        "Valid names: auto (detect it), sd, sdxl, sd3, flux, qwen_image, z_image."
    )
    with pytest.raises(UnknownBackboneError, match="model.backbone"):
        loading.adapter_from_config(ModelConfig(pretrained=str(sd_folder), backbone="sdx1"))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "backbone='nope': expected 'auto' or one of ('sd', 'sdxl', 'sd3', 'flux', 'qwen_image', 'z_image')"
        ),
    ):
        loading.load_adapter(sd_folder, backbone="nope")
    with pytest.raises(ValueError, match="reserved"):
        Backbone(name="auto", adapter_class=SDAdapter, build=build_marked, required=())
    with pytest.raises(TypeError, match="adapter_class must be a DiffusionAdapter subclass"):
        Backbone(name="unannotated", build=lambda src: SDAdapter, required=())  # no class to take it from


GENERIC_MODULES = ("diffalign/models/loading.py", "diffalign/trainers/offline.py", "diffalign/trainers/sail.py")


@pytest.mark.parametrize("path", GENERIC_MODULES)
def test_the_generic_modules_name_no_backbone(path: str) -> None:
    source = (ROOT / path).read_text()
    named = [
        name
        for name in ("sd", "sdxl", "sd3", "flux", "qwen_image", "z_image")
        for quote in "\"'"
        if f"{quote}{name}{quote}" in source
    ]
    assert named == [], f"{path} names backbone(s) {named}; take what differs from the registry entry instead"
