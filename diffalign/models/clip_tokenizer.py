"""A real CLIP BPE tokenizer built offline from the vocabulary file that ships inside open_clip.

open_clip's ``bpe_simple_vocab_16e6.txt.gz`` is the same merge list OpenAI's CLIP and Stable Diffusion use, so the
token ids produced here equal those of ``openai/clip-vit-large-patch14``'s tokenizer; no hub download is needed.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

_NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    byte_values = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    byte_values += list(range(ord("®"), ord("ÿ") + 1))
    chars = list(byte_values)
    extra = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, (chr(c) for c in chars), strict=True))


def open_clip_bpe_path() -> Path:
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall open_clip_torch, whose wheel ships this BPE file")
    return path


def write_clip_vocab(directory: str | os.PathLike) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (transformers' CLIP layout) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    base = list(_bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return directory


def build_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """Return a ``CLIPTokenizer`` (SD's tokenizer, pad = ``<|endoftext|>``) with the given maximum length."""
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_vocab(tmp)
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=model_max_length)
    return tokenizer
