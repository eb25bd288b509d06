"""Build the pretrained model every device starts from, and the matching tokenised data.

Tiny random models are built from configs in code (tests, smoke runs); real ones come from
packages that ship their weights (``fedspine.assets``) or a local directory. Nothing downloads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedspine.assets import asset_path

TINY_VOCAB = 128


@dataclass
class TaskData:
    """Tokenised train/test tensors (``input_ids``, ``attention_mask``, ``labels``)."""

    train: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    num_labels: int
    label_names: list[str]


def build_model(name: str, num_labels: int, *, seed: int = 0) -> tuple[nn.Module, Any]:
    """(sequence-classification model, tokenizer or None). Random parts (tiny models, a fresh
    classifier head) are drawn from ``seed`` in a forked RNG, leaving the global RNG untouched."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "tiny-bert":
            cfg = BertConfig(
                vocab_size=TINY_VOCAB,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                max_position_embeddings=128,
                num_labels=num_labels,
            )
            return BertForSequenceClassification(cfg).eval(), None
        if name == "tiny-llama":
            cfg = LlamaConfig(
                vocab_size=TINY_VOCAB,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=128,
                max_position_embeddings=128,
                num_labels=num_labels,
                pad_token_id=0,
            )
            return LlamaForSequenceClassification(cfg).eval(), None
        path = asset_path(name) if name == "all-minilm-l6-v2" else Path(name)
        if name == "smollm2-135m":
            raise ValueError(
                "smollm2-135m as a classifier is not wired yet; use all-minilm-l6-v2 or a local path"
            )
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
        return model.eval(), tok


def build_data(
    source: str,
    tokenizer: Any,
    *,
    max_length: int,
    test_fraction: float,
    max_examples: int | None,
    seed: int,
) -> TaskData:
    """Load, split (stratified, seeded) and tokenise. ``"synthetic"`` makes a learnable toy task
    for tiny models: the label says whether the first token is in the lower half of the vocab."""
    from fedspine.data.partition import train_test_split

    if source == "synthetic":
        rng = np.random.default_rng(seed)
        n = max_examples or 600
        ids = torch.as_tensor(rng.integers(1, TINY_VOCAB, size=(n, max_length)), dtype=torch.int64)
        labels = (ids[:, 0] < TINY_VOCAB // 2).long()
        tr, te = train_test_split(n, test_fraction, seed=seed, labels=labels.numpy())
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        pick = lambda idx: {k: v[torch.as_tensor(idx)] for k, v in enc.items()}  # noqa: E731
        return TaskData(pick(tr), pick(te), 2, ["high", "low"])
    from fedspine.data.sources import label_names, load_text_classification, split_dataset
    from fedspine.data.tokenize import tokenize

    if tokenizer is None:
        raise ValueError(f"data.source {source!r} needs a model with a tokenizer (not a tiny random model)")
    ds = load_text_classification(source, max_examples=max_examples, seed=seed)
    train, test = split_dataset(ds, test_fraction, seed=seed)
    names = label_names(ds)
    return TaskData(
        tokenize(train, tokenizer, max_length), tokenize(test, tokenizer, max_length), len(names), names
    )


@torch.no_grad()
def accuracy(model: nn.Module, data: dict[str, torch.Tensor], batch_size: int = 64) -> float:
    """Classification accuracy of ``model`` on tokenised ``data`` (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    correct, n = 0, len(data["labels"])
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size] for k, v in data.items() if k != "labels"}
        pred = model(**batch).logits.argmax(-1)
        correct += int((pred == data["labels"][start : start + batch_size]).sum())
    model.train(was_training)
    return correct / max(n, 1)
