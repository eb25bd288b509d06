"""The one model-family registry (``fedspine.pruning.arch.FAMILIES``) and every model type in it:
pruning is exact against the masked unpruned model, export reloads, LoRA's default targets are
the pruned roles, and any other model type gets one clear refusal."""

import copy
import json
import re

import pytest
import torch
from masking import mask_like
from peft.tuners.lora import LoraLayer
from tiny_models import TINY, VOCAB, tiny_bert, tiny_llama, tiny_qwen2, tiny_qwen3, tiny_roberta
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel

from fedspine.lora import DEFAULT_TARGETS, attach
from fedspine.pruning import (
    FAMILIES,
    KeptIndexMap,
    arch_shape,
    export_for_deployment,
    family_of,
    load_pruned,
    prune_model,
    prune_to_ratio,
    unit_scores,
)
from fedspine.pruning.export import FALLBACK, META_FILE, PLAIN

SUPPORTED = "['bert', 'llama', 'mistral', 'qwen2', 'qwen3', 'roberta']"
# model type (+ variant) -> a fresh tiny model; Qwen2 and Qwen3 in both attention layouts (Qwen2's
# MHA heads go through torch-pruning's DependencyGraph with their biases, GQA groups and Qwen3's
# heads are cut by hand).
VARIANTS = {
    "roberta": tiny_roberta,
    "qwen2-gqa": lambda: tiny_qwen2(2),
    "qwen2-mha": lambda: tiny_qwen2(4),
    "qwen3-gqa": lambda: tiny_qwen3(2),
    "qwen3-mha": lambda: tiny_qwen3(4),
    "mistral-gqa": TINY["mistral"],
}


def _ids():
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    return ids.clamp(min=2)  # no RoBERTa pad id (1) inside the sequence


def _logits(model, ids):
    """Logits and the last hidden state: a classifier's random head gives logits of ~0.03, the
    hidden state is O(1), so a wrong unit shows in it far above the tolerance."""
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def test_the_registry_is_the_one_list_and_every_entry_is_tested():
    assert sorted(FAMILIES) == sorted(TINY) == ["bert", "llama", "mistral", "qwen2", "qwen3", "roberta"]
    assert {f.name for f in FAMILIES.values()} == set(DEFAULT_TARGETS) == {"bert", "llama"}
    for model_type, fam in FAMILIES.items():
        model = TINY[model_type]()
        assert model.config.model_type == model_type and family_of(model) is fam
        assert DEFAULT_TARGETS[fam.name] == fam.lora_targets  # one target list per family
        assert fam.mlp_matrices == {"bert": 2, "llama": 3}[fam.name]
        assert fam.causal_lm == (fam.name == "llama")


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_lora_default_targets_are_exactly_the_pruned_roles(model_type):
    model = TINY[model_type]()
    fam = family_of(model)
    roles = {
        p
        for i in range(arch_shape(model).num_layers)
        for ps in fam.module_paths(model, i).values()
        for p in ps
    }
    peft_model = attach(model, rank=2)
    wrapped = {p for p, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == roles


def test_other_model_types_get_one_refusal_naming_the_type_and_the_list(tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16))
    msg = re.escape(f"unsupported model_type 'gpt2'; supported: {SUPPORTED}")
    for call in (
        lambda: family_of(gpt2),
        lambda: arch_shape(gpt2),
        lambda: prune_to_ratio(gpt2, 0.5),
        lambda: unit_scores(gpt2),
        lambda: export_for_deployment(gpt2, tmp_path),
        lambda: attach(gpt2, 4),
    ):
        with pytest.raises(ValueError, match=msg):
            call()
    assert not any(tmp_path.iterdir())  # refused before anything was written
    with pytest.raises(ValueError, match="pass family= one of \\['bert', 'llama'\\] or targets="):
        attach(gpt2, 4)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pruned_equals_masked_unpruned_and_export_reloads(variant, ratio, tmp_path):
    model = VARIANTS[variant]()
    masked = copy.deepcopy(model)
    full = arch_shape(model)
    kept, achieved = prune_to_ratio(model, ratio, round_to=8)
    ids = _ids()

    now = arch_shape(model)
    assert achieved == pytest.approx(kept.sparsity(family_of(model).mlp_matrices)) and achieved > 0
    assert now.intermediate_size < full.intermediate_size and now.hidden_size == full.hidden_size
    if ratio >= 0.5:
        assert now.num_heads < full.num_heads
    torch.testing.assert_close(_logits(model, ids), _logits(mask_like(masked, kept), ids), atol=1e-5, rtol=0)
    c = model.config
    assert (c.num_attention_heads, c.intermediate_size) == (now.num_heads, now.intermediate_size)
    if family_of(model).causal_lm:
        assert c.num_key_value_heads == now.num_kv_heads and c.head_dim == full.head_dim
        out = model.generate(ids[:1], max_new_tokens=3, do_sample=False)
        assert out.shape == (1, ids.shape[1] + 3)

    export_for_deployment(model, tmp_path, kept_map=kept)
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert KeptIndexMap.from_dict(meta["kept_map"]) == kept
    # RoBERTa derives head size from hidden / heads (as BERT does): pruned heads need load_pruned.
    # Qwen2, Qwen3 and Mistral keep head_dim in the config and check nothing else: always plain.
    plain = not variant.startswith("roberta") or now.num_heads == full.num_heads
    assert meta["loader"] == (PLAIN if plain else FALLBACK)
    if plain:
        auto = AutoModelForCausalLM if family_of(model).causal_lm else AutoModelForSequenceClassification
        reloaded = auto.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(load_pruned(tmp_path), ids), _logits(model, ids), atol=1e-5, rtol=0)


def test_roberta_pruned_only_in_the_mlp_reloads_with_plain_from_pretrained(tmp_path):
    model = tiny_roberta()
    kept = prune_model(model, KeptIndexMap.full(arch_shape(model)), [(range(4), range(0, 96, 3))] * 2)
    export_for_deployment(model, tmp_path, kept_map=kept)
    assert json.loads((tmp_path / META_FILE).read_text())["loader"] == PLAIN
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, _ids()), _logits(model, _ids()), atol=1e-5, rtol=0)


def test_qwen2_biases_are_sliced_with_their_rows():
    model = tiny_qwen2(4)  # MHA: heads go through the DependencyGraph
    q_bias = model.model.layers[0].self_attn.q_proj.bias.detach().clone()
    kept = prune_model(model, KeptIndexMap.full(arch_shape(model)), [([1, 3], range(96))] * 2)
    rows = torch.as_tensor(kept.head_rows(0))
    assert torch.equal(model.model.layers[0].self_attn.q_proj.bias, q_bias[rows])
    assert model.model.layers[0].self_attn.k_proj.bias.shape == (32,)


@pytest.mark.parametrize("make", [tiny_bert, lambda: tiny_llama(2)], ids=["bert", "llama-gqa"])
def test_bert_and_llama_stay_exact_at_the_same_ratios(make):
    for ratio in (0.25, 0.5, 0.75):
        model = make()
        masked = copy.deepcopy(model)
        kept, _ = prune_to_ratio(model, ratio, round_to=8)
        ids = _ids()
        torch.testing.assert_close(
            _logits(model, ids), _logits(mask_like(masked, kept), ids), atol=1e-5, rtol=0
        )
