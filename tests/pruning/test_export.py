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


@pytest.mark.parametrize(("family", "ratio", "loader"), [("llama", 0.5, PLAIN), ("bert", 0.4, FALLBACK)])
def test_device_adapter_exports_as_peft_and_loads_on_its_pruned_base(tmp_path, ids, family, ratio, loader):
    import numpy as np
    from peft import PeftModel

    from fedspine.lora import attach, extract, load

    model = tiny_llama(2) if family == "llama" else tiny_bert()
    kept, _ = prune_to_ratio(model, ratio)
    tuned = attach(model, rank=4)
    rng = np.random.default_rng(0)
    load(tuned, {k: (0.1 * rng.normal(size=v.shape)).astype(np.float32) for k, v in extract(tuned).items()})
    expected = _logits(tuned, ids)
    export_for_deployment(tuned, tmp_path, kept_map=kept, adapter=True)
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["loader"] == loader and meta["adapter"] == "adapter" and "not merged" in meta["note"]
    base = load_pruned(tmp_path)
    assert not any("lora" in k for k in base.state_dict())
    assert not torch.allclose(_logits(base, ids), expected)  # the base alone is not the tuned model
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")  # plain peft
    torch.testing.assert_close(_logits(reloaded, ids), expected, atol=1e-5, rtol=0)
    assert torch.equal(_logits(tuned, ids), expected)  # the caller's model was not merged or unloaded
    merged = reloaded.merge_and_unload()
    torch.testing.assert_close(_logits(merged, ids), expected, atol=1e-5, rtol=0)


def test_adapter_export_needs_a_peft_model(tmp_path):
    with pytest.raises(ValueError, match="adapter=True needs a peft model"):
        export_for_deployment(tiny_bert(), tmp_path, adapter=True)
    assert not any(tmp_path.iterdir())
