"""The method registry (diffalign.methods) and the config schema built from it: sections owned by their methods, field
rules declared as metadata, --print-config showing what a method reads, a method registered without touching
diffalign/config.py."""

from __future__ import annotations

import dataclasses
import pickle
import typing
from pathlib import Path

import pytest
import yaml

import diffalign.methods as methods_module
from diffalign.config import Config, ConfigError, config_from_dict, load_config, method_of, parse_cli
from diffalign.config_fields import Limit
from diffalign.methods import Method, get_method, method_names, register_method, section_fields
from diffalign.methods.llm import LLMGRPOSettings
from diffalign.methods.online import DiffusionRolloutSettings, DirectRewardSettings, RewardBalanceSettings

BASE = {"model": {"pretrained": "m"}, "data": {"path": "d"}}


def printed(capsys: pytest.CaptureFixture[str], tmp_path: Path, *overrides: str) -> dict:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(SystemExit) as done:
        parse_cli(["--config", str(path), "--print-config", *overrides])
    assert done.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_every_method_has_one_trainer_and_its_sections_are_config_sections() -> None:
    assert method_names("diffusion") == ("dpo", "dcpo", "mapo", "sft", "grpo", "direct_reward", "nft", "sail", "soar")
    assert method_names("llm") == ("preference", "grpo")
    hints = typing.get_type_hints(Config)
    for family in ("diffusion", "llm"):
        for name in method_names(family):
            method = get_method(name, family)
            assert method is not None and method.trainer.count(":") == 1
            assert set(method.sections) <= set(hints)
    # one YAML section, three readers: each reads its own settings classes' keys
    online = set(section_fields(get_method("grpo", "diffusion"), "online"))
    direct = set(section_fields(get_method("direct_reward", "diffusion"), "online"))
    llm = set(section_fields(get_method("grpo", "llm"), "online"))
    assert {f.name for f in dataclasses.fields(hints["online"])} == online | direct | llm
    assert "clip_range" in online - llm and "epsilon" in llm - online and "direct_stage" in direct - online
    assert online & llm == {"reward_functions", "reward_weights", "num_generations", "advantage", "beta"}


def test_print_config_shows_only_what_the_method_reads(capsys, tmp_path: Path) -> None:
    dpo = printed(capsys, tmp_path)
    assert list(dpo) == ["model", "data", "loss", "lora", "optim", "train"]
    grpo = printed(capsys, tmp_path, "train.method=grpo", "online.reward_functions=[r]")
    assert "loss" not in grpo and "soar" not in grpo and "sail" not in grpo
    read = [f.name for cls in (DiffusionRolloutSettings, RewardBalanceSettings) for f in dataclasses.fields(cls)]
    assert list(grpo["online"]) == read
    nft = printed(capsys, tmp_path, "train.method=nft", "online.reward_functions=[r]")
    assert "nft" in nft and "clip_range" not in nft["online"] and "reward_balance" in nft["online"]
    direct = printed(capsys, tmp_path, "train.method=direct_reward", "online.reward_functions=[r]")
    assert set(direct["online"]) == {f.name for f in dataclasses.fields(DirectRewardSettings)}
    llm = printed(capsys, tmp_path, "model.backbone=causal_lm", "train.method=grpo", "online.reward_functions=[m:f]")
    assert (
        set(llm["online"]) == {f.name for f in dataclasses.fields(LLMGRPOSettings)} and "sampler" not in llm["online"]
    )
    soar = printed(capsys, tmp_path, "train.method=soar", "soar.num_aux_points=3")
    assert soar["soar"]["num_aux_points"] == 3 and soar["loss"]["name"] == "sft" and "online" not in soar


def test_a_field_rule_is_checked_only_for_the_methods_that_read_it(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE))
    # the causal-LM GRPO key top_p means nothing to diffusion GRPO: not checked there, checked where it is read
    assert load_config(path, ["train.method=grpo", "online.reward_functions=[r]", "online.top_p=2"]).online.top_p == 2
    with pytest.raises(ConfigError, match=r"'online.top_p' must be in \(0, 1\], got 2"):
        load_config(
            path, ["model.backbone=causal_lm", "train.method=grpo", "online.reward_functions=[m:f]", "online.top_p=2"]
        )
    with pytest.raises(ConfigError, match=r"'soar.num_aux_points' must be >= 1, got 0"):
        load_config(path, ["train.method=soar", "soar.num_aux_points=0"])
    with pytest.raises(ConfigError, match=r"'online.direct_stage' must be one of 'generator', 'correction'"):
        load_config(path, ["train.method=direct_reward", "online.reward_functions=[r]", "online.direct_stage=x"])


@pytest.mark.parametrize(
    ("limit", "optional", "text"),
    [
        (Limit(ge=1), False, ">= 1"),
        (Limit(gt=0, note="1 = no guidance"), False, "> 0 (1 = no guidance)"),
        (Limit(ge=0, lt=1), False, "in [0, 1)"),
        (Limit(gt=0, le=1), False, "in (0, 1]"),
        (Limit(ge=1), True, ">= 1 or null"),
        (Limit(le=2.5), False, "<= 2.5"),
    ],
)
def test_limit_requirements_read_as_the_messages_say(limit: Limit, optional: bool, text: str) -> None:
    assert limit.requirement(optional) == text
    low = limit.ge if limit.ge is not None else limit.gt
    if low is not None:  # the bound itself: in for ge, out for gt
        assert limit.holds(low) is (limit.ge is not None)


def test_a_method_registered_elsewhere_trains_without_touching_the_config_module(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(methods_module, "_METHODS", dict(methods_module._METHODS))  # restored afterwards
    sft = "diffalign.trainers.sft:SFTTrainer"
    mine = register_method(Method("winners_only", "diffusion", sft, default_loss="sft", uses_reference=False))
    config = config_from_dict({**BASE, "train": {"method": "winners_only"}})
    assert method_of(config) is mine and config.loss.name == "sft"
    with pytest.raises(ConfigError, match="train.reference 'precomputed' has no effect: train.method 'winners_only'"):
        config_from_dict({**BASE, "train": {"method": "winners_only", "reference": "precomputed"}})
    with pytest.raises(ValueError, match="registered twice"):
        register_method(dataclasses.replace(mine, default_loss="dpo"))


def test_configs_with_a_composed_section_pickle_and_compare() -> None:
    config = config_from_dict({**BASE, "train": {"method": "grpo"}, "online": {"reward_functions": ["r"]}})
    copy = pickle.loads(pickle.dumps(config))
    assert copy == config and type(copy.online).__module__ == "diffalign.config"
    assert copy.online.clip_range == 1e-4 and copy.online.epsilon == 0.2
