"""Code a config names runs only where the user asked for it: ``model.trust_remote_code`` (default false) gates the
Python files shipped in a causal LM's folder, and a reward ``"file.py:function"`` name imports that file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from diffalign.config import Config
from diffalign.models.causal_lm import load_causal_lm
from diffalign.models.clip_tokenizer import build_clip_tokenizer

MODELING = '''
import os
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM

Path(os.environ["REMOTE_CODE_MARKER"]).write_text("ran")  # what a malicious folder could do instead


class ShippedConfig(LlamaConfig):
    model_type = "shipped_llama"


class ShippedForCausalLM(LlamaForCausalLM):
    config_class = ShippedConfig
'''


def _folder_with_code(root: Path) -> Path:
    """A tiny Llama whose config.json routes loading through a modeling file in the folder (``auto_map``)."""
    config = LlamaConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root)
    build_clip_tokenizer(model_max_length=32).save_pretrained(root)
    (root / "shipped.py").write_text(MODELING)
    data = json.loads((root / "config.json").read_text())
    data["model_type"] = "shipped_llama"
    data["auto_map"] = {"AutoConfig": "shipped.ShippedConfig", "AutoModelForCausalLM": "shipped.ShippedForCausalLM"}
    (root / "config.json").write_text(json.dumps(data))
    return root


def test_trust_remote_code_defaults_to_false():
    assert Config().model.trust_remote_code is False


def test_a_folders_own_code_runs_only_with_trust_remote_code(tmp_path, monkeypatch):
    folder = _folder_with_code(tmp_path / "lm")
    marker = tmp_path / "MARKER"
    monkeypatch.setenv("REMOTE_CODE_MARKER", str(marker))
    with pytest.raises(Exception, match="trust_remote_code"):
        load_causal_lm(str(folder), local_files_only=True)  # the default: refused before the file is imported
    assert not marker.exists()

    model, _ = load_causal_lm(str(folder), trust_remote_code=True, local_files_only=True)
    assert type(model).__name__ == "ShippedForCausalLM"
    assert marker.read_text() == "ran"
