"""Tiny random models built from configs in code (milliseconds; no hub): the one definition the
tests share (``make_model`` in ``tests/conftest.py`` wraps it; keyword overrides for the few tests
that need another size)."""

from typing import Any

import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

VOCAB = 128


def tiny_llama(kv_heads: int = 4, seed: int = 0, **config: Any) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        **{
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": kv_heads,
            "intermediate_size": 96,
            "vocab_size": VOCAB,
            "max_position_embeddings": 128,
            **config,
        }
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0, **config: Any) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        **{
            "vocab_size": VOCAB,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 96,
            "max_position_embeddings": 64,
            "num_labels": 2,
            **config,
        }
    )
    return BertForSequenceClassification(cfg).eval()
