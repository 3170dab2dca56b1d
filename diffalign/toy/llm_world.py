"""The toy language world: prompts name a colour and a shape, completions describe the object in a tiny grammar.

A prompt is ``"describe : red circle =>"``; a completion is one sentence of the grammar

    "a" [SIZE] COLOUR SHAPE [POSITION] ["with a" COLOUR "background"] "."

e.g. ``"a small red circle on the left with a blue background ."`` (words separated by single spaces, punctuation a
word of its own). The language has 8 colours, 5 shapes, 4 sizes and 5 positions (40 prompts, 34 words).

The object's colour and shape are read off the completion as the shape word that comes first and the colour word
directly before it (the adjective that modifies it), grammatical or not; a completion is *well formed* iff it parses
under the grammar exactly. The gold score is graded,

    gold = 0.5·[colour right] + 0.3·[shape right] + 0.2·[well formed]   ∈ {0, 0.2, 0.3, 0.5, 0.7, 0.8, 1},

and the *preferred property* is ``colour right`` (the counterpart of colour adherence in the image toy).

The pretraining corpus (:func:`pretraining_corpus`) is deliberately noisy: a completion names a wrong colour with
probability ``colour_noise`` (uniform over the other colours), a wrong shape with probability ``shape_noise``, and is
malformed (final ``.`` dropped, or one word repeated) with probability ``malformed``; the background colour is
never the prompted nor the described colour. A model that learns the corpus puts about ``1 - colour_noise`` on the
right colour. Size, position and background are independent of the noise, so length carries no signal.

Every draw is addressed (``diffalign.utils.randomness.sample_key``): item ``i`` of seed ``s`` is the same whatever
``n`` is.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from diffalign.utils.randomness import sample_key

COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart")
SIZES: tuple[str, ...] = ("small", "big", "tiny", "huge")
POSITIONS: tuple[tuple[str, ...], ...] = (
    ("on", "the", "left"),
    ("on", "the", "right"),
    ("at", "the", "top"),
    ("at", "the", "bottom"),
    ("in", "the", "middle"),
)
PROMPT_HEAD = ("describe", ":")
PROMPT_TAIL = ("=", ">")
BACKGROUND = ("with", "a")

#: Every word of the language, in a fixed order (the tokenizer's vocabulary after its special tokens).
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        [*PROMPT_HEAD, *PROMPT_TAIL, "a", ".", *BACKGROUND, "background", *COLOURS, *SHAPES, *SIZES]
        + [w for p in POSITIONS for w in p]
    )
)

#: Weights of the gold score's terms: colour, shape, well formed.
COLOUR_WEIGHT, SHAPE_WEIGHT, FORM_WEIGHT = 0.5, 0.3, 0.2

#: Corpus noise of the committed base (see :mod:`diffalign.toy.llm_pretrain`).
DEFAULT_COLOUR_NOISE = 0.6
DEFAULT_SHAPE_NOISE = 0.2
DEFAULT_MALFORMED = 0.1

# Stream ids of the keyed draws (0..4 are diffalign.utils.randomness's training streams; 100+ the image world's).
_PROMPT_STREAM = 200
_COMPLETION_STREAM = 201

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Split like the toy tokenizer's pre-tokenizer: runs of word characters, and every other non-space character
    on its own."""
    return _WORD.findall(text)


def prompt_for(colour: str, shape: str) -> str:
    """The world's prompt: ``"describe : red circle =>"``."""
    return f"describe : {colour} {shape} =>"


def parse_prompt(prompt: Any) -> tuple[str, str]:
    """``(colour, shape)`` of a prompt (a string, or chat messages whose last user turn is one); ``ValueError`` if it
    is not of the world's form."""
    w = words(text_of(prompt, role="user"))
    if len(w) != 6 or tuple(w[:2]) != PROMPT_HEAD or tuple(w[4:]) != PROMPT_TAIL or w[2] not in COLOURS:
        raise ValueError(f"prompt {prompt!r} is not of the form 'describe : <colour> <shape> =>'")
    if w[3] not in SHAPES:
        raise ValueError(f"prompt {prompt!r}: shape {w[3]!r} is not one of {SHAPES}")
    return w[2], w[3]


def text_of(value: Any, role: str) -> str:
    """A string as is; for chat messages (a list of ``{"role", "content"}``), the content of the last ``role``
    message."""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and value and all(isinstance(m, Mapping) for m in value):
        for message in reversed(value):
            if message.get("role") == role:
                return str(message["content"])
        raise ValueError(f"no {role!r} message in {value!r}")
    raise TypeError(f"expected a string or a list of chat messages, got {type(value).__name__}")


def all_prompts() -> list[str]:
    """The fixed evaluation prompts: every colour × shape, colour-major (40 prompts)."""
    return [prompt_for(c, s) for c in COLOURS for s in SHAPES]


def _rng(seed: int, index: int, stream: int) -> random.Random:
    return random.Random(sample_key(seed, 0, index, stream))


def sample_prompts(n: int, seed: int) -> list[str]:
    """``n`` prompts with uniform colour and shape; prompt ``i`` of ``seed`` does not depend on ``n``."""
    out = []
    for i in range(n):
        rng = _rng(seed, i, _PROMPT_STREAM)
        out.append(prompt_for(rng.choice(COLOURS), rng.choice(SHAPES)))
    return out


def make_completion(
    colour: str,
    shape: str,
    rng: random.Random,
    *,
    colour_noise: float = 0.0,
    shape_noise: float = 0.0,
    malformed: float = 0.0,
) -> str:
    """A completion for the prompt ``(colour, shape)``: right unless noise strikes (see the module docstring).
    Optional parts (size, position, background) are each present with probability 1/2."""
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"colour={colour!r}, shape={shape!r}: use one of {COLOURS} and {SHAPES}")
    said_colour = rng.choice([c for c in COLOURS if c != colour]) if rng.random() < colour_noise else colour
    said_shape = rng.choice([s for s in SHAPES if s != shape]) if rng.random() < shape_noise else shape
    out = ["a"]
    if rng.random() < 0.5:
        out.append(rng.choice(SIZES))
    out += [said_colour, said_shape]
    if rng.random() < 0.5:
        out += rng.choice(POSITIONS)
    if rng.random() < 0.5:
        out += [*BACKGROUND, rng.choice([c for c in COLOURS if c not in (colour, said_colour)]), "background"]
    out.append(".")
    if rng.random() < malformed:
        if rng.random() < 0.5:
            out.pop()
        else:
            i = rng.randrange(len(out) - 1)
            out.insert(i, out[i])
    return " ".join(out)


@dataclass(frozen=True)
class ParsedCompletion:
    """What a completion says: the object's ``colour`` and ``shape`` (``None`` when absent) and whether it is
    ``well_formed`` (parses under the grammar)."""

    colour: str | None
    shape: str | None
    well_formed: bool


def _is_well_formed(w: list[str]) -> bool:
    i = 1 if w[:1] == ["a"] else 0
    if i == 0:
        return False
    if i < len(w) and w[i] in SIZES:
        i += 1
    if len(w) < i + 2 or w[i] not in COLOURS or w[i + 1] not in SHAPES:
        return False
    i += 2
    if tuple(w[i : i + 3]) in POSITIONS:
        i += 3
    if tuple(w[i : i + 2]) == BACKGROUND and len(w) > i + 3 and w[i + 2] in COLOURS and w[i + 3] == "background":
        i += 4
    return w[i:] == ["."]


def parse_completion(completion: Any) -> ParsedCompletion:
    """Read a completion (a string, or chat messages whose last assistant turn is one); never raises on garbage."""
    w = words(text_of(completion, role="assistant"))
    j = next((k for k, x in enumerate(w) if x in SHAPES), None)
    shape = w[j] if j is not None else None
    colour = w[j - 1] if j is not None and j > 0 and w[j - 1] in COLOURS else None
    return ParsedCompletion(colour=colour, shape=shape, well_formed=_is_well_formed(w))


def gold_score(prompt: Any, completion: Any) -> float:
    """``0.5·[colour right] + 0.3·[shape right] + 0.2·[well formed]`` ∈ [0, 1] (strings or chat messages)."""
    colour, shape = parse_prompt(prompt)
    parsed = parse_completion(completion)
    score = COLOUR_WEIGHT * (parsed.colour == colour) + SHAPE_WEIGHT * (parsed.shape == shape)
    return round(score + FORM_WEIGHT * parsed.well_formed, 6)


def has_property(prompt: Any, completion: Any) -> bool:
    """The preferred property: the completion's object has the prompted colour."""
    return parse_completion(completion).colour == parse_prompt(prompt)[0]


def pretraining_corpus(
    n: int,
    seed: int,
    noise: float = DEFAULT_COLOUR_NOISE,
    *,
    shape_noise: float = DEFAULT_SHAPE_NOISE,
    malformed: float = DEFAULT_MALFORMED,
) -> list[tuple[str, str]]:
    """``n`` ``(prompt, completion)`` pairs: prompt ``i`` is ``sample_prompts(n, seed)[i]``, its completion
    :func:`make_completion` with colour noise ``noise`` (fixed once per item, so the corpus is a fixed noisy set)."""
    if not (0.0 <= noise <= 1.0 and 0.0 <= shape_noise <= 1.0 and 0.0 <= malformed <= 1.0):
        raise ValueError(f"noise={noise}, shape_noise={shape_noise}, malformed={malformed}: all must be in [0, 1]")
    corpus = []
    for i, prompt in enumerate(sample_prompts(n, seed)):
        colour, shape = parse_prompt(prompt)
        rng = _rng(seed, i, _COMPLETION_STREAM)
        completion = make_completion(
            colour, shape, rng, colour_noise=noise, shape_noise=shape_noise, malformed=malformed
        )
        corpus.append((prompt, completion))
    return corpus
