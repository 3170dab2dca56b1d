"""A deterministic, offline caption perturber: swap attributes from a small built-in lexicon.

DCPO (``sahsaeedi/DCPO-T2I`` ``src/perturb_caption.py``) perturbs captions with DIPPER at lexical diversity 40/60/80
(weak, medium, strong). That needs an 11B model; this module is **our** cheap stand-in with an explicit, countable
notion of level: it finds colour words, counts (number words and digits), object nouns and spatial relations, and
replaces ``k`` of them with another word of the same category, where ``k`` = 1 (weak), 2 (medium), 3 (strong); a caption
with fewer attributes than ``k`` gets all of them changed, and one with none is returned unchanged (``changes == []``).

The choice of attributes and replacements is a function of ``(seed, row index, text)`` only (SHA-256 seeded
``random.Random``), so reruns and resumed runs give identical output. Grammar is not repaired (``"one cat"`` may
become ``"three cat"``); the capitalisation of the first letter is kept.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

LEVEL_COUNTS = {"weak": 1, "medium": 2, "strong": 3}

LEXICON: dict[str, tuple[str, ...]] = {
    "colour": ("red", "blue", "green", "yellow", "black", "white", "purple", "pink", "brown", "grey", "gray"),
    "count": ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "single", "several"),
    "object": (
        "cat", "dog", "horse", "bird", "car", "tree", "house", "man", "woman", "child", "boat", "apple", "flower",
        "chair", "table", "mountain", "robot", "castle", "cup", "book",
        "cats", "dogs", "horses", "birds", "cars", "trees", "houses", "men", "women", "children", "boats", "apples",
        "flowers", "chairs", "tables", "mountains", "robots", "castles", "cups", "books",
    ),
    "relation": (
        "on top of", "under", "next to", "behind", "in front of", "above", "below", "beside", "inside",
        "to the left of", "to the right of",
    ),
}  # fmt: skip
_PLURAL_OBJECTS = frozenset(LEXICON["object"][20:])
_DIGITS = tuple(str(n) for n in range(1, 11))

_CATEGORY_OF = {word: cat for cat, words in LEXICON.items() for word in words} | {d: "count" for d in _DIGITS}
_PATTERN = re.compile(
    r"(?<![\w-])(" + "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in sorted(_CATEGORY_OF, key=len, reverse=True))
    + r")(?![\w-])",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Attribute:
    """One lexicon match in a caption: character span, category and the lower-cased word(s)."""

    start: int
    end: int
    category: str
    word: str


def find_attributes(text: str) -> list[Attribute]:
    """Every lexicon word or phrase in ``text``, left to right, longest match first, non-overlapping."""
    found = []
    for m in _PATTERN.finditer(text):
        word = " ".join(m.group(1).lower().split())
        found.append(Attribute(m.start(1), m.end(1), _CATEGORY_OF[word], word))
    return found


def parse_vocabulary(specs: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """``["colour=red,yellow,green,blue", ...]`` (``--vocabulary``) -> ``{"colour": ("red", ...)}``: the words a
    category's attributes may be replaced with. Raises ``ValueError`` naming the bad spec."""
    pools: dict[str, tuple[str, ...]] = {}
    for spec in specs:
        category, sep, words = spec.partition("=")
        category = category.strip()
        pool = tuple(dict.fromkeys(" ".join(w.lower().split()) for w in words.split(",") if w.strip()))
        if not sep or category not in LEXICON:
            raise ValueError(f"--vocabulary {spec!r}: use CATEGORY=word,word,... with CATEGORY one of {list(LEXICON)}")
        if len(pool) < 2:
            raise ValueError(f"--vocabulary {spec!r}: give at least two words, so every word has another to become")
        pools[category] = pool
    return pools


def _choices(attr: Attribute, pools: Mapping[str, Sequence[str]]) -> list[str]:
    if attr.category in pools:
        return [w for w in pools[attr.category] if w != attr.word]
    if attr.category == "object":  # keep number: singular for singular, plural for plural
        plural = attr.word in _PLURAL_OBJECTS
        pool = [w for w in LEXICON["object"] if (w in _PLURAL_OBJECTS) == plural]
    elif attr.category == "count" and attr.word in _DIGITS:
        pool = list(_DIGITS)
    else:
        pool = list(LEXICON[attr.category])
    same = {"grey", "gray"} if attr.word in {"grey", "gray"} else {attr.word}
    return [w for w in pool if w not in same]


def _match_case(original: str, new: str) -> str:
    return new[0].upper() + new[1:] if original[:1].isupper() else new


def perturb_caption(
    text: str, level: str, *, seed: int = 0, row: int = 0, vocabulary: Mapping[str, Sequence[str]] | None = None
) -> tuple[str, list[tuple[str, str]]]:
    """Return ``(perturbed text, [(old, new), ...])``: ``LEVEL_COUNTS[level]`` attributes (or all there are)
    replaced, chosen deterministically from ``(seed, row, text)``. ``vocabulary`` (:func:`parse_vocabulary`) limits
    the replacements of the categories it names to its words, e.g. the colours a model was trained on."""
    if level not in LEVEL_COUNTS:
        raise ValueError(f"level {level!r}: use one of {list(LEVEL_COUNTS)}")
    attrs = find_attributes(text)
    if not attrs:
        return text, []
    digest = hashlib.sha256(f"{seed}\x00{row}\x00{level}\x00{text}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    picked = sorted(rng.sample(range(len(attrs)), min(LEVEL_COUNTS[level], len(attrs))))
    pieces, changes, last = [], [], 0
    for i in picked:
        attr = attrs[i]
        new = _match_case(text[attr.start : attr.end], rng.choice(_choices(attr, vocabulary or {})))
        pieces += [text[last : attr.start], new]
        changes.append((text[attr.start : attr.end], new))
        last = attr.end
    pieces.append(text[last:])
    return "".join(pieces), changes
