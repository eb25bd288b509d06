"""Tiny random HF models for the LoRA tests (built from configs, nothing downloaded)."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        vocab_size=128,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        num_labels=2,
    )
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture
def make_model():
    """Factory: make_model("llama" | "bert", seed) -> a fresh tiny model (same seed, same weights)."""
    return lambda family, seed=0: {"llama": tiny_llama, "bert": tiny_bert}[family](seed)


@pytest.fixture
def input_ids():
    return torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
