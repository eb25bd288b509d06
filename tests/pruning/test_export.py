import json

import pytest
import torch
from tiny_models import tiny_bert, tiny_llama
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from fedspine.pruning import (
    KeptIndexMap,
    arch_shape,
    export_for_deployment,
    load_pruned,
    prune_model,
    prune_to_ratio,
)
from fedspine.pruning.export import FALLBACK, META_FILE, PLAIN


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_llama_gqa_pruned_reloads_with_plain_from_pretrained(tmp_path, ids):
    model = tiny_llama(2)
    kept, _ = prune_to_ratio(model, 0.5, round_to=8)  # one KV group of 2 heads: 64 % 2 == 0
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)
    export_for_deployment(model, tmp_path, kept_map=kept)
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["loader"] == PLAIN and KeptIndexMap.from_dict(meta["kept_map"]) == kept
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(load_pruned(tmp_path), ids), _logits(model, ids), atol=1e-5, rtol=0)


def test_llama_with_head_count_not_dividing_hidden_needs_the_fallback(tmp_path, ids):
    model = tiny_llama(4)
    kept, _ = prune_to_ratio(model, 0.3)  # 3 heads: LlamaConfig refuses 64 % 3
    export_for_deployment(model, tmp_path, kept_map=kept)
    assert json.loads((tmp_path / META_FILE).read_text())["loader"] == FALLBACK
    torch.testing.assert_close(_logits(load_pruned(tmp_path), ids), _logits(model, ids), atol=1e-5, rtol=0)


def test_bert_with_pruned_heads_reloads_through_load_pruned(tmp_path, ids):
    model = tiny_bert()
    kept, _ = prune_to_ratio(model, 0.4)
    assert model.config.num_attention_heads < 4
    rng = torch.get_rng_state()
    export_for_deployment(model, tmp_path, kept_map=kept)
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["loader"] == FALLBACK and "load_pruned" in meta["note"]
    reloaded = load_pruned(tmp_path)
    assert torch.equal(torch.get_rng_state(), rng)  # the throwaway init did not touch the global RNG
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), atol=1e-5, rtol=0)


def test_bert_pruned_only_in_mlp_reloads_with_plain_from_pretrained(tmp_path, ids):
    model = tiny_bert()
    full = KeptIndexMap.full(arch_shape(model))
    kept = prune_model(model, full, [(range(4), range(0, 96, 2))] * 2)
    export_for_deployment(model, tmp_path, kept_map=kept)
    assert json.loads((tmp_path / META_FILE).read_text())["loader"] == PLAIN
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), atol=1e-5, rtol=0)


def test_peft_model_is_merged_before_export(tmp_path, ids):
    peft = pytest.importorskip("peft")
    model = tiny_llama(2)
    kept, _ = prune_to_ratio(model, 0.5)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.linspace(-0.5, 0.5, p.numel()).view_as(p))
    expected = _logits(lora, ids)
    export_for_deployment(lora, tmp_path, kept_map=kept)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any("lora" in k for k in reloaded.state_dict())
    torch.testing.assert_close(_logits(reloaded, ids), expected, atol=1e-5, rtol=0)
