"""Tiny random models built from configs in code (milliseconds; no hub): the one definition the
tests share (``make_model`` in ``tests/conftest.py`` wraps it; keyword overrides for the few tests
that need another size). ``TINY`` has one builder per supported ``model_type`` (the registry
``fedspine.pruning.arch.FAMILIES``; a contract test holds them equal)."""

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

VOCAB = 128

# LLaMA-like decoders: the same sizes for every family (GQA when kv_heads < 4).
_DECODER = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 96,
    "vocab_size": VOCAB,
    "max_position_embeddings": 128,
}
# BERT-like encoders.
_ENCODER = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 96,
    "max_position_embeddings": 64,
    "num_labels": 2,
}


def _random_biases(model: nn.Module, seed: int) -> nn.Module:
    """HF initialises Linear biases to zero; random ones make bias slicing observable."""
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


def tiny_llama(kv_heads: int = 4, seed: int = 0, **config: Any) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**_DECODER, "num_key_value_heads": kv_heads, **config})).eval()


def tiny_qwen2(kv_heads: int = 2, seed: int = 0, **config: Any) -> Qwen2ForCausalLM:
    """Qwen2: biases on q/k/v (random here, so pruning must slice them)."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**{**_DECODER, "num_key_value_heads": kv_heads, **config}))
    return _random_biases(model, seed).eval()


def tiny_qwen3(kv_heads: int = 2, seed: int = 0, **config: Any) -> Qwen3ForCausalLM:
    """Qwen3: an RMSNorm over head_dim on q and k (weights made random here); head_dim is explicit
    in its config (default 128)."""
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(
        Qwen3Config(**{**_DECODER, "num_key_value_heads": kv_heads, "head_dim": 16, **config})
    )
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.add_(0.3 * torch.randn(norm.weight.shape, generator=g))
    return model.eval()


def tiny_mistral(kv_heads: int = 2, seed: int = 0, **config: Any) -> MistralForCausalLM:
    """Mistral with no sliding window (shorter than the window it would be plain causal anyway)."""
    torch.manual_seed(seed)
    cfg = MistralConfig(**{**_DECODER, "num_key_value_heads": kv_heads, "sliding_window": None, **config})
    return MistralForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0, **config: Any) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**{**_ENCODER, **config})).eval()


def tiny_roberta(seed: int = 0, **config: Any) -> RobertaForSequenceClassification:
    """RoBERTa: position ids start at pad_token_id + 1 = 2, so max_position_embeddings holds that
    offset (64 + 2 positions for up to 64 tokens); random biases everywhere."""
    torch.manual_seed(seed)
    cfg = RobertaConfig(**{**_ENCODER, "max_position_embeddings": 66, "pad_token_id": 1, **config})
    return _random_biases(RobertaForSequenceClassification(cfg), seed).eval()


#: model_type -> a builder of a tiny random model of it (the default variant).
TINY: dict[str, Callable[..., nn.Module]] = {
    "bert": tiny_bert,
    "roberta": tiny_roberta,
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
    "qwen3": tiny_qwen3,
    "mistral": tiny_mistral,
}
