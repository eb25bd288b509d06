import copy

import numpy as np
import pytest
import torch
from masking import zero_removed
from tiny_models import tiny_bert, tiny_llama, tiny_qwen2

from fedspine.pruning import (
    ArchShape,
    KeptIndexMap,
    arch_shape,
    layer_roles,
    module_slices,
    plan_counts,
    prune_model,
    prune_to_ratio,
    select_units,
    unit_scores,
)
from fedspine.pruning.structured import UnitScores


def _keep_positions(name, layer):
    """Hand-picked survivors: drop head unit 1 (GQA: KV group 1 = query heads 2, 3) and 3 channels."""
    heads = [0, 1] if name == "llama-gqa" else [0, 2, 3]
    if layer == 1:
        heads = [2, 3] if name == "llama-gqa" else [0, 1, 3]
    chans = [c for c in range(96) if c not in (5, 40 + layer, 95)]
    return heads, chans


def test_prune_is_exact_when_removed_units_were_zeroed(tiny_model, ids):
    name, model = tiny_model
    shape = arch_shape(model)
    positions = [_keep_positions(name, i) for i in range(shape.num_layers)]
    zero_removed(model, positions, shape.group_size, shape.head_dim)
    with torch.no_grad():
        before = model(ids).logits
    kept = prune_model(model, KeptIndexMap.full(shape), positions)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)

    now = arch_shape(model)
    n_heads = 2 if name == "llama-gqa" else 3
    assert (now.num_heads, now.intermediate_size) == (n_heads, 93)
    assert now.num_kv_heads == (1 if name == "llama-gqa" else 3)
    assert model.config.num_attention_heads == n_heads and model.config.intermediate_size == 93
    if name.startswith("llama"):
        assert model.config.num_key_value_heads == now.num_kv_heads and model.config.head_dim == 16
        assert all(
            lr.self_attn.num_key_value_groups == 2 if name == "llama-gqa" else 1 for lr in model.model.layers
        )
        out = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
        assert out.shape == (1, ids.shape[1] + 4)
    else:
        sa = model.bert.encoder.layer[0].attention.self
        assert (sa.num_attention_heads, sa.attention_head_size, sa.all_head_size) == (3, 16, 48)
    assert kept.layers[1].heads == ((2, 3) if name == "llama-gqa" else (0, 1, 3))
    assert 93 == len(kept.layers[0].channels) and 41 not in kept.layers[1].channels


@pytest.mark.parametrize("name", ["bert", "llama-gqa"])
def test_three_successive_prunes_map_to_original_weights(name, ids):
    model = tiny_bert() if name == "bert" else tiny_llama(2)
    original = copy.deepcopy(model)
    kept = None
    for ratio in (0.2, 0.45, 0.7):
        kept, achieved = prune_to_ratio(model, ratio, "magnitude", round_to=4, kept_map=kept)
        assert achieved == pytest.approx(kept.sparsity(2 if name == "bert" else 3))
    assert len(kept.layers[0].channels) < 96 // 2
    orig_mods, now_mods = dict(original.named_modules()), dict(model.named_modules())
    slices = module_slices(model, kept)
    assert len(slices) == 2 * (7 if name == "llama-gqa" else 6)
    for path, sl in slices.items():
        w = orig_mods[path].weight.detach()
        if sl.out_idx is not None:
            w = w[torch.as_tensor(sl.out_idx)]
        if sl.in_idx is not None:
            w = w[:, torch.as_tensor(sl.in_idx)]
        torch.testing.assert_close(now_mods[path].weight.detach(), w, atol=0, rtol=0)
        if sl.out_idx is not None and orig_mods[path].bias is not None:
            torch.testing.assert_close(
                now_mods[path].bias.detach(), orig_mods[path].bias.detach()[sl.out_idx]
            )
    model(ids)  # still runs


def test_select_units_keeps_top_scores_per_layer_and_expands_kv_groups():
    s = UnitScores(
        heads=(np.array([3.0, 1.0, 2.0]), np.array([0.0, 5.0, 5.0])),
        channels=(np.array([1.0, 9.0, 3.0, 3.0]), np.array([4.0, 3.0, 2.0, 1.0])),
        group_size=2,
    )
    pos = select_units(s, keep_heads=4, keep_channels=2)
    assert pos[0] == ([0, 1, 4, 5], [1, 2])  # channel tie 2 vs 3: lower index wins
    assert pos[1] == ([2, 3, 4, 5], [0, 1])
    with pytest.raises(ValueError, match="multiple of the KV group size 2"):
        select_units(s, keep_heads=3, keep_channels=2)
    with pytest.raises(ValueError, match="cannot keep 8 heads"):
        select_units(s, keep_heads=8, keep_channels=2)


def test_plan_counts_rounds_to_whole_groups_and_reports_achieved_ratio():
    smol = ArchShape(
        num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536, hidden_size=576
    )
    plan = plan_counts(smol, 0.2, round_to=8, mlp_matrices=3)
    # heads: 0.8 * 3 groups = 2.4 -> 2 groups = 6 heads; attention 884,736 -> 589,824 weights per layer
    # channels: (0.8 * 3,538,944 - 589,824) / 1,728 = 1297.07 -> 1296 (multiple of 8)
    assert (plan.keep_heads, plan.keep_channels) == (6, 1296)
    assert plan.achieved_ratio == pytest.approx(1 - (589_824 + 1_728 * 1296) / 3_538_944)
    assert plan.achieved_ratio == pytest.approx(0.2, abs=0.002)
    assert plan_counts(smol, 0.0, mlp_matrices=3).achieved_ratio == 0.0
    extreme = plan_counts(smol, 0.99, round_to=8, mlp_matrices=3)
    assert (extreme.keep_heads, extreme.keep_channels) == (3, 8)  # at least one group, at least round_to
    # a map already pruned further than the target caps the counts: nothing grows back
    half = KeptIndexMap.full(smol).compose([(range(3), range(400))] * 30)
    again = plan_counts(half, 0.1, mlp_matrices=3)
    assert (again.keep_heads, again.keep_channels) == (3, 400)
    for bad, kw in ((1.0, {}), (-0.1, {}), (0.5, {"round_to": 0})):
        with pytest.raises(ValueError, match="ratio|round_to"):
            plan_counts(smol, bad, mlp_matrices=3, **kw)
    with pytest.raises(ValueError, match="mlp_matrices is required"):
        plan_counts(smol, 0.3)


def test_prune_to_ratio_prunes_further_on_repeat_and_hits_the_plan(ids):
    model = tiny_llama(4)
    kept, r1 = prune_to_ratio(model, 0.3, round_to=8)
    assert (model.config.num_attention_heads, model.config.intermediate_size) == (3, 64)
    assert r1 == pytest.approx(plan_counts(tiny_llama(4), 0.3, round_to=8).achieved_ratio)
    same, r_same = prune_to_ratio(model, 0.1, kept_map=kept)  # lower target: nothing to do
    assert same is kept and r_same == r1
    kept2, r2 = prune_to_ratio(model, 0.6, "taylor", kept_map=kept, calib=ids)
    assert r2 > r1 and model.config.num_attention_heads == 2
    assert model(ids).logits.shape == (2, 12, 128)


def test_importance_criteria_rank_a_dead_unit_last_and_taylor_leaves_no_grads(ids):
    model = tiny_llama(2)
    with torch.no_grad():
        lr = layer_roles(model)[0]
        lr.q.weight[32:64] = 0  # KV group 1's query heads
        lr.k.weight[16:32] = 0
        lr.v.weight[16:32] = 0
        lr.o.weight[:, 32:64] = 0
        for m in lr.mlp_in:
            m.weight[7] = 0
        lr.mlp_out.weight[:, 7] = 0
    model.model.embed_tokens.weight.requires_grad_(False)
    for name in ("magnitude", "taylor"):
        s = unit_scores(model, name, calib=ids)
        assert s.group_size == 2 and s.heads[0].shape == (2,) and s.channels[0].shape == (96,)
        assert s.heads[0][1] == 0 and s.channels[0][7] == 0 and s.channels[0].min() == 0
        assert s.heads[1].min() > 0
    assert all(p.grad is None for p in model.parameters())
    assert not model.model.embed_tokens.weight.requires_grad and lr.q.weight.requires_grad
    with pytest.raises(ValueError, match="taylor importance needs calib"):
        unit_scores(model, "taylor")
    with pytest.raises(ValueError, match="importance must be one of"):
        unit_scores(model, "fisher")


def test_bad_positions_are_refused_before_any_surgery():
    model = tiny_llama(2)
    full = KeptIndexMap.full(arch_shape(model))
    with pytest.raises(ValueError, match="whole KV groups"):
        prune_model(model, full, [([0, 1, 2], range(96)), ([0, 1, 2], range(96))])
    with pytest.raises(ValueError, match="same numbers of heads"):
        prune_model(model, full, [([0, 1], range(96)), ([0, 1], range(90))])
    half = full.compose([([0, 1], range(48))] * 2)
    with pytest.raises(ValueError, match="does not describe this model"):
        prune_model(model, half, [([0, 1], range(48))] * 2)
    assert arch_shape(model) == full.shape


def test_refuses_a_model_with_peft_lora_attached():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_llama(4), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    base = model.get_base_model()
    with pytest.raises(ValueError, match="merge .*or detach the adapters"):
        prune_to_ratio(base, 0.3)
    with pytest.raises(ValueError, match="merge .*or detach the adapters"):
        prune_model(base, KeptIndexMap.full(arch_shape(base)), [([0, 1], range(96))] * 2)


def test_taylor_on_bert_needs_labels_in_the_calibration_batch(ids):
    model = tiny_bert()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with pytest.raises(ValueError, match="returns a loss"):
        unit_scores(model, "taylor", calib=batch)
    kept, achieved = prune_to_ratio(model, 0.5, "taylor", calib={**batch, "labels": torch.tensor([0, 1])})
    assert model.config.num_attention_heads == 2 and achieved == pytest.approx(kept.sparsity(2))
    assert model(**batch).logits.shape == (2, 2)


@pytest.mark.parametrize(
    "make", [tiny_bert, lambda: tiny_llama(4), lambda: tiny_qwen2(4)], ids=["bert", "llama-mha", "qwen2-mha"]
)
def test_magnitude_and_taylor_equal_torch_prunings_group_importance(make, ids):
    """Our criteria compute what torch-pruning's ``GroupMagnitudeImportance(p=2)`` (before our
    square root) and ``GroupTaylorImportance`` compute over the DependencyGraph's groups, summed
    over each head's rows; kept ours, see ``magnitude_importance``."""
    import torch_pruning as tp

    from fedspine.pruning import family_of
    from fedspine.pruning.structured import _build_graph

    model = make()
    fam = family_of(model)
    shape = arch_shape(model)
    labels = {"labels": ids if fam.causal_lm else torch.tensor([0, 1])}
    model.zero_grad()
    model(input_ids=ids, **labels).loss.backward()  # eval mode, as taylor_importance runs it
    dg, _ = _build_graph(model, fam)
    mag = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="sum", normalizer=None, bias=True)
    tay = tp.importance.GroupTaylorImportance(group_reduction="sum", normalizer=None, bias=True)
    ours_mag = unit_scores(model, "magnitude")
    ours_tay = unit_scores(model, "taylor", calib={"input_ids": ids, **labels})
    for i, lr in enumerate(layer_roles(model)):
        heads = dg.get_pruning_group(lr.q, tp.prune_linear_out_channels, list(range(lr.q.out_features)))
        chans = dg.get_pruning_group(
            lr.mlp_in[0], tp.prune_linear_out_channels, list(range(shape.intermediate_size))
        )
        per_head = lambda rows: rows.view(shape.num_heads, -1).sum(1).double().numpy()  # noqa: E731
        np.testing.assert_allclose(per_head(mag(heads)) ** 0.5, ours_mag.heads[i], rtol=1e-5)
        np.testing.assert_allclose(mag(chans).double().numpy() ** 0.5, ours_mag.channels[i], rtol=1e-5)
        np.testing.assert_allclose(per_head(tay(heads)), ours_tay.heads[i], rtol=1e-4)
        np.testing.assert_allclose(tay(chans).double().numpy(), ours_tay.channels[i], rtol=1e-4)
