"""Data for the causal-LM task: prompt/answer pairs as next-token tensors, loss on the answer only.

Two sources:

* ``"chatterbot"``: the English Q/A dialogs of the ``chatterbot-corpus`` package (BSD), read
  straight from its YAML files (we never import the package). Each file is one *topic* (ai,
  tech_support, trivia, ...); the topic is the example's *group*, used only to partition the
  data non-IID across devices (Dirichlet over topics, like labels for classification).
* ``"synthetic"``: a toy task for tiny random models: arithmetic token progressions whose step
  (1..4) the model must read from the prompt to continue the sequence; the step is the group.

Every example becomes ``input_ids`` (prompt tokens, then answer tokens, then padding),
``attention_mask`` and ``labels`` = ``input_ids`` on answer tokens and ``-100`` on prompt and
padding, so an HF ``*ForCausalLM`` returns the answer-only next-token loss from ``model(**batch)``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

IGNORE = -100  # HF's ignore_index: positions that carry no loss
CHATTERBOT_DIST = "chatterbot-corpus"  # pip package (install with --no-deps; scripts/setup.sh)
SYNTHETIC_STEPS = (1, 2, 3, 4)


@dataclass(frozen=True)
class QAPair:
    prompt: str
    answer: str
    group: int  # topic id (partitioning only)


def chatterbot_dir(language: str = "english") -> Path:
    """The corpus' YAML folder inside the installed package, located without importing it."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"data.source 'chatterbot' needs the package {CHATTERBOT_DIST!r}: run `bash scripts/setup.sh` "
            f"(or `pip install --no-deps {CHATTERBOT_DIST}`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / language
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing from the installed {CHATTERBOT_DIST!r} package")
    return path


def load_chatterbot(language: str = "english") -> tuple[list[QAPair], list[str]]:
    """(pairs, topic names). Topics are the YAML file stems in sorted order (group id = position).

    Our choices: every consecutive turn pair of a dialog is one (prompt, answer) example, so the
    few multi-turn dialogs give all their exchanges; exact duplicate pairs (tech_support repeats
    many verbatim) are kept once, or the same pair would sit in both train and test; turns that
    are not plain strings are skipped. The 1.3.3 English corpus gives 1,229 unique pairs in 21
    topics (trivia 313 ... history 8; tech_support's 1,050 dialogs are only 10 distinct pairs).
    """
    folder = chatterbot_dir(language)
    topics = sorted(p.stem for p in folder.glob("*.yml"))
    pairs: list[QAPair] = []
    seen: set[tuple[str, str]] = set()
    for gid, topic in enumerate(topics):
        doc = yaml.safe_load((folder / f"{topic}.yml").read_text(encoding="utf-8")) or {}
        for dialog in doc.get("conversations") or []:
            turns = [t.strip() for t in dialog if isinstance(t, str)]
            for q, a in zip(turns, turns[1:], strict=False):
                if q and a and (q, a) not in seen:
                    seen.add((q, a))
                    pairs.append(QAPair(q, a, gid))
    if not pairs:
        raise ValueError(f"no Q/A pairs found under {folder}")
    return pairs, topics


def format_prompt(question: str) -> str:
    """Our plain, model-agnostic template. A chat template (SmolLM2's adds a 20-token system
    prompt) would spend most of a 64-token budget on boilerplate."""
    return f"Question: {question}\nAnswer:"


def tokenize_prompt_answer(
    prompts: Sequence[str], answers: Sequence[str], tokenizer: Any, max_length: int
) -> dict[str, torch.Tensor]:
    """Right-padded ``(N, max_length)`` tensors with answer-only labels (module docstring).

    The answer is ``" " + answer`` followed by the tokenizer's EOS (so the model learns to stop).
    Truncation (ours): the prompt keeps at most its last ``max_length // 2`` tokens (the end of
    the question, next to "Answer:"), the answer fills the rest; so every example has at least
    one answer token and a batch never has an empty loss.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 4:
        raise ValueError(f"max_length must be an int >= 4, got {max_length!r}")
    pad, eos = getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)
    if pad is None or eos is None:
        raise ValueError("the tokenizer needs pad and eos tokens for the causal-LM task")
    p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    a_ids = tokenizer([" " + a for a in answers], add_special_tokens=False)["input_ids"]
    return pack_prompt_answer(p_ids, [a + [eos] for a in a_ids], max_length, pad_id=pad)


def pack_prompt_answer(
    prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]], max_length: int, *, pad_id: int
) -> dict[str, torch.Tensor]:
    """Token-id lists -> padded tensors with answer-only labels (truncation as in
    :func:`tokenize_prompt_answer`). Empty answers are an error."""
    n = len(prompt_ids)
    ids = torch.full((n, max_length), pad_id, dtype=torch.int64)
    mask = torch.zeros((n, max_length), dtype=torch.int64)
    labels = torch.full((n, max_length), IGNORE, dtype=torch.int64)
    for i, (p, a) in enumerate(zip(prompt_ids, answer_ids, strict=True)):
        if not a:
            raise ValueError(f"example {i} has an empty answer")
        p = list(p)[-(max_length // 2) :] if len(p) > max_length // 2 else list(p)
        a = list(a)[: max_length - len(p)]
        row = p + a
        ids[i, : len(row)] = torch.as_tensor(row)
        mask[i, : len(row)] = 1
        labels[i, len(p) : len(row)] = torch.as_tensor(a)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def synthetic_lm(
    n: int, max_length: int, vocab: int, *, seed: int
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """(tensors, groups) of the toy continuation task for tiny models (ids ``1..vocab-1``; 0 pads).

    Sequence ``i`` has a random start, a step ``k`` from :data:`SYNTHETIC_STEPS` and a random length
    in ``[max_length // 2, max_length]``; token ``j`` is ``1 + (start + j*k) mod (vocab - 1)``. The
    first half is the prompt, the rest the answer: fully predictable once ``k`` is read from the
    prompt, so a model that learns reaches next-token accuracy 1. Group = ``k``'s position.
    """
    if max_length < 8:
        raise ValueError(f"max_length must be >= 8, got {max_length}")
    rng = np.random.default_rng(seed)
    steps = np.asarray(SYNTHETIC_STEPS)
    groups = rng.integers(0, len(steps), size=n)
    starts = rng.integers(0, vocab - 1, size=n)
    lengths = rng.integers(max_length // 2, max_length + 1, size=n)
    prompts, answers = [], []
    for g, s, length in zip(groups, starts, lengths, strict=True):
        seq = (1 + (s + np.arange(length) * steps[g]) % (vocab - 1)).tolist()
        prompts.append(seq[: length // 2])
        answers.append(seq[length // 2 :])
    return pack_prompt_answer(prompts, answers, max_length, pad_id=0), groups.astype(np.int64)


__all__ = [
    "IGNORE",
    "QAPair",
    "chatterbot_dir",
    "format_prompt",
    "load_chatterbot",
    "pack_prompt_answer",
    "synthetic_lm",
    "tokenize_prompt_answer",
]
