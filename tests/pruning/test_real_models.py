"""Real pretrained models shipped in pip packages (scripts/setup.sh installs them)."""

import json
import os
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from fedspine.assets import asset_path
from fedspine.pruning import (
    KeptIndexMap,
    arch_shape,
    export_for_deployment,
    family_of,
    load_pruned,
    plan_counts,
    prune_model,
    prune_to_ratio,
    select_units,
    unit_scores,
)
from fedspine.pruning.export import META_FILE
from fedspine.pruning.structured import _build_graph

pytestmark = pytest.mark.real_model


def _asset(name):
    try:
        return asset_path(name)
    except FileNotFoundError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"asset {name!r} is not installed (scripts/setup.sh)")


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_minilm_prunes_exports_and_reloads(ratio, tmp_path):
    path = _asset("all-minilm-l6-v2")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(["A man is eating food.", "The film was a delight."], padding=True, return_tensors="pt")
    kept, achieved = prune_to_ratio(model, ratio, "magnitude", round_to=8)
    assert achieved == pytest.approx(ratio, abs=0.02)
    shape = arch_shape(model)
    assert shape.num_heads < 12 and shape.intermediate_size % 8 == 0 and shape.hidden_size == 384
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()

    export_for_deployment(model, tmp_path, tokenizer=tok, kept_map=kept)
    assert json.loads((tmp_path / META_FILE).read_text())["loader"] == "fedspine.pruning.load_pruned"
    reloaded = load_pruned(tmp_path)
    reloaded_tok = AutoTokenizer.from_pretrained(tmp_path)
    with torch.no_grad():
        again = reloaded(
            **reloaded_tok(
                ["A man is eating food.", "The film was a delight."], padding=True, return_tensors="pt"
            )
        ).logits
    torch.testing.assert_close(again, logits, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def smollm2():
    path = _asset("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok


def test_smollm2_prunes_kv_groups_and_mlp_then_generates(smollm2, tmp_path):
    model, tok = smollm2
    full = KeptIndexMap.full(arch_shape(model))
    assert (full.shape.num_heads, full.shape.num_kv_heads, full.shape.intermediate_size) == (9, 3, 1536)
    plan = plan_counts(full, 0.3, round_to=8, mlp_matrices=3)
    positions = select_units(unit_scores(model, "magnitude"), plan.keep_heads, plan.keep_channels)

    t0 = time.perf_counter()
    _build_graph(model, family_of(model))  # timed alone for the report; prune_model builds its own
    t_graph = time.perf_counter() - t0
    t0 = time.perf_counter()
    kept = prune_model(model, full, positions)  # builds its own graph + surgery
    t_prune = time.perf_counter() - t0
    print(
        f"\nSmolLM2-135M prune to {plan.achieved_ratio:.3f}: DependencyGraph build {t_graph:.2f} s, "
        f"prune_model (graph + surgery + config) {t_prune:.2f} s"
    )

    c = model.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (6, 2, plan.keep_channels)
    assert kept.sparsity(3) == pytest.approx(plan.achieved_ratio)
    x = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**x, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == x["input_ids"].shape[1] + 4

    export_for_deployment(model, tmp_path, tokenizer=tok, kept_map=kept)
    assert json.loads((tmp_path / META_FILE).read_text())["loader"] == "transformers.from_pretrained"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**x).logits, model(**x).logits, atol=1e-5, rtol=0)
