"""One error policy for every command (diffalign.utils.cli_errors): ``error: <message>`` and the error's exit status
for a DiffalignError, the traceback only with ``--debug``; the common failures as DiffalignErrors (missing model
folder or component, hub failure, missing optional package, bad eval folders); ``--help`` without torch; toy_gold
on images other than 16 px."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers_scripts import load_script
from PIL import Image

from diffalign.errors import DiffalignError
from diffalign.utils.cli_errors import run_cli, split_debug

REPO = Path(__file__).resolve().parents[1]
TOY_BASE = REPO / "diffalign" / "toy" / "weights" / "base"


class _Exit3(DiffalignError):
    exit_code = 3


# ------------------------------------------------------------------------------------------------- the helper


def test_split_debug_removes_the_flag_anywhere_before_a_double_dash() -> None:
    assert split_debug(["--debug", "a", "--debug", "b=1"]) == (["a", "b=1"], True)
    assert split_debug(["a", "--", "--debug"]) == (["a", "--", "--debug"], False)
    assert split_debug(["--debugger"]) == (["--debugger"], False)


def test_run_cli_prints_the_message_and_exit_code_traceback_only_with_debug(capsys) -> None:
    seen = []

    def failing(argv: list[str]) -> int:
        seen.append(argv)
        raise _Exit3("data.path x.parquet: row 4: no label; fix the row")

    message = "error: data.path x.parquet: row 4: no label; fix the row\n"
    assert run_cli(failing, ["x", "--debug"]) == 3
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith(message)
    assert run_cli(failing, ["x"]) == 3
    assert capsys.readouterr().err == message
    assert seen == [["x"], ["x"]]  # --debug never reaches the command's parser


def test_run_cli_statuses_and_bugs_keep_their_traceback(capsys) -> None:
    assert run_cli(lambda argv: 7, []) == 7
    assert run_cli(lambda argv: {"summary": 1}, []) == 0  # generate_main / evaluate_main return a summary dict

    def interrupted(argv: list[str]) -> int:
        raise KeyboardInterrupt

    assert run_cli(interrupted, []) == 130 and capsys.readouterr().err == "error: interrupted\n"

    def bug(argv: list[str]) -> int:
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):  # not a DiffalignError: the traceback stays
        run_cli(bug, [])


# ------------------------------------------------------------------------------------------------ the commands


def _toy_config(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(
        f"defaults: {REPO / 'configs' / 'toy' / 'dpo.yaml'}\n"
        f"train:\n  output_dir: {tmp_path / 'run'}\n  max_steps: 1\n  progress_bar: false\n"
        "data:\n  cache_dir: null\n"
    )
    return path


def test_train_script_model_and_data_errors_are_one_line(tmp_path, capsys) -> None:
    train = load_script("train")
    config = str(_toy_config(tmp_path))
    missing = tmp_path / "no_model"
    assert train.main(["--config", config, f"model.pretrained={missing}", "data.path=x.parquet"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: model folder {missing} does not exist; pass an existing diffusers folder (unet/, scheduler/, "
        "text_encoder/, tokenizer/, optional vae/) or a hub id such as 'owner/name'\n"
    )
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"caption": ["a red circle"]}), bad)
    args = ["--config", config, f"model.pretrained={TOY_BASE}", f"data.path={bad}"]
    assert train.main([*args, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: {bad}") and "jpg_0" in last  # the PreferenceDataError, named by file
    assert not (tmp_path / "run" / "checkpoint-1").exists()


def test_train_script_checks_optional_packages_before_loading(tmp_path, capsys, monkeypatch) -> None:
    train = load_script("train")
    config = str(_toy_config(tmp_path))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed (find_spec answers None)
    assert train.main(["--config", config, "optim.optimizer=adamw_8bit"]) == 2
    assert capsys.readouterr().err == (
        "error: optim.optimizer=adamw_8bit needs bitsandbytes, which is not installed: pip install "
        "'diffalign[8bit]' (or pip install bitsandbytes)\n"
    )
    for name in ("tensorboard", "tensorboardX"):
        monkeypatch.setitem(sys.modules, name, None)
    assert train.main(["--config", config, "train.report_to=tensorboard"]) == 2
    assert "train.report_to 'tensorboard' needs tensorboard or tensorboardX" in capsys.readouterr().err
    # --print-config still works: the check is for running, not reading
    with pytest.raises(SystemExit) as info:
        train.main(["--config", config, "optim.optimizer=adamw_8bit", "--print-config"])
    assert info.value.code == 0 and "optimizer: adamw_8bit" in capsys.readouterr().out


def test_check_config_dependencies_passes_when_installed(monkeypatch) -> None:
    from diffalign.config import load_config
    from diffalign.utils.imports import MissingDependencyError, check_config_dependencies

    config = load_config(REPO / "configs" / "toy" / "dpo.yaml", ["optim.optimizer=adamw_8bit"])
    fake = types.ModuleType("bitsandbytes")
    fake.__spec__ = importlib.machinery.ModuleSpec("bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    check_config_dependencies(config)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(MissingDependencyError) as info:
        check_config_dependencies(config)
    assert isinstance(info.value, ImportError) and info.value.exit_code == 2


def test_diffalign_and_data_cli_errors(tmp_path, capsys) -> None:
    from data_tools.cli import main as data_main
    from diffalign.cli import main

    assert main(["toy", "pairs", str(tmp_path / "p.parquet"), "--n-pairs", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert main(["--debug", "toy", "pairs", str(tmp_path / "p.parquet"), "--n-pairs", "0"]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'none.yaml'}: config file not found\n"
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"caption": ["a red circle"]}), bad)
    assert data_main(["validate", str(bad)]) == 1  # bad data keeps diffalign-data's status 1
    err = capsys.readouterr().err  # a progress bar, then the one line
    assert err.splitlines()[-1].startswith(f"error: {bad}") and "Traceback" not in err
    assert data_main(["validate", str(bad), "--debug"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


_HELP_PROBE = """
import json, runpy, sys
out = {}
for module, args in json.loads(sys.argv[1]):
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__")
    except SystemExit as exit:
        code = exit.code
    out[" ".join([module, *args])] = [code, "torch" in sys.modules]
sys.stdout = sys.__stdout__
print("PROBE" + json.dumps(out))
"""


def test_help_of_both_clis_imports_no_torch() -> None:
    cases = [
        ("diffalign.cli", ["--help"]),
        ("diffalign.cli", ["toy", "pairs", "--help"]),
        ("diffalign.cli", ["train", "--help"]),
        ("data_tools.cli", ["--help"]),
        ("data_tools.cli", ["caption", "--help"]),
    ]
    done = subprocess.run(
        [sys.executable, "-c", _HELP_PROBE, json.dumps(cases)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr
    probe = json.loads(done.stdout.rpartition("PROBE")[2])
    assert probe == {" ".join([m, *a]): [0, False] for m, a in cases}
    # `diffalign train --help` is the training parser's, listing the config keys
    assert "usage: diffalign train [-h] --config FILE" in done.stdout
    assert "optim: optimizer, lr, scale_lr" in done.stdout and "--print-config" in done.stdout


def test_constants_copied_to_keep_help_light_match_their_sources() -> None:
    from diffalign.cli import EVIDENCE_FAMILIES, PAIR_KINDS
    from diffalign.eval.cli import SAMPLER_KINDS
    from diffalign.models.sampling import SAMPLER_KINDS as REAL_SAMPLERS
    from diffalign.toy.evidence_commands import COMMANDS
    from diffalign.toy.pairs import PAIR_KINDS as REAL_PAIR_KINDS

    assert PAIR_KINDS == REAL_PAIR_KINDS
    assert sorted(SAMPLER_KINDS) == sorted(REAL_SAMPLERS)
    assert EVIDENCE_FAMILIES == tuple(COMMANDS)
    for name, family in COMMANDS.items():  # every row names functions that exist
        assert callable(family.load(family.run)) and callable(family.load(family.format_report)), name
        assert family.checks is None or callable(family.load(family.checks)), name


# ----------------------------------------------------------------------------------------- errors as messages


def test_model_folder_errors_name_the_folder_and_component(tmp_path, monkeypatch) -> None:
    import shutil

    from diffalign.models.loading import ModelNotFoundError, load_adapter

    broken = tmp_path / "broken"
    shutil.copytree(TOY_BASE, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    expected = f"{broken / 'unet'}: cannot load the UNet2DConditionModel: "
    with pytest.raises(ModelNotFoundError, match="^" + re.escape(expected)) as info:
        load_adapter(broken)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, DiffalignError)
    with pytest.raises(ModelNotFoundError, match="README.md is a file"):
        load_adapter(REPO / "README.md")

    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", offline)
    with pytest.raises(ModelNotFoundError) as info:
        load_adapter("someone/sd-model")
    message = str(info.value)
    assert message.startswith("cannot read model_index.json of 'someone/sd-model': it is not a folder under ")
    assert "the hub gave: cannot find the requested files in the local cache; pass an existing" in message


def test_eval_errors_are_messages(tmp_path, capsys) -> None:
    from diffalign.eval.cli import evaluate_main

    missing = tmp_path / "nothing"
    assert run_cli(evaluate_main, ["--images", str(missing), "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (
        f"error: image folder {missing} does not exist; give one written by scripts/generate.py\n"
    )
    folder = tmp_path / "imgs"
    _write_folder(folder, [np.full((16, 16, 3), 0.3)], ["a red circle"])
    args = ["--images", str(folder), "--rewards", "toy_gol", "--output-dir", str(tmp_path / "o")]
    assert run_cli(evaluate_main, args) == 2
    assert capsys.readouterr().err == "error: --rewards: unknown reward 'toy_gol'; did you mean 'toy_gold'?\n"


# --------------------------------------------------------------------------------------- toy_gold at 32 px


def _write_folder(folder: Path, images: list[np.ndarray], prompts: list[str]) -> None:
    """A scripts/generate.py-style folder: one sample per prompt index, float HWC images in [0, 1]."""
    folder.mkdir(parents=True)
    lines = []
    for i, (array, prompt) in enumerate(zip(images, prompts, strict=True)):
        name = f"p{i:05d}_s0000.png"
        Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(folder / name)
        lines.append(json.dumps({"file": name, "prompt": prompt, "prompt_index": i, "sample_index": 0, "seed": 0}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def test_toy_gold_scores_32px_images_like_16px(tmp_path, capsys) -> None:
    """Was: numpy 'operands could not be broadcast together with shapes (6,32) (16,)' (the metric's row grid was
    fixed at the toy resolution)."""
    from diffalign.eval.cli import evaluate_main
    from diffalign.toy.metrics import attributes, shapes_of
    from diffalign.toy.world import ShapeSpec, render_array

    specs = [
        ShapeSpec(colour="red", shape="circle", size=4.5, cx=8.0, cy=8.0, background=0.2),
        ShapeSpec(colour="blue", shape="square", size=4.0, cx=6.0, cy=9.0, background=0.5),
        ShapeSpec(colour="green", shape="triangle", size=5.0, cx=9.0, cy=7.0, background=0.3),
    ]
    small = np.stack([render_array(s) for s in specs])
    big = small.repeat(2, axis=1).repeat(2, axis=2)  # each pixel becomes 2x2: the same image at 32 px
    assert shapes_of(big) == shapes_of(small) == ["circle", "square", "triangle"]
    np.testing.assert_allclose(attributes(big)[:, :3], 2 * attributes(small)[:, :3], rtol=1e-12)  # pixels double
    # gold 1 (right), 0.5 (wrong colour), 1 (right): mean 5/6
    prompts = ["a red circle", "a green square", "a green triangle"]
    _write_folder(tmp_path / "g32", list(big), prompts)
    out = tmp_path / "eval"
    args = ["--images", str(tmp_path / "g32"), "--rewards", "toy_gold", "--no-figures", "--output-dir", str(out)]
    assert run_cli(evaluate_main, args) == 0
    assert "toy_gold 0.8333" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"]["A"]["scores"]["toy_gold"]["mean"] == pytest.approx(5 / 6)


def test_unknown_reward_and_missing_causal_lm_are_project_errors(tmp_path) -> None:
    from diffalign.models.causal_lm import load_causal_lm
    from diffalign.rewards.registry import build_reward

    with pytest.raises(DiffalignError, match=r"unknown reward 'pickscor'; valid names: .*; did you mean 'pickscore'\?"):
        build_reward("pickscor")
    missing = tmp_path / "no-such-lm"
    with pytest.raises(DiffalignError, match=re.escape(f"model.pretrained '{missing}': could not load a causal LM")):
        load_causal_lm(str(missing), local_files_only=True)
