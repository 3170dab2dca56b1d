"""Tiny randomly initialised models for the ``diffalign-data`` tests, saved to a folder and loaded by path.

* :func:`save_tiny_blip`: ``BlipForConditionalGeneration`` (captioner for the ``image-text-to-text`` pipeline) with a
  ``BertTokenizerFast`` built from a word list and a ``BlipImageProcessor`` at 32 px; special-token logits are
  pushed down so every caption has words in it.
* :func:`save_tiny_t5`: ``T5ForConditionalGeneration`` for ``--mode dipper``.
* :func:`save_tiny_gpt2`: ``GPT2LMHeadModel`` for ``--mode instruct``.

The seq2seq / causal tokenizers are ``PreTrainedTokenizerFast`` over a ``tokenizers`` WordLevel model on a fixed
word list; no download anywhere.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = (
    "a photo of the cat dog red blue green yellow one two three on under next to is and image prompt describe "
    "was in lexical order = sent paraphrase perturb following caption , . : 0 1 2 3 4 5 6 7 8 9 20 40 60 100 "
    "change exactly detail colour count object position return only new"
).split()


def _word_level_tokenizer(specials: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def save_tiny_blip(path: Path, seed: int = 0) -> Path:
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(WORDS)))}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=128, bos_token_id=2, sep_token_id=3, pad_token_id=0,
                eos_token_id=3)  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)  # fmt: skip
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[: len(specials)] = -1e4
    model.save_pretrained(path)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
                  ).save_pretrained(path)  # fmt: skip
    return path


def save_tiny_t5(path: Path, seed: int = 0) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = _word_level_tokenizer(["<pad>", "</s>", "<unk>"])
    config = T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)  # fmt: skip
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config).eval()
    model.generation_config.suppress_tokens = [0, 1, 2]  # no specials, no early stop: every output has words
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_gpt2(path: Path, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _word_level_tokenizer(["<pad>", "</s>", "<unk>"])
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=256, bos_token_id=1,
                        eos_token_id=1, pad_token_id=0)  # fmt: skip
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    model.generation_config.suppress_tokens = [0, 1, 2]  # no specials, no early stop: every output has words
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
