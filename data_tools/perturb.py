"""Caption perturbers for DCPO-p / DCPO-h (arXiv 2502.06023): lexicon, DIPPER, instruction LM.

Each perturber maps ``(texts, row indices)`` to perturbed texts, or ``None`` for a text it could not change.

* ``lexicon`` (:mod:`data_tools.lexicon`): our offline, deterministic stand-in; no model.
* ``dipper``: what DCPO does — DIPPER (``kalpeshk2011/dipper-paraphraser-xxl``, a T5-XXL seq2seq model) with the
  prefix ``"Paraphrase and perturb the following image caption."``, lexical diversity 40 / 60 / 80 for weak / medium
  / strong, order diversity 0, ``top_p=0.75``, ``max_length=256``, sentences in windows of 3. DIPPER's input is
  ``"lexical = L, order = O <prefix> <sent> window </sent>"`` with control codes ``L = 100 - lexical diversity``
  and ``O = 100 - order diversity``, hence :data:`DIPPER_CODES`: weak ``L=60``, medium ``L=40``, strong ``L=20``,
  always ``O=100``. Sentence splitting is ours (a regex on ``.!?``; DCPO uses nltk's ``sent_tokenize``).
* ``instruct``: our choice for any instruction-tuned causal LM: one instruction per level (:data:`INSTRUCTIONS`),
  greedy unless ``--sample``; the chat template is used when the tokenizer has one.

Sampling is seeded per batch with ``seed + first row index``, so a resumed run regenerates a batch the same way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Protocol

from data_tools.lexicon import parse_vocabulary, perturb_caption

LEVELS = ("weak", "medium", "strong")
DIPPER_LEXICAL_DIVERSITY = {"weak": 40, "medium": 60, "strong": 80}
DIPPER_ORDER_DIVERSITY = 0
DIPPER_CODES = {k: (100 - v, 100 - DIPPER_ORDER_DIVERSITY) for k, v in DIPPER_LEXICAL_DIVERSITY.items()}
DIPPER_PREFIX = "Paraphrase and perturb the following image caption."
INSTRUCTIONS = {
    "weak": "Change exactly one detail (a colour, a count, an object or a position) of this image caption and "
    "return only the new caption.",
    "medium": "Change two details (colours, counts, objects or positions) of this image caption and return only the "
    "new caption.",
    "strong": "Change three or more details (colours, counts, objects or positions) of this image caption so that it "
    "describes a clearly different image, and return only the new caption.",
}
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


class Perturber(Protocol):
    def __call__(self, texts: Sequence[str], rows: Sequence[int]) -> list[str | None]: ...


class LexiconPerturber:
    """:func:`data_tools.lexicon.perturb_caption` over a batch; ``None`` where no attribute was found."""

    def __init__(self, level: str, seed: int = 0, vocabulary: Mapping[str, Sequence[str]] | None = None) -> None:
        self.level, self.seed, self.vocabulary = level, seed, vocabulary

    def __call__(self, texts: Sequence[str], rows: Sequence[int]) -> list[str | None]:
        out: list[str | None] = []
        for text, row in zip(texts, rows, strict=True):
            new, changes = perturb_caption(text, self.level, seed=self.seed, row=row, vocabulary=self.vocabulary)
            out.append(new if changes else None)
        return out


def dipper_inputs(text: str, level: str, window: int = 3) -> list[str]:
    """DIPPER input strings for ``text``: one per window of ``window`` sentences."""
    lex, order = DIPPER_CODES[level]
    sentences = [s for s in _SENTENCE.split(text.strip()) if s] or [text]
    windows = [" ".join(sentences[i : i + window]) for i in range(0, len(sentences), window)]
    return [f"lexical = {lex}, order = {order} {DIPPER_PREFIX} <sent> {w} </sent>" for w in windows]


class _ModelPerturber:
    def __init__(self, path: str, level: str, *, seed: int, device: str, max_new_tokens: int, sample: bool) -> None:
        import torch

        if level not in LEVELS:
            raise ValueError(f"level {level!r}: use one of {list(LEVELS)}")
        self.level, self.seed, self.device = level, seed, torch.device(device)
        self.max_new_tokens, self.sample = max_new_tokens, sample
        self.tokenizer, self.model = self._load(path)
        self.model.to(self.device).eval()

    def _load(self, path: str):  # pragma: no cover - overridden
        raise NotImplementedError

    def _generate(self, prompts: list[str], first_row: int) -> list[str]:
        import torch

        torch.manual_seed(self.seed + first_row)
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.sample}
        if self.sample:
            kwargs["top_p"] = 0.75
        if self.tokenizer.pad_token_id is not None:
            kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        with torch.no_grad():
            out = self.model.generate(**enc, **kwargs)
        if not self.model.config.is_encoder_decoder:
            out = out[:, enc["input_ids"].shape[1] :]
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


class DipperPerturber(_ModelPerturber):
    """DIPPER-style paraphrase-and-perturb with a seq2seq model (``AutoModelForSeq2SeqLM``)."""

    def __init__(self, path: str, level: str, *, seed: int = 0, device: str = "cpu", max_new_tokens: int = 256,
                 sample: bool = True) -> None:  # fmt: skip
        super().__init__(path, level, seed=seed, device=device, max_new_tokens=max_new_tokens, sample=sample)

    def _load(self, path: str):
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        return AutoTokenizer.from_pretrained(path), AutoModelForSeq2SeqLM.from_pretrained(path)

    def __call__(self, texts: Sequence[str], rows: Sequence[int]) -> list[str | None]:
        prompts, owner = [], []
        for i, text in enumerate(texts):
            for p in dipper_inputs(text, self.level):
                prompts.append(p)
                owner.append(i)
        pieces: list[list[str]] = [[] for _ in texts]
        for i, out in zip(owner, self._generate(prompts, rows[0] if rows else 0), strict=True):
            pieces[i].append(out)
        return [" ".join(p) for p in pieces]


class InstructPerturber(_ModelPerturber):
    """An instruction-following causal LM (``AutoModelForCausalLM`` + ``generate``), left-padded batches."""

    def __init__(self, path: str, level: str, *, seed: int = 0, device: str = "cpu", max_new_tokens: int = 64,
                 sample: bool = False) -> None:  # fmt: skip
        super().__init__(path, level, seed=seed, device=device, max_new_tokens=max_new_tokens, sample=sample)

    def _load(self, path: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, padding_side="left")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok, AutoModelForCausalLM.from_pretrained(path)

    def prompt(self, text: str) -> str:
        message = f"{INSTRUCTIONS[self.level]}\nCaption: {text}\n"
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
            )
        return message + "New caption:"

    def __call__(self, texts: Sequence[str], rows: Sequence[int]) -> list[str | None]:
        return list(self._generate([self.prompt(t) for t in texts], rows[0] if rows else 0))


def make_perturber(mode: str, level: str, *, model: str | None = None, seed: int = 0, device: str = "cpu",
                   max_new_tokens: int | None = None, vocabulary: Sequence[str] = ()) -> Perturber:  # fmt: skip
    """Build the perturber for ``--mode`` (``lexicon`` needs no model; ``dipper`` / ``instruct`` need ``--model``)."""
    if level not in LEVELS:
        raise ValueError(f"--level {level!r}: use one of {list(LEVELS)}")
    if mode == "lexicon":
        return LexiconPerturber(level, seed, parse_vocabulary(vocabulary))
    if vocabulary:
        raise ValueError(f"--vocabulary applies to --mode lexicon only, not {mode}")
    if model is None:
        raise ValueError(f"--mode {mode} needs --model PATH (a local model folder or hub id); or use --mode lexicon")
    extra = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    if mode == "dipper":
        return DipperPerturber(model, level, seed=seed, device=device, **extra)
    if mode == "instruct":
        return InstructPerturber(model, level, seed=seed, device=device, **extra)
    raise ValueError(f"--mode {mode!r}: use lexicon, dipper or instruct")
