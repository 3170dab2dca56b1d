"""Data sets of the toy language world as JSONL (one JSON object per line), in TRL's column conventions.

* :func:`write_preference_pairs`: ``{"prompt", "chosen", "rejected"}``, on-policy: ``k`` base samples per prompt
  judged by :func:`~diffalign.toy.llm_world.gold_score`, best against worst, prompts whose samples all tie skipped;
* :func:`write_rankings`: ``{"prompt", "responses", "scores"}``, ``n_responses`` base samples per prompt, best
  first (stable sort by gold score);
* :func:`write_unpaired`: ``{"prompt", "completion", "label"}``, one base sample per prompt, ``label`` iff it has
  the preferred property (right colour);
* :func:`write_prompts`: ``{"prompt"}``, for online methods (GRPO) that sample and score their own completions.

Prompts are drawn with :func:`~diffalign.toy.llm_world.sample_prompts` (uniform colour × shape) keyed by ``seed``.
The world has only 40 prompts, so training prompts are *not* disjoint from the evaluation prompts
(:func:`~diffalign.toy.llm_world.all_prompts`): what is measured is whether a method moves the policy's behaviour,
not generalisation to unseen prompts. :func:`conversational` turns any row into the chat-message form.

Rows are written in the standard (string) form: the prompt ends in ``=>``, a completion is the bare sentence without
a leading space or ``</s>`` (the toy tokenizer splits ``prompt + completion`` at the boundary either way).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from diffalign.toy.llm_model import generate_completions, load_toy_lm
from diffalign.toy.llm_world import gold_score, has_property, sample_prompts

COMPLETION_KEYS = ("chosen", "rejected", "completion")


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``rows`` to ``path``, one JSON object per line (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSONL file."""
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _load(base_path: str | os.PathLike | None) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    if base_path is None:
        from diffalign.toy.llm_pretrain import ensure_llm_base

        base_path = ensure_llm_base()
    return load_toy_lm(base_path)


def _scored_groups(
    base_path: str | os.PathLike | None, prompts: list[str], k: int, seed: int, temperature: float
) -> list[tuple[str, list[str], list[float]]]:
    model, tokenizer = _load(base_path)
    completions = generate_completions(model, tokenizer, prompts, n_per_prompt=k, seed=seed, temperature=temperature)
    groups = []
    for i, prompt in enumerate(prompts):
        responses = completions[i * k : (i + 1) * k]
        groups.append((prompt, responses, [gold_score(prompt, r) for r in responses]))
    return groups


def write_preference_pairs(
    path: str | os.PathLike,
    base_path: str | os.PathLike | None,
    n: int,
    seed: int,
    *,
    k: int = 4,
    temperature: float = 1.0,
) -> list[dict]:
    """Up to ``n`` pairs from ``n`` prompts of ``seed``: of ``k`` base samples, chosen = the first best, rejected =
    the first worst; prompts whose ``k`` samples all score the same are skipped. Returns the rows written.
    ``base_path=None`` uses :func:`~diffalign.toy.llm_pretrain.ensure_llm_base`."""
    if k < 2:
        raise ValueError(f"k={k}: need at least 2 samples per prompt to form a pair")
    rows = []
    for prompt, responses, scores in _scored_groups(base_path, sample_prompts(n, seed), k, seed, temperature):
        best, worst = scores.index(max(scores)), scores.index(min(scores))
        if scores[best] > scores[worst]:
            rows.append({"prompt": prompt, "chosen": responses[best], "rejected": responses[worst]})
    write_jsonl(path, rows)
    return rows


def write_rankings(
    path: str | os.PathLike,
    base_path: str | os.PathLike | None,
    n: int,
    seed: int,
    n_responses: int = 4,
    *,
    skip_ties: bool = True,
    temperature: float = 1.0,
) -> list[dict]:
    """One row per prompt of ``n`` prompts of ``seed``: ``n_responses`` base samples sorted by gold score, best first
    (ties keep their sampling order), with their scores; with ``skip_ties`` rows whose scores are all equal are
    dropped. Returns the rows written."""
    if n_responses < 2:
        raise ValueError(f"n_responses={n_responses}: a ranking needs at least 2 responses")
    rows = []
    for prompt, responses, scores in _scored_groups(base_path, sample_prompts(n, seed), n_responses, seed, temperature):
        if skip_ties and len(set(scores)) == 1:
            continue
        order = sorted(range(n_responses), key=lambda j: -scores[j])
        rows.append(
            {"prompt": prompt, "responses": [responses[j] for j in order], "scores": [scores[j] for j in order]}
        )
    write_jsonl(path, rows)
    return rows


def write_unpaired(
    path: str | os.PathLike, base_path: str | os.PathLike | None, n: int, seed: int, *, temperature: float = 1.0
) -> list[dict]:
    """``n`` rows: one base sample for each of ``n`` prompts of ``seed``, ``label`` = has the property (KTO-style
    desirable / undesirable). Returns the rows written."""
    rows = [
        {"prompt": prompt, "completion": responses[0], "label": has_property(prompt, responses[0])}
        for prompt, responses, _ in _scored_groups(base_path, sample_prompts(n, seed), 1, seed, temperature)
    ]
    write_jsonl(path, rows)
    return rows


def write_prompts(path: str | os.PathLike, n: int, seed: int) -> list[dict]:
    """``n`` rows ``{"prompt"}`` (prompts of ``seed``). Returns the rows written."""
    rows = [{"prompt": p} for p in sample_prompts(n, seed)]
    write_jsonl(path, rows)
    return rows


def conversational(row: Mapping[str, Any]) -> dict:
    """The chat-message form of a standard row: the prompt becomes ``[{"role": "user", ...}]``, each completion
    (``chosen``, ``rejected``, ``completion``, every item of ``responses``) ``[{"role": "assistant", ...}]``; other
    keys are copied. Rows already in chat form are returned as copies."""
    out = dict(row)
    if isinstance(out.get("prompt"), str):
        out["prompt"] = [{"role": "user", "content": out["prompt"]}]
    for key in COMPLETION_KEYS:
        if isinstance(out.get(key), str):
            out[key] = [{"role": "assistant", "content": out[key]}]
    if "responses" in out:
        out["responses"] = [
            [{"role": "assistant", "content": r}] if isinstance(r, str) else r for r in out["responses"]
        ]
    return out
