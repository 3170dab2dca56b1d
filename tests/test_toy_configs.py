"""Toy run configs: overrides scoped to one method (``METHOD:key=value``) next to ones for every method."""

from __future__ import annotations

import pytest

from diffalign.config_fields import ConfigError
from diffalign.toy.configs import overrides_for, toy_run_config

SHARED = ["optim.lr=6e-4", "flow_grpo:online.clip_range=0.01"]


def _config(name: str, tmp_path, overrides):
    return toy_run_config(name, tmp_path / "base", tmp_path / "prompts.txt", tmp_path / name, overrides)


def test_a_scoped_override_changes_only_its_method(tmp_path) -> None:
    plain, guard = _config("flow_grpo", tmp_path, SHARED), _config("grpo_guard", tmp_path, SHARED)
    assert plain.online.clip_range == 0.01 and plain.optim.lr == 6e-4
    assert guard.online.clip_range == 2e-5 and guard.optim.lr == 6e-4  # grpo_guard.yaml's own clip is kept


def test_colons_in_values_are_not_scopes() -> None:
    assert overrides_for("dpo", ["online.reward_correction=C:/runs/x"]) == ["online.reward_correction=C:/runs/x"]
    assert overrides_for("dpo", ["sft:optim.lr=1"]) == []


def test_a_scope_that_names_no_config_is_an_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"flow_grpp:online.clip_range=0.01.*no configs/toy/flow_grpp.yaml"):
        _config("flow_grpo", tmp_path, ["flow_grpp:online.clip_range=0.01"])


def test_the_cli_refuses_a_bad_scope_in_one_line_before_training(capsys) -> None:
    from diffalign.cli import main

    assert main(["evidence", "online", "--output-dir", "/nonexistent/x", "grpo_gaurd:optim.lr=1e-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "configs/toy/grpo_gaurd.yaml" in err[0]


def test_offline_method_configs_take_scoped_overrides_too(tmp_path) -> None:
    from diffalign.toy.experiment import ToyWorld, check_overrides, method_config

    world = ToyWorld(base=tmp_path / "base", pairs=tmp_path / "pairs.parquet", workdir=tmp_path)
    scoped = ["dpo:optim.lr=1e-3", "train.max_steps=7"]
    check_overrides(["dpo", "mapo"], scoped)
    dpo, mapo = method_config("dpo", world, scoped), method_config("mapo", world, scoped)
    assert dpo.optim.lr == 1e-3 and mapo.optim.lr == method_config("mapo", world).optim.lr != 1e-3
    assert dpo.train.max_steps == mapo.train.max_steps == 7
